"""Check, repair and render SVG written by a model.

Models write SVG that is *almost* right: a duplicated attribute (`Attribute x1 redefined`), a
group left open, prose or markdown fences around the markup, an output cut off mid-tag.
`check_svg` lists every problem with its position (expat stops at the first error, so the
structural checks run on a tolerant tokenizer of our own); `repair_svg` applies deterministic
fixes only and leaves a valid SVG byte-identical; `render_png` rasterizes with resvg, a pure
wheel that needs no system cairo.
"""

from __future__ import annotations

import html.entities
import re
import subprocess
import threading
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from xml.etree import ElementTree as ET
from xml.parsers import expat

from .outputs import write_replacing

__all__ = ["Problem", "Repair", "SvgRenderError", "check_svg", "extract_svg", "render_png", "repair_svg"]

SVG_NS = "http://www.w3.org/2000/svg"
KNOWN_NS = {"xlink": "http://www.w3.org/1999/xlink",
            "inkscape": "http://www.inkscape.org/namespaces/inkscape",
            "sodipodi": "http://sodipodi.sourceforge.net/DTD/sodipodi-0.dtd"}
_PREDEFINED = {"amp", "lt", "gt", "quot", "apos"}
_NAME = re.compile(r"[^\W\d][\w.-]*(?::[^\W\d][\w.-]*)?")  # a QName: prefix:local
_WS, _EQ = re.compile(r"\s*"), re.compile(r"\s*=\s*")
_UNQUOTED = re.compile(r"[^\s>\"'<=`]+")
_ENTITY = re.compile(r"&(?:#[0-9]+;|#x[0-9a-fA-F]+;|([^\W\d][\w.-]*);)?")
_URL = re.compile(r"url\(\s*['\"]?([^)'\"]*)['\"]?\s*\)", re.IGNORECASE)  # CSS is case-blind
_IMPORT = re.compile(r"""@import\s+(?:url\(\s*)?['"]?([^'")\s;]*)[^;]*;?""", re.IGNORECASE)
# What a DOCTYPE's internal subset can slip past the checks: an entity whose value is markup
# (elements, a <script>, an <image> reading a local file, where `&e;` stands; spelled `&#60;` too,
# so any character reference) and default attributes for every element of a name (an onclick on
# each <rect>).
_MARKUP_ENTITY = re.compile(r"""<!ENTITY\s+[^\s%]+\s*(?:"[^"]*(?:<|&\#)[^"]*"|'[^']*(?:<|&\#)[^']*')\s*>""")
_ATTLIST = re.compile(r"""<!ATTLIST(?:[^>"']|"[^"]*"|'[^']*')*>""")
_NOT_RENDERED = ("script", "foreignObject")  # local names: <s:script> runs as well
_FENCE = re.compile(r"^[ \t]*(```|~~~)", re.MULTILINE)
_SVG_START = re.compile(  # an XML declaration and a DOCTYPE right before it belong to the SVG
    r"(?:<\?xml\b[^>]*\?>\s*)?(?:<!DOCTYPE\s[^>\[]*(?:\[[^\]]*\])?\s*>\s*)?<svg(?=[\s>/])")
_NUMBER = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(?:px)?\s*$")
_STRUCTURAL = {"unclosed-tag", "stray-end-tag", "incomplete-tag", "stray-text", "root-not-svg"}
_E = expat.errors
_EXPAT_STRUCTURAL = {_E.codes[m] for m in (_E.XML_ERROR_NO_ELEMENTS, _E.XML_ERROR_TAG_MISMATCH,
                                           _E.XML_ERROR_UNCLOSED_TOKEN, _E.XML_ERROR_JUNK_AFTER_DOC_ELEMENT,
                                           _E.XML_ERROR_PARTIAL_CHAR)}


@dataclass(frozen=True)
class Problem:
    """`line` and `column` are 1-based; `kind` is a stable slug such as "duplicate-attribute",
    "unclosed-tag", "incomplete-tag", "xml-syntax", "missing-namespace", "undefined-id"."""

    line: int
    column: int
    kind: str
    message: str


@dataclass(frozen=True)
class Repair:
    svg: str
    changes: list[str]  # what was done, for a person
    problems_left: list[Problem]  # == check_svg(svg): what no deterministic fix can settle


class SvgRenderError(ValueError):
    """The SVG could not be rasterized."""


# ----------------------------------------------------------------------------- tokenizer

@dataclass
class _Attr:
    name: str
    value: str | None  # None: written without a value (`<rect hidden>`)
    quote: str  # '"', "'", or "" (unquoted)
    start: int
    end: int
    ws: str  # whitespace written before it


@dataclass
class _Tok:
    kind: str  # text | start | end | comment | cdata | pi | decl
    start: int
    end: int
    name: str = ""
    attrs: list[_Attr] = field(default_factory=list)
    self_closing: bool = False
    complete: bool = True  # False: the input ended (or a '<' came) before its '>'
    tail: str = ""  # whitespace before '>' or '/>'
    junk: list[int] = field(default_factory=list)  # offsets of characters that are no attribute


def _tokenize(s: str) -> list[_Tok]:
    """Never fails: every character belongs to exactly one token; a bare '<' stays text."""
    toks: list[_Tok] = []
    n, i, text_from = len(s), 0, 0
    while (j := s.find("<", i)) >= 0:
        tok = None
        for opener, closer, kind in (("<!--", "-->", "comment"), ("<![CDATA[", "]]>", "cdata"),
                                     ("<?", "?>", "pi")):
            if s.startswith(opener, j):
                e = s.find(closer, j + len(opener))
                tok = _Tok(kind, j, n, complete=False) if e < 0 else _Tok(kind, j, e + len(closer))
                break
        if tok is None and s.startswith("<!", j):
            tok = _decl(s, j)
        elif tok is None and s.startswith("</", j) and (m := _NAME.match(s, j + 2)):
            e, lt = s.find(">", m.end()), s.find("<", m.end())
            if e < 0 or 0 <= lt < e:
                tok = _Tok("end", j, lt if lt >= 0 else n, m.group(), complete=False)
            else:
                junk = [k for k in range(m.end(), e) if not s[k].isspace()]
                tok = _Tok("end", j, e + 1, m.group(), junk=junk)
        elif tok is None and _NAME.match(s, j + 1):
            tok = _start_tag(s, j)
        if tok is None:
            i = j + 1
            continue
        if j > text_from:
            toks.append(_Tok("text", text_from, j))
        toks.append(tok)
        i = text_from = tok.end
    if n > text_from:
        toks.append(_Tok("text", text_from, n))
    return toks


def _decl(s: str, j: int) -> _Tok:
    depth, k, n = 0, j + 2, len(s)
    while k < n:
        if s[k] in "\"'":
            e = s.find(s[k], k + 1)
            k = n if e < 0 else e + 1
            continue
        depth += (s[k] == "[") - (s[k] == "]")
        if s[k] == ">" and depth <= 0:
            return _Tok("decl", j, k + 1)
        k += 1
    return _Tok("decl", j, n, complete=False)


def _start_tag(s: str, j: int) -> _Tok:
    n, m = len(s), _NAME.match(s, j + 1)
    tok, k = _Tok("start", j, n, m.group(), complete=False), m.end()
    while True:
        ws = _WS.match(s, k).group()
        k += len(ws)
        if k >= n:
            return tok
        if s[k] == ">" or s.startswith("/>", k):
            tok.self_closing = s[k] == "/"
            tok.tail, tok.end, tok.complete = ws, k + 1 + tok.self_closing, True
            return tok
        if s[k] == "<":
            tok.end = k
            return tok
        if not (nm := _NAME.match(s, k)):
            tok.junk.append(k)
            k += 1
            continue
        a, k = _Attr(nm.group(), None, "", k, nm.end(), ws), nm.end()
        if (eq := _EQ.match(s, k)) and "=" in eq.group():
            k = eq.end()
            if k >= n:
                return tok
            if s[k] in "\"'":
                if (e := s.find(s[k], k + 1)) < 0:
                    return tok
                a.value, a.quote, k = s[k + 1:e], s[k], e + 1
            else:
                v = um.group() if (um := _UNQUOTED.match(s, k)) else ""
                v = v[:-1] if v.endswith("/") and s.startswith(">", k + len(v)) else v
                a.value, k = v, k + len(v)
            a.end = k
        tok.attrs.append(a)


class _Lines:
    def __init__(self, s: str) -> None:
        self.starts = [0] + [m.end() for m in re.finditer("\n", s)]

    def pos(self, offset: int) -> tuple[int, int]:
        line = bisect_right(self.starts, offset)
        return line, offset - self.starts[line - 1] + 1


def _prefix(name: str) -> str | None:
    return name.split(":", 1)[0] if ":" in name else None


def _local(name: str) -> str:
    return name.rsplit(":", 1)[-1]


def _animates_href_outside(tok: _Tok) -> bool:
    """<set>/<animate> that sets an href to javascript: or outside the file (script injection)."""
    if _local(tok.name) not in ("set", "animate"):
        return False
    attrs = {a.name: a.value or "" for a in tok.attrs}
    if _local(attrs.get("attributeName", "").strip()) not in ("href", "src"):
        return False
    values = [html.unescape(attrs.get(k, "")) for k in ("to", "from", "by")]
    values += html.unescape(attrs.get("values", "")).split(";")
    return any(_external(v) for v in values)


def _external(value: str) -> bool:
    """Anything but a same-file #id or inline data: a URL, a path (the renderer would read it)."""
    v = value.strip().lower()
    return bool(v) and not v.startswith(("#", "data:"))


def _entities(s: str, toks: list[_Tok]) -> dict[str, str]:
    """Entities declared in the DOCTYPE's internal subset, with their values ("" for an external
    one)."""
    decls = "".join(s[t.start:t.end] for t in toks if t.kind == "decl")
    found = re.findall(r"""<!ENTITY\s+([^\s%]+)\s*(?:"([^"]*)"|'([^']*)')?""", decls)
    return {name: double or single for name, double, single in found}


def _is_svg_namespace(value: str | None, entities: dict[str, str]) -> bool:
    """Illustrator writes xmlns="&ns_svg;" with the namespace in an internal entity."""
    return re.sub(r"&([^\s&;]+);", lambda m: entities.get(m.group(1), m.group(0)), value or "") == SVG_NS


# ----------------------------------------------------------------------------- check

def check_svg(text: str) -> list[Problem]:
    """Every problem in `text`, sorted by position; [] means clean, safe and parseable."""
    toks, lines = _tokenize(text), _Lines(text)
    entities = _entities(text, toks)
    found: list[tuple[int, str, str]] = []
    for tok in toks:
        if tok.kind == "decl":
            raw = text[tok.start:tok.end]
            if _MARKUP_ENTITY.search(raw) or _ATTLIST.search(raw):
                found.append((tok.start, "doctype-markup", "the DOCTYPE declares markup or attributes "
                              "(an entity holding elements, an <!ATTLIST>) that the checks never see"))
    mask: list[tuple[int, int]] = []  # spans blanked before expat runs, so it reports the rest
    stack: list[tuple[_Tok, set[str]]] = []  # open elements with the namespace prefixes in scope
    open_names: Counter[str] = Counter()  # of the stack, so a deep document is not quadratic
    root: _Tok | None = None
    ids: set[str] = set()
    refs: list[tuple[int, str]] = []
    for tok in toks:
        raw = text[tok.start:tok.end]
        lead = tok.start + len(raw) - len(raw.lstrip())
        if not stack and root is not None:  # after the root: report once, hide the rest
            if tok.kind in ("text", "start", "end", "cdata") and raw.strip():
                found.append((lead, "stray-text", "content after the root </svg>"))
                mask.append((lead, len(text)))
                break
            continue
        if root is None and tok.kind == "text" and raw.strip():
            found.append((lead, "stray-text", "text before the root <svg> element"))
            mask.append((tok.start, tok.end))
        elif not tok.complete:
            what = tok.name or tok.kind
            found.append((tok.start, "incomplete-tag", f"<{what}> is cut off (never closed)"))
        elif tok.kind == "text":
            _value_issues(raw, tok.start, entities, found, mask)
            if stack and _local(stack[-1][0].name) == "style":
                _url_refs(raw, tok.start, "<style>", found, refs, text=True)
                read = html.unescape(raw)  # as the parser reads it: &#117;rl( is url(
                if read != raw:
                    _url_refs(read, tok.start, "<style>", found, refs)
                for m in _IMPORT.finditer(read):
                    if _external(m.group(1)):
                        found.append((tok.start, "external-reference", f"<style> imports {m.group(1)[:60]}"))
        elif tok.kind == "start":
            if root is None:
                root = tok
                found += _root_issues(tok, entities)
            scope = (stack[-1][1] if stack else {"xml"}) | {
                a.name[6:] for a in tok.attrs if a.name[:6] == "xmlns:"}
            _element_issues(tok, scope, entities, found, mask, ids, refs)
            if not tok.self_closing:
                stack.append((tok, scope))
                open_names[tok.name] += 1
        elif tok.kind == "end":
            if tok.junk:
                found.append((tok.junk[0], "malformed-tag", f"</{tok.name}> contains extra characters"))
                mask += [(k, k + 1) for k in tok.junk]
            if not open_names[tok.name]:
                found.append((tok.start, "stray-end-tag", f"</{tok.name}> closes nothing"))
                continue
            while stack[-1][0].name != tok.name:
                t = stack.pop()[0]
                open_names[t.name] -= 1
                found.append((t.start, "unclosed-tag",
                              f"<{t.name}> is never closed (before </{tok.name}>)"))
            stack.pop()
            open_names[tok.name] -= 1
    found += [(t.start, "unclosed-tag", f"<{t.name}> is never closed") for t, _ in stack]
    if root is None:
        found.append((0, "root-not-svg", "no <svg> element"))
    found += [(off, "undefined-id", f"reference to undefined id #{ref}")
              for off, ref in refs if ref not in ids]
    problems = [Problem(*lines.pos(off), kind, msg) for off, kind, msg in found]
    problems += _expat_problem(text, mask, problems)
    if not problems:  # safety net: a clean verdict promises that ElementTree parses it
        try:
            ET.fromstring(text)
        except ET.ParseError as e:
            line, col = e.position
            problems.append(Problem(line, col + 1, "xml-syntax", str(e).split(":")[0]))
    return sorted(set(problems), key=lambda p: (p.line, p.column, p.kind))


def _root_issues(root: _Tok, entities: dict[str, str]) -> list[tuple[int, str, str]]:
    if _local(root.name) != "svg":
        return [(root.start, "root-not-svg", f"root element is <{root.name}>, not <svg>")]
    attrs = {a.name: a.value for a in root.attrs}
    out = []
    xmlns = f"xmlns:{p}" if (p := _prefix(root.name)) else "xmlns"  # the namespace its name is in
    if not _is_svg_namespace(attrs.get(xmlns), entities):
        out.append((root.start, "missing-namespace", f'<{root.name}> needs {xmlns}="{SVG_NS}"'))
    if "viewBox" not in attrs and not ("width" in attrs and "height" in attrs):
        out.append((root.start, "missing-size", "<svg> has neither viewBox nor width and height"))
    return out


def _value_issues(piece: str, at: int, entities: dict[str, str], found: list, mask: list) -> None:
    """A bare '&', an undefined entity (HTML's &nbsp;), a bare '<' in text or an attribute value."""
    for m in _ENTITY.finditer(piece):
        if m.group(0) == "&":
            found.append((at + m.start(), "bare-ampersand", "'&' must be written as &amp;"))
        elif m.group(1) and m.group(1) not in _PREDEFINED and m.group(1) not in entities:
            found.append((at + m.start(), "undefined-entity", f"undefined entity &{m.group(1)};"))
        else:
            continue
        mask.append((at + m.start(), at + m.start() + 1))
    for m in re.finditer("<", piece):
        found.append((at + m.start(), "bare-lt", "'<' must be written as &lt;"))
        mask.append((at + m.start(), at + m.start() + 1))


def _url_refs(value: str, at: int, where: str, found: list, refs: list, text: bool = False) -> None:
    """url(#id) references and external url()s; reported at `at` (plus the offset in text)."""
    for m in _URL.finditer(value):
        off = at + m.start() * text
        if m.group(1).startswith("#"):
            refs.append((off, m.group(1)[1:]))
        elif _external(m.group(1)):
            found.append((off, "external-reference", f"{where} points outside the file: {m.group(1)[:60]}"))


def _element_issues(tok: _Tok, scope: set[str], entities: dict[str, str], found: list, mask: list,
                    ids: set[str], refs: list) -> None:
    if _local(tok.name) in _NOT_RENDERED:
        kind = "script" if _local(tok.name) == "script" else "external-reference"
        found.append((tok.start, kind, f"<{tok.name}> element is not allowed"))
    if _animates_href_outside(tok):
        found.append((tok.start, "script", f"<{tok.name}> sets an href to javascript: or outside the file"))
    if (p := _prefix(tok.name)) and p not in scope:
        found.append((tok.start, "unbound-prefix", f"namespace prefix '{p}:' is not declared"))
    if tok.junk:
        found.append((tok.junk[0], "malformed-tag",
                      f"<{tok.name}> contains characters that are no attribute"))
        mask += [(k, k + 1) for k in tok.junk]
    seen: dict[str, _Attr] = {}
    for a in tok.attrs:
        low, v = a.name.lower(), a.value or ""
        if first := seen.get(a.name):
            message = (f"attribute {a.name} redefined on <{tok.name}> "
                       f"(first: {a.name}={first.quote}{first.value}{first.quote})")
            found.append((a.start, "duplicate-attribute", message))
            mask.append((a.start - len(a.ws), a.end))
            continue
        seen[a.name] = a
        if a.value is None or not a.quote or not a.ws:
            why = ("has no value" if a.value is None else "is not quoted" if not a.quote
                   else "needs a space before it")
            found.append((a.start, "malformed-attribute", f"attribute {a.name} {why}"))
            mask.append((a.start, a.end))
            continue
        if (p := _prefix(a.name)) and p != "xmlns" and p not in scope:
            found.append((a.start, "unbound-prefix", f"namespace prefix '{p}:' is not declared"))
        if low.startswith("on") and len(low) > 2:
            found.append((a.start, "event-handler", f"event handler attribute {a.name}"))
        if low in ("id", "xml:id"):
            ids.add(v)
        if low in ("href", "xlink:href", "src"):
            if v.startswith("#"):
                refs.append((a.start, v[1:]))
            elif v.strip().lower().startswith("javascript:"):
                found.append((a.start, "script", f"{a.name} runs javascript"))
            elif _external(v):
                found.append((a.start, "external-reference", f"{a.name} points outside the file: {v[:60]}"))
        _url_refs(html.unescape(v) if "&" in v else v, a.start, a.name, found, refs)  # (as the parser reads it)
        _value_issues(v, a.end - 1 - len(v), entities, found, mask)


def _expat_problem(text: str, mask: list[tuple[int, int]], problems: list[Problem]) -> list[Problem]:
    """The XML parser's verdict on what our own checks did not already explain."""
    chars = list(text)
    for a, b in mask:
        chars[a:b] = [c if c == "\n" else " " for c in chars[a:b]]
    try:  # (a lone surrogate cannot be encoded for expat: U+FFFF, which XML forbids as well)
        expat.ParserCreate().Parse(re.sub("[\ud800-\udfff]", "\uffff", "".join(chars)), True)
    except expat.ExpatError as e:
        kinds = {p.kind for p in problems}
        if ((e.lineno, e.offset + 1) in {(p.line, p.column) for p in problems}
                or (e.code in _EXPAT_STRUCTURAL and kinds & _STRUCTURAL)
                or (e.code == _E.codes[_E.XML_ERROR_INVALID_TOKEN] and "incomplete-tag" in kinds)):
            return []
        return [Problem(e.lineno, e.offset + 1, "xml-syntax", expat.ErrorString(e.code))]
    return []


# ----------------------------------------------------------------------------- extract

# (UTF-32's marks first: the little-endian one starts with UTF-16's)
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xef\xbb\xbf", "utf-8-sig"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
_XML_ENCODING = re.compile(rb"""\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z][A-Za-z0-9._-]*)["']""")


def decode_svg_file(data: bytes) -> tuple[str, str]:
    """(text, encoding) of an SVG file as XML reads it: a byte-order mark, else the XML
    declaration's encoding, else UTF-8. Writing the text back in that encoding keeps a clean
    file byte-identical (reading it as UTF-8 with replacement had turned a UTF-16 file into no
    SVG at all and Latin-1 accents into U+FFFD)."""
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), None)
    if encoding is None:
        declared = _XML_ENCODING.match(data)
        encoding = declared.group(1).decode("ascii") if declared else "utf-8"
    try:
        return data.decode(encoding), encoding
    except LookupError:
        raise ValueError(f"the XML declaration names an unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not {encoding} text: byte {e.start} ({data[e.start:e.start + 1]!r}) "
                         "(an XML file that is not UTF-8 must declare its encoding)") from None


def extract_svg(answer: str) -> str | None:
    """The SVG in a model answer: the last complete one that draws something, else the last
    complete one, else the first cut-off one.

    A model often drafts, then corrects: the last complete SVG is its final word; but prose that
    names the element ("everything between `<svg>` and `</svg>`") is no drawing. Markdown code
    fences bound the search, so a cut-off SVG in a fence does not swallow the prose after it.
    """
    marks = list(_FENCE.finditer(answer))
    fences = []  # (opening line start, content start, content end)
    for k in range(0, len(marks), 2):
        nl = answer.find("\n", marks[k].end())
        end = marks[k + 1].start() if k + 1 < len(marks) else len(answer)
        fences.append((marks[k].start(), len(answer) if nl < 0 else nl + 1, end))
    complete, truncated, pos = [], None, 0
    while m := _SVG_START.search(answer, pos):
        at, limit = m.end() - 4, len(answer)
        for opening, content, end in fences:
            if content <= at < end or opening > at:
                limit = end if content <= at else opening
                break
        if (end := _svg_end(answer, at, limit)) is None:
            truncated = truncated or answer[m.start():limit].rstrip()
            pos = max(limit, at + 4)
        else:
            complete.append(answer[m.start():end])
            pos = end
    drawings = [c for c in complete if sum(t.kind == "start" for t in _tokenize(c)) > 1]  # <svg> and more
    return (drawings or complete or [truncated])[-1]


def _svg_end(s: str, at: int, limit: int) -> int | None:
    """Offset just after the </svg> that closes the <svg> at `at`; None when cut off."""
    depth = 0
    for tok in _tokenize(s[at:limit]):
        if tok.name == "svg" and tok.complete:
            depth += 1 if tok.kind == "start" and not tok.self_closing else -1 if tok.kind == "end" else 0
            if depth <= 0:
                return at + tok.end
    return None


# ----------------------------------------------------------------------------- repair

def repair_svg(text: str) -> Repair:
    """Deterministic fixes only; a text without problems comes back byte-identical.

    When the document has to be rewritten anyway, a `viewBox` is also added from numeric
    width/height so the picture scales. Undefined ids and a root without any size cannot be
    guessed: they stay in `problems_left`.
    """
    problems = check_svg(text)
    if not problems:
        return Repair(text, [], [])
    changes: list[str] = []
    src = text
    if {p.kind for p in problems} & {"stray-text", "root-not-svg"}:
        found = extract_svg(text)
        if found is not None and found != text:
            i = text.find(found)
            changes.append(f"extracted the <svg> element from the surrounding text (dropped {i} "
                           f"characters before it and {len(text) - i - len(found)} after)")
            src = found
    out = _rebuild(_safe_doctype(src, changes), changes)
    return Repair(out, changes, check_svg(out))


def _safe_doctype(src: str, changes: list[str]) -> str:
    """`src` without the DOCTYPE declarations the checks cannot follow (its `&e;` then reads as an
    undefined entity, escaped as text)."""
    out, at = [], 0
    for tok in _tokenize(src):
        if tok.kind == "decl":
            raw = src[tok.start:tok.end]
            fixed = _ATTLIST.sub("", _MARKUP_ENTITY.sub("", raw))
            if fixed != raw:
                out += [src[at:tok.start], fixed]
                at = tok.end
                changes.append("removed DOCTYPE declarations of markup or default attributes")
    return "".join(out) + src[at:] if out else src


_NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # XML 1.0's Char


def _xml_char(cp: int) -> bool:
    """Whether XML 1.0 allows the code point at all (NUL, most C0 controls, surrogates do not)."""
    return cp <= 0x10FFFF and not _NOT_XML_CHAR.match(chr(cp))


def _escape(piece: str, entities: dict[str, str]) -> str:
    """Bare '&' -> &amp;, HTML entities -> character references, bare '<' -> &lt;, "]]>" ->
    "]]&gt;"; characters XML forbids (written or as references) are dropped."""
    def entity(m: re.Match) -> str:
        name, ref = m.group(1), m.group(0)
        if ref == "&":
            return "&amp;"
        if name and name not in _PREDEFINED and name not in entities:
            cp = html.entities.name2codepoint.get(name)
            return f"&#{cp};" if cp else "&amp;" + ref[1:]
        if ref.startswith("&#") and not _xml_char(int(ref[3:-1], 16) if ref[2] in "xX" else int(ref[2:-1])):
            return ""
        return ref

    return _NOT_XML_CHAR.sub("", _ENTITY.sub(entity, piece).replace("<", "&lt;").replace("]]>", "]]&gt;"))


def _no_external_urls(v: str) -> str:
    """External url()s -> none and external @imports dropped, in the text as the parser reads
    it where character references spell them (`&#117;rl(`)."""
    def fix(text: str) -> str:
        text = _IMPORT.sub(lambda m: "" if _external(m.group(1)) else m.group(0), text)
        return _URL.sub(lambda m: "none" if _external(m.group(1)) else m.group(0), text)

    fixed = fix(v)
    if "&" not in fixed:
        return fixed
    read = html.unescape(fixed)
    if fix(read) == read:
        return fixed
    return (fix(read).replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
            .replace("'", "&apos;"))  # (for either quote the value is written in)


def _rebuild(src: str, changes: list[str]) -> str:
    """Re-emit the tokens, rewriting only those that need it (others keep their exact bytes)."""
    toks, lines = _tokenize(src), _Lines(src)
    entities = _entities(src, toks)
    starts = [t for t in toks if t.kind == "start" and t.complete]
    used = {_prefix(n) for t in starts for n in [t.name] + [a.name for a in t.attrs]}
    used -= {None, "xml", "xmlns"}
    on_root = {a.name[6:] for t in starts[:1] for a in t.attrs
               if a.name[:6] == "xmlns:" and a.value is not None}
    out: list[str] = []
    stack: list[tuple[str, int]] = []
    open_names: Counter[str] = Counter()  # of the stack
    root_seen = root_done = doctype_seen = False
    skip, skip_name = 0, ""  # inside a dropped element
    for tok in toks:
        raw, line = src[tok.start:tok.end], lines.pos(tok.start)[0]
        if skip:
            skip += (tok.kind == "start" and tok.name == skip_name and not tok.self_closing) - (
                tok.kind == "end" and tok.name == skip_name)
            continue
        outside = not stack and (root_done or tok.kind in ("text", "cdata"))
        if outside and tok.kind in ("text", "cdata", "start", "end"):
            if raw.strip():
                changes.append(f"dropped stray content outside the root <svg> at line {line}")
                if tok.kind == "start" and tok.complete and not tok.self_closing:
                    skip, skip_name = 1, tok.name
            else:
                out.append(raw)
        elif not tok.complete:
            what = tok.name or tok.kind
            changes.append(f"dropped the incomplete <{what}> at line {line} (the output was cut off)")
        elif tok.kind == "text":
            fixed = _escape(raw, entities)
            if fixed != raw:
                changes.append(f"escaped a bare '&' or '<' (or an HTML entity) in text at line {line}")
            if stack and _local(stack[-1][0]) == "style" and _no_external_urls(fixed) != fixed:
                fixed = _no_external_urls(fixed)
                changes.append(f"replaced an external url() by none (or dropped an @import) in <style> at line {line}")
            out.append(fixed)
        elif tok.kind == "comment" and ("--" in raw[4:-3] or raw[4:-3].endswith("-")):
            body = re.sub(r"-(?=-)", "- ", raw[4:-3])  # XML forbids "--" inside a comment
            out.append(f"<!--{body}{' ' if body.endswith('-') else ''}-->")
            changes.append(f"split a '--' inside the comment at line {line}")
        elif tok.kind == "pi" and re.match(r"<\?xml[\s?]", raw, re.I):
            if "".join(out).strip():
                changes.append(f"removed an XML declaration that is not at the start, at line {line}")
            elif out or not raw.startswith("<?xml"):
                out.clear()  # (whitespace only) the declaration comes first, spelled in lower case
                out.append("<?xml" + raw[5:])
                changes.append(f"moved the XML declaration to the very start, spelled <?xml, at line {line}")
            else:
                out.append(raw)
        elif tok.kind == "decl" and (root_seen or doctype_seen):
            # its place is before the root (after the XML declaration: Illustrator's entities)
            changes.append(f"removed a DOCTYPE {'after the root element' if root_seen else 'given twice'}"
                           f" at line {line}")
        elif tok.kind == "start" and (_local(tok.name) in _NOT_RENDERED or _animates_href_outside(tok)):
            changes.append(f"removed the <{tok.name}> element at line {line}")
            skip, skip_name = int(not tok.self_closing), tok.name
        elif tok.kind == "start":
            is_root, root_seen = not root_seen, True
            undeclared = sorted(used - on_root) if is_root else None
            out.append(_fix_tag(tok, src, line, entities, changes, undeclared))
            if not tok.self_closing:
                stack.append((tok.name, line))
                open_names[tok.name] += 1
            root_done = root_done or (is_root and tok.self_closing)
        elif tok.kind == "end":
            if not open_names[tok.name]:
                changes.append(f"removed the stray </{tok.name}> at line {line}")
                continue
            while stack[-1][0] != tok.name:
                name, opened = stack.pop()
                open_names[name] -= 1
                out.append(f"</{name}>")
                changes.append(f"closed <{name}> (opened at line {opened}) "
                               f"before </{tok.name}> at line {line}")
            stack.pop()
            open_names[tok.name] -= 1
            if tok.junk:
                changes.append(f"removed junk inside </{tok.name}> at line {line}")
            out.append(f"</{tok.name}>" if tok.junk else raw)
            root_done = not stack
        else:
            doctype_seen = doctype_seen or tok.kind == "decl"
            out.append(raw)
    if stack and not "".join(out).endswith("\n"):
        out.append("\n")
    for name, opened in reversed(stack):
        out.append(f"</{name}>\n")
        changes.append(f"closed <{name}> (opened at line {opened}) left open at the end")
    return "".join(out)


def _fix_tag(tok: _Tok, src: str, line: int, entities: dict[str, str], changes: list[str],
             undeclared: list[str] | None) -> str:
    """The start tag, rewritten only if something in it needs fixing (`undeclared`: root only)."""
    where = f"on <{tok.name}> at line {line}"
    kept, seen, changed = [], {}, bool(tok.junk)
    if tok.junk:
        changes.append(f"removed characters that are no attribute {where}")
    for a in tok.attrs:
        raw, low, v = src[a.start:a.end], a.name.lower(), a.value
        drop = None
        if a.name in seen:
            drop = f"removed duplicate attribute {raw} {where}; kept the first occurrence {seen[a.name]}"
        elif v is None:
            drop = f"removed attribute {a.name} without a value {where}"
        elif low.startswith("on") and len(low) > 2:
            drop = f"removed event handler {a.name} {where}"
        elif low in ("href", "xlink:href", "src") and _external(v):  # javascript: included
            drop = f"removed the external or script reference {a.name}={v[:60]!r} {where}"
        seen.setdefault(a.name, raw)
        if drop:
            changes.append(drop)
            changed = True
            continue
        escaped = _escape(v, entities)
        own = f"xmlns:{_prefix(tok.name)}" if _prefix(tok.name) else None  # the root's own prefix
        set_namespace = (undeclared is not None and a.name in ("xmlns", own)
                         and not _is_svg_namespace(v, entities))
        new = SVG_NS if set_namespace else _no_external_urls(escaped)
        quote = a.quote or ("'" if '"' in new else '"')
        url_fix = "set the SVG namespace" if set_namespace else "replaced an external url() by none"
        why = [w for w, bad in (("escaped '&'/'<'", escaped != v), (url_fix, new != escaped),
                                ("quoted the value", not a.quote),
                                ("added a space before it", not a.ws)) if bad]
        if why:
            changes.append(f"fixed attribute {a.name} {where}: {', '.join(why)}")
            kept.append(f"{a.ws or ' '}{a.name}={quote}{new}{quote}")
            changed = True
        else:
            kept.append(a.ws + raw)
    front, back = [], []
    if undeclared is not None:
        front = ([f' xmlns="{SVG_NS}"'] if "xmlns" not in seen else []) + [
            f' xmlns:{p}="{SVG_NS if p == _prefix(tok.name) else KNOWN_NS.get(p, "urn:x-undeclared:" + p)}"'
            for p in undeclared]
        size = [_NUMBER.match(next((a.value or "" for a in tok.attrs if a.name == n), ""))
                for n in ("width", "height")]
        if "viewBox" not in seen and all(size):
            back = [f' viewBox="0 0 {size[0].group(1)} {size[1].group(1)}"']
        if front or back:
            changes.append(f"added {', '.join(x.split('=')[0].strip() for x in front + back)} {where}")
            changed = True
    if not changed:
        return src[tok.start:tok.end]
    attrs = "".join(front + kept + back)
    return f"<{tok.name}{attrs}{tok.tail}{'/>' if tok.self_closing else '>'}"


# ----------------------------------------------------------------------------- render

@lru_cache(maxsize=1)
def _font_families() -> dict[str, str]:
    """resvg maps serif/sans-serif to Times New Roman/Arial, absent on most Linux machines, and
    then draws no text at all: ask fontconfig (when present) for the generic families."""
    found = {}
    for generic, arg in (("serif", "serif_family"), ("sans-serif", "sans_serif_family"),
                         ("monospace", "monospace_family"), ("cursive", "cursive_family"),
                         ("fantasy", "fantasy_family"), ("serif", "font_family")):
        try:
            out = subprocess.run(["fc-match", "-f", "%{family}", generic], capture_output=True, text=True,
                                 timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        if out.strip():
            found[arg] = out.split(",")[0].strip()
    return found


# What one render may take: the PNG's pixels (a 100000-pixel-wide canvas had made resvg allocate
# 40 GB and abort the process), the attributes of one element (its parse is quadratic in them),
# and the stack its recursion over nested elements runs on (300 nested groups overflowed the main
# thread's 8 MiB: a segmentation fault). The stack is reserved, only the pages used are touched.
MAX_RENDER_PIXELS = 64 * 2**20
MAX_RENDER_ATTRIBUTES = 1000
_RENDER_STACK = 512 * 2**20
_STACK_SIZE_LOCK = threading.Lock()
# CSS absolute units in pixels, as resvg (and browsers) read width/height
_UNIT_PIXELS = {"": 1.0, "px": 1.0, "in": 96.0, "cm": 96 / 2.54, "mm": 96 / 25.4, "pt": 4 / 3, "pc": 16.0,
                "em": 16.0, "ex": 8.0}
_LENGTH = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-z]*)\s*$")


def _render_size(svg: str, width: int | None) -> tuple[float, float] | None:
    """The PNG's size in pixels, as resvg sizes it: width/height (viewBox's where they are
    missing or relative), scaled to `width`; None where the document does not parse."""
    try:
        root = ET.fromstring(svg)
    except (ET.ParseError, ValueError):
        return None
    attrs = root.attrib
    try:
        box = [float(v) for v in re.split(r"[\s,]+", attrs.get("viewBox", "").strip())]
    except ValueError:
        box = []
    box = box[2:4] if len(box) == 4 else []

    def length(name: str, fallback: float | None) -> float | None:
        m = _LENGTH.match(attrs.get(name, ""))
        return float(m.group(1)) * _UNIT_PIXELS[m.group(2)] if m and m.group(2) in _UNIT_PIXELS else fallback

    w, h = length("width", box[0] if len(box) == 2 else None), length("height", box[1] if len(box) == 2 else None)
    w, h = w or 100.0, h or 100.0  # resvg's default size
    return (float(width), h * width / w) if width is not None and w > 0 else (w, h)


def render_png(svg: str, out_path: str | Path, width: int | None = None) -> Path:
    """Rasterize `svg` into a PNG file; `width` scales the picture, keeping its aspect ratio.
    A picture over MAX_RENDER_PIXELS or an element with over MAX_RENDER_ATTRIBUTES attributes
    is refused (SvgRenderError), and resvg runs on a thread with a deep stack."""
    if width is not None and width <= 0:
        raise SvgRenderError(f"width must be positive, got {width}")
    try:
        import resvg_py
    except ImportError as e:
        raise SvgRenderError("rendering SVG needs resvg-py (pip install resvg-py)") from e
    size = _render_size(svg, width)
    if size is not None and size[0] * size[1] > MAX_RENDER_PIXELS:
        raise SvgRenderError(f"the picture is {size[0]:.0f}x{size[1]:.0f} pixels, more than the "
                             f"{MAX_RENDER_PIXELS // 2**20} Mpx rendered: give it a smaller width/height")
    widest = max((len(t.attrs) for t in _tokenize(svg) if t.kind == "start"), default=0)
    if widest > MAX_RENDER_ATTRIBUTES:
        raise SvgRenderError(f"an element has {widest} attributes, more than the {MAX_RENDER_ATTRIBUTES} rendered")
    result: list = []

    def run() -> None:
        try:
            result.append(resvg_py.svg_to_bytes(svg_string=svg, width=width, **_font_families()))
        except BaseException as e:  # a Rust panic surfaces as pyo3's PanicException(BaseException)
            result.append(e)

    with _STACK_SIZE_LOCK:  # (the size is the process's: two renders at once must not mix it up)
        previous = threading.stack_size(_RENDER_STACK)
        try:
            worker = threading.Thread(target=run, name="resvg")
            worker.start()
        except RuntimeError as e:  # no thread to be had
            raise SvgRenderError(f"cannot render SVG: {e}") from None
        finally:
            threading.stack_size(previous)
    worker.join()
    png = result[0] if result else None
    if isinstance(png, BaseException):
        if isinstance(png, (KeyboardInterrupt, SystemExit)):
            raise png
        raise SvgRenderError(f"cannot render SVG: {png}") from png
    if not png:
        raise SvgRenderError("cannot render SVG: the renderer produced no image")
    write_replacing(out_path, bytes(png))
    return Path(out_path)
