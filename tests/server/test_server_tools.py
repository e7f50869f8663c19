"""Thinking and tool calls end to end. A random tiny model never writes the markers, so a scripted
engine plays the model's part behind the real server, tokenizer, templates and reply parsing."""

import json

import openai
import pytest
from serverkit import CALL, ScriptedEngine, running, script

import gemmarun
from gemmarun.server import ServerOptions, create_app
from gemmarun.server.inputs import build_prompt, prepare_messages
from gemmarun.server.protocol import ApiError

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
@pytest.fixture(scope="module")
def scripted(printed_llm):
    engine = ScriptedEngine(printed_llm, script, context=4096)
    with running(create_app(printed_llm, ServerOptions(model_name="g4"), engine=engine)) as r:
        r.engine = engine
        yield r


def ask(r, messages, **kw):
    return r.client().chat.completions.create(model="g4", messages=messages, max_tokens=200, **kw)


def test_tool_call_round_trip(scripted):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = ask(scripted, messages, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21, "sky": "clear"})}]
    r = ask(scripted, messages, tools=TOOLS)
    assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls
    prompt = scripted.engine.prompts[-1]
    assert "<|tool>declaration:get_weather{" in prompt
    assert (CALL + '<|tool_response>response:get_weather{sky:<|"|>clear<|"|>,temp:21}<tool_response|>') in prompt


def test_streamed_tool_calls(scripted):
    chunks = list(ask(scripted, [{"role": "user", "content": "Weather?"}], tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me check."
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
           [(0, "get_weather", {"city": "Paris", "days": 2})]
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_thinking_is_returned_separately(scripted):
    r = ask(scripted, [{"role": "user", "content": "hi"}], extra_body={"thinking": True})
    message = r.choices[0].message
    assert message.content == "Hello!" and message.model_extra["reasoning_content"] == "The user says hello."
    assert "<|think|>" in scripted.engine.prompts[-1]
    assert r.usage.completion_tokens_details.reasoning_tokens > 0

    chunks = list(ask(scripted, [{"role": "user", "content": "hi"}], reasoning_effort="high", stream=True))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == ("The user says hello.", "Hello!")
    for c in chunks:
        assert "<" not in (c.choices[0].delta.content or "")


def test_thinking_off_prompt_and_no_markers_in_text(scripted):
    r = ask(scripted, [{"role": "user", "content": "hi"}], reasoning_effort="none")
    assert r.choices[0].message.content == "Plain answer."
    assert r.choices[0].message.model_extra.get("reasoning_content") is None
    prompt = scripted.engine.prompts[-1]
    assert "<|think|>" not in prompt and prompt.endswith("<|turn>model\n<|channel>thought\n<channel|>")


def test_tools_and_tool_messages_render_through_the_template(printed_llm):
    messages = prepare_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rainy"},
    ], allow_local_files=False)
    prompt = build_prompt(printed_llm, messages, thinking=False, tools=TOOLS, image_tokens=None)
    text = printed_llm.tokenizer.decode(prompt.ids)
    assert text.startswith("<bos><|turn>system\nBe brief.<|tool>declaration:get_weather{description:<|\"|>Weather")
    assert text.endswith('<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
                         '<|tool_response>response:get_weather{value:<|"|>rainy<|"|>}<tool_response|>')
    with pytest.raises(ApiError) as e:
        prepare_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
                         allow_local_files=False)
    assert e.value.status == 400 and "arguments" in e.value.param


def test_tools_need_gemma4(tiny_models):
    folder, _ = tiny_models("gemma3")
    llm = gemmarun.load(folder, device="cpu")
    with running(create_app(llm)) as r:
        with pytest.raises(openai.BadRequestError) as e:
            r.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
        assert e.value.param == "tools"


@pytest.fixture(scope="module")
def marker_llm(tmp_path_factory):
    """The tiny E2B with the printed tokenizer and embedding rows for its markers' ids (up to 271),
    so the engines can really generate them; room for a tool declaration in the context."""
    from reference_models import build_reference
    from serverkit import write_printed_tokenizer

    folder = tmp_path_factory.mktemp("marker-llm")
    build_reference("e2b", folder, vocab_size=272, vocab_size_per_layer_input=272, max_position_embeddings=1024)
    write_printed_tokenizer(folder)
    return gemmarun.load(folder, device="cpu")


def _forced(monkeypatch, reply: list[int]) -> list:
    """Every sampled token is the next of `reply`; returns the list that collects each step's prompt."""
    from gemmarun import sampling

    prompts = []

    def forced(self, logits, seen, generated):
        prompts.append(seen[: len(seen) - len(generated)])
        return reply[len(generated)]

    monkeypatch.setattr(sampling.Sampler, "__call__", forced)
    return prompts


def test_generation_stops_at_tool_response(marker_llm, monkeypatch):
    """Gemma 4 writes <|tool_response> after its calls to wait for their results (spec 9.2: stop
    on it). It was not a stop token: the engines went on (64 more tokens behind the server's loop
    guard) and the Python API returned a made-up tool result."""
    from gemmarun.batching import BatchEngine
    from gemmarun.llm import Prompt
    from gemmarun.sampling import SamplingParams

    printed_llm = marker_llm
    tok = printed_llm.tokenizer
    reply = tok.encode(f"Let me check.{CALL}<|tool_response>response:get_weather{{temp:21}}<tool_response|>Hot.",
                       add_bos=False)
    waits = reply.index(tok.token_to_id("<|tool_response>"))
    _forced(monkeypatch, reply)
    prompt = printed_llm.encode_prompt([{"role": "user", "content": "Weather?"}])
    params = SamplingParams(max_tokens=len(reply), temperature=1.0)
    assert printed_llm.generate_ids(prompt, max_new_tokens=len(reply), temperature=1.0) == reply[:waits]
    engine = BatchEngine(printed_llm, max_batch=2)
    rid = engine.add(Prompt(prompt), params)
    events = []
    while engine.busy:
        events += [e for e in engine.step() if e.request_id == rid]
    assert [e.token for e in events if e.token is not None] == reply[:waits]
    assert events[-1].finish_reason == "stop"


def test_the_python_api_declares_tools_and_parse_reply_reads_the_calls(marker_llm, monkeypatch):
    """generate(messages, tools=...) had failed ('SamplingParams got an unexpected keyword
    argument tools'); the declarations now reach the prompt and parse_reply reads the call."""
    from gemmarun.chat import ToolCall, parse_reply

    llm = marker_llm
    reply = llm.tokenizer.encode(f"Let me check.{CALL}<|tool_response>", add_bos=False)
    prompts = _forced(monkeypatch, reply)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    text = llm.generate(messages, tools=TOOLS, max_tokens=len(reply), temperature=1.0)
    assert "<|tool>declaration:get_weather{" in llm.tokenizer.decode(prompts[0].tolist())
    parsed = parse_reply(text)
    assert parsed.content == "Let me check." and parsed.tool_calls == [ToolCall("get_weather", {"city": "Paris", "days": 2})]
    with pytest.raises(ValueError, match="tools are declared in a chat"):
        llm.generate("raw text", tools=TOOLS)


def test_cli_thinking_goes_to_stderr_and_the_answer_alone_to_stdout(marker_llm, monkeypatch, capsys):
    """`run --think` printed the thought and the answer run together on stdout (the channel
    markers dropped), and chat fed the thought back as part of the answer."""
    from gemmarun.cli import main
    from gemmarun.sampling import SamplingParams

    reply = marker_llm.tokenizer.encode("<|channel>thought\nThe user says hi.<channel|>Hello there!<turn|>",
                                        add_bos=False)
    _forced(monkeypatch, reply)
    capsys.readouterr()
    assert main(["run", str(marker_llm.info.path), "hi", "--think", "--temperature", "1",
                 "--max-tokens", str(len(reply))]) == 0
    out, err = capsys.readouterr()
    assert out == "Hello there!\n"
    assert "The user says hi." in err and "Hello" not in err
    deltas = list(marker_llm.stream_reply(marker_llm.build_prompt([{"role": "user", "content": "hi"}]),
                                          SamplingParams(max_tokens=len(reply), temperature=1.0)))
    assert "".join(d.reasoning for d in deltas) == "The user says hi."
    assert "".join(d.content for d in deltas) == "Hello there!"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_in_the_text_of_a_call_the_reply_ended_inside_says_stop(printed_llm, stream):
    """The unclosed call's text joins the answer at the end, where the stop string cuts it: the
    finish reason had stayed the engine's "length"."""
    reply = 'Hi <|tool_call>call:f{a:<|"|>STOP here and on and on'
    engine = ScriptedEngine(printed_llm, lambda prompt: reply, context=4096)
    with running(create_app(printed_llm, ServerOptions(model_name="g4"), engine=engine)) as r:
        kw = dict(model="g4", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, stop=["STOP"], max_tokens=30)
        if stream:
            chunks = list(r.client().chat.completions.create(stream=True, **kw))
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            choice = r.client().chat.completions.create(**kw).choices[0]
            content, finish = choice.message.content, [choice.finish_reason]
    assert content == 'Hi call:f{a:"' and finish == ["stop"]


@pytest.mark.parametrize("choice, stream", [
    ({"type": "function", "function": {"name": "get_weather"}}, False), ("required", True)])
def test_a_forced_call_is_a_call_that_follows_the_parameters(tool_llm, choice, stream):
    """tool_choice "required" or a named function (LangChain's structured output sends one) had
    been refused: now the answer is constrained to calls whose arguments follow the schema; a
    random model writes them."""
    weather = {"name": "get_weather", "parameters": {  # (an enum: a random model's free strings run long)
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
        "required": ["city"]}}
    tools = [{"type": "function", "function": weather}, {"type": "function", "function": {"name": "ping"}}]
    with running(create_app(tool_llm, ServerOptions(model_name="g4"))) as r:
        kw = dict(model="g4", messages=[{"role": "user", "content": "Weather?"}], tools=tools, tool_choice=choice,
                  max_tokens=400, temperature=1.0, seed=1)
        if stream:
            chunks = list(r.client().chat.completions.create(stream=True, **kw))
            calls = [(t.function.name, t.function.arguments) for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            message = (reply := r.client().chat.completions.create(**kw)).choices[0].message
            calls = [(t.function.name, t.function.arguments) for t in message.tool_calls]
            finish = [reply.choices[0].finish_reason]
            assert message.content is None
    assert calls and finish == ["tool_calls"]
    for name, arguments in calls:
        args = json.loads(arguments)
        assert name in ("get_weather", "ping") if choice == "required" else name == "get_weather"
        if name == "get_weather":
            assert args["city"] in ("Paris", "Rome") and set(args) <= {"city", "days"}
            assert isinstance(args.get("days", 0), int)


def test_strict_applies_function_by_function(tool_llm):
    """A non-strict function beside a strict one is not constrained (as OpenAI applies strict), so
    its schema's faults do not fail the request; forced, every function's schema counts."""
    strict = {"name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris"]}}, "required": ["city"]}}
    loose = {"name": "other", "parameters": {"type": "object", "properties": {"a": {}}, "required": ["zzz"]}}
    tools = [{"type": "function", "function": strict}, {"type": "function", "function": loose}]
    with running(create_app(tool_llm, ServerOptions(model_name="g4"))) as r:
        kw = dict(model="g4", messages=[{"role": "user", "content": "Weather?"}], tools=tools, max_tokens=20, seed=1)
        assert r.client().chat.completions.create(**kw).choices[0].finish_reason in ("stop", "length", "tool_calls")
        with pytest.raises(openai.BadRequestError) as e:
            r.client().chat.completions.create(tool_choice="required", **kw)
        assert e.value.param == "tool_choice" and "tool 'other': required property 'zzz'" in str(e.value)
