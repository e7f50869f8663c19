"""OpenAI messages -> the runtime's messages and prompt: content parts checked, base64 and data
URLs decoded, local files allowed only when the server says so, and browser recordings
(WebM / MP4 audio, which libsndfile cannot read) decoded with PyAV.

The server's media limits are checked from the headers, before any pixel or sample is decoded:
an image's width x height (a 50000x50000 PNG is a few kilobytes), the seconds of audio a request
sends (all its parts together; WebM/MP4 stop decoding once past the limit). The decoded audio is
measured again after the prompt is built, for headers that under-declare their length.

Runs in a worker thread, never on the event loop: decoding media is CPU work.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

from .. import chat
from ..llm import LLM, Prompt
from ..processing.audio import SAMPLE_RATE, container_to_wav, is_container
from ..processing.prompt import PreparedAudio
from .protocol import ApiError, bad

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "webm", "mp4", "m4a")
_PYAV_FORMATS = {"webm", "mp4", "m4a"}
_ROLES = {"system", "developer", "user", "assistant", "tool"}
_KEEP = ("role", "name", "tool_call_id", "reasoning_content")


@dataclass(frozen=True)
class MediaLimits:
    """What one request's media may claim (ServerOptions holds the server's values)."""

    max_image_pixels: int  # width x height of each image
    max_audio_seconds: float  # all of a request's audio parts together


@dataclass
class AudioBudget:
    """The seconds of audio one request has used, against its limit."""

    limit: float
    used: float = 0.0

    def check(self, more: float, param: str) -> None:
        if self.used + more > self.limit:
            raise bad(f"the request's audio is {self.used + more:.1f} s long, over this server's "
                      f"{self.limit:g} s limit", param, "audio_too_long")

    def take(self, seconds: float, param: str) -> None:
        self.check(seconds, param)
        self.used += seconds


def decode_base64(data: Any, param: str, what: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad(f"{what} must be a non-empty base64 string", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{what} is not valid base64", param) from None


def _image_source(part: dict, param: str, allow_local_files: bool, limits: MediaLimits | None) -> bytes | str:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    param = f"{param}.image_url.url"
    if not isinstance(url, str) or not url:
        raise bad("image_url part has no url", param)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise bad("image data URLs must be base64 (data:image/...;base64,...)", param)
        source: bytes | str = decode_base64(payload, param, "the image data URL")
    elif url.startswith(("http://", "https://")):
        raise bad("remote image URLs are not fetched: send the image as a base64 data URL", param)
    elif not allow_local_files:
        raise bad("local file URLs are disabled (start the server with --allow-local-files)", param)
    else:
        source = url.removeprefix("file://")
    if limits is not None:
        check_image_pixels(source, limits.max_image_pixels, param)
    return source


def check_image_pixels(source: bytes | str, limit: int, param: str) -> None:
    """Refuse an image whose header claims more than `limit` pixels, before its pixels are
    decoded. Unreadable input passes: the runtime's decoder then says what is wrong with it."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                width, height = image.size
        except Image.DecompressionBombError as e:  # Pillow's own cap (~179 MP) refuses it first
            raise bad(f"the image is over this server's {limit / 1e6:g}-megapixel limit ({_one_line(e)})", param,
                      "image_too_large") from None
        except Exception:  # noqa: BLE001 - not an image, a missing file...: reported when decoded
            return
    if width * height > limit:
        raise bad(f"the image is {width}x{height} ({width * height / 1e6:.3g} megapixels), over this server's "
                  f"{limit / 1e6:g}-megapixel limit", param, "image_too_large")


def _audio_source(part: dict, param: str, budget: AudioBudget | None) -> bytes:
    spec = part.get("input_audio")
    if not isinstance(spec, dict):
        raise bad("input_audio part needs {data, format}", f"{param}.input_audio")
    fmt = spec.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
        raise bad(f"input_audio format must be one of {', '.join(AUDIO_FORMATS)}", f"{param}.input_audio.format")
    data = decode_base64(spec.get("data"), f"{param}.input_audio.data", "input_audio data")
    return audio_input(data, fmt.lower() if fmt else None, "input_audio", f"{param}.input_audio.data", budget)


def audio_input(data: bytes, fmt: str | None, label: str, param: str, budget: AudioBudget | None) -> bytes:
    """`audio_bytes`, with the request's audio budget charged from the file's header."""
    wav = audio_bytes(data, fmt, label, budget, param)
    if budget is not None:
        seconds = header_seconds(wav)
        if seconds is not None:
            budget.take(seconds, param)
    return wav


def header_seconds(data: bytes) -> float | None:
    """The length a libsndfile-readable file declares (MP3: an estimate), or None when it
    cannot be read (the runtime's decoder then reports why)."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - undecodable: reported when decoded
        return None
    return info.frames / info.samplerate if info.samplerate > 0 else None


def _content(content: Any, param: str, allow_local_files: bool, media: bool, limits: MediaLimits | None,
             budget: AudioBudget | None) -> Any:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad("content must be a string, an array of parts or null", param)
    parts = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad("text part has no string 'text'", f"{p}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and media:
            parts.append({"type": "image", "image": _image_source(part, p, allow_local_files, limits)})
        elif kind == "input_audio" and media:
            parts.append({"type": "audio", "audio": _audio_source(part, p, budget)})
        else:
            where = "" if media else " in this message"
            raise bad(f"content part type {kind!r} is not supported{where}", f"{p}.type")
    return parts


def _tool_calls(calls: Any, param: str) -> list[dict]:
    if not isinstance(calls, list):
        raise bad("tool_calls must be an array", param)
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad("a tool call needs function.name", f"{param}[{k}].function")
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):  # RecursionError: nested too deep for json
                raise bad("tool call arguments are not valid JSON", f"{param}[{k}].function.arguments") from None
        if not isinstance(args, dict):
            raise bad("tool call arguments must be a JSON object", f"{param}[{k}].function.arguments")
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def has_media(messages: Any) -> bool:
    """Whether any message (as sent) has a content part other than text."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(not isinstance(part, dict) or part.get("type") != "text" for part in m["content"])
        for m in messages)


def fewest_tokens(messages: Any, tools: Any, longest_piece: int) -> int:
    """Tokens the prompt holds at least, counted before anything is rendered or tokenized: its
    text (message content, and the strings of tool calls and tool declarations; not media, whose
    base64 is no prompt text) in pieces of at most `longest_piece` characters, and two turn
    markers a message other than a system one (Gemma 3 folds that into the first turn)."""
    if isinstance(messages, str):  # a completions prompt
        return -(-len(messages) // longest_piece)
    chars, turns = _strings_chars(tools), 0
    for m in messages if isinstance(messages, list) else ():
        if not isinstance(m, dict):
            continue
        turns += m.get("role") not in ("system", "developer")
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p["text"].strip() for p in content  # (each part trimmed, as rendered)
                              if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
        if isinstance(content, str) and m.get("role") in ("assistant", "model"):
            content = chat.without_thoughts(content)  # (the renderers drop an earlier turn's thinking)
        if isinstance(content, str):
            chars += len(content.strip())
        calls = m.get("tool_calls")  # (their names and arguments: ids and types are not rendered)
        chars += _strings_chars([c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else None)
    return -(-chars // longest_piece) + 2 * turns


def _strings_chars(value: Any) -> int:
    """Characters of the strings in a JSON value (keys included; a tool call's arguments are a
    JSON text, counted as written)."""
    total, stack = 0, [value]
    while stack:  # (no recursion: a request's nesting is checked later)
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            total += sum(len(k) for k in v if isinstance(k, str))
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return total


def prepare_messages(messages: list, allow_local_files: bool, limits: MediaLimits | None = None) -> list[dict]:
    """Checked messages in the shape the chat renderers take; media parts carry their bytes (or a
    path) as {"type": "image", "image": ...} / {"type": "audio", "audio": ...}. With `limits`,
    media over them is refused from its headers (400)."""
    budget = AudioBudget(limits.max_audio_seconds) if limits is not None else None
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in _ROLES:
            raise bad(f"message {i} needs a role among {', '.join(sorted(_ROLES))}", f"messages[{i}].role")
        role = m["role"]
        clean = {k: m[k] for k in _KEEP if m.get(k) is not None}
        clean["content"] = _content(m.get("content"), f"messages[{i}].content", allow_local_files,
                                    role in ("user", "system", "developer"), limits, budget)
        if role == "assistant" and m.get("tool_calls"):
            clean["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        out.append(clean)
    return out


def modalities(llm: LLM) -> list[str]:
    """The inputs the loaded model takes: text, and image / audio when it can project them into
    the text space (every kind of encoders has `embed_vision` / `embed_audio`, None if absent)."""
    if llm.encoders is None:
        return ["text"]
    projections = (("image", llm.encoders.embed_vision), ("audio", llm.encoders.embed_audio))
    return ["text"] + [kind for kind, projection in projections if projection is not None]


def build_prompt(llm: LLM, messages: list[dict], *, thinking: bool, tools: list | None,
                 image_tokens: int | None, max_audio_seconds: float | None = None) -> Prompt:
    """`LLM.build_prompt`, after the checks that must fail this request alone (400) rather than
    the model thread's whole batch; then the decoded audio's length against `max_audio_seconds`
    (a header may under-declare it)."""
    try:
        llm.check_tools(tools)
    except ValueError as e:
        raise bad(str(e), "tools") from None
    kinds = {part.get("type") for m in messages if isinstance(m.get("content"), list)
             for part in m["content"] if isinstance(part, dict)}
    have = modalities(llm)
    for kind in sorted(kinds):
        need = {"image": "image", "image_url": "image", "audio": "audio", "input_audio": "audio"}.get(kind)
        if llm.encoders is not None and need and need not in have:
            tower = "vision" if need == "image" else "audio"
            raise bad(f"this model has no {tower} encoder: it cannot take {kind} input", "messages")
    prompt = llm.build_prompt(messages, enable_thinking=thinking, image_tokens=image_tokens, tools=tools)
    if max_audio_seconds is not None:
        samples = sum(len(clip) for item in prompt.media if isinstance(item, PreparedAudio) for clip in item.clips)
        AudioBudget(max_audio_seconds).check(samples / SAMPLE_RATE, "messages")
    return prompt


# ------------------------------------------------------------------------------ audio containers


def audio_bytes(data: bytes, fmt: str | None, label: str, budget: AudioBudget | None = None,
                param: str = "messages") -> bytes:
    """Audio as bytes the runtime's decoder (libsndfile) reads: WebM/MP4 become WAV (charged to
    `budget` as they decode)."""
    if fmt in _PYAV_FORMATS or is_container(data):
        charge = None if budget is None else (lambda seconds: budget.check(seconds, param))
        return container_to_wav(io.BytesIO(data), f"<{label}>", charge)
    return data


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def media_error(e: ValueError) -> ApiError:
    """A one-line media or template ValueError from the runtime as a 400."""
    return bad(_one_line(e), "messages")
