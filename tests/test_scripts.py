"""The benchmark scripts docs/benchmarks.md names answer --help and do nothing else."""

import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_prints_usage_and_writes_nothing(script, tmp_path, monkeypatch, capsys):
    """ple_memory.py had taken --help for its output folder and written 4.7 GB there;
    expert_blocks.py ran the whole benchmark, k_eq_v_attention.py ended in a traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {script.name}")
    assert list(tmp_path.iterdir()) == []
