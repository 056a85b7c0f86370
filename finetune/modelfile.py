"""The Ollama Modelfile of a GGUF: the training chat template in Ollama's template language, stops, system prompt."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune import runs

log = logging.getLogger(__name__)

CHATML_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""

LLAMA3_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|eot_id|>
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

MODELFILE_FAMILIES = {
    "chatml": ("<|im_start|>", CHATML_TEMPLATE, ("<|im_end|>", "<|im_start|>")),
    "llama3": ("<|start_header_id|>", LLAMA3_TEMPLATE, ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
}


def chat_family(template: str) -> str | None:
    for family, (marker, _, _) in MODELFILE_FAMILIES.items():
        if marker in template:
            return family
    return None


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(gguf_name: str, chat_template: str, system_prompt: str | None, context_length: int) -> str:
    family = chat_family(chat_template)
    lines = [f"FROM ./{gguf_name}", ""]
    if family is None:
        log.warning(
            "the training chat template is neither ChatML nor Llama 3: the Modelfile has no TEMPLATE; Ollama will "
            "guess from the GGUF"
        )
    else:
        _, template, stops = MODELFILE_FAMILIES[family]
        lines += [f"TEMPLATE {_quote(template)}", ""]
        if system_prompt:
            lines += [f"SYSTEM {_quote(system_prompt)}", ""]
        lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    # Ollama's default window is small; allow the model's own up to 8k so memory stays modest.
    lines.append(f"PARAMETER num_ctx {min(context_length, 8192)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, chat_template: str, system_prompt: str | None, config) -> Path:
    # One per GGUF: several outtypes can sit in the same folder.
    path = gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    runs.write_text(path, modelfile_text(gguf_path.name, chat_template, system_prompt, config.max_position_embeddings))
    log.info("wrote %s (ollama create NAME -f %s)", path, path)
    return path
