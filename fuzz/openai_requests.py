"""Fuzz target: OpenAI request bodies (structured, Hypothesis), parsed as the server parses
them, without HTTP and without a model.

Bodies are arbitrary JSON, or request-shaped objects whose known fields (sampling numbers,
stop, tools, response_format, logprobs, messages with text, image and audio parts...) get
values of any JSON type: huge integers, NaN and infinities, nesting thousands deep, base64 of
media or of garbage. Each body goes through `parse_json`, then `parse_chat` or
`parse_completion`, then (chat) `prepare_messages` with the server's media limits and our own
Gemma 4 renderer. Contract: a request, or a one-line ApiError (an HTTP 4xx) - or, past the
parser, one of the ValueErrors the server answers as 400 (AudioInputError, ChatTemplateError).
Any other exception would be a 500.
"""

from __future__ import annotations

import base64
import io
import json
import math

from _harness import Structured, instrumented, main_structured, run_contract

with instrumented():
    from hypothesis import strategies as st

    from gemmarun.chat import ChatTemplateError, render_gemma4
    from gemmarun.processing.audio import AudioInputError
    from gemmarun.processing.prompt import collect_media
    from gemmarun.server.inputs import MediaLimits, prepare_messages
    from gemmarun.server.protocol import ApiError, parse_chat, parse_completion, parse_json

NAME = "openai_requests"
SECONDS_PER_INPUT = 20.0
LIMITS = MediaLimits(max_image_pixels=4_000_000, max_audio_seconds=60.0)


def _media() -> list[str]:
    """base64 of a tiny PNG, a tiny WAV and of garbage."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    png, wav = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(png, "PNG")
    sf.write(wav, np.zeros(160, np.float32), 16000, format="WAV")
    return [base64.b64encode(b).decode() for b in (png.getvalue(), wav.getvalue(), b"\x00garbage")]


MEDIA = _media()
NUMBERS = st.one_of(st.integers(), st.sampled_from([0, 1, -1, 2**63, 2**64, 10**400, -(10**400)]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, 1e-300, 1e308]))
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["text", "image_url", "input_audio", "function",
                                                        "json_schema", "json_object", "auto", "none", "user",
                                                        "assistant", "tool", "system", "wav", "webm", "mp4"]))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(TEXT, inner, max_size=4)), max_leaves=10)
DEEP = st.builds(lambda depth: "[" * depth + "]" * depth, st.integers(0, 5000))
ANY = st.one_of(JSON, DEEP)


@st.composite
def part(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["text", "image_url", "input_audio", "video", "file"]))
    if kind == "image_url":
        url = draw(st.one_of(st.builds(lambda b: "data:image/png;base64," + b, st.sampled_from(MEDIA)),
                             st.sampled_from(["http://x/y.png", "file:///etc/passwd", "data:,x", "/tmp/x"]), ANY))
        return {"type": kind, "image_url": draw(st.one_of(st.just({"url": url}), st.just(url), ANY))}
    if kind == "input_audio":
        spec = {"data": draw(st.one_of(st.sampled_from(MEDIA), ANY)), "format": draw(st.one_of(TEXT, ANY))}
        return {"type": kind, "input_audio": draw(st.one_of(st.just(spec), ANY))}
    return {"type": kind, "text": draw(st.one_of(TEXT, ANY))}


@st.composite
def messages(draw: st.DrawFn) -> object:
    out: list = []
    for _ in range(draw(st.integers(0, 4))):
        role = draw(st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), ANY))
        content = draw(st.one_of(st.none(), TEXT, st.lists(part(), max_size=3), ANY))
        message = {"role": role, "content": content}
        if draw(st.booleans()):
            arguments = draw(st.one_of(st.just('{"city": "Paris"}'), DEEP, ANY))
            message["tool_calls"] = draw(st.one_of(
                st.just([{"id": draw(ANY), "type": "function", "function": {"name": "f", "arguments": arguments}}]),
                ANY))
        if draw(st.booleans()):
            message[draw(st.sampled_from(["name", "tool_call_id", "reasoning_content"]))] = draw(ANY)
        out.append(message)
    return out


FIELDS = {
    "max_tokens": NUMBERS, "max_completion_tokens": NUMBERS, "temperature": NUMBERS, "top_p": NUMBERS,
    "top_k": NUMBERS, "min_p": NUMBERS, "repetition_penalty": NUMBERS, "presence_penalty": NUMBERS,
    "frequency_penalty": NUMBERS, "n": NUMBERS, "best_of": NUMBERS, "seed": NUMBERS, "logit_bias": ANY,
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=20), ANY), "ignore_eos": ANY, "stream": ANY,
    "stream_options": ANY, "logprobs": ANY, "top_logprobs": NUMBERS, "image_tokens": NUMBERS, "thinking": ANY,
    "chat_template_kwargs": ANY, "reasoning_effort": TEXT, "tool_choice": ANY, "suffix": ANY, "echo": ANY,
    "tools": st.one_of(st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
                       ANY),
    "response_format": st.one_of(st.just({"type": "json_object"}), st.builds(
        lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, ANY), ANY),
    "prompt": st.one_of(TEXT, st.lists(NUMBERS, max_size=4), ANY),
}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, object]:
    endpoint = draw(st.sampled_from(["chat", "completion"]))
    if draw(st.integers(0, 7)) == 0:
        return endpoint, draw(ANY)
    body = {"model": "gemma", "messages": draw(messages())} if endpoint == "chat" else {"prompt": "Hi"}
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=5, unique=True)):
        body[key] = draw(FIELDS[key])
    return endpoint, body


def _parse(endpoint: str, body: object) -> None:
    data = parse_json(json.dumps(body).encode())
    if endpoint == "completion":
        req = parse_completion(data, 16)
        assert isinstance(req.prompt, str) or all(isinstance(i, int) for i in req.prompt)
        return
    req = parse_chat(data, 256)
    p = req.params
    numbers = (p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty)
    assert all(math.isfinite(x) for x in numbers), f"non-finite sampling parameter in {p}"
    prepared = prepare_messages(req.messages, allow_local_files=False, limits=LIMITS)
    text_messages, _media = collect_media(prepared)
    render_gemma4(text_messages, tools=req.tools, enable_thinking=req.thinking)


def check(case: tuple[str, object]) -> None:
    endpoint, body = case
    run_contract(lambda: _parse(endpoint, body), (ApiError, AudioInputError, ChatTemplateError), SECONDS_PER_INPUT)


TARGET = Structured(bodies(), check)

if __name__ == "__main__":
    main_structured(NAME, TARGET, max_len=8192)
