"""Token-level generation: chunked prefill, one-token decode steps, and a generator on top.

Everything textual (detokenising, stop strings, chat) is a wrapper around `generate_step`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch

from .cache import KVCache, make_cache
from .control import OutputControl, Verdict
from .model.text import Exposed, TextModel
from .prompt_cache import Held, PromptCache, common_prefix
from .sampling import Sampler, SamplingParams


class ContextOverflow(ValueError):
    """The prompt does not fit the context window."""


# Prompt tokens per prefill forward. Each forward dequantizes every weight tile once, so longer
# chunks amortize that; 512 prefilled the real 270M 13 % faster than 256 (1349 vs 1192 tok/s,
# same-process A/B) for ~20 MB more activations on E2B.
PREFILL_CHUNK = 512


def check_prompt_fits(n_prompt: int, context: int) -> None:
    """A prompt needs at least one free position after it (the first generated token's)."""
    if n_prompt >= context:
        raise ContextOverflow(f"prompt of {n_prompt} tokens does not fit the context of {context} tokens")


def _chunks(n: int, chunk_size: int, blocks: torch.Tensor | None, start: int = 0) -> list[tuple[int, int]]:
    """Chunk boundaries of `n` ids from position `start`; never inside an image block (`blocks`:
    per absolute position), whose tokens must see each other."""
    bounds, lo = [], 0
    while lo < n:
        hi = min(lo + chunk_size, n)
        if blocks is not None:
            while hi < n and blocks[start + hi] >= 0 and blocks[start + hi] == blocks[start + hi - 1]:
                hi += 1
        bounds.append((lo, hi))
        lo = hi
    return bounds


def check_token_ids(ids: torch.Tensor | Sequence[int], vocab_size: int) -> None:
    """Every id a row of the token table, or one line naming one that is not (an id past the table
    failed deep in the embedding lookup)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise TypeError(f"token ids must be a sequence of integers, not {type(ids).__name__}")
    if isinstance(ids, torch.Tensor) and ids.dim() != 1:  # [[...]] (a batch of one) had failed inside int()
        raise ValueError(f"token ids must be one sequence (1-D), not a tensor of shape {list(ids.shape)}")
    if len(ids) == 0:
        return
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, not {ids.dtype}")
        low, high = int(ids.min()), int(ids.max())
    else:
        odd = next((i for i in ids if type(i) is not int and (isinstance(i, bool) or not isinstance(i, Integral))), None)
        if odd is not None:  # a float had been truncated, a string failed inside min()
            raise TypeError(f"token ids must be integers, not {type(odd).__name__} ({odd!r:.40})")
        low, high = int(min(ids)), int(max(ids))
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token id {high if high >= vocab_size else low} is outside the vocabulary of {vocab_size}")


@torch.inference_mode()
def prefill(model: TextModel, ids: torch.Tensor, cache: KVCache, start: int = 0, chunk_size: int = PREFILL_CHUNK,
            embeds: torch.Tensor | None = None, vision_blocks: torch.Tensor | None = None,
            expose: Exposed | None = None) -> torch.Tensor:
    """Run `ids` (T,) through the model in chunks, filling `cache` from position `start`.
    `embeds` (1, T, H) replaces the token embeddings (multimodal prompts); `vision_blocks` (per
    absolute position, at least start + T) marks image blocks for bidirectional attention;
    `expose` receives the last chunk's final hidden state and K/V (speculative drafting).
    Returns the float32 logits (V,) of the last position."""
    check_token_ids(ids, model.config.vocab_size)  # (a tokenizer with more ids than the table)
    logits = None
    for lo, hi in _chunks(ids.numel(), chunk_size, vision_blocks, start):
        positions = torch.arange(start + lo, start + hi, device=ids.device)
        chunk_embeds = None if embeds is None else embeds[:, lo:hi]
        logits = model(ids[None, lo:hi], positions, cache, embeds=chunk_embeds, last_only=True,
                       vision_blocks=vision_blocks, expose=expose)
    return logits[0, -1].float()


def prefill_rest(model: TextModel, cache: KVCache, held: int, ids: torch.Tensor, kept: Sequence[int] = (), *,
                 chunk_size: int = PREFILL_CHUNK, embeds: torch.Tensor | None = None,
                 vision_blocks: torch.Tensor | None = None, expose: Exposed | None = None) -> torch.Tensor:
    """Prefill the prompt `ids` (T,) and then the `kept` generated tokens into `cache`, which
    holds the first `held` of them already (a kept prompt's, or none); the last one's logits.
    `embeds` (1, T, H) and `vision_blocks` describe the whole prompt."""
    n = ids.numel()
    logits = None
    if held < n:
        logits = prefill(model, ids[held:], cache, start=held, chunk_size=chunk_size,
                         embeds=None if embeds is None else embeds[:, held:], vision_blocks=vision_blocks,
                         expose=expose)
    rest = list(kept)[max(0, held - n):]
    if rest:
        logits = prefill(model, torch.tensor(rest, device=ids.device), cache, start=max(held, n),
                         chunk_size=chunk_size, expose=expose)
    if logits is None:
        raise ValueError("nothing left to prefill: the cache holds the whole prompt")
    return logits


@dataclass
class Caching:
    """Prompt caching for one generation: the pool it leases its cache from and keeps it in, and
    what its prompt holds (ids and media, prompt_cache.Held)."""

    pool: PromptCache
    prompt: Held
    reused: int | None = None  # prompt positions its first lease found held (a rollback's lease is not)

    def lease(self, model: TextModel, kept: Sequence[int], max_len: int, spare: int = 0) -> tuple[KVCache, int]:
        """A cache for the prompt followed by `kept`, and how many of those positions it holds."""
        cache, held = self.pool.lease(model, self.prompt.then(kept), max_len, spare=spare)
        if self.reused is None:
            self.reused = self.pool.reused = min(held, len(self.prompt.ids))
        return cache, held

    def prefilled(self, cache: KVCache, end: int) -> None:
        """`cache` holds the prompt (and kept tokens) up to `end`: from now on its rings keep what
        a rewind to shortly before `end` needs, as the next prompt may part from this one there
        (KVCache.mark)."""
        if self.pool.capacity:
            cache.mark(end)

    def keep(self, cache: KVCache, written: list[int]) -> None:
        """Keep `cache`, which holds `written` (ids, position by position: the prompt's as the
        model read them, media placeholders as pad ids, then generated ones)."""
        n = len(self.prompt.ids)
        ids = self.prompt.ids[: len(written)] + written[n:]  # the placeholders, as prompts are compared
        self.pool.keep(cache, Held(ids, self.prompt.media, self.prompt.soft_positions))


class GenerationCache:
    """One generation's KV cache and the ids at its positions, which prompt caching keeps
    together: `fill` leases (or makes) the cache and prefills it, each forward is bracketed by
    `begin` and `wrote` (a forward that raises leaves nothing to keep), `keep` hands it over."""

    def __init__(self, model: TextModel, caching: Caching | None, max_len: int, spare: int = 0):
        self.model, self.caching, self.max_len, self.spare = model, caching, max_len, spare
        self.cache: KVCache | None = None
        self.written: list[int] = []  # the ids at the cache's positions
        self._before: list[int] = []  # `written` while a forward is under way
        self.prefilled = 0  # positions the last `fill` call ran through the model

    def fill(self, ids: torch.Tensor, kept: Sequence[int] = (), *, chunk_size: int = PREFILL_CHUNK,
             embeds: torch.Tensor | None = None, vision_blocks: torch.Tensor | None = None,
             expose: Exposed | None = None, budget: int | None = None) -> torch.Tensor | None:
        """The cache holding the prompt `ids` then the `kept` generated tokens; the last one's
        logits. A second fill (a rollback) rewinds the cache to what it shares with them where
        the rings allow it, else takes another (leased with prompt caching, else fresh).

        With a `budget` (a text prompt, nothing kept), a call prefills at most that many positions
        and returns None until the call that reaches the end; each goes on where the last one
        stopped, in the chunks one call would run when `budget` is a multiple of `chunk_size`."""
        target = ids.tolist() + list(kept)
        held = 0
        if self.cache is not None:
            held = common_prefix(self.written, target, len(target) - 1)
            if held == 0 or not self.cache.rolls_back_to(held):
                self.cache, held = None, 0
            else:
                self.cache.rewind(held)
        if self.cache is None:
            if self.caching is not None:
                self.cache, held = self.caching.lease(self.model, kept, self.max_len, self.spare)
            else:
                self.cache = make_cache(self.model.config, self.max_len, dtype=self.model.dtype,
                                        device=self.model.device, spare=self.spare)
        self.written = []
        if budget is not None and embeds is None and vision_blocks is None and not kept and held + budget < len(target):
            end = held + budget
            prefill_rest(self.model, self.cache, held, ids[:end], chunk_size=chunk_size, expose=expose)
            self.written, self.prefilled = target[:end], budget
            return None
        logits = prefill_rest(self.model, self.cache, held, ids, kept, chunk_size=chunk_size, embeds=embeds,
                              vision_blocks=vision_blocks, expose=expose)
        self.written, self.prefilled = target, len(target) - held
        if self.caching is not None:
            self.caching.prefilled(self.cache, len(target))
        return logits

    def begin(self) -> None:
        """A forward that writes to the cache starts."""
        self._before, self.written = self.written, []

    def wrote(self, position: int, tokens: Sequence[int]) -> None:
        """It wrote `tokens` from `position` on, after the positions before it."""
        self.written, self._before = self._before[:position] + list(tokens), []

    def truncate(self, length: int) -> None:
        """Forget positions >= `length` (rejected drafts)."""
        self.cache.truncate(length)
        del self.written[length:]

    def keep(self) -> None:
        """The generation is over: its cache goes to the prompt cache (if whole) and leaves this one."""
        if self.caching is not None and self.cache is not None and self.written:
            self.caching.keep(self.cache, self.written)
        self.cache, self.written = None, []


@torch.inference_mode()
def decode_step(model: TextModel, token: int, position: int, cache: KVCache) -> torch.Tensor:
    device = model.device
    ids = torch.tensor([[token]], device=device)
    positions = torch.tensor([position], device=device)
    return model(ids, positions, cache, last_only=True)[0, -1].float()


ROLLBACK = Verdict.ROLLBACK.value


def cache_length(model: TextModel, prompt: list[int], params: SamplingParams, context: int | None) -> int:
    """Positions one generation's cache needs, `min(len(prompt) + max_tokens, context)`, after
    checking that the prompt is usable."""
    cfg = model.config
    context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if not prompt:
        raise ValueError("the prompt is empty")
    check_prompt_fits(len(prompt), context)
    return min(len(prompt) + params.max_tokens, context)


def settle(token: int, control: OutputControl, stop_ids: frozenset[int], params: SamplingParams,
           n_prompt: int, max_len: int) -> str | None:
    """What one sampled token does to a generation: a finish reason ("stop", "loop",
    "length"), ROLLBACK (the control cut `generated` back: rebuild the cache from it and sample
    again), or None to go on. A stop token is not kept; every other token is pushed to `control`."""
    if control.stops_on(token, stop_ids):
        return "stop"
    verdict = control.push(token)
    if verdict is not None:
        return verdict.value
    position = n_prompt + len(control.generated) - 1  # where the newest token goes
    # The last position the cache holds: a token there is kept, but none comes after it (one had,
    # sampled from its logits: 129 tokens in a 128-token context, where the server stopped at 128).
    if len(control.generated) >= params.max_tokens or position >= max_len - 1:
        return "length"
    if control.grammar_done:
        return "stop"
    return None


def generate_step(
    model: TextModel,
    prompt: list[int],
    params: SamplingParams,
    *,
    stop_ids: frozenset[int] = frozenset(),
    context: int | None = None,
    chunk_size: int = PREFILL_CHUNK,
    embeds: torch.Tensor | None = None,
    vision_blocks: torch.Tensor | None = None,
    control: OutputControl | None = None,
    caching: Caching | None = None,
    seen_prompt: Sequence[int] | None = None,
) -> Generator[int, None, str]:
    """Yield generated token ids; return the finish reason ("stop", "length", "loop").

    Stops at a stop id (not yielded), `max_tokens`, the context end, or a completed grammar.
    `control` carries the grammar and loop guard (see control.py): with a guard, tokens are
    yielded late so that a detected loop can be rolled back before it reaches the caller.
    The cache is sized for `min(len(prompt) + max_tokens, context)` positions; with `caching`
    it is leased from a prompt cache (only what a kept cache does not hold is prefilled) and
    kept there when the generation ends. `seen_prompt`: the prompt as the penalties count it,
    where `prompt` holds pads in place of media placeholders (default: `prompt`).
    """
    max_len = cache_length(model, prompt, params, context)
    device = model.device
    sampler = Sampler(params)
    ids = torch.tensor(prompt, device=device)
    seen = torch.tensor(prompt if seen_prompt is None else list(seen_prompt), dtype=torch.long)
    control = control or OutputControl()
    if params.max_tokens == 0:
        return "length"
    state = GenerationCache(model, caching, max_len)
    inputs = dict(chunk_size=chunk_size, embeds=embeds, vision_blocks=vision_blocks)
    try:
        logits = state.fill(ids, **inputs)
        while True:
            gen = torch.tensor(control.generated, dtype=torch.long)
            token = sampler(control.mask(logits), torch.cat((seen, gen)), gen)
            outcome = settle(token, control, stop_ids, params, len(prompt), max_len)
            if outcome == ROLLBACK:
                logits = state.fill(ids, control.generated, **inputs)
                continue
            yield from control.release()
            if outcome is not None:
                break
            position = len(prompt) + len(control.generated) - 1
            state.begin()
            logits = decode_step(model, token, position, state.cache)
            state.wrote(position, [token])
        yield from control.flush()
        return outcome
    finally:
        state.keep()
