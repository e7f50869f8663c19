"""Fuzz target: hostile chat messages and tools through every renderer, and model replies
through the reply parser (structured, Hypothesis).

Messages come from strangers (the server passes OpenAI requests through): roles, contents,
content parts, tool calls, tool definitions and ids are arbitrary JSON, strings may hold
Gemma's control tokens, Jinja syntax, lone surrogates or huge repeats, and tool arguments may
nest thousands of levels deep. They go through our own renderers (`render_gemma4`,
`render_gemma3`) and the sandboxed Jinja path with two real-looking templates
(fuzz/corpus/chat_templates/). Contract: a prompt string, or a one-line ChatTemplateError.
`parse_reply` must accept any text and return well-formed tool calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from _harness import FUZZ_DIR, Structured, instrumented, main_structured, run_contract

with instrumented(("gemmarun", "jinja2")):
    from hypothesis import strategies as st

    from gemmarun import chat
    from gemmarun.chat import ChatTemplateError

NAME = "chat_messages"
SECONDS_PER_INPUT = 20.0
TEMPLATES = FUZZ_DIR / "corpus" / "chat_templates"


@lru_cache(maxsize=None)
def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


MARKUP = ["<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", '<|"|>', "<|channel>",
          "<channel|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "call:f{", "{{ messages }}",
          "{% for m in messages %}", "\u2581", "\ud800", "\x00", "\r\n", "}", "{", ":", ",", "[", "]"]
TEXT = st.one_of(
    st.text(max_size=16),
    st.sampled_from(MARKUP),
    st.builds(lambda s, n: s * n, st.sampled_from(["x", "<|turn>", "{", "[", " \n", '{"a":']), st.integers(1, 200_000)),
)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)


@dataclass(frozen=True)
class Deep:
    """`leaf` nested `depth` levels deep in lists or dicts. Built only when the case runs, so a
    failing example prints as this one line (Hypothesis' own printer would recurse to death)."""

    leaf: object
    depth: int
    as_dict: bool

    def build(self) -> object:
        value = materialise(self.leaf)
        for _ in range(self.depth):
            value = {"k": value} if self.as_dict else [value]
        return value


def materialise(value: object) -> object:
    if isinstance(value, Deep):
        return value.build()
    if isinstance(value, dict):
        return {k: materialise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [materialise(v) for v in value]
    return value


DEEP = st.builds(Deep, JSON, st.integers(0, 5000), st.booleans())
HOSTILE = st.one_of(JSON, DEEP, TEXT)
ARGUMENTS = st.one_of(st.dictionaries(TEXT, HOSTILE, max_size=3), HOSTILE, st.just('{"a": [1, {"b": null}]}'))
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "image_url", "audio", "input_audio",
                                                       "video", "file"]), "text": TEXT})
CONTENT = st.one_of(st.none(), TEXT, st.lists(PART, max_size=4))
KEYS = ["role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content", "thinking", "id", "other"]


def _call(draw: st.DrawFn) -> dict:
    function = {"name": draw(st.one_of(st.just("get_weather"), TEXT)), "arguments": draw(ARGUMENTS)}
    return {"id": draw(st.one_of(st.just("call_1"), SCALAR)), "type": "function", "function": function}


@st.composite
def conversation(draw: st.DrawFn) -> object:
    """A plausible conversation (system, user and assistant turns, tool calls and their answers),
    then a few fields replaced by hostile values; now and then not a list at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    messages: list = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(CONTENT)})
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["user", "assistant", "model", "call", "tool"]))
        if kind == "call":
            calls = [_call(draw) for _ in range(draw(st.integers(1, 2)))]
            messages.append({"role": "assistant", "content": draw(st.one_of(st.none(), TEXT)), "tool_calls": calls})
        elif kind == "tool":
            messages.append({"role": "tool", "content": draw(st.one_of(TEXT, st.just('{"t": 3}'))),
                             "tool_call_id": draw(st.one_of(st.just("call_1"), HOSTILE))})
        else:
            messages.append({"role": kind, "content": draw(CONTENT)})
    for _ in range(draw(st.integers(0, 3)) if messages else 0):
        message = messages[draw(st.integers(0, len(messages) - 1))]
        message[draw(st.sampled_from(KEYS))] = draw(HOSTILE)
    return messages


@st.composite
def tools(draw: st.DrawFn) -> object:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.one_of(st.none(), JSON))
    out = [{"type": "function", "function": {"name": draw(st.one_of(st.just("get_weather"), TEXT)),
                                             "description": draw(TEXT), "parameters": draw(HOSTILE)}}
           for _ in range(draw(st.integers(1, 2)))]
    if draw(st.booleans()):
        out[0]["function"][draw(st.sampled_from(["name", "description", "parameters"]))] = draw(HOSTILE)
    return out


RENDERERS = ["gemma4", "gemma3", "gemma3.jinja", "gemma4_tools.jinja"]

RENDER = st.tuples(st.just("render"), st.sampled_from(RENDERERS), conversation(), tools(), st.booleans(),
                   st.booleans())
REPLY = st.tuples(st.just("reply"), st.lists(st.one_of(st.sampled_from(MARKUP + [
    "thought\n", "call:get_weather", "true", "null", "-1.5e3", "<eos>", "x", " "]), st.text(max_size=4)),
    max_size=40).map("".join))


def _render(renderer: str, messages, tools, generation: bool, thinking: bool) -> str:
    if renderer == "gemma4":
        return chat.render_gemma4(messages, add_generation_prompt=generation, enable_thinking=thinking, tools=tools)
    if renderer == "gemma3":
        return chat.render_gemma3(messages, add_generation_prompt=generation)
    return chat.render_template(template(renderer), messages, add_generation_prompt=generation,
                                enable_thinking=thinking, tools=tools)


def _reply(text: str) -> None:
    reply = chat.parse_reply(text)
    assert isinstance(reply.content, str)
    for call in reply.tool_calls:
        assert isinstance(call.name, str) and isinstance(call.arguments, dict)


def check(case: tuple) -> None:
    if case[0] == "reply":
        run_contract(lambda: _reply(case[1]), (), SECONDS_PER_INPUT)
        return
    _, renderer, messages, tools, generation, thinking = case
    messages, tools = materialise(messages), materialise(tools)
    out = run_contract(lambda: _render(renderer, messages, tools, generation, thinking), (ChatTemplateError,),
                       SECONDS_PER_INPUT)
    assert out is None or isinstance(out, str)


TARGET = Structured(st.one_of(RENDER, REPLY), check)

if __name__ == "__main__":
    main_structured(NAME, TARGET, max_len=16384)
