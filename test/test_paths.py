"""Cache location, atomic writes, staged directories and the cleaning of killed runs' leftovers."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vlm3_ros.paths import cache_dir, remove_stale_staging, staged_directory, write_atomic, write_json_atomic


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM3_CACHE", str(tmp_path / "cache"))
    path = cache_dir("models", "x")
    assert path == tmp_path / "cache" / "models" / "x" and path.is_dir()


def test_write_atomic_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_json_atomic(target, {"delta1": 0.5, "name": "k\u00fcche"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"delta1": 0.5, "name": "k\u00fcche"}
    assert target.read_text(encoding="utf-8").endswith("}\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644

    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # not bytes: fails after the temporary file exists
    with pytest.raises(TypeError):
        write_json_atomic(target, {"x": object()}, default=None)  # not serialisable: fails before writing
    assert json.loads(target.read_text(encoding="utf-8"))["delta1"] == 0.5  # the old file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no temporary left

    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_staged_directory_publishes_whole_or_nothing(tmp_path):
    target = tmp_path / "dataset"
    with staged_directory(target) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".dataset.") and stage.name.endswith(".partial")
        (stage / "data.bin").write_bytes(b"new")
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
    assert sorted(p.name for p in target.iterdir()) == ["data.bin"]  # no lock file published

    with pytest.raises(FileExistsError):
        with staged_directory(target) as stage:
            (stage / "data.bin").write_bytes(b"newer")
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(target, overwrite=True) as stage:
            (stage / "data.bin").write_bytes(b"newer")
            raise KeyboardInterrupt
    assert (target / "data.bin").read_bytes() == b"new"
    with staged_directory(target, overwrite=True) as stage:
        (stage / "other.bin").write_bytes(b"newer")
    assert sorted(p.name for p in target.iterdir()) == ["other.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


_HOLD = """
import os, signal, sys
from vlm3_ros.paths import staged_directory
with staged_directory(sys.argv[1]) as stage:
    (stage / "payload").write_bytes(b"x" * 1000)
    print(stage, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
"""


def test_only_the_staging_of_ended_runs_is_removed(tmp_path):
    """A run killed inside its staging directory leaves it; the cleaner removes that one, and not
    the one of a run still working (another process, or this one), nor folders it did not make."""
    live = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "live"), "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        live_stage = Path(live.stdout.readline().strip())
        assert (live_stage / "payload").is_file()
        killed = subprocess.run([sys.executable, "-c", _HOLD, str(tmp_path / "killed"), "kill"], capture_output=True,
                                text=True, timeout=60)
        assert killed.returncode == -signal.SIGKILL
        left = Path(killed.stdout.strip())
        assert (left / "payload").is_file() and live_stage.is_dir()
        foreign = tmp_path / ".bag.abc123.partial"  # e.g. a bag writer's staging: no lock of ours
        foreign.mkdir()
        assert remove_stale_staging(tmp_path) == [left]
        assert not left.exists() and live_stage.is_dir() and foreign.is_dir()
        with staged_directory(tmp_path / "mine") as own:  # this process, still working in it
            assert remove_stale_staging(tmp_path) == []
            assert own.is_dir() and live_stage.is_dir() and foreign.is_dir()
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.wait(timeout=60) == 0
    finally:
        if live.poll() is None:
            live.kill()
    assert (tmp_path / "live" / "payload").stat().st_size == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bag.abc123.partial", "live", "mine"]
