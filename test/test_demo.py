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
from vlm3_ros.pipeline import query_grid  # noqa: E402
from vlm3_train.synthetic import DEFAULT_SIZE  # noqa: E402


def test_demo_in_oracle_mode_reproduces_the_ground_truth(tmp_path, ros_domain_id, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--oracle", "--output", str(out), "--frames", "5", "--points", "16", "--frame-interval", "1.0",
            "--domain-id", str(ros_domain_id), "--timeout", "120"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["frames"]["depth_node"]["frames_published"] == 5
    depth = report["depth"]
    # The nodes ask the query grid of 16 points (the grid rounds its shape) on every frame.
    assert depth["points_per_frame"] == len(query_grid(*DEFAULT_SIZE, 16)) >= 12
    assert depth["frames_with_cloud"] == 5 and depth["asked"] == 5 * depth["points_per_frame"]
    # The oracle answers where the scene has depth: every asked point with ground truth is answered.
    assert depth["answered"] == depth["answered_with_truth"] == depth["asked_with_truth"] > 40
    assert depth["delta1"] == 1.0 and depth["abs_rel"] < 0.01  # answers carry centimetres
    assert report["source"] == "oracle" and report["odometry_mode"] == "correspondence"
    trajectory = report["trajectory"]
    assert trajectory["frames_with_odometry"] == 5 and trajectory["ate_rmse_m"] < 0.01
    assert trajectory["zero_motion_ate_rmse_m"] > 5 * trajectory["ate_rmse_m"]  # the robot moved

    # The output bag holds what the nodes published; the PLY holds every cloud point.
    recorded = list(bags.read_messages(out / "node_outputs", ["/points", "/odom", "/tf", "/tf_static"]))
    clouds = [m.msg for m in recorded if m.topic == "/points"]
    assert len(clouds) == 5 and sum(1 for m in recorded if m.topic == "/odom") == 5
    # /tf carries odom -> base_link for every pose; /tf_static the camera above base_link.
    odom_tf = [t for m in recorded if m.topic == "/tf" for t in m.msg.transforms if t.child_frame_id == "base_link"]
    assert len(odom_tf) == 5 and all(t.header.frame_id == "odom" for t in odom_tf)
    static = [t for m in recorded if m.topic == "/tf_static" for t in m.msg.transforms]
    assert static and static[0].header.frame_id == "base_link"
    assert static[0].transform.translation.z == pytest.approx(0.6)
    total = sum(len(msg_codec.read_cloud(c)) for c in clouds)
    raw = (out / "cloud_odom.ply").read_bytes()
    header, body = raw.split(b"end_header\n")
    assert f"element vertex {total}".encode() in header and report["cloud_points"] == total == depth["answered"]
    assert report["cloud_frames"] == 5
    # base_link is on the floor: in the odom cloud the floor is at z = 0 (the lowest points).
    table = np.frombuffer(body, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    assert abs(float(np.percentile(table["z"], 1))) < 0.02 and table["z"].min() > -0.02
    for figure in ("trajectory.png", "depth.png"):
        assert (out / figure).stat().st_size > 1000
    for path in ("node_outputs", "cloud_odom.ply", "trajectory.png", "depth.png", "metrics.json"):
        assert path in printed
    assert "/tf 5" in printed and "ground truth" in printed
    first_cloud = msg_codec.read_cloud(clouds[0])
    assert np.all(np.isfinite(first_cloud["z"])) and "rgb" in first_cloud.dtype.names

    # A second run reuses the input bag.
    assert main(args) == 0
    assert "reused" in capsys.readouterr().out
