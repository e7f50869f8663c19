"""response_format (constrained decoding) and the loop guard, through the server."""

import json

import openai
import pytest
import torch
from reference_models import LOOPING_SEED, seeded_prompt
from serverkit import running

import gemmarun
from gemmarun.batching import Event
from gemmarun.constrain import Grammar
from gemmarun.llm import Prompt
from gemmarun.sampling import SamplingParams
from gemmarun.server import ServerOptions, create_app
from gemmarun.server.generation import Generation
from gemmarun.server.protocol import Envelope

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
    "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    "size": {"type": "number", "minimum": 0, "maximum": 10}},
    "required": ["name", "tags", "size"], "additionalProperties": False}


def _valid(answer: dict) -> bool:
    import re

    return (set(answer) == {"name", "tags", "size"} and re.fullmatch("[a-z]{1,8}", answer["name"]) is not None
            and all(t in ("red", "green") for t in answer["tags"]) and len(answer["tags"]) <= 3
            and 0 <= answer["size"] <= 10)


def test_json_schema_answers_always_validate(server):
    """(Thinking first, then the grammar: tests/test_constrain.py, where the channel is forced.)"""
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        kw = {"model": "tiny", "messages": [{"role": "user", "content": "a thing"}], "max_tokens": 120,
              "temperature": 1.0, "seed": seed, "response_format": fmt}
        whole = client.chat.completions.create(**kw)
        assert _valid(json.loads(whole.choices[0].message.content)), whole.choices[0].message.content
        assert whole.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        assert streamed == whole.choices[0].message.content  # same seed, same answer


def test_json_object_and_bad_formats(server):
    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=60,
                                       temperature=1.0, seed=5, response_format={"type": "json_object"})
    content = r.choices[0].message.content  # a random model may write one long string: cut, still an object
    assert content.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict))
    for fmt, param in (({"type": "grammar"}, "response_format.type"),
                       ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
                        "response_format.json_schema.schema"),
                       ({"type": "json_schema", "json_schema": "x"}, "response_format.json_schema")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, response_format=fmt)
        assert e.value.body["param"] == param and "\n" not in e.value.body["message"]


def test_a_schema_no_text_satisfies_is_a_400(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/a",
                                                                          "$defs": {"a": {"$ref": "#/$defs/a"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, response_format=fmt)
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert "no text satisfies the grammar" in e.value.body["message"]


@pytest.mark.parametrize("cut_by", ["loop", "stop"])
def test_a_reply_cut_inside_the_grammar_ends_with_length(tiny_models, cut_by):
    """The loop guard or a stop string ending a reply mid-object leaves JSON that does not parse:
    "length", as max_tokens would (clients treat "stop" as complete; a stop string had ended one
    with "stop", found by a probe); outside a grammar it is a "stop"."""
    folder, _ = tiny_models("gemma3")
    llm = gemmarun.load(folder, device="cpu")
    opening = llm.tokenizer.encode('{"a', add_bos=False)
    for grammar, reason in ((Grammar.any_json(), "length"), (None, "stop")):
        state = grammar and llm.grammar_state(grammar, SamplingParams())
        control = llm.output_control(state, "stop")
        gen = Generation(llm, Envelope("chatcmpl-1", "tiny", "chat.completion.chunk"), Prompt([2]), SamplingParams(),
                         control=control)
        for token in opening:
            control.push(token)
            gen.feed(Event(1, token))
        gen.feed(Event(1, None, cut_by))
        assert gen.finish_reason == reason and gen.stop_reason == (cut_by if cut_by == "loop" else None)


def test_completions_take_response_format(server):
    """/v1/completions ignored response_format (free text, 200), where llama.cpp's server and
    vLLM constrain a completion too."""
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    for seed in range(3):
        r = client.completions.create(model="tiny", prompt="a thing:", max_tokens=120, temperature=1.0, seed=seed,
                                      extra_body={"response_format": fmt})
        assert r.choices[0].finish_reason == "stop" and _valid(json.loads(r.choices[0].text)), r.choices[0].text
    # a stop string the answer's closing text holds: the grammar finished, then the cut broke it
    for endpoint in ("completions", "chat"):
        for seed in range(3):
            kw = dict(model="tiny", max_tokens=120, temperature=1.0, seed=seed, stop=["}"],
                      extra_body={"response_format": fmt})
            if endpoint == "chat":
                r = client.chat.completions.create(messages=[{"role": "user", "content": "a thing"}], **kw)
                text = r.choices[0].message.content
            else:
                r = client.completions.create(prompt="a thing:", **kw)
                text = r.choices[0].text
            assert r.choices[0].finish_reason == "length" and not text.endswith("}"), (endpoint, text)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=4,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": "x"}})
    assert e.value.body["param"] == "response_format.json_schema"


def test_the_loop_guard_is_on_in_the_server(tiny_models):
    """The tiny Gemma 3 model loops greedily from the LOOPING_SEED prompt (tests/reference_models.py):
    the server recovers by default, and with --loop-guard stop ends with stop_reason "loop"."""
    folder, _ = tiny_models("gemma3")
    llm = gemmarun.load(folder, device="cpu")
    looping = seeded_prompt(LOOPING_SEED)
    params = SamplingParams(max_tokens=150, ignore_eos=True)
    for policy in ("recover", "stop"):
        alone = llm.stream_prompt(Prompt(looping), params, loop_guard=policy)
        text = "".join(alone)
        with running(create_app(llm, ServerOptions(model_name="tiny", loop_guard=policy))) as srv:
            r = srv.client().completions.create(model="tiny", prompt=looping, max_tokens=150, temperature=0,
                                                extra_body={"ignore_eos": True})
        choice = r.choices[0]
        assert choice.text == text
        if policy == "stop":
            assert alone.finish_reason == "loop"
            assert choice.finish_reason == "stop" and choice.model_extra.get("stop_reason") == "loop"
        else:
            assert choice.finish_reason == "length" and "stop_reason" not in choice.model_extra
