"""Scoring one model on a task's examples: option log-likelihood for multiple choice, greedy answers for QA,
perplexity for documents."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from finetune.errors import FinetuneError
from finetune.eval.metrics import exact_match, numeric_match, token_f1
from finetune.eval.suite import Task


def score_task(model, tokenizer, items: list[dict], task: Task, batch_size: int) -> dict:
    """Per-example scores of every metric for one model, plus its predictions (the picked option, the answer, or the
    number of tokens a document was scored on)."""
    started = time.perf_counter()
    if task.kind == "mcq":
        per_example, predictions = score_mcq(model, tokenizer, items, task, batch_size)
    elif task.kind == "text":
        per_example, predictions = score_text(model, tokenizer, items, task, batch_size)
    else:
        per_example, predictions = score_qa(model, tokenizer, items, task, batch_size)
    return {"per_example": per_example, "predictions": predictions, "seconds": time.perf_counter() - started}


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def option_logprobs(
    model, tokenizer, prompts: list[list[int]], options: list[list[str]], batch_size: int = 8
) -> list[list[tuple[float, int]]]:
    """(summed log-prob, token count) of every option as the continuation of its prompt's token ids.

    Options are tokenized on their own and appended to the prompt ids, so an option's tokens are the
    same whatever the prompt ends with. Each batch of prompts is run once, padded on the right, and
    its key/value cache is reused for every option: option j of every prompt is fed after the cache
    (padding masked out, positions continuing each prompt's own length), then the cache is cropped
    back to the prompts. An example with k options costs one prompt pass plus k passes over a few
    option tokens, instead of k passes over prompt + option.
    """
    from transformers import DynamicCache

    pad = tokenizer.pad_token_id
    option_ids = []
    for labels in options:
        encoded = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
        for label, ids in zip(labels, encoded):
            if not ids:
                raise FinetuneError(f"option {label!r} has no tokens; an option label must be non-empty text")
        option_ids.append(encoded)
    # Longest first: batches hold similar lengths (less padding) and an out-of-memory shows at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    scores = [[(0.0, 0)] * len(labels) for labels in options]
    device = model.device
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        lengths = torch.tensor([len(prompts[i]) for i in batch])
        width = int(lengths.max())
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(prompts[i])] = torch.tensor(prompts[i])
            mask[row, : len(prompts[i])] = 1
        cache = DynamicCache(config=model.config)
        first = int(lengths.min()) - 1  # earliest logit position any prompt's last token sits at
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            cache=cache,
            use_cache=True,
            logits_to_keep=width - first,
        ).logits
        last = torch.log_softmax(logits[torch.arange(len(batch)), lengths - 1 - first].float(), dim=-1).cpu()
        for j in range(max(len(option_ids[i]) for i in batch)):
            rows = [(row, option_ids[i][j]) for row, i in enumerate(batch) if j < len(option_ids[i])]
            # The first option token is scored by the prompt's last logit; the rest need the option fed in.
            span = max(len(o) for _, o in rows) - 1
            if span:
                tail = torch.full((len(batch), span), pad, dtype=torch.long)
                tail_mask = torch.zeros((len(batch), span), dtype=torch.long)
                for row, o in rows:
                    tail[row, : len(o) - 1] = torch.tensor(o[:-1])
                    tail_mask[row, : len(o) - 1] = 1
                positions = lengths[:, None] + torch.arange(span)[None, :]
                out = model(
                    input_ids=tail.to(device),
                    attention_mask=torch.cat([mask, tail_mask], dim=1).to(device),
                    position_ids=positions.to(device),
                    cache=cache,
                    use_cache=True,
                )
                following = torch.log_softmax(out.logits.float(), dim=-1).cpu()
                cache.crop(-span)
            for row, o in rows:
                total = last[row, o[0]].item()
                if len(o) > 1:
                    total += following[row, torch.arange(len(o) - 1), torch.tensor(o[1:])].sum().item()
                scores[batch[row]][j] = (total, len(o))
    return scores


def choose(scores: list[tuple[float, int]], normalise: bool = True) -> int:
    """Index of the best option: by mean log-prob per token (normalise) or by the summed log-prob; first wins ties."""
    values = [total / count if normalise else total for total, count in scores]
    return max(range(len(values)), key=lambda k: values[k])


def score_mcq(
    model, tokenizer, items: list[dict], task: Task, batch_size: int
) -> tuple[dict[str, list[float]], list[str]]:
    """Per-example accuracy (normalised and summed) and the option each example picks by the task's metric."""
    prompts = [encode_prompt(tokenizer, it["messages"]) for it in items]
    scores = option_logprobs(model, tokenizer, prompts, [it["options"] for it in items], batch_size)
    per_example, picked = {"accuracy": [], "accuracy_sum": []}, []
    for it, option_scores in zip(items, scores):
        gold = it["options"].index(it["answer"])
        per_example["accuracy"].append(float(choose(option_scores, True) == gold))
        per_example["accuracy_sum"].append(float(choose(option_scores, False) == gold))
        picked.append(it["options"][choose(option_scores, task.metric == "accuracy")])
    return per_example, picked


# ---------------------------------------------------------------- generation


@torch.inference_mode()
def generate_batch(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts.

    Prompts are batched longest first, so a batch holds similar lengths and little of the prefill
    is spent on padding; the answers come back in the order of `conversations`."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    answers = [""] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = tokenizer(
                [texts[i] for i in batch], add_special_tokens=False, padding=True, return_tensors="pt"
            ).to(model.device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = output[:, inputs["input_ids"].shape[1] :]
            for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
    finally:
        tokenizer.padding_side = side
    return answers


def score_qa(
    model, tokenizer, items: list[dict], task: Task, batch_size: int
) -> tuple[dict[str, list[float]], list[str]]:
    predictions = generate_batch(model, tokenizer, [it["messages"] for it in items], task.max_new_tokens, batch_size)
    per_example = {"numeric_match": [], "exact_match": [], "f1": []}
    for it, prediction in zip(items, predictions):
        per_example["exact_match"].append(exact_match(prediction, it["answer"]))
        per_example["f1"].append(token_f1(prediction, it["answer"]))
        per_example["numeric_match"].append(numeric_match(prediction, it["answer"], task.tolerance))
    return per_example, predictions


# ---------------------------------------------------------------- perplexity


@torch.inference_mode()
def score_text(
    model, tokenizer, items: list[dict], task: Task, batch_size: int
) -> tuple[dict[str, list[float]], list[int]]:
    """Per-document perplexity (exp of the mean loss over the tokens after the first) and mean loss, with documents
    tokenized as continued pretraining tokenizes them (data.build.tokenize_text: the text, then EOS), in windows of
    task.max_length tokens; each window's first token has no context and is not scored, as in a training pack."""
    from finetune.data.build import tokenize_text

    windows = [
        (index, ids[start : start + task.max_length])
        for index, item in enumerate(items)
        for ids in [tokenize_text(tokenizer, item["text"])["input_ids"]]
        for start in range(0, len(ids), task.max_length)
    ]
    windows = [(index, ids) for index, ids in windows if len(ids) > 1]
    nll, counts = [0.0] * len(items), [0] * len(items)
    # Longest first: batches hold similar lengths (less padding) and an out-of-memory shows at once.
    windows.sort(key=lambda window: -len(window[1]))
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(len(ids) for _, ids in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, window) in enumerate(batch):
            ids[row, : len(window)] = torch.tensor(window)
            mask[row, : len(window)] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False).logits
        losses = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none"
        ).cpu()
        scored = mask[:, 1:].bool()
        for row, (index, _) in enumerate(batch):
            nll[index] += losses[row][scored[row]].sum().item()
            counts[index] += int(scored[row].sum())
    if any(count == 0 for count in counts):
        raise FinetuneError("a text task's document has fewer than two tokens: nothing to score; remove it")
    mean_loss = [total / count for total, count in zip(nll, counts)]
    return {"perplexity": [math.exp(loss) for loss in mean_loss], "loss": mean_loss}, counts
