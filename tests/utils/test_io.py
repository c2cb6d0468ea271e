"""Atomic writes: the destination is the old file or the complete new one; stale temporaries are cleaned up."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visionkit.utils import atomic_write, remove_stale_temporaries, write_json_atomic
from visionkit.utils.io import _host_tag


def test_write_json_atomic_round_trip_and_creates_folders(tmp_path: Path) -> None:
    path = write_json_atomic({"a": [1, 2.5, None]}, tmp_path / "x" / "y" / "out.json", indent=2)
    assert json.loads(path.read_text()) == {"a": [1, 2.5, None]}
    assert path.read_text().startswith("{\n  ")  # indent honoured
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temporary left


def test_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    path.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_file_mode_follows_the_umask(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "f.bin", lambda tmp: tmp.write_bytes(b"1"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def _dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path: Path) -> None:
    host = _host_tag()
    dead = tmp_path / f".last.ckpt.{host}-{_dead_pid()}.0123456789ab.tmp"
    alive = tmp_path / f".last.ckpt.{host}-{os.getppid()}.0123456789ab.tmp"  # a running process: not ours to delete
    other_host = tmp_path / f".last.ckpt.elsewhere-{_dead_pid()}.0123456789ab.tmp"
    unrelated = tmp_path / "notes.tmp"
    for path in (dead, alive, other_host, unrelated):
        path.write_text("x")
    atomic_write(tmp_path / "epoch=1.ckpt", lambda tmp: tmp.write_text("new"))
    assert not dead.exists()
    assert alive.exists() and other_host.exists() and unrelated.exists()
    assert remove_stale_temporaries(tmp_path) == []
    assert remove_stale_temporaries(tmp_path / "missing") == []
