"""`gemmarun bench`: prefill and decode speed, time to first token, peak RSS, KV-cache bytes.

Results can be written to docs/benchmarks.md with the command, machine and date; a newer result
for the same setup (model + options) replaces the older one.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import make_cache
from .generate import prefill


@dataclass(frozen=True)
class BenchResult:
    prefill_tokens: int
    prefill_tok_s: float
    decode_tokens: int
    decode_tok_s: float
    ttft_s: float
    load_s: float
    peak_rss_mib: float
    kv_bytes: int


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.inference_mode()
def run_bench(llm, load_s: float, prompt_tokens: int = 512, decode_tokens: int = 128) -> BenchResult:
    model, cfg = llm.model, llm.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(cfg.vocab_size, 200_000), (prompt_tokens,), generator=g).to(model.device)
    max_len = prompt_tokens + decode_tokens + 1
    prefill(model, ids[:16], make_cache(cfg, max_len, dtype=model.dtype, device=model.device))  # warm-up
    cache = make_cache(cfg, max_len, dtype=model.dtype, device=model.device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache)
    t1 = time.perf_counter()
    token = int(torch.argmax(logits))
    t_first = time.perf_counter()
    pos = prompt_tokens
    for _ in range(decode_tokens):
        logits = model(torch.tensor([[token]], device=model.device), torch.tensor([pos], device=model.device),
                       cache, last_only=True)[0, -1]
        token = int(torch.argmax(logits))
        pos += 1
    t2 = time.perf_counter()
    return BenchResult(
        prefill_tokens=prompt_tokens, prefill_tok_s=prompt_tokens / (t1 - t0),
        decode_tokens=decode_tokens, decode_tok_s=decode_tokens / (t2 - t_first),
        ttft_s=t_first - t0, load_s=load_s, peak_rss_mib=peak_rss_mib(), kv_bytes=cache.nbytes(),
    )


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}"


def format_result(setup: str, command: str, r: BenchResult) -> str:
    date = datetime.date.today().isoformat()
    return "\n".join([
        f"### {setup}",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {date}",
        "",
        "| load | prefill (tok/s) | decode (tok/s) | time to first token | peak RSS | KV cache |",
        "|---|---|---|---|---|---|",
        f"| {r.load_s:.2f} s | {r.prefill_tok_s:.1f} ({r.prefill_tokens} tokens) | {r.decode_tok_s:.2f} "
        f"({r.decode_tokens} tokens) | {r.ttft_s:.2f} s | {r.peak_rss_mib:.0f} MiB | {r.kv_bytes / 2**20:.1f} MiB |",
        "",
    ])


def record(path: Path, setup: str, section: str) -> None:
    """Insert or replace the `### setup` section of the benchmarks file."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    marker = f"### {setup}\n"
    if marker in text:
        start = text.index(marker)
        end = text.find("\n### ", start + len(marker))
        text = text[:start] + section + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
