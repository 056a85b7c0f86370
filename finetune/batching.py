"""How tokenized SFT rows become batches: length groups that are reproducible per epoch, and left padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from finetune.data.build import IGNORE


class EpochSeededLengthGroupedSampler(Sampler):
    """transformers' length grouping (random mega-batches, each sorted by length, the longest batch first), drawn
    from a generator seeded by (seed, epoch) instead of the global RNG: every epoch's order can be recomputed, so a
    run resumed in any epoch sees the batches the uninterrupted run saw."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


@dataclass
class LeftPaddingCollator:
    """Pads on the left with explicit position ids, so the answers that end the rows line up at the right edge."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)

        def left(values, fill) -> list:
            return [fill] * (longest - len(values)) + list(values)

        return {
            "input_ids": torch.tensor([left(row["input_ids"], self.pad_token_id) for row in rows]),
            "labels": torch.tensor([left(row["labels"], IGNORE) for row in rows]),
            "attention_mask": torch.tensor([left([1] * len(row["input_ids"]), 0) for row in rows]),
            "position_ids": torch.tensor([left(range(len(row["input_ids"])), 0) for row in rows]),
        }
