"""Continuous batching: many requests decode together, one token each per step.

Each request owns its KV cache; a step runs the decoder once for every active request — the
matmuls (where a CPU spends its time reading weights) see all rows at once, attention runs per
row over its own cache. New requests are prefilled when they join; finished or cancelled ones
leave at once and free their cache. Greedy output equals running the request alone (up to the
float summation order of batched matmuls).

A long text prompt is prefilled a few chunks a step (at most `prefill_per_step` positions a step,
all requests together), so the requests decoding meanwhile go on getting a token a step, and a
request cancelled while its prompt is read in leaves within a step; the chunks are the ones one
prefill would run, so the result is the same. A prompt with images, audio or video is still
prefilled in the step that admits it (a cut must not split an image block).

A request's cache is leased from the engine's prompt cache (prompt_cache.py) and kept there when
it finishes or is cancelled: a request that starts as a finished one did (a chat's next turn)
prefills only the rest.

A request decoding alone takes the single-request path (the native whole-token step where it
applies) and, with a drafter, speculative rounds (speculative.py): draft k tokens, verify them in
one forward, settle each as `_sample` settles a sampled token. Each request measures whether its
rounds pay and stops speculating when they do not; when others join, it decodes in the batch again.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .control import OutputControl
from .generate import PREFILL_CHUNK, ROLLBACK, Caching, GenerationCache, check_prompt_fits, settle
from .llm import LLM, Prompt
from .model.assistant import Assistant, check_pairing
from .model.text import Exposed
from .prompt_cache import PromptCache
from .sampling import Sampler, SamplingParams
from .speculative import (
    SpeculationConfig,
    SpeculationStats,
    accept_or_resample,
    draft_depth,
    draft_tokens,
    draw,
    for_params,
    window_verdict,
)


PREFILL_PER_STEP = 2 * PREFILL_CHUNK  # prompt positions one step prefills, all requests together (text prompts)


@dataclass(frozen=True)
class Event:
    """One step's outcome for one request: a token, and/or the reason it finished."""

    request_id: int
    token: int | None  # None when the request finished without a new token (stop id, cancel)
    finish_reason: str | None = None  # "stop", "length", "loop", "cancelled", "error"
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    error: Exception | None = None  # with "error": what ended this request (the others go on)
    cached_tokens: int | None = None  # prompt positions the request's cache held when it was admitted


@dataclass
class _Request:
    id: int
    prompt: Prompt
    params: SamplingParams
    top_logprobs: int | None
    stop_ids: frozenset[int]
    sampler: Sampler
    control: OutputControl
    state: GenerationCache | None = None  # its KV cache and the ids it holds, from admission on
    fills: int = 0  # times its cache was filled (a rollback fills it again, maybe the same cache)
    position: int = 0  # where the next token goes
    max_len: int = 0
    scores: list[tuple] = field(default_factory=list)  # (logprob, top) per generated token
    last: int | None = None  # sampled, not yet fed (None while its prompt is being prefilled)
    speculation: _Speculation | None = None  # with a drafter: this request's rounds so far
    exposed: Exposed | None = None  # the target forward that produced `last`, when it ran alone

    @property
    def cache(self) -> KVCache | None:
        return self.state.cache if self.state is not None else None

    @property
    def cached_tokens(self) -> int | None:
        """Prompt positions its cache held when it was admitted."""
        return self.state.caching.reused if self.state is not None else None


@dataclass
class _Speculation:
    """One request's speculative decoding: on until its rounds stop paying (speculative.py)."""

    config: SpeculationConfig
    on: bool = True
    probes: int = 0  # plain steps taken alone while on (SpeculationConfig.probe says which are timed)
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    window: SpeculationStats = field(default_factory=SpeculationStats)  # rounds since the last check


class BatchEngine:
    """Not thread-safe: one model thread calls `add`, `cancel` and `step`."""

    def __init__(self, llm: LLM, max_batch: int = 8, context: int | None = None, chunk_size: int = PREFILL_CHUNK,
                 drafter: Assistant | None = None, speculation: SpeculationConfig = SpeculationConfig(),
                 prompt_caches: int = 4, prefill_per_step: int = PREFILL_PER_STEP):
        if prefill_per_step < chunk_size or prefill_per_step % chunk_size:
            raise ValueError(f"prefill_per_step {prefill_per_step} must be a multiple of the chunk size {chunk_size}")
        self.llm = llm
        self.prompt_cache = PromptCache(prompt_caches)  # finished requests' caches, for the next prompts
        self.drafter = drafter
        self.speculation = speculation
        self._producers = check_pairing(drafter.config, llm.config) if drafter is not None else None
        self.max_batch = max_batch
        cfg = llm.config
        self.context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.chunk_size, self.prefill_per_step = chunk_size, prefill_per_step
        self._ids = itertools.count(1)
        self.waiting: list[_Request] = []
        self.active: list[_Request] = []

    def add(self, prompt: Prompt, params: SamplingParams, top_logprobs: int | None = None,
            control: OutputControl | None = None) -> int:
        """Queue a request; raises ContextOverflow at once if its prompt cannot fit. `control`
        carries its grammar and loop guard (control.py)."""
        if not prompt.ids:
            raise ValueError("the prompt is empty")
        check_prompt_fits(len(prompt.ids), self.context)
        rid = next(self._ids)
        self.waiting.append(_Request(rid, prompt, params, top_logprobs, self.llm.stop_ids(params), Sampler(params),
                                     control or OutputControl()))
        return rid

    def cancel(self, request_id: int) -> bool:
        """Drop a request (its cache goes to the prompt cache). True if it was known."""
        for pool in (self.waiting, self.active):
            for r in pool:
                if r.id == request_id:
                    pool.remove(r)
                    if r.state is not None:
                        r.state.keep()
                    return True
        return False

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def step(self) -> list[Event]:
        """Advance every decoding request by a token, then prefill up to `prefill_per_step` prompt
        positions: the prompts under way first, then waiting requests admitted while there is
        room (a request whose prompt is all in samples its first token)."""
        events: list[Event] = []
        running = [r for r in self.active if r.last is not None]
        if len(running) == 1:
            events += self._guarded(running[0], self._advance_alone, running[0])
        elif running:
            events += self._decode(running)
        budget = self.prefill_per_step
        for r in [r for r in self.active if r.last is None]:  # prompts under way, oldest first
            if budget < self.chunk_size:
                return events
            events += self._guarded(r, self._prefill_some, r, budget)
            budget -= r.state.prefilled if r.state is not None else 0
        while self.waiting and len(self.active) < self.max_batch and budget >= self.chunk_size:
            r = self.waiting.pop(0)
            events += self._guarded(r, self._admit, r, budget)
            budget -= r.state.prefilled if r.state is not None else 0
        return events

    def _guarded(self, r: _Request, work, *args) -> list[Event]:
        """`work`'s events, or, where it raises (a grammar that cannot go on, a prompt's own
        problem), this request's end with the error: the batch's other requests go on."""
        try:
            return work(*args)
        except Exception as e:  # noqa: BLE001 - handed to this request's caller
            if r in self.active:
                self.active.remove(r)
            r.state = None  # whatever its cache holds, it is not kept
            return [Event(r.id, None, "error", error=e)]

    # -- internals -----------------------------------------------------------------------------

    @torch.inference_mode()
    def _admit(self, r: _Request, budget: int) -> list[Event]:
        r.max_len = min(len(r.prompt.ids) + r.params.max_tokens, self.context)
        if r.params.max_tokens == 0:
            return [Event(r.id, None, "length")]
        self.active.append(r)
        if self.drafter is not None:
            r.speculation = _Speculation(for_params(self.speculation, r.params))
        return self._prefill_some(r, budget)

    @torch.inference_mode()
    def _prefill_some(self, r: _Request, budget: int) -> list[Event]:
        """Up to `budget` more positions of the request's prompt (a multiple of the chunk size:
        the same chunks as one prefill); its first token once the prompt is all in."""
        logits = self._prefill(r, budget - budget % self.chunk_size)
        return [] if logits is None else self._sample(r, logits)

    def _prefill(self, r: _Request, budget: int | None = None) -> torch.Tensor | None:
        """The request's cache holding the prompt and the kept generated tokens (leased from the
        prompt cache: only what it does not hold yet is prefilled); the next logits. With a
        `budget`, None while the prompt is not all in (GenerationCache.fill)."""
        llm, model = self.llm, self.llm.model
        if r.state is None:
            # Speculative rounds may write k + 1 positions that are then rolled back: the sliding
            # rings keep that many spare slots, so no rejected token evicts a key a later query sees.
            spare = self.speculation.num_draft + 1 if r.speculation is not None else 0
            caching = Caching(self.prompt_cache, llm.held(r.prompt, self.prompt_cache))
            r.state = GenerationCache(model, caching, r.max_len, spare)
        text_ids, embeds, blocks = llm._inputs(r.prompt, r.state.caching.prompt, self.prompt_cache)
        kept = r.control.generated
        r.exposed = Exposed() if r.speculation is not None else None
        logits = r.state.fill(text_ids, kept, chunk_size=self.chunk_size, embeds=embeds, vision_blocks=blocks,
                              expose=r.exposed, budget=budget)
        if logits is None:
            return None
        r.fills += 1
        r.position = len(r.prompt.ids) + len(kept)
        return logits

    @torch.inference_mode()
    def _decode(self, rows: list[_Request]) -> list[Event]:
        model = self.llm.model
        tokens = torch.tensor([[r.last] for r in rows], device=model.device)
        positions = torch.tensor([r.position for r in rows], device=model.device)
        for r in rows:
            r.state.begin()
        logits = model(tokens, positions, [r.cache for r in rows], last_only=True)[:, -1].float()
        events = []
        for r, row in zip(rows, logits):
            r.state.wrote(r.position, [r.last])
            r.position += 1
            r.exposed = None  # a batched forward exposes nothing to draft from
            events += self._guarded(r, self._sample, r, row)
        return events

    @torch.inference_mode()
    def _decode_alone(self, r: _Request, expose: bool = False) -> list[Event]:
        """One token of a request decoding alone: its own cache, so the native whole-token step
        runs where it applies; `expose`: the forward is exposed to draft from next."""
        model = self.llm.model
        r.exposed = Exposed() if expose else None
        tokens = torch.tensor([[r.last]], device=model.device)
        positions = torch.tensor([r.position], device=model.device)
        r.state.begin()
        logits = model(tokens, positions, r.cache, last_only=True, expose=r.exposed)[0, -1].float()
        r.state.wrote(r.position, [r.last])
        r.position += 1
        return self._sample(r, logits)

    def _advance_alone(self, r: _Request) -> list[Event]:
        """A plain step or, with a drafter that still pays, a speculative round."""
        spec = r.speculation
        on = spec is not None and spec.on
        depth = draft_depth(spec.config, r.max_len, r.position, r.params, len(r.control.generated)) if on else 0
        if depth < 1 or r.exposed is None or spec.probes < spec.config.probe_steps:
            timed, exposed = spec.config.probe(spec.probes) if on else (False, False)
            began = time.perf_counter()
            events = self._decode_alone(r, expose=exposed)
            if timed:
                spec.stats.plain_steps += 1
                spec.stats.plain_seconds += time.perf_counter() - began
            if on:
                spec.probes += 1
            return events
        return self._speculate(r, depth)

    @torch.inference_mode()
    def _speculate(self, r: _Request, depth: int) -> list[Event]:
        """One round: up to `depth` drafts after `r.last`, verified in one forward; each token settled by
        `_sample` with the accepted (or resampled, or bonus) token; rejected positions rolled back."""
        model, spec, control = self.llm.model, r.speculation, r.control
        began = time.perf_counter()
        position, fills = r.position, r.fills
        prompt = torch.tensor(r.prompt.ids, dtype=torch.long)

        def history(extra=()) -> tuple[torch.Tensor, torch.Tensor]:
            generated = torch.tensor(control.generated + list(extra), dtype=torch.long)
            return torch.cat((prompt, generated)), generated

        drafts, proposals = draft_tokens(model, self.drafter, r.exposed, self._producers, r.last, position, depth,
                                         r.sampler, history)
        depth = len(drafts)  # fewer where the drafter's logits were not finite
        verified = Exposed()
        ids = torch.tensor([[r.last, *drafts]], device=model.device)
        positions = torch.arange(position, position + depth + 1, device=model.device)
        r.state.begin()
        logits = model(ids, positions, r.cache, expose=verified)[0].float()  # (depth + 1, V)
        r.state.wrote(position, [r.last, *drafts])
        events: list[Event] = []
        accepted = produced = 0
        for i in range(depth + 1):
            p = r.sampler.distribution(control.mask(logits[i]), *history())
            if i < depth:
                token, is_draft = accept_or_resample(p, proposals[i], drafts[i], r.sampler.generator)
            else:
                token, is_draft = draw(p, r.sampler.generator), False  # the bonus token
            produced += 1
            accepted += is_draft
            events += self._sample(r, logits[i], chosen=token)
            if r not in self.active or r.fills != fills:  # finished, or rolled back and re-prefilled
                break
            if not is_draft:  # a replacement or the bonus: the newest token, not in the cache
                r.state.truncate(position + i + 1)
                r.position = position + i + 1
                r.exposed = Exposed(hidden=verified.hidden[:, i : i + 1], kv=verified.kv)
                break
        seconds = time.perf_counter() - began
        for counters in (spec.stats, spec.window):
            counters.record_round(depth, accepted, produced, seconds)
        verdict = window_verdict(spec.stats, spec.window, spec.config, len(control.generated))
        if verdict is not None:
            spec.on = verdict
            spec.window = SpeculationStats()
        return events

    def _sample(self, r: _Request, logits: torch.Tensor, chosen: int | None = None) -> list[Event]:
        """Sample the request's next token (or take `chosen`, a speculative round's); the events of
        the tokens that may leave now."""
        control, n_prompt = r.control, len(r.prompt.ids)
        while True:
            generated = torch.tensor(control.generated, dtype=torch.long)
            seen = torch.cat((torch.tensor(r.prompt.ids, dtype=torch.long), generated))
            token = r.sampler(control.mask(logits), seen, generated) if chosen is None else chosen
            chosen = None  # after a rollback the fresh logits are sampled
            if control.stops_on(token, r.stop_ids):  # not kept: the stop token's scores only
                return self._finish(r, "stop", self._score(r, logits, token))
            outcome = settle(token, control, r.stop_ids, r.params, n_prompt, r.max_len)
            r.scores.append(self._score(r, logits, token))
            del r.scores[len(control.generated):]
            if outcome != ROLLBACK:
                break
            logits = self._prefill(r)
        r.last = token
        events = self._events(r, control.release())
        return events if outcome is None else events + self._finish(r, outcome)

    def _score(self, r: _Request, logits: torch.Tensor, token: int) -> tuple:
        if r.top_logprobs is None:
            return None, ()
        lp = torch.log_softmax(logits.float().cpu(), dim=-1)
        logprob = float(lp[token])
        top = ()
        if r.top_logprobs:
            vals, idx = torch.topk(lp, r.top_logprobs)
            top = tuple((int(i), float(v)) for i, v in zip(idx, vals))
        return (logprob if math.isfinite(logprob) else None), top

    def _events(self, r: _Request, tokens: list[int]) -> list[Event]:
        first = r.control.emitted - len(tokens)
        return [Event(r.id, t, None, *r.scores[first + k], cached_tokens=r.cached_tokens) for k, t in enumerate(tokens)]

    def _finish(self, r: _Request, reason: str, score: tuple = (None, ())) -> list[Event]:
        """Leave the batch: what was held back, then an event with the reason (and the stop
        token's scores)."""
        if r in self.active:
            self.active.remove(r)
        if r.state is not None:
            r.state.keep()
        return self._events(r, r.control.flush()) + [Event(r.id, None, reason, *score,
                                                           cached_tokens=r.cached_tokens)]
