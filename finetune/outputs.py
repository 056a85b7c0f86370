"""Atomic writes of run outputs: a killed process leaves the old file or folder, or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def replace_dir(tmp: Path, target: Path) -> None:
    """Put a finished folder in place: os.replace cannot overwrite a non-empty folder, so move the old one aside first."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
