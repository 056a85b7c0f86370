"""The walkthrough notebooks: committed clean, and (slow) executed top to bottom, headless and offline.

The executed notebooks share one output folder, in file order, so 04 and 05 reuse the SFT run 01 trains
(each still trains it itself when run alone). Runs are 2 steps and evals 4 examples per task.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = [
    "01-quickstart.ipynb",
    "02-domain-data.ipynb",
    "03-qlora-merge-gguf.ipynb",
    "04-preference-tuning.ipynb",
    "05-evaluation.ipynb",
]
STEPS, EVAL_N = 2, 4


def test_the_walkthroughs_are_all_there():
    assert sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]-*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_clean(name):
    """No outputs or execution counts in git, a python3 kernel, run folders under FINETUNE_NOTEBOOK_OUT."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code), (
        "clear the outputs before committing"
    )
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")
    for number, code_cell in enumerate(code):
        compile(code_cell.source, f"{name}, code cell {number}", "exec")  # a syntax error fails here, without a kernel
    source = "\n".join(cell.source for cell in code)
    assert 'os.environ.get("FINETUNE_NOTEBOOK_OUT"' in source
    assert all(
        target.startswith("{OUT") for target in re.findall(r"train\.output_dir=(\S+)", source)
    )  # every run goes under OUT


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One output folder for the module's notebooks, and Jupyter / IPython state kept out of the home folder."""
    root = tmp_path_factory.mktemp("notebooks")
    env = {
        "FINETUNE_NOTEBOOK_OUT": str(root / "out"),
        "FINETUNE_NOTEBOOK_STEPS": str(STEPS),
        "FINETUNE_NOTEBOOK_EVAL_N": str(EVAL_N),
        "IPYTHONDIR": str(root / "ipython"),
        "JUPYTER_CONFIG_DIR": str(root / "jupyter" / "config"),
        "JUPYTER_DATA_DIR": str(root / "jupyter" / "data"),
        "JUPYTER_RUNTIME_DIR": str(root / "jupyter" / "runtime"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)  # the kernel inherits this process's environment
        yield root / "out"


def execute(name: str, out: Path):
    """Run the notebook in a fresh python3 kernel with notebooks/ as working folder; a failing cell fails the test."""
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    try:
        client.execute()
    finally:
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, out / name)  # the executed copy, to read when a test fails
    return notebook


def cell(notebook, marker: str):
    """The one code cell whose source contains `marker`."""
    found = [c for c in notebook.cells if c.cell_type == "code" and marker in c.source]
    assert len(found) == 1, f"{len(found)} code cells contain {marker!r}"
    return found[0]


def text(code_cell) -> str:
    """stdout and Markdown the cell showed."""
    parts = []
    for output in code_cell.outputs:
        if output.output_type == "stream" and output.name == "stdout":
            parts.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            parts.append(output.data.get("text/markdown", ""))
    return "".join(parts)


def shows_image(code_cell) -> bool:
    return any(o.output_type == "display_data" and "image/png" in o.data for o in code_cell.outputs)


@pytest.mark.slow
def test_01_quickstart(out):
    notebook = execute("01-quickstart.ipynb", out)
    run = out / "runs" / "medical"
    summary = json.loads((run / "run.json").read_text())
    assert summary["steps"] == STEPS and summary["device"] == "cpu"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "loss.png").stat().st_size > 0
    assert shows_image(cell(notebook, '"loss.png"'))
    losses = re.findall(r"step (\d+): loss (\d+\.\d+)", text(cell(notebook, '"loss.png"')))
    assert [int(step) for step, _ in losses] == list(range(1, STEPS + 1))
    chat = text(cell(notebook, "disable_adapter"))
    assert re.search(r"^fine-tuned: ", chat, re.M) and re.search(r"^base: ", chat, re.M)
    assert "expected answer: " in text(cell(notebook, 'split="test"'))


@pytest.mark.slow
def test_02_domain_data(out):
    notebook = execute("02-domain-data.ipynb", out)
    from finetune.data.readers import READERS

    readers = text(cell(notebook, "from finetune.data.readers import READERS"))
    assert all(f"`{name}`" in readers for name in READERS)
    assert "shared: 0" in text(cell(notebook, 'SAMPLES["pubmedqa"], split="test"'))
    # The trained span of a classification row is exactly the label and the end-of-turn token.
    spans = text(cell(notebook, "render_spans(tokenizer"))
    assert re.search(r"^\d+ tokens, 2 trained$", spans, re.M)
    assert "⟦positive<|im_end|>⟧" in spans and spans.count("⟦") == 1
    stats = text(cell(notebook, "build.build(loaded, tokenizer)"))
    assert all(re.search(rf"^\| {name} \| [1-9]\d* \|", stats, re.M) for name in ("medical", "legal", "finance"))
    assert shows_image(cell(notebook, "ax.hist"))


@pytest.mark.slow
def test_03_qlora_merge_gguf(out):
    notebook = execute("03-qlora-merge-gguf.ipynb", out)
    fp32, nf4 = map(
        float, re.search(r"fp32: (\d+) MiB, nf4: (\d+) MiB", text(cell(notebook, "get_memory_footprint"))).groups()
    )
    assert nf4 < fp32 / 2
    run = out / "runs" / "medical-qlora"
    assert json.loads((run / "run.json").read_text())["steps"] == STEPS
    merge = json.loads((run / "merged" / "merge.json").read_text())
    assert set(merge["targets"]) == {"base", "dequantized"} and merge["quantization"] == "nf4"
    # What the notebook prints is the merge that was written: below the threshold, and the dequantized
    # target reproduces the trained nf4 model.
    shown = text(cell(notebook, "merge.merge(run_dir)"))
    parity = dict(re.findall(r"^\| (base|dequantized) \| (\S+) \|", shown, re.M))
    assert float(parity["dequantized"]) == pytest.approx(
        merge["targets"]["dequantized"]["vs_trained"]["max_abs_logit_diff"], rel=1e-2
    )
    assert float(parity["dequantized"]) < merge["threshold"]
    printed = float(re.search(r"merge check: max \|Δlogit\| (\S+) <= threshold", shown).group(1))
    assert printed <= merge["threshold"] and f"<= threshold {merge['threshold']:g}: True" in shown
    assert (run / "gguf" / "medical-f16.gguf").stat().st_size > 100 * 2**20
    assert text(cell(notebook, 'figures["modelfile"]')).startswith("FROM ./medical-f16.gguf")
    card = text(cell(notebook, 'result["card"]'))
    assert "# medical" in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "qlora" in card
    assert "model.safetensors" in text(cell(notebook, "dry_run=True"))


@pytest.mark.slow
def test_04_preference_tuning(out):
    notebook = execute("04-preference-tuning.ipynb", out)
    run = out / "runs" / "medical-dpo"
    summary = json.loads((run / "run.json").read_text())
    assert summary["method"] == "dpo" and summary["steps"] == STEPS
    assert Path(summary["init_from"]).resolve() == (out / "runs" / "medical" / "adapter").resolve()
    assert (run / "rewards.png").stat().st_size > 0 and shows_image(cell(notebook, '"rewards.png"'))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [r for r in logged if "rewards/margins" in r]
    table = text(cell(notebook, "rewards/margins"))
    assert len(rewards) == STEPS
    for record in rewards:
        assert f"| {record['step']} | {record['loss']:.4f} | {record['rewards/chosen']:+.4f} |" in table


@pytest.mark.slow
def test_05_evaluation(out):
    notebook = execute("05-evaluation.ipynb", out)
    run = out / "runs" / "medical"
    result = json.loads((run / "eval.json").read_text())
    assert set(result["tasks"]) == {"pubmedqa", "medmcqa"} and all(t["n"] == EVAL_N for t in result["tasks"].values())
    table = text(cell(notebook, "evaluation.run(sft_dir"))
    for name, task in result["tasks"].items():
        assert (
            f"\n| {name} | accuracy | {EVAL_N} | {task['base']:.3f} | {task['adapter']:.3f} | {task['delta']:+.3f} |"
            in table
        )
    assert shows_image(cell(notebook, '"eval.png"')) and (run / "eval.png").stat().st_size > 0
    verdict = text(cell(notebook, "evaluation.regressions(result)"))
    flagged = [name for name, task in result["tasks"].items() if task["regression"]]
    expected = f"the adapter regresses on: {', '.join(flagged)}" if flagged else "no regression flagged"
    assert expected in verdict
