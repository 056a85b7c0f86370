"""`finetune run` as a subprocess on the tiny Llama: a recipe with varied row lengths, the command, logged losses;
and a benchmark script loaded as a module."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import PROJECT

ROWS = [
    [{"role": "user", "content": f"Spell {w}."}, {"role": "assistant", "content": " ".join(w.upper())}]
    for w in ("cat", "dog", "sun", "map", "pen", "cup", "box", "hat")
]
ROWS += [
    [
        {"role": "user", "content": f"Write {w} backwards, then say done."},
        {"role": "assistant", "content": f"{w[::-1]}, done."},
    ]
    for w in ("stone", "river", "garden", "window", "bridge", "orange", "silver", "planet")
]


def write_recipe(folder: Path, base, out: Path, rows: int = 8, dropout: float = 0.05, **train) -> str:
    """A recipe over the first `rows` rows, LoRA dropout as users get it; `train` overrides the train section
    (max_steps 10, batch 2, save every 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS[:rows]))
    recipe = {
        "model": {"base": str(base)},
        "adapter": {"r": 8, "alpha": 16, "dropout": dropout},
        "data": {"sources": [{"path": str(folder / "rows.jsonl")}], "max_length": 64},
        "train": {
            "max_steps": 10,
            "learning_rate": 0.005,
            "batch_size": 2,
            "save_steps": 2,
            "warmup_ratio": 0.0,
            "output_dir": str(out),
            **train,
        },
        "eval": {"suite": None},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def finetune_run(recipe: str, *args: str, launcher: tuple[str, ...] = (), **kwargs) -> subprocess.Popen:
    command = (
        [*launcher, "-m", "finetune.cli", "run", recipe, *args]
        if launcher
        else [sys.executable, "-m", "finetune.cli", "run", recipe, *args]
    )
    return subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def logged_losses(out: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


def benchmark(name: str):
    """benchmarks/NAME.py as a module (the folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, PROJECT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
