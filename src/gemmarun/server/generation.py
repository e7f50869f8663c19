"""One request's generation: engine events -> reply deltas -> OpenAI chunks or one response."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..batching import Event
from ..chat import ToolCall
from ..control import OutputControl
from ..llm import LLM, Prompt
from ..sampling import SamplingParams
from . import protocol as p
from ..reply import Delta, ReplyStream
from .scheduler import Job


class Generation:
    def __init__(self, llm: LLM, env: p.Envelope, prompt: Prompt, params: SamplingParams, *, chat: bool = True,
                 tools: bool = False, top_logprobs: int | None = None, include_usage: bool = False,
                 echo: str = "", control: OutputControl | None = None) -> None:
        self.llm, self.env, self.prompt, self.params = llm, env, prompt, params
        self.control = control  # the grammar and loop guard the engine applies (None: neither)
        self.is_chat, self.top_logprobs, self.include_usage, self.echo = chat, top_logprobs, include_usage, echo
        self.reply = ReplyStream(llm.tokenizer, stop=params.stop, chat=chat, tools=tools)
        self.tokens = self.reasoning_tokens = 0
        self.content, self.reasoning = [], []
        self.calls: list[dict] = []
        self.logprobs: list[dict] | None = [] if top_logprobs is not None else None
        self.offsets: list[int] = []  # where each entry's token starts in the text (completions)
        # Entries of answer tokens whose text has not been let through yet, with where it starts
        # in the answer: sent once it is; dropped if a stop string cut it.
        self._pending: list[tuple[int, dict]] = []
        self.finish_reason: str | None = None
        self.cached_tokens: int | None = None  # prompt tokens the engine found in a kept cache
        self.stop_reason: str | None = None  # "loop" when the loop guard ended the reply

    @classmethod
    def chat(cls, llm: LLM, env: p.Envelope, prompt: Prompt, params: SamplingParams,
             req: p.ChatRequest, control: OutputControl | None = None) -> Generation:
        return cls(llm, env, prompt, params, tools=bool(req.tools), top_logprobs=req.top_logprobs,
                   include_usage=req.include_usage, control=control)

    @classmethod
    def completion(cls, llm: LLM, env: p.Envelope, prompt: Prompt, params: SamplingParams,
                   req: p.CompletionRequest, control: OutputControl | None = None) -> Generation:
        echo = ""
        if req.echo:
            echo = req.prompt if isinstance(req.prompt, str) else llm.tokenizer.decode(req.prompt, skip_special=True)
        return cls(llm, env, prompt, params, chat=False, top_logprobs=req.top_logprobs,
                   include_usage=req.include_usage, echo=echo, control=control)

    # -- events -> deltas ----------------------------------------------------------------------

    def feed(self, ev: Event) -> tuple[Delta, list[dict]]:
        """The delta for one event, and the logprob entries of its token (if asked for)."""
        delta = Delta()
        if ev.token is not None:
            self.tokens += 1
            start = self.reply.answer_taken
            delta = self.reply.push(ev.token)
            channel = self.reply.last_channel
            self.reasoning_tokens += channel == "reasoning"
            if self.logprobs is not None and channel == "content" and ev.logprob is not None \
                    and self.reply.is_text(ev.token):
                self._pending.append((start, self._entry(ev)))
        if ev.cached_tokens is not None:
            self.cached_tokens = ev.cached_tokens
        if ev.finish_reason or self.reply.done:
            stopped_early = self.reply.done
            tail = self.reply.finish()
            stopped_early |= tail.done == "stop"  # a stop string in the text of a call the reply ended inside
            delta.content += tail.content
            delta.reasoning += tail.reasoning
            if ev.finish_reason == "loop":  # not one of OpenAI's finish reasons: said in stop_reason
                self.stop_reason = "loop"
            reason = "stop" if stopped_early or ev.finish_reason in ("stop", "cancelled", "loop") else ev.finish_reason
            if reason == "stop" and self._grammar_cut(stopped_early):
                # a loop or a stop string cut the structure: it does not parse, as with
                # max_tokens (a "stop" answer under response_format always parses)
                reason = "length"
            self.finish_reason = "tool_calls" if self.reply.calls else reason
        given = self.reply.answer_given
        ready = [(start, entry) for start, entry in self._pending if start < given]
        self._pending = [] if self.finish_reason else self._pending[len(ready):]
        entries = [entry for _, entry in ready]
        self.content.append(delta.content)
        self.reasoning.append(delta.reasoning)
        if self.logprobs is not None:
            self.logprobs += entries
            self.offsets += [len(self.echo) + start for start, _ in ready]
        return delta, entries

    def _grammar_cut(self, by_stop_string: bool) -> bool:
        """An answer under a grammar that does not parse (GrammarState.answer_cut)."""
        grammar = self.control.grammar if self.control is not None else None
        return grammar is not None and grammar.answer_cut(by_stop_string)

    def _entry(self, ev: Event) -> dict:
        tok = self.llm.tokenizer

        def piece(i: int) -> tuple[str, bytes]:
            raw = tok.piece_bytes(i)
            return raw.decode("utf-8", errors="replace"), raw

        text, raw = piece(ev.token)
        top = None
        if self.top_logprobs:
            top = [(*piece(i), lp) for i, lp in ev.top_logprobs]
        elif self.top_logprobs == 0 and self.is_chat:
            top = []
        return p.logprob_entry(text, raw, ev.logprob, top)

    def _call_dicts(self, calls: list[ToolCall], streaming: bool) -> list[dict]:
        out = []
        for call in calls:
            out.append(p.tool_call(call, len(self.calls) if streaming else None))
            self.calls.append(out[-1])
        return out

    async def collect(self, job: Job, first: list[Event]) -> None:
        events = first
        while True:
            for ev in events:
                delta, _ = self.feed(ev)
                self._call_dicts(delta.tool_calls, streaming=False)
                if self.finish_reason:
                    return
            events = await job.next_events()

    def text(self) -> str:
        return "".join(self.content)

    # -- responses ------------------------------------------------------------------------------

    def usage(self) -> dict:
        return p.usage(len(self.prompt.ids), self.tokens, self.reasoning_tokens if self.is_chat else None,
                       self.cached_tokens or 0)

    def chat_response(self) -> dict:
        env = p.Envelope(self.env.id, self.env.model, "chat.completion", self.env.created)
        message = p.chat_message(self.text(), "".join(self.reasoning), self.calls)
        choice = {"index": 0, "message": message, "logprobs": p.chat_logprobs(self.logprobs),
                  "finish_reason": self.finish_reason, **self._stop_reason()}
        return env.wrap([choice], usage=self.usage())

    def completion_response(self) -> dict:
        logprobs = None if self.logprobs is None else p.completion_logprobs(self.logprobs, self.offsets)
        choice = {"index": 0, "text": self.echo + self.text(), "logprobs": logprobs,
                  "finish_reason": self.finish_reason, **self._stop_reason()}
        return self.env.wrap([choice], usage=self.usage())

    async def chunks(self, job: Job, first: list[Event]) -> AsyncIterator[bytes]:
        """SSE chunks to the end, then the usage chunk (if asked for) and [DONE]."""
        if self.is_chat:
            yield p.sse(self._chunk({"role": "assistant", "content": ""}, None, None))
        events = first
        while True:
            for ev in events:
                delta, entries = self.feed(ev)
                for chunk in self._delta_chunks(delta, entries):
                    yield p.sse(chunk)
                if self.finish_reason:
                    break
            if self.finish_reason:
                break
            events = await job.next_events()
        last = self._chunk({} if self.is_chat else "", None, self.finish_reason)
        last["choices"][0].update(self._stop_reason())
        yield p.sse(last)
        if self.include_usage:
            yield p.sse(self.env.wrap([], usage=self.usage()))
        yield p.sse("[DONE]")

    def _stop_reason(self) -> dict:
        return {"stop_reason": self.stop_reason} if self.stop_reason else {}

    def _delta_chunks(self, delta: Delta, entries: list[dict]) -> list[dict]:
        chunks = []
        if self.is_chat:
            body: dict = {}
            if delta.reasoning:
                body["reasoning_content"] = delta.reasoning
            if delta.content:
                body["content"] = delta.content
            if body or entries:
                chunks.append(self._chunk(body, entries, None))
            for call in self._call_dicts(delta.tool_calls, streaming=True):
                chunks.append(self._chunk({"tool_calls": [call]}, None, None))
        elif delta.content or entries:
            chunks.append(self._chunk(delta.content, entries, None))
        return chunks

    def _chunk(self, delta: dict | str, entries: list[dict] | None, finish: str | None) -> dict:
        if self.is_chat:
            logprobs = p.chat_logprobs(entries) if entries and self.logprobs is not None else None
            return self.env.wrap([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
        logprobs = None
        if entries and self.logprobs is not None:  # the latest entries: their offsets are the last ones
            logprobs = p.completion_logprobs(entries, self.offsets[len(self.offsets) - len(entries):])
        return self.env.wrap([{"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}])
