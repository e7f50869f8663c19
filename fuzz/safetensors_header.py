"""Fuzz target: a .safetensors file from a stranger (byte level, atheris).

`read_safetensors` checks the 8-byte header length, parses the JSON header and checks each
tensor's dtype, shape and data offsets against the file. The first input byte picks how the
rest is used: even, as the whole file (header length included); odd, as a JSON header followed
by data, with a correct length prefix written here, so mutations of the JSON get past the
length check. Contract: tensors whose bytes lie inside the file, or a one-line LoadError.
"""

from __future__ import annotations

import json

from _harness import MemoryFile, instrumented, main, run_contract

with instrumented():
    import numpy as np
    from safetensors.numpy import save

    from gemmarun.loading.errors import LoadError
    from gemmarun.loading.safetensors import read_safetensors

NAME = "safetensors_header"
SECONDS_PER_INPUT = 5.0
_FILE = MemoryFile("input.safetensors")


def file_bytes(data: bytes) -> bytes:
    if not data or data[0] % 2 == 0:
        return data[1:]
    header, _, payload = data[1:].partition(b"\n")
    return len(header).to_bytes(8, "little") + header + payload


def _read(data: bytes) -> None:
    content = file_bytes(data)
    tensors = read_safetensors(_FILE.write(content))
    header_len = int.from_bytes(content[:8], "little")
    for t in tensors.values():
        assert t.numel() * t.element_size() <= len(content) - 8 - header_len
        t.sum()  # the data is readable


def test_one_input(data: bytes) -> None:
    run_contract(lambda: _read(data), (LoadError,), SECONDS_PER_INPUT)


def seeds() -> dict[str, bytes]:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((0, 4), np.float16),
               "c": np.array([True, False]), "d": np.array(7, dtype=np.int64)}
    whole = save(tensors, metadata={"format": "pt"})
    header_len = int.from_bytes(whole[:8], "little")
    header = json.loads(whole[8 : 8 + header_len])
    return {
        "whole.safetensors": b"\0" + whole,
        "split.safetensors": b"\1" + json.dumps(header).encode() + b"\n" + whole[8 + header_len :],
    }


TOKENS = [b'"dtype"', b'"shape"', b'"data_offsets"', b'"__metadata__"', b'"F32"', b'"BF16"', b'"BOOL"',
          b'"I64"', b'"U8"', b'"F8_E4M3"', b"null", b"true", b"[]", b"{}", b"-1", b"0", b"1e400", b"0.5",
          b"9223372036854775807", b"9223372036854775808", b"18446744073709551616", b"4294967296"]

if __name__ == "__main__":
    main(NAME, test_one_input, seeds, max_len=2048, dictionary=TOKENS)
