"""Load a `gemma4_assistant` drafter folder (config.json + safetensors), checked strictly."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import AssistantConfig, assistant_config_from_hf, config_from_file
from ..model.assistant import Assistant
from . import resolve_device, resolve_dtype
from .build import _problems
from .errors import LoadError
from .names import map_assistant_names
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
    """A drafter from a HF `gemma4_assistant` folder; dtype and device resolve as `load`'s do."""
    folder = Path(path)
    if not folder.is_dir():
        raise LoadError(f"{folder}: a drafter is a folder with config.json and safetensors")
    device = resolve_device(device)
    cfg = load_assistant_config(folder)
    state, _ignored = map_assistant_names(read_folder(folder))
    return build_assistant(cfg, state, dtype=resolve_dtype(dtype, device), device=device)
