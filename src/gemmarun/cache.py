"""KV cache owned by the caller, preallocated, as small as the architecture allows.

* sliding layers: a ring buffer of `window` slots (memory independent of context length), plus
  `spare` slots, so tokens written and then rolled back (rejected drafts, a kept cache's tail that
  the next prompt does not share) evict nothing still visible;
* full layers: a static buffer of `max_len` positions; on K=V layers only the values are stored
  (keys are rebuilt as RoPE(v * k_norm.weight) on read, spec 3.4), halving their footprint;
* KV-shared layers: nothing; they read their producer's keys and values.

A cache outlives its generation when prompt caching keeps it (prompt_cache.py): `rolls_back_to`
says whether `rewind` can cut it back to a shorter prefix (`mark` has the rings save what a rewind
to the end of a prompt needs), `reserve` grows it for a longer one and `shrink` trims a kept one.
`make_cache` is the only place that decides which layer gets which storage.
"""

from __future__ import annotations

import copy

import torch

from .config import LayerSpec, LayerType, TextConfig


class FullKV:
    """Static per-position storage for a full-attention layer."""

    def __init__(self, spec: LayerSpec, batch: int, max_len: int, dtype, device, slot_positions: torch.Tensor):
        shape = (batch, spec.num_kv_heads, max_len, spec.head_dim)
        self.keys = None if spec.k_eq_v else torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.end = 0  # one past the highest position written
        self._positions = slot_positions  # arange(max_len): slot i holds position i (shared by the layers)

    def update(self, k, v, positions, first: int):
        """Store (B, kv, T, D) keys/values at positions `first`.. (`positions` on the device, unused:
        slot i holds position i); return everything visible so far as (keys or None when keys are
        rebuilt from values, values, key positions)."""
        end = first + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"position {end - 1} is past the cache length {self.max_len}")
        if self.keys is not None:
            self.keys[:, :, first:end] = k
        self.values[:, :, first:end] = v
        self.end = max(self.end, end)
        keys = None if self.keys is None else self.keys[:, :, : self.end]
        return keys, self.values[:, :, : self.end], self._positions[: self.end]

    def advance(self, position: int) -> tuple[int, int]:
        """Book one token at `position` that the caller writes itself (the native decode step):
        its slot, and how many slots attention then reads."""
        if position >= self.max_len:
            raise ValueError(f"position {position} is past the cache length {self.max_len}")
        self.end = max(self.end, position + 1)
        return position, self.end

    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, slot positions); keys an empty tensor on K=V layers (values only)."""
        keys = torch.empty(0, dtype=self.values.dtype) if self.keys is None else self.keys
        return keys, self.values, self._positions

    def truncate(self, length: int) -> None:
        """Forget positions >= `length`."""
        self.end = min(self.end, length)

    def resize(self, max_len: int, slot_positions: torch.Tensor) -> None:
        """Room for positions up to `max_len`, no more (the written ones below it copied over)."""
        if max_len == self.max_len:
            return
        end = self.end = min(self.end, max_len)

        def grown(t: torch.Tensor) -> torch.Tensor:
            new = torch.zeros((*t.shape[:2], max_len, t.shape[3]), dtype=t.dtype, device=t.device)
            new[:, :, :end] = t[:, :, :end]
            return new

        self.keys = None if self.keys is None else grown(self.keys)
        self.values = grown(self.values)
        self.max_len, self._positions = max_len, slot_positions

    def copy(self) -> FullKV:
        new = copy.copy(self)
        new.keys = None if self.keys is None else self.keys.clone()
        new.values = self.values.clone()
        return new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


# Slots a marked ring saves at once, ahead of the writes that take them (a copy per token and
# layer cost the real 270M 5 % of its decode speed).
SAVE_AHEAD = 32


class SlidingKV:
    """Ring buffer of `window + spare` slots; slot = position % size."""

    def __init__(self, spec: LayerSpec, batch: int, max_len: int, dtype, device, spare: int = 0):
        self.window, self.spare = spec.window, spare
        self.size = min(spec.window + spare, max_len)
        shape = (batch, spec.num_kv_heads, self.size, spec.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.full((self.size,), -1, dtype=torch.long, device=device)
        # Slots at and past `used` were never written: attention reads only the first `used`
        # (a 200-token chat on a 1024-slot ring reads 200 keys a sliding layer, not 1024).
        self.used = 0
        # Since `mark(end)`: the slots overwritten while they still held positions before `end`,
        # saved as they were (slot indices on the host, contents on the device), so the ring can
        # be rewound to just before `end` whatever was written after it.
        self._mark: int | None = None
        self._saved: set[int] = set()
        self._undo: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # The ring holds every position from `_low` to the last written (a lower bound kept on the
        # host: a truncation leaves older positions than a later write's `last - size` in place).
        self._low = 0
        self._mark_low = 0

    def update(self, k, v, positions, first: int):
        """Store (B, kv, T, D) keys/values at `positions` (on the device; `first` is positions[0]
        on the host); return what this forward's queries attend over."""
        last = first + positions.numel() - 1
        # Every position takes a slot, even those of a chunk longer than the ring that are not kept.
        self._save(first, last + 1)
        if positions.numel() == 1:
            # One new token only evicts position p - window, which it cannot see anyway.
            self._write(k, v, positions, last)
            u = self.used
            return self.keys[:, :, :u], self.values[:, :, :u], self.positions[:u]
        # A chunk's first queries still need the keys it is about to evict: attend over the
        # ring as it was plus the whole chunk, then keep the chunk's last `size` tokens.
        u = self.used
        keys = torch.cat((self.keys[:, :, :u], k), dim=2)
        values = torch.cat((self.values[:, :, :u], v), dim=2)
        key_positions = torch.cat((self.positions[:u], positions))
        n = min(self.size, positions.numel())
        self._write(k[:, :, -n:], v[:, :, -n:], positions[-n:], last)
        return keys, values, key_positions

    def _write(self, k, v, positions, last: int):
        # positions ascend to `last`: slots below min(last + 1, size) hold them all
        self._low = max(self._low, last + 1 - self.size)
        self.used = max(self.used, min(last + 1, self.size))
        if positions.numel() == 1:  # decode: slices, not tensor-indexed writes (fewer dispatches)
            slot = last % self.size
            self.keys[:, :, slot : slot + 1] = k
            self.values[:, :, slot : slot + 1] = v
            self.positions[slot] = last
            return
        slots = positions % self.size
        self.keys[:, :, slots] = k
        self.values[:, :, slots] = v
        self.positions[slots] = positions

    def advance(self, position: int) -> tuple[int, int]:
        """Book one token at `position` that the caller writes itself (keys, values and the
        slot's position): its slot, and how many slots attention then reads."""
        self._save(position, position + 1)
        self._low = max(self._low, position + 1 - self.size)
        self.used = max(self.used, min(position + 1, self.size))
        return position % self.size, self.used

    def mark(self, end: int) -> None:
        """Keep from now on what a rewind to shortly before `end` needs (the positions before
        `end` that the ring holds): each slot holding one is saved before a position at or past
        `end` overwrites it. A kept cache's next prompt may part from it a few tokens before the
        end of its prompt (a template writing the model turn's opening otherwise in the history),
        after a reply far longer than the spare slots."""
        self._mark, self._mark_low, self._saved, self._undo = end, max(self._low, end - self.size), set(), []

    def _save(self, first: int, stop: int) -> None:
        """Before positions first..stop-1 are written: save the slots they take from the positions
        held at the mark (on the host: position p takes p - size's slot)."""
        if self._mark is None:
            return
        lo, hi = max(first, self._mark, self._mark_low + self.size), min(stop, self._mark + self.size)
        if lo >= hi or all(p % self.size in self._saved for p in range(lo, hi)):
            return
        hi = min(max(hi, lo + SAVE_AHEAD), self._mark + self.size)  # the next ones too: fewer, larger copies
        slots = [p % self.size for p in range(lo, hi) if p % self.size not in self._saved]
        if slots:
            self._saved.update(slots)
            index = torch.tensor(slots, device=self.positions.device)
            self._undo.append((index, self.keys[:, :, index].clone(), self.values[:, :, index].clone(),
                               self.positions[index].clone()))

    @property
    def marked(self) -> int | None:
        """The prompt end of the latest `mark`, None without one."""
        return self._mark

    def can_rewind(self, length: int) -> bool:
        """Whether `rewind(length)` leaves a ring that goes on exactly."""
        if self.holds_window_before(length):
            return True
        return self._mark is not None and max(0, length - self.window) >= self._mark_low and length <= self._mark

    def rewind(self, length: int) -> None:
        """Forget positions >= `length`, first putting back what was saved since the mark where
        the ring lost part of the window before `length`."""
        if self._mark is not None and not self.holds_window_before(length):
            for index, keys, values, positions in self._undo:
                self.keys[:, :, index] = keys
                self.values[:, :, index] = values
                self.positions[index] = positions
            self._low = self._mark_low
        self._mark, self._saved, self._undo = None, set(), []
        self.truncate(length)

    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, slot positions)."""
        return self.keys, self.values, self.positions

    def truncate(self, length: int) -> None:
        """Forget positions >= `length` (their slots become empty; the keys they evicted were
        out of every later query's window as long as no more than `spare` were written)."""
        self.positions.masked_fill_(self.positions >= length, -1)
        self._low = min(self._low, length)
        if self._mark is not None and length < self._mark:  # rewritten below it, the saves would lie
            self._mark, self._saved, self._undo = None, set(), []

    def holds_window_before(self, length: int) -> bool:
        """Whether the ring still holds every position a query at `length` sees (the `window`
        before it): then it can be truncated to `length` and go on from there."""
        wanted = torch.arange(max(0, length - self.window), length, device=self.positions.device)
        return bool((self.positions[wanted % self.size] == wanted).all())

    def reserve(self, max_len: int) -> None:
        """A larger ring where `max_len` had capped it below `window + spare` (each held position
        moved to its slot in the new ring)."""
        size = min(self.window + self.spare, max_len)
        if size <= self.size:
            return
        held = (self.positions >= 0).nonzero().flatten()
        slots = self.positions[held] % size
        shape = (*self.keys.shape[:2], size, self.keys.shape[3])
        keys = torch.zeros(shape, dtype=self.keys.dtype, device=self.keys.device)
        values = torch.zeros(shape, dtype=self.values.dtype, device=self.values.device)
        keys[:, :, slots] = self.keys[:, :, held]
        values[:, :, slots] = self.values[:, :, held]
        positions = torch.full((size,), -1, dtype=torch.long, device=self.positions.device)
        positions[slots] = self.positions[held]
        self.keys, self.values, self.positions, self.size = keys, values, positions, size
        self.used = int(slots.max()) + 1 if held.numel() else 0
        self._mark, self._saved, self._undo = None, set(), []  # saved by the old slots

    def copy(self) -> SlidingKV:
        new = copy.copy(self)
        new.keys, new.values, new.positions = self.keys.clone(), self.values.clone(), self.positions.clone()
        new._saved, new._undo = set(self._saved), list(self._undo)  # saved contents are only read
        return new

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


class KVCache:
    """Per-layer storage; `layers[i]` is None for KV-shared layers."""

    def __init__(self, config: TextConfig, batch: int, max_len: int, dtype, device, spare: int = 0):
        self.config = config
        self.max_len = max_len
        self._storage = None  # storage(): built on first use; False where the native step cannot write it
        self._first = 0  # the first position the current forward writes (`begin`)
        # what prompt caching compares before reusing a kept cache
        self.batch, self.dtype, self.device, self.spare = batch, dtype, device, spare
        self.layers: list[FullKV | SlidingKV | None] = []
        slot_positions = torch.arange(max_len, device=device)
        for spec in config.layers:
            if not spec.owns_kv:
                self.layers.append(None)
            elif spec.layer_type is LayerType.SLIDING:
                self.layers.append(SlidingKV(spec, batch, max_len, dtype, device, spare))
            else:
                self.layers.append(FullKV(spec, batch, max_len, dtype, device, slot_positions))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers if layer is not None)

    def begin(self, positions: list[int]) -> None:
        """Announce, as host ints, the positions this forward writes (consecutive). The layers then
        place their keys without reading a device tensor: on a GPU each such read waits for every
        queued kernel (a sync per layer and token)."""
        first = positions[0]
        if positions[-1] - first != len(positions) - 1:
            raise ValueError(f"a forward writes consecutive positions, not {positions[0]}..{positions[-1]} "
                             f"in {len(positions)} tokens")
        self._first = first

    def write(self, index: int, k, v, positions):
        """Layer `index` stores its new keys/values at the positions `begin` announced (`positions`:
        the same, on the device); returns what its queries attend over."""
        return self.layers[index].update(k, v, positions, self._first)

    def advance(self, position: int) -> tuple[list[int], list[int]]:
        """Book one decode token at `position` in every layer that stores keys and values (the
        native decode step writes them): per layer, its slot and the slots attention reads."""
        slots, lengths = [], []
        for layer in self.layers:
            slot, n = layer.advance(position) if layer is not None else (0, 0)
            slots.append(slot)
            lengths.append(n)
        return slots, lengths

    def storage(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None:
        """Per layer (keys, values, slot positions) for the native decode step, empty tensors for
        KV-shared layers (and empty keys on K=V layers); None where it cannot write this cache
        (batch > 1)."""
        if self._storage is None:
            empty = torch.empty(0)
            keys, values, positions = [], [], []
            for layer in self.layers:
                held = (empty, empty, empty) if layer is None else layer.storage()
                if layer is not None and held[1].shape[0] != 1:
                    self._storage = False
                    return None
                for out, t in zip((keys, values, positions), held):
                    out.append(t)
            self._storage = (keys, values, positions)
        return self._storage or None

    # Caches are filled in inference mode (their tensors may be inference tensors): they are cut
    # and resized in it too, whoever calls.
    @torch.inference_mode()
    def truncate(self, length: int) -> None:
        """Roll back to the first `length` positions (speculative tokens that were rejected, or a
        kept prompt's tail that the next prompt does not share)."""
        for layer in self.layers:
            if layer is not None:
                layer.truncate(length)

    @torch.inference_mode()
    def copy(self) -> KVCache:
        """An independent cache holding the same (a kept cache two prompts start from)."""
        new = copy.copy(self)
        new.layers = [None if layer is None else layer.copy() for layer in self.layers]
        new._storage = None
        return new

    def mark(self, end: int) -> None:
        """The first `end` positions are written (a prompt): from now on the sliding rings keep
        what a rewind to `end - spare` .. `end` needs (SlidingKV.mark)."""
        for layer in self.layers:
            if isinstance(layer, SlidingKV):
                layer.mark(end)

    def rolls_back_to(self, length: int) -> bool:
        """Whether `rewind(length)` leaves a cache that goes on exactly: each sliding ring still
        holds the window before `length` (a ring overwrites it once more than `spare` positions
        past it were written), or saved it since a mark at most `spare` positions after it."""
        # Every ring of one shape holds the same positions and marks: one answer each (each check
        # reads the device: ~200 waits on a 31B's GPU for four kept caches, now one or two).
        answers: dict[tuple[int, int], bool] = {}
        for layer in self.layers:
            if isinstance(layer, SlidingKV):
                key = (layer.size, layer.window)
                if key not in answers:
                    answers[key] = layer.can_rewind(length)
                if not answers[key]:
                    return False
        return True

    def rollback_point(self, length: int) -> int:
        """The longest prefix of at most `length` positions that `rewind` leaves going on exactly:
        `length`, else the marked prompt end below it (a next prompt parting from a long reply
        within its first tokens still reuses the prompt before it), else 0."""
        if self.rolls_back_to(length):
            return length
        marks = {layer.marked for layer in self.layers if isinstance(layer, SlidingKV)}
        mark = min((m for m in marks if m is not None), default=0)
        return mark if 0 < mark < length and self.rolls_back_to(mark) else 0

    @torch.inference_mode()
    def rewind(self, length: int) -> None:
        """Roll back to the first `length` positions as `rolls_back_to` allows (a kept cache cut
        to the prefix a new prompt shares)."""
        for layer in self.layers:
            if isinstance(layer, SlidingKV):
                layer.rewind(length)
            elif layer is not None:
                layer.truncate(length)

    @torch.inference_mode()
    def reserve(self, max_len: int) -> None:
        """Room for `max_len` positions, the held ones kept (a kept cache reused by a longer
        generation)."""
        if max_len > self.max_len:
            self._resize(max_len)

    @torch.inference_mode()
    def shrink(self, length: int) -> None:
        """Room for the first `length` positions only, later ones forgotten: full layers resized,
        rings as they are (a kept cache holds what it holds, not the generation's `max_len`)."""
        if length < self.max_len:
            self._resize(length)

    def _resize(self, max_len: int) -> None:
        slot_positions = torch.arange(max_len, device=self.device)
        for layer in self.layers:
            if isinstance(layer, FullKV):
                layer.resize(max_len, slot_positions)
            elif layer is not None and max_len > self.max_len:
                layer.reserve(max_len)
            elif layer is not None:
                layer.truncate(max_len)
        self.max_len = max_len
        self._storage = None  # the native step's views of the old buffers

    def cache_bytes_per_token(self) -> int:
        """Bytes one more token of context adds (full layers; sliding rings are fixed)."""
        elt = next(layer.values.element_size() for layer in self.layers if layer is not None)
        return kv_bytes_per_token(self.config, elt)


def kv_bytes_per_token(config: TextConfig, element_size: int) -> int:
    """Growth of the cache per token of context beyond the sliding window, in bytes."""
    total = 0
    for spec in config.layers:
        if spec.owns_kv and spec.layer_type is LayerType.FULL:
            total += spec.num_kv_heads * spec.head_dim * (1 if spec.k_eq_v else 2) * element_size
    return total


def kv_cache_bytes(config: TextConfig, context: int, element_size: int, batch: int = 1, spare: int = 0) -> int:
    """Bytes a cache for `context` tokens allocates: `KVCache(...).nbytes()` with `spare` ring slots."""
    total = 0
    for spec in config.layers:
        if not spec.owns_kv:
            continue
        per_pos = spec.num_kv_heads * spec.head_dim * element_size
        if spec.layer_type is LayerType.SLIDING:
            total += 2 * per_pos * min(spec.window + spare, context)
        else:
            total += (1 if spec.k_eq_v else 2) * per_pos * context
    return total * batch


def make_cache(config: TextConfig, max_len: int, *, batch: int = 1, dtype=torch.float32, device="cpu",
               spare: int = 0) -> KVCache:
    """`spare`: extra sliding-ring slots, at least the number of tokens that may be written and
    then rolled back with `truncate` (speculative decoding's draft length)."""
    return KVCache(config, batch, max_len, dtype, torch.device(device), spare)
