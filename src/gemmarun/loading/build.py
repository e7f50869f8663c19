"""Turn a renamed state dict into a ready TextModel: build on `meta`, assign, check strictly."""

from __future__ import annotations

import torch

from ..config import TextConfig
from ..model.text import TextModel
from .errors import LoadError

PLE_TABLE = "ple.table"


def build_text_model(
    cfg: TextConfig,
    state: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
    prepare=None,  # optional hook(model) that swaps modules (quantized linears) before assigning
) -> TextModel:
    """Assign `state` (gemmarun names) to a fresh model without materialising random weights.

    Float tensors are cast to `dtype` (a copy only when the dtype differs; otherwise they stay
    views of the memory-mapped file). The PLE table is kept as stored, on the CPU.
    """
    with torch.device("meta"):
        model = TextModel(cfg)
    if prepare is not None:
        prepare(model)
    expected = model.state_dict()
    state = dict(state)
    ple_table = state.pop(PLE_TABLE, None)

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    if wrong:
        problems.append(f"wrong shapes: {', '.join(wrong[:8])}")
    if cfg.ple_dim:
        want = (cfg.ple_vocab_size, cfg.num_layers * cfg.ple_dim)
        if ple_table is None:
            problems.append("missing tensors: embed_tokens_per_layer (PLE table)")
        elif tuple(ple_table.shape) != want:
            problems.append(f"wrong shapes: PLE table {tuple(ple_table.shape)} (expected {want})")
    if problems:
        raise LoadError("; ".join(problems))

    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        target = expected[name]
        if t.is_floating_point() and target.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    model.load_state_dict({k: convert(k, v) for k, v in state.items()}, strict=True, assign=True)
    model.to(device)
    if ple_table is not None:
        model.ple.table = ple_table  # stays memory-mapped on the CPU
    return model.eval()
