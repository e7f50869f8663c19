"""Chat messages with media parts -> prompt ids with expanded placeholders (spec 6.2, 4.7).

Each media part is prepared (decoded, resized, split into clips) before the prompt is tokenized,
because the number of soft tokens decides the expansion:
  image  <|image|> -> <|image> + <|image|> x n + <image|>
  audio  <|audio|> -> <|audio> + <|audio|> x n + <audio|>, once per 30 s clip (long audio is
         split into consecutive clips, never truncated)
  video  <|video|> -> "mm:ss <|image>" + <|video|> x n + "<image|>" per sampled frame, joined by spaces
  Gemma 3: <start_of_image> -> "\n\n" + <start_of_image> + <image_soft_token> x 256 + <end_of_image> + "\n\n"
Text between placeholders is tokenized on its own and the ids are spliced, so the expansion never
depends on how a tokenizer spells the media tokens.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .audio import load_audio, num_audio_soft_tokens, split_clips
from .image import ImageInputs, SquareImage, load_image, preprocess_image, preprocess_video_frames, sample_video

# Spec 6.1's media placeholders and delimiters as text (their ids: model.multimodal.MediaTokens's fields).
MEDIA_TOKEN_TEXT = {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>", "boi": "<|image>",
                    "eoi": "<image|>", "boa": "<|audio>", "eoa": "<audio|>"}
# Gemma 3's (images only; their ids: model.gemma3_vision.GEMMA3_MEDIA_TOKENS's fields).
GEMMA3_MEDIA_TOKEN_TEXT = {"image": "<image_soft_token>", "boi": "<start_of_image>", "eoi": "<end_of_image>"}
# What a rendered prompt writes for each medium, per family. Gemma 3's placeholder is its
# <start_of_image> itself, and its processor puts a blank line on both sides of an expanded image.
PLACEHOLDERS = {"gemma4": {MEDIA_TOKEN_TEXT[kind]: kind for kind in ("image", "audio", "video")},
                "gemma3": {GEMMA3_MEDIA_TOKEN_TEXT["boi"]: "image"}}
IMAGE_MARGIN = {"gemma4": "", "gemma3": "\n\n"}
_PLACEHOLDER_RE = {family: re.compile("|".join(map(re.escape, table))) for family, table in PLACEHOLDERS.items()}
_PART_KINDS = {"image": "image", "image_url": "image", "audio": "audio", "input_audio": "audio", "video": "video"}


@dataclass(frozen=True)
class PreparedImage:
    inputs: ImageInputs | SquareImage


@dataclass(frozen=True)
class PreparedAudio:
    clips: tuple[np.ndarray, ...]  # 16 kHz mono, each at most 30 s

    @property
    def counts(self) -> list[int]:
        return [num_audio_soft_tokens(len(c)) for c in self.clips]


@dataclass(frozen=True)
class PreparedVideo:
    frames: tuple[ImageInputs, ...]
    stamps: tuple[str, ...]


Prepared = PreparedImage | PreparedAudio | PreparedVideo


def _data_url(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.startswith("data:") or ";base64" not in header:
        raise ValueError("only base64 data: URLs are accepted for inline media")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise ValueError("media data URL is not valid base64") from None


def source_of(url: str) -> bytes | str:
    """A base64 data: URL's bytes, or a path (file:// dropped)."""
    return _data_url(url) if url.startswith("data:") else url.removeprefix("file://")


def part_source(part: dict[str, Any]) -> Any:
    """Where a content part's media is: a path, bytes or a PIL image."""
    kind = part["type"]
    if kind == "image_url":
        url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) else part.get("image_url")
        if not isinstance(url, str):
            raise ValueError("image_url part has no url")
        return source_of(url)
    if kind == "input_audio":
        spec = part.get("input_audio")
        data = spec.get("data") if isinstance(spec, dict) else None
        if not isinstance(data, str):
            raise ValueError("input_audio part has no base64 data (want {'input_audio': {'data': ..., 'format': ...}})")
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            raise ValueError("input_audio data is not valid base64") from None
    for key in (kind, "path", "url", "data"):
        if part.get(key) is not None:
            return source_of(part[key]) if isinstance(part[key], str) else part[key]
    raise ValueError(f"{kind} part names no {kind} (give '{kind}': path, bytes or image)")


def collect_media(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    """Messages with media parts reduced to `{"type": kind}` (what templates expect), and the
    media (kind, source) in prompt order."""
    media: list[tuple[str, Any]] = []
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = _PART_KINDS.get(part.get("type")) if isinstance(part, dict) else None
            if kind is None:
                parts.append(part)
                continue
            media.append((kind, part_source(part)))
            parts.append({"type": kind})
        out.append({**message, "content": parts})
    return out, media


def prepare(kind: str, source: Any, image_tokens: int) -> Prepared:
    if kind == "image":
        return PreparedImage(preprocess_image(load_image(source), max_soft_tokens=image_tokens))
    if kind == "audio":
        clips = split_clips(load_audio(source))
        if not clips:
            raise ValueError(f"{_label(source)}: the audio is empty (or under 10 ms: no audio token)")
        return PreparedAudio(tuple(clips))
    if kind == "video":
        frames, times = sample_video(source)
        inputs, stamps = preprocess_video_frames(frames, times)
        return PreparedVideo(tuple(inputs), tuple(stamps))
    raise ValueError(f"unknown media kind {kind!r}")


def _label(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"


def expand(text: str, prepared: list[Prepared], encode, tokens, family: str) -> list[int]:
    """Ids of `text` (a rendered prompt) with every placeholder expanded, in order.

    `encode(str) -> list[int]` tokenizes text without BOS; `tokens` is a MediaTokens."""
    placeholders, margin = PLACEHOLDERS[family], IMAGE_MARGIN[family]
    pieces = _PLACEHOLDER_RE[family].split(text)
    found = _PLACEHOLDER_RE[family].findall(text)
    if margin:  # (special tokens split text in the reference tokenizer too: splicing is exact)
        pieces = [(margin if i else "") + piece + (margin if i < len(found) else "") for i, piece in enumerate(pieces)]
    if len(found) != len(prepared):
        raise ValueError(f"the prompt has {len(found)} media placeholders but {len(prepared)} media inputs")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids.extend(encode(piece))
        if i == len(found):
            break
        kind, item = placeholders[found[i]], prepared[i]
        if kind == "image" and isinstance(item, PreparedImage):
            ids += [tokens.boi] + [tokens.image] * item.inputs.num_soft_tokens + [tokens.eoi]
        elif kind == "audio" and isinstance(item, PreparedAudio):
            for n in item.counts:
                ids += [tokens.boa] + [tokens.audio] * n + [tokens.eoa]
        elif kind == "video" and isinstance(item, PreparedVideo):
            for j, (frame, stamp) in enumerate(zip(item.frames, item.stamps)):
                ids += encode((" " if j else "") + stamp + " ")
                ids += [tokens.boi] + [tokens.video] * frame.num_soft_tokens + [tokens.eoi]
        else:
            raise ValueError(f"placeholder {found[i]} does not match media input {i} ({type(item).__name__})")
    return ids
