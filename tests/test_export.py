"""Merge parity (LoRA, DoRA, QLoRA targets), atomic output, GGUF round trip and the Ollama Modelfile."""

from __future__ import annotations

import importlib.metadata
import json
import re

import pytest
import torch
from run_dirs import make_run

from finetune import gguf as gguf_export
from finetune import gguf_check, gguf_vocab, merge, modelfile
from finetune.errors import FinetuneError


def shared_modes(*paths) -> dict[str, int]:
    """The permission bits of files and folders under paths, as a plain write would give them (umask 022 here)."""
    found = {}
    for path in paths:
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            found.setdefault("folder" if p.is_dir() else "file", set()).add(p.stat().st_mode & 0o777)
    return {kind: modes.pop() if len(modes) == 1 else modes for kind, modes in found.items()}


def reference_logits(run_dir, merged_dir):
    """Base + adapter computed independently of merge.merge, and the saved merged model, on the same prompts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, run_dir / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        return with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_merge_matches_base_plus_adapter(tmp_path, tiny_llama_dir, adapter):
    run = make_run(tmp_path / "run", tiny_llama_dir, adapter)
    report = merge.merge(run)
    merged_dir = run / "merged"
    assert report["max_abs_logit_diff"] < 1e-4 and report["top1_agreement"] == 1.0
    assert json.loads((merged_dir / "merge.json").read_text()) == report
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "merge.json",
    }
    assert {p.name for p in merged_dir.iterdir()} == expected
    # The training template, never the base model's.
    assert (merged_dir / "chat_template.jinja").read_text() == (run / "adapter" / "chat_template.jinja").read_text()
    generation = json.loads((merged_dir / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert generation["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token_id in (
        generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    )
    unmerged, merged = reference_logits(run, merged_dir)
    assert (unmerged - merged).abs().max() < 1e-4
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert shared_modes(merged_dir) == {"file": 0o644, "folder": 0o755}


def test_qlora_dequantized_target_reproduces_the_trained_model(tmp_path, tiny_llama_dir):
    run = make_run(tmp_path / "run", tiny_llama_dir, quantization="nf4")
    report = merge.merge(run)
    base, dequantized = report["targets"]["base"]["vs_trained"], report["targets"]["dequantized"]["vs_trained"]
    assert dequantized["max_abs_logit_diff"] < 1e-4
    assert dequantized["max_abs_logit_diff"] * 100 < base["max_abs_logit_diff"]
    assert dequantized["top1_agreement"] == 1.0 >= base["top1_agreement"]
    assert report["target"] == "dequantized"
    assert report["max_abs_logit_diff"] < 1e-4  # the written model against its own base + adapter
    assert json.loads((run / "merged" / "merge.json").read_text())["targets"] == report["targets"]
    assert "quantization_config" not in json.loads((run / "merged" / "config.json").read_text())

    chosen = merge.merge(run, output=tmp_path / "base-target", target="base")
    assert chosen["target"] == "base" and (tmp_path / "base-target" / "model.safetensors").is_file()


def test_merge_refusals(tmp_path, tiny_llama_dir):
    run = make_run(tmp_path / "run", tiny_llama_dir)
    with pytest.raises(FinetuneError, match="not trained on an nf4 base"):
        merge.merge(run, target="dequantized")
    with pytest.raises(FinetuneError, match="expected auto, base or dequantized"):
        merge.merge(run, target="best")
    foreign = tmp_path / "somebody-elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FinetuneError, match="not an earlier output"):
        merge.merge(run, output=foreign)
    (run / "run.json").unlink()
    with pytest.raises(FinetuneError, match="incomplete"):
        merge.merge(run)


def test_a_failed_merge_leaves_nothing(tmp_path, tiny_llama_dir, monkeypatch):
    run = make_run(tmp_path / "run", tiny_llama_dir)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process was stopped after the weights were written

    from transformers import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        merge.merge(run)
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "recipe.yaml", "run.json"]
    monkeypatch.undo()

    # What a killed merge leaves is a hidden folder, cleared by the next merge; the parity check failing
    # also writes nothing, and an earlier good merge stays as it was.
    (run / ".merged.partial-killed").mkdir()
    merge.merge(run)
    assert not (run / ".merged.partial-killed").exists()
    before = (run / "merged" / "merge.json").read_text()
    monkeypatch.setitem(merge.MERGE_THRESHOLDS, torch.float32, -1.0)
    with pytest.raises(FinetuneError, match="nothing was written"):
        merge.merge(run)
    assert (run / "merged" / "merge.json").read_text() == before
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "merged", "recipe.yaml", "run.json"]


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory, tiny_llama_dir):
    run = make_run(tmp_path_factory.mktemp("gguf") / "run", tiny_llama_dir, data={"system_prompt": "Answer briefly."})
    merge.merge(run)
    return run


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {
        name: field.contents()
        for name, field in reader.fields.items()
        if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    }
    return reader, fields


def llama_cpp_verifier():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup-llamacpp)")
    return f"llama.cpp (llama-cpp-python {importlib.metadata.version('llama-cpp-python')})"


# llama.cpp keeps its KV cache in f16, so even an f32 file is not bit-exact (measured 0.019 f32, 0.026 f16 on the
# tiny model); transformers' reader is (1e-5 f32, 0.05 f16).
@pytest.mark.parametrize(
    ("verifier", "outtype", "limit"),
    [
        ("llama.cpp", "f32", 0.05),
        ("llama.cpp", "f16", 0.1),
        ("transformers", "f32", 1e-5),
        ("transformers", "f16", 0.05),
    ],
)
def test_gguf_round_trip(merged_run, monkeypatch, capfd, verifier, outtype, limit):
    if verifier == "llama.cpp":
        expected = llama_cpp_verifier()
    else:
        monkeypatch.setattr(gguf_check, "llama_cpp_version", lambda: None)  # as on a machine without the extra
        expected = "transformers (llama-cpp-python not installed)"
    path = gguf_export.export(merged_run, outtype)
    # llama.cpp reports every tensor it loads and every buffer it frees; none of it may reach the user.
    assert "llama" not in capfd.readouterr().err
    assert path == merged_run / "gguf" / f"tiny-{outtype}.gguf"
    reader, fields = read_gguf(path)
    names = [t.name for t in reader.tensors]
    assert len(names) == 2 + 2 * 9  # token_embd, output_norm, 9 per block
    assert "output.weight" not in names  # tied to token_embd
    assert fields["general.architecture"] == "llama"
    assert fields["llama.context_length"] == 2048
    assert fields["llama.attention.head_count_kv"] == 2
    # llama.cpp's name for SmolLM2's tokenizer (the hash of a fixed text's tokens): "gpt2" would not load.
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    training_template = (merged_run / "adapter" / "chat_template.jinja").read_text()
    assert fields["tokenizer.chat_template"] == gguf_vocab.gguf_chat_template(training_template)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_run / "merged")
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == outtype.upper()

    figures = json.loads((merged_run / "gguf" / "export.json").read_text())["files"][path.name]
    assert figures["verifier"] == expected
    assert figures["max_abs_logit_diff"] < limit and figures["top1_agreement"] == 1.0
    assert figures["greedy_text_agreement"] == 1.0 and figures["tokenization_agreement"] == 1.0
    assert (merged_run / "gguf" / f"tiny-{outtype}.Modelfile").read_text().startswith(f"FROM ./tiny-{outtype}.gguf\n")
    # what `finetune export` prints: the file, and the check that passed with its figures and threshold
    printed = gguf_export.describe(path).splitlines()
    assert printed[0].startswith(f"wrote {path} (20 tensors, {path.stat().st_size / 1e6:.1f} MB, ")
    assert printed[1] == (
        f"  read back in {expected}: max |Δlogit| vs merged {figures['max_abs_logit_diff']:.3g} (threshold "
        f"{gguf_check.LOGIT_THRESHOLDS[outtype]:g}), greedy text agreement 1.00, tokenization agreement 1.00"
    )
    outputs = [path, path.with_suffix(".Modelfile"), merged_run / "gguf" / "export.json"]
    assert shared_modes(*outputs) == {"file": 0o644}


def test_gguf_q8_0_quantizes_matrices_only(merged_run):
    path = gguf_export.export(merged_run / "merged", "q8_0", output=merged_run / "q8", verify=False)
    reader, fields = read_gguf(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["output_norm.weight"] == "F32"
    assert fields["general.file_type"] == 7  # MOSTLY_Q8_0


def test_gguf_refusals(merged_run, tmp_path, tiny_llama_dir, monkeypatch):
    from run_dirs import llama3_style_base

    with pytest.raises(FinetuneError, match="expected one of f32, f16, q8_0, q4_k_m, q5_k_m, q6_k"):
        gguf_export.export(merged_run, "q4_k")
    with pytest.raises(FinetuneError, match="neither a run folder"):
        gguf_export.export(tmp_path, "f16")
    monkeypatch.setattr(gguf_check, "llama_cpp_version", lambda: None)
    with pytest.raises(FinetuneError, match=r"^export --gguf q4_k_m: K-quants are made by llama.cpp; run `make setup"):
        gguf_export.export(merged_run, "q4_k_m")
    monkeypatch.undo()
    # A tokenizer llama.cpp does not know is refused, never written with a guessed pre-tokenizer name.
    base = llama3_style_base(tmp_path / "base", tiny_llama_dir)
    run = make_run(tmp_path / "run", base, model={"chat_template": "llama3"})
    with pytest.raises(FinetuneError, match=r"is not one llama.cpp knows .*; GGUF export refuses to guess"):
        gguf_export.export(run, "f16", verify=False)
    assert not list((run / "gguf").glob("*.gguf")) if (run / "gguf").exists() else True


def test_a_gguf_llama_cpp_refuses_is_never_left_behind(merged_run, monkeypatch):
    """The file the old writer made (pre-tokenizer "gpt2", which llama.cpp does not know) fails verification in
    llama.cpp, and nothing is put in place."""
    llama_cpp_verifier()
    monkeypatch.setattr(gguf_vocab, "pre_tokenizer", lambda tokenizer, where: "gpt2")
    out = merged_run / "refused"
    with pytest.raises(FinetuneError, match=r"llama.cpp cannot load the GGUF just written"):
        gguf_export.export(merged_run, "f16", output=out)
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".gguf", ".Modelfile")]
    assert not [p for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else True


CHATML_MODELFILE = '''FROM ./m-f16.gguf

TEMPLATE """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""

SYSTEM """Answer briefly."""

PARAMETER stop "<|im_end|>"
PARAMETER stop "<|im_start|>"
PARAMETER num_ctx 8192
'''


def test_modelfile_follows_the_training_template_family():
    from finetune.model import TEMPLATES

    chatml = (TEMPLATES / "chatml.jinja").read_text()
    assert modelfile.modelfile_text("m-f16.gguf", chatml, "Answer briefly.", 32768) == CHATML_MODELFILE
    llama3 = modelfile.modelfile_text("m.gguf", "{{ '<|start_header_id|>' }}", None, 4096)
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}" in llama3
    assert 'PARAMETER stop "<|eot_id|>"' in llama3 and "SYSTEM" not in llama3 and "num_ctx 4096" in llama3
    other = modelfile.modelfile_text("m.gguf", "{{ messages }}", None, 4096)
    assert "TEMPLATE" not in other and other.startswith("FROM ./m.gguf\n")


def test_gguf_template_renders_like_the_training_template(tokenizer):
    """The GGUF gets the template without {% generation %} tags (only transformers knows them); same output."""
    training = tokenizer.chat_template
    plain = gguf_vocab.gguf_chat_template(training)
    assert not re.search(r"\{%-?\s*(end)?generation", plain)
    conversations = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "bye"},
        ],
    ]
    for messages in conversations:
        for prompt in (True, False):
            ours = tokenizer.apply_chat_template(
                messages, chat_template=plain, tokenize=False, add_generation_prompt=prompt
            )
            assert ours == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


@pytest.mark.slow
def test_embedded_model_merge_gguf_and_k_quant_in_llama_cpp(tmp_path):
    """What CI checks where Ollama runs it: the embedded model's f16 GGUF reproduces the merged model in llama.cpp,
    and its q4_k_m (llama.cpp's quantizer) stays close to the f16 file on held-out rows."""
    verifier = llama_cpp_verifier()
    run = make_run(tmp_path / "run", "embedded")
    report = merge.merge(run)
    assert report["max_abs_logit_diff"] < 1e-3
    path = gguf_export.export(run, "f16")
    figures = json.loads((run / "gguf" / "export.json").read_text())["files"][path.name]
    assert figures["verifier"] == verifier
    assert figures["max_abs_logit_diff"] < gguf_check.LOGIT_THRESHOLDS["f16"] and figures["top1_agreement"] > 0.95
    assert figures["greedy_text_agreement"] >= 0.75 and figures["tokenization_agreement"] == 1.0
    quant = gguf_export.export(run, "q4_k_m")
    figures = json.loads((run / "gguf" / "export.json").read_text())["files"][quant.name]
    assert figures["top1_agreement_with_f16"] >= gguf_check.KQUANT_MIN_TOP1
    assert figures["perplexity_ratio"] <= gguf_check.KQUANT_MAX_PERPLEXITY_RATIO and figures["heldout_rows"] == 4
    assert (
        f"  vs its f16 file in llama.cpp on 4 held-out rows: top-1 agreement {figures['top1_agreement_with_f16']:.3f} "
        "(at least 0.75), perplexity "
    ) in gguf_export.describe(quant)
    reader, fields = read_gguf(quant)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    # 576-wide rows do not fill llama.cpp's 256-wide K blocks, so most matrices take its fallback type.
    assert fields["general.file_type"] == 15 and types["blk.5.ffn_down.weight"] in ("Q4_K", "Q6_K")
    assert quant.stat().st_size < path.stat().st_size / 2
    assert not [p for p in (run / "gguf").iterdir() if p.name.startswith(".")], "the scratch f16 file was left"


def test_a_k_quant_that_strays_from_f16_is_refused(merged_run):
    """On the tiny random model 4-bit weights change most next tokens: refused, nothing written."""
    llama_cpp_verifier()
    with pytest.raises(FinetuneError, match=r"tiny-q4_k_m.gguf: the q4_k_m file strays from f16 in llama.cpp"):
        gguf_export.export(merged_run, "q4_k_m", output=merged_run / "kq")
    assert not [p for p in (merged_run / "kq").iterdir() if p.suffix == ".gguf" or not p.name.startswith(".")]


@pytest.mark.parametrize("verify", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gguf_of_a_llama_3_tokenizer(tmp_path, verify):
    import gguf
    from run_dirs import llama3_base

    if verify:
        llama_cpp_verifier()
    base = llama3_base(tmp_path / "base")
    run = make_run(tmp_path / "run", base, model={"chat_template": "llama3"})
    merge.merge(run)
    path = gguf_export.export(run, "f32", verify=verify)
    reader, fields = read_gguf(path)
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.add_bos_token"] is True  # llama.cpp adds BOS, so the Modelfile template must not
    assert "output.weight" in [t.name for t in reader.tensors]  # untied lm_head is kept
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    eot = tokens.index("<|eot_id|>")  # what ends a turn in the llama3 template: llama.cpp stops on it too
    assert token_types[eot] == gguf.TokenType.CONTROL
    from transformers import AutoTokenizer

    assert fields["tokenizer.ggml.eos_token_id"] == AutoTokenizer.from_pretrained(run / "merged").eos_token_id
    modelfile = (run / "gguf" / "tiny-f32.Modelfile").read_text()
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and "<|begin_of_text|>" not in modelfile
    if verify:
        figures = json.loads((run / "gguf" / "export.json").read_text())["files"][path.name]
        assert figures["max_abs_logit_diff"] < 0.05 and figures["tokenization_agreement"] == 1.0
        assert figures["greedy_text_agreement"] == 1.0


def test_gguf_of_a_llama_2_sentencepiece_tokenizer(tmp_path):
    """SentencePiece goes in as llama.cpp's SPM vocabulary: the pieces' scores from tokenizer.model (which the merge
    copies beside the weights), tokenizer model "llama", pre-tokenizer "default", no merges."""
    from run_dirs import llama2_base

    run = make_run(tmp_path / "run", llama2_base(tmp_path / "base"), model={"chat_template": "chatml"})
    merge.merge(run)
    assert (run / "merged" / "tokenizer.model").read_bytes() == (tmp_path / "base" / "tokenizer.model").read_bytes()
    path = gguf_export.export(run, "f32", verify=False)
    reader, fields = read_gguf(path)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("llama", "default")
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(scores) == len(tokens) == 1002 and scores[-1] == -1000.0 and tokens[-1] == "<|im_end|>"
    assert "tokenizer.ggml.merges" not in reader.fields and fields["tokenizer.ggml.add_bos_token"] is True


@pytest.mark.slow
def test_a_sentencepiece_gguf_that_llama_cpp_tokenizes_differently_is_refused(tmp_path):
    """llama.cpp puts a space marker before text that follows a special token (SentencePiece's legacy spacing);
    transformers 5 reloads Llama tokenizers without it, so with ChatML markers the prompts differ by a token. The
    check sees it and nothing is written: a user of the GGUF would get other tokens than training saw."""
    from run_dirs import llama2_base

    llama_cpp_verifier()
    run = make_run(tmp_path / "run", llama2_base(tmp_path / "base"), model={"chat_template": "chatml"})
    with pytest.raises(
        FinetuneError, match=r"does not reproduce the merged model in llama.cpp .*tokenization agreement"
    ):
        gguf_export.export(run, "f16")
    assert not list((run / "gguf").glob("*.gguf"))
