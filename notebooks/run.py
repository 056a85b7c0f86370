"""Execute the walkthrough notebooks headless and save the executed copies (with their plots).

    .venv/bin/python notebooks/run.py                      # all of them -> notebooks/out/NN-name.ipynb
    .venv/bin/python notebooks/run.py 01 05                # the ones whose file name starts with 01 or 05
    .venv/bin/python notebooks/run.py --figures docs       # also copy the loss and eval plots to docs/

`make notebooks` runs the first form. Each notebook runs with its own folder as the working folder, as
Jupyter would, and writes its run folders under FINETUNE_NOTEBOOK_OUT (default: the output folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Plots worth showing outside the notebooks: (file the notebooks write under the output folder, name in --figures).
FIGURES = (
    ("runs/medical/loss.png", "loss.png"),
    ("runs/medical/eval.png", "eval.png"),
    ("runs/medical-dpo/rewards.png", "rewards.png"),
)


def notebooks(prefixes: list[str]) -> list[Path]:
    found = sorted(HERE.glob("[0-9][0-9]-*.ipynb"))
    chosen = [p for p in found if not prefixes or any(p.name.startswith(x) for x in prefixes)]
    if not chosen:
        sys.exit(f"no notebook in {HERE} starts with {' or '.join(prefixes)}")
    return chosen


def execute(path: Path, out: Path, timeout: int) -> float:
    """Run every cell of `path` in a fresh kernel; save the executed copy to out/NAME (also when a cell fails)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    started = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(notebook, out / path.name)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="file-name prefixes, e.g. 01 03 (default: all)")
    parser.add_argument(
        "--out", type=Path, default=HERE / "out", help="where the executed copies go (default notebooks/out)"
    )
    parser.add_argument(
        "--figures", type=Path, help="also copy the quickstart loss plot, the eval plot and the DPO reward plot here"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run (default 1800)")
    args = parser.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FINETUNE_NOTEBOOK_OUT", str(out))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nbclient.exceptions import CellExecutionError

    failed = []
    for path in notebooks(args.names):
        print(f"{path.name} ...", end=" ", flush=True)
        try:
            seconds = execute(path, out, args.timeout)
            print(f"{seconds:.0f} s -> {out / path.name}")
        except CellExecutionError as e:
            print(f"FAILED (executed copy with the error: {out / path.name})")
            print(str(e).strip().splitlines()[-1], file=sys.stderr)
            failed.append(path.name)
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        runs = Path(os.environ["FINETUNE_NOTEBOOK_OUT"])
        for source, name in FIGURES:
            if (runs / source).is_file():
                shutil.copyfile(runs / source, args.figures / name)
                print(f"copied {runs / source} -> {args.figures / name}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
