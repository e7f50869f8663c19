import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from reference_models import build_reference  # noqa: E402
from tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

FAMILIES = ["e2b", "e4b", "31b", "26b", "gemma3"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (folder with config, safetensors and tokenizer; the transformers model)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            ref = build_reference(family, folder)
            write_tiny_tokenizer(folder, family)
            cache[family] = (folder, ref)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def load_script():
    """name -> the module of scripts/NAME.py (benchmark scripts are no package), loaded once."""
    import importlib.util

    def load(name: str):
        key = f"{name}_script"
        if key not in sys.modules:
            path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module  # a script's dataclasses look their module up while being made
            spec.loader.exec_module(module)
        return sys.modules[key]

    return load


@pytest.fixture(scope="session")
def tool_llm(tmp_path_factory):
    """The tiny E2B model with Gemma 4's tool markers in its vocabulary, so that it can write a
    call, and a context of 1024 tokens (a prompt declaring tools is long)."""
    import gemmarun

    folder = tmp_path_factory.mktemp("tiny-e2b-tools")
    build_reference("e2b", folder, max_position_embeddings=1024)
    write_tiny_tokenizer(folder, "e2b", tools=True)
    return gemmarun.load(folder, device="cpu")


@pytest.fixture(scope="session")
def tiny_text_models(tiny_models):
    """family -> gemmarun's TextModel of the tiny folder, float32 on the CPU, loaded once."""
    import gemmarun

    loaded = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = gemmarun.load(tiny_models(family)[0], dtype="float32", device="cpu").model
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def llama_cpp_multimodal(tmp_path_factory):
    """family -> (HF folder, transformers model, text GGUF, mmproj GGUF), the GGUFs from llama.cpp's
    own converter (see llama_cpp_converter.converter_for_tests)."""
    from llama_cpp_converter import convert_multimodal, converter_for_tests

    converter_for_tests()
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"lcpp-{family}")
            cache[family] = (folder, *convert_multimodal(family, folder))
        return cache[family]

    return get


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
