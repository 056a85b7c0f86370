"""Running under `accelerate launch` or `torchrun`: who writes, who goes first, and the shipped configs.

Every process runs the same `finetune run`; the launcher sets RANK / LOCAL_RANK / WORLD_SIZE and the
Trainer does the rest (DDP, FSDP or DeepSpeed from the accelerate config). The toolkit's part is to
let only the main process write outputs, to let it prepare shared files (the converted model, the
tokenized cache, the output folder) before the others read them, and to start accelerate with one of
the configs shipped in finetune/accelerate/.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from finetune.errors import FinetuneError

CONFIGS = Path(__file__).parent / "accelerate"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def sharded() -> bool:
    """FSDP or DeepSpeed ZeRO-3: each process holds a shard of the weights, so saving needs every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )


@contextlib.contextmanager
def main_first():
    """The main process runs the block first (it may write caches), then the others, which find them."""
    if world_size() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def launch_command(config: str, processes: int, argv: list[str]) -> list[str]:
    """`accelerate launch` with a shipped config running `finetune` with argv (the --distributed flags removed)."""
    path = CONFIGS / f"{config}.yaml"
    if not path.is_file():
        raise FinetuneError(f"--distributed: unknown config {config!r}; choose one of {', '.join(config_names())}")
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise FinetuneError(
            f"--distributed {config}: DeepSpeed is not installed; pip install -e '.[deepspeed]' (it needs CUDA), or "
            "use --distributed fsdp"
        )
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        raise FinetuneError("--distributed: the accelerate command is not on PATH; pip install accelerate")
    return [
        accelerate,
        "launch",
        "--config_file",
        str(path),
        "--num_processes",
        str(processes),
        "-m",
        "finetune.cli",
        *argv,
    ]
