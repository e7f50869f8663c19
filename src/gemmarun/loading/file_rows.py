"""Table rows read from the checkpoint file with `pread`, for the PLE table (spec 3.2).

A memory-mapped table is the natural way to keep 4.5 GB of per-layer rows out of RAM, but the
pages a process touches in a mapping count in its RSS, and Linux maps whole large page-cache
folios (up to 2 MiB) around each touched row: a 128-token E2B prompt mapped 220 MiB of the table,
a long chat would map all of it. Reading the few rows a step needs with `pread` copies only their
bytes; the file stays in the page cache, shared and evictable, never in the process.

The loaders register the mappings they make; `rows_reader(t)` finds the file and offset behind a
tensor that is a view of one of them.

Vectors (norm weights, scalars) are read into memory with `read_bytes` at load, for the same
reason: touching a few kB of a mapping maps the whole large folio around it, other tensors' bytes
included. A 4-bit E2B's 1 MiB of norm weights, used where they lay, mapped 160 MiB of its GGUF
(~4 MiB a layer) on the first prefill. Matrices and tables stay mapped.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_mappings: list[tuple[weakref.ref, int, int, Path]] = []  # (owner, base address, bytes, file)


def register_mapping(owner: object, base: int, nbytes: int, path: Path) -> None:
    """`owner` (a GGUF file, a numpy memmap) maps `path` whole at address `base`; forgotten when
    the owner is collected (its address range may then be reused)."""
    _mappings[:] = [m for m in _mappings if m[0]() is not None]
    _mappings.append((weakref.ref(owner), base, nbytes, Path(path)))


@dataclass
class FileRows:
    """`n_rows` rows of `row_bytes` each, stored contiguously at `offset` in `path`."""

    path: Path
    offset: int
    n_rows: int
    row_bytes: int

    def __post_init__(self) -> None:
        # Opened now, while the loader's mapping of the same file is alive: the rows come from the
        # file that was mapped, even if the path is replaced later (a copy reopens it by path).
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fd"} | {"_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (flat, CPU) as uint8 `[len(ids), row_bytes]`."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        flat = ids.reshape(-1).tolist()
        out = torch.empty(len(flat), self.row_bytes, dtype=torch.uint8)
        buffers = out.numpy()
        for i, row in enumerate(flat):
            if not 0 <= row < self.n_rows:
                raise IndexError(f"row {row} is out of range for a table of {self.n_rows} rows")
            _pread_exact(self._fd, buffers[i], self.offset + row * self.row_bytes, self.path, f"table row {row}")
        return out


def read_bytes(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """`nbytes` bytes of `path` at `offset`, read with pread into a fresh uint8 array."""
    out = np.empty(nbytes, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        if nbytes:
            _pread_exact(fd, out, offset, path, f"{nbytes} bytes at {offset}")
    finally:
        os.close(fd)
    return out


def _pread_exact(fd: int, buffer: np.ndarray, offset: int, path: Path, what: str) -> None:
    if os.preadv(fd, [buffer], offset) != buffer.nbytes:
        raise OSError(f"{path}: short read of {what} (was the file truncated?)")


def rows_reader(table: torch.Tensor) -> FileRows | None:
    """A reader for `table`'s rows from its file, where `table` is a row-contiguous CPU view of
    a registered mapping; else None (the table is then indexed where it lies)."""
    if table.device.type != "cpu" or table.dim() != 2 or not table.is_contiguous():
        return None
    start, size = table.data_ptr(), table.numel() * table.element_size()
    for owner, base, nbytes, path in _mappings:
        if owner() is not None and base <= start and start + size <= base + nbytes:
            return FileRows(path, start - base, table.shape[0], table.shape[1] * table.element_size())
    return None
