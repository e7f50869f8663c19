"""llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py), for tests that load GGUFs exactly as
users get them, not as gemmarun's `convert` writes them.

It comes from llama-cpp-python's source distribution on PyPI (which vendors llama.cpp, Gemma 4
included), pinned, fetched once into the user cache; $GEMMARUN_LLAMA_CPP_SRC may name a llama.cpp
checkout instead.
"""

from __future__ import annotations

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
