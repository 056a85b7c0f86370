"""What a recipe's data looks like to the model: its sources and licenses, rendered rows with the trained spans marked,
and token statistics (`finetune data ...`)."""

from __future__ import annotations

from finetune.data import build
from finetune.data.readers import READERS
from finetune.recipe import Recipe


def readers_table() -> str:
    """Every reader: name, row kind, license and description, non-commercial ones flagged."""
    lines = []
    for name, reader in sorted(READERS.items()):
        flag = "" if reader.commercial_use else "  [NON-COMMERCIAL]"
        lines.append(f"{name:<20} {reader.kind:<11} {reader.license or '-':<14} {reader.description}{flag}")
    return "\n".join(lines)


def sources_info(recipe: Recipe) -> str:
    """A recipe's sources with their readers, splits, licenses and cards."""
    lines = []
    for source in recipe.data.sources:
        reader = READERS[source.reader]
        lines.append(f"{source.path or source.hub}")
        lines.append(
            f"  reader: {reader.name} ({reader.kind} rows), split: {source.split}, "
            f"license: {reader.license or 'see the source'}"
        )
        if reader.card:
            lines.append(f"  card: datasets/{reader.card}")
        if not reader.commercial_use:
            lines.append("  WARNING: this source's license forbids commercial use")
    return "\n".join(lines)


def preview(recipe: Recipe, tokenizer, n: int, color: bool) -> str:
    """The first n training rows rendered with trained spans marked, then row counts and a length histogram."""
    if recipe.raw_text:
        rows, stats = build.text_rows(recipe.data, recipe.train.seed)
        encoded = [build.tokenize_text(tokenizer, row["text"]) for row in rows]
    else:
        rows, stats = build.chat_rows(recipe.data, recipe.train.seed)
        encoded = [build.tokenize(tokenizer, row["messages"]) for row in rows]
    out = []
    for index, tokens in enumerate(encoded[:n]):
        trained = sum(label != build.IGNORE for label in tokens["labels"])
        out.append(f"── row {index}: {len(tokens['input_ids'])} tokens, {trained} trained " + "─" * 20)
        out.append(render_spans(tokenizer, tokens, color))
    lengths = [len(tokens["input_ids"]) for tokens in encoded]
    dropped = sum(length > recipe.data.max_length for length in lengths)
    fate = "split across packs" if recipe.raw_text else "dropped in training"
    out.append(
        f"── {len(rows)} rows, {stats['duplicates']} duplicates removed, {dropped} longer than "
        f"max_length={recipe.data.max_length} ({fate})"
    )
    out.append("trained spans are " + ("green" if color else "between ⟦ and ⟧"))
    out.append(length_histogram(lengths))
    return "\n".join(out)


def render_spans(tokenizer, tokens: dict, color: bool) -> str:
    """The rendered conversation with trained (assistant) tokens marked."""
    start, end = ("\033[32m", "\033[0m") if color else ("⟦", "⟧")
    pieces, span, trained = [], [], False
    for token_id, label in zip(tokens["input_ids"], tokens["labels"]):
        is_trained = label != build.IGNORE
        if is_trained != trained and span:
            text = tokenizer.decode(span)
            pieces.append(f"{start}{text}{end}" if trained else text)
            span = []
        trained = is_trained
        span.append(token_id)
    if span:
        text = tokenizer.decode(span)
        pieces.append(f"{start}{text}{end}" if trained else text)
    return "".join(pieces)


def length_histogram(lengths: list[int], bins: int = 8, width: int = 40) -> str:
    """A text histogram of tokens per row."""
    if not lengths:
        return ""
    low, high = min(lengths), max(lengths)
    step = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - low) // step, bins - 1)] += 1
    top = max(counts)
    lines = ["tokens per row:"]
    for i, count in enumerate(counts):
        lo = low + i * step
        lines.append(f"  {lo:>6}-{lo + step - 1:<6} {'█' * round(width * count / top):<{width}} {count}")
    return "\n".join(lines)


def stats(recipe: Recipe, tokenizer) -> dict:
    """Row, token and length statistics of the training data as the run would build it."""
    built = build.build(recipe, tokenizer)
    lengths = built.stats.pop("lengths")
    return {
        **built.stats,
        "max_length": recipe.data.max_length,
        "length_min": lengths[0],
        "length_median": lengths[len(lengths) // 2],
        "length_max": lengths[-1],
    }
