"""Load a `gemma4_assistant` drafter, checked strictly: a HF folder (config.json + safetensors) or
llama.cpp's GGUF of it (`gemma4-assistant`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import AssistantConfig, ConfigError, assistant_config_from_gguf, assistant_config_from_hf, config_from_file
from ..model.assistant import Assistant
from . import resolve_device, resolve_dtype
from .build import _problems
from .errors import LoadError
from .gguf_file import GGUFFile, is_gguf
from .names import GGUF_ASSISTANT_NAMES, GGUF_IGNORED, gguf_to_gemmarun, is_drafter_kv, map_assistant_names
from .safetensors import read_folder


def load_assistant_config(folder: Path) -> AssistantConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise LoadError(f"{path}: a drafter is a folder with a config.json")
    return config_from_file(path, assistant_config_from_hf)


def build_assistant(cfg: AssistantConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype,
                    device: torch.device) -> Assistant:
    """Assign `state` (gemmarun names) to a drafter built on `meta`; missing, unexpected and
    misshapen tensors are reported together."""
    with torch.device("meta"):
        model = Assistant(cfg)
    expected = model.state_dict()
    problems = _problems(expected, state)
    problems += [f"{name} holds {t.dtype}, not floating point" for name, t in state.items()
                 if name in expected and expected[name].is_floating_point() and not t.is_floating_point()]
    problems += [f"{name} is not an ordering of the {t.numel()} token ids" for name, t in state.items()
                 if name.endswith("token_ordering") and name in expected and not _is_permutation(t)]
    if problems:
        raise LoadError("drafter: " + "; ".join(problems))
    state = {name: t.to(dtype) if t.is_floating_point() else t.long() for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def _is_permutation(ordering: torch.Tensor) -> bool:
    """Whether the centroid head's token ordering holds every id 0..n-1 once (it indexes the
    logits with them: an id past the vocabulary failed every generation, not the load)."""
    if ordering.is_floating_point() or ordering.dim() != 1:
        return False
    ids = ordering.long()
    return bool(((ids >= 0) & (ids < ids.numel())).all()) and torch.bincount(ids, minlength=ids.numel()).max() <= 1


def load_assistant(path: str | Path, *, dtype=None, device=None) -> Assistant:
    """A drafter from a HF `gemma4_assistant` folder or its GGUF; dtype and device resolve as
    `load`'s do."""
    path = Path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if path.is_file() and is_gguf(path):
        cfg, state = _read_gguf(path, dtype)
    elif path.is_dir():
        cfg = load_assistant_config(path)
        state, _ignored = map_assistant_names(read_folder(path))
    else:
        raise LoadError(f"{path}: a drafter is a folder with config.json and safetensors, or its GGUF")
    try:
        return build_assistant(cfg, state, dtype=dtype, device=device)
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None


def _read_gguf(path: Path, dtype: torch.dtype) -> tuple[AssistantConfig, dict[str, torch.Tensor]]:
    """llama.cpp's drafter GGUF: text names plus the two projections, each tensor dequantized
    exactly and cast to `dtype` one at a time (the tied table is 262k rows)."""
    from .gguf import check_head_is_tied, read_rope_freqs, read_tensor

    f = GGUFFile(path)
    try:
        cfg = assistant_config_from_gguf(f.metadata, {n: i.shape for n, i in f.tensors.items()}, read_rope_freqs(f))
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    check_head_is_tied(f)
    state, unknown = {}, []
    for name, info in f.tensors.items():
        ours = GGUF_ASSISTANT_NAMES.get(name) or gguf_to_gemmarun(name)
        if ours is None or is_drafter_kv(ours):  # unused K/V: as the folder's (names.map_assistant_names)
            if ours is None and name not in GGUF_IGNORED:
                unknown.append(name)
            continue
        state[ours] = read_tensor(f, info, True).to(dtype)
        f.release(name)  # the pages read for the copy leave RSS
    if unknown:
        raise LoadError(f"{path}: unknown tensors: {', '.join(unknown[:8])}")
    return cfg, state
