"""Metrics: exact match, token F1 and numeric match for generated answers; which way is better; means and the paired
bootstrap."""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


SCALES = {
    "thousand": 1e3,
    "thousands": 1e3,
    "k": 1e3,
    "million": 1e6,
    "millions": 1e6,
    "mn": 1e6,
    "m": 1e6,
    "billion": 1e9,
    "billions": 1e9,
    "bn": 1e9,
}
NUMBER = re.compile(
    r"(?P<open>\()?\s*(?P<sign>[-\u2212\u2013])?\s*[$\u20ac\u00a3]?\s*"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"\s*(?P<close>\))?\s*(?P<scale>%|per\s?cent\b|percent\b|thousands?\b|millions?\b|billions?\b|bn\b|mn\b|k\b|m\b)?",
    re.IGNORECASE,
)


def parse_numbers(text: str) -> list[tuple[float, str, float]]:
    """Every number in the text as (value, unit, face value).

    unit is '%' for a percentage, 'scaled' when a scale word was multiplied in ('1.2 million' ->
    1200000, face 1.2), '' for a bare number; '(1,234)' and '-1,234' are negative; commas are dropped.
    """
    found = []
    for m in NUMBER.finditer(text):
        face = float(m["digits"].replace(",", ""))
        if m["sign"] or (m["open"] and m["close"]):
            face = -face
        scale = re.sub(r"\s", "", (m["scale"] or "").lower())
        if scale in ("%", "percent"):
            found.append((face, "%", face))
        elif scale:
            found.append((face * SCALES[scale], "scaled", face))
        else:
            found.append((face, "", face))
    return found


def _close(a: float, b: float, tolerance: float) -> bool:
    return math.isclose(a, b, rel_tol=tolerance, abs_tol=1e-9)


def numeric_match(prediction: str, gold: str, tolerance: float = 1e-3) -> float:
    """1.0 when the prediction's first number equals the gold's single number within the relative tolerance.

    Scale words are multiplied out on both sides ('1.2 million' == '1,200 thousand'); a percentage
    never matches a plain or scaled amount. A prediction with no scale word or % is also read in the
    gold's own unit ('48,210' for '48,210 thousand', '-15.61' for '-15.61%'), because the question
    usually leaves the table's unit implicit.
    Gold answers that are not one number (spans, several numbers) fall back to exact match.
    """
    wanted = parse_numbers(gold)
    if len(wanted) != 1:
        return exact_match(prediction, gold)
    gold_value, gold_unit, gold_face = wanted[0]
    got = parse_numbers(prediction)
    if not got:
        return 0.0
    value, unit, _ = got[0]
    if gold_unit == "%" or unit == "%":
        return float(unit in (gold_unit, "") and gold_unit == "%" and _close(value, gold_value, tolerance))
    if unit == "" and gold_unit == "scaled":
        return float(_close(value, gold_face, tolerance) or _close(value, gold_value, tolerance))
    return float(_close(value, gold_value, tolerance))


# ---------------------------------------------------------------- statistics

LOWER_IS_BETTER = ("perplexity",)


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def is_regression(metric: str, ci95) -> bool:
    """Whether the whole 95% interval of the delta (adapter - base) lies on the worse side of zero: below it, or
    above it for a metric where lower is better."""
    return ci95[0] > 0 if lower_is_better(metric) else ci95[1] < 0


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def paired_bootstrap(
    base: list[float], adapter: list[float], resamples: int = 1000, seed: int = 0, groups: list[str] | None = None
) -> tuple[float, float]:
    """95% percentile interval of mean(adapter - base), resampling with replacement.

    With `groups` (each example's document), whole documents are resampled, a cluster bootstrap: examples asked of
    one document are correlated, so resampling them one by one would claim more certainty than the data holds.
    Without it (or when every example is its own group) examples are resampled, with the same draws."""
    if len(base) != len(adapter) or not base:
        raise ValueError("paired bootstrap needs two equally long, non-empty score lists")
    if groups is not None and len(groups) != len(base):
        raise ValueError("paired bootstrap needs one group per example")
    sums, sizes = {}, {}
    for key, a, b in zip(groups if groups is not None else range(len(base)), adapter, base):
        sums[key] = sums.get(key, 0.0) + (a - b)
        sizes[key] = sizes.get(key, 0) + 1
    sums, sizes = list(sums.values()), list(sizes.values())
    rng = random.Random(seed)
    g = len(sums)
    means = []
    for _ in range(resamples):
        drawn = [rng.randrange(g) for _ in range(g)]
        means.append(sum(sums[i] for i in drawn) / sum(sizes[i] for i in drawn))
    means.sort()
    low = means[int(math.floor(0.025 * (resamples - 1)))]
    high = means[int(math.ceil(0.975 * (resamples - 1)))]
    return low, high
