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


@pytest.mark.parametrize("name", ["long_prompt.py", "prompt_cache.py", "server_load.py"])
def test_a_bad_write_target_is_refused_before_measuring(name, tmp_path, monkeypatch, capsys):
    """--write config.json had been refused (by record) only after the whole run."""
    script = next(p for p in SCRIPTS if p.name == name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "--write", "config.json"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 2 and "--write config.json: not a markdown file" in capsys.readouterr().err


def test_the_recorded_command_runs_again_as_written():
    from gemmarun.bench import script_command

    assert script_command("/x/scripts/a.py", ["--model", "my models/e2b"]) == "python scripts/a.py --model 'my models/e2b'"
    assert script_command("/x/scripts/a.py", []) == "python scripts/a.py"
