"""Speculative decoding with a Gemma 4 MTP drafter (`model.assistant`, spec 7).

One round, with the newest token `t` at position P (not yet in the target's cache): the drafter
proposes k tokens from the target's latest hidden state and keys/values; the target scores
`[t, d1..dk]` in ONE forward; tokens are then settled left to right, each exactly as
`generate_step` settles a sampled token (same stop, length, grammar and loop rules):

* the target's distribution p at each position is the sampler's (penalties, temperature, top-k,
  top-p, min-p, grammar mask), and so is the drafter's q for its draft;
* a draft d is accepted with probability min(1, p(d) / q(d)); otherwise the token is drawn from
  normalize(max(0, p - q)) and the round ends; after k acceptances a bonus token is drawn from p.
  The output distribution is exactly the target's; greedy (p, q one-hot) accepts while the
  target's argmax equals the draft.

Rejected tokens are rolled back: full caches forget positions, sliding rings (k + 1 spare slots)
mark them empty. Speculation that does not pay (no accepted drafts, or slower per token than
plain decoding, measured over a window of rounds) switches itself off for the rest of the
generation.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace

import torch

from .control import OutputControl
from .generate import PREFILL_CHUNK, ROLLBACK, Caching, GenerationCache, cache_length, settle
from .model.assistant import Assistant, check_pairing
from .model.text import Exposed, TextModel
from .sampling import UnusableLogits, Sampler, SamplingParams, greedy_token


@dataclass(frozen=True)
class SpeculationConfig:
    num_draft: int = 4  # k: drafted tokens per round
    check_every: int | None = 8  # rounds per fall-back check; None never falls back
    min_acceptance: float = 0.0  # fall back when a window's acceptance rate is at or below this
    compare_speed: bool = True  # also fall back when a token costs more than a plain decode step
    probe_steps: int = 4  # plain decode steps before the first round (see `probe`)

    def __post_init__(self) -> None:
        if self.num_draft < 1:
            raise ValueError("num_draft must be >= 1")
        if self.check_every is not None and self.check_every < 1:
            raise ValueError("check_every must be >= 1 (or None)")
        if not 0 <= self.min_acceptance < 1:
            raise ValueError("min_acceptance must be in [0, 1)")
        if self.probe_steps < 0 or (self.compare_speed and self.probe_steps < 3):
            raise ValueError("probe_steps must be >= 3 when compare_speed is on (the first and last are not timed)")

    def probe(self, probes: int) -> tuple[bool, bool]:
        """(timed, exposed) for a plain step taken while speculation is on, after `probes` such
        steps. The first pays for warming up; the one before a round exposes what the drafter
        reads (on the CPU that forgoes the native whole-token step, so it is ~3x slower than
        plain decoding); the steps between are timed as plain decoding really runs."""
        exposed = probes >= self.probe_steps - 1
        return 0 < probes and not exposed, exposed


@dataclass
class SpeculationStats:
    """What one generation's speculation did (filled while it runs)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    round_tokens: int = 0  # tokens the rounds produced
    round_seconds: float = 0.0  # time in rounds: drafting, verifying, settling
    plain_steps: int = 0  # timed plain decode steps (forward and sampling)
    plain_seconds: float = 0.0
    fell_back_at: int | None = None  # generated tokens when speculation switched off

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def record_round(self, drafted: int, accepted: int, tokens: int, seconds: float) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.round_tokens += tokens
        self.round_seconds += seconds

    def pays(self, config: SpeculationConfig, plain_step: float | None) -> bool:
        """Whether these rounds beat plain decoding (`plain_step`: seconds per plain token)."""
        if self.acceptance <= config.min_acceptance:
            return False
        if config.compare_speed and plain_step is not None:
            return self.round_seconds / self.round_tokens <= plain_step
        return True


# Acceptance below which a seeded sampled generation stops drafting (it cannot time its rounds: see
# `for_params`). With 4 drafts a round, a quarter accepted makes ~1.3 tokens a round.
SEEDED_MIN_ACCEPTANCE = 0.25


def for_params(config: SpeculationConfig, params: SamplingParams) -> SpeculationConfig:
    """The speculation one generation runs. A seeded sampled one must give the same text each run,
    but rounds draw from the generator otherwise than plain steps, so a switch timed against plain
    decoding, which falls at another token from run to run, changed the text: it falls back on
    acceptance alone (deterministic for the seed)."""
    if params.seed is None or params.temperature == 0 or not config.compare_speed:
        return config
    return replace(config, compare_speed=False, min_acceptance=max(config.min_acceptance, SEEDED_MIN_ACCEPTANCE))


def draft_depth(config: SpeculationConfig, max_len: int, position: int, params: SamplingParams, generated: int) -> int:
    """Drafts a round may make after the newest token (at `position`, `generated` tokens so far):
    they must fit the cache and leave room for the bonus token within max_tokens."""
    return min(config.num_draft, max_len - 1 - position, params.max_tokens - generated - 1)


def window_verdict(stats: SpeculationStats, window: SpeculationStats, config: SpeculationConfig,
                   generated: int) -> bool | None:
    """None while `window` holds fewer than `config.check_every` rounds; then whether speculation
    goes on (the caller starts a new window). A fall-back is recorded in `stats`."""
    if config.check_every is None or window.rounds < config.check_every:
        return None
    plain_step = stats.plain_seconds / stats.plain_steps if stats.plain_steps else None
    if window.pays(config, plain_step):
        return True
    stats.fell_back_at = generated
    return False


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token from `probs`; a one-hot (greedy) distribution decides without drawing."""
    if int((probs > 0).sum()) == 1:
        return greedy_token(probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator) -> tuple[int, bool]:
    """One speculative-sampling decision (Leviathan et al. 2023; Chen et al. 2023). p: the
    target's distribution, q: the drafter's, `draft` drawn from q. Returns (token, whether it is
    the draft); the token is distributed exactly as p. One-hot p and q (greedy) decide without
    drawing."""
    ratio = float(p[draft]) / float(q[draft])
    if ratio >= 1.0 or (ratio > 0.0 and float(torch.rand((), generator=generator)) < ratio):
        return draft, True
    residual = (p - q).clamp_(min=0.0)
    total = float(residual.sum())
    return draw(residual / total if total > 0 else p, generator), False  # total 0: p == q up to rounding


@torch.inference_mode()
def draft_tokens(model: TextModel, drafter: Assistant, exposed: Exposed, producers, newest: int, position: int,
                 depth: int, sampler: Sampler, history) -> tuple[list[int], list[torch.Tensor]]:
    """Up to `depth` drafted tokens after `newest` (at `position`, not in the target's cache) and
    the distribution each was drawn from. `exposed`: the target forward that produced `newest`.
    Drafting stops where the drafter's logits are not finite: a broken drafter costs speed (its
    rounds accept nothing and switch it off), never the target's output."""
    ctx = drafter.context(exposed.kv, producers, position)
    hidden = exposed.hidden[:, -1:]
    token = newest
    drafts: list[int] = []
    proposals: list[torch.Tensor] = []
    for _ in range(depth):
        token_embed = model.embed(model.text_ids(torch.tensor([[token]], device=model.device)))
        logits, hidden = drafter(token_embed, hidden, ctx)
        try:
            q = sampler.distribution(logits[0, -1], *history(drafts))
        except UnusableLogits:
            break
        token = draw(q, sampler.generator)
        drafts.append(token)
        proposals.append(q)
    return drafts, proposals


def speculative_generate_step(
    model: TextModel,
    drafter: Assistant,
    prompt: list[int],
    params: SamplingParams,
    *,
    stop_ids: frozenset[int] = frozenset(),
    context: int | None = None,
    chunk_size: int = PREFILL_CHUNK,
    embeds: torch.Tensor | None = None,
    vision_blocks: torch.Tensor | None = None,
    control: OutputControl | None = None,
    speculation: SpeculationConfig = SpeculationConfig(),
    stats: SpeculationStats | None = None,
    caching: Caching | None = None,
    seen_prompt: Sequence[int] | None = None,
) -> Generator[int, None, str]:
    """`generate_step`'s contract (yields token ids, returns the finish reason, prompt caching,
    `seen_prompt`), with drafting.

    The sliding rings get `num_draft + 1` spare slots: k rejected tokens evict nothing a later
    query sees, and the drafter's inclusive window (one key more than the target's) stays whole.
    """
    producers = check_pairing(drafter.config, model.config)
    speculation = for_params(speculation, params)
    max_len = cache_length(model, prompt, params, context)
    if params.max_tokens == 0:
        return "length"
    k = speculation.num_draft
    stats = stats if stats is not None else SpeculationStats()
    control = control or OutputControl()
    sampler = Sampler(params)
    device = model.device
    ids = torch.tensor(prompt, device=device)
    seen = torch.tensor(prompt if seen_prompt is None else list(seen_prompt), dtype=torch.long)
    n_prompt = len(prompt)

    def history(extra: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen, generated) ids for the sampler's penalties, with `extra` tokens appended."""
        gen = torch.tensor(control.generated + list(extra), dtype=torch.long)
        return torch.cat((seen, gen)), gen

    state = GenerationCache(model, caching, max_len, spare=k + 1)

    def start(keep: list[int]) -> tuple[torch.Tensor, Exposed]:
        exposed = Exposed()
        logits = state.fill(ids, keep, chunk_size=chunk_size, embeds=embeds, vision_blocks=vision_blocks,
                            expose=exposed)
        return logits, exposed

    @torch.inference_mode()
    def forward(tokens: list[int], position: int, exposed: Exposed | None) -> torch.Tensor:
        state.begin()
        positions = torch.arange(position, position + len(tokens), device=device)
        logits = model(torch.tensor([tokens], device=device), positions, state.cache, expose=exposed)[0].float()
        state.wrote(position, tokens)
        return logits

    try:
        pending, exposed = start([])
        speculating = True
        probes = 0  # plain steps taken so far while speculating is on
        plain_began: float | None = None  # a timed plain step is under way
        window = SpeculationStats()  # rounds since the last fall-back check
        reason = None
        while reason is None:
            if pending is not None:  # sample the next token from the target's logits, as generate_step does
                token = sampler(control.mask(pending), *history())
                if plain_began is not None:
                    stats.plain_steps += 1
                    stats.plain_seconds += time.perf_counter() - plain_began
                    plain_began = None
                outcome = settle(token, control, stop_ids, params, n_prompt, max_len)
                if outcome == ROLLBACK:
                    pending, exposed = start(control.generated)
                    continue
                yield from control.release()
                if outcome is not None:
                    reason = outcome
                    break
                pending = None
            position = n_prompt + len(control.generated) - 1  # the newest token's, not yet in the cache
            newest = control.generated[-1]
            depth = draft_depth(speculation, max_len, position, params, len(control.generated))
            if not speculating or probes < speculation.probe_steps or depth < 1:
                timed, exposing = speculation.probe(probes) if speculating else (False, False)
                if timed:
                    plain_began = time.perf_counter()
                probes += speculating
                exposed = Exposed() if exposing else None
                pending = forward([newest], position, exposed)[-1]
                continue

            began = time.perf_counter()
            drafts, proposals = draft_tokens(model, drafter, exposed, producers, newest, position, depth, sampler, history)
            depth = len(drafts)
            verified = Exposed()
            target_logits = forward([newest, *drafts], position, verified)  # (depth + 1, V)
            produced, accepted, released = 0, 0, []
            for i in range(depth + 1):
                p = sampler.distribution(control.mask(target_logits[i]), *history())
                if i < depth:
                    token, is_draft = accept_or_resample(p, proposals[i], drafts[i], sampler.generator)
                else:
                    token, is_draft = draw(p, sampler.generator), False  # the bonus token
                produced += 1
                accepted += is_draft
                outcome = settle(token, control, stop_ids, params, n_prompt, max_len)
                if outcome == ROLLBACK:
                    pending, exposed = start(control.generated)
                    break
                released += control.release()
                if outcome is not None:
                    reason = outcome
                    break
                if not is_draft:  # a replacement or the bonus: the newest token, not in the cache
                    state.truncate(position + i + 1)
                    exposed = Exposed(hidden=verified.hidden[:, i : i + 1], kv=verified.kv)
                    break
            seconds = time.perf_counter() - began
            for counters in (stats, window):
                counters.record_round(depth, accepted, produced, seconds)
            yield from released  # after the clock stopped: the caller's time is not the round's
            verdict = window_verdict(stats, window, speculation, len(control.generated))
            if verdict is not None:
                speculating = verdict
                window = SpeculationStats()
        yield from control.flush()
        return reason
    finally:
        state.keep()
