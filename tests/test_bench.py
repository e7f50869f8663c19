"""`gemmarun bench`: the compare driver (child processes, interleaved rounds, medians, ratios),
missing and failing runtimes, `record`, the memory-bandwidth bound, threads, --random-weights."""

import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gemmarun import bench
from gemmarun.bench import (
    NOT_INSTALLED,
    Bandwidth,
    BenchResult,
    DecodeBytes,
    Report,
    Runtime,
    RuntimeRuns,
    WeightTensor,
    Workload,
)
from gemmarun.cli import main
from gemmarun.loading.convert import convert
from gemmarun.loading.gguf_file import GGUFFile
from gemmarun.machine import physical_cores


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    def get(family):
        out = tmp_path_factory.getbasetemp() / f"bench-{family}.gguf"
        if not out.exists():
            folder, _ = tiny_models(family)
            convert(folder, out, "q8_0", progress=False)
        return out

    return get


def _workload(model: Path, prompt: int = 8, decode: int = 2) -> Workload:
    return Workload(str(model), bench.random_prompt_ids(256, prompt), decode, threads=1, sanity_ids=(2, 40, 50),
                    sanity_tokens=3)


def _result(prefill: float, decode: float, ttft: float = 0.5, rss: float = 100.0, **kw) -> BenchResult:
    fields = {"prefill_tokens": 8, "prefill_tok_s": prefill, "decode_tokens": 2, "decode_tok_s": decode,
              "ttft_s": ttft, "load_s": 1.0, "peak_rss_mib": rss, "kv_bytes": 2048}
    return BenchResult(**{**fields, **kw})


# A stand-in runtime: a child process that answers with a prefill speed that changes each round
# (10 then 30: median 20), counting its runs in a file next to the model.
FAKE_RUNTIME = """
import json, sys
from pathlib import Path
w = json.loads(sys.stdin.read())
counter = Path(w["model"]).with_suffix(".fake-runs")
n = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(n + 1))
print("noise on stdout")
print("gemmarun-bench-result " + json.dumps(dict(
    prefill_tokens=len(w["prompt_ids"]), prefill_tok_s=[10.0, 30.0][n], decode_tokens=w["decode_tokens"],
    decode_tok_s=[4.0, 1.0][n], ttft_s=1.0, load_s=0.1, peak_rss_mib=50.0 + 2 * n, kv_bytes=None,
    first_ids=w["sanity_ids"][:1] * w["sanity_tokens"], version="fake 1.0")))
"""


def test_compare_driver_runs_real_gemmarun_and_a_fake_runtime_interleaved(tiny_gguf, tmp_path):
    model = tmp_path / "tiny.gguf"
    model.symlink_to(tiny_gguf("gemma3"))
    runtimes = [bench.gemmarun_runtime(), Runtime("fake", (sys.executable, "-c", FAKE_RUNTIME)),
                Runtime("absent", (sys.executable, "-c", "raise SystemExit(3)"), ("no_such_module_gemmarun_bench",))]
    order = []
    runs = bench.run_rounds(_workload(model), runtimes, rounds=2, progress=order.append)
    ours, fake, absent = runs
    assert [line.split(":")[0] for line in order] == [
        "absent", "round 1/2 gemmarun", "round 1/2 fake", "round 2/2 gemmarun", "round 2/2 fake"]
    assert len(ours.results) == 2 and ours.status == ""
    r = ours.results[0]
    assert r.prefill_tokens == 8 and r.decode_tokens == 2 and r.prefill_tok_s > 0 and r.decode_tok_s > 0
    assert r.kv_bytes > 0 and r.peak_rss_mib > 50 and len(r.first_ids) == 3 and r.version.startswith("gemmarun")
    assert len({res.first_ids for res in ours.results}) == 1  # greedy: every round agrees
    m = fake.median()
    assert (m.prefill_tok_s, m.decode_tok_s, m.peak_rss_mib, m.kv_bytes) == (20.0, 2.5, 51.0, None)
    assert absent.results == [] and absent.status == NOT_INSTALLED

    table = bench.format_report(Report("tiny", "gemmarun bench x", 1, 2, _workload(model), runs))
    assert f"| absent | {NOT_INSTALLED} |" in table
    assert "| fake 1.0 | 0.10 s | 20.0 (8 tokens) | 2.50 (2 tokens) | n/a | 1.00 s | 51 MiB | n/a |" in table
    ours_m = ours.median()
    ratio_row = (f"| fake | {ours_m.prefill_tok_s / 20:.2f}x | {ours_m.decode_tok_s / 2.5:.2f}x | "
                 f"{ours_m.ttft_s / 1:.2f}x | {ours_m.peak_rss_mib / 51:.2f}x |")
    assert ratio_row in table
    assert f"- gemmarun: {list(r.first_ids)}\n" in table and "- fake: [2, 2, 2] (" in table


def test_a_failing_runtime_is_reported_and_the_others_still_run():
    fail = "import sys; print('gemmarun: boom', file=sys.stderr); sys.exit(1)"
    runtimes = [Runtime("broken", (sys.executable, "-c", fail)),
                Runtime("fake", (sys.executable, "-c", "print('no result line')")),
                Runtime("ok", ("unused",))]

    def worker(rt, w):
        return _result(5.0, 1.0) if rt.name == "ok" else bench.run_worker(rt, w)

    runs = bench.run_rounds(_workload(Path("/nonexistent.gguf")), runtimes, rounds=2, worker=worker)
    folder_only = bench.run_rounds(_workload(Path("/")), [Runtime("gguf", ("x",), gguf_only=True)], 1, worker=worker)
    assert folder_only[0].status == "not run: it reads GGUF files only" and folder_only[0].results == []
    assert runs[0].status == "failed: gemmarun: boom" and runs[0].results == []
    assert runs[1].status.startswith("failed: exit status 0, no result")
    assert len(runs[2].results) == 2
    table = bench.format_report(Report("s", "c", 1, 2, _workload(Path("m")), runs))
    assert "| broken | failed: gemmarun: boom |" in table


def test_a_runtime_killed_by_a_signal_says_which():
    # what a llama.cpp built for a CPU feature the machine cannot run does (SIGILL after logging)
    crash = "import os, sys; print('llama: loading', file=sys.stderr); sys.stderr.flush(); os.kill(os.getpid(), 4)"
    with pytest.raises(bench.RuntimeFailed) as e:
        bench.run_worker(Runtime("crash", (sys.executable, "-c", crash)), _workload(Path("m.gguf")))
    assert str(e.value).startswith("killed by SIGILL (illegal instruction")
    assert bench.signal_name(9).startswith("SIGKILL") and bench.signal_name(1000) == "signal 1000"
    # an abort on a logged assertion keeps the assertion (it is the reason)
    abort = ("import os, sys; print('ggml.c:123: GGML_ASSERT(n <= 512) failed', file=sys.stderr); "
             "print('stack: ...', file=sys.stderr); sys.stderr.flush(); os.abort()")
    with pytest.raises(bench.RuntimeFailed) as e:
        bench.run_worker(Runtime("abort", (sys.executable, "-c", abort)), _workload(Path("m.gguf")))
    assert str(e.value) == "killed by SIGABRT: ggml.c:123: GGML_ASSERT(n <= 512) failed"


def test_medians_and_ratios_arithmetic():
    ours = RuntimeRuns("gemmarun", [_result(100, 10, rss=300, first_ids=(5, 6, 7)), _result(300, 30, rss=100),
                                    _result(200, 20, rss=200)])
    other = RuntimeRuns("llama.cpp", [_result(400, 5, ttft=0.25, rss=400, kv_bytes=None, version="llama x",
                                              first_ids=(5, 6, 7))])
    third = RuntimeRuns("transformers", [_result(1, 1, first_ids=(5, 9, 7))])
    bound = Report("s", "c", 2, 3, _workload(Path("m")), [ours, other, third],
                   Bandwidth(8e9, 2**29, 5, 2), DecodeBytes(body=100_000_000, head=60_000_000, gathered=1000))
    assert bound.decode_bound_tok_s == pytest.approx(8e9 / 160_001_000)
    table = bench.format_report(bound)
    assert "| gemmarun / other | prefill | decode | time to first token | peak RSS |" in table
    assert "| llama.cpp | 0.50x | 4.00x | 2.00x | 0.50x |" in table
    share = 100 * 20 / (8e9 / 160_001_000)
    assert f"| 20.00 (2 tokens) | {share:.0f}% |" in table
    assert "decode bound 50.0 tok/s" in table and "160.0 MB of weights" in table
    assert "| llama x | 1.00 s | 400.0 (8 tokens) |" in table and "| n/a |\n" in table
    assert "the ids [2, 40, 50]" in table  # no tokenizer: the sanity prompt is shown as ids
    assert "- gemmarun: [5, 6, 7]\n" in table and "- llama.cpp: [5, 6, 7] (same as gemmarun)" in table
    assert "- transformers: [5, 9, 7] (differs from gemmarun from token 2)" in table


def test_decode_bytes_on_a_hand_made_model():
    """Layers read whole, experts at the active share, the tied head whole, gathered tables one row."""
    tensors = [
        WeightTensor("embed_tokens.weight", 1000 * 64, 1000),  # tied head + one gathered row of 64 B
        WeightTensor("ple.table", 1000 * 32, 1000),  # one row of 32 B
        WeightTensor("ple.per_layer_model_projection.weight", 500, 16),
        WeightTensor("layers.0.self_attn.q_proj.weight", 4000, 64),
        WeightTensor("layers.0.input_layernorm.weight", 256, 64),
        WeightTensor("layers.0.experts.gate_up_proj", 8 * 1000, 8),  # 2 of 8 experts active
        WeightTensor("layers.0.experts.down_proj", 8 * 500, 8),
        WeightTensor("norm.weight", 256, 64),
    ]
    b = bench.decode_read_bytes(tensors, top_k_experts=2, num_experts=8)
    assert b == DecodeBytes(body=500 + 4000 + 256 + 2000 + 1000 + 256, head=64_000, gathered=64 + 32)
    assert b.total == 72_108
    with pytest.raises(bench.BenchError, match="no experts"):
        bench.decode_read_bytes(tensors)


def test_decode_bytes_of_a_gguf_are_its_quantized_tensor_bytes(tiny_gguf):
    """On a tiny MoE GGUF: every tensor but the table counted from the file, experts at top_k/n."""
    path = tiny_gguf("26b")
    facts = bench.describe_model(path)
    cfg = facts.config
    b = bench.decode_read_bytes(facts.weights, cfg.top_k_experts, cfg.num_experts)
    f = GGUFFile(path)
    sizes = {name: info.nbytes for name, info in f.tensors.items()}
    experts = sum(n for name, n in sizes.items() if "_exps.weight" in name)
    assert experts > 0
    expected_body = sum(sizes.values()) - sizes["token_embd.weight"] - experts + experts * 2 // 4
    assert abs(b.body - expected_body) <= len(sizes)  # per-tensor integer rounding
    assert b.head == sizes["token_embd.weight"]
    assert b.gathered == sizes["token_embd.weight"] // cfg.vocab_size
    assert facts.tokenizer is not None


def test_record_replaces_the_same_setup_and_keeps_what_follows(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## Part A\n\nintro\n\n### model x (cpu)\n\nold numbers\n\n"
                    "#### model x (cpu)\n\nnot a setup heading\n\n## Part B\n\nkept\n")
    bench.record(path, "model x (cpu)", "### model x (cpu)\n\nnew numbers\n")
    text = path.read_text()
    assert "old numbers" not in text and "new numbers" in text
    assert text.count("### model x (cpu)\n") == 1  # the #### line went with the replaced section
    assert text.endswith(f"new numbers\n{bench.SECTION_END}\n\n## Part B\n\nkept\n")
    bench.record(path, "model x (cpu) vs llama.cpp and transformers", "### model x (cpu) vs llama.cpp and "
                 "transformers\n\ncompare 1\n")
    bench.record(path, "model x (cpu) vs llama.cpp and transformers", "### model x (cpu) vs llama.cpp and "
                 "transformers\n\ncompare 2\n")
    text = path.read_text()
    assert "compare 1" not in text and text.count("compare 2") == 1 and "new numbers" in text and "kept" in text
    bench.record(tmp_path / "new.md", "s", "### s\n\nfirst\n")
    assert (tmp_path / "new.md").read_text() == f"# Benchmarks\n\n### s\n\nfirst\n{bench.SECTION_END}\n"


def test_record_keeps_prose_after_a_section_and_ignores_fenced_examples(tmp_path):
    """Prose written after a recorded section went with it on the next run; a heading quoted in a
    fenced example was taken for the section (eating the fence); a new setup landed inside
    whatever `##` part ended the file; a full disk left the file cut mid-line."""
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## Speed\n\n```\n### a\n```\n\n")
    bench.record(path, "a", "### a\n\nfirst a\n")
    path.write_text(path.read_text() + "\nWhat a's numbers mean.\n\n## Output guards\n\nguards\n")
    bench.record(path, "a", "### a\n\nsecond a\n")
    bench.record(path, "b", "### b\n\nfirst b\n")
    assert path.read_text() == (
        "# Benchmarks\n\n## Speed\n\n```\n### a\n```\n\n"
        f"### a\n\nsecond a\n{bench.SECTION_END}\n\n### b\n\nfirst b\n{bench.SECTION_END}\n"
        "\nWhat a's numbers mean.\n\n## Output guards\n\nguards\n")
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]  # written whole, then moved in place


def test_record_writes_through_links_and_refuses_what_is_no_markdown_file(tmp_path, monkeypatch):
    """A probe's --write found: a symlink replaced by a plain file (its target never updated), a
    FIFO replaced, /dev/null replaced by a file (as root), a model's config.json given a table
    appended after the whole run, a binary file failing after the run with "'utf-8' codec can't
    decode", and a `.partial` file left by a failed write."""
    real = tmp_path / "real.md"
    real.write_text("# Benchmarks\n\nmine\n")
    (tmp_path / "link.md").symlink_to(real)
    bench.record(tmp_path / "link.md", "s", "### s\n\nnumbers\n")
    assert (tmp_path / "link.md").is_symlink() and "numbers" in real.read_text() and "mine" in real.read_text()
    os.mkfifo(tmp_path / "fifo.md")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "blob.md").write_bytes(b"\xd0\xff\x00binary")
    (tmp_path / "folder.md").mkdir()
    for name, problem in (("fifo.md", "not a regular file"), ("config.json", "not a markdown file"),
                          ("blob.md", "not UTF-8 text"), ("folder.md", "a folder, not a file")):
        with pytest.raises(ValueError, match=problem):
            bench.record(tmp_path / name, "s", "### s\n")
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo.md").st_mode) and (tmp_path / "config.json").read_text() == "{}"

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        bench.record(real, "t", "### t\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.md", "config.json", "fifo.md", "folder.md",
                                                          "link.md", "real.md"]


def test_read_bandwidth_is_measured_with_the_thread_count():
    bw = bench.measure_read_bandwidth(threads=1, buffer_bytes=16 * 2**20, repeats=2)
    assert bw.threads == 1 and bw.buffer_bytes == 16 * 2**20 and bw.bytes_per_s > 1e8
    assert "16 MiB buffer, best of 2, 1 threads" in bw.describe()


def test_random_weights_file_is_written_once_into_the_cache(tmp_path, tiny_gguf, monkeypatch):
    calls = []

    def write_random_gguf(config, out_path, qtype="q4_0", seed=0, twin=False):
        calls.append((config, Path(out_path).name, qtype, seed) + (("twin",) if twin else ()))
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_bytes(tiny_gguf("gemma3").read_bytes())
        return Path(out_path)

    fake = types.ModuleType("gemmarun.loading.random_weights")
    fake.write_random_gguf = write_random_gguf
    monkeypatch.setitem(sys.modules, "gemmarun.loading.random_weights", fake)
    cache = tmp_path / "random"
    first = bench.random_weights_model("e2b", "q8_0", cache)
    again = bench.random_weights_model("e2b", "q8_0", cache)
    assert first == again == cache / "e2b-q8_0.gguf" and first.exists()
    assert calls == [("e2b", "e2b-q8_0.gguf", "q8_0", 0)]
    config = tmp_path / "my-model" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"model_type": "gemma4_text"}))
    made = bench.random_weights_model(str(config), "q4_0", cache)
    assert made.name.startswith("my-model-") and made.name.endswith("-q4_0.gguf")
    assert bench.random_weights_model(str(config.parent), "q4_0", cache) == made  # the folder names the same
    assert bench.random_weights_model("google/gemma-4-E2B-it", "q4_0", cache).parent == cache
    assert bench.random_weights_model("../evil", "q4_0", cache) == cache / "evil-q4_0.gguf"
    with pytest.raises(bench.BenchError, match="no such config file"):
        bench.random_weights_model(str(tmp_path / "missing.json"), "q4_0", cache)
    with pytest.raises(bench.BenchError, match="not a config name"):
        bench.random_weights_model("!!!", "q4_0", cache)
    twin = bench.random_weights_model("26b-a4b", "q4_0", cache, twin=True)
    assert twin == cache / "26b-a4b-twin-q4_0.gguf" and calls[-1][-1] == "twin"


def test_cli_bench_random_weights_writes_the_machine_line_and_command(tiny_models, tmp_path, capsys,
                                                                     monkeypatch):
    """--random-weights through the real writer into a (patched) cache, then benched and recorded."""
    monkeypatch.setattr(bench, "RANDOM_CACHE", tmp_path / "cache")
    config = tiny_models("gemma3")[0] / "config.json"
    out = tmp_path / "benchmarks.md"
    args = ["bench", "--random-weights", str(config), "--prompt-tokens", "8",  # --quant left at its default
            "--decode-tokens", "2", "--threads", "1", "--write", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "threads: 1" in err and "round 1/1 gemmarun" in err and "writing random weights" in err
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".gguf"]  # no .partial left
    text = out.read_text()
    # not the default workload: its own setup, so it never replaces the full figures
    assert text.count("### ") == 1 and "q4_0 (gemma3, dtype auto, device cpu), 8/2 tokens, 1 threads\n" in text
    assert "--quant q4_0 --threads 1 --prompt-tokens 8 --decode-tokens 2 --write" in text
    assert "1 threads used" in text and "GiB RAM" in text and "torch " in text and "- date: " in text
    assert "decode bound" in text and "| gemmarun 0.1.0 |" in text
    # whether the native kernels ran is part of the figures (the section had not said)
    native = os.environ.get("GEMMARUN_NATIVE_KERNELS") != "0"
    assert f"- gemmarun's native CPU kernels: {'in use' if native else 'not in use'}" in text


def test_cli_bench_random_weights_checks_the_workload_before_writing(tiny_models, tmp_path, capsys, monkeypatch):
    """A workload past the config's context had been refused only after its random weights were
    written (2.6-17 GB for the released shapes); the recorded command is shell-quoted."""
    from gemmarun.cli import _bench_command, build_parser

    monkeypatch.setattr(bench, "RANDOM_CACHE", tmp_path / "cache")
    config = tiny_models("gemma3")[0] / "config.json"
    context = json.loads(config.read_text())["max_position_embeddings"]
    assert main(["bench", "--random-weights", str(config), "--prompt-tokens", str(context)]) == 1
    assert "do not fit the model's context" in capsys.readouterr().err and not (tmp_path / "cache").exists()
    args = build_parser().parse_args(["bench", str(tmp_path / "my model.gguf"), "--threads", "1"])
    assert _bench_command(args, 1).startswith(f"gemmarun bench '{tmp_path}/my model.gguf' --threads 1")
    assert len(bench.random_prompt_ids(8, 20)) == 20 and max(bench.random_prompt_ids(8, 20)) < 8  # a tiny vocabulary


@pytest.mark.parametrize("args, message, code", [
    (["--compare", "--device", "meta"], "--compare runs every runtime on the CPU", 1),
    (["--threads", "0"], "--threads must be at least 1", 2),
    (["--rounds", "0"], "argument --rounds: must be at least 1", 2),
    (["--decode-tokens", "0"], "must be at least 1", 2),
    (["--prompt-tokens", "100000"], "do not fit the model's context", 1),
])
def test_cli_bench_bad_options_are_one_line_errors(tiny_gguf, capsys, args, message, code):
    try:
        got = main(["bench", str(tiny_gguf("gemma3")), *args])
    except SystemExit as e:  # a usage error: before anything runs
        got = e.code
    err = capsys.readouterr().err
    assert got == code and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bench_model_and_random_weights_together_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "x.gguf", "--random-weights", "e2b"])
    assert e.value.code == 2 and "not both" in capsys.readouterr().err


def _runtime(name):
    return next(rt for rt in bench.compare_runtimes() if rt.name == name)


def test_llama_cpp_worker_agrees_with_gemmarun_on_a_tiny_gguf(tiny_gguf):
    """Same quantized weights, same ids: llama.cpp's greedy tokens are gemmarun's."""
    pytest.importorskip("llama_cpp")
    import gemmarun

    w = _workload(tiny_gguf("gemma3"), prompt=8, decode=3)
    theirs = bench.run_worker(_runtime("llama.cpp"), w)
    assert theirs.prefill_tokens == 8 and theirs.decode_tokens == 3 and theirs.decode_tok_s > 0
    assert theirs.kv_bytes is None and theirs.version.startswith("llama-cpp-python")
    ours = bench.run_bench(gemmarun.load(w.model, device="cpu"), 0.0, w.prompt_ids, 3, w.sanity_ids, 3)
    assert theirs.first_ids == ours.first_ids


def test_transformers_worker_runs_a_gguf(tiny_gguf):
    pytest.importorskip("accelerate")
    r = bench.run_worker(_runtime("transformers"), _workload(tiny_gguf("gemma3")))
    assert r.prefill_tokens == 8 and r.prefill_tok_s > 0 and r.decode_tok_s > 0 and r.kv_bytes > 0
    assert len(r.first_ids) == 3 and r.version == "transformers 5.23.0"


def test_a_bad_workload_is_a_one_line_failure(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(40))
    with pytest.raises(bench.RuntimeFailed, match="bad.gguf") as e:
        bench.run_worker(bench.gemmarun_runtime(), _workload(bad))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_compare_on_the_real_270m_briefly():
    """gemmarun and llama.cpp on the real model, a few tokens, in child processes: both run, and
    their first greedy tokens for a real prompt agree (same quantized weights). transformers on
    the real file takes minutes to dequantize; its worker is checked on the tiny GGUF above."""
    pytest.importorskip("llama_cpp")
    from gemmarun.loading.default import default_model_path

    facts = bench.describe_model(default_model_path())
    w = Workload(str(facts.path), bench.random_prompt_ids(facts.config.vocab_size, 32), 4, physical_cores(),
                 tuple(facts.tokenizer.encode(bench.SANITY_PROMPT)), 8)
    ours, theirs = bench.run_rounds(w, [bench.gemmarun_runtime(), _runtime("llama.cpp")], rounds=1)
    assert ours.status == theirs.status == ""
    assert ours.results[0].first_ids == theirs.results[0].first_ids
    assert "France" in facts.tokenizer.decode(ours.results[0].first_ids)


def test_twin_of_a_dense_config_is_a_one_line_error(tmp_path, capsys):
    from gemmarun.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--twin"])
    assert e.value.code == 2 and "--twin needs --random-weights" in capsys.readouterr().err


def test_twin_of_a_dense_model_is_refused(tmp_path, capsys, monkeypatch):
    from gemmarun import bench
    from gemmarun.cli import main

    monkeypatch.setattr(bench, "RANDOM_CACHE", tmp_path)
    assert main(["bench", "--random-weights", "e2b", "--twin", "--quant", "q8_0"]) == 1
    assert "already dense" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's VmHWM")
def test_a_worker_reports_its_own_peak_not_its_parents():
    """ru_maxrss would carry the parent's RSS at fork time into the worker through exec."""
    parent = (
        "import subprocess, sys; big = bytearray(1536 * 2**20); big[::4096] = b'x' * len(big[::4096]); "
        "print(subprocess.run([sys.executable, '-c', 'from gemmarun.bench import peak_rss_mib; "
        "print(peak_rss_mib())'], capture_output=True, text=True, check=True).stdout)"
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout
    assert 10 < float(out) < 1536


def test_the_llama_cpp_worker_reports_its_own_peak_rss():
    """It read ru_maxrss, which a child inherits from its parent through fork and exec: the
    table published the bench parent's 531 MiB for llama.cpp's 373. It reads VmHWM now, as the
    other workers do (the same function)."""
    import subprocess
    import sys

    from gemmarun import bench, bench_llama_cpp

    assert bench.peak_rss_mib is bench_llama_cpp.peak_rss_mib
    ballast = bytearray(400 << 20)  # the parent's peak: 400 MiB more than the child will ever hold
    ballast[::4096] = b"\1" * len(ballast[::4096])
    script = bench_llama_cpp.__file__
    out = subprocess.run([sys.executable, "-c", f"import runpy; print(runpy.run_path({script!r})['peak_rss_mib']())"],
                         capture_output=True, text=True, check=True).stdout
    assert float(out) < 200, out
    del ballast
