"""gemmarun's native CPU kernels, one C++ module built on first use.

* ``group_gemv.cpp``: quantized matrix-vector products. Decode multiplies one token's activations
  by every weight matrix, so its speed is the speed of reading the weights. Torch has no CPU
  kernel for int8 codes with per-group scales (GGML's Q8_0, Q5_0, Q6_K, ... layout): the portable
  path dequantizes tiles to float32 and then multiplies, touching every weight three times.
  ``group_gemv`` reads gemmarun's repacked codes once, with the activations rounded to int16 per
  group (int8 under bfloat16 compute) so that the inner loop is integer multiply-adds;
  ``block_gemv`` does the same on GGUF Q4_0/Q8_0/Q5_0/IQ4_NL/MXFP4/Q4_K/Q6_K/IQ4_XS blocks where
  they lie in the memory-mapped file (MoE experts); ``block_gemm`` multiplies many float32 activation
  rows by 32-weight blocks dequantized in registers (MoE prefill).
* ``dequant.cpp``: prefill's exact float32 weight tiles for the GEMM, in one pass over the codes
  instead of the five or six torch operations of the formula (bit-identical to it).
* ``decode_ops.cpp``: a decode step's small float32 operations (RMSNorm, RoPE, one query's
  attention), each one call instead of the handful of torch dispatches its formula takes.
* ``decode_step.cpp``: a decode token through every layer of a dense decoder in one call, the
  same kernels in the same order as the modules (model/fused_decode.py builds its plan).
* ``module.cpp``: the Python bindings of all four; ``kernels.h`` declares their entry points.

They are compiled for this machine's CPU (``-O3 -march=native``) by torch's extension builder the
first time they are needed (about a minute; cached under ``~/.cache/gemmarun/kernels``, or
``$GEMMARUN_KERNEL_CACHE``), one process at a time.

Where no C++ compiler (or ``ninja``) is available, or ``GEMMARUN_NATIVE_KERNELS=0``, everything
here is None and the model keeps its torch formulas: slower, and the same up to float summation
order (the matmul kernels differ from the portable path by their activation rounding, ~2e-5
relative in float32).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import torch

__all__ = ["kernel_status", "native_block_gemm", "native_block_gemv", "native_group_gemv", "native_ops"]

_SOURCES = [Path(__file__).with_name(name) for name in ("group_gemv.cpp", "dequant.cpp", "decode_ops.cpp",
                                                              "decode_step.cpp", "module.cpp")]
_HEADERS = [Path(__file__).with_name("kernels.h")]
_CACHE = Path(os.environ.get("GEMMARUN_KERNEL_CACHE", Path.home() / ".cache" / "gemmarun" / "kernels"))
# -fopenmp: at::parallel_for is OpenMP code in torch's headers, serial without it; the extension
# then shares the libgomp that torch already loaded (same soname), so one thread pool.
# -ffp-contract=off: a multiply and an add stay two roundings, as written (dequant.cpp's tiles are
# bit-identical to gguf-py's only so); the kernels ask for fused multiply-adds where they want them.
# -Werror=missing-declarations: an entry point defined with other parameters than kernels.h
# declares would be a second overload (undefined at load time); this makes it a compile error.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-Werror=missing-declarations"]
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}


def _build_target() -> tuple[Path, str]:
    """The build folder and module name: one build per source text, flags, torch version and
    Python, so a stale .so is never loaded."""
    source = "".join(path.read_text() for path in _SOURCES + _HEADERS)
    tag = hashlib.sha256(f"{source}{_CFLAGS}{torch.__version__}{sys.version}".encode()).hexdigest()[:12]
    return _CACHE / f"native-{tag}", f"gemmarun_native_{tag}"


def _build() -> ModuleType | None:
    if os.environ.get("GEMMARUN_NATIVE_KERNELS", "1") == "0":
        _state["status"] = "disabled (GEMMARUN_NATIVE_KERNELS=0)"
        return None
    build_dir, name = _build_target()
    built, stamp = build_dir / f"{name}.so", build_dir / "loaded"
    if _stamp(built) is not None and stamp.is_file() and stamp.read_text() == _stamp(built):
        # as cpp_extension would load it, without importing it (and setuptools): 4 MiB. Only a
        # .so that cpp_extension built and loaded whole: one cut short (a build killed while
        # linking, another process linking it now) would crash the process, not fail to import.
        try:
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _state["status"] = f"built in {build_dir}"
            return module
        except ImportError:  # (a system library changed under it): cpp_extension decides below
            pass
    try:
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        with _one_builder(build_dir):
            module = load(
                name=name,
                sources=[str(path) for path in _SOURCES],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as e:  # no compiler, no ninja, a failed build: the portable path stays
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _state["status"] = f"unavailable ({first_line[:200]})"
        _log.warning("gemmarun: native CPU kernels unavailable, using the portable path: %s", first_line)
        return None
    _state["status"] = f"built in {build_dir}"
    try:
        stamp.write_text(_stamp(built) or "")
    except OSError:  # the next process goes through cpp_extension again
        pass
    return module


@contextlib.contextmanager
def _one_builder(build_dir: Path) -> Iterator[None]:
    """One gemmarun process at a time builds in `build_dir`, under an flock, which ends with its
    process. cpp_extension's own lock is a file (`lock`) that it waits on for as long as it exists:
    a build killed by a signal (a timeout, `docker stop`, the OOM killer) left it, and every later
    process waited forever, silently. Holding the flock, no one else is building, so such a file
    is a leftover and goes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: cpp_extension's lock alone
        yield
        return
    with open(build_dir / "build.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stamp(path: Path) -> str | None:
    """The .so as it was when it last loaded whole: its size and modification time."""
    try:
        info = path.stat()
    except OSError:
        return None
    return f"{info.st_size} {info.st_mtime_ns}"


def _module() -> ModuleType | None:
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                _state["module"] = _build()
    return _state["module"]


def native_ops() -> ModuleType | None:
    """The built module (``group_gemv``, ``block_gemv``, ``dequantize_tile``, ``rms_norm``, ``rope``,
    ``attend_one``),
    or None where it cannot be built (built once, on the first call)."""
    return _module()


def native_group_gemv() -> Callable | None:
    """``group_gemv(x, codes, scale, bias, group, code_min, nibbles, int8_activations) -> y`` for
    gemmarun's repacked codes, or None (built once)."""
    module = _module()
    return None if module is None else module.group_gemv


def native_block_gemv() -> Callable | None:
    """``block_gemv(x, blocks, ggml_type, int8_activations) -> y`` for GGUF
    Q4_0/Q8_0/Q5_0/IQ4_NL/MXFP4/Q4_K/Q6_K/IQ4_XS block rows read in place, or None."""
    module = _module()
    return None if module is None else module.block_gemv


def native_block_gemm() -> Callable | None:
    """``block_gemm(x, blocks, ggml_type) -> y`` for GGUF Q4_0/Q8_0/Q5_0/IQ4_NL/MXFP4 block rows
    read in place, float32 activations as they are, or None."""
    module = _module()
    return None if module is None else module.block_gemm


def kernel_status() -> str:
    """A line for `gemmarun bench` and `inspect`: whether the native kernels are in use."""
    _module()
    return str(_state["status"])
