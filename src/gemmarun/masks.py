"""Attention visibility as pure functions of positions (no model state).

A key at position `k` is visible to a query at position `q` iff `0 <= k <= q` and, on sliding
layers, `k > q - window` (exactly `window` keys including the query itself). Empty cache slots
carry position -1 and are never visible.
"""

from __future__ import annotations

import torch


def visible(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, blocks: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask (T, S): True where query i may attend key j.

    `blocks` (while prefilling; Gemma 4 31B/26B on sliding layers, Gemma 3 on every layer): the
    vision block id of every absolute prompt position (-1 outside images); tokens of one image also
    see each other ahead of themselves, still within any window (spec 3.3).
    """
    q = q_pos[:, None]
    k = k_pos[None, :]
    ok = k <= q
    if blocks is not None:
        n = blocks.numel()
        bq = torch.where(q_pos < n, blocks[q_pos.clamp(0, n - 1)], -1)[:, None]
        bk = torch.where((k_pos >= 0) & (k_pos < n), blocks[k_pos.clamp(0, n - 1)], -2)[None, :]
        ok |= (bq == bk) & (bq >= 0)
    ok &= k >= 0
    if window is not None:
        ok &= k > q - window
    return ok


def vision_blocks(token_types: torch.Tensor) -> torch.Tensor:
    """Block id per position from multimodal token types (0 text, 1 image, 2 video, 3 audio):
    each maximal run of image (or video) soft tokens is one block; everything else is -1."""
    is_vision = (token_types == 1) | (token_types == 2)
    starts = is_vision & ~torch.cat((torch.tensor([False], device=token_types.device), is_vision[:-1]))
    ids = torch.cumsum(starts.long(), 0) - 1
    return torch.where(is_vision, ids, torch.full_like(ids, -1))
