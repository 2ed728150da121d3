"""The main job end to end in oracle mode: a synthetic bag through vlm3-ros play into the real nodes
(separate processes over DDS), with the outputs checked against the bag's ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("vlm3_train")

from vlm3_ros import bags, msg_codec  # noqa: E402
from vlm3_ros.cli.main import main  # noqa: E402


def test_demo_in_oracle_mode_reproduces_the_ground_truth(tmp_path, ros_domain_id, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--oracle", "--output", str(out), "--frames", "5", "--points", "16", "--frame-interval", "1.0",
            "--domain-id", str(ros_domain_id), "--timeout", "120"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["frames"]["depth_node"]["frames_published"] == 5
    depth = report["depth"]
    assert depth["frames_with_cloud"] == 5 and depth["answered"] == depth["questions"] > 40
    assert depth["delta1"] == 1.0 and depth["abs_rel"] < 0.01  # answers carry centimetres
    assert report["trajectory"]["frames_with_odometry"] == 5 and report["trajectory"]["ate_rmse_m"] < 0.01

    # The output bag holds what the nodes published; the PLY holds every cloud point.
    recorded = list(bags.read_messages(out / "node_outputs", ["/points", "/odom"]))
    clouds = [m.msg for m in recorded if m.topic == "/points"]
    assert len(clouds) == 5 and sum(1 for m in recorded if m.topic == "/odom") == 5
    total = sum(len(msg_codec.read_cloud(c)) for c in clouds)
    header = (out / "cloud_odom.ply").read_bytes().split(b"end_header\n")[0].decode()
    assert f"element vertex {total}" in header and report["cloud_points"] == total
    assert (out / "trajectory.png").stat().st_size > 1000
    for path in ("node_outputs", "cloud_odom.ply", "trajectory.png", "metrics.json"):
        assert path in printed
    first_cloud = msg_codec.read_cloud(clouds[0])
    assert np.all(np.isfinite(first_cloud["z"])) and "rgb" in first_cloud.dtype.names

    # A second run reuses the input bag.
    assert main(args) == 0
    assert "reused" in capsys.readouterr().out
