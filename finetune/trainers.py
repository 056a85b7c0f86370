"""TRL's SFTTrainer as the toolkit runs it (EpochSeededSFTTrainer, TrainedPositionsSFTTrainer): length grouping that a
resumed run reproduces, and on CPU an LM head
that projects only the positions that are trained.

With assistant-only labels most positions of a row are prompt, and the LM head (hidden x vocab,
a fifth of a small model's forward FLOPs) is wasted on them. TRL's fused head skips them only where
Triton runs; on CPU it scores every position. This trainer asks the model for the logits of the
trained positions alone (transformers' `logits_to_keep`, one set of positions for the whole batch)
and computes the same loss TRL does: the summed negative log-likelihood of the trained tokens
divided by their count in the batch.

Rows are padded on the left (batching.LeftPaddingCollator), so that the answers, which end their
rows, line up at the right edge: the positions shared by the batch are then little more than the
longest answer. Causal attention with the padding masked out makes this the same computation as
right padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import trl

from finetune.batching import EpochSeededLengthGroupedSampler
from finetune.data.build import IGNORE


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token label is trained in at least one row of the batch."""
    return (labels[:, 1:] != IGNORE).any(dim=0).nonzero().flatten()


class EpochSeededSFTTrainer(trl.SFTTrainer):
    def _get_train_sampler(self, dataset=None):
        # transformers' LengthGroupedSampler draws from the global RNG, whose state a resumed run does not have
        # when it starts a later epoch; this one is seeded per epoch.
        dataset = dataset if dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(dataset)
        lengths = [len(ids) for ids in dataset["input_ids"]]
        # Grouped by the global batch: under DDP accelerate deals each group's consecutive batches out to the ranks,
        # so N processes train on the same rows per step as one process with N times the batch.
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSeededLengthGroupedSampler(lengths, global_batch, seed)


class TrainedPositionsSFTTrainer(EpochSeededSFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        keep = trained_positions(labels)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, use_cache=False, logits_to_keep=keep)
        targets = labels[:, keep + 1]
        trained = targets != IGNORE
        count = trained.sum() if num_items_in_batch is None else num_items_in_batch
        nll = F.cross_entropy(
            outputs.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        loss = nll / torch.as_tensor(count).clamp(min=1)
        # As in Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        with torch.no_grad():
            correct = ((outputs.logits.argmax(-1) == targets) & trained).sum()
            total = self.accelerator.gather_for_metrics(trained.sum()).sum()
            correct = self.accelerator.gather_for_metrics(correct).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)
        if mode == "train":
            real = (
                inputs["attention_mask"].sum()
                if "attention_mask" in inputs
                else torch.tensor(inputs["input_ids"].numel())
            )
            self._total_train_tokens += self.accelerator.gather_for_metrics(real.to(labels.device)).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
