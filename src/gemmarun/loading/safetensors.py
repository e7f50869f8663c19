"""Memory-mapped safetensors reading (single file or sharded index), no second copy in RAM.

Tensors are views into a private (copy-on-write) memory map of each file: pages are read from
disk only when touched, so a table that is only gathered from (PLE) never becomes resident.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

from ..config import json_problem, read_json_object
from .errors import LoadError
from .file_rows import read_bytes, register_mapping

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file as mmap-backed CPU tensors."""
    size = path.stat().st_size
    if size < 8:
        raise LoadError(f"{path}: truncated safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise LoadError(f"{path}: header length {header_len} runs past the end of the file")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as e:
            raise LoadError(f"{path}: corrupt safetensors header ({json_problem(e)})") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: corrupt safetensors header (not an object)")
    data = np.memmap(path, dtype=np.uint8, mode="c")
    register_mapping(data, data.ctypes.data, data.size, path)
    base = 8 + header_len
    tensors, ranges = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, start, end = _entry(path, name, info)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - start != nbytes or base + end > size:
            raise LoadError(f"{path}: tensor {name!r} data [{start}, {end}) does not fit the file or its shape")
        ranges.append((start, end, name))
        if len(shape) <= 1:  # a vector (norm weight, scalar): read, not mapped (file_rows.py)
            raw = torch.from_numpy(read_bytes(path, base + start, nbytes))
        else:
            raw = torch.from_numpy(data[base + start : base + end])
        tensors[name] = raw.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)
    _check_contiguous(path, sorted(ranges), size - base)
    return tensors


def _check_contiguous(path: Path, ranges: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' byte ranges tile the data section, as the format requires (the safetensors
    library refuses anything else): an overlap would read one tensor's bytes as another's."""
    end = 0
    for start, stop, name in ranges:
        if start != end:
            raise LoadError(f"{path}: tensor {name!r} data starts at {start}, not at {end} where the "
                            "previous tensor ends (overlapping or gapped offsets)")
        end = stop
    if end != data_size:
        raise LoadError(f"{path}: the tensors' data ends at {end} but the file holds {data_size} bytes of data")


def _entry(path: Path, name: str, info: object) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry, each field type-checked."""
    if not isinstance(info, dict):
        raise LoadError(f"{path}: tensor {name!r} has no header object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise LoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r:.40}")
    if not _naturals(shape):
        raise LoadError(f"{path}: tensor {name!r} shape {shape!r:.60} is not a list of non-negative integers")
    if math.prod(max(d, 1) for d in shape) >= 2**63:  # torch's strides are int64, even for an empty tensor
        raise LoadError(f"{path}: tensor {name!r} shape {shape!r:.60} is too large")
    if not _naturals(offsets) or len(offsets) != 2:
        raise LoadError(f"{path}: tensor {name!r} data_offsets {offsets!r:.60} are not two non-negative integers")
    return dtype, shape, offsets[0], offsets[1]


def _naturals(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of a HF model folder, as transformers picks them: `model.safetensors`, else its
    sharded index's files, else every `*.safetensors` (a tensor in two of them refused)."""
    if (folder / "model.safetensors").is_file():  # as transformers: it wins over an index or another file
        return read_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index, LoadError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{index}: corrupt shard index (weight_map must map tensor names to file names)")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or shard in ("", ".", ".."):  # never a path out of the folder
                raise LoadError(f"{index}: shard {shard[:80]!r} is not a file name in the model folder")
            shard_path = folder / shard
            if not shard_path.is_file():
                raise LoadError(f"{index}: shard {shard!r} is missing (or not a file)")
            tensors.update(read_safetensors(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise LoadError(f"{index}: tensors listed but not in any shard: {', '.join(missing[:5])}")
        return tensors
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{folder}: no .safetensors files")
    tensors = {}
    for f in files:
        part = read_safetensors(f)
        twice = next((name for name in part if name in tensors), None)
        if twice is not None:  # which one a model means, no file says
            raise LoadError(f"{folder}: tensor {twice!r} is in two files and there is no model.safetensors "
                            "or index saying which to read")
        tensors.update(part)
    return tensors
