"""The KV cache places keys by host positions: on a GPU, reading a device tensor's value waits for
every queued kernel, and a cache that did so in each layer made a sync per layer and token."""

import pytest
import torch
from reference_models import WINDOW, config_dict
from torch.overrides import TorchFunctionMode

from gemmarun.cache import FullKV, SlidingKV, make_cache
from gemmarun.config import text_config_from_hf

HOST_READS = {"__int__", "__index__", "__bool__", "__float__", "item", "tolist"}


class NoHostReads(TorchFunctionMode):
    """Fails any read of a tensor's value into Python."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            raise AssertionError(f"the cache read a tensor on the host ({func.__name__})")
        return func(*args, **(kwargs or {}))


def _kv(spec, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, spec.num_kv_heads, n, spec.head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("family", ["31b", "e2b"])  # K=V full layers; full layers with keys
def test_writes_read_no_tensor_on_the_host_and_land_at_their_positions(family):
    cfg = text_config_from_hf(config_dict(family))
    cache = make_cache(cfg, 4 * WINDOW)
    written: dict[int, list[torch.Tensor]] = {}
    chunks = [range(0, WINDOW + 2), range(WINDOW + 2, WINDOW + 3), range(WINDOW + 3, WINDOW + 4)]
    for step, span in enumerate(chunks):  # a prefill chunk past the window, then two decode tokens
        positions = torch.tensor(list(span))
        cache.begin(list(span))
        for spec in cfg.layers:
            if not spec.owns_kv:
                continue
            k, v = _kv(spec, len(span), seed=100 * step + spec.index)
            with NoHostReads():
                keys, values, key_pos = cache.write(spec.index, k, v, positions)
            written.setdefault(spec.index, []).append(v)
            # every position of this forward is visible to it, its values as written
            seen = {int(p): i for i, p in enumerate(key_pos) if p >= 0}
            for j, p in enumerate(span):
                assert torch.equal(values[0, :, seen[p]], v[0, :, j])
                if keys is not None:
                    assert torch.equal(keys[0, :, seen[p]], k[0, :, j])
    end = chunks[-1][-1] + 1
    for spec in cfg.layers:
        if not spec.owns_kv:
            continue
        layer = cache.layers[spec.index]
        every = torch.cat(written[spec.index], dim=2)  # values of positions 0..end-1
        if isinstance(layer, FullKV):
            assert layer.end == end and torch.equal(layer.values[:, :, :end], every)
        else:
            assert isinstance(layer, SlidingKV)
            held = sorted(int(p) for p in layer.positions if p >= 0)
            assert held == list(range(end - layer.size, end))  # the ring keeps the last `size` positions
            for slot, p in enumerate(layer.positions.tolist()):
                assert torch.equal(layer.values[:, :, slot], every[:, :, p])


def test_a_forward_writes_consecutive_positions():
    cache = make_cache(text_config_from_hf(config_dict("gemma3")), 32)
    with pytest.raises(ValueError, match="consecutive positions"):
        cache.begin([3, 5])
    with pytest.raises(ValueError, match="past the cache length 32"):
        cache.begin([31, 32])
        spec = next(s for s in cache.config.layers if s.owns_kv and s.window is None)
        cache.write(spec.index, *_kv(spec, 2, 0), torch.tensor([31, 32]))


def _fill(cache, first: int, n: int, tag: float) -> None:
    """Write positions first..first+n-1 in one forward: every value is its position + `tag`."""
    span = list(range(first, first + n))
    cache.begin(span)
    positions = torch.tensor(span)
    for spec in cache.config.layers:
        if spec.owns_kv:
            kv = positions.float().view(1, 1, n, 1).expand(1, spec.num_kv_heads, n, spec.head_dim) + tag
            cache.write(spec.index, kv.clone(), kv.clone(), positions)


def _holds(cache, length: int, tag: float) -> bool:
    """Every ring holds the window before `length` with the values written for it."""
    for layer in cache.layers:
        if isinstance(layer, SlidingKV):
            for p in range(max(0, length - layer.window), length):
                slot = p % layer.size
                if int(layer.positions[slot]) != p or float(layer.values[0, 0, slot, 0]) != p + tag:
                    return False
    return True


@pytest.mark.parametrize("chunk", [1, 3, 8, 16])  # up to longer than the ring (4 + 2 slots)
def test_a_marked_ring_rewinds_to_before_its_mark_whatever_was_written_after(chunk):
    cache = make_cache(text_config_from_hf(config_dict("e2b")), 64, spare=2)
    with torch.inference_mode():
        _fill(cache, 0, 10, 0.0)  # a prompt of 10: the ring holds 4..9
        cache.mark(10)
        end = 10
        while end < 30:  # a reply: chunks of `chunk`, all past the mark
            _fill(cache, end, chunk, 0.5)
            end += chunk
        for length in (10, 9, 8):  # within the spare slots of the mark
            assert cache.rolls_back_to(length)
        assert not cache.rolls_back_to(7)
        cache.rewind(8)
        assert _holds(cache, 8, 0.0)


def test_a_truncation_below_the_mark_ends_it():
    """Rewritten below the mark, the saved slots would bring back the old values."""
    cache = make_cache(text_config_from_hf(config_dict("e2b")), 64, spare=2)
    with torch.inference_mode():
        _fill(cache, 0, 10, 0.0)
        cache.mark(10)
        _fill(cache, 10, 12, 0.5)
        cache.truncate(9)
        _fill(cache, 9, 12, 0.25)
        assert not cache.rolls_back_to(9)
