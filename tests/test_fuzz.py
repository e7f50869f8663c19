"""The fuzz targets (fuzz/) on a short fixed budget: each atheris target fuzzes for a few seconds
in its own process, each Hypothesis target checks a fixed, derandomized set of examples. Long
runs are `python fuzz/run.py --seconds N`; what they found is pinned by regression tests in the
test files of the modules concerned."""

from __future__ import annotations

import importlib
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

FUZZ_DIR = Path(__file__).resolve().parents[1] / "fuzz"
BYTE_TARGETS = ["gguf_reader", "safetensors_header", "tokenizer_text", "image_decode", "audio_decode", "svg_repair"]
STRUCTURED_TARGETS = {"gguf_metadata": 300, "chat_messages": 250, "chat_template": 400, "openai_requests": 400,
                      "hf_config": 300}
SECONDS = 5


def test_every_target_is_run_here():
    targets = {p.stem for p in FUZZ_DIR.glob("*.py") if not p.name.startswith("_") and p.name != "run.py"}
    assert targets == set(BYTE_TARGETS) | set(STRUCTURED_TARGETS)


@pytest.fixture(scope="module")
def byte_runs(tmp_path_factory):
    """Every atheris target fuzzed for SECONDS, two at a time (scratch corpora, no artifacts in
    the checkout): {name: (exit status, output)}."""
    pytest.importorskip("atheris")
    tmp = tmp_path_factory.mktemp("fuzz")
    env = {**os.environ, "GEMMARUN_FUZZ_WORK": str(tmp / "work")}

    # A child forked from this process starts with its peak RSS as its own (Linux keeps ru_maxrss
    # across fork+exec), which after the model tests is GBs: libFuzzer's RSS limit counts from
    # there, and no single allocation may pass 2 GB.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    def run(name: str) -> tuple[int, str]:
        corpus = tmp / name
        corpus.mkdir()
        command = [sys.executable, str(FUZZ_DIR / f"{name}.py"), f"-max_total_time={SECONDS}",
                   f"-rss_limit_mb={inherited_mb + 2048}", "-malloc_limit_mb=2048",
                   f"-artifact_prefix={tmp}/{name}-", str(corpus)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
        return proc.returncode, proc.stdout + proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(BYTE_TARGETS, pool.map(run, BYTE_TARGETS)))


@pytest.mark.parametrize("name", BYTE_TARGETS)
def test_byte_target_finds_nothing(byte_runs, name):
    status, output = byte_runs[name]
    assert status == 0, output[-4000:]
    assert "Done" in output and "runs in" in output, output[-4000:]


@pytest.mark.parametrize("name", sorted(STRUCTURED_TARGETS))
def test_structured_target_holds(name, monkeypatch):
    pytest.importorskip("hypothesis")
    monkeypatch.syspath_prepend(str(FUZZ_DIR))
    target = importlib.import_module(name).TARGET
    target.hypothesis_test(max_examples=STRUCTURED_TARGETS[name], derandomize=True)()
