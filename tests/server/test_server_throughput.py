"""Aggregate decode throughput of the server on the real Gemma 3 270M: 8 concurrent clients
against 1. Continuous batching must make the 8 together clearly faster (1.3x) than one alone.

Run directly to print the numbers:  python tests/server/test_server_throughput.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

TOKENS = 64


async def _one(client, i: int) -> int:
    r = await client.completions.create(model="m", prompt=f"Story number {i}: Once upon a time,", max_tokens=TOKENS,
                                        temperature=0, extra_body={"ignore_eos": True})
    return r.usage.completion_tokens


async def _measure(url: str, clients: int) -> tuple[float, int]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(_one(client, i) for i in range(clients))))
    seconds = time.perf_counter() - t0
    await client.close()
    return tokens / seconds, tokens


def measure(llm, counts=(1, 8), rounds: int = 2) -> dict[int, float]:
    """Best aggregate rate per client count over `rounds` alternating rounds (shared cores make
    single runs noisy)."""
    from serverkit import running

    from gemmarun.server import ServerOptions, create_app

    with running(create_app(llm, ServerOptions(max_batch=max(counts)))) as r:
        asyncio.run(_measure(r.url, 1))  # warm-up
        rates = dict.fromkeys(counts, 0.0)
        for _ in range(rounds):
            for n in counts:
                rate, tokens = asyncio.run(_measure(r.url, n))
                assert tokens == n * TOKENS
                rates[n] = max(rates[n], rate)
    return rates


def report(rates: dict[int, float]) -> str:
    base = rates[min(rates)]
    return "\n".join(f"{n} client(s): {rate:6.1f} tokens/s aggregate ({rate / base:.2f}x)" for n, rate in rates.items())


@pytest.mark.slow
def test_eight_clients_beat_one(capsys):
    import gemmarun

    llm = gemmarun.load(None, dtype="float32", device="cpu")
    rates = measure(llm)
    with capsys.disabled():
        print(f"\nserver throughput, embedded Gemma 3 270M Q4_K_M, {TOKENS} tokens per client, greedy, "
              "best of 2:\n"
              + report(rates))
    # One client alone got ~4x faster with the native decode kernel (it reads each weight once a
    # token either way), and faster again once a lone request took the native whole-token step
    # (batching.BatchEngine._decode_alone): there the 270M's weights can stay in this machine's
    # 300 MiB L3, while eight rows are compute-bound (int16 activations). Measured here: 1.49x-1.96x
    # by the hour (the lone client at 65-103 tok/s, eight at 122-154), 1.9x-2.1x before the
    # whole-token step. 1.3x still fails an engine that decodes its requests one after another.
    assert rates[8] > 1.3 * rates[1]


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
    import torch

    import gemmarun

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    print(report(measure(gemmarun.load(None, dtype="float32", device="cpu"), (1, 2, 4, 8))))
