"""A small, strict, fast GGUF reader: metadata as plain Python values, tensors as mmap views.

gguf-py's `GGUFReader` builds a numpy view per string of the 262k-token vocabulary and takes
25-40 s to open the 270M file; this reader opens it in well under a second. gguf-py still
supplies the constants (quant types, block sizes) and writes files (`convert`), and the tests
check this reader against `GGUFReader` on the real file. Every read is bounds-checked: a
truncated or corrupt file is a one-line `LoadError`, never a hang or a traceback.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import LoadError
from .file_rows import read_bytes, register_mapping

_SCALARS = {  # GGUF value type -> (struct format, numpy dtype)
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order (slowest first), i.e. ggml dims reversed
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


GGUF_MAGIC = b"GGUF"


def file_magic(path: str | Path) -> bytes:
    """A file's first four bytes (fewer for a shorter file)."""
    with open(path, "rb") as f:
        return f.read(4)


def is_gguf(path: str | Path) -> bool:
    return file_magic(path) == GGUF_MAGIC


class GGUFFile:
    """Parsed header of a GGUF file plus a private memory map of its bytes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            magic = f.read(4)
            if len(magic) == 4 and magic != GGUF_MAGIC:
                raise LoadError(f"{self.path}: not a GGUF file (magic {magic!r})")
            if size < 24:
                raise LoadError(f"{self.path}: truncated GGUF file ({size} bytes)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.size = size
        register_mapping(self, np.frombuffer(self._map, dtype=np.uint8).ctypes.data, size, self.path)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
            if isinstance(e, LoadError):
                raise
            raise LoadError(f"{self.path}: corrupt GGUF header ({e})") from None

    # -- primitive reads -----------------------------------------------------------------------

    def _need(self, n: int) -> None:
        if n < 0 or self._pos + n > self.size:
            raise LoadError(f"{self.path}: truncated GGUF file (header runs past the end at byte {self._pos})")

    def _scalar(self, vtype: int):
        fmt = _SCALARS[vtype][0]
        n = struct.calcsize(fmt)
        self._need(n)
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += n
        return value

    def _string(self) -> str:
        n = self._scalar(10)
        self._need(n)
        s = self._map[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self._scalar(vtype)
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY and depth < 4:
            item_type = self._scalar(4)
            count = self._scalar(10)
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                self._need(count * dtype.itemsize)
                arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos)
                self._pos += count * dtype.itemsize
                return arr.tolist()
            if count > self.size - self._pos:  # every item takes at least one byte
                raise LoadError(f"{self.path}: corrupt GGUF array of {count} items")
            return [self._value(item_type, depth + 1) for _ in range(count)]
        raise LoadError(f"{self.path}: unknown GGUF value type {vtype} at byte {self._pos}")

    # -- structure -----------------------------------------------------------------------------

    def _parse(self) -> None:
        self._pos = 4  # past the magic, checked on opening
        self.version = self._scalar(4)
        if self.version not in (2, 3):
            raise LoadError(f"{self.path}: GGUF version {self.version} is not supported (2, 3)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        if n_tensors > self.size // 24 or n_kv > self.size // 12:
            raise LoadError(
                f"{self.path}: truncated or corrupt GGUF header ({n_tensors} tensors, {n_kv} keys in {self.size} bytes)"
            )
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.metadata:  # which one a reader takes is arbitrary (gguf-py refuses it too)
                raise LoadError(f"{self.path}: metadata key {key[:80]!r} appears twice")
            self.metadata[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            if not name.isprintable():  # names end up in messages: no control characters there
                raise LoadError(f"{self.path}: tensor name {name[:60]!r} is not printable")
            n_dims = self._scalar(4)
            if n_dims > 8:
                raise LoadError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
            dims = [self._scalar(10) for _ in range(n_dims)]
            if 0 in dims:
                raise LoadError(f"{self.path}: tensor {name!r} has an empty dimension {dims}")
            type_id = self._scalar(4)
            offset = self._scalar(10)
            infos.append((name, dims, type_id, offset))
        alignment = self.metadata.get("general.alignment", 32)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise LoadError(f"{self.path}: general.alignment={alignment!r} is not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise LoadError(f"{self.path}: tensor {name!r} has unknown ggml type {type_id} "
                                "(a type newer than this reader, or a corrupt file)") from None
            n = math.prod(dims)  # exact: numpy's int64 product wraps around on hostile dims
            if dims and dims[0] % block:
                raise LoadError(f"{self.path}: tensor {name!r} row of {dims[0]} is not a multiple of "
                                f"{qtype.name}'s block of {block}")
            nbytes = n // block * type_size
            if offset % alignment:  # llama.cpp refuses these too: the tensors would be read askew
                raise LoadError(f"{self.path}: tensor {name!r} offset {offset} is not a multiple of "
                                f"the alignment {alignment}")
            start = data_start + offset
            if start + nbytes > self.size:
                raise LoadError(
                    f"{self.path}: tensor {name!r} data runs past the end of the file (truncated download?)"
                )
            if name in self.tensors:
                raise LoadError(f"{self.path}: tensor {name!r} appears twice")
            self.tensors[name] = TensorInfo(name, qtype, tuple(reversed(dims)), start, nbytes)
        by_start = sorted(self.tensors.values(), key=lambda t: t.offset)
        for before, after in zip(by_start, by_start[1:]):
            if after.offset < before.offset + before.nbytes:
                raise LoadError(f"{self.path}: tensors {before.name!r} and {after.name!r} share bytes")
        # The header is parsed into Python objects: its pages (a 262k-token vocabulary is ~9 MiB)
        # would otherwise stay resident in the mapping as long as the model lives.
        header_pages = self._pos // mmap.PAGESIZE * mmap.PAGESIZE
        if header_pages and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, 0, header_pages)

    def drop_metadata(self, prefix: str) -> None:
        """Forget the metadata under `prefix` once it is consumed: the tokenizer's 262k-entry
        lists are ~40 MiB of Python objects that would otherwise live as long as the mapping."""
        for key in [k for k in self.metadata if k.startswith(prefix)]:
            del self.metadata[key]

    # -- data ----------------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view of the memory map (no copy)."""
        info = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def read(self, name: str) -> np.ndarray:
        """The tensor's bytes read into memory (a copy: no page of the mapping touched)."""
        info = self.tensors[name]
        return read_bytes(self.path, info.offset, info.nbytes)

    def release(self, name: str) -> None:
        """Drop the resident pages of a tensor that was copied out (repacked) from this process's
        memory: touched pages of a file mapping count in its RSS until unmapped, so without this
        a loaded GGUF held its weights twice. Only whole pages inside the tensor are dropped, and
        they were only read, so a later read would simply fault them in again from the file."""
        info = self.tensors[name]
        page = mmap.PAGESIZE
        start = -(-info.offset // page) * page
        end = (info.offset + info.nbytes) // page * page
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def array(self, name: str) -> np.ndarray:
        """A float tensor (F32/F16/BF16-as-uint16) as a typed numpy view in PyTorch shape."""
        info = self.tensors[name]
        dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.BF16: np.uint16}.get(info.ggml_type)
        if dtype is None:
            raise LoadError(f"{self.path}: tensor {name!r} is {info.type_name}, expected F32, F16 or BF16")
        return self.raw(name).view(dtype).reshape(info.shape)
