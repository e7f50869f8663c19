"""llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py), for tests that load GGUFs exactly as
users get them, not as gemmarun's `convert` writes them.

It comes from llama-cpp-python's source distribution on PyPI (which vendors llama.cpp, Gemma 4
included), pinned, fetched once into the user cache; $GEMMARUN_LLAMA_CPP_SRC may name a llama.cpp
checkout instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter_source() -> Path:
    """A folder holding convert_hf_to_gguf.py, its `conversion` package and its gguf-py; raises
    RuntimeError (with pip's last line) when it cannot be had."""
    env = os.environ.get("GEMMARUN_LLAMA_CPP_SRC")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemmarun" / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (cache / "convert_hf_to_gguf.py").is_file():
        return cache
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], capture_output=True, text=True, timeout=900)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode or not sdists:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip could not fetch llama-cpp-python {LLAMA_CPP_PYTHON}: {last[0]}")
        staging = Path(tmp) / "src"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(_VENDOR) and m.name[len(_VENDOR):].startswith(_MEMBERS)]
            for m in members:
                m.name = m.name[len(_VENDOR):]
            tar.extractall(staging, members=members, filter="data")
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.move(str(staging), cache)  # whole or not at all: the check above sees a complete tree
    return cache


def converter_for_tests() -> Path:
    """`converter_source()` for a test: skipped where it cannot be had (offline), unless
    $GEMMARUN_REQUIRE_LLAMA_CPP is set (CI sets it), where that fails the test."""
    import pytest

    try:
        return converter_source()
    except RuntimeError as e:
        if os.environ.get("GEMMARUN_REQUIRE_LLAMA_CPP"):
            pytest.fail(str(e))
        pytest.skip(str(e))


def convert(folder: Path, out: Path, outtype: str = "f32", mmproj: bool = False) -> Path:
    """Run llama.cpp's converter on a HF folder: the text model, or with `mmproj` its towers."""
    src = converter_source()
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out), "--outtype", outtype]
    if mmproj:
        cmd.append("--mmproj")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}  # the gguf-py it was written with
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        raise AssertionError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return out


# llama.cpp's converter writes no real tower eps (it reads a key Gemma 4 configs lack: the file says
# 1e-6, every checkpoint's value), so the tiny towers take that one.
TOWER_EPS = 1e-6
# Gemma 4's image processor values (spec 4.1: no mean/std normalisation); llama.cpp's converter needs the file.
PREPROCESSOR = {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "patch_size": 16,
                "max_soft_tokens": 280, "pooling_kernel_size": 3}


# Gemma 3's image processor values (the released preprocessor_config.json's, the tiny tower's size).
GEMMA3_PREPROCESSOR = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}


def list_specials(folder: Path) -> None:
    """Name every special token in tokenizer_config.json, as the released tokenizers do: llama.cpp's
    converter types only the tokens transformers lists as special CONTROL, the rest NORMAL (then
    "<|turn>" in a prompt is plain text, to llama.cpp as to gemmarun)."""
    from tiny_tokenizer import SPECIALS

    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["extra_special_tokens"] = {**{f"special_{i}": t for i, t in enumerate(SPECIALS[4:])},
                                      **config["extra_special_tokens"]}
    path.write_text(json.dumps(config))


def convert_multimodal(family: str, folder: Path):
    """A tiny multimodal model in `folder` and llama.cpp's GGUFs of it: (transformers model, text
    GGUF, mmproj GGUF). For "gemma3" (its SigLIP tower) the text GGUF is gemmarun's: llama.cpp's
    converter reads a Gemma 3 vocabulary from a SentencePiece tokenizer.model only."""
    from reference_models import GEMMA3_SOFT, build_gemma3_vision, build_multimodal

    if family == "gemma3":
        from gemmarun.loading.convert import convert as our_convert

        ref = build_gemma3_vision(folder, released_layout=True)
        (folder / "preprocessor_config.json").write_text(json.dumps(GEMMA3_PREPROCESSOR | {"image_seq_length": GEMMA3_SOFT}))
        text = our_convert(folder, folder.parent / f"{folder.name}-text-f32.gguf", "f32", progress=False)
        return ref, text, convert(folder, folder / "mmproj-f32.gguf", mmproj=True)
    ref = build_multimodal(family, folder, tower_eps=TOWER_EPS)
    list_specials(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return ref, convert(folder, folder / "text-f32.gguf"), convert(folder, folder / "mmproj-f32.gguf", mmproj=True)
