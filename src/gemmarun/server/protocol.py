"""OpenAI request parsing and response shapes, with no I/O: JSON objects in, plain dataclasses
and dicts out. Every problem is an `ApiError` carrying the HTTP status and OpenAI's error shape.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..chat import TOOL_NAME
from ..constrain import Grammar, GrammarError
from ..processing.image import SOFT_TOKEN_BUDGETS
from ..sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 256
MAX_TOP_LOGPROBS = 20
REASONING_EFFORTS = {"none": False, "minimal": True, "low": True, "medium": True, "high": True}


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}  # sent with the error (429's Retry-After)
        self.type = type or {401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
        raise bad(f"the request body is not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        kind = "null" if data is None else "a number" if type(data) in (int, float) else _type_name(type(data))
        raise bad(f"the request body must be a JSON object, not {kind}")
    return data


# ------------------------------------------------------------------------------ field readers


def _type_name(t: type | tuple) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return " or ".join(names[x] for x in (t if isinstance(t, tuple) else (t,)))


def _get(data: dict, key: str, kind: type | tuple, default: Any = None) -> Any:
    """data[key] checked against `kind` (null means the default; bool is never a number)."""
    value = data.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and type(value) in (int, float):  # JSON allows NaN, Infinity and 1e400-sized ints
        number = float(value) if abs(value) < 1e308 else math.inf
        if not math.isfinite(number):
            raise bad(f"'{key}' must be a finite number", key)
        return number
    if not ok:
        raise bad(f"'{key}' must be {_type_name(kind)}", key)
    return value


def _stop_token_ids(data: dict) -> tuple[int, ...]:
    """vLLM's extension: token ids that end the reply too (checked against the vocabulary later)."""
    ids = _get(data, "stop_token_ids", list, [])
    if len(ids) > MAX_STOP_TOKEN_IDS or not all(type(i) is int and i >= 0 for i in ids):
        raise bad(f"'stop_token_ids' must be a list of at most {MAX_STOP_TOKEN_IDS} token ids (integers >= 0)",
                  "stop_token_ids")
    return tuple(ids)


def _stop(data: dict) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'stop' may hold at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(s for s in stops if s)


def _max_tokens(data: dict, default: int) -> tuple[int, bool]:
    for key in ("max_completion_tokens", "max_tokens"):
        value = _get(data, key, int)
        if value is not None:
            if value < 1:
                raise bad(f"'{key}' must be at least 1", key)
            return value, True
    return default, False


# Used for fields a request leaves out: OpenAI's temperature 1.0 with the top-k / top-p of the
# Gemma model cards (a full-vocabulary draw at temperature 1 wanders off).
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 0.95, "top_k": 64, "min_p": 0.0,
                     "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def _logit_bias(data: dict) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias}, the ids JSON strings of integers."""
    bias = _get(data, "logit_bias", dict, {})
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise bad("logit_bias keys must be token ids (integers as strings)", "logit_bias") from None


def sampling_params(data: dict, default_max_tokens: int, defaults: dict | None = None) -> tuple[SamplingParams, bool]:
    """SamplingParams from a request's fields, and whether it gave max_tokens itself."""
    if _get(data, "n", int, 1) != 1:
        raise bad("only n=1 is supported", "n")
    if _get(data, "best_of", int, 1) != 1:
        raise bad("only best_of=1 is supported", "best_of")
    max_tokens, given = _max_tokens(data, default_max_tokens)
    seed = _get(data, "seed", int)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise bad("seed must fit in 64 bits", "seed")
    d = {**SAMPLING_DEFAULTS, **(defaults or {})}
    kwargs = {
        "max_tokens": max_tokens,
        "temperature": _get(data, "temperature", float, d["temperature"]),
        "top_p": _get(data, "top_p", float, d["top_p"]),
        "top_k": _get(data, "top_k", int, d["top_k"]),
        "min_p": _get(data, "min_p", float, d["min_p"]),
        "repetition_penalty": _get(data, "repetition_penalty", float, d["repetition_penalty"]),
        "presence_penalty": _get(data, "presence_penalty", float, d["presence_penalty"]),
        "frequency_penalty": _get(data, "frequency_penalty", float, d["frequency_penalty"]),
        "logit_bias": _logit_bias(data),
        "seed": _get(data, "seed", int),
        "stop": _stop(data),
        "stop_token_ids": _stop_token_ids(data),
        "ignore_eos": _get(data, "ignore_eos", bool, False),
    }
    try:
        return SamplingParams(**kwargs), given
    except (TypeError, ValueError) as e:  # (a logit_bias value that is no number: a TypeError)
        message = str(e)
        raise bad(message, message.split(" ", 1)[0]) from None


def _stream(data: dict) -> tuple[bool, bool]:
    stream = _get(data, "stream", bool, False)
    options = _get(data, "stream_options", dict, {})
    return stream, bool(stream and options.get("include_usage"))


# ------------------------------------------------------------------------------ requests


@dataclass
class ChatRequest:
    messages: list  # as sent; inputs.prepare_messages turns them into template messages
    params: SamplingParams
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only
    thinking: bool = False
    tools: list[dict] | None = None
    image_tokens: int | None = None
    grammar: Grammar | None = None  # from response_format
    calls: ToolCalls | None = None  # with tools: whether the answer must call, and which function


@dataclass(frozen=True)
class ToolCalls:
    """What tool_choice and the functions' `strict` ask of an answer with tools: `required`, one
    call or more (of `only` where a function is named); `strict`, arguments that follow the
    parameters. Either makes the answer constrained (LLM.tool_grammar)."""

    required: bool = False
    only: str | None = None
    strict: bool = False

    @property
    def constrained(self) -> bool:
        return self.required or self.strict


@dataclass
class CompletionRequest:
    prompt: str | list[int]
    params: SamplingParams
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None
    echo: bool = False
    grammar: Grammar | None = None  # from response_format, as llama.cpp's server and vLLM take it


def _thinking(data: dict) -> bool:
    thinking = _get(data, "thinking", bool)
    if thinking is not None:
        return thinking
    kwargs = _get(data, "chat_template_kwargs", dict, {})
    if isinstance(kwargs.get("enable_thinking"), bool):
        return kwargs["enable_thinking"]
    effort = _get(data, "reasoning_effort", str)
    if effort is None:
        return False
    if effort not in REASONING_EFFORTS:
        raise bad(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}", "reasoning_effort")
    return REASONING_EFFORTS[effort]


def _tool_choice(data: dict) -> str | dict | None:
    """tool_choice as OpenAI spells it: "auto", "none", "required" or {type: function, function: {name}}."""
    choice = data.get("tool_choice")
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type", "function") == "function" and isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return choice
    elif choice in (None, "auto", "none", "required"):
        return choice
    raise bad("tool_choice must be 'auto', 'none', 'required' or {type: 'function', function: {name}}",
              "tool_choice")


def _tools(data: dict) -> tuple[list[dict] | None, ToolCalls | None]:
    for legacy in ("functions", "function_call"):
        if data.get(legacy) is not None:
            raise bad(f"'{legacy}' (OpenAI's deprecated form) is not supported: use 'tools'", legacy)
    if data.get("parallel_tool_calls") is False:
        raise bad("parallel_tool_calls=false is not supported: Gemma may call several tools in one reply",
                  "parallel_tool_calls")
    tools = _get(data, "tools", list)
    choice = _tool_choice(data)
    if not tools and choice not in (None, "auto", "none"):
        raise bad("tool_choice forces a call, but no tools are given", "tool_choice")
    if not tools or choice == "none":
        return None, None
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad("each tool must be {type: 'function', function: {name, description?, parameters?}}",
                      f"tools[{i}]")
        if tool.get("type", "function") != "function":
            raise bad(f"tool type {tool.get('type')!r} is not supported (only 'function')", f"tools[{i}].type")
        if not TOOL_NAME.fullmatch(fn["name"]):  # the reply parser reads no other name back
            raise bad(f"tool name {fn['name'][:40]!r} must be 1-64 letters, digits, '_', '.' or '-'",
                      f"tools[{i}].function.name")
        if fn["name"] in names:
            raise bad(f"tool name {fn['name']!r} is given twice", f"tools[{i}].function.name")
        names.add(fn["name"])
        params = fn.get("parameters")
        if params is not None and not (isinstance(params, dict) and isinstance(params.get("properties", {}), dict)):
            raise bad("parameters must be a JSON Schema object (its 'properties' an object)",
                      f"tools[{i}].function.parameters")
        if fn.get("strict") not in (None, True, False):
            raise bad("strict must be true or false", f"tools[{i}].function.strict")
    only = choice["function"]["name"] if isinstance(choice, dict) else None
    if only is not None and only not in names:
        raise bad(f"tool_choice names {only[:40]!r}, which is not among the tools", "tool_choice.function.name")
    strict = any(tool["function"].get("strict") is True for tool in tools)
    return tools, ToolCalls(required=choice == "required" or only is not None, only=only, strict=strict)


def _response_format(data: dict) -> Grammar | None:
    """OpenAI's response_format: text (free), json_object (any JSON object) or json_schema
    ({"json_schema": {"name", "schema", "strict"?}}), enforced by constrained decoding."""
    fmt = _get(data, "response_format", dict)
    kind = "text" if fmt is None else fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.any_json()
    if kind != "json_schema":
        raise bad(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                  "response_format.type")
    spec = fmt.get("json_schema")
    schema = spec.get("schema", {}) if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise bad("response_format.json_schema must be an object with a 'schema' object",
                  "response_format.json_schema")
    try:
        return Grammar.json_schema(schema)
    except GrammarError as e:
        raise bad(str(e), "response_format.json_schema.schema") from None


def parse_chat(data: dict, default_max_tokens: int, defaults: dict | None = None) -> ChatRequest:
    _get(data, "model", str)  # any name: the loaded model answers (a number or an object is a mistake)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array", "messages")
    grammar = _response_format(data)
    params, given = sampling_params(data, default_max_tokens, defaults)
    stream, usage = _stream(data)
    top = None
    if _get(data, "logprobs", bool, False):
        top = _get(data, "top_logprobs", int, 0)
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
    elif data.get("top_logprobs") is not None:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    image_tokens = _get(data, "image_tokens", int)
    if image_tokens is not None and image_tokens not in SOFT_TOKEN_BUDGETS:
        raise bad(f"image_tokens must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}", "image_tokens")
    tools, calls = _tools(data)
    if tools and grammar is not None:
        raise bad("response_format with tools is not supported: the answer's grammar would exclude tool calls",
                  "response_format")
    return ChatRequest(messages, params, given, stream, usage, top, _thinking(data), tools, image_tokens, grammar,
                       calls)


def parse_completion(data: dict, default_max_tokens: int, defaults: dict | None = None) -> CompletionRequest:
    _get(data, "model", str)  # as in parse_chat
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    # (the first id tells ids from a batch of prompts; the rest are checked once the length fits)
    ok_ids = isinstance(prompt, list) and prompt and isinstance(prompt[0], int) and not isinstance(prompt[0], bool)
    if not (isinstance(prompt, str) and prompt) and not ok_ids:
        raise bad("'prompt' must be a non-empty string or token-id array (one prompt per request)", "prompt")
    if data.get("suffix"):
        raise bad("suffix is not supported", "suffix")
    grammar = _response_format(data)
    params, given = sampling_params(data, default_max_tokens, defaults)
    stream, usage = _stream(data)
    top = _get(data, "logprobs", int)
    if top is not None and not 0 <= top <= 5:
        raise bad("logprobs must be between 0 and 5", "logprobs")
    echo = _get(data, "echo", bool, False)
    if echo and stream:
        raise bad("echo is not supported with stream", "echo")
    return CompletionRequest(prompt, params, given, stream, usage, top, echo, grammar)


# ------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None,
          cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens whose KV cache was reused."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


def tool_call(call, index: int | None = None) -> dict:
    """An OpenAI tool call from a chat.ToolCall (ids are made here; arguments are a JSON string)."""
    out = {"id": "call_" + secrets.token_hex(12), "type": "function",
           "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return out if index is None else {"index": index, **out}


@dataclass
class Envelope:
    """What every response or chunk of one request shares."""

    id: str
    model: str
    object: str
    created: int = field(default_factory=lambda: int(time.time()))

    def wrap(self, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def chat_message(content: str, reasoning: str, calls: list[dict]) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    return None if entries is None else {"content": entries, "refusal": None}


def logprob_entry(token: str, raw: bytes, logprob: float, top: list[tuple[str, bytes, float]] | None) -> dict:
    entry = {"token": token, "logprob": logprob, "bytes": list(raw)}
    if top is not None:
        entry["top_logprobs"] = [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in top]
    return entry


def completion_logprobs(entries: list[dict], offsets: list[int]) -> dict:
    """The legacy completions shape, from chat-style entries and where each token starts in the
    text. Each top_logprobs holds the sampled token too, as OpenAI's does (up to logprobs + 1)."""
    def top(e: dict) -> dict:
        alternatives = {t["token"]: t["logprob"] for t in e.get("top_logprobs", [])}
        return {**alternatives, e["token"]: e["logprob"]}

    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [top(e) for e in entries], "text_offset": offsets}


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
