"""`gemmarun bench`: prefill and decode speed, time to first token, peak RSS, KV-cache bytes, and
the same workload through llama.cpp and transformers (`--compare`).

Every runtime runs in its own child process (`gemmarun.bench_worker`, or the torch-free
`bench_llama_cpp.py`), so each peak RSS is that runtime's own; rounds go round-robin over the
runtimes so a slow patch of a shared machine hits all of them alike, and the table shows medians.
Decode is also set against this machine's memory-bandwidth limit: the weight bytes one decode
token must read, divided into the measured read bandwidth. Results can be written to
docs/benchmarks.md; a newer result for the same setup replaces the older one.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bench_llama_cpp import peak_rss_mib  # torch-free: the llama.cpp worker script reads it too
from .cache import make_cache
from .config import ConfigError
from .generate import decode_step, prefill
from .machine import describe
from .outputs import replaced_target, write_replacing
from .sampling import greedy_token

RESULT_PREFIX = "gemmarun-bench-result "
NOT_INSTALLED = "not installed (pip install gemmarun[bench])"
SANITY_PROMPT = "The capital of France is"
SANITY_TOKENS = 8
WARMUP_TOKENS = 16
RANDOM_CACHE = Path.home() / ".cache" / "gemmarun" / "random"


class BenchError(ValueError):
    """A benchmark that cannot run as asked (bad option, a model it cannot describe)."""


class RuntimeFailed(BenchError):
    """One runtime's child process failed; the others still run."""


@dataclass(frozen=True)
class BenchResult:
    prefill_tokens: int
    prefill_tok_s: float
    decode_tokens: int
    decode_tok_s: float
    ttft_s: float
    load_s: float
    peak_rss_mib: float
    kv_bytes: int | None  # None where the runtime does not expose its cache
    first_ids: tuple[int, ...] = ()  # greedy continuation of the sanity prompt
    version: str = ""
    kernels: str = ""  # gemmarun on the CPU: whether its native kernels ran, else why not

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchResult:
        data = json.loads(text)
        data["first_ids"] = tuple(data.get("first_ids", ()))
        return cls(**data)


@dataclass(frozen=True)
class Workload:
    """What every runtime runs: the same token ids, counts, thread count and compute dtype."""

    model: str
    prompt_ids: tuple[int, ...]
    decode_tokens: int
    threads: int
    sanity_ids: tuple[int, ...]
    sanity_tokens: int = SANITY_TOKENS
    dtype: str = "auto"
    device: str = "cpu"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        data = json.loads(text)
        data["prompt_ids"] = tuple(data["prompt_ids"])
        data["sanity_ids"] = tuple(data["sanity_ids"])
        return cls(**data)


def random_prompt_ids(vocab_size: int, n: int) -> tuple[int, ...]:
    """Seeded ids above the specials (10) and below Gemma's 200k+ reserved/unused tail (any id of
    a test config's vocabulary of 10 or fewer)."""
    g = torch.Generator().manual_seed(0)
    low = 10 if vocab_size > 10 else 0
    return tuple(torch.randint(low, min(vocab_size, 200_000), (n,), generator=g).tolist())


# -- gemmarun's own run (in the worker process) ------------------------------------------------


@torch.inference_mode()
def greedy_ids(model, cfg, ids: Sequence[int], n: int) -> tuple[int, ...]:
    """n greedy tokens after `ids`, not stopping at EOS (the same rule every runtime follows)."""
    cache = make_cache(cfg, len(ids) + n + 1, dtype=model.dtype, device=model.device)
    logits = prefill(model, torch.tensor(list(ids), device=model.device), cache)
    out = []
    for pos in range(len(ids), len(ids) + n):
        out.append(greedy_token(logits))
        if len(out) < n:
            logits = decode_step(model, out[-1], pos, cache)
    return tuple(out)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_bench(llm, load_s: float, prompt_ids: Sequence[int], decode_tokens: int,
              sanity_ids: Sequence[int] = (), sanity_tokens: int = SANITY_TOKENS) -> BenchResult:
    model, cfg = llm.model, llm.config
    ids = torch.tensor(list(prompt_ids), device=model.device)
    n_prompt = ids.numel()
    max_len = n_prompt + decode_tokens + 1
    prefill(model, ids[:WARMUP_TOKENS], make_cache(cfg, max_len, dtype=model.dtype, device=model.device))
    cache = make_cache(cfg, max_len, dtype=model.dtype, device=model.device)
    _synchronize(model.device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache)
    _synchronize(model.device)  # a GPU may still be running the prefill's last kernels
    t1 = time.perf_counter()
    token = greedy_token(logits)
    t_first = time.perf_counter()
    for pos in range(n_prompt, n_prompt + decode_tokens):
        token = greedy_token(decode_step(model, token, pos, cache))
    t2 = time.perf_counter()
    rss = peak_rss_mib()
    from . import __version__
    from .native import kernel_status

    kernels = ""
    if model.device.type == "cpu":
        status = kernel_status()
        kernels = "in use" if status.startswith("built") else f"not in use, the portable path ran: {status}"
    return BenchResult(
        prefill_tokens=n_prompt, prefill_tok_s=n_prompt / (t1 - t0),
        decode_tokens=decode_tokens, decode_tok_s=decode_tokens / (t2 - t_first),
        ttft_s=t_first - t0, load_s=load_s, peak_rss_mib=rss, kv_bytes=cache.nbytes(),
        first_ids=greedy_ids(model, cfg, sanity_ids, sanity_tokens) if sanity_ids else (),
        version=f"gemmarun {__version__}", kernels=kernels,
    )


# -- the memory-bandwidth limit -----------------------------------------------------------------


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float
    buffer_bytes: int
    repeats: int
    threads: int

    def describe(self) -> str:
        return (f"{self.bytes_per_s / 1e9:.1f} GB/s (torch sum over a {self.buffer_bytes // 2**20} MiB buffer, "
                f"best of {self.repeats}, {self.threads} threads)")


def measure_read_bandwidth(threads: int, buffer_bytes: int = 512 * 2**20, repeats: int = 5) -> Bandwidth:
    """Best-of-N streaming read rate: a reduction over a buffer far larger than the last-level cache,
    so every byte comes from RAM, as decode's weights do."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(buffer_bytes // 4, dtype=torch.float32)  # ones() touches every page
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - t0)
        return Bandwidth(buffer.nbytes / best, buffer.nbytes, repeats, threads)
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class WeightTensor:
    name: str  # gemmarun's name (loading.names)
    nbytes: int  # as stored in the file: quantized bytes for GGUF
    rows: int


@dataclass(frozen=True)
class DecodeBytes:
    """Weight bytes one decode token reads."""

    body: int  # every layer's matmuls and norms (MoE experts: the active share), PLE projection, final norm
    head: int  # the output projection: the tied embedding table, read whole
    gathered: int  # one row of each gathered table (token embedding, PLE)

    @property
    def total(self) -> int:
        return self.body + self.head + self.gathered


def decode_read_bytes(tensors: Iterable[WeightTensor], top_k_experts: int = 0, num_experts: int = 0) -> DecodeBytes:
    body = head = gathered = 0
    for t in tensors:
        if t.name == "embed_tokens.weight":
            head += t.nbytes
            gathered += t.nbytes // t.rows
        elif t.name == "ple.table":
            gathered += t.nbytes // t.rows
        elif ".experts." in t.name:
            if not num_experts:
                raise BenchError(f"{t.name}: expert weights in a model whose config has no experts")
            body += t.nbytes * top_k_experts // num_experts
        else:
            body += t.nbytes
    return DecodeBytes(body, head, gathered)


# -- the model, described without loading it ---------------------------------------------------


@dataclass
class ModelFacts:
    path: Path
    config: object  # TextConfig
    tokenizer: object | None  # None when the file carries none (random-weights models)
    weights: list[WeightTensor] = field(default_factory=list)

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file()


def describe_model(path: Path) -> ModelFacts:
    from .config import ConfigError, load_hf_config
    from .loading.errors import LoadError
    from .tokenizer import Tokenizer

    if not path.exists():
        raise LoadError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            from .loading.names import map_hf_names
            from .loading.safetensors import read_folder

            cfg = load_hf_config(path)
            state, _ = map_hf_names(read_folder(path), cfg)
            weights = [WeightTensor(n, t.numel() * t.element_size(), t.shape[0] if t.dim() else 1)
                       for n, t in state.items()]
        else:
            from .loading.gguf import _KV_TENSOR, read_gguf_config
            from .loading.gguf_file import GGUFFile
            from .loading.names import gguf_to_gemmarun

            f = GGUFFile(path)
            cfg = read_gguf_config(f)
            weights = []
            for info in f.tensors.values():
                ours = gguf_to_gemmarun(info.name)
                kv = _KV_TENSOR.match(ours) if ours else None
                if ours is None or (kv and not cfg.layers[int(kv.group(1))].owns_kv):
                    continue  # not read by gemmarun (see load_gguf)
                weights.append(WeightTensor(ours, info.nbytes, info.shape[0] if info.shape else 1))
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    try:
        tokenizer = Tokenizer.from_hf_folder(path) if path.is_dir() else Tokenizer.from_gguf_metadata(f.metadata)
    except (ValueError, KeyError, OSError):
        tokenizer = None
    return ModelFacts(path, cfg, tokenizer, weights)


def random_weights_model(config: str, quant: str, cache_dir: Path | None = None, twin: bool = False) -> Path:
    """A random-weights GGUF for `config` (a released name like e2b or 26b-a4b, a config.json or its
    folder), written once into the cache and reused: speed does not depend on the weights' values.
    `twin`: the MoE config's dense active-parameter twin instead (what its MoE cost is held to)."""
    source = Path(config)
    if source.is_dir():
        source = source / "config.json"
    if source.suffix == ".json" or source.is_file():
        if not source.is_file():
            raise BenchError(f"--random-weights {config}: no such config file")
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:8]  # two configs never share a file
        stem = source.parent.name if source.name == "config.json" and source.parent.name else source.stem
        name = f"{stem}-{digest}"
    else:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", config).strip(".-")
        if not name:
            raise BenchError(f"--random-weights {config!r}: not a config name or a config.json path")
    if twin:
        name += "-twin"
    out = (RANDOM_CACHE if cache_dir is None else cache_dir) / f"{name}-{quant}.gguf"
    if out.exists():
        return out
    from .loading.random_weights import write_random_gguf

    print(f"writing random weights for {config}{' (dense twin)' if twin else ''} ({quant}) to {out}", file=sys.stderr)
    try:
        return Path(write_random_gguf(config, out, qtype=quant, seed=0, twin=twin))  # via a .partial file
    except ConfigError as e:
        raise BenchError(f"--random-weights {config}: {e}") from None


def sanity_ids(facts: ModelFacts, prompt_ids: Sequence[int]) -> tuple[int, ...]:
    """The sanity prompt's ids; the benchmark prompt's first 8 ids when the model has no tokenizer."""
    if facts.tokenizer is not None:
        try:
            ids = tuple(facts.tokenizer.encode(SANITY_PROMPT))
        except (ValueError, KeyError):
            ids = ()
        if len(ids) > 1:
            return ids
    return tuple(prompt_ids[:8])


# -- running runtimes in child processes --------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """A command that reads a Workload (JSON) on stdin and prints one RESULT_PREFIX line."""

    name: str
    argv: tuple[str, ...]
    requires: tuple[str, ...] = ()  # importable modules it needs
    gguf_only: bool = False

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


def gemmarun_runtime() -> Runtime:
    return Runtime("gemmarun", (sys.executable, "-m", "gemmarun.bench_worker", "gemmarun"))


def compare_runtimes() -> list[Runtime]:
    """gemmarun, llama.cpp (its worker imports no torch, so its RSS is llama.cpp's) and transformers."""
    llama_worker = Path(__file__).with_name("bench_llama_cpp.py")
    return [
        gemmarun_runtime(),
        Runtime("llama.cpp", (sys.executable, "-I", str(llama_worker)), ("llama_cpp",), gguf_only=True),  # -I: no package dir on sys.path
        Runtime("transformers", (sys.executable, "-m", "gemmarun.bench_worker", "transformers"),
                ("transformers", "accelerate")),
    ]


def signal_name(number: int) -> str:
    """'SIGILL (illegal instruction: built for a CPU feature this machine does not run)' and so on."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    why = {"SIGILL": "illegal instruction: built for a CPU feature this machine does not run",
           "SIGKILL": "out of memory, or killed by hand", "SIGSEGV": "segmentation fault"}.get(name)
    return f"{name} ({why})" if why else name


def run_worker(runtime: Runtime, workload: Workload, timeout_s: float = 3600) -> BenchResult:
    env = dict(os.environ, OMP_NUM_THREADS=str(workload.threads), MKL_NUM_THREADS=str(workload.threads))
    try:
        proc = subprocess.run(runtime.argv, input=workload.to_json(), capture_output=True, text=True,
                              timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeFailed(f"timed out after {timeout_s:.0f} s") from None
    except OSError as e:
        raise RuntimeFailed(f"could not start ({e})") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode < 0:  # killed: its last stderr line is whatever it logged before, not why,
        # unless it aborted on an assertion it logged (llama.cpp's GGML_ASSERT)
        said = [line.strip() for line in proc.stderr.splitlines() if re.search(r"assert|error", line, re.I)]
        raise RuntimeFailed(f"killed by {signal_name(-proc.returncode)}" + (f": {said[-1][:300]}" if said else ""))
    if proc.returncode != 0 or not lines:
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RuntimeFailed(errors[-1].strip() if errors else f"exit status {proc.returncode}, no result")
    try:
        return BenchResult.from_json(lines[-1][len(RESULT_PREFIX):])
    except (ValueError, TypeError) as e:
        raise RuntimeFailed(f"unreadable result ({e})") from None


@dataclass
class RuntimeRuns:
    name: str
    results: list[BenchResult] = field(default_factory=list)
    status: str = ""  # "" while it runs; else why it has no (more) results

    def median(self) -> BenchResult | None:
        if not self.results:
            return None
        rs = self.results
        kv = [r.kv_bytes for r in rs]
        return BenchResult(
            prefill_tokens=rs[0].prefill_tokens, decode_tokens=rs[0].decode_tokens,
            prefill_tok_s=statistics.median(r.prefill_tok_s for r in rs),
            decode_tok_s=statistics.median(r.decode_tok_s for r in rs),
            ttft_s=statistics.median(r.ttft_s for r in rs), load_s=statistics.median(r.load_s for r in rs),
            peak_rss_mib=statistics.median(r.peak_rss_mib for r in rs),
            kv_bytes=None if None in kv else int(statistics.median(kv)),
            first_ids=rs[0].first_ids, version=rs[0].version, kernels=rs[0].kernels,
        )


def run_rounds(workload: Workload, runtimes: Sequence[Runtime], rounds: int,
               progress: Callable[[str], None] = lambda line: None,
               worker: Callable[[Runtime, Workload], BenchResult] = run_worker) -> list[RuntimeRuns]:
    """Round-robin: round 1 runs every runtime once, then round 2 ..., each run a fresh process."""
    if rounds < 1:
        raise BenchError(f"--rounds must be at least 1, got {rounds}")
    runs = []
    for rt in runtimes:
        missing = rt.missing()
        if rt.gguf_only and Path(workload.model).is_dir():
            runs.append(RuntimeRuns(rt.name, status="not run: it reads GGUF files only"))
        else:
            runs.append(RuntimeRuns(rt.name, status=NOT_INSTALLED if missing else ""))
        if runs[-1].status:
            progress(f"{rt.name}: {runs[-1].status}" + (f" (no module {', '.join(missing)})" if missing else ""))
    for r in range(rounds):
        for rt, entry in zip(runtimes, runs):
            if entry.status:
                continue
            try:
                res = worker(rt, workload)
            except RuntimeFailed as e:
                entry.status = f"failed: {e}"
                progress(f"round {r + 1}/{rounds} {rt.name}: {entry.status}")
                continue
            entry.results.append(res)
            progress(f"round {r + 1}/{rounds} {rt.name}: prefill {res.prefill_tok_s:.1f} tok/s, "
                     f"decode {res.decode_tok_s:.2f} tok/s, peak RSS {res.peak_rss_mib:.0f} MiB")
    return runs


# -- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    setup: str
    command: str
    threads: int
    rounds: int
    workload: Workload
    runs: list[RuntimeRuns]
    bandwidth: Bandwidth | None = None
    decode_bytes: DecodeBytes | None = None
    tokenizer: object | None = None

    @property
    def decode_bound_tok_s(self) -> float | None:
        if self.bandwidth is None or not self.decode_bytes or not self.decode_bytes.total:
            return None
        return self.bandwidth.bytes_per_s / self.decode_bytes.total


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _percent(p: float) -> str:
    return f"{p:.1f}%" if p < 10 else f"{p:.0f}%"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def script_command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that ran a benchmark script of scripts/ (`script` its __file__), with the
    arguments its main got (`argv`, else the process's own)."""
    return shlex.join(["python", f"scripts/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def check_write_option(parser: argparse.ArgumentParser, write: str | None) -> None:
    """A benchmark script's `--write FILE`, checked as `record` will read it before the script
    measures anything (a bad target had been refused only after a minutes-long run)."""
    if write:
        try:
            read_record(Path(write))
        except ValueError as e:
            parser.error(f"--write {e}")


def section_head(setup: str, command: str, threads: int) -> list[str]:
    """The lines every recorded section starts with: its setup, then the command, the machine and
    the date it was measured with."""
    return [f"### {setup}", "", f"- command: `{command}`", f"- machine: {describe(threads)}",
            f"- date: {datetime.date.today().isoformat()}"]


def publish_script_section(script: str, argv: Sequence[str] | None, setup: str, threads: int,
                           lines: list[str], write: str | None) -> str:
    """A benchmark script's section (the common head, then `lines`), printed and, with `write`,
    recorded in that file; returned."""
    section = "\n".join([*section_head(setup, script_command(script, argv), threads), *lines])
    print(section)
    if write:
        record(Path(write), setup, section)
    return section


def format_report(rep: Report) -> str:
    w = rep.workload
    lines = [
        *section_head(rep.setup, rep.command, rep.threads),
        (f"- workload: {len(w.prompt_ids)} random prompt token ids (seed 0), {w.decode_tokens} greedy decode "
         f"tokens, {w.threads} threads; median of {rep.rounds} interleaved round{'s' * (rep.rounds != 1)}, "
         "each runtime in its own process"),
    ]
    bound = rep.decode_bound_tok_s
    if bound is not None:
        b = rep.decode_bytes
        lines.append(
            f"- memory read bandwidth {rep.bandwidth.describe()}; a decode token reads "
            f"{b.total / 1e6:.1f} MB of weights ({b.body / 1e6:.1f} MB layers, {b.head / 1e6:.1f} MB head, "
            f"{b.gathered / 1e3:.1f} kB gathered rows): decode bound {bound:.1f} tok/s")
    medians = {run.name: run.median() for run in rep.runs}
    if medians.get("gemmarun") is not None and medians["gemmarun"].kernels:
        lines.append(f"- gemmarun's native CPU kernels: {medians['gemmarun'].kernels}")
    lines += ["", ("| runtime | load | prefill (tok/s) | decode (tok/s) | decode / bound | time to first token "
                   "| peak RSS | KV cache |"), "|---|---|---|---|---|---|---|---|"]
    for run in rep.runs:
        m = medians[run.name]
        if m is None:
            lines.append(f"| {run.name} | {run.status} |  |  |  |  |  |  |")
            continue
        label = m.version or run.name
        if run.status:
            label += f" ({run.status} after {len(run.results)} rounds)"
        share = _percent(100 * m.decode_tok_s / bound) if bound else "n/a"
        lines.append(
            f"| {label} | {m.load_s:.2f} s | {m.prefill_tok_s:.1f} ({m.prefill_tokens} tokens) | "
            f"{m.decode_tok_s:.2f} ({m.decode_tokens} tokens) | {share} | {m.ttft_s:.2f} s | "
            f"{m.peak_rss_mib:.0f} MiB | {_mib(m.kv_bytes)} |")
    ours = medians.get("gemmarun")
    others = [(name, m) for name, m in medians.items() if name != "gemmarun" and m is not None]
    if ours is not None and others:
        lines += ["", "| gemmarun / other | prefill | decode | time to first token | peak RSS |",
                  "|---|---|---|---|---|"]
        for name, m in others:
            lines.append(f"| {name} | {_ratio(ours.prefill_tok_s, m.prefill_tok_s)} | "
                         f"{_ratio(ours.decode_tok_s, m.decode_tok_s)} | {_ratio(ours.ttft_s, m.ttft_s)} | "
                         f"{_ratio(ours.peak_rss_mib, m.peak_rss_mib)} |")
    sanity = [(name, m.first_ids) for name, m in medians.items() if m is not None and m.first_ids]
    if sanity:
        lines += ["", f"First greedy tokens after {sanity_prompt_label(rep)}:", ""]
        for name, ids in sanity:
            text = f" {rep.tokenizer.decode(ids)!r}" if rep.tokenizer is not None else ""
            lines.append(f"- {name}: {list(ids)}{text}{_agreement(ours, name, ids)}")
    return "\n".join(lines) + "\n"


def _agreement(ours: BenchResult | None, name: str, ids: tuple[int, ...]) -> str:
    if name == "gemmarun" or ours is None or not ours.first_ids:
        return ""
    same = next((i for i, (a, b) in enumerate(zip(ours.first_ids, ids)) if a != b), None)
    return " (same as gemmarun)" if same is None else f" (differs from gemmarun from token {same + 1})"


def sanity_prompt_label(rep: Report) -> str:
    return repr(SANITY_PROMPT) if rep.tokenizer is not None else f"the ids {list(rep.workload.sanity_ids)}"


_HEADING = re.compile(r"^#{1,3} ", re.MULTILINE)
_FENCE_LINE = re.compile(r"^[ \t]*(```|~~~)", re.MULTILINE)
SECTION_END = "<!-- end of a gemmarun bench section -->"


def _outside_fences(text: str, matches: Iterable[re.Match]) -> list[re.Match]:
    """The matches that are not inside a fenced code block (an example heading is no heading)."""
    fences = [m.start() for m in _FENCE_LINE.finditer(text)]
    return [m for m in matches if sum(f < m.start() for f in fences) % 2 == 0]


def record(path: Path, setup: str, section: str) -> None:
    """Insert or replace the `### setup` section of the benchmarks file. A section ends at its
    SECTION_END mark (older ones at the next heading of level 1-3), so prose written after it and
    the `##` part after it stay; a new setup goes after the last recorded section. The file is
    replaced whole, never left half written."""
    text = read_record(path)
    section = section.rstrip("\n") + "\n" + SECTION_END + "\n"
    headings = _outside_fences(text, re.finditer(rf"^### {re.escape(setup)}[ \t]*$", text, re.MULTILINE))
    if headings:
        at = headings[0].start()
        mark = text.find(SECTION_END, at)
        following = next(iter(_outside_fences(text, _HEADING.finditer(text, headings[0].end()))), None)
        if mark >= 0 and (following is None or mark < following.start()):
            end = mark + len(SECTION_END) + (text[mark + len(SECTION_END):].startswith("\n"))
            text = text[:at] + section + text[end:]
        else:
            rest = text[following.start():] if following else ""
            text = text[:at] + section + ("\n" + rest if rest else "")
    elif (last := text.rfind(SECTION_END)) >= 0:
        end = last + len(SECTION_END) + 1
        text = text[:end] + "\n" + section + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_replacing(path, text.encode("utf-8"))


def read_record(path: Path) -> str:
    """The markdown file `record` adds a section to ("# Benchmarks" when new or empty); a
    ValueError naming it when it is no such file: a folder, a device, not UTF-8 text, or not
    markdown (`--write config.json` had appended a table to a model's config)."""
    target = replaced_target(path)
    if target.suffix.lower() not in (".md", ".markdown"):
        raise ValueError(f"{path}: not a markdown file (.md): the benchmark tables go into one")
    try:
        text = target.read_text(encoding="utf-8") if target.exists() else ""
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    return text if text.strip() else "# Benchmarks\n\n"
