"""Gemma chat formatting: shipped templates in a sandbox, our own renderers, reply parsing.

A checkpoint's chat template is untrusted code. It runs in Jinja's immutable sandbox with the
context transformers gives it; each template is also rewritten when parsed so that loop
iterations, macro calls and the strings it builds are counted against a per-render budget.
For checkpoints without a template, `render_gemma4` / `render_gemma3` follow the spec (§9, §10.3).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import json
import math
import re
import string
import time
from collections.abc import Iterable, ItemsView, KeysView, Mapping, ValuesView
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_OUTPUT_CHARS = 4_000_000  # the rendered prompt, and any single string a template builds
MAX_BUILT_CHARS = 8 * MAX_OUTPUT_CHARS  # all strings a render builds, summed
# Loop iterations + macro calls per render (a macro call costs ~20 us): this many, plus the
# square of the number of messages (the published Gemma 4 template scans the earlier messages
# for every message: ~0.5 n^2 steps, so a flat 100k refused chats of 450 messages).
MAX_STEPS = 100_000
MAX_SECONDS = 5.0
MAX_NESTING = 100  # levels of lists/dicts in messages and tools: far past any real tool schema
ROLES = frozenset({"system", "developer", "user", "assistant", "model", "tool"})
QUOTE = '<|"|>'  # Gemma 4's string quote inside tool syntax


class ChatTemplateError(ValueError):
    """Bad messages, or a chat template that failed, broke the sandbox or hit a limit."""


class BrokenTemplate(ChatTemplateError):
    """The template itself does not compile: the model's fault, which no request can mend."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    content: str
    reasoning: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


# ------------------------------------------------------------------------------ message checks


def _check_nesting(value: Any, what: str) -> None:
    """Refuses lists and dicts nested past MAX_NESTING, before anything recursive (our tool
    syntax writer, the copy templates see, json) meets them."""
    level = [value]
    for _ in range(MAX_NESTING + 1):
        # keyed by id: a container that appears many times is walked once per level
        inner = {id(x): x for v in level if isinstance(v, (list, tuple, Mapping))
                 for x in (list(v.keys()) + list(v.values()) if isinstance(v, Mapping) else v)}
        level = list(inner.values())
        if not level:
            return
    raise ChatTemplateError(f"{what} nest deeper than {MAX_NESTING} levels")


def _validate(messages: Any) -> list[dict]:
    """Fail early, in one line, rather than deep inside a template."""
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list of dicts, not {type(messages).__name__}")
    _check_nesting(messages, "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"message {i} is a {type(m).__name__}, not a dict")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ChatTemplateError(f"message {i} has unknown role {role!r}")
        content = m.get("content")  # None or missing: OpenAI tool-call messages carry null
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise ChatTemplateError(f"message {i} ({role}) has no content")
        if content is not None and not isinstance(content, (str, list)):
            kind = type(content).__name__
            raise ChatTemplateError(f"message {i} content must be a str or a list, not {kind}")
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ChatTemplateError(f"message {i} has a content part without a str 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"message {i} has a text part whose 'text' is not a str")
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(map(_call_name, calls))):
            raise ChatTemplateError(f"message {i} tool_calls must be [{{function: {{name, ...}}}}]")
    # a str Enum role is its value ("user"), not its str() ("Role.USER"), as templates see it
    return [m if type(m["role"]) is str else {**m, "role": str.__str__(m["role"])} for m in messages]


def _validate_tools(tools: Any) -> None:
    if tools is not None and not isinstance(tools, list):
        raise ChatTemplateError(f"tools must be a list of tool definitions, not {type(tools).__name__}")
    _check_nesting(tools, "tools")


def _call_name(call: Any) -> str | None:
    fn = call.get("function", call) if isinstance(call, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) and name else None


def _plain(value: Any) -> Any:
    """Rebuilds what templates see from JSON types, as transformers does: rich objects (decoded
    images...) have methods the sandbox does not know to be dangerous. Numpy scalars become their
    Python values, dataclasses and pydantic models their fields (np.bool_(False) had read as
    true, np.int64(3) as "<int64>")."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    for base in (str, int, float):  # the base type's own conversion: a str Enum's "user", not "Role.USER"
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(map(_plain, value)) if isinstance(value, tuple) else list(map(_plain, value))
    python = _python_value(value)
    return _plain(python) if python is not value else f"<{type(value).__name__}>"


def _python_value(value: Any) -> Any:
    """A numpy scalar's Python value, a dataclass's or pydantic model's fields as a dict (what
    transformers renders them as); `value` itself for anything else."""
    if type(value).__module__ == "numpy" and type(value).__name__ != "ndarray" and hasattr(value, "item"):
        return value.item()  # a numpy scalar (np.generic); arrays stay placeholders, as in transformers
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return value.model_dump()
    return value


# ------------------------------------------------------------------------------ sandbox budget


class _LimitError(Exception):
    pass


class _Budget:
    __slots__ = ("steps", "max_steps", "chars", "deadline")

    def __init__(self, messages: int = 0) -> None:
        self.steps, self.chars, self.deadline = 0, 0, time.monotonic() + MAX_SECONDS
        self.max_steps = MAX_STEPS + messages * messages


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("gemmarun_chat_budget")


def _size(value: Any, limit: int = MAX_OUTPUT_CHARS) -> int:
    """Rough len(str(value)), counted until it passes `limit`. Containers may hold one big
    string many times, so their repr can be far larger than their memory."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes, bytearray)):
            total += len(v) + 2
        elif isinstance(v, Mapping):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        else:
            total += 8
    return total


def _need(n: int, what: str = "string") -> None:
    if n > MAX_OUTPUT_CHARS:
        raise _LimitError(f"{what} of ~{n} chars is over the {MAX_OUTPUT_CHARS}-char limit")


def _charge(value: Any) -> Any:
    budget = _BUDGET.get()
    n = len(value) if isinstance(value, str) else _size(value)
    _need(n)
    budget.chars += n
    if budget.chars > MAX_BUILT_CHARS:
        raise _LimitError(f"template built more than {MAX_BUILT_CHARS} chars")
    if time.monotonic() > budget.deadline:
        raise _LimitError(f"template ran longer than {MAX_SECONDS}s")
    return value


@jinja2.pass_context  # pass_context also keeps the optimizer from calling these at compile time
def _step(context: Any, value: Any = None) -> Any:
    budget = _BUDGET.get()
    budget.steps += 1
    if budget.steps > budget.max_steps:
        raise _LimitError(f"template ran more than {budget.max_steps} loop iterations and macro calls")
    if budget.steps % 256 == 0 and time.monotonic() > budget.deadline:
        raise _LimitError(f"template ran longer than {MAX_SECONDS}s")
    return value


@jinja2.pass_context
def _emit(context: Any, value: Any) -> str:
    if not isinstance(value, str):
        _need(_size(value))
        value = str(value)
    return _charge(value)


@jinja2.pass_context
def _measure(context: Any, value: Any) -> Any:
    _need(_size(value), "list or dict")
    return value


@jinja2.pass_context
def _concat(context: Any, *values: Any) -> str:
    _need(sum(_size(v) for v in values))
    return _charge("".join(map(str, values)))


def _filter(node: nodes.Expr, name: str, args: list | None = None) -> nodes.Filter:
    return nodes.Filter(node, name, args or [], [], None, None)


_CONSTANT_PARTS = (nodes.Const, nodes.List, nodes.Tuple, nodes.Dict, nodes.Pair)


class _Guards(NodeTransformer):
    """Routes loop bodies and tests, macro bodies, output and `~` through the budget filters."""

    def _count_body(self, node: Any) -> Any:
        self.generic_visit(node)
        node.body.insert(0, nodes.ExprStmt(_filter(nodes.Const(None), "gemmarun_step")))
        return node

    def visit_For(self, node: nodes.For) -> nodes.For:
        self._count_body(node)
        if node.test is not None:  # items the test drops never reach the body
            node.test = nodes.And(_filter(nodes.Const(True), "gemmarun_step"), node.test)
        return node

    visit_Macro = visit_CallBlock = _count_body

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        data = nodes.TemplateData
        node.nodes = [_filter(nodes.Const(c.data) if isinstance(c, data) else c, "gemmarun_emit")
                      for c in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return _filter(node.nodes[0], "gemmarun_concat", node.nodes[1:])

    def _measure(self, node: Any) -> Any:
        # [a, a] doubles what it holds without copying it: forty of them nest 2**40 items, which
        # `==` or `in` walk in C, where no deadline can stop them
        self.generic_visit(node)
        if getattr(node, "ctx", "load") != "load":  # a target: {% for k, v in ... %}
            return node
        if all(isinstance(n, _CONSTANT_PARTS) for n in node.find_all(nodes.Node)):
            return node  # ['user', 'assistant']: as large as its source, whatever it is run on
        return _filter(node, "gemmarun_measure")

    visit_List = visit_Tuple = visit_Dict = _measure


def _check_format(fmt: str, args: Any, percent: bool) -> None:
    """Refuses huge or computed field widths ('%999999999s', '{:>{0}}') before they allocate."""
    if percent:
        specs = re.findall(r"%[^a-zA-Z%]*", fmt)
    else:
        specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt)]
    if any("*" in s or "{" in s or re.search(r"\d{7,}", s) for s in specs):
        raise _LimitError("format field width too large or computed")
    _need(len(fmt) + _size(args))


def _replace_size(s: str, old: str, new: str) -> int:
    return len(s) + (s.count(old) if old else len(s) + 1) * max(len(new) - len(old), 0)


def _filter_size(name: str, a: dict[str, Any]) -> int:
    """Result size, before running, of the filters that can amplify their input in one call."""
    if name == "replace":
        return _replace_size(str(a["s"]), str(a["old"]), str(a["new"]))
    if name == "center":
        return max(_size(a["value"]), a.get("width", 80))
    if name == "indent":
        s, width = str(a["s"]), a.get("width", 4)
        return len(s) + (s.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))
    if name == "wordwrap":  # worst case: a line per char
        return _size(a["s"]) * (1 + len(str(a.get("wrapstring") or "\n")))
    if name in ("batch", "slice"):  # up to n fill items; slice also loops n times
        n, fill = a.get("linecount", a.get("slices", 0)), a.get("fill_with")
        return n * (1 + (_size(fill) if fill is not None else 0)) if isinstance(n, int) else 0
    if name == "format":
        _check_format(str(a["value"]), (a.get("args"), a.get("kwargs")), True)
    elif name == "join":
        return sum(_size(x) for x in a["value"]) + len(a["value"]) * len(str(a.get("d", "")))
    elif name == "sum" and not isinstance(a.get("start", 0), (int, float)):
        raise _LimitError("sum with a start that is not a number (lists and strings sum in quadratic time)")
    elif name == "tojson" and max(_size(a.get("indent")), _size(a.get("separators"))) > 64:
        raise _LimitError("tojson indent or separators too large")
    elif name == "tojson" and isinstance(a.get("indent"), int) and a["indent"] > 64:
        raise _LimitError("tojson indent too large")
    return 0


_AMPLIFIERS = frozenset(
    {"replace", "center", "indent", "wordwrap", "batch", "slice", "format", "join", "tojson", "sum"}
)


def _guard_filter(name: str, f: Any) -> Any:
    """Wraps a filter: its input must be printable within the limit, the amplifiers' results are
    estimated before they run, and every result is charged."""
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0
    signature = None
    if name in _AMPLIFIERS:  # bind by name, without the context/environment argument
        params = list(inspect.signature(f).parameters.values())
        if skip and params[0].name in ("eval_ctx", "context", "environment", "env"):
            params = params[1:]
        signature = inspect.Signature(params)

    @functools.wraps(f)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        head, args = args[:skip], args[skip:]
        if args:
            _need(_size(args[0]))
        if signature is not None:
            bound = signature.bind(*args, **kwargs)
            if name == "join" and not isinstance(bound.arguments["value"], (list, tuple, str)):
                bound.arguments["value"] = list(bound.arguments["value"])  # measured, then joined
            _need(_filter_size(name, bound.arguments), f"result of filter {name!r}")
            args, kwargs = bound.args, bound.kwargs
        return _charge(f(*head, *args, **kwargs))

    return guarded


def _check_method(obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Pre-checks the str methods that can amplify; returns args, with a join's iterable made a
    list so it can be measured."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
    if isinstance(owner, int) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        _need(length if isinstance(length, int) else 0, "bytes")
        return args
    if not isinstance(owner, (str, bytes, bytearray)):
        return args
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _need(args[0])
    elif name == "expandtabs":
        _need(len(owner) * (args[0] if args and isinstance(args[0], int) else 8))
    elif name == "replace" and len(args) >= 2:
        _need(_replace_size(owner, str(args[0]), str(args[1])))
    elif name == "join" and args:
        items = list(args[0])
        _need(sum(_size(x) for x in items) + len(items) * len(owner))
        args = (items, *args[1:])
    elif name in ("format", "format_map"):
        _check_format(owner, (args, kwargs), False)
    return args


def _check_binop(op: str, left: Any, right: Any) -> None:
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "*" and ints and left.bit_length() + right.bit_length() > 1 << 20:
        raise _LimitError("integer product too large")
    elif op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, bytearray, list, tuple)) and isinstance(n, int):
                _need((len(seq) if isinstance(seq, (str, bytes, bytearray)) else _size(seq)) * max(n, 0))
    elif op == "**" and ints and abs(left) > 1 and left.bit_length() * right > 1 << 20:
        raise _LimitError("integer power too large")
    elif op == "%" and isinstance(left, str):
        _check_format(left, right, True)


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _Guards().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _charge(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        args = _check_method(__obj, args, kwargs)
        return _charge(super().call(__context, __obj, *args, **kwargs))


class _GenerationTag(Extension):
    """`{% generation %}` (transformers' assistant-mask tag) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _TemplateDict:
    """`dict()` for templates without handing out the type itself (as transformers does)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Refuses underscore names, which lead to CPython internals (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's signature trick)
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' filter: no HTML escaping, unlike Jinja's own tojson
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> _GuardedEnvironment:
    if tuple(map(int, re.findall(r"\d+", jinja2.__version__)[:3])) < (3, 1, 6):
        # as transformers: older versions have known sandbox escapes
        raise ChatTemplateError(f"jinja2>=3.1.6 is needed, found {jinja2.__version__}")
    # options, filters and globals as transformers' utils/chat_template_utils.py sets them
    env = _GuardedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.filters.update({name: _guard_filter(name, f) for name, f in env.filters.items()})
    env.filters.update(gemmarun_step=_step, gemmarun_emit=_emit, gemmarun_concat=_concat,
                       gemmarun_measure=_measure)
    env.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs in one call
    env.globals.update(raise_exception=_raise_exception, dict=_TemplateDict(),
                       strftime_now=lambda fmt: datetime.now().strftime(fmt), namespace=_Namespace)
    return env


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def render_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    tools: list[dict] | None = None,
    bos_token: str = "<bos>",
    eos_token: str = "<eos>",
    extra: dict | None = None,
) -> str:
    """Renders a checkpoint's Jinja chat template in the sandbox, with the variables transformers
    passes (`extra` adds more, and may override bos_token, eos_token and enable_thinking).

    Raises ChatTemplateError for bad messages, template errors, sandbox violations and limits.
    """
    chat = []
    _validate_tools(tools)
    for m in _plain(_validate(messages)):  # reasoning under every name templates read, as HF does
        keys = ("reasoning_content", "thinking", "reasoning")
        reasoning = next((m[k] for k in keys if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    context = {"bos_token": bos_token, "eos_token": eos_token, "enable_thinking": enable_thinking}
    context.update(_plain(dict(extra or {})))
    clash = {"messages", "tools", "documents", "add_generation_prompt"} & context.keys()
    if clash:
        raise ChatTemplateError(f"extra may not set {sorted(clash)}")
    _environment()  # fails on an unsafe jinja2
    token = _BUDGET.set(_Budget(len(chat)))
    try:
        try:
            compiled = _compile(template)
        except jinja2.TemplateSyntaxError as e:
            raise BrokenTemplate(f"the chat template does not compile: line {e.lineno}: {_one_line(e)}") from None
        out, n = [], 0
        for chunk in compiled.generate(messages=chat, tools=_plain(tools), documents=None,
                                       add_generation_prompt=add_generation_prompt, **context):
            n += len(chunk)
            _need(n, "rendered prompt")
            out.append(chunk)
        return "".join(out)
    except BrokenTemplate:
        raise
    except _LimitError as e:
        raise ChatTemplateError(f"chat template hit a limit: {_one_line(e)}") from e
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template broke the sandbox: {_one_line(e)}") from e
    except Exception as e:  # whatever the template raised: its own error, TypeError, RecursionError
        message = f"{type(e).__name__}: {_one_line(e)}"
        raise ChatTemplateError(f"chat template failed: {message}") from e
    finally:
        _BUDGET.reset(token)


# ------------------------------------------------------------------------------ our renderers


def tool_key_order(keys: Iterable[Any]) -> list[Any]:
    """The order of an object's keys in Gemma 4's tool syntax: Jinja's dictsort's, ignoring case,
    ties as given (what the templates write, and so what tool-call grammars ask for)."""
    return sorted(keys, key=lambda k: str(k).lower())


def format_tool_value(v: Any) -> str:
    """Gemma 4 tool syntax (§9.2 rule 5): <|"|>str<|"|>, {k:v} with sorted keys, [a,b], JSON
    numbers, true/false/null."""
    if isinstance(v, str):
        return f"{QUOTE}{v}{QUOTE}"
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, (int, float)):
        return json.dumps(v)
    if isinstance(v, Mapping):  # sorted as Jinja's dictsort sorts: ignoring case, ties as given
        return "{" + ",".join(f"{k}:{format_tool_value(v[k])}" for k in tool_key_order(v)) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(format_tool_value, v)) + "]"
    python = _python_value(v)
    if python is not v:
        return format_tool_value(python)
    raise ChatTemplateError(f"cannot write a {type(v).__name__} as a tool value")


_G4_MEDIA = {"image": "<|image|>", "image_url": "<|image|>", "audio": "<|audio|>",
             "input_audio": "<|audio|>", "video": "<|video|>"}
_G3_MEDIA = {"image": "<start_of_image>", "image_url": "<start_of_image>"}
_CHANNEL_RE = re.compile(r"<\|channel>.*?(?:<channel\|>|\Z)", re.S)  # a reply cut mid-thought: to the end


def without_thoughts(text: str) -> str:
    """An earlier model turn's text without its thinking channels, as the renderers write it back."""
    return _CHANNEL_RE.sub("", text)


def _content(message: dict, media: dict[str, str], model: str) -> str:
    content = message.get("content")
    if not isinstance(content, list):
        return (content or "").strip()
    out = []
    for part in content:
        if part["type"] == "text":
            out.append(part["text"].strip())
        elif part["type"] in media:
            out.append(media[part["type"]])
        else:
            raise ChatTemplateError(f"{model} cannot render a content part of type {part['type']!r}")
    return "".join(out)


def _tool_call(call: dict) -> str:
    name, args = _call_name(call), call.get("function", call).get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            raise ChatTemplateError(f"tool call {name!r}: arguments are not valid JSON") from None
        _check_nesting(args, f"tool call {name!r}: arguments")
    if not isinstance(args, dict):
        raise ChatTemplateError(f"tool call {name!r}: arguments must be an object")
    return f"<|tool_call>call:{name}{format_tool_value(args)}<tool_call|>"


def _declaration(tool: Any) -> str:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatTemplateError("each tool must be {type: function, function: {name, ...}}")
    body = {k: fn[k] for k in ("description", "parameters") if fn.get(k) is not None}
    if "parameters" in body:
        body["parameters"] = _upper_types(body["parameters"])
    return f"<|tool>declaration:{fn['name']}{format_tool_value(body)}<tool|>"


_SUBSCHEMA = ("items", "additionalProperties", "not")  # keys whose value is one schema
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")  # ... a list of schemas
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")  # ... a map to schemas


def _upper_types(schema: Any) -> Any:
    """A parameters schema with its `type` names upper-cased (STRING, OBJECT), as the published
    Gemma 4 templates write declarations: the schema's own and its subschemas', not a `type` key
    inside a default, an example or an enum value."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    if isinstance(out.get("type"), str):
        out["type"] = out["type"].upper()
    elif isinstance(out.get("type"), list):  # ["string", "null"]: OpenAI strict mode's nullable field
        out["type"] = [t.upper() if isinstance(t, str) else t for t in out["type"]]
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), Mapping):
            out[key] = _upper_types(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_upper_types(v) for v in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: _upper_types(v) for name, v in out[key].items()}
    return out


def render_gemma4(
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    tools: list[dict] | None = None,
    empty_thought_when_off: bool = True,
) -> str:
    """Gemma 4 prompt from the spec's rules (§9.2), for checkpoints that ship no template.

    Where revisions differ we pick: `<|think|>` with no newline, bare media placeholders, no
    re-emitted reasoning. As every published revision does, declarations upper-case their
    parameter types and keys sort ignoring case. A model turn with tool calls stays open; the tool responses follow in
    it and the next assistant message continues it (as the model does after `<|tool_response>`).
    """
    msgs = _validate(messages)
    _validate_tools(tools)
    out = ["<bos>"]
    has_system = bool(msgs) and msgs[0]["role"] in ("system", "developer")
    if has_system or tools or enable_thinking:
        system = _content(msgs[0], _G4_MEDIA, "Gemma 4") if has_system else ""
        think = "<|think|>" if enable_thinking else ""
        decls = "".join(map(_declaration, tools or ()))
        out.append(f"<|turn>system\n{think}{system}{decls}<turn|>\n")
    open_turn, names, ids, answered = False, [], {}, 0
    for i, m in enumerate(msgs[1:] if has_system else msgs, start=int(has_system)):
        role = m["role"]
        if role == "tool":
            call_id = m.get("tool_call_id")
            name = m.get("name") or (ids.get(call_id) if isinstance(call_id, str) else None)
            name = name or (names[answered] if answered < len(names) else None)
            if not open_turn or not isinstance(name, str):
                raise ChatTemplateError(f"message {i}: a tool message must answer a tool call")
            text = _content(m, {}, "a tool response")
            try:
                result = json.loads(text)
                _check_nesting(result, "the tool response")
            except (ValueError, RecursionError):  # ChatTemplateError is a ValueError: too deep is text
                result = None
            result = result if isinstance(result, dict) else {"value": text}
            response = f"response:{name}{format_tool_value(result)}"
            out.append(f"<|tool_response>{response}<tool_response|>")
            answered += 1
        elif role in ("assistant", "model"):
            if not open_turn:
                out.append("<|turn>model\n")
            out.append(without_thoughts(_content(m, _G4_MEDIA, "Gemma 4")).strip())
            calls = m.get("tool_calls") or []
            out.extend(map(_tool_call, calls))
            names, answered = [_call_name(c) for c in calls], 0
            ids = {c["id"]: _call_name(c) for c in calls if isinstance(c.get("id"), str) and c["id"]}
            open_turn = bool(calls)
            if not open_turn:
                out.append("<turn|>\n")
        else:
            if open_turn:
                out.append("<turn|>\n")
                open_turn = False
            role = "system" if role == "developer" else role
            out.append(f"<|turn>{role}\n{_content(m, _G4_MEDIA, 'Gemma 4')}<turn|>\n")
    if add_generation_prompt and not open_turn:
        out.append("<|turn>model\n")
        if not enable_thinking and empty_thought_when_off:
            out.append("<|channel>thought\n<channel|>")
    return "".join(out)


def render_gemma3(messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """Gemma 3 prompt (§10.3). Gemma 3 has no system role: a leading system message's trimmed
    text goes before the first user turn's content, followed by a blank line (the published
    Gemma 3 template does the same, untrimmed). Roles must alternate user/model."""
    msgs = _validate(messages)
    prefix, offset = "", 0
    if msgs and msgs[0]["role"] in ("system", "developer"):
        prefix, msgs, offset = _content(msgs[0], _G3_MEDIA, "Gemma 3") + "\n\n", msgs[1:], 1
        if not msgs:
            raise ChatTemplateError("Gemma 3 has no system turn: a user message must follow it")
    out = ["<bos>"]
    for i, m in enumerate(msgs):
        role = {"user": "user", "assistant": "model", "model": "model"}.get(m["role"])
        if role != ("user" if i % 2 == 0 else "model") or m.get("tool_calls"):
            raise ChatTemplateError(f"message {i + offset} ({m['role']}): Gemma 3 roles must "
                                    "alternate user/model, starting with user, without tools")
        text = _content(m, _G3_MEDIA, "Gemma 3")
        out.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{text}<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


# ------------------------------------------------------------------------------ reply parsing

THINK_OPEN, THINK_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
RESPONSE_OPEN = "<|tool_response>"  # the model expects a tool result: the reply is over
SWITCHES = (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE, RESPONSE_OPEN, QUOTE)  # markers that move text
# Printed in real vocabularies but never text: a reply drops them wherever they appear.
MARKERS = (*SWITCHES, "<tool_response|>",
           "<|tool>", "<tool|>", "<|turn>", "<turn|>", "<|think|>", "<start_of_turn>", "<end_of_turn>",
           "<|image>", "<|image|>", "<image|>", "<|audio>", "<|audio|>", "<audio|>", "<|video|>",
           "<start_of_image>", "<end_of_image>", "<bos>", "<eos>", "<pad>", "<mask>")
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS))
_THOUGHT_RE = re.compile(r"<\|channel>(?:thought\n)?(.*?)(?:<channel\|>|\Z)", re.S)
_CALL_RE = re.compile(r"<\|tool_call>(.*?)<tool_call\|>", re.S)
_TAIL_RE = re.compile(r"(?:\s*(?:<turn\|>|<eos>|<\|tool_response>))+\s*\Z")
TOOL_NAME = re.compile(r"[\w.\-]{1,64}")  # what a call's name may be (requests check tools against it)
_CALL_HEAD_RE = re.compile(rf"\s*call:({TOOL_NAME.pattern})(?=\{{)")
_KEY_RE = re.compile(r"[^:{}\[\],<]+")
_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


class _Malformed(Exception):
    pass


def _skip_space(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _parse_value(s: str, i: int) -> tuple[Any, int]:
    """Inverse of format_tool_value, reading from s[i:]; returns (value, end). Whitespace around
    keys, values and separators is allowed (`{city: "Paris", days: 2}`), and a key or a string
    value may be a JSON string (as transformers' Gemma 4 parser reads them)."""
    i = _skip_space(s, i)
    if s.startswith(QUOTE, i):
        end = s.find(QUOTE, i + len(QUOTE))
        if end < 0:
            raise _Malformed
        return s[i + len(QUOTE) : end], end + len(QUOTE)
    if s.startswith('"', i):
        try:
            return json.decoder.scanstring(s, i + 1)
        except ValueError:
            raise _Malformed from None
    if s.startswith(("{", "["), i):
        close = "}" if s[i] == "{" else "]"
        out: Any = {} if close == "}" else []
        i = _skip_space(s, i + 1)
        while not (s.startswith(close, i) and not out):  # `{}` / `[]` leave at once
            if close == "]":
                item, i = _parse_value(s, i)
                out.append(item)
            else:
                key_match = None if s.startswith(QUOTE, i) else _KEY_RE.match(s, i)
                if key_match:
                    key, i = _bare_key(key_match.group(0)), key_match.end()
                else:
                    key, i = _parse_value(s, i)  # a quoted key, else raises
                i = _skip_space(s, i)
                if not isinstance(key, str) or not s.startswith(":", i):
                    raise _Malformed
                out[key], i = _parse_value(s, i + 1)
            i = _skip_space(s, i)
            if s.startswith(close, i):
                break
            if not s.startswith(",", i):
                raise _Malformed
            i = _skip_space(s, i + 1)
        return out, i + 1
    for word, value in (("true", True), ("false", False), ("null", None)):
        if s.startswith(word, i):
            return value, i + len(word)
    number = _NUM_RE.match(s, i)
    if not number:
        raise _Malformed
    value = json.loads(number.group(0))
    # past float's range (1e400) JSON has no number for it (json.dumps would write "Infinity"):
    # the digits as written, as a string
    finite = not isinstance(value, float) or math.isfinite(value)  # (an int of any length is JSON)
    return (value if finite else number.group(0)), number.end()


def _bare_key(text: str) -> str:
    """A key as written before its colon: trimmed, and unquoted when it is a JSON string."""
    key = text.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        try:
            key = json.loads(key)
        except ValueError:
            raise _Malformed from None
    if not key:
        raise _Malformed
    return key


def _parse_call(body: str) -> ToolCall | None:
    head = _CALL_HEAD_RE.match(body)
    if not head:
        return None
    try:
        args, end = _parse_value(body, head.end())
    except (_Malformed, ValueError, RecursionError):
        return None
    return ToolCall(head.group(1), args) if not body[end:].strip() else None


def parse_reply(text: str) -> Reply:
    """Splits Gemma 4 output (decoded with special tokens) into content, reasoning and calls, as
    `reply.ReplyStream` does while the tokens arrive.

    A malformed (or unclosed) tool call stays in the content as its text, `<|"|>` as `"`; an
    unclosed thought channel (the reply ran out of tokens while thinking) is all reasoning;
    marker and special-token text is dropped everywhere.
    """
    text = _TAIL_RE.sub("", text)
    thoughts = [_MARKER_RE.sub("", m.group(1)).strip() for m in _THOUGHT_RE.finditer(text)]
    calls: list[ToolCall] = []

    def take(m: re.Match) -> str:
        call = _parse_call(m.group(1))
        if call is not None:
            calls.append(call)
        return "" if call is not None else m.group(1).replace(QUOTE, '"')

    content = _CALL_RE.sub(take, _THOUGHT_RE.sub("", text))
    head, opened, body = content.partition(CALL_OPEN)  # a call the reply ended inside
    content = head + body.replace(QUOTE, '"') if opened else content
    content = _MARKER_RE.sub("", content).strip()
    return Reply(content, "\n".join(t for t in thoughts if t) or None, calls)
