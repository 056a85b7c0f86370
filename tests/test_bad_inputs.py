"""The bad-input catalog (tests/bad_inputs/CATALOG.yaml): each malformed recipe, data file, model or run
folder is refused with its exact one-line error, exit code 2, and no partial output.

Cases run in-process through finetune.cli.main (a subprocess per case would cost ~5 s of imports each),
with the current folder set to tests/bad_inputs so the paths in recipes and messages are short and fixed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from finetune import cli

HERE = Path(__file__).resolve().parent / "bad_inputs"
CATALOG = yaml.safe_load((HERE / "CATALOG.yaml").read_text(encoding="utf-8"))
RECIPE_COMMANDS = ("run", "data", "recipes")


def tree(folder: Path) -> set[str]:
    return (
        {str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts}
        if folder.exists()
        else set()
    )


@pytest.fixture
def in_catalog(monkeypatch, tmp_path):
    """cwd = tests/bad_inputs, a private model/token cache, no progress bars (terminal UI, not the error contract)."""
    import transformers

    monkeypatch.chdir(HERE)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # model-hub-id-offline's message depends on it
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    yield tmp_path
    if was_enabled:
        transformers.utils.logging.enable_progress_bar()


@pytest.mark.parametrize("case", CATALOG, ids=[c.get("id") or c["case"] for c in CATALOG])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, in_catalog, capsys, monkeypatch):
    runs = in_catalog / "runs"
    out = runs / "out"
    argv = case.get("command", "run").split() + [case["case"]]
    if argv[0] in RECIPE_COMMANDS:
        argv.append(f"train.output_dir={out}")
    argv += case.get("args", [])
    for module in case.get("hide", []):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails, as on a machine without it
    if case.get("finished"):
        out.mkdir(parents=True)  # what an earlier finished run left there
        (out / "run.json").write_text("{}")
    before = tree(HERE)

    code = cli.main(argv)

    captured = capsys.readouterr()
    assert captured.err == f"error: {case['error'].replace('{out}', str(out))}\n"
    assert code == 2
    assert "Traceback" not in captured.out
    # Every input is checked before the run folder is made: nothing is created, not even an empty runs/ or a lock.
    assert tree(runs) == ({"out", "out/run.json"} if case.get("finished") else set())
    cache = in_catalog / "cache"
    assert not (cache / "models").exists() or not any((cache / "models").iterdir()), "a half-converted model was cached"
    assert tree(HERE) == before, "the case wrote into tests/bad_inputs"


def test_every_file_in_the_catalog_folder_is_used():
    """A fixture no case reaches tests nothing; a case whose file is gone would fail for the wrong reason."""
    cases = {c["case"] for c in CATALOG}
    recipes = {p.name for p in HERE.glob("*.yaml") if p.name != "CATALOG.yaml" and not p.name.startswith("_")}
    assert recipes - cases == set(), "recipes missing from CATALOG.yaml"
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in HERE.glob("*.yaml"))
    for path in sorted(HERE.glob("data/*")) + sorted(HERE.glob("models/*")):
        name = str(path.relative_to(HERE))
        if name != "models/generate.py":
            assert name in text, f"{name} is used by no case"
    for case in cases:
        if not case.startswith("run-folders/missing"):
            assert (HERE / case).exists(), case
    assert len(CATALOG) >= 40


def test_unsupported_gguf_fixture_is_a_valid_gguf_of_another_architecture():
    # Otherwise the case would test "not a GGUF file" twice.
    from gguf import GGUFReader

    assert GGUFReader(HERE / "models" / "gpt2-tiny.gguf").fields["general.architecture"].contents() == "gpt2"


def test_on_bad_row_skip_skips_unreadable_jsonl_lines(in_catalog, capsys):
    """The truncated-JSONL error advises data.on_bad_row=skip; that advice must work."""
    code = cli.main(["data", "stats", "data-truncated-jsonl.yaml", "data.on_bad_row=skip"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    stats = json.loads(captured.out)
    assert stats["sources"] == [{"source": "data/truncated.jsonl", "reader": "messages", "rows": 1, "skipped": 1}]
