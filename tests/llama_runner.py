"""Running GGUF files through llama.cpp (llama-cpp-python) and checkpoints through transformers, for comparisons."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from llama_cpp import Llama
from transformers import AutoModelForCausalLM


def gguf_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """Logits (n_tokens, n_vocab) of a GGUF model for a token sequence, from llama.cpp on the CPU."""
    llm = Llama(str(path), n_ctx=max(64, len(tokens)), n_batch=len(tokens), logits_all=True, verbose=False,
                n_threads=2, n_gpu_layers=0, type_k=0, type_v=0)  # F32 KV cache: the default F16 cache alone costs ~1e-3
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def hf_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def relative_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(candidate - reference).max() / np.abs(reference).max())
