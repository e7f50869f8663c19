"""Constrained decoding: JSON Schema, regex, Lark grammars and well-formed SVG/XML, with
llguidance (a maintained grammar engine; compared with outlines-core in docs/benchmarks.md).

A `Grammar` is compiled once per request; a `GrammarState` follows one generation, masking the
logits before each sample and consuming each sampled token. With thinking on, the grammar starts
after the reasoning channel closes, so the model may think freely and answer in the format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .tokenizer import Tokenizer

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
            json.loads(text)
            source = LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
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
            raise GrammarError(f"the grammar cannot go on: {self.matcher.get_error().splitlines()[0]}")
        allowed = np.unpackbits(bits, bitorder="little").view(np.bool_)  # bit i of byte b: token 8b+i
        n = logits.shape[-1]
        allowed = allowed[:n].copy() if allowed.size >= n else np.pad(allowed, (0, n - allowed.size))
        if not self.active:  # first token: the grammar's first token, or open the thinking channel
            allowed[self.opens_with] = True
        if not allowed.any():
            raise GrammarError("the grammar allows no token here (no text can satisfy it)")
        return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))

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
            raise GrammarError(f"token {token} violates the grammar: {self.matcher.get_error().splitlines()[0]}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing but the end."""
        return self.active and self.matcher.is_stopped()

    def rollback(self, n: int) -> None:
        if self.active and n:
            self.matcher.rollback(n)
