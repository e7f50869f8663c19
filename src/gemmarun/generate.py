"""Token-level generation: chunked prefill, one-token decode steps, and a generator on top.

Everything textual (detokenising, stop strings, chat) is a wrapper around `generate_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch

from .cache import KVCache, make_cache
from .model.text import TextModel
from .sampling import Sampler, SamplingParams


class ContextOverflow(ValueError):
    """The prompt does not fit the context window."""


def check_prompt_fits(n_prompt: int, context: int) -> None:
    """A prompt needs at least one free position after it (the first generated token's)."""
    if n_prompt >= context:
        raise ContextOverflow(f"prompt of {n_prompt} tokens does not fit the context of {context} tokens")


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
    grammar=None,  # constrain.GrammarState | None
    loop_guard=None,  # loopguard.LoopGuard | None
    piece: Callable[[int], str] | None = None,  # a token's text, for the loop guard's line rules
    holdback: int = 64,
) -> Generator[int, None, str]:
    """Yield generated token ids; return the finish reason ("stop", "length", "loop").

    Stops at a stop id (not yielded), `max_tokens`, the context end, or a completed grammar.
    With a loop guard, tokens are yielded `holdback` tokens late so that a detected loop can be
    rolled back before it reaches the caller: "recover" keeps one copy, bans the token that began
    the repetition there, rebuilds the cache and resamples; "stop" ends with reason "loop" after
    one copy. The cache is sized for `min(len(prompt) + max_tokens, context)` positions.
    """
    cfg = model.config
    context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if not prompt:
        raise ValueError("the prompt is empty")
    check_prompt_fits(len(prompt), context)
    max_len = min(len(prompt) + params.max_tokens, context)
    device = model.device
    sampler = Sampler(params)
    ids = torch.tensor(prompt, device=device)
    seen = torch.tensor(prompt, dtype=torch.long)
    generated: list[int] = []
    emitted = 0  # generated tokens already yielded
    delay = holdback if loop_guard is not None and loop_guard.config.policy != "off" else 0
    if params.max_tokens == 0:
        return "length"

    def start(keep: list[int]) -> tuple[KVCache, torch.Tensor]:
        cache = make_cache(cfg, max_len, dtype=model.dtype, device=device)
        logits = prefill(model, ids, cache, chunk_size=chunk_size, embeds=embeds, vision_blocks=vision_blocks)
        if keep:
            logits = prefill(model, torch.tensor(keep, device=device), cache, start=len(prompt), chunk_size=chunk_size)
        return cache, logits

    cache, logits = start([])
    reason = "length"
    while True:
        gen = torch.tensor(generated, dtype=torch.long)
        if loop_guard is not None:
            banned = loop_guard.banned_at(len(generated))
            if banned:
                logits = logits.clone()
                logits[list(banned)] = float("-inf")
        if grammar is not None:
            logits = grammar.mask(logits)
        token = sampler(logits, torch.cat((seen, gen)), gen)
        if token in stop_ids or (grammar is not None and token in grammar.eos_ids):
            reason = "stop"  # a grammar ends on an end-of-sequence token, even with ignore_eos
            break
        if grammar is not None:
            grammar.advance(token)
        generated.append(token)
        event = loop_guard.push(token, piece(token) if piece else "") if loop_guard is not None else None
        if event is not None and not loop_guard.can_recover():
            del generated[max(emitted, event.start + event.period):]  # one copy of what repeated
            reason = "loop"
            break
        if event is not None:
            keep = loop_guard.rollback(event)
            if keep < emitted:  # part of the loop already left: cut what has not
                loop_guard.truncate(emitted)
                if emitted < len(generated):
                    loop_guard.ban(emitted, generated[emitted])
                keep = emitted
            if grammar is not None:
                grammar.rollback(len(generated) - keep)
            del generated[keep:]
            cache, logits = start(generated)
            continue
        while len(generated) - emitted > delay:
            yield generated[emitted]
            emitted += 1
        position = len(prompt) + len(generated) - 1  # where the newest token goes
        if len(generated) >= params.max_tokens or position >= max_len:
            break
        if grammar is not None and grammar.finished:
            reason = "stop"
            break
        logits = decode_step(model, token, position, cache)
    for token in generated[emitted:]:
        yield token
    return reason
