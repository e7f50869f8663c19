"""Chat formatting: our renderers against the spec's rules, the sandbox against hostile
templates, and render_template against transformers' own chat-template rendering."""

from __future__ import annotations

import time

import pytest

from gemmarun.chat import (
    MAX_OUTPUT_CHARS,
    BrokenTemplate,
    ChatTemplateError,
    Reply,
    ToolCall,
    format_tool_value,
    parse_reply,
    render_gemma3,
    render_gemma4,
    render_template,
)

Q = '<|"|>'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


# ------------------------------------------------------------------------------ Gemma 4


def test_spec_example_system_and_user_thinking_off():
    messages = [
        {"role": "system", "content": "You are concise."},
        {"role": "user", "content": "Name a prime."},
    ]
    expected = (
        "<bos><|turn>system\nYou are concise.<turn|>\n"
        "<|turn>user\nName a prime.<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert render_gemma4(messages) == expected


def test_no_system_turn_without_system_tools_or_thinking():
    out = render_gemma4([{"role": "user", "content": "  Hi  "}], empty_thought_when_off=False)
    assert out == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"


def test_thinking_on():
    user = [{"role": "user", "content": "Name a prime."}]
    assert render_gemma4(user, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nName a prime.<turn|>\n<|turn>model\n"
    )
    with_system = [{"role": "developer", "content": " Be brief. "}, *user]
    assert render_gemma4(with_system, enable_thinking=True).startswith(
        "<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\n"
    )


def test_no_generation_prompt():
    out = render_gemma4([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert out == "<bos><|turn>user\nHi<turn|>\n"


def test_multi_turn_strips_reasoning_from_model_turns():
    messages = [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "<|channel>thought\n2 is even, 3 works.<channel|>3"},
        {"role": "user", "content": "Another?"},
        {"role": "model", "content": [{"type": "text", "text": "<|channel>thought\nx<channel|>5"}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "<|channel>thought\ncut off by max_tokens"},  # never closed
        {"role": "user", "content": "Again"},
    ]
    assert render_gemma4(messages, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|><turn|>\n"
        "<|turn>user\nName a prime.<turn|>\n<|turn>model\n3<turn|>\n"
        "<|turn>user\nAnother?<turn|>\n<|turn>model\n5<turn|>\n"
        "<|turn>user\nThanks<turn|>\n<|turn>model\n<turn|>\n"
        "<|turn>user\nAgain<turn|>\n<|turn>model\n"
    )


def test_media_placeholders():
    content = [
        {"type": "image"},
        {"type": "text", "text": " What is in these? "},
        {"type": "image_url", "image_url": {"url": "x.png"}},
        {"type": "audio"},
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
        {"type": "video"},
    ]
    out = render_gemma4([{"role": "user", "content": content}], empty_thought_when_off=False)
    expected = "<|image|>What is in these?<|image|><|audio|><|audio|><|video|>"
    assert out == f"<bos><|turn>user\n{expected}<turn|>\n<|turn>model\n"
    with pytest.raises(ChatTemplateError, match="document"):
        render_gemma4([{"role": "user", "content": [{"type": "document"}]}])


def test_tool_declaration_call_and_response():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"unit": "C", "temperature": 21}'},
    ]
    prompt = render_gemma4(messages, tools=[WEATHER_TOOL])
    declaration = (
        f"<|tool>declaration:get_weather{{description:{Q}Current weather{Q},"
        f"parameters:{{properties:{{city:{{type:{Q}STRING{Q}}}}},required:[{Q}city{Q}],"
        f"type:{Q}OBJECT{Q}}}}}<tool|>"
    )
    assert prompt == (
        f"<bos><|turn>system\n{declaration}<turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n"
        f"<|turn>model\n<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
        f"<|tool_response>response:get_weather{{temperature:21,unit:{Q}C{Q}}}<tool_response|>"
    )  # no generation prompt: the model continues its open turn after the tool response

    answer = {"role": "assistant", "content": "It is 21 C."}
    answered = render_gemma4([*messages, answer], tools=[WEATHER_TOOL])
    assert answered == prompt + "It is 21 C.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"

    # the model's own output for the call parses back, and renders again identically
    generated = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|><|tool_response>"
    reply = parse_reply(generated)
    assert reply == Reply("", None, [ToolCall("get_weather", {"city": "Paris"})])
    calls = [{"function": {"name": c.name, "arguments": c.arguments}} for c in reply.tool_calls]
    again = [
        messages[0],
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "name": "get_weather", "content": "sunny"},
    ]
    assert render_gemma4(again, tools=[WEATHER_TOOL]) == prompt.replace(
        f"{{temperature:21,unit:{Q}C{Q}}}", f"{{value:{Q}sunny{Q}}}"
    )


def test_tool_message_errors():
    with pytest.raises(ChatTemplateError, match="tool message"):
        render_gemma4([{"role": "user", "content": "x"}, {"role": "tool", "name": "f", "content": "r"}])
    bad_call = {"function": {"name": "f", "arguments": "{oops"}}
    bad_args = {"role": "assistant", "tool_calls": [bad_call]}
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        render_gemma4([{"role": "user", "content": "x"}, bad_args])
    with pytest.raises(ChatTemplateError, match="each tool"):
        render_gemma4([{"role": "user", "content": "x"}], tools=[{"description": "no name"}])


def _nested(depth: int, leaf=1):
    for _ in range(depth):
        leaf = {"k": leaf}
    return leaf


def _call(arguments, **extra) -> dict:
    return {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": arguments}, **extra}]}


# What fuzz/chat_messages.py found: each was a RecursionError or TypeError traceback.
DEEP_MESSAGES = [_call({"a": _nested(5000)})]
DEEP_TOOLS = [{"function": {"name": "f", "parameters": _nested(5000)}}]
USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("render", "messages", "tools", "problem"),
    [
        (render_gemma4, DEEP_MESSAGES, None, "messages nest deeper than 100 levels"),
        (render_gemma4, USER, DEEP_TOOLS, "tools nest deeper than 100 levels"),
        (render_gemma4, [_call("[" * 5000 + "]" * 5000)], None, "arguments are not valid JSON"),
        (render_gemma4, [_call('{"a":' * 500 + "1" + "}" * 500)], None, "arguments nest deeper than 100 levels"),
        (render_gemma4, USER, 5, "tools must be a list"),
        (lambda m, tools: render_template(GEMMA_LIKE, m, tools=tools), DEEP_MESSAGES, None, "messages nest deeper"),
        (lambda m, tools: render_template(GEMMA_LIKE, m, tools=tools), USER, DEEP_TOOLS, "tools nest deeper"),
    ],
)
def test_hostile_nesting_and_types_are_chat_template_errors(render, messages, tools, problem):
    with pytest.raises(ChatTemplateError, match=problem):
        render(messages, tools=tools)


def test_odd_tool_call_ids_and_deep_tool_responses_render():
    calls = {"role": "assistant", "tool_calls": [{"id": [1], "function": {"name": "f"}},  # unhashable id
                                                  {"id": "b", "function": {"name": "g"}}]}
    out = render_gemma4([calls, {"role": "tool", "tool_call_id": [1], "content": "[" * 5000},  # json.loads
                         {"role": "tool", "content": '{"a":' * 500 + "1" + "}" * 500}])  # RecursionError
    assert "response:f{value:" in out and "response:g{value:" in out


# ------------------------------------------------------------------------------ tool values


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("Paris", f"{Q}Paris{Q}"),
        ("", f"{Q}{Q}"),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        (3, "3"),
        (-2.5, "-2.5"),
        (1e-05, "1e-05"),
        ([1, "a", [True]], f"[1,{Q}a{Q},[true]]"),
        ({"b": 1, "a": {"z": None, "c": []}}, "{a:{c:[],z:null},b:1}"),
        ({}, "{}"),
    ],
)
def test_format_tool_value(value, text):
    assert format_tool_value(value) == text


def test_format_tool_value_rejects_other_types():
    with pytest.raises(ChatTemplateError):
        format_tool_value({1, 2})


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"city": "São Paulo, {BR}: [x]", "days": 3, "metric": True, "extra": None},
        {"nested": {"list": [1, -2.5, "x", [], {}], "deep": {"a": [{"b": False}]}}, "n": 1e21},
        {"quote": 'say "hi"', "newline": "a\nb"},
    ],
)
def test_tool_call_round_trip(arguments):
    text = f"<|tool_call>call:do.thing-2{format_tool_value(arguments)}<tool_call|>"
    assert parse_reply(text).tool_calls == [ToolCall("do.thing-2", arguments)]


# ------------------------------------------------------------------------------ parse_reply


def test_parse_reply_reasoning_and_terminators():
    reply = parse_reply("<|channel>thought\nTwo is even.\n<channel|>Three.<turn|>")
    assert reply == Reply(content="Three.", reasoning="Two is even.", tool_calls=[])
    assert parse_reply("Plain answer<eos>") == Reply("Plain answer", None, [])
    assert parse_reply("<|channel>thought\n<channel|>Hi<turn|><eos>") == Reply("Hi", None, [])


def test_parse_reply_unclosed_thought_is_all_reasoning():
    assert parse_reply("<|channel>thought\nstill thinking") == Reply("", "still thinking", [])


def test_parse_reply_reasoning_then_two_calls():
    text = (
        "<|channel>thought\nneed both<channel|>"
        f"<|tool_call>call:a{{x:1}}<tool_call|><|tool_call>call:b{{y:[{Q}z{Q}]}}<tool_call|>"
        "<|tool_response>"
    )
    reply = parse_reply(text)
    assert reply.reasoning == "need both" and reply.content == ""
    assert reply.tool_calls == [ToolCall("a", {"x": 1}), ToolCall("b", {"y": ["z"]})]


@pytest.mark.parametrize(
    "body",
    [
        f"call:f{{a:{Q}unterminated}}",
        "call:f{a:1,}",
        "call:f{a 1}",
        "call:f[1]",
        "call:f{a:1}trailing",
        "call:f{a:bare}",
        "not a call",
        "call:f" + "{a:" * 5000 + "1" + "}" * 5000,
    ],
)
def test_malformed_tool_call_stays_in_content(body):
    """As its text, without the markers, as the streamed reply gives it (it had kept them)."""
    text = f"Before <|tool_call>{body}<tool_call|> after<turn|>"
    shown = body.replace(Q, '"')
    assert parse_reply(text) == Reply(f"Before {shown} after", None, [])
    assert parse_reply(f"Before <|tool_call>{body}") == Reply(f"Before {shown}", None, [])  # the reply ended in it


@pytest.mark.parametrize("body, arguments", [
    (f"call:f{{city:{Q}Paris{Q}, days:2}}", {"city": "Paris", "days": 2}),  # had given the key " days"
    ("call:f{ a : 1 }", {"a": 1}),
    ("call:f{\n  a: 1,\n  b: [1, 2 ],\n  c: { d: true }\n}", {"a": 1, "b": [1, 2], "c": {"d": True}}),
    ('call:f{"a":1,"b c":null}', {"a": 1, "b c": None}),  # JSON-quoted keys, unquoted (had kept the quotes)
    ("call:f{ }", {}),
])
def test_tool_call_arguments_tolerate_whitespace(body, arguments):
    """The template writes no spaces, but a model may: they had corrupted keys or made the call
    malformed (left in the content)."""
    assert parse_reply(f"<|tool_call>{body}<tool_call|>") == Reply("", None, [ToolCall("f", arguments)])


# ------------------------------------------------------------------------------ Gemma 3


def test_gemma3_rendering():
    messages = [
        {"role": "system", "content": "You are concise."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What? "}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    assert render_gemma3(messages) == (
        "<bos><start_of_turn>user\nYou are concise.\n\n<start_of_image>What?<end_of_turn>\n"
        "<start_of_turn>model\nA cat.<end_of_turn>\n"
        "<start_of_turn>user\nSure?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert render_gemma3([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    )


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "first"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
        [{"role": "user", "content": "a"}, {"role": "tool", "content": "1"}],
        [{"role": "system", "content": "only a system message"}],
        [{"role": "user", "content": [{"type": "audio"}]}],
    ],
)
def test_gemma3_rejects(messages):
    with pytest.raises(ChatTemplateError):
        render_gemma3(messages)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ({"role": "user", "content": "x"}, "must be a list"),
        (["hello"], "message 0 is a str"),
        ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
        ([{"content": "x"}], "unknown role None"),
        ([{"role": "user", "content": 42}], "content must be a str or a list"),
        ([{"role": "user", "content": [{"text": "x"}]}], "without a str 'type'"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "'text' is not a str"),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "tool_calls"),
        ([{"role": "user"}], r"message 0 \(user\) has no content"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None}], r"message 1 \(assistant\) has no"),
    ],
)
@pytest.mark.parametrize(
    "render", [render_gemma4, render_gemma3, lambda messages: render_template("x", messages)]
)
def test_bad_messages(render, messages, problem):
    with pytest.raises(ChatTemplateError, match=problem) as info:
        render(messages)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ sandbox


def _refused(template: str, match: str | None = None) -> str:
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=match) as info:
        render_template(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 3.0
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ raise_exception.__globals__.os }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace(__class__=1) %}",
    ],
)
def test_sandbox_escapes_are_refused(template):
    assert "sandbox" in _refused(template)


@pytest.mark.parametrize(
    "template", ["{% include 'x' %}", "{% import 'x' as y %}", "{% extends 'x' %}"]
)
def test_no_file_access(template):
    _refused(template, "no loader")


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(10**9) %}x{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) if false %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(60) }}",
        "{% for i in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
        "{{ 7 ** 999999999 }}",
        "{% set x = 10 ** 50000 %}" + "{% set x = x * x %}" * 30,
        # found by a probe, each past any deadline (work in C holds the interpreter): lists that
        # hold one list twice nest 2**60 items for `==` to walk; sum of lists is quadratic
        "{% set ns = namespace(a=[], b=[]) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}"
        "{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
        "{% set ns = namespace(a={}) %}{% for i in range(60) %}{% set ns.a = {'x': ns.a, 'y': ns.a} %}"
        "{% endfor %}{{ ns.a == ns.a }}",
        "{% set ns = namespace(a=()) %}{% for i in range(60) %}{% set ns.a = (ns.a, ns.a) %}{% endfor %}"
        "{{ ns.a in [ns.a] }}",
        "{{ ([[0]] * 250000) | sum(start=[]) | length }}",
    ],
)
def test_runaway_templates_stop_quickly(template):
    _refused(template)


@pytest.mark.parametrize(
    "template",
    [
        "{% set s = 'x' * 1000000 %}{% for i in range(5) %}{{ s }}{% endfor %}",
        "{{ 'x' * 10**9 }}",
        "{{ ['x' * 1000000] * 100 }}",
        "{% set x = 'xxxxxxxx' %}" + "{% set x = x ~ x %}" * 30,
        "{% set x = 'xxxxxxxx' %}" + "{% set x = x + x %}" * 30,
        "{{ ('x' * 100000) | replace('x', 'y' * 100000) }}",
        "{{ 'x'.center(10**9) }}",
        "{{ '%999999999s' % 'x' }}",
        "{{ '{:>999999999}'.format('x') }}",
        "{{ [1] | batch(10**9, 'x') | list }}",
        "{{ [1] | slice(10**9) | list }}",
        "{{ {} | tojson(indent=10**9) }}",
        "{% set s = 'x' * 3000000 %}{{ dict.fromkeys(range(1000), s).values() | join }}",
        "{% set t %}{% for i in range(90000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}",
        "{{ (0).to_bytes(300000000, 'big') | length }}",  # bytes had gone uncounted: 1 GB allocated
        "{{ (0).to_bytes(length=300000000) | length }}",
        "{{ ('x'.encode() * 300000000) | length }}",
        "{{ 'x'.encode().ljust(300000000) | length }}",
    ],
)
def test_output_and_memory_caps(template):
    _refused(template, "limit|built more")


def test_output_cap_is_the_rendered_size():
    just_under = "{{ 'x' * %d }}" % (MAX_OUTPUT_CHARS - 10)
    assert len(render_template(just_under, [])) == MAX_OUTPUT_CHARS - 10
    _refused("{{ 'x' * 3000000 }}{{ 'y' * 3000000 }}", "rendered prompt")


def test_template_errors_are_chat_template_errors():
    assert "boom" in _refused("{{ raise_exception('boom') }}")
    _refused("{{ 1 / 0 }}", "ZeroDivisionError")
    # a template that does not compile is the model's fault (the server answers 500, not 400)
    with pytest.raises(BrokenTemplate, match="the chat template does not compile: line 2: unexpected '}'"):
        render_template("{% if 1 %}x\n{% for m in messages %}{{ m.content }", [{"role": "user", "content": "hi"}])


def test_extra_variables_and_reserved_names():
    template = "{{ bos_token }}|{{ greeting }}|{{ enable_thinking }}|{{ strftime_now('%Y') }}"
    out = render_template(template, [], bos_token="<s>", enable_thinking=True,
                          extra={"greeting": "hey"})
    assert out == f"<s>|hey|True|{time.strftime('%Y')}"
    with pytest.raises(ChatTemplateError, match="messages"):
        render_template("x", [], extra={"messages": []})


# ------------------------------------------------------------------------------ transformers parity

GEMMA_LIKE = """{{ bos_token }}
{%- set ns = namespace(system='') -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set ns.system = messages[0]['content'] | trim -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if ns.system or tools -%}
<|turn>system
{{ ns.system }}
{%- for tool in tools or [] %}<|tool>{{ tool | tojson }}<tool|>{% endfor -%}
<turn|>
{% endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] not in ['user', 'assistant'] -%}
        {{ raise_exception('Unsupported role: ' + message['role']) }}
    {%- endif -%}
    {%- if message.get('metadata') %}{{ message.metadata | tojson(indent=2) }}{% endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
<|turn>{{ role }}
{% if message['content'] is string -%}
    {%- if role == 'model' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}
    {%- else %}{{ message['content'] | trim }}{% endif -%}
{%- else -%}
    {%- for part in message['content'] -%}
        {%- if part['type'] == 'text' %}{{ part['text'] | trim }}
        {%- elif part['type'] == 'image' %}<|image|>
        {%- else %}{% continue %}{% endif -%}
    {%- endfor -%}
{%- endif %}<turn|>
{% endfor -%}
{%- if add_generation_prompt %}
<|turn>model
{% if not enable_thinking %}<|channel>thought
<channel|>{% endif %}
{%- endif -%}
"""

PARITY_CASES = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": " Be terse. "},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7", "metadata": {"city": "Zürich", "n": [1, 2]}},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " and this?"},
                                     {"type": "audio"}]},
    ],
    [],
]


# exercises the machinery the rewriting touches: recursive macros, namespaces, call blocks,
# block sets, recursive loops, loop controls, filters and string methods
MACRO_HEAVY = """{%- macro fmt(v) -%}
    {%- if v is string -%}"{{ v }}"
    {%- elif v is boolean -%}{{ 'true' if v else 'false' }}
    {%- elif v is mapping -%}{
        {%- set ns = namespace(first=true) -%}
        {%- for k, x in v | dictsort -%}
            {%- if not ns.first %},{% endif %}{% set ns.first = false -%}
            {{ k }}:{{ fmt(x) }}
        {%- endfor -%}}
    {%- elif v is iterable -%}[{% for x in v %}{{ fmt(x) }}{{ ',' if not loop.last }}{% endfor %}]
    {%- else -%}{{ v }}
    {%- endif -%}
{%- endmacro -%}
{%- macro box(kind) -%}[{{ kind }}|{{ caller() }}]{%- endmacro -%}
{{ bos_token }}
{%- for tool in tools or [] -%}
    {% call box('tool') %}{{ tool.function.name | upper }}{{ fmt(tool.function.parameters) }}
    {%- endcall %}
{%- endfor %}
{% for m in messages -%}
    {%- if m.role == 'stop' %}{% break %}{% endif -%}
    {%- set text -%}
        {%- if m.content is string %}{{ m.content.strip().replace('  ', ' ') }}
        {%- else %}{{ m.content | selectattr('type', 'equalto', 'text') | map(attribute='text')
                                 | map('trim') | join(' ') }}{% endif -%}
    {%- endset -%}
    {{ '%s#%d' | format(m.role, loop.index) }}
    {{- ' after ' ~ loop.previtem.role if loop.previtem else '' }}
    {{- ': ' + text if text else '' }}{{ ' (%d words)' % (text.split() | length) }}
{% endfor -%}
{%- for i in range(messages | length - 1, -1, -1) %}{{ i }}{% endfor %}
{% for item in [{'name': 'a', 'kids': [{'name': 'b', 'kids': []}]}] recursive -%}
    {{ item.name }}{% if item.kids %}<{{ loop(item.kids) }}>{% endif %}
{%- endfor %}
{{ dict(b=2, a=1) | items | list | tojson }}|{{ ['x', 'y'] | map('upper') | list | join }}
{%- if add_generation_prompt %}
GO{% endif %}"""


@pytest.mark.parametrize("messages", PARITY_CASES)
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]])
def test_macro_heavy_template_matches_transformers(messages, tools):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    (expected,), _ = chat_template_utils.render_jinja_template(
        conversations=[messages], tools=tools, chat_template=MACRO_HEAVY,
        add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>",
    )
    assert render_template(MACRO_HEAVY, messages, tools=tools) == expected


@pytest.mark.parametrize("messages", PARITY_CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL, {"name": "naïve", "description": "ü"}]])
def test_render_template_matches_transformers(messages, add_generation_prompt, tools):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    (expected,), _ = chat_template_utils.render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=GEMMA_LIKE,
        add_generation_prompt=add_generation_prompt,
        bos_token="<bos>",
        eos_token="<eos>",
        enable_thinking=False,
    )
    ours = render_template(GEMMA_LIKE, messages, add_generation_prompt=add_generation_prompt,
                           tools=tools)
    assert ours == expected
    assert ("Zürich" in ours) == any("metadata" in m for m in messages)  # tojson keeps non-ASCII


def test_render_template_raise_exception_like_transformers():
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    messages = [{"role": "tool", "content": "42"}]
    with pytest.raises(Exception, match="Unsupported role: tool"):
        chat_template_utils.render_jinja_template([messages], chat_template=GEMMA_LIKE)
    with pytest.raises(ChatTemplateError, match="Unsupported role: tool"):
        render_template(GEMMA_LIKE, messages)


def test_our_gemma4_renderer_agrees_with_a_template_of_its_rules():
    # the parity template above follows the same turn rules for plain text and images
    messages = PARITY_CASES[1][:3] + [{"role": "user", "content": [{"type": "image"},
                                                                   {"type": "text", "text": "ok"}]}]
    plain = [{k: v for k, v in m.items() if k != "metadata"} for m in messages]
    assert render_template(GEMMA_LIKE, plain) == render_gemma4(plain)


def test_templates_that_scan_the_earlier_messages_render_long_chats():
    """The published Gemma 4 template looks back over the earlier messages for every message
    (~n^2/2 loop steps): an 800-message chat must render, while a loop over nothing stays capped."""
    template = ("{% for m in messages %}{% for earlier in messages[:loop.index0] %}{% if earlier.role == 'tool' %}"
                "x{% endif %}{% endfor %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(800)]
    assert render_template(template, messages).count("\n") == 800
    with pytest.raises(ChatTemplateError, match="loop iterations"):
        render_template("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", messages[:2])


def test_tool_values_sort_their_keys_ignoring_case_as_dictsort_does():
    assert format_tool_value({"Zip": 1, "apple": 2, "b": {"B": 1, "a": 2}}) == "{apple:2,b:{a:2,B:1},Zip:1}"


def test_declarations_upper_case_only_schema_types():
    """A `type` key inside a default or an example is data, not a schema type: it had been
    upper-cased too. Subschemas (properties, items, anyOf, $defs) are."""
    tool = {"type": "function", "function": {"name": "park", "parameters": {
        "type": "object",
        "properties": {"vehicle": {"type": "object", "default": {"type": "car"}, "examples": [{"type": "bus"}]},
                       "tags": {"type": "array", "items": {"type": "string"}},
                       "size": {"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/label"}]}},
        "$defs": {"label": {"type": "string", "enum": ["type"]}}}}}
    text = render_gemma4([{"role": "user", "content": "hi"}], tools=[tool])
    assert f"default:{{type:{Q}car{Q}}}" in text and f"type:{Q}bus{Q}" in text
    for upper in ("OBJECT", "ARRAY", "INTEGER", "STRING"):
        assert f"type:{Q}{upper}{Q}" in text
    assert f"type:{Q}CAR{Q}" not in text and f"type:{Q}BUS{Q}" not in text


def test_declarations_upper_case_a_list_of_types():
    """["string", "null"] (OpenAI strict mode's nullable field) had stayed lower-case, where the
    published template upper-cases every schema type."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": ["string", "null"]}}}}}
    text = render_gemma4([{"role": "user", "content": "hi"}], tools=[tool])
    assert f"x:{{type:[{Q}STRING{Q},{Q}NULL{Q}]}}" in text


def test_numpy_dataclass_and_pydantic_values_render_as_transformers_renders_them():
    """What templates see is rebuilt from plain types, as transformers does: np.bool_(False) had
    read as true and np.int64(3) as "<int64>"; our renderer had refused them as tool values."""
    import dataclasses

    import numpy as np
    import pydantic

    @dataclasses.dataclass
    class Meta:
        n: int
        s: str

    class Args(pydantic.BaseModel):
        n: int

    template = ("{% for m in messages %}{{ m.content }}|{{ m.n }}|{{ 'T' if m.flag else 'F' }}|{{ m.meta }}|"
                "{{ m.args }};{% endfor %}")
    messages = [{"role": "user", "content": "hi", "n": np.int64(3), "flag": np.bool_(False), "meta": Meta(1, "a"),
                 "args": Args(n=2)}]
    assert render_template(template, messages) == "hi|3|F|{'n': 1, 's': 'a'}|{'n': 2};"
    call = {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"n": np.int64(3), "ok": np.bool_(True),
                                                                     "x": np.float32(0.5), "m": Meta(1, "a")}}}]}
    text = render_gemma4([{"role": "user", "content": "q"}, call], add_generation_prompt=False)
    assert f"call:f{{m:{{n:1,s:{Q}a{Q}}},n:3,ok:true,x:0.5}}" in text
    # a str Enum is its value, not its str() ("Role.USER": a silently wrong turn), as in transformers;
    # a numpy array stays a placeholder there too
    import enum

    class Role(str, enum.Enum):
        USER = "user"

    messages = [{"role": Role.USER, "content": "hi", "a": np.array(3)}]
    assert render_template("{{ messages[0].role }}|{{ messages[0].a }}", messages) == "user|<ndarray>"
    assert render_gemma4(messages).startswith("<bos><|turn>user\nhi<turn|>")
