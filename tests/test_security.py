"""Security properties: remote code stays off unless asked for (and is logged when on), pickled weights are
refused and never written, a Hub token never reaches any output, and YAML is read with a safe loader."""

from __future__ import annotations

import ast
import io
import json
import logging
import random
import string
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import PROJECT

from finetune import cli, hub
from finetune import model as model_lib
from finetune.card import model_card
from finetune.errors import FinetuneError
from finetune.merge import merge
from finetune.recipe import ModelSection, load

MODELS = Path(__file__).resolve().parent / "bad_inputs" / "models"
TINY = MODELS / "tiny-llama"
# Files transformers' Trainer writes into checkpoints/ so a run can resume: optimizer moments, LR schedule,
# RNG state, training arguments. They are pickles but hold no model weights, are read back only by the
# Trainer resuming from this run's own folder, and are never pushed (hub uploads adapter/ or merged/ only).
TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "scaler.pt"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Every from_pretrained call of the model and tokenizer auto classes, with its kwargs (the real call runs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            calls.append((klass.__name__, kwargs))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_trust_remote_code_is_off_by_default_and_passed_as_false(from_pretrained_calls, caplog):
    section = ModelSection(base=str(TINY))
    assert section.trust_remote_code is False
    with caplog.at_level(logging.INFO, logger="finetune"):
        model_lib.load(section)
    assert {name for name, _ in from_pretrained_calls} == {"AutoModelForCausalLM", "AutoTokenizer"}
    for name, kwargs in from_pretrained_calls:
        assert kwargs.get("trust_remote_code") is False, name
    model_kwargs = next(kwargs for name, kwargs in from_pretrained_calls if name == "AutoModelForCausalLM")
    assert model_kwargs["use_safetensors"] is True  # the guard for Hub ids, where no local pre-check can look
    assert "trust_remote_code" not in caplog.text


def test_trust_remote_code_on_is_passed_and_logged(from_pretrained_calls, caplog):
    with caplog.at_level(logging.WARNING, logger="finetune"):
        model_lib.load(ModelSection(base=str(TINY), trust_remote_code=True))
    assert all(kwargs.get("trust_remote_code") is True for _, kwargs in from_pretrained_calls)
    assert f"model.trust_remote_code is on: running Python code shipped with {TINY}" in caplog.text


def test_a_model_that_needs_remote_code_is_refused_before_transformers_sees_it(from_pretrained_calls):
    # transformers would otherwise stop at an interactive "run the custom code? [y/N]" prompt.
    with pytest.raises(
        FinetuneError,
        match=r"needs its own Python code \(config.json has auto_map\); set model.trust_remote_code=true only if",
    ):
        model_lib.load(ModelSection(base=str(MODELS / "remote-code")))
    assert from_pretrained_calls == []


def test_pickled_weights_are_refused_although_they_would_load(from_pretrained_calls):
    folder = MODELS / "pickle-only"
    # The refusal is policy, not breakage: the pickle is a complete, loadable state dict.
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert "model.embed_tokens.weight" in state
    with pytest.raises(FinetuneError) as refused:
        model_lib.load(ModelSection(base=str(folder)))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"model.base: {folder}: only pickled weights (pytorch_model.bin)")
    assert "convert the folder to safetensors" in message
    assert from_pretrained_calls == []


def test_transformers_itself_refuses_the_pickle_with_use_safetensors():
    # Defence in depth: without the toolkit's pre-check, use_safetensors=True still refuses.
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(MODELS / "pickle-only", use_safetensors=True)


# ---------------------------------------------------------------- a tiny run with a Hub token in the environment

ROWS = [
    [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
    ]
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]
]


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, tiny_llama_dir):
    """Train 2 steps (a checkpoint each), merge, render the card and a dry-run push, all with HF_TOKEN set;
    returns the run folder, the token and everything printed or logged on the way."""
    token = "hf_" + "".join(random.Random().choices(string.ascii_letters, k=30))
    folder = tmp_path_factory.mktemp("token-run")
    (folder / "rows.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS))
    recipe = {
        "name": "tiny-secure",
        "model": {"base": str(tiny_llama_dir)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"sources": [{"path": str(folder / "rows.jsonl")}], "max_length": 128},
        "train": {
            "max_steps": 2,
            "batch_size": 2,
            "save_steps": 1,
            "warmup_ratio": 0.0,
            "output_dir": str(folder / "run"),
        },
    }
    (folder / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    collect = Collect()
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("huggingface_hub")]
    levels = [logger.level for logger in loggers]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", token)
        patch.setenv("FINETUNE_CACHE", str(folder / "cache"))
        for logger in loggers:
            logger.addHandler(collect)
            logger.setLevel(logging.DEBUG)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                assert cli.main(["run", str(folder / "recipe.yaml")]) == 0
                merge(folder / "run")
                card = model_card(folder / "run", merged=True, repo_id="someone/tiny-secure")
                pushed = hub.push(folder / "run", "someone/tiny-secure", "adapter", dry_run=True)
        finally:
            for logger, level in zip(loggers, levels):
                logger.removeHandler(collect)
                logger.setLevel(level)
    said = "\n".join([out.getvalue(), err.getvalue(), *collect.lines, card, json.dumps(pushed)])
    return folder / "run", token, said


def test_only_safetensors_model_weights_are_written(token_run):
    run_dir, _, _ = token_run
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "merged" / "model.safetensors").is_file()
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and all((c / "adapter_model.safetensors").is_file() for c in checkpoints)
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    outside_checkpoints = [p for p in pickles if "checkpoints" not in p.relative_to(run_dir).parts]
    assert outside_checkpoints == []
    assert {p.name for p in pickles} <= TRAINER_STATE, "a checkpoint holds pickled files that are not trainer state"


def test_the_hub_token_appears_in_no_file_log_card_or_output(token_run):
    run_dir, token, said = token_run
    assert "trained:" in said and "tiny-secure" in said  # the capture did capture the run
    assert token not in said
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    for name in ("run.json", "recipe.yaml", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name


# ---------------------------------------------------------------- YAML


@pytest.mark.parametrize(
    "tag", ["!!python/object:os.system", "!!python/object/apply:os.system ['true']", "!!python/name:os.system"]
)
def test_python_yaml_tags_are_refused_in_recipes_and_overrides(tmp_path, tag):
    recipe = tmp_path / "tagged.yaml"
    recipe.write_text(f"data:\n  sources:\n    - path: {tag}\n")
    with pytest.raises(
        FinetuneError, match=r"invalid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/"
    ):
        load(str(recipe))
    plain = tmp_path / "plain.yaml"
    plain.write_text("data:\n  sources:\n    - path: rows.jsonl\n")
    with pytest.raises(FinetuneError, match=r"invalid YAML value: could not determine a constructor for the tag"):
        load(str(plain), [f"train.seed={tag}"])


def test_the_package_has_no_unsafe_loader():
    """No yaml.load / unsafe_load / full_load, no yaml Loader other than SafeLoader, no pickle, no torch.load
    without weights_only=True anywhere in finetune/."""
    problems = []
    for path in sorted((PROJECT / "finetune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                )
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names):
                    problems.append(f"{path.name}:{node.lineno}: imports a pickle module")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            keywords = {k.arg: k.value for k in node.keywords}
            if owner == "yaml" and node.func.attr in (
                "load",
                "unsafe_load",
                "full_load",
                "load_all",
                "unsafe_load_all",
                "full_load_all",
            ):
                loader = keywords.get("Loader") or (node.args[1] if len(node.args) > 1 else None)
                if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                    problems.append(f"{path.name}:{node.lineno}: yaml.{node.func.attr} without SafeLoader")
            if owner == "torch" and node.func.attr == "load":
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
    assert problems == []
