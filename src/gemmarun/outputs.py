"""Files written for the user (`bench --write`, `convert`, `svg repair -o`): each is written
beside its target and renamed over it once whole, so a failure leaves the old file as it was."""

from __future__ import annotations

import os
from pathlib import Path


def replaced_target(path: str | Path) -> Path:
    """The file that writing `path` by a rename replaces: a symlink's target (the link keeps
    pointing at the new file; renaming over the link had replaced it with a plain file). A
    folder, FIFO or device is a ValueError: the rename would put a file in its place (a root's
    `--write /dev/null` had replaced the device)."""
    real = Path(os.path.realpath(path))
    if real.is_dir():
        raise ValueError(f"{path}: a folder, not a file")
    if real.exists() and not real.is_file():
        raise ValueError(f"{path}: not a regular file")
    if not real.parent.is_dir():
        raise ValueError(f"{path}: no folder {real.parent} to write it in")
    return real


def write_replacing(path: str | Path, data: bytes) -> None:
    """`data` into `path` (see replaced_target), whole or not at all; nothing left behind."""
    target = replaced_target(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
