"""A small byte-fallback tokenizer.json for the tiny test models (vocab 256), with the Gemma
control tokens at fixed ids so chat rendering and stop tokens can be exercised."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
            "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>",
            "<|image>", "<|image|>", "<image|>", "<|audio>", "<|audio|>", "<audio|>", "<|video|>"]
# Media token ids the tiny multimodal configs use (their real ids lie past the tiny vocab).
MEDIA_IDS = {"boi_token_id": 12, "image_token_id": 13, "eoi_token_id": 14, "boa_token_id": 15,
             "audio_token_id": 16, "eoa_token_index": 17, "video_token_id": 18}
# then: the printable ASCII bytes as byte-fallback tokens, then a few whole words.
WORDS = ["▁", "h", "e", "l", "o", "t", "▁the", "▁a", "▁is", "he", "ll", "llo", "▁hello", "▁world"]
# Gemma 4's tool markers (printed tokens, as in the real vocabulary) for `tools=True`, in the slots
# of bytes no UTF-8 text holds (0xC0, 0xC1) and of control characters no test writes.
TOOL_MARKERS = {"<|tool>": 0x01, "<tool|>": 0x02, "<|tool_call>": 0x03, "<tool_call|>": 0x04,
                "<|tool_response>": 0x05, "<tool_response|>": 0xC0, '<|"|>': 0xC1}


def tiny_vocab() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(256):
        if len(vocab) >= 256 - len(WORDS):
            break
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for w in WORDS:
        vocab[w] = len(vocab)
    return vocab


def write_tiny_tokenizer(folder: Path, family: str, tools: bool = False) -> None:
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from tokenizers import AddedToken

    vocab = tiny_vocab()
    if tools:
        for marker, byte in TOOL_MARKERS.items():
            vocab[marker] = vocab.pop(f"<0x{byte:02X}>")
    merges = [("h", "e"), ("l", "l"), ("ll", "o")]
    merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    if tools:
        tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in TOOL_MARKERS])
    tok.save(str(folder / "tokenizer.json"))
    eos = "<end_of_turn>" if family == "gemma3" else "<turn|>"
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "add_bos_token": True, "extra_special_tokens": {"eot": eos}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
