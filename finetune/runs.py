"""The run folder: its layout, its lock, its checkpoints, its JSON files, and the one way outputs are written.

    RUN_DIR/recipe.yaml     the resolved recipe
    RUN_DIR/adapter/        adapter, tokenizer and training chat template
    RUN_DIR/checkpoints/    resumable trainer checkpoints (checkpoint-N)
    RUN_DIR/metrics.jsonl   every logged step, with its wall-clock time
    RUN_DIR/run.json        written last: its presence means the training finished
    RUN_DIR/eval.json       base vs adapter (eval.md, eval.png beside it)
    RUN_DIR/merged/         the merged model (merge.json inside)
    RUN_DIR/gguf/           GGUF files, Modelfiles, export.json
    RUN_DIR/tb/, mlruns/, trackio/, wandb/   experiment trackers' stores (train.report_to; tracking.py)

Every output goes through `staged()`: written under a hidden name beside its target and renamed into
place, so a killed process leaves the old output or the new one, never half of one that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune import distributed
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

# The libraries whose versions change what a run computes: recorded in run.json, the model card and cache keys.
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "gguf",
    "huggingface_hub",
)


@dataclass(frozen=True)
class RunFolder:
    root: Path

    recipe = property(lambda self: self.root / "recipe.yaml")
    adapter = property(lambda self: self.root / "adapter")
    checkpoints = property(lambda self: self.root / "checkpoints")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary = property(lambda self: self.root / "run.json")
    eval_json = property(lambda self: self.root / "eval.json")
    merged = property(lambda self: self.root / "merged")
    gguf = property(lambda self: self.root / "gguf")
    lock = property(lambda self: self.root / ".lock")

    @property
    def finished(self) -> bool:
        return self.summary.is_file()


# ---------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _shareable(path: Path) -> None:
    """Give a staged output the modes a plain write would have (0644 / 0755 under the usual umask):
    mkstemp and mkdtemp create them owner-only, and a model is meant to be shared."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def remove_partials(target: Path) -> None:
    """Leftovers of a killed earlier write of this target (multi-GB for real models)."""
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        log.warning("removing %s, left by an interrupted earlier run", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(target: Path, folder: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside `target` (a file, or a folder with folder=True); when the block
    ends without an error it replaces `target` in one rename, otherwise it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _shareable(tmp)
        if folder and target.exists():
            # os.replace cannot overwrite a non-empty folder: move the old one aside first.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    """Write indented JSON atomically."""
    with staged(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    with staged(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_report(folder: Path, stem: str, result: dict, markdown: str, plot) -> None:
    """STEM.json, STEM.md and STEM.png (drawn by plot(result, path)) in the folder, each written atomically."""
    write_json(folder / f"{stem}.json", result)
    write_text(folder / f"{stem}.md", markdown)
    with staged(folder / f"{stem}.png") as tmp:
        plot(result, tmp)
    log.info("wrote %s, %s.md, %s.png", folder / f"{stem}.json", stem, stem)


def read_json(path: Path) -> dict | None:
    """A run output's JSON, None when it is not there; a damaged one is an error that says how to recover."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FinetuneError(
            f"{path}: invalid JSON ({e.msg} at line {e.lineno}); delete it and run the step that writes it again"
        ) from None


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- a run's lifecycle


def finished_recipe(run_dir: Path):
    """The resolved recipe of a finished run folder; refuses folders that are not finished runs."""
    from finetune.recipe import validate

    folder = RunFolder(Path(run_dir))
    if not folder.root.is_dir():
        raise FinetuneError(
            f"{run_dir}: no such run folder; give the output folder of `finetune run` (train.output_dir)"
        )
    if not folder.recipe.is_file():
        raise FinetuneError(f"{run_dir}: not a run folder (no recipe.yaml); give the output folder of `finetune run`")
    if not folder.finished:
        raise FinetuneError(f"{run_dir}: the run is incomplete (no run.json); finish or resume it with `finetune run`")
    if not (folder.adapter / "adapter_config.json").is_file():
        raise FinetuneError(f"{run_dir}/adapter: no adapter_config.json; the run folder is damaged, train again")
    try:
        data = yaml.safe_load(folder.recipe.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FinetuneError(
            f"{folder.recipe}: invalid YAML ({str(e).splitlines()[0]}); the run folder is damaged, train again"
        ) from None
    return validate(data, str(folder.recipe))


def check_not_finished(out: Path, overwrite: bool) -> None:
    """Refuse to train over a finished run unless overwrite. Checked after the other inputs, whose errors are the
    user's real problem when both apply."""
    if RunFolder(out).finished and not overwrite:
        raise FinetuneError(
            f"{out}: a finished run is already there; pass --overwrite to replace it, or set train.output_dir"
        )


def check_writable(out: Path) -> None:
    """Refuse a folder that cannot be written, leaving nothing behind: the probe file goes into the nearest folder
    that exists, and is removed at once."""
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-").close()
    except OSError as e:
        raise FinetuneError(
            f"train.output_dir: {out}: cannot write there ({e.strerror}); choose a writable folder"
        ) from None


def prepare(out: Path, overwrite: bool) -> None:
    """Create the run folder, replacing a finished run when overwrite; check_writable and check_not_finished
    come first."""
    if RunFolder(out).finished and overwrite:
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FinetuneError(
            f"train.output_dir: {out}: cannot write there ({e.strerror}); choose a writable folder"
        ) from None


@contextlib.contextmanager
def exclusive(out: Path):
    """Hold RUN_DIR/.lock for the whole run, so a second run into the same folder refuses instead of interleaving.
    Under torchrun / accelerate only the main process takes it: the others are the same run."""
    if not distributed.is_main():
        yield
        return
    with RunFolder(out).lock.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FinetuneError(
                f"{out}: another run is writing there right now; wait for it or set train.output_dir"
            ) from None
        yield


def is_complete(checkpoint: Path) -> bool:
    """transformers writes trainer_state.json after the weights, optimizer, scheduler and RNG state, so a
    readable one marks a finished save."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was saved completely."""
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
    )
    for _, checkpoint in reversed(steps):
        if is_complete(checkpoint):
            return checkpoint
        log.warning("ignoring incomplete checkpoint %s", checkpoint)
    return None


def versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that matter (missing ones left out)."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
