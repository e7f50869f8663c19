"""Attention visibility as pure functions of positions (no model state).

A key at position `k` is visible to a query at position `q` iff `0 <= k <= q` and, on sliding
layers, `k > q - window` (exactly `window` keys including the query itself). Empty cache slots
carry position -1 and are never visible.
"""

from __future__ import annotations

import torch


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool mask (T, S): True where query i may attend key j."""
    q = q_pos[:, None]
    k = k_pos[None, :]
    ok = (k <= q) & (k >= 0)
    if window is not None:
        ok &= k > q - window
    return ok
