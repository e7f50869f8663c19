"""What may be sampled next, and what may leave: one generation's grammar, loop guard and holdback.

Both engines (`generate.generate_step` for one request, `batching.BatchEngine` for many) drive an
`OutputControl` the same way, once per sampled token::

    logits = control.mask(logits)                # loop-guard bans here, grammar mask
    token = sample(logits)
    if control.stops_on(token, stop_ids): finish "stop"
    verdict = control.push(token)                # None, LOOP_STOP or ROLLBACK
    ROLLBACK: rebuild the cache from prompt + control.generated and sample again
    LOOP_STOP: finish "loop" (control.generated keeps one copy of what repeated)
    for t in control.release(): emit t           # tokens older than the holdback
    ... at the end: for t in control.flush(): emit t

With a loop guard, tokens leave `holdback` tokens late so a loop can be cut before the caller saw it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from enum import Enum

import torch

from .loopguard import LoopEvent, LoopGuard, LoopGuardConfig

GRAMMAR_LOWINFO_TOKENS = 48  # digits/whitespace repeated this long inside a grammar is a loop
# Inside a grammar, a number is closed after this many number tokens: small models write
# "1500000000000..." digits that are not periodic (the loop guard cannot see them) until
# max_tokens cuts the JSON. Gemma's tokenizers split digits, so this is about 24 characters.
MAX_NUMBER_DIGITS = 24  # characters
NUMBER_CHARS = "0123456789.eE+-"
DEFAULT_HOLDBACK = 64


class Verdict(Enum):
    LOOP_STOP = "loop"  # finish now, reason "loop"
    ROLLBACK = "rollback"  # `generated` was cut back: rebuild the cache and sample again


def make_loop_guard(config: LoopGuardConfig | str | bool | None, constrained: bool) -> LoopGuard | None:
    """A guard for one generation, or None when off (also False; True is the default guard).
    Inside a grammar, a run of digits or whitespace is the usual collapse (a number or
    indentation that never ends), not padding: there it counts like any other repetition."""
    if isinstance(config, bool):  # (it had failed on "'bool' object has no attribute 'policy'")
        config = LoopGuardConfig() if config else None
    elif isinstance(config, str):
        if config not in ("recover", "stop", "off"):
            raise ValueError(f"loop_guard={config[:40]!r} is not 'recover', 'stop' or 'off'")
        config = LoopGuardConfig(policy=config)
    elif config is not None and not isinstance(config, LoopGuardConfig):
        raise TypeError(f"loop_guard must be 'recover', 'stop', 'off', a bool or a LoopGuardConfig, "
                        f"not {type(config).__name__}")
    if config is None or config.policy == "off":
        return None
    if constrained:
        config = replace(config, lowinfo_min_tokens=min(config.lowinfo_min_tokens, GRAMMAR_LOWINFO_TOKENS))
    return LoopGuard(config)


def _remove_if_choice_remains(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """`logits` with `ids` set to -inf, unless that would leave no token at all (then `logits`
    itself comes back)."""
    removed = logits.clone()
    removed[ids] = float("-inf")
    return removed if torch.isfinite(removed).any() else logits


class OutputControl:
    """Per-generation state: the generated tokens, how many have left, grammar and loop guard."""

    def __init__(self, grammar=None, guard: LoopGuard | None = None,
                 piece: Callable[[int], str] | None = None, holdback: int = DEFAULT_HOLDBACK,
                 number_ids: frozenset[int] = frozenset()):
        self.grammar = grammar  # constrain.GrammarState | None
        self.guard = guard
        self.piece = piece
        # tokens made of number characters only -> their length (more are learnt as seen)
        self.number_ids: dict[int, int] = dict.fromkeys(number_ids, 1)
        self.delay = holdback if guard is not None else 0
        self.generated: list[int] = []
        self.emitted = 0  # generated tokens already released
        self.loop: LoopEvent | None = None  # the last loop seen (stop or recovered)
        # Loops starting at or before this index are the grammar's own (a fixed-size array of
        # zeros): a rollback there found only the banned token allowed, so they are not cut again.
        self._structural = -1

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The grammar's mask, then the number cap and the loop guard's bans where they leave a
        token to choose: where the grammar allows only what they would remove (the "," between
        two rows of a fixed-size array), the grammar wins and the guard may cut again later."""
        if self.grammar is not None:
            logits = self.grammar.mask(logits)
            # (digits in a JSON string are data, a serial number, not a number)
            if self.number_ids and not self.grammar.in_json_string and self._number_run() >= MAX_NUMBER_DIGITS:
                logits = _remove_if_choice_remains(logits, sorted(self.number_ids))  # after "1e": a digit
        if self.guard is not None:
            banned = self.guard.banned_at(len(self.generated))
            if banned:
                kept = _remove_if_choice_remains(logits, list(banned))
                if kept is logits and self.loop is not None:  # the grammar demands the repetition
                    self._structural = max(self._structural, self.loop.start)
                logits = kept
        return logits

    def _number_run(self) -> int:
        """Characters of the number at the end of the output (0 when it does not end in one)."""
        n = 0
        for token in reversed(self.generated[-MAX_NUMBER_DIGITS:]):
            if token not in self.number_ids:
                text = self.piece(token) if self.piece is not None else ""
                if not text or not set(text) <= set(NUMBER_CHARS):
                    break
                self.number_ids[token] = len(text)
            n += self.number_ids[token]
            if n >= MAX_NUMBER_DIGITS:
                break
        return n

    def stops_on(self, token: int, stop_ids: frozenset[int]) -> bool:
        """Whether `token` ends the generation: a stop token, or an end of sequence under a grammar
        (even with ignore_eos). The grammar takes it: an answer the model ended where more could
        have come (a top-level number's next digit) is complete, not cut."""
        if token not in stop_ids and (self.grammar is None or token not in self.grammar.eos_ids):
            return False
        if self.grammar is not None:
            self.grammar.close(token)
        return True

    @property
    def grammar_done(self) -> bool:
        return self.grammar is not None and self.grammar.finished

    def push(self, token: int) -> Verdict | None:
        if self.grammar is not None:
            self.grammar.advance(token)
        self.generated.append(token)
        guard = self.guard
        event = guard.push(token, self.piece(token) if self.piece else "") if guard is not None else None
        if event is None or event.start <= self._structural:
            return None
        self.loop = event
        if not guard.can_recover():
            del self.generated[max(self.emitted, event.start + event.period):]  # one copy of what repeated
            return Verdict.LOOP_STOP
        # where part of the loop already left, cut what has not (the guard's history stays whole
        # until it is cut once: cutting to one copy first, then back up, lost tokens it still held)
        keep = guard.rollback(event, keep_at_least=self.emitted)
        if keep <= self._structural:  # cut before the repetition the grammar demanded: judge it anew
            self._structural = -1
        if self.grammar is not None:
            self.grammar.rollback(len(self.generated) - keep)
        del self.generated[keep:]
        return Verdict.ROLLBACK

    def release(self) -> list[int]:
        """Tokens that may leave now (older than the holdback)."""
        upto = max(self.emitted, len(self.generated) - self.delay)
        out = self.generated[self.emitted:upto]
        self.emitted = upto
        return out

    def flush(self) -> list[int]:
        """At the end: everything not yet released."""
        out = self.generated[self.emitted:]
        self.emitted = len(self.generated)
        return out
