"""An Ollama Modelfile next to a GGUF: FROM, a TEMPLATE in Ollama's Go-template language for known chat formats,
and PARAMETER stop lines for the end-of-turn tokens.

The chat format is recognised from the markers in the GGUF's Jinja chat template (tokenizer.chat_template). Unknown
formats get no TEMPLATE (Ollama then passes prompts through unchanged) rather than a guess. The templates range over
.Messages; Ollama also joins all system messages into .System, which the formats without a system role put in front
of the first user turn.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError
from ..gguf_file import GgufFile, read_gguf


@dataclass(frozen=True)
class ChatFormat:
    name: str
    markers: tuple[str, ...]  # all must occur in the Jinja chat template
    template: str  # Ollama Go template
    stops: tuple[str, ...]


CHATML = ChatFormat(
    name="chatml",
    markers=("<|im_start|>", "<|im_end|>"),
    template=(
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    stops=("<|im_start|>", "<|im_end|>"),
)

LLAMA3 = ChatFormat(
    name="llama3",
    markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    template=(
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    stops=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

GEMMA = ChatFormat(
    name="gemma",
    markers=("<start_of_turn>", "<end_of_turn>"),
    template=(
        "{{- $first := true }}\n"
        "{{- range .Messages }}\n"
        "{{- if eq .Role \"user\" }}<start_of_turn>user\n"
        "{{ if and $first $.System }}{{ $.System }}\n\n"
        "{{ end }}{{ .Content }}<end_of_turn>\n"
        "{{ $first = false }}\n"
        "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n"
        "{{ .Content }}<end_of_turn>\n"
        "{{ end }}\n"
        "{{- end }}<start_of_turn>model\n"
    ),
    stops=("<start_of_turn>", "<end_of_turn>"),
)

MISTRAL = ChatFormat(
    name="mistral",
    markers=("[INST]", "[/INST]"),
    template=(
        "{{- $first := true }}\n"
        "{{- range .Messages }}\n"
        "{{- if eq .Role \"user\" }}[INST] {{ if and $first $.System }}{{ $.System }}\n\n"
        "{{ end }}{{ .Content }}[/INST]{{ $first = false }}\n"
        "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>\n"
        "{{- end }}\n"
        "{{- end }}"
    ),
    stops=("[INST]", "[/INST]"),
)

PHI3 = ChatFormat(
    name="phi3",
    markers=("<|user|>", "<|assistant|>", "<|end|>"),
    template=(
        "{{- range .Messages }}<|{{ .Role }}|>\n"
        "{{ .Content }}<|end|>\n"
        "{{ end }}<|assistant|>\n"
    ),
    stops=("<|end|>", "<|user|>", "<|assistant|>"),
)

# The first format whose markers all occur wins; no two formats share a full marker set.
CHAT_FORMATS = (LLAMA3, CHATML, GEMMA, PHI3, MISTRAL)


def detect_chat_format(chat_template: str | None) -> ChatFormat | None:
    """The known chat format whose markers all occur in a Jinja chat template, or None."""
    if not chat_template:
        return None
    return next((chat_format for chat_format in CHAT_FORMATS
                 if all(marker in chat_template for marker in chat_format.markers)), None)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf: GgufFile, from_path: str) -> str:
    """The Modelfile for `gguf`, whose FROM line names `from_path`."""
    chat_format = detect_chat_format(gguf.chat_template)
    stops = list(chat_format.stops) if chat_format else []
    end_of_turn = gguf.token_text(gguf.metadata.get("tokenizer.ggml.eot_token_id"))
    if end_of_turn and end_of_turn not in stops:
        stops.append(end_of_turn)
    lines = [f"FROM {from_path}"]
    if chat_format:
        lines += [f"# chat format: {chat_format.name} (recognised from the GGUF's chat template)",
                  f'TEMPLATE """{chat_format.template}"""']
    elif gguf.chat_template:
        lines.append("# the GGUF's chat template is not a known format: no TEMPLATE, prompts go through unchanged")
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def write_ollama_modelfile(gguf_path: str | Path) -> Path:
    """Write <name>.Modelfile beside the GGUF (FROM names it relative to that folder); returns its path."""
    gguf = read_gguf(gguf_path)
    out = gguf.path.with_name(gguf.path.stem + ".Modelfile")
    try:
        out.write_text(modelfile_text(gguf, f"./{gguf.path.name}"))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the Modelfile ({exc})") from exc
    return out
