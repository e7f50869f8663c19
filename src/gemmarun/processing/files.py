"""The check every media file passes before a decoder opens it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

_NAME_SHOWN = 200  # characters of a path an error message shows


def media_file(source: str | Path, error: type[ValueError]) -> tuple[Path, str, int]:
    """(path, its name for messages, size in bytes) of a non-empty regular file; otherwise
    `error` in one line. A name the OS refuses (past its length limit: a data URL given as a
    path, say) is such an error too, not an OSError."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        shown = source if len(source) <= _NAME_SHOWN else source[:_NAME_SHOWN] + "..."
        raise error(f"{shown}: a URL; gemmarun reads media from local files only (download it first)")
    path = Path(source).expanduser()
    name = str(path) if len(str(path)) <= _NAME_SHOWN else str(path)[:_NAME_SHOWN] + "..."
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{name}: no such file") from None
    except OSError as e:
        raise error(f"{name}: cannot read ({e.strerror or os.strerror(e.errno or 0)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{name}: not a regular file")
    if st.st_size == 0:
        raise error(f"{name}: empty file (0 bytes)")
    return path, name, st.st_size


def ffmpeg_url(path: str | Path) -> str:
    """A local file as FFmpeg (PyAV) must be given it: a name with a colon ("rec-12:30.m4a",
    "pipe:0.m4a") is otherwise read as a protocol (cannot open, or stdin)."""
    return "file:" + os.path.abspath(path)
