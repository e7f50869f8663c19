"""Fuzz target: a GGUF file from a stranger, read and loaded (byte level, atheris).

Runs what `gemmarun.load(path)` runs on a .gguf file: the reader (`GGUFFile`: header, metadata
values, tensor table), the metadata -> config mapping (`text_config_from_gguf`), the tensor
plan, building the model and the tokenizer from the metadata, and reading each tensor back.
Contract: the result is a model, or a one-line `LoadError`.

Seeds are tiny but complete Gemma 3 and Gemma 4 files (tests/tiny_gguf.py), so mutations
start from files the loader accepts.
"""

from __future__ import annotations

from _harness import MemoryFile, instrumented, main, run_contract

with instrumented():
    import torch

    from gemmarun.loading.errors import LoadError
    from gemmarun.loading.gguf import load_gguf
    from gemmarun.loading.gguf_file import GGUFFile

from gguf import GGMLQuantizationType
from tiny_gguf import tiny_gguf

NAME = "gguf_reader"
SECONDS_PER_INPUT = 10.0
_FILE = MemoryFile("input.gguf")


def _load(data: bytes) -> None:
    path = _FILE.write(data)
    llm = load_gguf(path, torch.float32, torch.device("cpu"))
    f = GGUFFile(path)
    for name, info in f.tensors.items():  # every tensor reads back at its declared size
        assert f.raw(name).nbytes == info.nbytes
    text = "Hi, w\u00f6rld \u2581<bos><end_of_turn>\x00\U0001f600"
    llm.tokenizer.decode(llm.tokenizer.encode(text))  # whatever vocabulary loaded encodes text


def test_one_input(data: bytes) -> None:
    run_contract(lambda: _load(data), (LoadError,), SECONDS_PER_INPUT)


# ------------------------------------------------------------------------------ seeds


def seeds() -> dict[str, bytes]:
    return {
        "gemma3-f16.gguf": tiny_gguf("gemma3"),
        "gemma4-f16.gguf": tiny_gguf("gemma4"),
        "gemma4-q8_0.gguf": tiny_gguf("gemma4", GGMLQuantizationType.Q8_0),
    }


if __name__ == "__main__":
    main(NAME, test_one_input, seeds, max_len=16384)
