"""The machine facts behind the default thread count and every benchmark record."""

from __future__ import annotations

import pytest
import torch

from gemmarun import machine


def test_physical_cores_counts_cores_not_smt_siblings():
    smt = "".join(f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 2}\n\n" for i in range(4))
    assert machine.physical_cores(smt, usable=4) == 2
    assert machine.physical_cores(smt, usable=1) == 1
    two_sockets = "physical id : 0\ncore id : 0\n\nphysical id : 1\ncore id : 0\n"
    assert machine.physical_cores(two_sockets, usable=8) == 2
    assert machine.physical_cores("processor : 0\n", usable=3) == 3


def test_describe_names_cpu_cores_threads_and_ram():
    line = machine.describe(3)
    assert "3 threads used" in line and "GiB RAM" in line and f"torch {torch.__version__}" in line
    assert f"{machine.physical_cores()} cores" in line


def test_last_level_cache_from_sysfs(tmp_path):
    for name, level, kind, size in (("index0", 1, "Data", "48K"), ("index1", 1, "Instruction", "32K"),
                                    ("index2", 2, "Unified", "2048K"), ("index3", 3, "Unified", "307200K")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(f"{level}\n")
        (tmp_path / name / "type").write_text(f"{kind}\n")
        (tmp_path / name / "size").write_text(f"{size}\n")
    assert machine.last_level_cache(tmp_path) == (3, 300 * 2**20)
    (tmp_path / "index3" / "size").write_text("garbage\n")
    assert machine.last_level_cache(tmp_path) == (2, 2 * 2**20)  # an unreadable entry is skipped
    assert machine.last_level_cache(tmp_path / "missing") is None
    cache = machine.last_level_cache()
    if cache is not None:
        assert f"MiB L{cache[0]}" in machine.describe(1)


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        machine.set_threads(1)
        assert torch.get_num_threads() == 1
        machine.set_threads(None)
        assert torch.get_num_threads() == machine.physical_cores()
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        machine.set_threads(None)  # the environment's choice stands
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="at least 1"):
            machine.set_threads(0)
    finally:
        torch.set_num_threads(before)
