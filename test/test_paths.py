"""Cache location and atomic writes."""

from __future__ import annotations

import json
import stat

import pytest

from vlm3_ros.paths import cache_dir, write_atomic, write_json_atomic


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
