"""Constrained decoding: JSON Schema, regex, Lark grammars and well-formed SVG/XML, with
llguidance (a maintained grammar engine; compared with outlines-core in docs/benchmarks.md).

A `Grammar` is compiled once per request; a `GrammarState` follows one generation, masking the
logits before each sample and consuming each sampled token. With thinking on, the grammar starts
after the reasoning channel closes, so the model may think freely and answer in the format.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .chat import _KEY_RE, CALL_CLOSE, CALL_OPEN, MARKERS, QUOTE, RESPONSE_OPEN, tool_key_order
from .tokenizer import Tokenizer, byte_of_piece

# Well-formed XML restricted to SVG-ish markup: nested elements with quoted attributes, text with
# entities, comments. Tag names are matched pairwise by a rule per element name, which a
# context-free grammar can do for a finite name set (the SVG 1.1 + 2 element list).
SVG_ELEMENTS = (
    "svg g defs desc title symbol use image switch path rect circle ellipse line polyline polygon "
    "text tspan textPath linearGradient radialGradient stop pattern clipPath mask marker filter "
    "feBlend feColorMatrix feComponentTransfer feComposite feFlood feGaussianBlur feMerge feMergeNode "
    "feMorphology feOffset feTurbulence feDisplacementMap feDropShadow animate animateTransform set style"
).split()


def _svg_lark() -> str:
    """Every document it accepts parses as XML (duplicate attributes aside: `svg check` and
    `svg repair` catch those). Two copies of the element rules: xlink:href and its kin only below
    a root that declares the xlink namespace, where the prefix is bound."""
    rules = ['start: WS? (svg_el | xsvg_el) WS?',
             'attr: WS NAME "=\\"" AVAL "\\"" | WS NS_DECLARATION',
             'xattr: attr | WS XLINK_NAME "=\\"" AVAL "\\""']
    for x in ("", "x"):
        names = [n for n in SVG_ELEMENTS if n != "svg"]
        rules += [f"{x}content: (TEXT | COMMENT | {x}element)*",
                  f"{x}element: " + " | ".join(f"{x}el_{n.lower()}" for n in names)]
        for n in names:  # Lark rule names are lowercase
            rules.append(f'{x}el_{n.lower()}: "<{n}" {x}attr* WS? ("/>" | ">" {x}content "</{n}>")')
    rules += ['svg_el: "<svg" attr* WS? ("/>" | ">" content "</svg>")',
              'xsvg_el: "<svg" xattr* WS XLINK_DECLARATION xattr* WS? ("/>" | ">" xcontent "</svg>")']
    # Only what XML takes: no prefix but xml: (always bound) and xlink: (above), no control
    # characters (U+FFFE/FFFF neither), no "]]>" in text (which starts with neither ">" nor "]"
    # followed by "]" or ">": two pieces of text cannot make one), character references only to
    # characters XML allows.
    chars = r"\x00-\x08\x0b\x0c\x0e-\x1f\x{FFFE}\x{FFFF}"
    reference = rf"&(amp|lt|gt|quot|apos|#0*({_XML_CHARACTER_NUMBERS}));"
    first, char, after_brackets = (rf"([^<&\]>{chars}]|{reference})", rf"([^<&\]{chars}]|{reference})",
                                   rf"([^<&\]>{chars}]|{reference})")
    rules += [
        'NAME: /(xml:)?[A-Za-z_][A-Za-z0-9_.-]{0,40}/',
        'XLINK_NAME: /xlink:[A-Za-z_][A-Za-z0-9_.-]{0,40}/',
        'XLINK_DECLARATION: "xmlns:xlink=\\"http://www.w3.org/1999/xlink\\""',
        rf'NS_DECLARATION: /xmlns:(sodipodi|inkscape|dc|cc|rdf|svg)="[^"<&{chars}]{{1,400}}"/',
        rf'AVAL: /[^"<&{chars}]{{0,400}}/',
        rf'TEXT: /\]?{first}({char}|\]{char}|\]\]+{after_brackets})*\]*/',
        rf'COMMENT: /<!--([^-{chars}]|-[^-{chars}]){{0,400}}-->/',
        'WS: /[ \\t\\n]{1,40}/',
    ]
    return "\n".join(rules)


MAX_TOOL_RULES = 20_000  # a tool grammar's rules: real schemas make hundreds; nested merges could make millions


def _types(schema: Any) -> set[str] | None:
    """The JSON types a schema names (None: it names none)."""
    kinds = schema.get("type") if isinstance(schema, dict) else None
    return {kinds} if isinstance(kinds, str) else set(kinds) if isinstance(kinds, list) else None


def _common_types(a: Any, b: Any) -> list[str]:
    """The types both allow (an integer is a number too); none in common is refused."""
    left, right = _types({"type": a}) or set(), _types({"type": b}) or set()

    def widened(kinds: set[str]) -> set[str]:
        return kinds | {"integer"} if "number" in kinds else kinds

    common = widened(left) & widened(right)
    if "number" in common:  # (then "integer" adds nothing)
        common.discard("integer")
    if not common:
        raise GrammarError(f"allOf's types {sorted(left)} and {sorted(right)} have none in common")
    return sorted(common)


class _ToolCallLark:
    """Gemma 4's tool-call syntax (spec 9.2 rule 5, as chat.format_tool_value writes it) for the
    declared functions, each call's arguments following its parameters' JSON Schema: types, enums
    and consts, the properties (in the template's key order; the required ones present, no others;
    a map's values by additionalProperties), items, anyOf/oneOf, allOf (merged), local $refs.
    Bounds (lengths, ranges, patterns, formats) are not enforced. The markers are their single
    tokens (`marker_ids`: the id of each of chat.MARKERS in this vocabulary), as the reply's
    parser reads them; no text may spell one. A schema it cannot follow raises GrammarError."""

    def __init__(self, functions: list[dict], marker_ids: Mapping[str, int]) -> None:
        self.rules: list[str] = []
        self._made: dict[int, str] = {}
        self._root: Any = {}
        self._holding: list[Any] = []  # the schemas made here (merged allOfs): their ids stay theirs
        self._merges: dict[tuple, dict] = {}
        self.marker = {m: f"<[{i}]>" for m, i in marker_ids.items()}
        self.quote = self.marker[QUOTE]
        self.calls = {}
        for fn in functions:
            self._root = fn.get("parameters")
            head = json.dumps(f"call:{fn['name']}")
            try:  # no parameters (or null): none taken, as OpenAI reads it ({} alone is any object)
                args = self._value(self._root, object_only=True) if self._root is not None else '"{" "}"'
            except RecursionError:
                raise GrammarError(f"tool {fn['name']!r}: its parameters are nested too deep") from None
            except GrammarError as e:
                raise GrammarError(f"tool {fn['name']!r}: {e}") from None
            self.calls[fn["name"]] = self._add(f"{self.marker[CALL_OPEN]} {head} {args} {self.marker[CALL_CLOSE]}")
        no_marker = "~/(?s:.*)(" + "|".join(re.escape(m).replace("/", "\\/") for m in MARKERS) + ")(?s:.*)/"
        digits, fraction = "(0|[1-9][0-9]{0,299})", r"(\.[0-9]{1,300})?"
        self.rules += [
            f"FREE_TEXT: /(?s:.+)/ & {no_marker}",
            f"STRING_BODY: /(?s:.*)/ & {no_marker}",
            "INTEGER: /-?(0|[1-9][0-9]{0,299})/",
            # within a float's range (past it a reply's parser keeps the digits as a string): up
            # to 300 digits, or e-999, or an exponent to 99 after 200 digits, to 299 after 9, to
            # 307 after one (9.99e307; the largest float is 1.8e308)
            f"NUMBER: /-?{digits}{fraction}([eE]-[0-9]{{1,3}})?/ | /-?(0|[1-9][0-9]{{0,199}}){fraction}[eE]\\+?[0-9]{{1,2}}/"
            f" | /-?(0|[1-9][0-9]{{0,8}}){fraction}[eE]\\+?[12][0-9]{{2}}/ | /-?[0-9]{fraction}[eE]\\+?30[0-7]/",
            r'BARE_KEY: /[^:{}\[\],<"\s]([^:{}\[\],<"\n]{0,62}[^:{}\[\],<"\s])?/',  # (inner spaces: "a b")
            f"string: {self.quote} STRING_BODY {self.quote}",
            'any: string | NUMBER | "true" | "false" | "null" | any_list | any_map',
            'any_list: "[" (any ("," any)*)? "]"',
            'any_map: "{" (any_key ":" any ("," any_key ":" any)*)? "}"',
            "any_key: BARE_KEY | string",
        ]

    def source(self, only: str | None, text_first: bool) -> str:
        """Calls of `only` (or of any tool) making the answer; `text_first`: free text may come
        before them, or stand alone. The reply ends at <|tool_response> (or an end of turn)."""
        calls = self.calls[only] if only else " | ".join(self.calls.values())
        end = self.marker[RESPONSE_OPEN]
        start = f"start: FREE_TEXT? ({calls})* {end}?" if text_first else f"start: ({calls})+ {end}?"
        return "\n".join([start, *self.rules])

    def _add(self, body: str) -> str:
        self._check_size()
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def _value(self, schema: Any, object_only: bool = False) -> str:
        """The rule for a value of `schema` (`object_only`: the arguments, an object whatever
        the schema says)."""
        if schema is True or schema == {}:
            return "any_map" if object_only else "any"
        if schema is False:
            raise GrammarError("a schema that no value satisfies (false) where a value is needed")
        if not isinstance(schema, dict):
            raise GrammarError(f"a schema is an object, not {type(schema).__name__}")
        key = (id(schema), object_only)
        if key not in self._made:
            self._check_size()
            name = self._made[key] = f"r{len(self.rules)}"  # before the body: a schema may refer to itself
            self.rules.append("")
            self.rules[int(name[1:])] = f"{name}: {self._body(schema, object_only)}"
        return self._made[key]

    def _body(self, schema: dict, object_only: bool) -> str:
        if "$ref" in schema:
            return self._value(self._follow(schema), object_only)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            return self._value(self._all_of(schema), object_only)
        if "const" in schema:
            return self._literal(schema["const"])
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return " | ".join(dict.fromkeys(self._literal(v) for v in schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                choices = [alt if not rest or not isinstance(alt, dict) else self._merged([rest, alt], (id(schema), id(alt)))
                           for alt in schema[key] if alt is not False]
                if object_only:  # the arguments: an object, whatever else an alternative allows
                    choices = [c for c in choices if "object" in (_types(self._follow(c)) or {"object"})]
                if not choices:
                    raise GrammarError(f"no alternative of {key} can be satisfied")
                return " | ".join(dict.fromkeys(self._value(c, object_only) for c in choices))
        kinds = schema.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if None in kinds or not all(isinstance(k, str) for k in kinds):
            kinds = ["object"] if "properties" in schema else ["array"] if "items" in schema else []
        if object_only:
            kinds = ["object"]
        return " | ".join(self._typed(kind, schema) for kind in kinds) or "any"

    def _typed(self, kind: str, schema: dict) -> str:
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            prefix = schema.get("prefixItems")
            if isinstance(prefix, list) and prefix:  # a tuple (pydantic's): each item its own, all given
                first = ' "," '.join(self._value(item) for item in prefix)
                if "items" not in schema or schema["items"] is False:
                    return f'"[" {first} "]"'
                item = self._value(schema["items"])
                return f'"[" {first} ("," {item})* "]"'
            if schema.get("items") is False:
                return '"[" "]"'
            item = self._value(schema.get("items", True))
            return f'"[" ({item} ("," {item})*)? "]"'
        return {"string": "string", "integer": "INTEGER", "number": "NUMBER", "boolean": '"true" | "false"',
                "null": '"null"'}.get(kind, "any")

    def _object(self, schema: dict) -> str:
        properties, required = schema.get("properties"), schema.get("required", [])
        if properties is not None and not isinstance(properties, dict):
            raise GrammarError("'properties' must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise GrammarError("'required' must be a list of property names")
        if not properties and required:  # keys required, none described: those keys, any values
            properties = dict.fromkeys(required, True)
        if not properties:
            extra = schema.get("additionalProperties", True if properties is None else False)
            if extra is False:  # ("properties": {} alone: no arguments, as OpenAI writes it)
                return '"{" "}"'
            value = self._value(extra)  # a map: its values as additionalProperties says
            return "any_map" if value == "any" else f'"{{" (any_key ":" {value} ("," any_key ":" {value})*)? "}}"'
        missing = [r for r in required if r not in properties]
        if missing:
            raise GrammarError(f"required property {missing[0]!r} is not among the properties")
        keys = [k for k in tool_key_order(properties) if properties[k] is not False or k in required]
        items = [f"{self._key(k)} \":\" {self._value(properties[k])}" for k in keys]
        # the properties from i on, after a comma or not: optional ones may be left out, the
        # required ones not (made from the last one back: no recursion per property)
        after = {(len(keys), True): "", (len(keys), False): ""}
        for i in range(len(keys) - 1, -1, -1):
            for comma in (True, False):
                taken = " ".join(filter(None, ['","' if comma else "", items[i], after[i + 1, True]]))
                skipped = None if keys[i] in required else after[i + 1, comma]
                after[i, comma] = self._add(taken if skipped is None else
                                            f"{taken} | {skipped}" if skipped else f"({taken})?")
        return f'"{{" {after[0, False]} "}}"'

    def _key(self, key: str) -> str:
        if _KEY_RE.fullmatch(key) and key.strip() == key and key[:1] != '"':  # (as a reply's parser reads keys)
            return json.dumps(key)
        return self._string(key)

    def _string(self, text: str) -> str:
        marker = next((m for m in MARKERS if m in text), None)
        if marker is not None:
            raise GrammarError(f"the value {text[:40]!r} holds {marker}, which a tool call cannot write")
        return f"{self.quote} {json.dumps(text)} {self.quote}" if text else f"{self.quote} {self.quote}"

    def _literal(self, value: Any) -> str:
        """The rule for exactly `value` (an enum's or a const's), as format_tool_value writes it."""
        if isinstance(value, str):
            return self._string(value)
        if isinstance(value, dict):
            pairs = [f'{self._key(str(k))} ":" {self._literal(value[k])}' for k in tool_key_order(value)]
            return '"{" ' + ' "," '.join(pairs) + ' "}"' if pairs else '"{" "}"'
        if isinstance(value, list):
            return '"[" ' + ' "," '.join(self._literal(v) for v in value) + ' "]"' if value else '"[" "]"'
        if isinstance(value, float) and not math.isfinite(value):
            raise GrammarError(f"{value} is no JSON number")
        return json.dumps(json.dumps(value))  # numbers, true, false, null

    def _follow(self, schema: Any) -> Any:
        """The schema a chain of $refs ends at (a ref to a ref to itself ends nowhere: refused)."""
        followed = set()
        while isinstance(schema, dict) and "$ref" in schema:
            ref = schema["$ref"]
            target = self._resolve(ref)  # (refuses a ref that is no string)
            if ref in followed:
                raise GrammarError(f"$ref {ref[:60]!r} refers to itself, through nothing but $refs")
            followed.add(ref)
            schema = target
        return schema

    def _resolve(self, ref: Any) -> Any:
        """A local reference: a JSON pointer into the parameters ("#", "#/$defs/Item",
        "#/properties/a"); another document's is refused."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise GrammarError(f"$ref {str(ref)[:60]!r} is not a reference inside the parameters")
        node = self._root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isascii() and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise GrammarError(f"$ref {ref[:60]!r} points at nothing")
        return node

    def _all_of(self, schema: dict) -> dict:
        """A schema with allOf as one schema (made once per schema)."""
        return self._merged([{k: v for k, v in schema.items() if k != "allOf"}, *schema["allOf"]], (id(schema),))

    def _merged(self, parts: list, key: tuple) -> dict:
        """Schemas as one (allOf's, or anyOf's shared keys and an alternative; made once per
        `key`): properties joined (one named twice must follow both), required joined, types
        intersected, other keys the first's."""
        if key in self._merges:
            return self._merges[key]
        merged: dict = {}
        for part in parts:
            part = self._follow(part)
            if not isinstance(part, dict):
                raise GrammarError("allOf holds a schema that is not an object")
            if isinstance(part.get("allOf"), list):
                part = self._all_of(part)
            for k, v in part.items():
                if k == "properties":
                    if not isinstance(v, dict):
                        raise GrammarError("'properties' must be an object")
                    both = merged.setdefault("properties", {})
                    for name, sub in v.items():
                        both[name] = {"allOf": [both[name], sub]} if name in both else sub
                elif k == "required":
                    if not isinstance(v, list):
                        raise GrammarError("'required' must be a list of property names")
                    merged["required"] = [*merged.get("required", []), *v]
                elif k == "type" and "type" in merged:
                    merged["type"] = _common_types(merged["type"], v)
                else:
                    merged.setdefault(k, v)
        self._merges[key] = self._hold(merged)
        return merged

    def _check_size(self) -> None:
        if len(self.rules) > MAX_TOOL_RULES:
            raise GrammarError(f"the parameters' schemas make over {MAX_TOOL_RULES} grammar rules: too large")

    def _hold(self, schema: dict) -> dict:
        """Keep a schema made here alive, so its id names no other while the rules are made."""
        self._holding.append(schema)
        return schema


def _decimal_range(lo: int, hi: int) -> str:
    """A regex alternation for the decimal numbers lo..hi (no leading zeros)."""
    def same_length(a: str, b: str) -> list[str]:
        if not a:
            return [""]
        if a[0] == b[0]:
            return [a[0] + rest for rest in same_length(a[1:], b[1:])]
        n = len(a) - 1
        out = [a[0] + rest for rest in same_length(a[1:], "9" * n)]
        if int(b[0]) - int(a[0]) > 1:
            out.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}]" + "[0-9]" * n)
        return out + [b[0] + rest for rest in same_length("0" * n, b[1:])]

    parts = []
    while lo <= hi:
        top = min(hi, 10 ** len(str(lo)) - 1)
        parts += same_length(str(lo), str(top))
        lo = top + 1
    return "|".join(parts)


# The characters XML 1.0 allows: tab, newline, carriage return, and from space up, less the
# surrogates and U+FFFE/U+FFFF.
XML_CHARACTER_RANGES = ((9, 10), (13, 13), (32, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF))
_XML_CHARACTER_NUMBERS = "|".join(_decimal_range(lo, hi) for lo, hi in XML_CHARACTER_RANGES)


# JSON is written on one line with json.dumps' separators: whitespace that the grammar allowed
# anywhere let small models pad forever (newline after newline) before the answer ended.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema, regex or grammar that cannot be compiled (one-line message)."""


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint: `kind` is how it was given (json_schema, regex or lark; any_json is a
    json_schema, svg a lark grammar), `source` what llguidance runs."""

    kind: str
    source: str  # the llguidance grammar

    @staticmethod
    def json_schema(schema: dict[str, Any] | str) -> "Grammar":
        from llguidance import LLMatcher

        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            value = json.loads(text)
            if value is True:  # the schema every value satisfies
                text = "{}"
            elif not isinstance(value, dict):
                what = "false, which no value satisfies" if value is False else f"a JSON {type(value).__name__}"
                raise GrammarError(f"invalid JSON schema: a schema is an object (or true), not {what}")
            source = LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
        except GrammarError:
            raise
        except (ValueError, RuntimeError) as e:
            raise GrammarError(f"invalid JSON schema: {_first_line(e)}") from None
        return Grammar._checked("json_schema", source, "invalid JSON schema")

    @staticmethod
    def any_json() -> "Grammar":
        return Grammar.json_schema({"type": "object"})

    @staticmethod
    def regex(pattern: str) -> "Grammar":
        from llguidance import LLMatcher

        return Grammar._checked("regex", LLMatcher.grammar_from_regex(pattern), "invalid regex")

    @staticmethod
    def lark(text: str) -> "Grammar":
        from llguidance import LLMatcher

        return Grammar._checked("lark", LLMatcher.grammar_from_lark(text), "invalid grammar")

    @staticmethod
    def _checked(kind: str, source: str, what: str) -> "Grammar":
        """Compile once without a tokenizer, so a bad schema, regex or grammar is refused where it
        is given (a request's 400), not when a generation starts."""
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(source)
        if error:
            raise GrammarError(f"{what}: {_first_line(error)}")
        return Grammar(kind, source)

    @staticmethod
    def tool_calls(functions: list[dict], marker_ids: Mapping[str, int], only: str | None = None,
                   text_first: bool = False) -> "Grammar":
        """Gemma 4 tool calls ({name, parameters?} each) whose arguments follow each function's
        parameters (_ToolCallLark): calls of `only` or of any tool (OpenAI's tool_choice
        "required" or a named function), or, `text_first`, free text then any calls (tool_choice
        "auto" with strict functions)."""
        from llguidance import LLMatcher

        source = LLMatcher.grammar_from_lark(_ToolCallLark(functions, marker_ids).source(only, text_first))
        return Grammar._checked("tool_calls", source, "the tools' parameters")

    @staticmethod
    def svg() -> "Grammar":
        """SVG's structure: known elements, closed tags, quoted values, escaped text. An attribute
        written twice is not excluded (uniqueness is no context-free rule): `svg.repair_svg` of
        the output settles that, as `gemmarun svg draw` does."""
        return Grammar.lark(_svg_lark())


def _first_line(error) -> str:
    """llguidance's first line, with the reason its regex parser states lines below it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    reason = next((line for line in lines[1:] if line.startswith("error:")), None)
    return f"{lines[0]} {reason.removeprefix('error:').strip()}" if reason else lines[0]


@lru_cache(maxsize=4)
def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    """llguidance's view of our tokenizer, built once per loaded tokenizer (seconds for 262k
    tokens; keyed by the tokenizer object)."""
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))


# Where a JSON answer is, for its object keys: (open containers, the string being written). A
# container is (is an object, its keys so far, a key comes next); the string (is a key, its bytes
# so far, after a backslash) or None. Immutable: one per consumed token, for rollbacks.
JsonPlace = tuple[tuple[tuple[bool, frozenset, bool], ...], "tuple[bool, bytes, bool] | None"]
_QUOTE, _BACKSLASH = 0x22, 0x5C
# The escapes a key may use, and what they stand for: those of characters JSON cannot write
# plainly. `\\u` and `\\/` are refused: they spell names that have a plain spelling too.
_KEY_ESCAPES = {ord('"'): b'"', ord("\\"): b"\\", ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n",
                ord("r"): b"\r", ord("t"): b"\t"}


def json_keys_after(place: JsonPlace, data: bytes) -> JsonPlace | None:
    """The place after `data` (a token's bytes), or None where it writes a key again in the same
    object or spells a key with an escape it does not need. llguidance's JSON grammar does not
    follow key names: a key could repeat (`{"b": 1, "b": 2}`, meeting minProperties or a
    required key by repetition) and a declared key written escaped (`"\\u0061"`, which is "a")
    counted as an additional property, its value skipping the declared type. So each name has
    one spelling (plain, but for a quote, a backslash or a control character) and comes once."""
    frames, string = list(place[0]), place[1]
    for c in data:
        if string is not None:
            is_key, name, escaped = string
            if is_key:
                if escaped:
                    if c not in _KEY_ESCAPES:
                        return None
                    string = (True, name + _KEY_ESCAPES[c], False)
                elif c == _BACKSLASH:
                    string = (True, name, True)
                elif c == _QUOTE:
                    _, keys, _ = frames[-1]
                    if name in keys:
                        return None
                    frames[-1], string = (True, keys | {name}, False), None
                else:
                    string = (True, name + bytes((c,)), False)
            elif escaped:
                string = (False, b"", False)
            elif c == _BACKSLASH:
                string = (False, b"", True)
            elif c == _QUOTE:
                string = None
        elif c == _QUOTE:
            string = (bool(frames) and frames[-1][0] and frames[-1][2], b"", False)
        elif c == 0x7B:  # {
            frames.append((True, frozenset(), True))
        elif c == 0x5B:  # [
            frames.append((False, frozenset(), False))
        elif c in (0x7D, 0x5D) and frames:  # } ]
            frames.pop()
        elif c == 0x2C and frames and frames[-1][0]:  # a comma in an object: a key comes next
            frames[-1] = (True, frames[-1][1], True)
    return tuple(frames), string


@lru_cache(maxsize=4)
def _key_candidates(tokenizer: Tokenizer, vocab_size: int) -> dict[int, np.ndarray]:
    """For `need` = 1, 2, 3: the tokens whose text holds `need` quotes, or `need` - 1 and a
    backslash, those that can reach a key's end (or a backslash in a key) from where `need`
    quotes are wanted. Once per tokenizer (0.4 s for 262k tokens)."""
    quotes, backslash = np.zeros(vocab_size, np.uint8), np.zeros(vocab_size, np.bool_)
    for i in range(min(vocab_size, len(tokenizer))):
        piece = tokenizer.id_to_token(i) or ""  # (a byte piece "<0x22>" is the quote itself)
        byte = byte_of_piece(piece)
        text = chr(byte) if byte is not None else piece
        quotes[i], backslash[i] = min(text.count('"'), 3), "\\" in text
    return {need: (quotes >= need) | (backslash & (quotes >= need - 1)) for need in (1, 2, 3)}


class GrammarState:
    """Follows one generation: `mask(logits)` before sampling, `advance(token)` after.

    `start_after`: a token id (Gemma 4's `<channel|>`) after which the grammar begins, when the
    reply opens with `opens_with` (`<|channel>`); otherwise the grammar applies from the start.
    """

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, vocab_size: int, eos_ids: tuple[int, ...],
                 opens_with: int | None = None, start_after: int | None = None):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(ll_tokenizer(tokenizer, vocab_size, eos_ids), grammar.source)
        if self.matcher.is_error():
            raise GrammarError(f"grammar does not compile: {self.matcher.get_error().splitlines()[0]}")
        self.matcher.compute_bitmask()  # a grammar that no text satisfies fails here, before generating
        if self.matcher.is_error():
            raise GrammarError(f"no text satisfies the grammar ({self.matcher.get_error().splitlines()[0]})")
        self.kind = grammar.kind
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        # JSON only: the place after each consumed token (json_keys_after), the first the start's
        self._json: list[JsonPlace] | None = [((), None)] if grammar.kind == "json_schema" else None
        self.opens_with, self.start_after = opens_with, start_after
        self.active = opens_with is None
        self.first = True
        self.eos_ids = eos_ids

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with every token the grammar forbids at -inf."""
        if not self.active and not self.first:  # inside the thinking channel: free, but the answer
            ends = torch.tensor([i for i in self.eos_ids if i < logits.shape[-1]], device=logits.device)
            return logits.index_fill(-1, ends, float("-inf"))  # must still come: no end of turn here
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        if self.matcher.is_error():  # e.g. a recursion the parser gave up on: no mask to trust
            error = self.matcher.get_error().splitlines()[0]
            if "NoExtensionBias" in error:  # (a required property that is itself, say)
                raise GrammarError(f"no text can complete the answer under the grammar ({error})")
            raise GrammarError(f"the grammar cannot go on: {error}")
        allowed = np.unpackbits(bits, bitorder="little").view(np.bool_)  # bit i of byte b: token 8b+i
        n = logits.shape[-1]
        allowed = allowed[:n].copy() if allowed.size >= n else np.pad(allowed, (0, n - allowed.size))
        if self._json is not None and self.active:
            self._keep_keys_plain(allowed)
        if not self.active:  # first token: the grammar's first token, or open the thinking channel
            allowed[self.opens_with] = True
        if not allowed.any():
            raise GrammarError("the grammar allows no token here (no text can satisfy it)")
        return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))

    def _keep_keys_plain(self, allowed: np.ndarray) -> None:
        """Forbid the allowed tokens that would repeat a key of the object or escape in a key
        (json_keys_after). Only tokens with enough quotes to reach a key's end from here are
        tried: in a key 1, else 2, in a string value 3 (a backslash counts for the last)."""
        place = self._json[-1]
        string = place[1]
        if string is not None and string[0] and string[2]:  # after a backslash in a key: only its escapes
            piece = self.tokenizer.piece_bytes
            for token in np.flatnonzero(allowed):  # (rare: a name with a quote, a backslash, a control character)
                data = piece(int(token))
                allowed[token] = not data or (data[0] in _KEY_ESCAPES and (
                    len(data) == 1 or json_keys_after(place, data) is not None))
            return
        need = 1 if string is not None and string[0] else 3 if string is not None else 2
        tried = np.flatnonzero(allowed & _key_candidates(self.tokenizer, self.vocab_size)[need][: allowed.size])
        piece = self.tokenizer.piece_bytes
        if need == 1:  # in a key (~1400 tokens to try): most end it at their quote
            name, keys = string[1], place[0][-1][1]
            for token in tried:
                data = piece(int(token))
                quote = data.find(b'"')
                if b"\\" in data or data.find(b'"', quote + 1) != -1:  # (few) an escape, or on past the key
                    allowed[token] = json_keys_after(place, data) is not None
                elif name + data[:quote] in keys:
                    allowed[token] = False
            return
        for token in tried:
            if json_keys_after(place, piece(int(token))) is None:
                allowed[token] = False

    def close(self, token: int) -> None:
        """The generation ended on `token`: an end of sequence the grammar allowed completes it
        (a top-level number could have taken more digits: not stopped, but accepting)."""
        if self.active and token in self.eos_ids and self.matcher.is_accepting():
            self.matcher.consume_token(token)

    def advance(self, token: int) -> None:
        if self.first:
            self.first = False
            if not self.active and token != self.opens_with:
                self.active = True  # no thinking channel: this token is already the answer
        elif not self.active:
            self.active = token == self.start_after
            return
        if not self.active:
            return
        if not self.matcher.consume_token(token):
            error = self.matcher.get_error().splitlines()[0]
            if "; max is " in error:  # a limit of the engine's (items in a parser row): no fault of the token
                raise GrammarError(f"the schema or grammar is too large for the grammar engine ({error})")
            raise GrammarError(f"token {token} violates the grammar: {error}")
        if self._json is not None:
            place = json_keys_after(self._json[-1], self.tokenizer.piece_bytes(token))
            if place is None:  # (a token the mask had not offered)
                raise GrammarError(f"token {token} repeats or escapes a JSON key")
            self._json.append(place)

    def answer_cut(self, by_stop: bool) -> bool:
        """Whether an answer that stopped here does not parse: left unfinished, or finished and then
        cut by a stop string (whose text is never kept, and the grammar's last text held it).
        Such a "stop" is reported "length": a "stop" answer under a grammar always parses. Tool
        calls' text is free and their calls are not the answer's text: there, only an answer
        left inside a call (or a forced answer before its call) is cut."""
        if self.kind == "tool_calls":
            return not (self.active and self.matcher.is_accepting())
        return by_stop or not self.finished

    @property
    def in_json_string(self) -> bool:
        """Inside a JSON string (a key or a value) after the tokens consumed so far."""
        return self._json is not None and self._json[-1][1] is not None

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing but the end."""
        return self.active and self.matcher.is_stopped()

    def rollback(self, n: int) -> None:
        if self.active and n:
            self.matcher.rollback(n)
            if self._json is not None:
                del self._json[-n:]
