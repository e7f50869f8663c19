"""Fuzz target: SVG checking, extraction and repair on arbitrary text (byte level, atheris).

Model output is untrusted text. Seeds are the SVG corpus of tests/svg_corpus (valid files and
real-looking broken answers). Contract, for any text:
- `check_svg`, `extract_svg` and `repair_svg` never raise;
- an extracted SVG is a piece of the answer;
- a clean text (no problems) comes back from `repair_svg` byte-identical and unchanged;
- `repair_svg` reports exactly what `check_svg` finds in its output, and when it reports
  success (no problems left) the output parses as XML, and repairing it again changes nothing.
"""

from __future__ import annotations

from xml.etree import ElementTree

from _harness import ROOT, instrumented, main, run_contract

with instrumented():
    from gemmarun.svg import check_svg, extract_svg, repair_svg

NAME = "svg_repair"
SECONDS_PER_INPUT = 20.0
CORPUS = ROOT / "tests" / "svg_corpus"


def _check(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    problems = check_svg(text)
    found = extract_svg(text)
    assert found is None or found in text, "extract_svg returned text that is not in the answer"
    repair = repair_svg(text)
    if not problems:
        assert repair.svg == text and not repair.changes, "a clean SVG was rewritten"
    assert repair.problems_left == check_svg(repair.svg), "problems_left differs from check_svg"
    if not repair.problems_left:
        ElementTree.fromstring(repair.svg)  # success means it parses
        again = repair_svg(repair.svg)
        assert again.svg == repair.svg and not again.changes, "a repaired SVG was repaired again"


def test_one_input(data: bytes) -> None:
    run_contract(lambda: _check(data), (), SECONDS_PER_INPUT)


def seeds() -> dict[str, bytes]:
    return {f"{path.parent.name}-{path.name}": path.read_bytes() for path in sorted(CORPUS.glob("*/*"))}


TOKENS = [b"<svg", b"</svg>", b'xmlns="http://www.w3.org/2000/svg"', b'xmlns:xlink="http://www.w3.org/1999/xlink"',
          b"<g>", b"</g>", b"/>", b"&amp;", b"&nbsp;", b"&#x41;", b"<!--", b"-->", b"<![CDATA[", b"]]>",
          b"<?xml", b"?>", b"<!DOCTYPE svg [", b'<!ENTITY e "x">', b"]>", b"url(#a)", b'href="#a"',
          b'xlink:href="http://x"', b"```svg\n", b"```", b'viewBox="0 0 10 10"', b'width="10px"', b'id="a"',
          b"<script>", b"onload=", b"<style>", b"</style>", b"<text>", b"<foreignObject>", b"x1=", b"'", b'"']

if __name__ == "__main__":
    main(NAME, test_one_input, seeds, max_len=4096, dictionary=TOKENS)
