"""Child process of `gemmarun bench --compare`: the workload through llama.cpp (llama-cpp-python).

Run as a script (`python bench_llama_cpp.py < workload.json`), not as part of the package, so it
imports neither torch nor gemmarun: its peak RSS is llama.cpp's own. It uses llama.cpp's low-level
API: the prompt is one llama_decode of all its tokens (n_batch = n_ubatch = prompt length, at
least 512) with logits for the last one only, then one llama_decode per token with llama.cpp's
greedy sampler. It prints one line `gemmarun-bench-result {json}` with bench.BenchResult's fields.
"""

from __future__ import annotations

import ctypes
import json
import resource
import sys
import time

RESULT_PREFIX = "gemmarun-bench-result "  # bench.RESULT_PREFIX (not imported: that would load torch)
WARMUP_TOKENS = 16  # bench.WARMUP_TOKENS
GGML_LOG_LEVEL_ERROR = 4


class LlamaError(RuntimeError):
    pass


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM, where there is one: ru_maxrss carries
    over the RSS of the parent at fork time through exec, so a worker started by a big parent
    reported the parent's peak (18 GiB for a 0.5 GiB run after writing a 4.5 GB checkpoint)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    try:
        import llama_cpp as ll
    except ImportError as e:
        print(f"llama-cpp-python is not installed ({e})", file=sys.stderr)
        return 1
    errors: list[str] = []

    @ll.llama_log_callback
    def on_log(level, text, _user):  # keep errors for the one-line report, drop the chatter
        if level == GGML_LOG_LEVEL_ERROR and text:
            errors.append(text.decode("utf-8", "replace").strip())

    ll.llama_log_set(on_log, ctypes.c_void_p())
    try:
        w = json.loads(sys.stdin.read())
        result = run(ll, w)
    except (LlamaError, ValueError, KeyError, OSError) as e:
        detail = f" ({errors[-1]})" if errors else ""
        print(f"{type(e).__name__}: {e}{detail}", file=sys.stderr)
        return 1
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


class Session:
    """One model, one context, one sequence, one reusable batch."""

    def __init__(self, ll, model_path: str, n_ctx: int, n_batch: int, threads: int):
        self.ll = ll
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(model_path.encode(), mparams)
        if not self.model:
            raise LlamaError(f"llama.cpp could not load {model_path}")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise LlamaError("llama.cpp could not create a context")
        self.batch = ll.llama_batch_init(n_batch, 0, 1)
        self.sampler = ll.llama_sampler_init_greedy()

    def clear(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def eval(self, tokens: list[int], start: int) -> int:
        """Decode `tokens` at positions start.., logits for the last only; return the greedy next token."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i == len(tokens) - 1
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise LlamaError(f"llama_decode returned {rc}")
        return int(self.ll.llama_sampler_sample(self.sampler, self.ctx, -1))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.clear()
        out = [self.eval(ids, 0)]
        while len(out) < n:
            out.append(self.eval([out[-1]], len(ids) + len(out) - 1))
        return out


def run(ll, w: dict) -> dict:
    prompt = [int(t) for t in w["prompt_ids"]]
    sanity = [int(t) for t in w["sanity_ids"]]
    n_decode = int(w["decode_tokens"])
    n_ctx = max(len(prompt) + n_decode, len(sanity) + int(w["sanity_tokens"])) + 16
    n_batch = max(512, len(prompt), len(sanity))
    t0 = time.perf_counter()
    s = Session(ll, w["model"], n_ctx, n_batch, int(w["threads"]))
    load_s = time.perf_counter() - t0
    s.eval(prompt[:WARMUP_TOKENS], 0)
    s.clear()
    t0 = time.perf_counter()
    token = s.eval(prompt, 0)
    t_first = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + n_decode):
        token = s.eval([token], pos)
    t2 = time.perf_counter()
    rss = peak_rss_mib()
    first = s.greedy(sanity, int(w["sanity_tokens"])) if sanity else []
    # prefill is timed to the sampled first token, which llama.cpp computes inside the same calls
    return {
        "prefill_tokens": len(prompt), "prefill_tok_s": len(prompt) / (t_first - t0), "decode_tokens": n_decode,
        "decode_tok_s": n_decode / (t2 - t_first), "ttft_s": t_first - t0, "load_s": load_s,
        "peak_rss_mib": rss, "kv_bytes": None, "first_ids": first, "version": f"llama-cpp-python {ll.__version__}",
    }


if __name__ == "__main__":
    sys.exit(main())
