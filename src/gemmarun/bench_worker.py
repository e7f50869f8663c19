"""Child process of `gemmarun bench`: one run of a workload by gemmarun or by transformers.

`python -m gemmarun.bench_worker gemmarun|transformers` reads a `Workload` as JSON on stdin and
prints one `RESULT_PREFIX` line. One process per run keeps each runtime's peak RSS its own.
(llama.cpp's worker is the torch-free bench_llama_cpp.py.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .bench import RESULT_PREFIX, WARMUP_TOKENS, BenchResult, Workload, peak_rss_mib, run_bench


def run_gemmarun(w: Workload) -> BenchResult:
    from .loading import load

    t0 = time.perf_counter()
    llm = load(w.model, dtype=w.dtype, device=w.device)
    load_s = time.perf_counter() - t0
    return run_bench(llm, load_s, w.prompt_ids, w.decode_tokens, w.sanity_ids, w.sanity_tokens)


def _cache_bytes(cache) -> int | None:
    """Bytes held by a transformers Cache (its layers' keys and values), None if unreadable."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def _transformers_greedy(model, ids, n: int) -> tuple[list[int], object]:
    out = model(torch.tensor([list(ids)], device=model.device), use_cache=True, logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    cache = out.past_key_values
    while len(tokens) < n:
        out = model(torch.tensor([[tokens[-1]]], device=model.device), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, cache


@torch.inference_mode()
def run_transformers(w: Workload) -> BenchResult:
    """The GGUF through transformers (dequantized to the compute dtype on load)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from .loading import resolve_device, resolve_dtype

    device = resolve_device(w.device)
    path = Path(w.model)
    t0 = time.perf_counter()
    if path.is_file():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=resolve_dtype(w.dtype, device))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(w.dtype, device))
    model = model.to(device).eval()
    load_s = time.perf_counter() - t0
    _transformers_greedy(model, w.prompt_ids[:WARMUP_TOKENS], 1)
    ids = torch.tensor([list(w.prompt_ids)], device=device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    token = int(out.logits[0, -1].argmax())
    t_first = time.perf_counter()
    cache = out.past_key_values
    for _ in range(w.decode_tokens):
        out = model(torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = int(out.logits[0, -1].argmax())
    t2 = time.perf_counter()
    rss = peak_rss_mib()
    kv = _cache_bytes(cache)
    del cache, out
    first = tuple(_transformers_greedy(model, w.sanity_ids, w.sanity_tokens)[0]) if w.sanity_ids else ()
    n = len(w.prompt_ids)
    return BenchResult(
        prefill_tokens=n, prefill_tok_s=n / (t1 - t0), decode_tokens=w.decode_tokens,
        decode_tok_s=w.decode_tokens / (t2 - t_first), ttft_s=t_first - t0, load_s=load_s,
        peak_rss_mib=rss, kv_bytes=kv, first_ids=first, version=f"transformers {transformers.__version__}",
    )


RUNNERS = {"gemmarun": run_gemmarun, "transformers": run_transformers}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in RUNNERS:
        print(f"usage: python -m gemmarun.bench_worker {'|'.join(RUNNERS)} < workload.json", file=sys.stderr)
        return 2
    try:
        workload = Workload.from_json(sys.stdin.read())
    except (ValueError, TypeError, KeyError) as e:
        print(f"bench worker: unreadable workload ({e})", file=sys.stderr)
        return 2
    torch.set_num_threads(workload.threads)
    try:
        result = RUNNERS[argv[0]](workload)
    except Exception as e:  # noqa: BLE001 - any failure is this runtime's one-line report to the parent
        message = " ".join(str(e).split())[:500]  # the whole reason on one line (pydantic's is on its second)
        print(f"{type(e).__name__}: {message}", file=sys.stderr)
        return 1
    print(RESULT_PREFIX + result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
