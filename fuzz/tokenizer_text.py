"""Fuzz target: the tokenizer on arbitrary text and ids (byte level, atheris).

Two tokenizers: the tiny test tokenizer (tests/tiny_tokenizer.py) and, when the embedded
model is available, the real Gemma 3 270M GGUF vocabulary (262k tokens, loaded once). The first
input byte picks the tokenizer and how the rest is read: UTF-8 text, UTF-16 text (which holds
lone surrogates, as JSON strings may), or a list of token ids. Contract:
- encode gives ids inside the vocabulary, or a one-line ValueError for text that is not
  valid Unicode (a lone surrogate);
- with the real vocabulary (every byte has a piece) decode(encode(text)) == text, except that
  the visible space U+2581 reads back as a space;
- streaming the ids through IncrementalDecoder gives exactly decode(ids, skip_special=True)
  when the text is valid UTF-8; decoding any ids never fails.
"""

from __future__ import annotations

from functools import lru_cache

from _harness import WORK_DIR, instrumented, main, run_contract

with instrumented():
    from gemmarun.loading.errors import LoadError
    from gemmarun.tokenizer import SPACE, IncrementalDecoder, Tokenizer

from tiny_tokenizer import write_tiny_tokenizer

NAME = "tokenizer_text"
SECONDS_PER_INPUT = 10.0


@lru_cache(maxsize=None)
def tiny() -> Tokenizer:
    folder = WORK_DIR / NAME / "tiny_tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(folder, "gemma4")
    return Tokenizer.from_hf_folder(folder)


@lru_cache(maxsize=None)
def real() -> Tokenizer | None:
    """The embedded Gemma 3 270M's tokenizer, or None where the model package is missing."""
    from gemmarun.loading.default import default_model_path
    from gemmarun.loading.gguf_file import GGUFFile

    try:
        return Tokenizer.from_gguf_metadata(GGUFFile(default_model_path()).metadata)
    except LoadError:
        return None


def _text(tok: Tokenizer, text: str, exact: bool) -> None:
    ids = tok.encode(text, add_bos=False)
    assert all(0 <= i < tok.vocab_size for i in ids), "encode gave an id outside the vocabulary"
    decoded = tok.decode(ids)
    if exact:
        assert decoded == text.replace(SPACE, " "), f"round trip changed {text!r} into {decoded!r}"
    _stream(tok, ids)


def _stream(tok: Tokenizer, ids: list[int]) -> None:
    stream = IncrementalDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    joined, whole = "".join(pieces), tok.decode([i for i in ids if 0 <= i < tok.vocab_size], skip_special=True)
    if "\ufffd" not in whole:  # valid UTF-8 output: the stream must add up to the whole
        assert joined == whole, f"streamed {joined!r} but decode gives {whole!r}"


def _check(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    tok = real() if mode & 1 and real() is not None else tiny()
    exact = tok is not tiny()
    kind = (mode >> 1) % 3
    if kind == 0:
        _text(tok, body.decode("utf-8", "replace"), exact)
    elif kind == 1:
        _text(tok, body[: len(body) // 2 * 2].decode("utf-16-le", "surrogatepass"), exact)
    else:
        ids = [int.from_bytes(body[i : i + 3], "little") % (tok.vocab_size + 64) for i in range(0, len(body), 3)]
        tok.decode(ids)
        _stream(tok, ids)


def test_one_input(data: bytes) -> None:
    run_contract(lambda: _check(data), (ValueError,), SECONDS_PER_INPUT)


def seeds() -> dict[str, bytes]:
    text = "Hello, w\u00f6rld! <start_of_turn>user\n\u2581 caf\u00e9 \U0001f600\t<bos>".encode()
    return {
        "tiny.txt": b"\x00" + text, "real.txt": b"\x01" + text,
        "tiny-utf16.txt": b"\x02" + "a\ud800b\u00e9".encode("utf-16-le", "surrogatepass"),
        "real-ids.bin": b"\x05" + bytes(range(60)),
    }


if __name__ == "__main__":
    real()  # load once, before the fuzzing clock starts
    main(NAME, test_one_input, seeds, max_len=512)
