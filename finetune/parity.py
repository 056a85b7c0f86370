"""Parity checks: the same fixed chat prompts through two models, compared by logits, top-1 tokens and greedy text."""

from __future__ import annotations

import torch

# Fixed, domain-neutral prompts: the parity checks must see the same inputs every time.
PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Explain in one sentence why the sky is blue."},
    ],
    [{"role": "user", "content": "List three prime numbers greater than 10."}],
    [
        {"role": "user", "content": "Is water wet?"},
        {"role": "assistant", "content": "It makes other things wet."},
        {"role": "user", "content": "Give a short answer: yes or no?"},
    ],
)

GREEDY_TOKENS = 16


def prompt_ids(tokenizer) -> list[torch.Tensor]:
    """PROMPTS rendered with the tokenizer's chat template, ready for generation."""
    out = []
    for messages in PROMPTS:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        out.append(torch.tensor([ids]))
    return out


@torch.no_grad()
def logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every position's logits for each prompt, in float32 on the CPU."""
    device = next(model.parameters()).device
    model.eval()
    return [model(input_ids=ids.to(device), use_cache=False).logits[0].float().cpu() for ids in prompts]


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """Max |Δlogit| over every position of every prompt, and how often the top-1 token agrees."""
    gap = max(float((a - b).abs().max()) for a, b in zip(reference, other))
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other))
    total = sum(a.shape[0] for a in reference)
    return {"max_abs_logit_diff": gap, "top1_agreement": same / total}


@torch.no_grad()
def greedy_ids(model, tokenizer, prompts) -> list[torch.Tensor]:
    """Each prompt followed by up to GREEDY_TOKENS greedy tokens (ids, batch of one)."""
    return [
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for ids in prompts
    ]
