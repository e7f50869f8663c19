"""Prompt caching: a generation's KV cache is kept with the tokens it holds, and the next prompt
that starts with the same tokens (a chat's next turn, a resent request, a shared system prompt)
prefills only the rest, as llama.cpp's `cache_prompt` and Ollama do.

Going on from a kept cache attends over the same keys as a fresh prefill would; the kept keys
come from the forwards that wrote them (the previous reply's from its decode steps), so logits
agree up to float summation order: in float32 greedy tokens are identical to caching off (the
tests); in bfloat16 they differ by its rounding, as they do between prefill chunk sizes.

A kept cache is cut back to the prefix it shares with the new prompt (`KVCache.rewind`). A
sliding ring allows that where it still holds the window before the cut: caches made here keep
`KEEP_SPARE` ring slots past the window by default, room for a template that writes the end of the
last reply differently than it was generated (trimmed whitespace, the end-of-turn token). And
where the cut is at most `KEEP_SPARE` before the end of the kept cache's prompt: Gemma 4's template
writes the model turn's opening otherwise in the history, so the next turn parts from the kept
cache just before the reply; the rings save what the reply overwrites of the prompt's window
(`KVCache.mark`) to rewind to there. Where no kept cache can be cut back, the prompt is prefilled
whole, as without caching.

Media: a soft-token position counts as shared only when the media item behind it is the same
(a digest of its prepared inputs) in both prompts. The pool also keeps recent items' soft tokens
by that digest (up to `media_bytes`): a chat's next turn sends its images and audio again, and
where its kept cache cannot be reused (or a new cache is made for a rollback) the towers, seconds
of work an image on a CPU, need not run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .cache import KVCache, make_cache
from .model.multimodal import AUDIO, IMAGE, VIDEO, MediaTokens, token_types

# Ring slots past the window in caches made for keeping: how far back from the end of what a cache
# holds (or of its prompt: KVCache.mark) the next prompt may part from it and still reuse it
# (64 x 2 KiB a sliding layer on E2B in float32).
KEEP_SPARE = 64
# A kept cache whose positions a prompt shares all but this many of is that prompt's conversation
# going on (a template re-renders the end of a reply): leased as it is, not copied.
CONTINUED = 32
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
        types = token_types(torch.tensor(ids), tokens).numpy()
        positions = {kind: np.flatnonzero(types == kind) for kind in (IMAGE, VIDEO, AUDIO)}
        return cls(list(ids), tuple(MediaItem.of(item) for item in prepared), positions)

    def then(self, more: list[int]) -> Held:
        """These tokens followed by `more` (generated ones)."""
        return Held(self.ids + list(more), self.media, self.soft_positions)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading ids `a` and `b` share, at most `limit`."""
    n = min(len(a), len(b), limit)
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def shared_prefix(kept: Held, new: Held, limit: int) -> int:
    """How many leading positions of `new` a cache holding `kept` holds as well (at most `limit`):
    the same ids, and at soft-token positions the same media items. A cut never falls inside a
    run of image soft tokens (a bidirectional block whose earlier tokens saw its later ones)."""
    shared = common_prefix(kept.ids, new.ids, limit)
    if shared and new.media:
        same = 0
        while same < min(len(kept.media), len(new.media)) and kept.media[same] == new.media[same]:
            same += 1
        for kind, positions in new.soft_positions.items():
            covered = sum(item.soft_tokens for item in new.media[:same] if item.kind == kind)
            if covered < positions.size and positions[covered] < shared:
                shared = int(positions[covered])  # the first soft token of a changed item
        vision = {int(p) for kind in (IMAGE, VIDEO) for p in new.soft_positions.get(kind, ())}
        while shared in vision and shared - 1 in vision:  # back to the start of its run
            shared -= 1
    return shared


@dataclass(eq=False)
class _Kept:
    cache: KVCache
    held: Held


class PromptCache:
    """The caches of finished generations, at most `capacity` (0: caching off), the most recently
    kept last, for one model (the first that leases); the caches it makes keep `spare` ring slots
    past the window. Leasing and keeping are locked: generations in several threads each get
    their own cache."""

    def __init__(self, capacity: int = 1, spare: int = KEEP_SPARE, media_bytes: int = MEDIA_BYTES):
        if capacity < 0:
            raise ValueError(f"prompt cache capacity must be >= 0, not {capacity}")
        self.capacity, self.spare = capacity, spare
        self.media_bytes = media_bytes if capacity else 0
        self._kept: list[_Kept] = []
        self._soft: OrderedDict[bytes, list[torch.Tensor]] = OrderedDict()  # least recently used first
        self._soft_bytes = 0
        self._model: weakref.ref | None = None
        self._lock = threading.Lock()
        self.reused = 0  # prompt positions the latest generation found held (generate.Caching sets it)

    def __len__(self) -> int:
        return len(self._kept)

    def lease(self, model: nn.Module, prompt: Held, max_len: int, *, spare: int = 0) -> tuple[KVCache, int]:
        """A cache for `prompt` on `model` (a TextModel) and how many of its positions it already
        holds, at least the last prompt token left to prefill (its logits are the first token's).
        The kept cache sharing the longest prefix that it can be cut back to is taken out of the
        pool where the prompt goes on from all but `CONTINUED` of its positions (a chat's next
        turn) or the pool keeps one cache, else copied (a shared start, such as a template's or a
        system prompt's, leaves it to its own conversation); it is cut back and grown to `max_len`. Without one, a fresh cache. `spare`: ring slots the caller
        needs past the window (speculative decoding's); caches made here keep at least `spare`
        of the pool's."""
        dtype, device = model.dtype, torch.device(model.device)
        with self._lock:
            self._bind(model)
            best, best_shared = None, 0
            for kept in self._kept:
                c = kept.cache
                if c.batch != 1 or c.dtype != dtype or c.device != device or c.spare < spare:
                    continue
                shared = shared_prefix(kept.held, prompt, len(prompt.ids) - 1)
                if shared > best_shared:  # (checking where a cache can be cut reads the device)
                    shared = c.rollback_point(shared)
                    if shared > best_shared:
                        best, best_shared = kept, shared
            if best is not None and (self.capacity == 1 or len(best.held.ids) - best_shared <= CONTINUED):
                self._kept.remove(best)
                cache = best.cache
            elif best is not None:
                cache = best.cache.copy()
        if best is None:
            keep_spare = max(spare, self.spare) if self.capacity else spare
            return make_cache(model.config, max_len, dtype=dtype, device=device, spare=keep_spare), 0
        cache.rewind(best_shared)
        cache.reserve(max_len)
        return cache, best_shared

    def keep(self, cache: KVCache, held: Held) -> None:
        """Keep `cache`, which holds `held` at its positions 0.., for the next prompts."""
        if self.capacity == 0 or not held.ids:
            return
        if cache.max_len > 2 * len(held.ids):  # mostly room a kept cache does not need
            cache.shrink(len(held.ids))
        with self._lock:
            self._kept.append(_Kept(cache, held))
            del self._kept[: -self.capacity]

    def soft_tokens(self, model: nn.Module, item: MediaItem,
                    encode: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The soft tokens of `item` for `model` (the TextModel whose towers made them): kept ones
        for the same content, else `encode()`'s (kept while they fit `media_bytes` with the most
        recently used others)."""
        with self._lock:
            self._bind(model)
            soft = self._soft.get(item.digest)
            if soft is not None:
                self._soft.move_to_end(item.digest)
                return soft
        soft = encode()
        size = sum(t.numel() * t.element_size() for t in soft)
        with self._lock:
            if size <= self.media_bytes and item.digest not in self._soft:
                self._soft[item.digest] = soft
                self._soft_bytes += size
                while self._soft_bytes > self.media_bytes:
                    _, dropped = self._soft.popitem(last=False)
                    self._soft_bytes -= sum(t.numel() * t.element_size() for t in dropped)
        return soft

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self._soft.clear()
            self._soft_bytes = 0

    def _bind(self, model: nn.Module) -> None:
        """A pool serves one model: another's caches (and soft tokens) would be silently wrong."""
        if self._model is None:
            self._model = weakref.ref(model)
            return
        bound = self._model()
        if bound is None:  # that model is gone: what it left is of no use
            self._model = weakref.ref(model)
            self._kept.clear()
            self._soft.clear()
            self._soft_bytes = 0
        elif bound is not model:
            raise ValueError("this PromptCache holds another model's caches: give each model its own")
