"""Token-level generation: chunked prefill, one-token decode steps, and a generator on top.

Everything textual (detokenising, stop strings, chat) is a wrapper around `generate_step`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .cache import KVCache, make_cache
from .model.text import TextModel
from .sampling import Sampler, SamplingParams


class ContextOverflow(ValueError):
    """The prompt does not fit the context window."""


def _chunks(n: int, chunk_size: int, blocks: torch.Tensor | None) -> list[tuple[int, int]]:
    """Chunk boundaries; never inside an image block, whose tokens must see each other."""
    bounds, lo = [], 0
    while lo < n:
        hi = min(lo + chunk_size, n)
        if blocks is not None:
            while hi < n and blocks[hi] >= 0 and blocks[hi] == blocks[hi - 1]:
                hi += 1
        bounds.append((lo, hi))
        lo = hi
    return bounds


@torch.inference_mode()
def prefill(model: TextModel, ids: torch.Tensor, cache: KVCache, start: int = 0, chunk_size: int = 256,
            embeds: torch.Tensor | None = None, vision_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Run `ids` (T,) through the model in chunks, filling `cache` from position `start`.
    `embeds` (1, T, H) replaces the token embeddings (multimodal prompts); `vision_blocks` (T,)
    marks image blocks for bidirectional attention. Returns the float32 logits (V,) of the last
    position."""
    logits = None
    for lo, hi in _chunks(ids.numel(), chunk_size, vision_blocks):
        positions = torch.arange(start + lo, start + hi, device=ids.device)
        chunk_embeds = None if embeds is None else embeds[:, lo:hi]
        logits = model(ids[None, lo:hi], positions, cache, embeds=chunk_embeds, last_only=True,
                       vision_blocks=vision_blocks)
    return logits[0, -1].float()


@torch.inference_mode()
def decode_step(model: TextModel, token: int, position: int, cache: KVCache) -> torch.Tensor:
    device = model.device
    ids = torch.tensor([[token]], device=device)
    positions = torch.tensor([position], device=device)
    return model(ids, positions, cache, last_only=True)[0, -1].float()


def generate_step(
    model: TextModel,
    prompt: list[int],
    params: SamplingParams,
    *,
    stop_ids: frozenset[int] = frozenset(),
    context: int | None = None,
    chunk_size: int = 256,
    embeds: torch.Tensor | None = None,
    vision_blocks: torch.Tensor | None = None,
) -> Iterator[int]:
    """Yield generated token ids until a stop id (not yielded), `max_tokens`, or the context end.

    The cache is sized for `min(len(prompt) + max_tokens, context)` positions.
    """
    cfg = model.config
    context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= context:
        raise ContextOverflow(f"prompt of {len(prompt)} tokens does not fit the context of {context} tokens")
    max_len = min(len(prompt) + params.max_tokens, context)
    device = model.device
    cache = make_cache(cfg, max_len, dtype=model.dtype, device=device)
    sampler = Sampler(params)
    ids = torch.tensor(prompt, device=device)
    seen = torch.tensor(prompt, dtype=torch.long)
    generated: list[int] = []
    if params.max_tokens == 0:
        return
    logits = prefill(model, ids, cache, chunk_size=chunk_size, embeds=embeds, vision_blocks=vision_blocks)
    position = len(prompt)
    while True:
        gen = torch.tensor(generated, dtype=torch.long)
        token = sampler(logits, torch.cat((seen, gen)), gen)
        if token in stop_ids:
            return
        yield token
        generated.append(token)
        if len(generated) >= params.max_tokens or position >= max_len:
            return
        logits = decode_step(model, token, position, cache)
        position += 1
