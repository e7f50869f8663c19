"""Prompt caching: a generation's KV cache is kept with the tokens it holds, and the next prompt
that starts with the same tokens (a chat's next turn, a resent request, a shared system prompt)
prefills only the rest, as llama.cpp's `cache_prompt` and Ollama do.

Going on from a kept cache attends over the same keys as a fresh prefill would; the kept keys
come from the forwards that wrote them (the previous reply's from its decode steps), so logits
agree up to float summation order (the tests: greedy tokens identical to caching off).

A kept cache is cut back to the prefix it shares with the new prompt (`KVCache.truncate`). A
sliding ring allows that only while it still holds the window before the cut, so caches made here
keep `KEEP_SPARE` ring slots past the window by default: room for a chat template that writes the end of
the last reply differently than it was generated (trimmed whitespace, the end-of-turn token).
Where no kept cache can be cut back, the prompt is prefilled whole, as without caching.

Media: a soft-token position counts as shared only when the media item behind it is the same
(a digest of its prepared inputs) in both prompts. The pool also keeps recent items' soft tokens
by that digest (up to `media_bytes`): a chat's next turn sends its images and audio again, and
where its kept cache cannot be reused (or a new cache is made for a rollback) the towers, seconds
of work an image on a CPU, need not run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import KVCache, make_cache
from .config import TextConfig
from .model.multimodal import AUDIO, IMAGE, VIDEO, MediaTokens

# Ring slots past the window in caches made for keeping: how far back from the end of what a cache
# holds the next prompt may diverge and still reuse it (64 x 4 KiB a sliding layer on E2B).
KEEP_SPARE = 64
# Soft tokens kept by content: ~37 images of E2B's 280-token budget in float32 (1.7 MiB each).
MEDIA_BYTES = 64 * 2**20


@dataclass(frozen=True)
class MediaItem:
    """One image, audio or video of a prompt, as far as caching cares."""

    kind: int  # the token type of its soft tokens (IMAGE, AUDIO or VIDEO)
    soft_tokens: int
    digest: bytes

    @classmethod
    def of(cls, item) -> MediaItem:
        """From a `processing.prompt.Prepared` item."""
        from .processing.prompt import PreparedAudio, PreparedImage

        if isinstance(item, PreparedImage):
            kind, n = IMAGE, item.inputs.num_soft_tokens
        elif isinstance(item, PreparedAudio):
            kind, n = AUDIO, sum(item.counts)
        else:
            kind, n = VIDEO, sum(frame.num_soft_tokens for frame in item.frames)
        digest = hashlib.blake2b(digest_size=16)
        _feed(digest, item)
        return cls(kind, n, digest.digest())


def _feed(digest, value) -> None:
    """Hash a prepared item's content: its type, arrays (dtype, shape, bytes) and fields."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().numpy()
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.view(np.uint8).reshape(-1).data)
    elif dataclasses.is_dataclass(value):
        digest.update(type(value).__name__.encode())
        for f in dataclasses.fields(value):
            _feed(digest, getattr(value, f.name))
    elif isinstance(value, (tuple, list)):
        digest.update(f"({len(value)}".encode())
        for v in value:
            _feed(digest, v)
    else:
        digest.update(repr(value).encode())


@dataclass(frozen=True, eq=False)
class Held:
    """The tokens at a cache's positions 0.. (or a prompt's), and the media items whose soft tokens
    fill its placeholders, in order."""

    ids: list[int]
    media: tuple[MediaItem, ...] = ()
    # Per kind, the positions of its placeholders (a prompt's, where it has media).
    soft_positions: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def prompt(cls, ids: list[int], prepared: tuple = (), tokens: MediaTokens | None = None) -> Held:
        if not prepared:
            return cls(list(ids))
        assert tokens is not None
        array = np.asarray(ids)
        positions = {kind: np.flatnonzero(array == token)
                     for kind, token in ((IMAGE, tokens.image), (VIDEO, tokens.video), (AUDIO, tokens.audio))}
        return cls(list(ids), tuple(MediaItem.of(item) for item in prepared), positions)

    def then(self, more: list[int]) -> Held:
        """These tokens followed by `more` (generated ones)."""
        return Held(self.ids + list(more), self.media, self.soft_positions)


def shared_prefix(kept: Held, new: Held, limit: int) -> int:
    """How many leading positions of `new` a cache holding `kept` holds as well (at most `limit`):
    the same ids, and at soft-token positions the same media items."""
    n = min(len(kept.ids), len(new.ids), limit)
    differ = np.flatnonzero(np.asarray(kept.ids[:n]) != np.asarray(new.ids[:n]))
    shared = int(differ[0]) if differ.size else n
    if shared and new.media:
        same = 0
        while same < min(len(kept.media), len(new.media)) and kept.media[same] == new.media[same]:
            same += 1
        for kind, positions in new.soft_positions.items():
            covered = sum(item.soft_tokens for item in new.media[:same] if item.kind == kind)
            if covered < positions.size and positions[covered] < shared:
                shared = int(positions[covered])  # the first soft token of a changed item
    return shared


@dataclass(eq=False)
class _Kept:
    cache: KVCache
    held: Held


class PromptCache:
    """The caches of finished generations, at most `capacity` (0: caching off), the most recently
    kept last; the caches it makes keep `spare` ring slots past the window. Not thread-safe: one
    engine (or one caller at a time) leases and keeps."""

    def __init__(self, capacity: int = 1, spare: int = KEEP_SPARE, media_bytes: int = MEDIA_BYTES):
        if capacity < 0:
            raise ValueError(f"prompt cache capacity must be >= 0, not {capacity}")
        self.capacity, self.spare = capacity, spare
        self.media_bytes = media_bytes if capacity else 0
        self._kept: list[_Kept] = []
        self._soft: OrderedDict[bytes, list[torch.Tensor]] = OrderedDict()  # least recently used first
        self.reused = 0  # positions the last lease found held

    def __len__(self) -> int:
        return len(self._kept)

    def lease(self, config: TextConfig, prompt: Held, max_len: int, *, spare: int = 0, dtype=torch.float32,
              device="cpu") -> tuple[KVCache, int]:
        """A cache for `prompt` and how many of its positions it already holds: the kept cache
        sharing the longest prefix that it can be cut back to (taken out of the pool, grown to
        `max_len`), or a fresh one holding nothing. At least the last prompt token is left to
        prefill (its logits are the first token's). `spare`: ring slots a caller needs past the
        window (speculative decoding's); caches made here keep at least `KEEP_SPARE`."""
        device = torch.device(device)
        best, best_shared = None, 0
        for kept in self._kept:
            c = kept.cache
            if c.batch != 1 or c.dtype != dtype or c.device != device or c.spare < spare:
                continue
            shared = shared_prefix(kept.held, prompt, len(prompt.ids) - 1)
            if shared > best_shared and c.rolls_back_to(shared):
                best, best_shared = kept, shared
        self.reused = best_shared
        if best is None:
            keep_spare = max(spare, self.spare) if self.capacity else spare
            return make_cache(config, max_len, dtype=dtype, device=device, spare=keep_spare), 0
        self._kept.remove(best)
        best.cache.truncate(best_shared)
        best.cache.reserve(max_len)
        return best.cache, best_shared

    def keep(self, cache: KVCache, held: Held) -> None:
        """Keep `cache`, which holds `held` at its positions 0.., for the next prompts."""
        if self.capacity == 0 or not held.ids:
            return
        cache.shrink(len(held.ids))  # kept, it needs no room past what it holds
        self._kept.append(_Kept(cache, held))
        del self._kept[: -self.capacity]

    def soft_tokens(self, item: MediaItem, encode: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The soft tokens of `item`: kept ones for the same content, else `encode()`'s (kept
        while they fit `media_bytes` with the most recently used others)."""
        soft = self._soft.get(item.digest)
        if soft is not None:
            self._soft.move_to_end(item.digest)
            return soft
        soft = encode()
        size = sum(t.numel() * t.element_size() for t in soft)
        if size <= self.media_bytes:
            self._soft[item.digest] = soft
            while sum(t.numel() * t.element_size() for ts in self._soft.values() for t in ts) > self.media_bytes:
                self._soft.popitem(last=False)
        return soft

    def clear(self) -> None:
        self._kept.clear()
        self._soft.clear()
