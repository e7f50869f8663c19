"""Files written for the user (`bench --write`, `convert`, `svg repair -o`): each is written
beside its target and renamed over it once whole, so a failure leaves the old file as it was."""

from __future__ import annotations

import glob
import os
from pathlib import Path


def replaced_target(path: str | Path) -> Path:
    """The file that writing `path` by a rename replaces: a symlink's target (the link keeps
    pointing at the new file; renaming over the link had replaced it with a plain file). A
    folder, FIFO or device is a ValueError: the rename would put a file in its place (a root's
    `--write /dev/null` had replaced the device)."""
    if str(path).endswith(("/", os.sep)):  # Path() drops the slash: a file of the folder's name
        raise ValueError(f"{path}: a folder's name, not a file's")
    real = Path(os.path.realpath(path))
    if real.is_dir():
        raise ValueError(f"{path}: a folder, not a file")
    if real.exists() and not real.is_file():
        raise ValueError(f"{path}: not a regular file")
    if not real.parent.is_dir():
        raise ValueError(f"{path}: no folder {real.parent} to write it in")
    return real


def partial_path(target: Path) -> Path:
    """Where `target` is written before it is renamed into place: a name of this process's own
    (two writers never write into one file). Those of processes no longer running (killed
    mid-write: a convert leaves gigabytes) are removed first."""
    prefix, suffix = f".{target.name}.", ".partial"
    for old in target.parent.glob(f"{glob.escape(prefix)}*{suffix}"):
        pid = old.name[len(prefix):-len(suffix)]
        if pid.isdigit() and not _running(int(pid)):
            old.unlink(missing_ok=True)
    return target.with_name(f"{prefix}{os.getpid()}{suffix}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process: running
        return True
    return True


def write_replacing(path: str | Path, data: bytes) -> None:
    """`data` into `path` (see replaced_target), whole or not at all; nothing left behind."""
    target = replaced_target(path)
    partial = partial_path(target)
    try:
        partial.write_bytes(data)
        os.replace(partial, target)
    except OSError as e:
        raise cannot_write(path, e) from None
    finally:
        partial.unlink(missing_ok=True)


def cannot_write(path: str | Path, e: OSError) -> OSError:
    """The error of a failed write, naming the file asked for (not its hidden partial one)."""
    return OSError(f"cannot write {path}: {e.strerror or e}")
