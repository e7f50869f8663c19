"""One tokenizer interface for Gemma 3 / Gemma 4, built from a GGUF's metadata or a HF folder.

Both back ends end up as a `tokenizers.Tokenizer` shaped exactly like transformers' `GemmaTokenizer`
(BPE with byte fallback, spaces normalized to "▁", no dummy prefix, decoder "▁"→" " + ByteFallback
+ Fuse), so ids match the transformers reference without depending on transformers at run time.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from numbers import Integral
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from .config import read_json_object

__all__ = ["Tokenizer", "IncrementalDecoder", "derive_merges", "END_OF_TURN_TOKENS", "END_OF_REPLY_TOKENS"]

SPACE = "\u2581"  # SentencePiece's visible space "▁"
END_OF_TURN_TOKENS = ("<end_of_turn>", "<turn|>")  # Gemma 3, Gemma 4
# Where a reply ends besides EOS: the turn ends, and Gemma 4's <|tool_response>, which it writes
# after its tool calls to wait for their results (spec 9.2: stop on it).
END_OF_REPLY_TOKENS = (*END_OF_TURN_TOKENS, "<|tool_response>")

# Gemma 4's special tokens that belong to a reply's text (channels, tool calls, tool-call string
# quotes: spec 10.1): printed, never skipped, whether the file marks them special (tokenizer.json)
# or not (GGUF types them USER_DEFINED), so `parse_reply` finds them in any model's text.
PRINTED_SPECIALS = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                              "<tool_response|>", '<|"|>'})

# llama.cpp token types (`tokenizer.ggml.token_type`).
_TYPE_CONTROL, _TYPE_USER_DEFINED = 3, 4


def derive_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary that ships none (Gemma 3 GGUFs).

    Same result as transformers' `generate_merges(vocab, {tok: -index})`: every split of a token
    into two vocabulary entries, ranked by the token's position in the file (Gemma's scores do not
    follow merge order, its file order does), then by longer left part first.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    append = merges.append
    for i, tok in enumerate(tokens):
        if len(tok) < 2 or vocab[tok] != i:  # a duplicate ranks at its last position only
            continue
        for k in range(len(tok) - 1, 0, -1):
            left = tok[:k]
            if left in vocab:
                right = tok[k:]
                if right in vocab:
                    append((left, right))
    return merges


def _gemma_backend(
    vocab: dict[str, int], merges: list[tuple[str, str]], unk: str
) -> _HFTokenizer:
    """transformers' `GemmaTokenizer` pipeline, rebuilt with the `tokenizers` library alone."""
    model = BPE(
        vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None, byte_fallback=True
    )
    tok = _HFTokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    # A no-op after the normalizer (no " " is left), kept so the pipeline equals the reference's.
    tok.pre_tokenizer = pre_tokenizers.Split(
        pattern=" ", behavior="merged_with_previous", invert=False
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


def byte_of_piece(piece: str) -> int | None:
    """The byte a `<0xAB>` byte-fallback piece stands for (tokenizers' ByteFallback test)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


def _added(content: str, special: bool) -> AddedToken:
    """Matched whole in raw text, before the "▁" normalizer (as transformers adds them)."""
    return AddedToken(content, normalized=False, special=special)


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


class Tokenizer:
    """Gemma tokenizer: text <-> ids, special tokens parsed in text, plus ids the runtime needs."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int | None,
        unk_id: int | None = None,
        add_bos_default: bool = True,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self._tok = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        # What the model's files ask for; `encode` still takes an explicit `add_bos`.
        self.add_bos_default = add_bos_default
        reply_ends = [backend.token_to_id(name) for name in END_OF_REPLY_TOKENS]
        eos: list[int] = []
        for i in (eos_id, *reply_ends, *extra_eos_ids):
            if i is not None and i not in eos:
                eos.append(i)
        self.eos_ids: tuple[int, ...] = tuple(eos)
        # Special added tokens: what decode(skip_special=True) drops and streams never print.
        self.control_ids: frozenset[int] = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items()
            if t.special and t.content not in PRINTED_SPECIALS
        )
        self._piece_bytes: dict[int, bytes] = {}

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build from decoded GGUF metadata (`tokenizer.ggml.*` keys), as transformers does.

        "llama" (Gemma 3): SentencePiece vocab, merges derived from file order; space-only tokens
        are stored with real spaces and are respelled with "▁" so normalized text can reach them.
        "gemma4": BPE with the file's explicit merges, vocabulary used as spelled. Ollama's
        converter writes Gemma 4's as "llama" with `pre` "gemma4" (and the merges): read as gemma4.
        add_space_prefix is ignored, as transformers' GemmaTokenizer does (Gemma files say false).
        """
        model = fields.get("tokenizer.ggml.model")
        if model == "llama" and fields.get("tokenizer.ggml.pre") == "gemma4":
            model = "gemma4"
        raw_tokens = fields.get("tokenizer.ggml.tokens")
        if not isinstance(raw_tokens, list) or not raw_tokens or not all(isinstance(t, str) for t in raw_tokens):
            raise ValueError("GGUF tokenizer.ggml.tokens is missing or not a list of strings")
        types = fields.get("tokenizer.ggml.token_type") or []
        if not isinstance(types, list):
            raise ValueError("GGUF tokenizer.ggml.token_type is not a list")
        if types and len(types) != len(raw_tokens):  # the tokens past its end would lose their kind
            raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for "
                             f"{len(raw_tokens)} tokens")
        if model == "llama":
            tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in raw_tokens]
            merges = derive_merges(tokens)
            add_bos = fields.get("tokenizer.ggml.add_bos_token", True)
            if type(add_bos) is not bool:  # the string "false" had read as true
                raise ValueError(f"GGUF tokenizer.ggml.add_bos_token={add_bos!r:.40} is not true or false")
        elif model == "gemma4":
            tokens = raw_tokens
            merge_list = fields.get("tokenizer.ggml.merges")
            if not merge_list or not isinstance(merge_list, list):
                raise ValueError("gemma4 GGUF has no tokenizer.ggml.merges")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else () for m in merge_list]
            known = set(tokens)
            bad = next((m for m in merges if len(m) != 2 or not {m[0], m[1], m[0] + m[1]} <= known), None)
            if bad is not None:
                raise ValueError(f"malformed tokenizer.ggml.merges entry {' '.join(bad)[:40]!r} "
                                 "(expected 'left right', both parts and their merge in the vocabulary)")
            # The file says add BOS, but Gemma 4's chat template writes <bos> itself (transformers
            # follows the reference tokenizer here, llama.cpp does not).
            add_bos = False
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r} (want llama or gemma4)")

        def special(key: str, default: int | None) -> int | None:
            value = fields.get(f"tokenizer.ggml.{key}")
            if value is None:
                return default
            if type(value) is not int or value < 0:
                raise ValueError(f"GGUF tokenizer.ggml.{key}={value!r:.40} is not a token id")
            return value

        bos_id, eos_id = special("bos_token_id", 2), special("eos_token_id", 1)
        unk_id, pad_id = special("unknown_token_id", None), special("padding_token_id", None)
        assert bos_id is not None and eos_id is not None
        # ids the runtime writes into prompts (EOS ids are only compared with outputs: inspect warns)
        for key, value in (("bos_token_id", bos_id), ("unknown_token_id", unk_id), ("padding_token_id", pad_id)):
            if value is not None and value >= len(tokens):
                raise ValueError(f"GGUF tokenizer.ggml.{key}={value} is outside the {len(tokens)}-token vocabulary")
        unk = tokens[unk_id] if unk_id is not None else "<unk>"

        vocab = {tok: i for i, tok in enumerate(tokens)}
        if unk not in vocab and not all(f"<0x{b:02X}>" in vocab for b in range(256)):
            raise ValueError(f"GGUF vocabulary has neither an unknown token ({unk}) nor a byte piece for "
                             "every byte: text it does not cover could not be encoded")
        backend = _gemma_backend(vocab, merges, unk)  # type: ignore[arg-type]
        # Control tokens become special added tokens and user-defined ones plain added tokens, so
        # both are matched whole in text (chat templates render them as text).
        pairs = list(zip(raw_tokens, types))
        control = [t for t, ty in pairs if ty == _TYPE_CONTROL]
        user = [t for t, ty in pairs if ty == _TYPE_USER_DEFINED and t in vocab]
        if control:
            backend.add_special_tokens([_added(t, special=True) for t in control])
        if user:
            backend.add_tokens([_added(t, special=False) for t in user])
        # transformers also makes the named special tokens special if the types did not (never
        # growing the vocabulary: "<mask>" only counts when the file has it).
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        ids = (bos_id, eos_id, unk_id, pad_id)
        named = [tokens[i] for i in ids if i is not None and 0 <= i < len(tokens)]
        extra = [t for t in dict.fromkeys([*named, "<mask>"]) if t in vocab and t not in added]
        if extra:
            backend.add_special_tokens([_added(t, special=True) for t in extra])
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            unk_id=unk_id,
            add_bos_default=add_bos,
        )

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`; specials and add_bos from `tokenizer_config.json` if present."""
        folder = Path(path)
        try:
            backend = _HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception for any bad file
            raise ValueError(f"{folder / 'tokenizer.json'}: not a tokenizer ({' '.join(str(e).split())[:200]})") from None
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
            if (folder / name).is_file():
                config.update(read_json_object(folder / name, ValueError))

        def lookup(key: str, default: str) -> int | None:
            name = _token_content(config.get(key)) or default
            return backend.token_to_id(name)

        bos_id, eos_id = lookup("bos_token", "<bos>"), lookup("eos_token", "<eos>")
        if bos_id is None or eos_id is None:
            raise ValueError(f"{folder}: tokenizer has no bos/eos token")
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):  # infer from the post-processor
            add_bos = backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=lookup("pad_token", "<pad>"),
            unk_id=lookup("unk_token", "<unk>"),
            add_bos_default=add_bos,
        )

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids for `text`; special-token strings in it become their ids. BOS is prepended even if
        the text already starts with "<bos>" (as transformers does): pass add_bos=False then."""
        if not isinstance(text, str):  # (the Rust side's "TextInputSequence must be str")
            raise TypeError(f"text to encode must be a str, not {type(text).__name__}")
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side takes only valid Unicode: JSON may carry lone surrogates
            at = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None) if isinstance(text, str) else None
            if at is None:
                raise
            raise ValueError(f"text holds a lone surrogate U+{ord(text[at]):04X} at index {at}, "
                             "which is not valid Unicode") from None
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for `ids`; with skip_special, control tokens (`control_ids`) are dropped."""
        ids = list(ids)
        odd = next((i for i in ids if isinstance(i, bool) or not isinstance(i, Integral)), None)
        if odd is not None:  # (True had decoded as id 1, "a" raised inside the Rust side)
            raise TypeError(f"token ids must be integers, not {type(odd).__name__} ({odd!r:.40})")
        lowest, highest = min(ids, default=0), max(ids, default=0)
        if lowest < 0:  # (the Rust side raised OverflowError)
            raise ValueError(f"token id {lowest} is negative")
        if highest >= 2**32:  # (past u32 too; ids past the vocabulary but within it decode to "")
            raise ValueError(f"token id {highest} is outside the vocabulary")
        if skip_special:  # control_ids, not the file's flags: PRINTED_SPECIALS stay
            ids = [i for i in ids if i not in self.control_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    @functools.cached_property
    def longest_piece(self) -> int:
        """Characters of the longest vocabulary entry: a text of n characters is at least
        n / longest_piece tokens (a check that needs no tokenizing)."""
        return max(1, max(map(len, self._tok.get_vocab(with_added_tokens=True))))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i) if 0 <= i < 2**32 else None

    def piece_bytes(self, i: int) -> bytes:
        """The bytes token `i` adds to decoded text (b"" for unknown ids), for streaming."""
        cached = self._piece_bytes.get(i)
        if cached is not None:
            return cached
        piece = self.id_to_token(i)
        if piece is None:
            out = b""
        else:
            byte = byte_of_piece(piece)
            out = bytes([byte]) if byte is not None else piece.replace(SPACE, " ").encode("utf-8")
        self._piece_bytes[i] = out
        return out

    def is_byte_token(self, i: int) -> bool:
        """Whether `i` is a `<0xAB>` byte-fallback piece (a fragment of a UTF-8 character)."""
        piece = self.id_to_token(i)
        return piece is not None and byte_of_piece(piece) is not None

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (e.g. to save it as tokenizer.json)."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size


class IncrementalDecoder:
    """Streams generated ids as printable text without splitting a UTF-8 character.

    Byte-fallback pieces are buffered until they complete a character. Bytes that cannot form one
    (an invalid byte, or a run cut short by an ordinary piece or by `flush`) come out as one U+FFFD
    each, like tokenizers' ByteFallback. Control tokens print nothing unless skip_special=False.
    For valid UTF-8 output the joined stream equals `tokenizer.decode(ids, skip_special)`; a run
    mixing whole characters with invalid bytes differs (decode turns the whole run into U+FFFDs).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._pending = bytearray()

    def push(self, token_id: int) -> str:
        """New text that is safe to print after `token_id`."""
        tok = self.tokenizer
        if self.skip_special and token_id in tok.control_ids:
            return ""
        if tok.id_to_token(token_id) is None:  # no such piece (an embedding row past the vocabulary):
            return ""  # nothing to print, and, as in decode, a byte run it interrupts goes on
        data = tok.piece_bytes(token_id)
        if tok.is_byte_token(token_id):
            self._pending += data
            return self._drain(final=False)
        head = self._drain(final=True)  # a byte run ends at an ordinary piece
        return head + data.decode("utf-8", errors="replace")

    def flush(self) -> str:
        """Whatever is still buffered (an incomplete character becomes U+FFFD per byte)."""
        return self._drain(final=True)

    def reset(self) -> None:
        self._pending.clear()

    def _drain(self, final: bool) -> str:
        out: list[str] = []
        buf = self._pending
        while buf:
            try:
                out.append(buf.decode("utf-8"))
                buf.clear()
            except UnicodeDecodeError as err:
                if err.start > 0:
                    out.append(buf[: err.start].decode("utf-8"))
                    del buf[: err.start]
                    continue
                if not final and err.reason == "unexpected end of data":
                    break  # a character still being spelled out: wait for its next byte
                out.append("\ufffd")
                del buf[:1]
        return "".join(out)
