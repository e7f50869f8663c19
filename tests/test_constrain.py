"""Constrained decoding: every generation parses and validates, on tiny and real models."""

import json
import re

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


REAL_SCHEMAS = [  # bounded numbers and strings: what a schema for a real task spells out
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    SCHEMAS[1],
]


@pytest.mark.slow
def test_real_model_json_and_svg():
    llm = gemmarun.load()
    for i, schema in enumerate(REAL_SCHEMAS):
        text = llm.generate("Here is a JSON record:", grammar=Grammar.json_schema(schema), max_tokens=60,
                            temperature=0.7, seed=i, loop_guard="recover")
        _validate(json.loads(text), schema)
    import xml.etree.ElementTree as ET

    svg = llm.generate("A red circle in SVG:", grammar=Grammar.svg(), max_tokens=40, temperature=0.7, seed=1)
    assert svg.lstrip().startswith("<svg")
    if svg.rstrip().endswith("</svg>"):
        assert ET.fromstring(svg).tag.endswith("svg")


def test_svg_grammar_compiles_and_constrains(tiny):
    import xml.etree.ElementTree as ET

    text = tiny.generate("hello", grammar=Grammar.svg(), max_tokens=150, temperature=1.0, seed=2, ignore_eos=True)
    assert text.lstrip().startswith("<svg")
    if text.rstrip().endswith("</svg>"):
        ET.fromstring(text)
