"""The machine gemmarun runs on: what the CPU is, how many cores it may use, how much RAM.

The CLI sets its default thread count from these; `gemmarun bench` and the scripts describe the
machine with them next to every figure they record.
"""

from __future__ import annotations

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


def describe(threads: int) -> str:
    """One line for benchmark records: CPU, cores, threads used, RAM, torch."""
    return (f"{cpu_model()}, {physical_cores()} cores ({os.cpu_count()} logical), {threads} threads used, "
            f"{ram_gib():.1f} GiB RAM, torch {torch.__version__}")


def set_threads(requested: int | None) -> None:
    """Decode on a CPU is memory-bound and SMT siblings share one core's vector units: one
    thread per physical core is the sensible default (torch's own default counts logical CPUs).
    $OMP_NUM_THREADS, when set, wins over the default (torch already honours it)."""
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return
    threads = physical_cores() if requested is None else requested
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
