"""Request parsing and validation, without sockets."""

import pytest

from gemmarun.server.protocol import ApiError, parse_chat, parse_completion, parse_json

MSG = [{"role": "user", "content": "hi"}]


def _chat(**kw):
    return parse_chat({"messages": MSG, **kw}, 4096)


def _error(fn, *args, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kw)
    return info.value


def test_defaults_and_sampling_fields():
    req = _chat()
    p = req.params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 0.95, 64, 4096)
    assert not req.max_tokens_given and not req.stream and req.top_logprobs is None and not req.thinking
    req = _chat(temperature=0, top_p=0.5, top_k=5, min_p=0.1, repetition_penalty=1.2, presence_penalty=0.5,
                seed=3, stop="END", max_completion_tokens=7, stream=True, stream_options={"include_usage": True},
                logprobs=True, top_logprobs=3, user="x", metadata={"a": 1}, parallel_tool_calls=True)
    p = req.params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.presence_penalty, p.seed) == \
           (0.0, 0.5, 5, 0.1, 1.2, 0.5, 3)
    assert p.stop == ("END",) and p.max_tokens == 7 and req.max_tokens_given
    assert req.stream and req.include_usage and req.top_logprobs == 3
    assert _chat(stop=["a", "b"], max_tokens=3).params.stop == ("a", "b")
    assert _chat(logprobs=True).top_logprobs == 0


@pytest.mark.parametrize("fields, thinking", [
    ({}, False), ({"thinking": True}, True), ({"reasoning_effort": "none"}, False),
    ({"reasoning_effort": "high"}, True), ({"reasoning_effort": "low", "thinking": False}, False),
    ({"chat_template_kwargs": {"enable_thinking": True}}, True),
])
def test_thinking_switch(fields, thinking):
    assert _chat(**fields).thinking is thinking


@pytest.mark.parametrize("fields, param", [
    ({"n": 2}, "n"), ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": -0.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"stop": [1]}, "stop"), ({"logit_bias": {"x": 2}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"), ({"logit_bias": {"1": "a"}}, "logit_bias"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"), ({"reasoning_effort": "max"}, "reasoning_effort"),
    ({"image_tokens": 100}, "image_tokens"), ({"tool_choice": "required", "tools": []}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools[0]"), ({"stream": "yes"}, "stream"),
    ({"messages": []}, "messages"), ({"seed": True}, "seed"), ({"seed": 2**64}, "seed"),
])
def test_bad_fields_are_400_naming_the_param(fields, param):
    e = _error(parse_chat, {"messages": MSG, **fields}, 4096)
    assert e.status == 400 and e.param == param
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


def test_harmless_fields_and_tool_choice_none():
    req = _chat(response_format={"type": "text"}, n=1, frequency_penalty=0, something_new={"x": 1},
                tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none")
    assert req.tools is None
    assert _chat(tools=[{"type": "function", "function": {"name": "f"}}]).tools[0]["function"]["name"] == "f"


def test_frequency_penalty_and_logit_bias_are_taken():
    """(Both had been refused with a 400.)"""
    p = _chat(frequency_penalty=0.5, logit_bias={"7": -100, "3": 2.5}).params
    assert p.frequency_penalty == 0.5 and p.logit_bias == ((3, 2.5), (7, -100.0))


def test_tool_choice_and_strict():
    from gemmarun.server.protocol import ToolCalls

    fn = {"name": "f", "parameters": {"type": "object", "properties": {}}}
    tools = [{"type": "function", "function": fn}, {"type": "function", "function": {"name": "g"}}]
    assert _chat(tools=tools).calls == ToolCalls() and not ToolCalls().constrained
    assert _chat(tools=tools, tool_choice="required").calls == ToolCalls(required=True)
    named = _chat(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}}).calls
    assert named == ToolCalls(required=True, only="g") and named.constrained
    strict = [{"type": "function", "function": {**fn, "strict": True}}]
    assert _chat(tools=strict).calls == ToolCalls(strict=True) and _chat(tools=strict).calls.constrained
    assert _chat(tools=strict, tool_choice="none").calls is None
    for fields, param in [
        ({"tool_choice": {"type": "function", "function": {"name": "h"}}}, "tool_choice.function.name"),
        ({"tool_choice": {"type": "function"}}, "tool_choice"), ({"tool_choice": "any"}, "tool_choice"),
        ({"tool_choice": {"type": "custom", "function": {"name": "f"}}}, "tool_choice"),
    ]:
        assert _error(parse_chat, {"messages": MSG, "tools": tools, **fields}, 16).param == param
    e = _error(parse_chat, {"messages": MSG, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 16)
    assert e.param == "tool_choice" and "no tools are given" in e.body()["error"]["message"]
    bad = [{"type": "function", "function": {**fn, "strict": "yes"}}]
    assert _error(parse_chat, {"messages": MSG, "tools": bad}, 16).param == "tools[0].function.strict"


def test_completion_requests():
    req = parse_completion({"prompt": "Once", "logprobs": 2, "echo": True}, 16)
    assert req.prompt == "Once" and req.params.max_tokens == 16 and req.top_logprobs == 2 and req.echo
    assert parse_completion({"prompt": [[2, 5, 6]]}, 16).prompt == [2, 5, 6]
    for body, param in [({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
                        ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "logprobs": 9}, "logprobs"),
                        ({"prompt": "x", "best_of": 2}, "best_of"), ({"prompt": "x", "echo": True, "stream": True}, "echo")]:
        assert _error(parse_completion, body, 16).param == param


def test_json_body():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for body in (b"{bad", b"[1]", b"\xff\xfe"):
        e = _error(parse_json, body)
        assert e.status == 400 and e.type == "invalid_request_error"


# What fuzz/openai_requests.py found: each was a 500 (an uncaught exception) or a NaN in sampling.
@pytest.mark.parametrize("fields, param", [
    ({"temperature": 10**400}, "temperature"),  # OverflowError converting to float
    ({"presence_penalty": float("inf")}, "presence_penalty"),  # accepted, then every logit is -inf
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"temperature": float("inf")}, "temperature"),
])
def test_non_finite_numbers_are_400(fields, param):
    e = _error(_chat, **fields)
    assert e.status == 400 and e.param == param and "finite" in e.message


def test_a_body_that_is_no_object_is_named_in_json_terms():
    for body, kind in ((b"null", "null"), (b"[1]", "an array"), (b'"x"', "a string"), (b"3", "a number")):
        e = _error(parse_json, body)
        assert e.status == 400 and e.message == f"the request body must be a JSON object, not {kind}"


def test_json_nested_too_deep_is_400():
    e = _error(parse_json, b"[" * 100_000)  # json raised RecursionError
    assert e.status == 400 and "not valid JSON" in e.message


def test_odd_roles_and_deep_tool_arguments_are_400():
    from gemmarun.server.inputs import prepare_messages

    e = _error(prepare_messages, [{"role": ["user"], "content": "x"}], False)  # TypeError: unhashable
    assert e.param == "messages[0].role"
    call = {"function": {"name": "f", "arguments": "[" * 5000}}  # json raised RecursionError
    e = _error(prepare_messages, [{"role": "assistant", "content": None, "tool_calls": [call]}], False)
    assert e.param == "messages[0].tool_calls[0].function.arguments"


def _tool(name="get_weather", **function):
    return {"type": "function", "function": {"name": name, **function}}


@pytest.mark.parametrize("fields, param, fragment", [
    ({"tools": [_tool("bad name{")]}, "tools[0].function.name", "must be 1-64 letters"),
    ({"tools": [_tool("x" * 65)]}, "tools[0].function.name", "must be 1-64 letters"),
    ({"tools": [_tool(), _tool()]}, "tools[1].function.name", "given twice"),
    ({"tools": [_tool(parameters="notadict")]}, "tools[0].function.parameters", "JSON Schema object"),
    ({"tools": [_tool(parameters={"type": "object", "properties": []})]}, "tools[0].function.parameters",
     "JSON Schema object"),
    ({"tools": [_tool()], "parallel_tool_calls": False}, "parallel_tool_calls", "not supported"),
    ({"functions": [{"name": "f"}]}, "functions", "use 'tools'"),
    ({"function_call": "auto"}, "function_call", "use 'tools'"),
    ({"tools": [_tool()], "response_format": {"type": "json_object"}}, "response_format", "exclude tool calls"),
])
def test_tool_requests_that_cannot_be_honoured_are_400(fields, param, fragment):
    """Each had been accepted and then ignored or broken: a name the reply parser cannot read
    back, duplicate or malformed declarations, parallel_tool_calls=false with two calls returned,
    legacy functions never shown to the model, a JSON grammar that made calls impossible."""
    e = _error(_chat, **fields)
    assert e.status == 400 and e.param == param and fragment in e.message


def test_good_tool_requests_pass():
    tools = [_tool("get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}}),
             _tool("ns.lookup-v2"), _tool("x" * 64)]
    assert [t["function"]["name"] for t in _chat(tools=tools, parallel_tool_calls=True).tools] == \
           ["get_weather", "ns.lookup-v2", "x" * 64]
    assert _chat(tools=[_tool()], response_format={"type": "text"}).tools


def test_model_is_any_name_but_a_string():
    """Any model name is served by the loaded model; a number had been accepted silently."""
    assert parse_chat({"model": "whatever-name", "messages": [{"role": "user", "content": "x"}]}, 16)
    for parse, body in ((parse_chat, {"messages": [{"role": "user", "content": "x"}]}), (parse_completion, {"prompt": "x"})):
        e = _error(parse, {**body, "model": 123}, 16)
        assert e.status == 400 and e.param == "model" and "'model' must be" in e.message
