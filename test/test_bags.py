"""rosbag2 tools: writer/reader round trips, atomic writing, frame pairing, and `vlm3-ros bag from-rgbd`
on real 7-Scenes frames and on a small TUM RGB-D folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from vlm3_ros import bags
from vlm3_ros.bags import BagError, RgbdBagWriter, iter_rgbd_frames
from vlm3_ros.camera import Intrinsics
from vlm3_ros.cli.main import main as cli_main
from vlm3_ros.geometry import orthonormalize

INTR = Intrinsics(64, 48, 50.0, 51.5, 31.25, 23.75)
INTR_DIST = Intrinsics(64, 48, 52.0, 52.0, 32.0, 24.0, distortion_model="plumb_bob",
                       D=(0.1, -0.2, 0.001, -0.002, 0.05))
# Irregular stamps with nanosecond parts (exactness is checked, not just a rate).
STAMPS = [1_700_000_000_000_000_000 + k * 33_333_333 + (k * k * 7919) % 1000 for k in range(6)]


def synthetic_frames(n=len(STAMPS), seed=0, h=48, w=64):
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        depth = rng.uniform(0.2, 9.0, (h, w)).astype(np.float32)
        depth[rng.random((h, w)) < 0.1] = np.nan
        T = np.eye(4)
        T[:3, :3] = Rotation.random(random_state=seed * 100 + k).as_matrix()
        T[:3, 3] = rng.normal(scale=3.0, size=3)
        frames.append((rgb, depth, T))
    return frames


def write_synthetic(path, frames, stamps=STAMPS, intrinsics=INTR, **options):
    with RgbdBagWriter(path, **options) as writer:
        for stamp, (rgb, depth, T) in zip(stamps, frames):
            writer.write_frame(stamp, rgb=rgb, intrinsics=intrinsics, depth_m=depth, T_w_c=T)
    return writer


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
@pytest.mark.parametrize("depth_encoding", ["16UC1", "32FC1"])
def test_round_trip(tmp_path, storage, depth_encoding):
    frames = synthetic_frames()
    path = tmp_path / "bag"
    write_synthetic(path, frames, storage=storage, depth_encoding=depth_encoding)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag"]  # no temporary left beside it

    it = iter_rgbd_frames(path)
    out = list(it)
    assert [f.stamp_ns for f in out] == STAMPS
    for (rgb, depth, T), f in zip(frames, out):
        assert f.rgb.dtype == np.uint8 and np.array_equal(f.rgb, rgb)
        assert f.intrinsics == INTR
        assert np.array_equal(np.isnan(f.depth_m), np.isnan(depth))
        err = np.nanmax(np.abs(f.depth_m - depth))
        if depth_encoding == "16UC1":
            assert err <= 0.0005 + 1e-6  # rounded to the millimetre
        else:
            assert err == 0.0
        np.testing.assert_allclose(f.T_w_c, T, atol=1e-9, rtol=0)
    s = it.summary
    assert (s.frames, s.total_unpaired, s.total_corrupt, s.dropped_frames) == (len(frames), 0, 0, 0)

    info = bags.bag_info(path)
    assert info["storage"] == storage
    assert info["start_ns"] == STAMPS[0] and info["duration_ns"] == STAMPS[-1] - STAMPS[0]
    assert info["topics"] == {
        bags.TOPICS["image"]: {"type": "sensor_msgs/msg/Image", "count": 6},
        bags.TOPICS["camera_info"]: {"type": "sensor_msgs/msg/CameraInfo", "count": 6},
        bags.TOPICS["depth"]: {"type": "sensor_msgs/msg/Image", "count": 6},
        bags.TOPICS["pose"]: {"type": "geometry_msgs/msg/PoseStamped", "count": 6},
        bags.TF_TOPIC: {"type": "tf2_msgs/msg/TFMessage", "count": 6},
    }
    assert info["message_count"] == 30

    # headers, frames and the /tf transforms agree with the poses
    msgs = list(bags.read_messages(path))
    assert [m.stamp_ns for m in msgs if m.topic == bags.TOPICS["depth"]] == STAMPS
    for m in msgs:
        if m.topic == bags.TOPICS["depth"]:
            assert m.msg.encoding == depth_encoding and m.msg.header.frame_id == bags.CAMERA_FRAME
        if m.topic == bags.TOPICS["pose"]:
            assert m.msg.header.frame_id == bags.WORLD_FRAME
        if m.topic == bags.TF_TOPIC:
            (t,) = m.msg.transforms
            assert (t.header.frame_id, t.child_frame_id) == (bags.WORLD_FRAME, bags.CAMERA_FRAME)
            k = STAMPS.index(t.header.stamp.sec * 10**9 + t.header.stamp.nanosec)
            np.testing.assert_allclose(bags.pose_from_msg(t), frames[k][2], atol=1e-9, rtol=0)


def test_distortion_frames_and_topics_options(tmp_path):
    frames = synthetic_frames(3, seed=1)
    topics = {"image": "/cam/rgb", "depth": None, "pose": "/gt"}
    path = tmp_path / "bag"
    with RgbdBagWriter(path, topics=topics, camera_frame="cam", world_frame="w", tf=False) as writer:
        for stamp, (rgb, _, T) in zip(STAMPS, frames):
            writer.write_frame(stamp, rgb=rgb, intrinsics=INTR_DIST, T_w_c=T)
    assert set(bags.bag_info(path)["topics"]) == {"/cam/rgb", bags.TOPICS["camera_info"], "/gt"}
    out = list(iter_rgbd_frames(path, topics))
    assert len(out) == 3 and all(f.depth_m is None for f in out)
    assert out[0].intrinsics == INTR_DIST
    frame_ids = {m.topic: m.msg.header.frame_id for m in bags.read_messages(path)}
    assert frame_ids == {"/cam/rgb": "cam", bags.TOPICS["camera_info"]: "cam", "/gt": "w"}
    # the disabled depth topic refuses a depth image instead of dropping it
    with RgbdBagWriter(tmp_path / "other", topics={"depth": None}) as writer:
        with pytest.raises(BagError, match="depth"):
            writer.write_frame(1, depth_m=np.ones((2, 2), np.float32))


def test_failed_write_leaves_no_output(tmp_path):
    frames = synthetic_frames(3)
    with pytest.raises(RuntimeError, match="disk on fire"):
        with RgbdBagWriter(tmp_path / "bag") as writer:
            writer.write_frame(STAMPS[0], rgb=frames[0][0], intrinsics=INTR)
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []

    writer = RgbdBagWriter(tmp_path / "bag", storage="mcap")
    writer.write_frame(STAMPS[0], rgb=frames[0][0])
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BagError, match="aborted"):
        writer.write_frame(STAMPS[1], rgb=frames[1][0])


def test_overwrite_refused_then_replaced_only_when_complete(tmp_path):
    frames = synthetic_frames(3)
    path = tmp_path / "bag"
    write_synthetic(path, frames[:1], STAMPS[:1])
    with pytest.raises(BagError, match="exists already"):
        RgbdBagWriter(path)
    assert bags.bag_info(path)["message_count"] == 5

    with pytest.raises(RuntimeError):
        with RgbdBagWriter(path, overwrite=True) as writer:
            writer.write_frame(STAMPS[0], rgb=frames[0][0])
            raise RuntimeError("interrupted")
    assert bags.bag_info(path)["message_count"] == 5  # the old bag survives a failed overwrite

    with RgbdBagWriter(path, overwrite=True, storage="mcap") as writer:
        for stamp, (rgb, _, _) in zip(STAMPS, frames):
            writer.write_frame(stamp, rgb=rgb)
        assert bags.bag_info(path)["message_count"] == 5  # still the old one while writing
    info = bags.bag_info(path)
    assert (info["message_count"], info["storage"]) == (3, "mcap")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag"]


def test_bad_frames_write_nothing(tmp_path):
    rgb, depth, T = synthetic_frames(1)[0]
    path = tmp_path / "bag"
    with RgbdBagWriter(path) as writer:
        bad_rotation = T.copy()
        bad_rotation[:3, :3] *= 1.1
        cases = [
            dict(rgb=rgb.astype(np.float32)),
            dict(rgb=rgb[:, :32], intrinsics=INTR),
            dict(rgb=rgb, intrinsics=INTR, depth_m=depth[:24]),
            dict(rgb=rgb, depth_m=np.nan_to_num(depth * 1000).astype(np.uint16)),  # depth must be float metres
            dict(rgb=rgb, intrinsics=INTR, T_w_c=bad_rotation),
            dict(rgb=rgb, T_w_c=np.full((4, 4), np.nan)),
            dict(),
        ]
        for case in cases:
            with pytest.raises(BagError):
                writer.write_frame(STAMPS[0], **case)
        for stamp in (-1, 2**31 * 10**9, 1.5):
            with pytest.raises(BagError, match="stamp"):
                writer.write_frame(stamp, rgb=rgb)
        writer.write_frame(STAMPS[0], rgb=rgb, intrinsics=INTR, depth_m=depth, T_w_c=T)
    info = bags.bag_info(path)
    assert info["message_count"] == 5  # only the good frame, no part of a bad one
    assert [f.stamp_ns for f in iter_rgbd_frames(path)] == STAMPS[:1]


def test_16uc1_range_and_invalid_values(tmp_path):
    depth = np.array([[0.0004, 0.0015, -1.0, 0.0], [np.inf, 65.535, 65.536, 3.2104]], np.float32)
    path = tmp_path / "bag"
    with RgbdBagWriter(path, topics={"image": None}) as writer:
        writer.write_frame(5, depth_m=depth)
    (msg,) = bags.read_messages(path)
    raw = np.frombuffer(bytes(msg.msg.data), np.uint16).reshape(2, 4)
    # NaN, <= 0, inf and > 65.535 m are "no measurement" (0); the rest rounds to millimetres (so does 0.4 mm)
    np.testing.assert_array_equal(raw, [[0, 2, 0, 0], [0, 65535, 0, 3210]])


def test_unpaired_and_corrupt_messages_are_counted(tmp_path):
    """Frames pair by stamp; strays and damaged messages are counted in the summary, not raised."""
    frames = synthetic_frames(6)
    path = tmp_path / "bag"
    store = bags.typestore()
    Image = store.types["sensor_msgs/msg/Image"]
    with RgbdBagWriter(path) as writer:
        for k, (stamp, (rgb, depth, T)) in enumerate(zip(STAMPS, frames)):
            if k == 1:  # image without camera info
                writer.write_frame(stamp, rgb=rgb, depth_m=depth, T_w_c=T)
            elif k == 2:  # image with an unsupported encoding
                writer.write_frame(stamp, intrinsics=INTR, depth_m=depth, T_w_c=T)
                good = writer._image(stamp, rgb, "rgb8")
                bad = Image(header=good.header, height=48, width=64, encoding="yuv422", is_bigendian=0, step=128,
                            data=good.data[:6144])
                writer.write(bags.TOPICS["image"], "sensor_msgs/msg/Image", stamp, bad)
            elif k == 3:  # depth data too short for its size
                writer.write_frame(stamp, rgb=rgb, intrinsics=INTR, T_w_c=T)
                good = writer._image(stamp, np.zeros((48, 64), np.uint16), "16UC1")
                short = Image(header=good.header, height=48, width=64, encoding="16UC1", is_bigendian=0, step=128,
                              data=good.data[:100])
                writer.write(bags.TOPICS["depth"], "sensor_msgs/msg/Image", stamp, short)
            elif k == 4:  # pose 2 ms late
                writer.write_frame(stamp, rgb=rgb, intrinsics=INTR, depth_m=depth)
                writer.write_frame(stamp + 2_000_000, T_w_c=T)
            else:
                writer.write_frame(stamp, rgb=rgb, intrinsics=INTR, depth_m=depth, T_w_c=T)
        # a truncated CDR message (not even a header) and a camera info alone
        writer.write(bags.TOPICS["pose"], "geometry_msgs/msg/PoseStamped", STAMPS[-1] + 10, b"\x00\x01\x00\x00\x05")
        writer.write_frame(STAMPS[-1] + 20, intrinsics=INTR)
        # a camera info with an all-zero K (uncalibrated)
        info = writer._camera_info(STAMPS[-1] + 30, INTR)
        info.k[:] = 0
        writer.write_frame(STAMPS[-1] + 30, rgb=frames[0][0], depth_m=frames[0][1], T_w_c=frames[0][2])
        writer.write(bags.TOPICS["camera_info"], "sensor_msgs/msg/CameraInfo", STAMPS[-1] + 30, info)

    it = iter_rgbd_frames(path)
    out = list(it)
    assert [f.stamp_ns for f in out] == [STAMPS[0], STAMPS[5]]
    for f, k in zip(out, (0, 5)):
        assert np.array_equal(f.rgb, frames[k][0])
    s = it.summary
    T = bags.TOPICS
    # images of frames 1 (no camera info) and 4 (no pose at its stamp); the camera info, depth and pose
    # left over from those two frames, the late pose, and the lone camera info at +20
    assert s.unpaired == {T["image"]: 2, T["camera_info"]: 2, T["depth"]: 2, T["pose"]: 2}
    assert s.corrupt == {T["image"]: 1, T["camera_info"]: 1, T["depth"]: 1, T["pose"]: 1}
    assert s.dropped_frames == 3 and s.frames == 2
    assert s.messages[T["image"]] == 7 and len(s.problems) >= 4

    # with a 3 ms tolerance the late pose joins frame 4
    it = iter_rgbd_frames(path, tolerance_ns=3_000_000)
    stamps = [f.stamp_ns for f in it]
    assert stamps == [STAMPS[0], STAMPS[4], STAMPS[5]]
    np.testing.assert_allclose(next(f for f in iter_rgbd_frames(path, tolerance_ns=3_000_000)
                                    if f.stamp_ns == STAMPS[4]).T_w_c, frames[4][2], atol=1e-9)


def test_nearest_partner_within_tolerance(tmp_path):
    frames = synthetic_frames(3)
    path = tmp_path / "bag"
    base = 10**12
    with RgbdBagWriter(path) as writer:
        for k, (rgb, depth, T) in enumerate(frames):
            stamp = base + k * 100_000_000
            writer.write_frame(stamp, rgb=rgb, intrinsics=INTR)
            writer.write_frame(stamp + 4_000_000, depth_m=depth)  # 4 ms after its image
            writer.write_frame(stamp - 6_000_000 + (k == 2) * 20_000_000, T_w_c=T)  # 6 ms before (frame 2: 14 after)
    assert len(list(iter_rgbd_frames(path))) == 0
    it = iter_rgbd_frames(path, tolerance_ns=10_000_000)
    out = list(it)
    assert [f.stamp_ns for f in out] == [base, base + 100_000_000]
    for f, (rgb, depth, T) in zip(out, frames):
        assert np.array_equal(np.isnan(f.depth_m), np.isnan(depth))
        np.testing.assert_allclose(f.T_w_c, T, atol=1e-9)
    assert it.summary.unpaired == {bags.TOPICS["image"]: 1, bags.TOPICS["camera_info"]: 1,
                                   bags.TOPICS["depth"]: 1, bags.TOPICS["pose"]: 1}


def test_reader_errors(tmp_path):
    with pytest.raises(BagError, match="no bag"):
        bags.bag_info(tmp_path / "missing")
    (tmp_path / "notabag").mkdir()
    with pytest.raises(BagError, match="metadata.yaml"):
        list(bags.read_messages(tmp_path / "notabag"))
    path = tmp_path / "bag"
    with RgbdBagWriter(path) as writer:
        writer.write_frame(1, rgb=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(BagError, match="/nope"):
        list(bags.read_messages(path, ["/nope"]))
    with pytest.raises(BagError, match="camera_info topic"):
        iter_rgbd_frames(path)
    with pytest.raises(BagError, match="tolerance"):
        iter_rgbd_frames(path, tolerance_ns=-1)
    with pytest.raises(BagError, match="storage"):
        RgbdBagWriter(tmp_path / "x", storage="rosbag1")


def test_pose_from_msg_accepts_pose_messages():
    store = bags.typestore()
    T = store.types
    R = Rotation.from_euler("xyz", [10, -20, 30], degrees=True)
    qx, qy, qz, qw = R.as_quat()
    quat = T["geometry_msgs/msg/Quaternion"](x=2 * qx, y=2 * qy, z=2 * qz, w=2 * qw)  # normalised on reading
    header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id="map")
    pose = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=1.0, y=2.0, z=3.0), orientation=quat)
    expected = np.eye(4)
    expected[:3, :3], expected[:3, 3] = R.as_matrix(), (1, 2, 3)
    stamped = T["geometry_msgs/msg/PoseStamped"](header=header, pose=pose)
    odom = T["nav_msgs/msg/Odometry"](
        header=header, child_frame_id="base",
        pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
        twist=T["geometry_msgs/msg/TwistWithCovariance"](
            twist=T["geometry_msgs/msg/Twist"](linear=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
                                               angular=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)),
            covariance=np.zeros(36)))
    tf = T["geometry_msgs/msg/TransformStamped"](
        header=header, child_frame_id="cam",
        transform=T["geometry_msgs/msg/Transform"](translation=T["geometry_msgs/msg/Vector3"](x=1.0, y=2.0, z=3.0),
                                                   rotation=quat))
    for msg in (stamped, odom, tf, pose):
        np.testing.assert_allclose(bags.pose_from_msg(msg), expected, atol=1e-12)
    zero = T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=0.0)
    with pytest.raises(BagError, match="quaternion"):
        bags.pose_from_msg(T["geometry_msgs/msg/Pose"](position=pose.position, orientation=zero))
    with pytest.raises(BagError, match="pose-like"):
        bags.pose_from_msg(header)


def test_bags_module_imports_no_ros():
    code = ("import sys, vlm3_ros.bags, vlm3_ros.cli.bag, vlm3_ros.datasets.tum\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rclpy', 'sensor_msgs', 'std_msgs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- vlm3-ros bag from-rgbd -------------------------------------------------------------------


def test_from_rgbd_sevenscenes(sevenscenes, tmp_path, capsys):
    out = tmp_path / "kitchen"
    rc = cli_main(["bag", "from-rgbd", str(sevenscenes.root), str(out), "--first", "5", "--count", "10",
                   "--storage", "mcap", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 10 frames" in printed and str(out) in printed and "0.300 s" in printed
    it = iter_rgbd_frames(out)
    frames = list(it)
    ids = sevenscenes.frame_ids[5:15]
    assert len(frames) == 10 and it.summary.total_unpaired == 0
    assert [f.stamp_ns for f in frames] == [10**9 + round(k * 1e9 / 30) for k in range(10)]
    K = sevenscenes.intrinsics()
    for f, frame_id in zip(frames, ids):
        rgb, depth, pose = sevenscenes.load_frame(frame_id)
        assert np.array_equal(f.rgb, rgb)
        np.testing.assert_allclose(f.intrinsics.K, K)
        assert np.array_equal(np.isnan(f.depth_m), np.isnan(depth))
        assert np.nanmax(np.abs(f.depth_m - depth)) <= 1e-3
        # the bag holds a unit quaternion: the nearest rotation to the (slightly non-orthonormal) pose.txt
        expected = pose.copy()
        expected[:3, :3] = orthonormalize(pose[:3, :3])
        np.testing.assert_allclose(f.T_w_c, expected, atol=1e-9)
        np.testing.assert_allclose(f.T_w_c, pose, atol=1e-3)
    assert bags.bag_info(out)["storage"] == "mcap"

    # refuses to overwrite; --rate and --start change the stamps
    assert cli_main(["bag", "from-rgbd", str(sevenscenes.root), str(out), "--count", "2", "--quiet"]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli_main(["bag", "from-rgbd", str(sevenscenes.root), str(out), "--count", "3", "--rate", "10",
                     "--start", "2.5", "--overwrite", "--quiet"]) == 0
    assert [f.stamp_ns for f in iter_rgbd_frames(out)] == [2_500_000_000, 2_600_000_000, 2_700_000_000]


def make_tum_folder(root: Path, size=(48, 64)):
    """A tiny TUM RGB-D sequence with rgb, depth and groundtruth stamps that do not coincide."""
    root.mkdir()
    (root / "rgb").mkdir()
    (root / "depth").mkdir()
    rng = np.random.default_rng(3)
    h, w = size
    rgb_t = ["1305031102.175304", "1305031102.211214", "1305031102.243211", "1305031102.275326",
             "1305031102.311267"]
    # depth: 10 ms after rgb 0, 15 ms before rgb 1, 30 ms from rgb 2 (no depth for it), 2 ms for 3 and 4
    depth_t = ["1305031102.185304", "1305031102.196214", "1305031102.273211", "1305031102.277326",
               "1305031102.313267"]
    # groundtruth every 10 ms except a gap around rgb 4
    gt = [1305031102.16 + 0.01 * i for i in range(13)] + [1305031102.34]
    rgb_lines, depth_lines, gt_lines = ["# color images", "# timestamp filename"], ["# depth"], ["# ground truth"]
    images, depths = {}, {}
    for stamp in rgb_t:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "rgb" / f"{stamp}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rgb_lines.append(f"{stamp} rgb/{stamp}.png")
        images[stamp] = img
    for stamp in depth_t:
        raw = rng.integers(2000, 40000, (h, w)).astype(np.uint16)
        raw[:3, :3] = 0
        cv2.imwrite(str(root / "depth" / f"{stamp}.png"), raw)
        depth_lines.append(f"{stamp} depth/{stamp}.png")
        depths[stamp] = raw
    poses = {}
    for k, stamp in enumerate(gt):
        q = Rotation.random(random_state=k).as_quat()
        tr = rng.normal(size=3)
        gt_lines.append(f"{stamp:.4f} " + " ".join(f"{v:.6f}" for v in (*tr, *q)))
        T = np.eye(4)
        T[:3, :3] = Rotation.from_quat(np.round(q, 6)).as_matrix()
        T[:3, 3] = np.round(tr, 6)
        poses[round(stamp, 4)] = T
    (root / "rgb.txt").write_text("\n".join(rgb_lines) + "\n")
    (root / "depth.txt").write_text("\n".join(depth_lines) + "\n")
    (root / "groundtruth.txt").write_text("\n".join(gt_lines) + "\n")
    return rgb_t, depth_t, images, depths, poses


def _expected_tum(rgb_t, depth_t, images, depths, poses):
    """rgb 0 <-> depth 0, rgb 1 <-> depth 1, rgb 2: no depth, rgb 3 <-> depth 3, rgb 4: no pose."""
    out = []
    for r, d in ((0, 0), (1, 1), (3, 3)):
        t = float(rgb_t[r])
        g = min(poses, key=lambda s: abs(s - t))
        out.append((int(rgb_t[r].replace(".", "")) * 1000, images[rgb_t[r]], depths[depth_t[d]], poses[g]))
    return out


def test_tum_reader_associates_and_scales(tmp_path):
    from vlm3_ros.datasets.tum import TumRgbd, tum_intrinsics

    root = tmp_path / "rgbd_dataset_freiburg1_tiny"
    data = make_tum_folder(root)
    seq = TumRgbd(root)
    assert seq.intrinsics() == tum_intrinsics(1)
    assert seq.intrinsics().distortion_model == "plumb_bob" and seq.intrinsics().fx == 517.3
    assert seq.unmatched == 2 and len(seq) == 3
    for k, (stamp, rgb, raw, pose) in enumerate(_expected_tum(*data)):
        assert seq.frames[k].stamp_ns == stamp
        got_rgb, got_depth, got_pose = seq.load_frame(k)
        assert np.array_equal(got_rgb, rgb)
        np.testing.assert_allclose(got_depth[raw > 0], raw[raw > 0] / 5000.0, rtol=1e-6)
        assert np.isnan(got_depth[raw == 0]).all()
        np.testing.assert_allclose(got_pose, pose, atol=1e-12)


def test_from_rgbd_tum(tmp_path, capsys):
    root = tmp_path / "rgbd_dataset_freiburg3_tiny"
    data = make_tum_folder(root)
    out = tmp_path / "tum_bag"
    # the published freiburg3 calibration is for 640x480 images: these small ones are refused, nothing written
    assert cli_main(["bag", "from-rgbd", str(root), str(out), "--quiet"]) == 1
    assert "differs from the intrinsics" in capsys.readouterr().err and not out.exists()
    assert cli_main(["bag", "from-rgbd", str(root), str(out), "--rate", "30"]) == 1
    assert "own timestamps" in capsys.readouterr().err

    rc = cli_main(["bag", "from-rgbd", str(root), str(out), "--layout", "tum", "--intrinsics", "40", "41", "31.5",
                   "23.5", "--quiet"])
    assert rc == 0
    assert "wrote 3 frames (tum)" in capsys.readouterr().out
    frames = list(iter_rgbd_frames(out))
    expected = _expected_tum(*data)
    assert [f.stamp_ns for f in frames] == [e[0] for e in expected]
    for f, (stamp, rgb, raw, pose) in zip(frames, expected):
        assert np.array_equal(f.rgb, rgb)
        assert f.intrinsics == Intrinsics(64, 48, 40.0, 41.0, 31.5, 23.5)
        assert np.array_equal(np.isnan(f.depth_m), raw == 0)
        assert np.nanmax(np.abs(f.depth_m - raw / 5000.0)) <= 1e-3
        np.testing.assert_allclose(f.T_w_c, pose, atol=1e-9)


def test_from_rgbd_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    for folder, message in ((tmp_path / "missing", "no such folder"), (tmp_path / "empty", "is empty"),
                            (tmp_path / "other", "neither a 7-Scenes")):
        assert cli_main(["bag", "from-rgbd", str(folder), str(tmp_path / "out"), "--quiet"]) == 1
        assert message in capsys.readouterr().err
    root = tmp_path / "no_sensor_name"
    make_tum_folder(root)
    assert cli_main(["bag", "from-rgbd", str(root), str(tmp_path / "out"), "--quiet"]) == 1
    assert "--intrinsics" in capsys.readouterr().err
    assert cli_main(["bag", "from-rgbd", str(root), str(tmp_path / "out"), "--intrinsics", "40", "40", "32", "24",
                     "--first", "7", "--quiet"]) == 1
    assert "past the end" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bag_info_command(tmp_path, capsys):
    path = tmp_path / "bag"
    write_synthetic(path, synthetic_frames(2), STAMPS[:2])
    assert cli_main(["bag", "info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "sqlite3" in text and "/camera/image_raw" in text and "sensor_msgs/msg/CameraInfo" in text


def test_from_rgbd_reads_the_tsdf_fusion_layout_with_jpeg_colour(tmp_path, capsys):
    """The tsdf-fusion packaging of 7-Scenes: rgbd-frames/frame-NNNNNN.color.jpg beside camera-intrinsics.txt."""
    import cv2

    root = tmp_path / "7scenes"
    frames_dir = root / "rgbd-frames"
    frames_dir.mkdir(parents=True)
    np.savetxt(root / "camera-intrinsics.txt", np.array([[585.0, 0, 31.5], [0, 585.0, 23.5], [0, 0, 1]]))
    rng = np.random.default_rng(5)
    for i in range(3):
        cv2.imwrite(str(frames_dir / f"frame-{i:06d}.color.jpg"), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        cv2.imwrite(str(frames_dir / f"frame-{i:06d}.depth.png"), np.full((48, 64), 1500 + 10 * i, np.uint16))
        np.savetxt(frames_dir / f"frame-{i:06d}.pose.txt", np.eye(4))
    out = tmp_path / "bag"
    assert cli_main(["bag", "from-rgbd", str(root), str(out), "--quiet"]) == 0
    assert "wrote 3 frames (7scenes)" in capsys.readouterr().out
    frames = list(iter_rgbd_frames(out))
    assert len(frames) == 3
    for i, frame in enumerate(frames):
        jpeg = cv2.cvtColor(cv2.imread(str(frames_dir / f"frame-{i:06d}.color.jpg")), cv2.COLOR_BGR2RGB)
        assert np.array_equal(frame.rgb, jpeg)  # the decoded JPEG, exactly
        np.testing.assert_allclose(frame.depth_m, 1.5 + 0.01 * i, atol=1e-6)
        np.testing.assert_allclose(frame.intrinsics.K[0], [585.0, 0, 31.5])
