"""Constrained decoding: every generation parses and validates, on tiny and real models."""

import json
import re
import xml.etree.ElementTree as ET

import pytest

import gemmarun
from gemmarun.constrain import Grammar, GrammarError

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                                "y": {"type": "number"}},
                                                "required": ["x", "y"], "additionalProperties": False},
                                      "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["point", "code"], "additionalProperties": False},
]


def _validate(value, schema):
    """A small validator for the keywords used above (jsonschema is not a dependency)."""
    t = schema.get("type")
    if "enum" in schema:
        assert value in schema["enum"]
    if t == "object":
        assert isinstance(value, dict)
        assert set(schema.get("required", [])) <= set(value)
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"])
        for k, v in value.items():
            _validate(v, schema["properties"][k])
    elif t == "array":
        assert isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9)
        for v in value:
            _validate(v, schema["items"])
    elif t == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", 10**9)
        if "pattern" in schema:
            assert re.search(schema["pattern"], value)
    elif t == "integer":
        assert isinstance(value, int)
    elif t == "number":
        assert isinstance(value, (int, float))


@pytest.fixture(scope="module")
def tiny(tiny_models):
    folder, _ = tiny_models("e2b")
    return gemmarun.load(folder, device="cpu")


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_model_output_always_validates(tiny, schema, seed):
    text = tiny.generate("hello", grammar=Grammar.json_schema(schema), max_tokens=200, temperature=1.0,
                         seed=seed, ignore_eos=True)
    _validate(json.loads(text), schema)


def test_regex_constraint(tiny):
    text = tiny.generate("hello", grammar=Grammar.regex(r"[a-e]{3}-[0-9]{2}"), max_tokens=20, temperature=1.0, seed=3)
    assert re.fullmatch(r"[a-e]{3}-[0-9]{2}", text)


def test_bad_schema_is_a_clear_error():
    with pytest.raises(GrammarError, match="invalid JSON schema"):
        Grammar.json_schema("{not json")


REAL_SCHEMAS = [  # bounded ones as a real task spells them out, and the unbounded ones above
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    *SCHEMAS,
]


@pytest.mark.slow
def test_real_model_json_and_svg():
    llm = gemmarun.load()
    for i, schema in enumerate(REAL_SCHEMAS):
        text = llm.generate("Here is a JSON record:", grammar=Grammar.json_schema(schema), max_tokens=80,
                            temperature=0.7, seed=i, loop_guard="recover")
        _validate(json.loads(text), schema)
    svg = llm.generate("A red circle in SVG:", grammar=Grammar.svg(), max_tokens=40, temperature=0.7, seed=1)
    assert svg.lstrip().startswith("<svg")
    if svg.rstrip().endswith("</svg>"):
        assert ET.fromstring(svg).tag.endswith("svg")


def test_svg_grammar_compiles_and_constrains(tiny):
    text = tiny.generate("hello", grammar=Grammar.svg(), max_tokens=150, temperature=1.0, seed=2, ignore_eos=True)
    assert text.lstrip().startswith("<svg")
    if text.rstrip().endswith("</svg>"):
        ET.fromstring(text)


def test_a_run_on_number_is_closed(tiny_models):
    """A model that wants to write digits forever gets its number closed after MAX_NUMBER_DIGITS
    digits (non-periodic digits are invisible to the loop guard), and the JSON still parses."""
    import torch

    from gemmarun.control import MAX_NUMBER_DIGITS

    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, device="cpu")
    schema = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"],
              "additionalProperties": False}
    digits = [llm.tokenizer.encode(str(d), add_bos=False)[0] for d in range(10)]
    assert set(digits) <= llm.number_ids
    favour = torch.zeros(llm.config.vocab_size)
    favour[digits] = 50.0  # digits whenever the grammar allows them
    for seed in range(12):  # noise picks among the other allowed tokens, byte-fallback "<0x65>" ("e") too
        noise = torch.Generator().manual_seed(seed)
        control = llm.output_control(llm.grammar_state(Grammar.json_schema(schema), None), "off")
        for _ in range(60):
            token = int(torch.argmax(control.mask(favour + torch.rand(llm.config.vocab_size, generator=noise))))
            if control.stops_on(token, frozenset()):
                break
            control.push(token)
            if control.grammar_done:
                break
        text = llm.tokenizer.decode(control.generated)
        value = json.loads(text)["n"]
        assert len(text) <= len('{"n": }') + MAX_NUMBER_DIGITS and isinstance(value, (int, float)), (seed, text)


def test_digits_inside_a_json_string_are_not_a_number(tiny_models):
    """The run-on-number cap is for numbers: a string of digits (a serial number) is data, and
    was closed after MAX_NUMBER_DIGITS characters."""
    import torch

    from gemmarun.control import MAX_NUMBER_DIGITS

    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, device="cpu")
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    digits = [llm.tokenizer.encode(str(d), add_bos=False)[0] for d in range(10)]
    favour = torch.zeros(llm.config.vocab_size)
    favour[digits] = 50.0
    control = llm.output_control(llm.grammar_state(Grammar.json_schema(schema), None), "off")
    for t in llm.tokenizer.encode('{"s": "', add_bos=False):
        control.push(t)
    for i in range(2 * MAX_NUMBER_DIGITS):
        control.push(int(torch.argmax(control.mask(favour + (torch.arange(llm.config.vocab_size) == digits[i % 10])))))
    text = llm.tokenizer.decode(control.generated)
    assert text == '{"s": "' + "".join(str(i % 10) for i in range(2 * MAX_NUMBER_DIGITS)), text


def test_with_thinking_the_grammar_starts_after_the_channel_closes(tiny_models):
    """Forced through the thinking channel: inside it nothing is masked but the end of the turn
    (the answer must still come: ending there gave "stop" and no JSON); after `<channel|>` the
    answer is constrained; a reply that skips thinking is constrained from its first token."""
    import torch

    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, device="cpu")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    opens, closes = llm.tokenizer.token_to_id("<|channel>"), llm.tokenizer.token_to_id("<channel|>")
    flat = torch.zeros(llm.config.vocab_size)

    def allowed(state):
        return torch.isfinite(state.mask(flat)).nonzero().flatten().tolist()

    state = llm.grammar_state(Grammar.json_schema(schema), None, thinking=True)
    first = allowed(state)
    assert opens in first and len(first) < 100  # the channel, or the answer's first tokens
    state.advance(opens)
    thought = llm.tokenizer.encode("thought\nlet me see", add_bos=False)
    for t in thought:
        assert set(allowed(state)) == set(range(llm.config.vocab_size)) - set(state.eos_ids)  # free, no end
        state.advance(t)
    state.advance(closes)
    answer = llm.tokenizer.encode('{"ok": true}', add_bos=False)
    for t in answer:
        ok = allowed(state)
        assert t in ok and len(ok) < 100
        state.advance(t)
    assert state.finished

    direct = llm.grammar_state(Grammar.json_schema(schema), None, thinking=True)
    direct.advance(answer[0])  # no thinking: this token is already the answer
    assert len(allowed(direct)) < 100


def test_a_bad_regex_error_keeps_the_parsers_reason():
    """llguidance puts the reason lines below its first; the one-line error had ended at
    'regex parse error:'."""
    from gemmarun.constrain import Grammar, GrammarError

    with pytest.raises(GrammarError, match=r'^invalid regex: .*"a\(b".*regex parse error: unclosed group$'):
        Grammar.regex("a(b")


def _accepts(llm, grammar: Grammar, text: str) -> bool:
    """Whether `text`, fed token by token, is a complete sentence of `grammar`."""
    from gemmarun.constrain import GrammarError
    from gemmarun.sampling import SamplingParams

    state = llm.grammar_state(grammar, SamplingParams())
    try:
        for token in llm.tokenizer.encode(text, add_bos=False):
            state.advance(token)
    except GrammarError:
        return False
    return state.matcher.is_accepting()


@pytest.mark.parametrize("text, ok", [
    ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8"><g><rect width="2"/></g></svg>', True),
    ('<svg><circle r="1"></circle><!-- a note --><text>a &amp; b</text></svg>', True),
    ("<svg><g></rect></svg>", False),  # a closing tag must close its own element
    ("<svg><g></svg>", False),  # unclosed
    ("<svg><rect/></svg><svg></svg>", False),  # one root
    ("<svg><blink/></svg>", False),  # not an SVG element
    ("<svg><rect width=2/></svg>", False),  # unquoted value
    ("<svg><text>a < b</text></svg>", False),  # unescaped text
    ("<svg><rect/>", False),  # not finished
    # what XML forbids, found by a probe (each had been accepted, and did not parse)
    ('<svg><text xml:space="preserve">a &gt; b &#160;</text></svg>', True),
    ("<svg><text>a ]]> b</text></svg>", False),  # CDATA's end in text
    ('<svg><rect x:y="1"/></svg>', False),  # an unbound prefix
    ('<svg><rect :="1"/></svg>', False),
    ("<svg><text>&#0;</text></svg>", False),
    ('<svg><rect fill="a\x0bb"/></svg>', False),
    ("<svg><text>a\x01b</text></svg>", False),
    ("<svg><!-- a\x01b --></svg>", False),
    ('<svg><use xlink:href="#a"/></svg>', False),  # the prefix is not declared
    # ordinary SVG the first version of those rules refused (a review's find)
    ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
     '<defs><circle id="a" r="1"/></defs><use xlink:href="#a"/></svg>', True),
    ("<svg><style>g > rect { fill: red }</style><text>A -> B ]> C ]]x &#10003; &#128512;</text></svg>", True),
    ("<svg><text>x<tspan>y</tspan>] z</text></svg>", True),
    ("<svg><text>a\ufffeb</text></svg>", False),  # a character XML forbids, written as itself
])
def test_the_svg_grammar_accepts_structure_and_refuses_broken_markup(tiny, text, ok):
    """On fixed strings: sampled output from a tiny model is mostly `<svg/>` and never showed
    that any closing tag could close any element."""
    assert _accepts(tiny, Grammar.svg(), text) is ok
    if ok:  # the grammar's promise
        ET.fromstring(text)


@pytest.mark.parametrize("text, ok", [
    ('{"a": 1, "b": {"a": 2}, "c": [{"a": 3}, {"a": 4}]}', True),  # each object its own keys
    ('["a", "a", {"a": "a"}]', True),  # strings in an array are values
    ('{"a": "x\\"y\\\\", "b": "\\u0061"}', True),  # escapes in values
    ('{"a\\"b": 1, "c:\\\\d": 2, "e\\nf": 3}', True),  # names JSON cannot write plainly
    ('{"a": 1, "a": 2}', False),
    ('{"a": {"b": 1}, "a": 2}', False),
    ('{"\\u0061": 1}', False),  # a declared "a", escaped past the grammar's key names
    ('{"a\\/b": 1}', False),  # "a/b" has a plain spelling
    ('{"a\\nb": 1, "a\\nb": 2}', False),
])
def test_json_keys_are_written_plainly_and_once(text, ok):
    """llguidance's JSON grammar does not follow key names: `{"b": 1, "b": 2}` met a minProperties
    of 2 and `"\\u0061"` (an "a") took a string past the declared integer "a", both ending "stop"."""
    from gemmarun.constrain import json_keys_after

    place = ((), None)
    for i in range(len(text)):  # a character a token
        place = json_keys_after(place, text[i].encode())
        if place is None:
            break
    assert (place is not None) is ok
    assert (json_keys_after(((), None), text.encode()) is not None) is ok  # one token for all


def test_the_json_mask_forbids_a_repeated_or_escaped_key(tiny):
    """...while a name that needs an escape (a quote in it) is still written: the first rules
    forbade every backslash in a key, and a schema requiring `a"b` could not be answered."""
    import torch

    needs_escape = {"type": "object", "properties": {'a"b': {"type": "integer"}}, "required": ['a"b'],
                    "additionalProperties": False}
    text = tiny.generate("hello", grammar=Grammar.json_schema(needs_escape), max_tokens=40, seed=0)
    assert list(json.loads(text)) == ['a"b'], text

    schema = {"type": "object", "minProperties": 2, "additionalProperties": {"type": "integer"}}
    quote, u = (tiny.tokenizer.encode(c, add_bos=False)[0] for c in ('"', "u"))
    for prefix, banned in (('{"b": 1, "b', quote), ('{"b": 1, "c\\', u), ('{"\\', u)):
        state = tiny.grammar_state(Grammar.json_schema(schema), None)
        for t in tiny.tokenizer.encode(prefix, add_bos=False):
            state.mask(torch.zeros(tiny.config.vocab_size))
            state.advance(t)
        allowed = torch.isfinite(state.mask(torch.zeros(tiny.config.vocab_size)))
        assert not allowed[banned] and allowed.sum() > 1, prefix
    state.rollback(1)  # back before the backslash: the key rules follow
    assert len(state._json) == 3 and state._json[-1][1] == (True, b"", False)


def test_an_answer_the_model_ends_is_complete_though_more_could_follow(tiny):
    """A top-level number ended by the model's end of sequence is a whole answer (the grammar
    accepts it, though another digit could follow): the server had reported it "length"."""
    import torch

    control = tiny.output_control(tiny.grammar_state(Grammar.json_schema({"type": "integer"}), None), "off")
    for t in tiny.tokenizer.encode("42", add_bos=False):
        control.mask(torch.zeros(tiny.config.vocab_size))
        control.push(t)
    assert not control.grammar_done
    eos = tiny.tokenizer.eos_id
    assert torch.isfinite(control.mask(torch.zeros(tiny.config.vocab_size)))[eos]
    assert control.stops_on(eos, frozenset()) and control.grammar_done


def test_a_stop_string_that_cuts_the_answer_is_no_clean_stop(tiny):
    """A stop string inside a constrained answer left broken JSON reported "stop" (the server
    already said "length"); the CLI said nothing."""
    from gemmarun import SamplingParams

    schema = SCHEMAS[0]  # two required keys: the answer holds the item separator ", "
    for stop, cut in (((", ",), True), (("no such text",), False)):
        stream = tiny.stream_prompt(tiny.build_prompt("hello"), SamplingParams(max_tokens=200, stop=stop, seed=0),
                                    grammar=Grammar.json_schema(schema))
        text = "".join(stream)
        assert stream.grammar_cut is cut and stream.finish_reason == ("length" if cut else "stop"), text
        if not cut:
            _validate(json.loads(text), schema)


@pytest.mark.parametrize("schema, message", [
    (True, None), (False, "not false, which no value satisfies"), ([1, 2], "not a JSON list"),
])
def test_a_boolean_schema_is_a_schema(schema, message):
    """`true` is the schema of any value; it (and other non-objects) had been "Expecting object
    schema to apply options", from gemmarun's own layout settings."""
    if message is None:
        assert Grammar.json_schema(schema).kind == "json_schema"
    else:
        with pytest.raises(GrammarError, match=message):
            Grammar.json_schema(schema)


# -- tool calls: Gemma 4's syntax, the arguments following the parameters ------------------------

Q = '<|"|>'
WEATHER = {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"],
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]},
                   "Alpha": {"type": ["number", "null"]}, "tags": {"type": "array", "items": {"type": "boolean"}}}}}
ORDER = {"name": "order", "parameters": {
    "type": "object", "required": ["items"], "$defs": {"Item": {
        "type": "object", "required": ["n"],
        "properties": {"n": {"type": "integer"}, "tag": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                       "extra": {}}}},
    "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}}}}
NO_ARGS = {"name": "ping", "parameters": {"type": "object", "properties": {}}}
BARE = {"name": "bare"}  # no parameters given: it takes none (OpenAI's reading)
NULL = {"name": "null", "parameters": None}  # nor with null ones


def _call(name: str, body: str) -> str:
    return f"<|tool_call>call:{name}{body}<tool_call|>"


@pytest.mark.parametrize("text, ok", [
    (_call("get_weather", f"{{city:{Q}Paris{Q}}}"), True),
    (_call("get_weather", f"{{Alpha:null,city:{Q}P{Q},days:3,tags:[true,false],unit:{Q}c{Q}}}"), True),
    (_call("get_weather", f"{{Alpha:-1.5e3,city:{Q}{Q}}}") + _call("ping", "{}") + "<|tool_response>", True),
    (_call("get_weather", "{days:3}"), False),  # city is required
    (_call("get_weather", f"{{city:{Q}P{Q},days:{Q}3{Q}}}"), False),  # days is an integer
    (_call("get_weather", f"{{city:{Q}P{Q},days:3.5}}"), False),
    (_call("get_weather", f"{{city:{Q}P{Q},unit:{Q}k{Q}}}"), False),  # not in the enum
    (_call("get_weather", f"{{city:{Q}P{Q},wind:1}}"), False),  # no such parameter
    (_call("get_weather", f"{{days:3,city:{Q}P{Q}}}"), False),  # keys in the template's order
    (_call("get_weather", f"{{city:{Q}a<|tool_call>b{Q}}}"), False),  # a marker inside a string
    (_call("get_weather", f"{{city:{Q}P{Q},tags:[1]}}"), False),
    (_call("ping", "{x:1}"), False),
    (_call("bare", "{}"), True), (_call("bare", "{x:1}"), False), (_call("null", "{x:1}"), False),
    (_call("get_weather", f"{{Alpha:1e400,city:{Q}P{Q}}}"), False),  # past a float: parsed as a string
    (_call("fetch", "{}"), False),  # not a declared tool
    (_call("order", "{items:[{n:1},{n:2,tag:null},{extra:[1,{a:true}],n:3,tag:" + Q + "x" + Q + "}]}"), True),
    (_call("order", "{items:[{tag:null}]}"), False),  # the $ref's required n
    ("Sure. " + _call("ping", "{}"), False),  # a forced call: no text first
    (_call("get_weather", f"{{city:{Q}P{Q}}}") + " and more", False),
    ("", False),  # at least one call
])
def test_the_tool_call_grammar_takes_calls_that_follow_the_parameters(tool_llm, text, ok):
    grammar = tool_llm.tool_grammar([WEATHER, ORDER, NO_ARGS, BARE, NULL])
    assert _accepts(tool_llm, grammar, text) is ok


def test_tool_choice_grammars_named_and_with_text(tool_llm):
    weather = _call("get_weather", f"{{city:{Q}P{Q}}}")
    tools = [{"type": "function", "function": f} for f in (WEATHER, NO_ARGS)]
    named = tool_llm.tool_grammar(tools, only="get_weather")
    assert _accepts(tool_llm, named, weather) and not _accepts(tool_llm, named, _call("ping", "{}"))
    free = tool_llm.tool_grammar(tools, text_first=True)  # tool_choice "auto" with strict functions
    for text, ok in [("Sure. " + weather, True), ("Just text.", True), ("", True),
                     ("Sure. " + _call("get_weather", "{}"), False), ("a <|tool_call> b", False)]:
        assert _accepts(tool_llm, free, text) is ok, text
    for kwargs, message in [({"only": "nope"}, "no tool is named 'nope'"), ({}, "no tools to call")]:
        with pytest.raises(ValueError, match=message):
            tool_llm.tool_grammar(tools if kwargs else [], **kwargs)


def test_arguments_written_as_the_template_writes_them_are_taken(tool_llm):
    from gemmarun.chat import format_tool_value, parse_reply

    grammar = tool_llm.tool_grammar([WEATHER, ORDER])
    for name, args in [("get_weather", {"city": "Rome, \"old\" town\n", "days": 0, "tags": [], "unit": "f"}),
                       ("order", {"items": [{"n": -3, "tag": "t", "extra": {"k": [1.5, "s", None]}}]})]:
        text = _call(name, format_tool_value(args))
        assert _accepts(tool_llm, grammar, text), text
        assert [(c.name, c.arguments) for c in parse_reply(text).tool_calls] == [(name, args)]


# (a random model's free strings run for hundreds of tokens, their length at the mercy of the
# logits' last bits: the city is an enum here, free strings are the cases above)
SHORT_WEATHER = {**WEATHER, "parameters": {**WEATHER["parameters"], "properties": {
    **WEATHER["parameters"]["properties"], "city": {"enum": ["Paris", "Rome", "Oslo"]}}}}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_forced_call_of_a_random_model_follows_the_parameters(tool_llm, seed):
    from gemmarun.sampling import SamplingParams

    tools = [{"type": "function", "function": f} for f in (SHORT_WEATHER, NO_ARGS)]
    prompt = tool_llm.build_prompt([{"role": "user", "content": "weather?"}], tools=tools)
    stream = tool_llm.stream_reply(prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=400),
                                   grammar=tool_llm.tool_grammar(tools, only="get_weather"), tools=True)
    deltas = list(stream)
    calls = [c for d in deltas for c in d.tool_calls]
    assert stream.finish_reason == "stop" and calls and "".join(d.content for d in deltas) == ""
    for call in calls:
        assert call.name == "get_weather"
        _validate(call.arguments, {**SHORT_WEATHER["parameters"], "additionalProperties": False,
                                   "properties": {**SHORT_WEATHER["parameters"]["properties"], "Alpha": {}}})
        assert call.arguments.get("Alpha") is None or isinstance(call.arguments["Alpha"], (int, float))


def test_a_schema_past_the_engines_limits_is_said_to_be_too_large(tiny):
    """llguidance's parser stops at 2000 items a row: the error had blamed the token it met there."""
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(5000)}}
    with pytest.raises(GrammarError, match="too large for the grammar engine"):
        tiny.generate("hi", max_tokens=200, grammar=Grammar.json_schema(schema), seed=0)


# (a probe's finds: each of these had been "any value", a 500, a refused valid number, or a
# forced call the grammar could not write)
SCHEMA_PARTS = {"name": "f", "parameters": {
    "type": "object", "$defs": {"Node": {"type": "object", "properties": {"v": {"type": "integer"}}}},
    "properties": {
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},  # pydantic dict[str, int]
        "tree": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/properties/tree"}}},
        "root": {"$ref": "#/$defs/Node"},
        "both": {"allOf": [{"type": "integer"}, {"enum": [1, 2]}]},
        "typed": {"type": "string", "anyOf": [{"maxLength": 3}, {"pattern": "x"}]},
        "never": False,
        "shape": {"const": {"k:x": 1, "a": ["s", None]}},
        "n": {"type": "number"},
        # (a review's finds: a map with "properties": {}, anyOf adding to shared properties, a
        # free key with a space as format_tool_value writes it)
        "ints": {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}},
        "pick": {"type": "object", "properties": {"shared": {"type": "integer"}}, "anyOf": [
            {"properties": {"kind": {"const": "a"}}, "required": ["kind"]}, {"properties": {"other": {"type": "boolean"}}}]},
        "free": {"type": "object"}}}}


@pytest.mark.parametrize("args, ok", [
    ("{counts:{a:1,b:-2}}", True), (f"{{counts:{{a:{Q}x{Q}}}}}", False),
    ("{tree:{next:{next:{v:3},v:2},v:1}}", True), (f"{{tree:{{next:{Q}s{Q}}}}}", False),
    ("{root:{v:1}}", True), ("{root:{v:true}}", False),
    ("{both:2}", True), ("{both:3}", False),
    (f"{{typed:{Q}ab{Q}}}", True), ("{typed:5}", False),
    ("{never:1}", False),
    (f"{{shape:{{a:[{Q}s{Q},null],{Q}k:x{Q}:1}}}}", True), ("{shape:{a:[],k:1}}", False),
    ("{n:0.30000000000000004}", True), ("{n:1e-300}", True), ("{n:1.5e+100}", True),
    ("{n:1152921504606846976}", True), ("{n:1e400}", False), ("{n:9999999999e299}", False),
    ("{n:9.9e307}", True), ("{n:1e305}", True), ("{n:1e308}", False),  # (up to 9.99e307)
    ("{ints:{a:1,b c:2}}", True), (f"{{ints:{{a:{Q}x{Q}}}}}", False),
    (f"{{pick:{{kind:{Q}a{Q},shared:1}}}}", True), ("{pick:{other:true,shared:1}}", True),
    (f"{{pick:{{kind:{Q}b{Q}}}}}", False), ("{pick:{shared:1}}", True),
    ("{free:{a b:1,c:[true]}}", True),
])
def test_the_tool_grammar_follows_refs_maps_merges_and_literals(tool_llm, args, ok):
    from gemmarun.chat import parse_reply

    text = _call("f", args)
    assert _accepts(tool_llm, tool_llm.tool_grammar([SCHEMA_PARTS]), text) is ok
    if ok:  # and what it accepts parses back to arguments
        assert [c.name for c in parse_reply(text).tool_calls] == ["f"]


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("parameters, message", [
    ({"type": "object", "properties": {"a": {}}, "required": ["a", "zzz"]}, "required property 'zzz' is not"),
    ({"type": "object", "properties": {"a": {}}, "required": 5}, "'required' must be a list"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": [1]}, "points at nothing"),
    ({"type": "object", "properties": {"a": {"$ref": "other.json#/A"}}}, "not a reference inside"),
    ({"type": "object", "properties": {"a": {"enum": ['x<|"|>y']}}}, "which a tool call cannot write"),
    ({"type": "object", "properties": {"a": {"const": float("nan")}}}, "nan is no JSON number"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"$ref": "#/$defs/B"},
                                                                           "B": {"$ref": "#/$defs/A"}}},
     "refers to itself, through nothing but $refs"),
    ({"type": "object", "properties": {"x": {"allOf": [{"$ref": "#/$defs/A"}]}}, "$defs": {"A": {"$ref": "#/$defs/A"}}},
     "refers to itself"),  # (this one had hung the server)
    (_nested(600), "nested too deep"),
])
def test_a_schema_the_tool_grammar_cannot_follow_is_refused_in_one_line(tool_llm, parameters, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        tool_llm.tool_grammar([{"name": "f", "parameters": parameters}])


def test_a_thousand_properties_make_no_recursion(tool_llm):
    parameters = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1000)}}
    assert tool_llm.tool_grammar([{"name": "f", "parameters": parameters}]).kind == "tool_calls"


def test_free_text_cut_by_a_stop_string_is_a_clean_stop(tool_llm):
    """Under tool_choice "auto" with a strict function, a stop string in the text had made every
    answer "length": only an answer left inside a call is cut."""
    from gemmarun.sampling import SamplingParams

    state = tool_llm.grammar_state(tool_llm.tool_grammar([WEATHER], text_first=True), SamplingParams())
    for token in tool_llm.tokenizer.encode("Sure, ", add_bos=False):
        state.advance(token)
    assert not state.answer_cut(by_stop=True)
    for token in tool_llm.tokenizer.encode("<|tool_call>call:get_weather{city:", add_bos=False):
        state.advance(token)
    assert state.answer_cut(by_stop=True)


def test_a_long_ref_chain_is_followed_without_recursion(tool_llm):
    parameters = {"type": "object", "properties": {"a": {"$ref": "#/$defs/d0"}},
                  "$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(600)} | {"d600": {"type": "integer"}}}
    grammar = tool_llm.tool_grammar([{"name": "f", "parameters": parameters}])
    assert _accepts(tool_llm, grammar, _call("f", "{a:7}")) and not _accepts(tool_llm, grammar, _call("f", "{a:true}"))


# (a second review's finds: each was accepted though it broke the schema, or crashed, or grew
# without bound)
MERGES = {"name": "f", "parameters": {"type": "object", "properties": {
    "p": {"allOf": [{"type": "object", "properties": {"age": {"type": "integer"}, "name": {"type": "string"}}},
                    {"properties": {"age": {"description": "in years"}}}]},
    "n": {"allOf": [{"type": "number"}, {"type": "integer"}]},
    "t": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 2, "maxItems": 2},
    "o": {"type": "object", "required": ["id"]}}}}


@pytest.mark.parametrize("args, ok", [
    (f"{{p:{{age:3,name:{Q}Ann{Q}}}}}", True), (f"{{p:{{age:{Q}old{Q}}}}}", False),
    ("{n:2}", True), ("{n:1.5}", False),
    (f"{{t:[{Q}a{Q},1]}}", True), ("{t:[true,null]}", False), (f"{{t:[{Q}a{Q}]}}", False),
    ("{o:{id:1}}", True), ("{o:{}}", False),
])
def test_merged_properties_types_tuples_and_required_keys(tool_llm, args, ok):
    assert _accepts(tool_llm, tool_llm.tool_grammar([MERGES]), _call("f", args)) is ok


def test_the_arguments_root_is_an_object_whatever_its_alternatives():
    from gemmarun.constrain import _ToolCallLark

    lark = _ToolCallLark([{"name": "f", "parameters": {"anyOf": [
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, {"type": "null"}]}}],
        {m: i for i, m in enumerate(("<|tool_call>", "<tool_call|>", '<|"|>', "<|tool_response>"))})
    assert "any_map" not in lark.source(None, False).split("STRING_BODY")[0]  # the null branch had been any object


@pytest.mark.parametrize("parameters, message", [
    ({"type": "object", "properties": {"a": {"$ref": {"x": 1}}}}, "is not a reference inside the parameters"),
    ({"type": "object", "properties": {"a": {"allOf": [{"properties": None}, {"properties": {"b": {}}}]}}},
     "'properties' must be an object"),
    ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"type": "integer"}]}}}, "have none in common"),
])
def test_schemas_that_had_crashed_are_refused_in_one_line(tool_llm, parameters, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        tool_llm.tool_grammar([{"name": "f", "parameters": parameters}])


def test_nested_merges_are_made_once_and_a_runaway_schema_is_refused(tool_llm):
    chain: dict = {"type": "integer"}
    for _ in range(30):  # each level merges the next twice: 2^30 merges had been made
        chain = {"allOf": [chain, chain]}
    assert tool_llm.tool_grammar([{"name": "f", "parameters": {"type": "object", "properties": {"a": chain}}}])
    # shared keys merged into each alternative, level by level: the rules double a level
    defs = {f"S{k}": {"description": f"level {k}", "anyOf": [{"$ref": f"#/$defs/S{k + 1}"}, {"$ref": f"#/$defs/S{k + 1}"}]}
            for k in range(30)} | {"S30": {"type": "integer"}}
    with pytest.raises(GrammarError, match="grammar rules: too large"):
        tool_llm.tool_grammar([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/S0"}},
                                                              "$defs": defs}}])
