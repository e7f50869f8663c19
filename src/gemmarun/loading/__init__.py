"""`load(path)`: dispatch on the format (HF folder or .gguf file)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import LoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists a dozen backends
        raise LoadError(f"device {device!r} is not a device (cpu, cuda, cuda:1 ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise LoadError(f"device {str(device)!r} is not supported (cpu, cuda, cuda:1 ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise LoadError(f"device {str(device)!r} was asked for but CUDA is not available ({build})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LoadError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on the CPU by default (exact, and fastest without bf16 matrix units), bf16 on GPU."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise LoadError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
        return dtype
    if dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16)")
    return DTYPES[dtype]


def load(path: str | Path | None = None, *, dtype=None, device=None, reference: bool = False,
         mmproj: str | Path | None = None):
    """Load a model: a HF folder, a .gguf file or `ollama:NAME[:TAG]` (a model in Ollama's local
    store); no path loads the embedded Gemma 3 270M.

    `reference=True` (GGUF) dequantizes weights exactly to float32 instead of keeping them
    quantized: slower and larger, used to check the fast path. `mmproj` adds llama.cpp's
    multimodal projector GGUF (Gemma 4's vision and audio towers) to a GGUF text model.
    """
    if path is None:
        from .default import default_model_path

        path = default_model_path()
    from .ollama import PREFIX, resolve

    if isinstance(path, str) and path.startswith(PREFIX):  # `ollama:gemma4:e2b`: the blobs its manifest names
        found = resolve(path)
        path, mmproj = found.model, mmproj if mmproj is not None else found.projector
    path = Path(path).expanduser()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if not path.exists():
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None  # google/gemma-4-E2B-it
        raise LoadError(f"{path}: no such file or folder" + (
            " (gemmarun reads local files and downloads nothing: fetch it first, e.g. "
            f"`hf download {path} --local-dir DIR`, and give DIR)" if hub else ""))
    # (Path("") is the current folder: an empty --mmproj names no file)
    if mmproj is not None and (str(mmproj) in ("", ".") or not Path(mmproj).expanduser().exists()):
        raise LoadError(f"{str(mmproj)!r}: no such mmproj file")
    mmproj = Path(mmproj).expanduser() if mmproj is not None else None
    if path.is_dir():
        if mmproj is not None:
            raise LoadError(f"{path}: a model folder holds its own towers; an mmproj goes with a GGUF text model")
        from .hf import load_hf_folder

        try:
            return load_hf_folder(path, torch_dtype, device)
        except IsADirectoryError as e:
            raise LoadError(f"{e.filename}: a folder where the model folder should hold a file") from None
    from .gguf_file import GGUF_MAGIC, file_magic
    from .hf import check_regular

    for file in (path, mmproj):
        if file is not None:
            check_regular(file)

    magic = file_magic(path)
    if magic == GGUF_MAGIC:
        from .gguf import load_gguf

        return load_gguf(path, torch_dtype, device, reference=reference, mmproj=mmproj)
    raise LoadError(f"{path}: not a model folder or a GGUF file (magic {magic!r})")


__all__ = ["LoadError", "load"]
