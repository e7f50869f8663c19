"""Generated token ids -> what a client sees: answer text, reasoning text and tool calls, as
deltas while the ids arrive.

Gemma 4 writes its thinking as `<|channel>thought\\n...<channel|>` and tool calls as
`<|tool_call>call:NAME{...}<tool_call|>`; in real vocabularies these markers are printed
(USER_DEFINED) tokens, so they are recognised here by id and never reach the output. Every other
special token is dropped too. The joined deltas equal `chat.parse_reply` on the same output
(answer and reasoning trimmed, thoughts joined by newlines); a malformed tool call stays in the
answer as its text, without the markers. Stop strings cut the answer (not the reasoning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat import (
    CALL_CLOSE,
    CALL_OPEN,
    MARKERS,
    QUOTE,
    RESPONSE_OPEN,
    SWITCHES,
    THINK_CLOSE,
    THINK_OPEN,
    ToolCall,
    _parse_call,
)
from .tokenizer import IncrementalDecoder, Tokenizer

_LABEL = "thought\n"


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    done: str | None = None  # "stop" (a stop string or the tool-response marker ended the reply)


class _Trim:
    """Strips a channel's leading and trailing whitespace while streaming: trailing whitespace is
    held until more text follows it."""

    def __init__(self) -> None:
        self.started, self.held, self.sep = False, "", ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        if body and self.sep:
            body, self.sep = self.sep + body, ""
        return body

    def reopen(self, sep: str) -> None:
        """A new segment: its leading whitespace is dropped, `sep` joins it to what came before."""
        if self.started:
            self.started, self.held, self.sep = False, "", sep


class _Stops:
    """Holds back the end of the answer that may be the start of a stop string. Counts the answer's
    characters as generated (`taken`) and let through (`given`): a token whose text starts at or
    past `given` when the reply ends was cut by a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.hold, self.pending = stops, max((len(s) for s in stops), default=0), ""
        self.taken = self.given = 0

    def push(self, text: str) -> tuple[str, bool]:
        self.taken += len(text)
        out, hit = self._search(text)
        self.given += len(out)
        return out, hit

    def _search(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = max(len(self.pending) - (self.hold - 1), 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.given += len(out)
        return out


class ReplyStream:
    """Feed generated ids with `push`; `finish` when generation ends. `chat=False` (completions)
    keeps the text as generated: no channels, tool calls or trimming, only specials dropped."""

    def __init__(self, tokenizer: Tokenizer, *, stop: tuple[str, ...] = (), chat: bool = True,
                 tools: bool = False) -> None:
        self.tokenizer = tokenizer
        self.chat, self.tools = chat, tools
        self._decoder = IncrementalDecoder(tokenizer, skip_special=False)
        self._drop = frozenset(tokenizer.control_ids)
        ids = {m: tokenizer.token_to_id(m) for m in MARKERS}
        self._marker = {i: m for m, i in ids.items() if i is not None}
        self._drop |= frozenset(self._marker)
        self.state = "content"  # or "reasoning", "call"
        self._label = None  # text after <|channel> that may still be the "thought\n" label
        self._body = ""  # tool-call text so far
        self._trim = {"content": _Trim(), "reasoning": _Trim()}
        self._stops = _Stops(stop)
        self.calls = 0
        self.done = False
        self.last_channel = "content"  # where the last pushed token's text went

    def push(self, token: int) -> Delta:
        delta = Delta()
        if self.done:
            return delta
        marker = self._marker.get(token) if self.chat else None
        if marker in SWITCHES:  # the text before it is settled: it may move what follows
            self._text(self._decoder.flush(), delta)
            self._marker_token(marker, delta)
        elif token in self._drop:
            pass  # a special prints nothing and, as in decode, does not cut a character's bytes
        else:
            self._text(self._decoder.push(token), delta)
        self.last_channel = self.state
        return delta

    @property
    def answer_taken(self) -> int:
        """Characters of the answer generated so far (where the next token's text starts)."""
        return self._stops.taken

    @property
    def answer_given(self) -> int:
        """Characters of the answer let through so far (not held back or cut by a stop string)."""
        return self._stops.given

    def is_text(self, token: int) -> bool:
        """Whether `token` prints (is neither a special token nor a marker)."""
        return token not in self._drop

    def finish(self) -> Delta:
        """The rest of the reply: buffered bytes, an unfinished label or tool call, held text."""
        delta = Delta()
        if not self.done:
            self._text(self._decoder.flush(), delta)
            if self._label:
                self._route("reasoning", self._label, delta)
            if self.state == "call":
                self._route("content", self._body.replace(QUOTE, '"'), delta)
            self._route("content", self._stops.flush(), delta, stops=False)
        self.done = True
        return delta

    # -- internals ------------------------------------------------------------------------------

    def _marker_token(self, marker: str, delta: Delta) -> None:
        if marker == THINK_OPEN and self.state != "call":
            self.state, self._label = "reasoning", ""
            self._trim["reasoning"].reopen("\n")
        elif marker == THINK_CLOSE and self.state == "reasoning":
            if self._label:
                self._route("reasoning", self._label, delta)
            self.state, self._label = "content", None
        elif marker == CALL_OPEN and self.tools and self.state == "content":
            self.state, self._body = "call", ""
        elif marker == CALL_CLOSE and self.state == "call":
            call = _parse_call(self._body)
            self.state = "content"
            if call is not None:
                delta.tool_calls.append(call)
                self.calls += 1
            else:
                self._route("content", self._body.replace(QUOTE, '"'), delta)
        elif marker == QUOTE and self.state == "call":
            self._body += QUOTE
        elif marker == RESPONSE_OPEN and self.state != "call":
            self._end(delta)

    def _text(self, text: str, delta: Delta) -> None:
        if not text or self.done:
            return
        if self.state == "call":
            self._body += text
            return
        if self.state == "reasoning" and self._label is not None:
            self._label += text
            if _LABEL.startswith(self._label):
                if self._label == _LABEL:
                    self._label = None
                return
            text, self._label = self._label.removeprefix(_LABEL), None
        self._route(self.state, text, delta)

    def _route(self, channel: str, text: str, delta: Delta, stops: bool = True) -> None:
        """Stop strings are searched in the answer as generated (`stops=False`: text they held
        back and searched already), then the channel is trimmed."""
        hit = False
        if channel == "content" and stops:
            text, hit = self._stops.push(text)
        if self.chat:
            text = self._trim[channel].push(text)
        if channel == "reasoning":
            delta.reasoning += text
        else:
            delta.content += text
        if hit:
            self.done = True
            delta.done = "stop"

    def _end(self, delta: Delta) -> None:
        self._route("content", self._stops.flush(), delta, stops=False)
        self.done = True
        delta.done = "stop"
