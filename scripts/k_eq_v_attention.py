"""Time one decode query's attention on a K=V full layer of a released config, long caches.

A K=V layer stores values only (half the KV cache) and its keys are RoPE(values * w_k). This
compares making those keys as a [kv, S, D] tensor every step (cos/sin for every position, then the
one-query kernel) with the kernel that makes each key row from its value row as it goes
(`attend_one_values_as_keys`), on the layer's real shapes with random values; both give the same
attention (checked here too).

    python scripts/k_eq_v_attention.py                 # 26B-A4B, 1k/4k/16k keys, 2 threads
    python scripts/k_eq_v_attention.py 31b 1024 8192
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from gemmarun.loading.random_weights import resolve_config
from gemmarun.model.attention import Attention
from gemmarun.model.text import rotary_tables


def median_ms(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", default="26b-a4b", help="a released config (default %(default)s)")
    parser.add_argument("lengths", nargs="*", type=int, default=[1024, 4096, 16384],
                        help="cache lengths in keys (default 1024 4096 16384)")
    args = parser.parse_args(argv)
    name, lengths = args.name, args.lengths
    torch.set_num_threads(2)
    cfg, _ = resolve_config(name)
    full = [s for s in cfg.layers if s.owns_kv and s.k_eq_v]
    if not full:
        raise SystemExit(f"{name} has no K=V layers")
    spec = full[0]
    g = torch.Generator().manual_seed(0)
    attn = Attention(cfg, spec)
    attn.k_norm.weight.data = 1 + 0.1 * torch.randn(spec.head_dim, generator=g)
    rotary = rotary_tables(cfg.layers)[spec.layer_type.value]
    print(f"{name}: {len(full)} K=V layers, {cfg.num_heads} query heads, {spec.num_kv_heads} KV heads, "
          f"head dim {spec.head_dim}, {torch.get_num_threads()} threads")
    for n in lengths:
        values = torch.randn(1, spec.num_kv_heads, n, spec.head_dim, generator=g)
        key_pos = torch.arange(n)
        q = torch.randn(1, cfg.num_heads, 1, spec.head_dim, generator=g)

        def materialized():
            return attn._attend_one(q, attn.keys_from_values(values, key_pos, rotary), values, key_pos, n - 1)

        def row_by_row():
            return attn._attend_one_values_as_keys(q, values, key_pos, rotary, n - 1)

        torch.testing.assert_close(row_by_row(), materialized(), rtol=1e-4, atol=1e-5)
        a, b = median_ms(materialized), median_ms(row_by_row)
        print(f"{n:>6} keys: keys as a tensor {a:7.2f} ms a layer, row by row {b:6.2f} ms; "
              f"{len(full)} layers: {a * len(full):6.1f} -> {b * len(full):5.1f} ms a token")


if __name__ == "__main__":
    main(sys.argv[1:])
