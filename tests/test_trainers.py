"""The toolkit's SFT trainer computes what TRL's computes: left padding changes no logit, the LM head over trained
positions gives TRL's loss and gradients, micro-batches with accumulation give one big batch's gradients, and
length grouping is a reproducible order per epoch."""

from __future__ import annotations

import pytest
import torch
from cli_runs import ROWS
from trl import SFTConfig, SFTTrainer

from finetune import adapters
from finetune import model as model_lib
from finetune.batching import EpochSeededLengthGroupedSampler, LeftPaddingCollator
from finetune.data.build import tokenize
from finetune.recipe import AdapterSection, ModelSection
from finetune.trainers import TrainedPositionsSFTTrainer, trained_positions


@pytest.fixture(scope="module")
def rows(tiny_llama_dir):
    _, tokenizer = model_lib.load(ModelSection(base=str(tiny_llama_dir)))
    return [tokenize(tokenizer, messages) for messages in ROWS[4:12]]  # lengths differ by up to 10 tokens


def trainer(cls, tiny_llama_dir, tmp_path, **kwargs):
    from datasets import Dataset

    model, tokenizer = model_lib.load(ModelSection(base=str(tiny_llama_dir)))
    torch.manual_seed(0)
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        activation_checkpointing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    return cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": [0], "labels": [0]}]),
        processing_class=tokenizer,
        peft_config=adapters.peft_config(AdapterSection(r=8, alpha=16, dropout=0.0)),
        **kwargs,
    )


def loss_and_gradients(trainer, batches):
    trainer.model.train()
    trainer.model.zero_grad()
    trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    total = 0.0
    for batch in batches:
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=trained)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_left_padding_changes_no_logit(tiny_llama_dir, rows):
    model, tokenizer = model_lib.load(ModelSection(base=str(tiny_llama_dir)))
    batch = LeftPaddingCollator(tokenizer.pad_token_id)(rows)
    assert batch["attention_mask"][0].tolist().count(0) > 0  # some row really is padded
    with torch.no_grad():
        padded = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            assert torch.allclose(padded[i, -len(row["input_ids"]) :], alone, atol=1e-4)


def test_trained_positions_are_the_union_of_the_rows_next_token_labels():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, 7, 8]])
    assert trained_positions(labels).tolist() == [1, 2, 3]


def test_the_trained_positions_head_gives_trls_loss_and_gradients(tiny_llama_dir, rows, tmp_path):
    reference = trainer(SFTTrainer, tiny_llama_dir, tmp_path / "trl")
    ours = trainer(
        TrainedPositionsSFTTrainer,
        tiny_llama_dir,
        tmp_path / "ours",
        data_collator=LeftPaddingCollator(reference.processing_class.pad_token_id),
    )
    expected_loss, expected = loss_and_gradients(reference, [reference.data_collator(rows)])
    loss, got = loss_and_gradients(ours, [ours.data_collator(rows)])
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], atol=1e-5) for k in expected)
    # Only a fraction of the positions went through the LM head.
    labels = ours.data_collator(rows)["labels"]
    assert len(trained_positions(labels)) < labels.shape[1] / 2


def test_micro_batches_with_accumulation_give_one_batchs_gradients(tiny_llama_dir, rows, tmp_path):
    ours = trainer(TrainedPositionsSFTTrainer, tiny_llama_dir, tmp_path, data_collator=LeftPaddingCollator(0))
    one_loss, one = loss_and_gradients(ours, [ours.data_collator(rows)])
    micro_loss, micro = loss_and_gradients(ours, [ours.data_collator(rows[i : i + 2]) for i in range(0, len(rows), 2)])
    assert micro_loss == pytest.approx(one_loss, rel=1e-5)
    assert all(torch.allclose(one[k], micro[k], atol=1e-5) for k in one)


def test_length_grouping_is_reproducible_per_epoch_and_groups_lengths():
    lengths = [5, 90, 7, 88, 6, 91, 8, 89] * 8
    sampler = EpochSeededLengthGroupedSampler(lengths, batch_size=4, seed=42)
    first = list(sampler)
    assert sorted(first) == list(range(len(lengths)))
    assert list(EpochSeededLengthGroupedSampler(lengths, batch_size=4, seed=42)) == first  # a new process, same order
    sampler.set_epoch(1)
    assert list(sampler) != first  # each epoch is reshuffled
    batches = [[lengths[i] for i in first[k : k + 4]] for k in range(0, len(first), 4)]
    assert sum(max(b) - min(b) for b in batches) < sum(
        max(b) - min(b) for b in [lengths[k : k + 4] for k in range(0, len(lengths), 4)]
    )
