"""The machine gemmarun runs on: what the CPU is, how many cores it may use, how much RAM.

The CLI sets its default thread count from these; `gemmarun bench` and the scripts describe the
machine with them next to every figure they record.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX-512 BF16 or AMX): there torch's
    bfloat16 GEMM runs ~2.4x the float32 one; elsewhere it is emulated, 3-4x slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def physical_cores(cpuinfo: str | None = None, usable: int | None = None) -> int:
    """Distinct (physical id, core id) pairs, capped by the CPUs this process may run on. SMT
    siblings share one core's vector units, so matmul threads beyond the cores only contend."""
    usable = usable_cpus() if usable is None else usable
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return usable
    cores, package = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return max(1, min(len(cores), usable)) if cores else usable


def ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


_CACHE_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache(root: Path = _CACHE_SYSFS) -> tuple[int, int] | None:
    """(level, bytes) of the largest-level data cache cpu0 sees, from Linux's sysfs, or None. It
    matters to decode: weights that fit it are read several times faster than from memory, so a
    small model's speed moves with what other tenants of a shared cache do."""
    best = None
    for index in sorted(root.glob("index*")) if root.is_dir() else ():
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not size:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        try:
            nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except ValueError:
            continue
        if best is None or level > best[0]:
            best = (level, nbytes)
    return best


def describe(threads: int) -> str:
    """One line for benchmark records: CPU, cores, threads used, RAM, last-level cache, torch."""
    cache = last_level_cache()
    llc = f", {cache[1] / 2**20:g} MiB L{cache[0]}" if cache else ""
    return (f"{cpu_model()}, {physical_cores()} cores ({os.cpu_count()} logical), {threads} threads used, "
            f"{ram_gib():.1f} GiB RAM{llc}, torch {torch.__version__}")


def set_threads(requested: int | None) -> None:
    """Decode on a CPU is memory-bound and SMT siblings share one core's vector units: one
    thread per physical core is the sensible default (torch's own default counts logical CPUs).
    $OMP_NUM_THREADS, when set, wins over the default (torch already honours it)."""
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return
    threads = physical_cores() if requested is None else requested
    check_threads(threads)
    torch.set_num_threads(threads)


def check_threads(threads: int) -> None:
    """ValueError unless `threads` is a thread count this machine can run."""
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    limit = 4 * (os.cpu_count() or 1)  # torch's thread pool crashes far past the machine's threads
    if threads > limit:
        raise ValueError(f"--threads {threads} is more than this machine can run "
                         f"({limit}: 4x its {os.cpu_count()} logical CPUs)")
