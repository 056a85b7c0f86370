"""The sections of a recipe that belong to one training method (dpo, kto, orpo), and which rows each method trains
on. recipe.py puts them in the Recipe; keeping them here keeps that schema readable."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune.config import Section

DPO_LOSSES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "exo_pair",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)


class DpoSection(Section):
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference model (higher = stay closer)."
    )
    loss_type: Literal[DPO_LOSSES] = Field("sigmoid", description=f"TRL's DPO loss: {', '.join(DPO_LOSSES)}.")
    precompute_ref_log_probs: bool = Field(
        False, description="Score the reference once before training (faster steps, same logs)."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed fraction of flipped preference labels (cDPO, robust)."
    )


class KtoSection(Section):
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference model (higher = stay closer)."
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        description="Loss weight of desirable answers. With fewer desirable than undesirable rows (multiple choice "
        "gives one correct answer per distractors), raise it so that weight x count is about equal (TRL's advice).",
    )
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of undesirable answers.")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="TRL's KTO loss: kto, or apo_zero_unpaired (no KL term)."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Score the reference once before training (faster steps, same logs)."
    )


class OrpoSection(Section):
    beta: float = Field(
        0.1,
        gt=0,
        description="Weight of the odds-ratio term next to the chosen answer's NLL (the paper's lambda): higher "
        "pushes the rejected answer down harder.",
    )


METHOD_SECTIONS = {"dpo": DpoSection, "kto": KtoSection, "orpo": OrpoSection}
PREFERENCE_READERS = "a preference reader (preference, preference_messages, hh_rlhf) or a multiple-choice source"
# The row kinds each method trains on, what it calls them, and the readers that give them.
METHOD_ROWS = {
    "sft": (
        ("sft", "mcq", "qa", "text"),
        "conversations or raw text",
        "a chat, instruction, multiple-choice, QA or text reader",
    ),
    "dpo": (("preference", "mcq"), "preference pairs", PREFERENCE_READERS),
    "orpo": (("preference", "mcq"), "preference pairs", PREFERENCE_READERS),
    "kto": (
        ("unpaired", "preference", "mcq"),
        "desirable and undesirable answers",
        f"the kto reader, {PREFERENCE_READERS}",
    ),
}
