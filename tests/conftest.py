from pathlib import Path

import pytest
import torch

from testkit import resources
from testkit.tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def llama_quantize() -> Path:
    """llama.cpp's llama-quantize, built by vendor/build_llama_tools.sh (a failure under CI when missing)."""
    return resources.llama_tool("llama-quantize")


@pytest.fixture(scope="session")
def dev_model() -> Path:
    """The SmolLM2-135M development model's folder (a failure under CI when missing)."""
    return resources.dev_model("smollm2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint folder (f32 weights), shared by the session; never modified."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "LlamaForCausalLM")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_llama):
    """Factory: a GGUF of the tiny Llama in the given uniform type (F32 by default), cached per type."""
    from ewq_gguf.api import convert

    made: dict[str, Path] = {}

    def make(type_name: str = "F32") -> Path:
        if type_name not in made:
            out = tmp_path_factory.mktemp("tiny-gguf") / f"tiny-{type_name}.gguf"
            convert(tiny_llama, out, "uniform", type=type_name, progress=False)
            made[type_name] = out
        return made[type_name]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (pytestmark = pytest.mark.usefixtures("one_torch_thread")): on a CPU shared
    with other jobs, threads that wait for each other are far slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def calibration_text(tmp_path_factory) -> Path:
    """A calibration text of a few thousand tokens of the tiny tokenizers."""
    from testkit.tiny_tokenizers import SAMPLE_TEXT

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(SAMPLE_TEXT * 12)
    return path
