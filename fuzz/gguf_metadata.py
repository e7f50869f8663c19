"""Fuzz target: GGUF metadata -> model config and tokenizer (structured, Hypothesis).

Byte mutations (gguf_reader) rarely produce a well-formed file whose *values* are hostile, so
this target starts from the metadata and tensor shapes of the tiny seed files and replaces,
drops or adds keys with values of any GGUF type: huge, zero and negative integers, NaN and inf,
strings, booleans, lists of the wrong length or element type. Contract:
`text_config_from_gguf` gives a config or a one-line ConfigError;
`Tokenizer.from_gguf_metadata` gives a tokenizer that encodes text, or a one-line ValueError.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from _harness import MemoryFile, Structured, instrumented, main_structured, run_contract

with instrumented():
    from hypothesis import strategies as st

    from gemmarun.config import ConfigError, text_config_from_gguf
    from gemmarun.loading.gguf_file import GGUFFile
    from gemmarun.tokenizer import Tokenizer

from tiny_gguf import tiny_gguf

NAME = "gguf_metadata"
SECONDS_PER_INPUT = 10.0


@lru_cache(maxsize=None)
def baselines() -> tuple[tuple[dict[str, Any], dict[str, tuple[int, ...]], list[float] | None], ...]:
    """(metadata, tensor shapes, rope_freqs) of the seed files, as the loader reads them."""
    out = []
    for family in ("gemma3", "gemma4"):
        f = GGUFFile(MemoryFile(f"{family}.gguf").write(tiny_gguf(family)))
        shapes = {name: info.shape for name, info in f.tensors.items()}
        freqs = f.array("rope_freqs.weight").tolist() if "rope_freqs.weight" in f.tensors else None
        out.append((dict(f.metadata), shapes, freqs))
    return tuple(out)


SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, 2, 3, 6, 62, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=8), st.lists(st.booleans(), max_size=8),
                   st.lists(st.text(max_size=6), max_size=24))


@st.composite
def hostile_metadata(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], list[float] | None]:
    meta, shapes, freqs = draw(st.sampled_from(baselines()))
    meta, shapes = dict(meta), dict(shapes)
    keys = sorted(meta)
    for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        if draw(st.booleans()):
            del meta[key]
        else:
            meta[key] = draw(VALUES)
    for key in draw(st.lists(st.sampled_from(keys + ["gemma4.expert_count", "gemma3.rope.scaling.type",
                                                     "tokenizer.ggml.eot_token_id"]), max_size=2)):
        meta[key] = draw(VALUES)
    names = sorted(shapes)
    for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):
        if draw(st.booleans()):
            del shapes[name]
        else:
            shapes[name] = tuple(draw(st.lists(st.integers(0, 2**40), max_size=3)))
    if freqs is not None and draw(st.booleans()):
        freqs = draw(st.lists(st.sampled_from([1.0, 1e30, 0.0, float("nan")]), max_size=40))
    return meta, shapes, freqs


def _config(meta: dict, shapes: dict, freqs: list[float] | None) -> None:
    cfg = text_config_from_gguf(meta, shapes, freqs)
    assert len(cfg.layers) == cfg.num_layers


def _tokenizer(meta: dict) -> None:
    tok = Tokenizer.from_gguf_metadata(meta)
    tok.decode(tok.encode("ab a\u2581b <bos>\u00e9\x00"))


def check(case: tuple[dict, dict, list[float] | None]) -> None:
    meta, shapes, freqs = case
    run_contract(lambda: _config(meta, shapes, freqs), (ConfigError,), SECONDS_PER_INPUT)
    run_contract(lambda: _tokenizer(meta), (ValueError,), SECONDS_PER_INPUT)


TARGET = Structured(hostile_metadata(), check)

if __name__ == "__main__":
    main_structured(NAME, TARGET)
