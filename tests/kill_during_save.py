"""Fault injection: `finetune run` that SIGKILLs itself in the middle of saving checkpoint-4, right after
the optimizer state is written and before the scheduler, RNG and trainer state are."""

import os
import signal
import sys

import torch

from finetune import cli

_save = torch.save


def save_then_die(obj, f, *args, **kwargs):
    _save(obj, f, *args, **kwargs)
    if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
        os.kill(os.getpid(), signal.SIGKILL)


torch.save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
