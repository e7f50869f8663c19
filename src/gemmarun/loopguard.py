"""Catch degenerate repetition while tokens are generated.

Small and quantized models fall into loops: `---\\n` forever, "I'm sorry. I'm sorry. ...", a
paragraph written again and again. `LoopGuard.push` is called once per generated token and
reports a `LoopEvent` as soon as the tail of the output is an exact repetition that legitimate
text does not produce (tables, lists, code, CSV, separators, a refrain sung twice).

How it stays cheap: for every period p <= `max_period` the guard keeps the start of the current
run of positions i with ids[i] == ids[i - p]. A new token can only continue the runs whose p is
the distance to an earlier occurrence of the same id inside the window, so one push costs
O(occurrences of that id in the last `max_period` tokens) <= O(max_period), amortized O(1) on
ordinary text. Lines are compared as text, so a loop that the tokenizer splits differently on each
copy ("---\\n" vs "---" "\\n") is still caught.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from dataclasses import dataclass
from typing import Literal

__all__ = ["LoopEvent", "LoopGuard", "LoopGuardConfig"]

_NUMERIC_WORD = re.compile(r"\w*\d\w*")  # 0x00, 1e-5, v2: numbers, not words
_WORD_TAIL = re.compile(r"\w*$")
_BLANK_ROW = re.compile(r"\s*\|(\s*\|)+\s*")  # an empty table row: "|   |   |"


@dataclass(frozen=True)
class LoopGuardConfig:
    """Thresholds; the defaults keep the legitimate-output corpus in tests/ free of alarms.

    A repetition is measured by its period p (tokens per copy) and its length L (tokens in the
    exactly periodic tail, first copy included). It fires when, for a *wordy* unit (one that has
    letters, emoji, CJK... outside of numbers):
      - "token": p == 1 and L >= token_repeats;
      - "ngram": 2 <= p <= ngram_max_period and L >= max(ngram_repeats * p, ngram_min_tokens);
      - "span":  p <= max_period and L >= max(span_repeats * p, span_min_tokens).
    A *low-information* unit (only punctuation, whitespace, numbers, box drawing: "====",
    "0, 0, 0", "\\n\\n") is legitimately long in separators, padding and zero-filled data, so it
    needs L >= max(span_repeats * p, lowinfo_min_tokens). `lowinfo_ids` marks token ids as
    low-information when no text is pushed.
    A run of one digit token ("000000...": Gemma's tokenizers write numbers digit by digit) needs
    `digit_run_tokens` (a googol's 100 zeros, a 512-bit zero's 128 hex digits pass).
    "line": the same non-blank line (trailing whitespace stripped; indentation kept, so closing
    braces of nested code differ) `line_repeats` times in a row, blank lines in between ignored;
    lines with digits (matrix rows, zero-filled tables) need `data_line_repeats`, lines without
    words (rules, board rows, ASCII art) `lowinfo_line_repeats`, empty table rows (a sign-in
    sheet) `blank_row_repeats`. Lines alike but for a number counting up ("52. I am sorry.",
    "53. I am sorry.") are left alone: answer sheets, forms, tables and code count so too.
    "block": a line or a group of lines (a unit past `max_period` tokens, which the token rules
    cannot see; at most `block_max_lines` non-blank lines) written `span_repeats` times in a row.

    policy: "stop" ends generation at the event; "recover" rolls back and bans (see
    `LoopGuard.rollback`), at most `max_recoveries` times, then stops; "off" disables the guard.
    """

    policy: Literal["stop", "recover", "off"] = "recover"
    token_repeats: int = 16
    ngram_max_period: int = 32
    ngram_repeats: int = 5
    ngram_min_tokens: int = 64
    max_period: int = 512
    span_repeats: int = 3
    span_min_tokens: int = 160
    lowinfo_min_tokens: int = 512
    line_repeats: int = 8
    data_line_repeats: int = 32
    lowinfo_line_repeats: int = 16
    blank_row_repeats: int = 64
    digit_run_tokens: int = 144
    block_max_lines: int = 64
    max_recoveries: int = 3
    lowinfo_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.policy not in ("stop", "recover", "off"):
            raise ValueError(f"policy must be 'stop', 'recover' or 'off', not {self.policy!r}")
        for name in ("token_repeats", "ngram_repeats", "span_repeats", "line_repeats", "data_line_repeats",
                     "lowinfo_line_repeats", "blank_row_repeats", "digit_run_tokens", "block_max_lines"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2")
        if not 2 <= self.ngram_max_period <= self.max_period:
            raise ValueError("need 2 <= ngram_max_period <= max_period")


@dataclass(frozen=True)
class LoopEvent:
    """A loop: `start` is the generated-token index where its first copy begins, `period` the
    tokens per copy (so `start + period` keeps exactly one copy), `repeats` the copies so far."""

    start: int
    period: int
    repeats: int
    kind: str  # "token" | "ngram" | "span" | "line" | "block"
    sample: str  # the repeated text (one copy, cut to 80 characters)


def _low_info_char(c: str) -> bool:
    cat = unicodedata.category(c)
    return cat[0] in "PZC" or cat in ("Sm", "Sk", "Sc") or "\u2500" <= c <= "\u259f"


def _wordy(text: str) -> bool:
    return any(not _low_info_char(c) for c in _NUMERIC_WORD.sub("", text))


class LoopGuard:
    """Incremental loop detector over generated tokens (not the prompt).

    Engine use, once per generated token::

        event = guard.push(token_id, piece)      # piece: the token's decoded text, or ""
        if event is not None:
            if not guard.can_recover():          # policy "stop", or recoveries used up
                stop, finish_reason "loop"
            keep = guard.rollback(event)         # == event.start + event.period
            drop generated tokens [keep:] and their KV-cache entries; every later step samples
            position n = len(generated) with logits[list(guard.banned_at(n))] = -inf

    Why the ban: the context at `keep` is exactly the one that produced the loop, so greedy
    decoding (and likely sampling) would choose the same first token of the second copy again.
    `rollback` bans that token at that position only; if the model loops again from the same
    place the bans there accumulate, and bans beyond a rolled-back position are forgotten.
    """

    def __init__(self, config: LoopGuardConfig | None = None) -> None:
        self.config = config or LoopGuardConfig()
        self.recoveries = 0
        self._bans: dict[int, set[int]] = {}
        c = self.config
        # minimal periodic length L per period, for wordy and for low-information units
        self._need_wordy = [0] * (c.max_period + 1)
        self._need_low = [0] * (c.max_period + 1)
        for p in range(1, c.max_period + 1):
            span = max(c.span_repeats * p, c.span_min_tokens)
            if p == 1:
                span = min(span, c.token_repeats)
            elif p <= c.ngram_max_period:
                span = min(span, max(c.ngram_repeats * p, c.ngram_min_tokens))
            self._need_wordy[p] = span
            self._need_low[p] = max(c.span_repeats * p, c.lowinfo_min_tokens, span)
        self.reset()

    def reset(self) -> None:
        """Forget the generated tokens (not the bans: use a new guard for a new request)."""
        self._ids: list[int] = []
        self._pieces: list[str] = []
        self._pos: dict[int, deque[int]] = {}  # id -> its indices inside the window
        self._active: dict[int, int] = {}  # period -> first index of the current matching run
        self._wordy_cache: dict[tuple[int, int], bool] = {}
        self._line_parts: list[str] = []
        self._line_start = 0  # token index where the current line starts
        self._last_line: str | None = None
        self._line_count = 0
        self._line_starts: list[int] = []  # token starts of the first two copies of the run
        self._lines_seen: list[str] = []  # the non-blank lines, for blocks
        self._line_tokens: list[int] = []  # where each of them starts
        self._blocks: dict[int, int] = {}  # lines per copy -> first line of the current matching run

    def __len__(self) -> int:
        return len(self._ids)

    # ------------------------------------------------------------------ detection
    def push(self, token_id: int, text_piece: str = "") -> LoopEvent | None:
        """Add one generated token; a `LoopEvent` while the output is looping, else None."""
        if self.config.policy == "off":
            return None
        i = len(self._ids)
        self._ids.append(token_id)
        self._pieces.append(text_piece)
        window = self.config.max_period
        if i > window:  # the id at i - window - 1 leaves the window
            old = self._pos[self._ids[i - window - 1]]
            old.popleft()
            if not old:
                del self._pos[self._ids[i - window - 1]]
        seen = self._pos.get(token_id)
        prev, active = self._active, {}
        if seen:
            for j in reversed(seen):  # shortest period first
                active[i - j] = prev.get(i - j, i)
            seen.append(i)
        else:
            self._pos[token_id] = deque((i,))
        self._active = active
        event = self._periodic(i) if active else None
        if "\n" in text_piece:
            line_event = self._lines(i, text_piece)
            event = event or line_event
        else:
            self._line_parts.append(text_piece)
        return event

    def _periodic(self, i: int) -> LoopEvent | None:
        for p, run_start in self._active.items():  # ascending p: the first hit is the true period
            length = i - run_start + 1 + p
            if length >= self._need_wordy[p] and (
                    length >= self._need_low[p] or self._is_wordy(run_start - p, p)
                    or (p == 1 and length >= self.config.digit_run_tokens and self._pieces[i].strip().isdigit())):
                break
        else:
            return None
        start = run_start - p
        kind = "token" if p == 1 else "ngram" if p <= self.config.ngram_max_period else "span"
        return LoopEvent(start, p, length // p, kind, "".join(self._pieces[start:start + p])[:80])

    def _is_wordy(self, start: int, p: int) -> bool:
        key = (start, p)
        if key not in self._wordy_cache:
            ids, text = self._ids[start:start + p], "".join(self._pieces[start:start + p])
            low_ids = bool(self.config.lowinfo_ids) and all(t in self.config.lowinfo_ids for t in ids)
            # the word the loop starts in, so "FFFF" after "0x" counts as a number
            left = _WORD_TAIL.search("".join(self._pieces[max(0, start - 8):start])).group()
            left = left if text[:1].isalnum() else ""
            self._wordy_cache[key] = not low_ids and (_wordy(left + text) if text else True)
        return self._wordy_cache[key]

    def _lines(self, i: int, piece: str) -> LoopEvent | None:
        parts = piece.split("\n")
        event = self._line_done("".join(self._line_parts) + parts[0], self._line_start)
        for middle in parts[1:-1]:
            event = self._line_done(middle, i) or event
        self._line_parts = [parts[-1]]
        self._line_start = i if parts[-1] else i + 1
        return event

    def _line_done(self, line: str, start: int) -> LoopEvent | None:
        key = line.rstrip()
        if not key.strip():
            return None  # blank lines neither count nor break a run
        same, block = self._same_line(key, start), self._block(key, start)  # (both keep their state)
        return same or block

    def _same_line(self, key: str, start: int) -> LoopEvent | None:
        if key == self._last_line:
            self._line_count += 1
            if len(self._line_starts) < 2:
                self._line_starts.append(start)
        else:
            self._last_line, self._line_count, self._line_starts = key, 1, [start]
        c = self.config
        need = (c.data_line_repeats if any(ch.isdigit() for ch in key)
                else c.line_repeats if _wordy(key) else c.blank_row_repeats if _BLANK_ROW.fullmatch(key)
                else c.lowinfo_line_repeats)
        if self._line_count < need:
            return None
        first, second = self._line_starts
        return LoopEvent(first, max(1, second - first), self._line_count, "line", key[:80])

    def _block(self, key: str, start: int) -> LoopEvent | None:
        """A line or a group of lines repeated, one copy longer than the token rules' max_period."""
        k = len(self._lines_seen)
        self._lines_seen.append(key)
        self._line_tokens.append(start)
        lines, tokens = self._lines_seen, self._line_tokens
        previous, self._blocks = self._blocks, {}
        for q in range(1, min(k, self.config.block_max_lines) + 1):
            if lines[k - q] == key:
                self._blocks[q] = previous.get(q, k)
        for q, run_start in self._blocks.items():
            first = run_start - q  # the first copy's first line
            if k - first + 1 < self.config.span_repeats * q:
                continue
            period = tokens[run_start] - tokens[first]
            if period > self.config.max_period and any(_wordy(line) for line in lines[first:run_start]):
                return LoopEvent(tokens[first], period, (k - first + 1) // q, "block", lines[first][:80])
        return None

    # ------------------------------------------------------------------ recovery
    def can_recover(self) -> bool:
        return self.config.policy == "recover" and self.recoveries < self.config.max_recoveries

    def rollback(self, event: LoopEvent, keep_at_least: int = 0) -> int:
        """Cut the history to one copy of the loop and ban the token that began the second copy
        at that position. An engine that has already sent `keep_at_least` tokens cuts there
        instead, banning the token that followed them. Returns the number of tokens to keep."""
        keep = min(max(event.start + event.period, keep_at_least), len(self._ids))
        banned = self._ids[keep] if keep < len(self._ids) else None
        self.truncate(keep)
        if banned is not None:
            self._bans.setdefault(keep, set()).add(banned)
        self.recoveries += 1
        return keep

    def truncate(self, n: int) -> None:
        """Forget generated tokens from index n on (replays the rest: rare, O(n))."""
        ids, pieces = self._ids[:n], self._pieces[:n]
        self._bans = {k: v for k, v in self._bans.items() if k <= n}
        self.reset()
        policy_off = self.config.policy == "off"
        for t, piece in zip(ids, pieces):
            if policy_off:
                self._ids.append(t)
                self._pieces.append(piece)
            else:
                self.push(t, piece)

    def banned_at(self, position: int) -> set[int]:
        """Token ids the engine must not sample at generated position `position`."""
        return self._bans.get(position, set())
