"""WRITE: the Ollama Modelfile beside a GGUF: the chat format recognised from its template, FROM and stop lines."""
from __future__ import annotations

import shutil
import struct

import pytest

from ewq_gguf.write.modelfile import CHATML, GEMMA, LLAMA3, MISTRAL, PHI3, detect_chat_format, write_ollama_modelfile


@pytest.mark.parametrize("jinja, expected", [
    ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}",
     CHATML),
    ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
     "+ m['content'] + '<|eot_id|>' }}{% endfor %}", LLAMA3),
    ("{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] + '<end_of_turn>\n' }}"
     "{% endfor %}", GEMMA),
    ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
     "{{ m['content'] + eos_token }}{% endif %}{% endfor %}", MISTRAL),
    ("{% for m in messages %}{% if m['role'] == 'user' %}{{'<|user|>\n' + m['content'] + '<|end|>\n<|assistant|>\n'}}"
     "{% else %}{{ m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}", PHI3),
    ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", None),
    (None, None),
])
def test_chat_format_detection(jinja, expected):
    assert detect_chat_format(jinja) is expected


def test_ollama_modelfile(tiny_gguf, tmp_path):
    gguf = tmp_path / "model.gguf"
    shutil.copyfile(tiny_gguf("F32"), gguf)
    modelfile = write_ollama_modelfile(gguf)
    assert modelfile == tmp_path / "model.Modelfile"
    lines = modelfile.read_text().splitlines()
    assert lines[0] == "FROM ./model.gguf"
    text = modelfile.read_text()
    assert f'TEMPLATE """{LLAMA3.template}"""' in text, "the tiny model's chat template is Llama-3 style"
    assert 'PARAMETER stop "<|eot_id|>"' in lines


def test_ollama_modelfile_without_known_template(tmp_path, tiny_gguf):
    data = bytearray(tiny_gguf("F32").read_bytes())
    key = b"tokenizer.chat_template"
    start = data.index(key) + len(key) + 4 + 8
    length = struct.unpack_from("<Q", data, start - 8)[0]
    data[start:start + length] = data[start:start + length].replace(b"<|start_header_id|>", b"<|start_header_XX|>")
    gguf = tmp_path / "plain.gguf"
    gguf.write_bytes(bytes(data))
    text = write_ollama_modelfile(gguf).read_text()
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "")
    assert text.startswith("FROM ./plain.gguf\n")
