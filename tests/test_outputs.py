"""Files written for the user: through symlinks, never over devices, whole or not at all."""

import os

from gemmarun.outputs import partial_path, write_replacing


def test_partial_files_of_dead_writers_are_removed(tmp_path):
    """Partial files carry their writer's pid (two writers never share one); a writer killed
    mid-write had left its partial file for good (gigabytes, for a convert)."""
    target = tmp_path / "model.gguf"
    dead = tmp_path / ".model.gguf.99999999.partial"  # past any pid_max: no such process
    alive = tmp_path / f".model.gguf.{os.getppid()}.partial"  # a running writer's: kept
    other = tmp_path / ".other.gguf.99999999.partial"
    for p in (dead, alive, other):
        p.write_bytes(b"half")
    assert partial_path(target) == tmp_path / f".model.gguf.{os.getpid()}.partial"
    assert not dead.exists() and alive.exists() and other.exists()
    write_replacing(tmp_path / "model.gguf", b"whole")
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, target.name])
