"""Bags -> dataset: labels equal the ground truth they come from (synthetic scenes, LiDAR + TF,
7-Scenes), the dataset format, summary counts of bad input, atomic writing, the CLI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from vlm3_ros import protocol
from vlm3_ros.bags import RgbdBagWriter, typestore
from vlm3_ros.camera import Intrinsics, preparation_map
from vlm3_ros.geometry import relative_pose, rotation_angle

from vlm3_train import convert as cv
from vlm3_train.convert import samples as samples_module
from vlm3_train import synthetic as syn

CAM = Intrinsics.from_focal(96, 72, 80.0)
FRAMES = 6


@functools.lru_cache(maxsize=8)
def _load_rows(data_dir: str) -> tuple:
    import datasets

    return tuple(datasets.load_from_disk(data_dir))


def rows_of(dataset_dir: Path, task: str | None = None) -> list:
    """The rows (images decoded) of a dataset directory, optionally of one task."""
    return [r for r in _load_rows(str(dataset_dir / "data")) if task is None or r["task"] == task]


def nearest_source_pixel(mapping, q: np.ndarray) -> np.ndarray:
    """The original pixel prepare_depth took a prepared position's depth from."""
    j = np.floor(np.asarray(q) + 0.5)
    return np.floor(mapping.to_original(j) + 0.5)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A synthetic sequence, its bag and the dataset converted from it (all three tasks)."""
    root = tmp_path_factory.mktemp("synthetic")
    seq = syn.generate_sequence(seed=3, frames=FRAMES, intrinsics=CAM, supersample=1)
    bag = syn.write_bag(seq, root / "bag", storage="sqlite3", depth_encoding="32FC1")
    options = cv.ConvertOptions(points_per_image=10, points_per_pair=8, correspondence_gaps=(1, 2), pose_gaps=(2, 3),
                                seed=1)
    result = cv.convert_bags([bag], root / "dataset", options, progress=False)
    return seq, bag, result


def test_depth_labels_equal_the_scene_ray_distance(synthetic):
    seq, bag, result = synthetic
    rows = rows_of(result.path, "depth")
    assert len(rows) == FRAMES
    mapping = preparation_map(CAM, protocol.DEPTH.preprocess)
    K_prep = mapping.prepared.K
    rel_errors = []
    for row in rows:
        meta, targets = json.loads(row["meta"]), json.loads(row["targets"])
        frame = meta["frames"][0]
        assert meta["stamps_ns"] == [int(seq.stamps_ns[frame])] and meta["source"] == str(bag)
        assert row["images"][0].size == (mapping.prepared.width, mapping.prepared.height) == tuple(meta["size"][0])
        np.testing.assert_allclose(meta["K"][0], K_prep)
        assert len(row["questions"]) == len(row["answers"]) == 10 and targets["kind"] == "ray"
        q = np.asarray(targets["pixels"])
        values = np.asarray(targets["values"])
        # Each question refers to its labelled pixel; each answer states its label.
        for text, answer, (nx, ny), (x, y), value in zip(row["questions"], row["answers"], targets["norm"], q, values):
            qid, fields = protocol.DEPTH.parse_question(text)
            assert (fields["nx"], fields["ny"]) == (nx, ny)
            np.testing.assert_allclose(protocol.denormalize_point(nx, ny, *meta["size"][0], 2000), (x, y), atol=1e-3)
            assert protocol.parse_depth_answer(answer) == pytest.approx(value, abs=0.005 + 1e-9)
        # Exact: the scene's z at the original pixel the depth was resampled from, times the
        # prepared ray's length at the labelled position.
        source = nearest_source_pixel(mapping, q)
        z = syn.ray_distance(seq.scene, seq.poses[frame], CAM, source, kind="z")
        ray = np.linalg.norm(np.linalg.inv(K_prep) @ np.c_[q, np.ones(len(q))].T, axis=0)
        np.testing.assert_allclose(values, z * ray, rtol=2e-6)
        # Against the analytic ray distance at the labelled position itself: within the
        # nearest-neighbour resampling tolerance.
        exact = syn.ray_distance(seq.scene, seq.poses[frame], CAM, mapping.to_original(q))
        rel_errors.append(np.abs(values - exact) / exact)
    rel_errors = np.concatenate(rel_errors)
    assert np.median(rel_errors) < 0.01 and np.mean(rel_errors < 0.05) > 0.9


def test_pose_answers_equal_the_generator_relative_pose(synthetic):
    seq, _, result = synthetic
    rows = rows_of(result.path, "pose")
    pairs = {tuple(json.loads(r["meta"])["frames"]) for r in rows}
    assert pairs == {(i, i + g) for g in (2, 3) for i in range(FRAMES - g)}
    for row in rows:
        i, j = json.loads(row["meta"])["frames"]
        targets = json.loads(row["targets"])
        T = relative_pose(seq.poses[i], seq.poses[j])
        np.testing.assert_allclose(targets["T"], T, atol=1e-9)
        assert targets["covisibility"] >= 0.25
        assert targets["question_ids"] == list(protocol.POSE_QUESTION_IDS)
        assert row["questions"] == [protocol.POSE.question(q) for q in targets["question_ids"]]
        parsed = protocol.parse_pose_answers(dict(zip(targets["question_ids"], row["answers"])))
        assert rotation_angle(parsed.R.T @ T[:3, :3]) < 0.15  # answers have 0.1 degree resolution
        np.testing.assert_allclose(parsed.direction, T[:3, 3] / np.linalg.norm(T[:3, 3]), atol=0.01)
        assert parsed.distance == pytest.approx(np.linalg.norm(T[:3, 3]), abs=0.006)
        assert parsed.angle_deg == pytest.approx(rotation_angle(T[:3, :3]), abs=0.06)
        assert [im.size for im in row["images"]] == [tuple(s) for s in json.loads(row["meta"])["size"]]


def test_compact_specs_label_with_their_own_questions_and_numbers_only_answers(synthetic, tmp_path):
    seq, bag, _ = synthetic
    specs = protocol.compact_specs(depth_focal=100.0, correspondence_max_edge=96.0, pose_focal=80.0, coord_scale=100)
    options = cv.ConvertOptions(specs=specs, points_per_image=6, points_per_pair=5, correspondence_gaps=(1,),
                                pose_gaps=(2,), seed=2)
    result = cv.convert_bags([bag], tmp_path / "ds", options, progress=False)
    assert protocol.load_protocol(result.path) == specs
    for row in rows_of(result.path, "depth"):
        targets = json.loads(row["targets"])
        for text, answer, (nx, ny), value in zip(row["questions"], row["answers"], targets["norm"], targets["values"]):
            assert text == f"depth {nx} {ny}" and 0 <= nx <= 100 and 0 <= ny <= 100
            assert protocol.parse_depth_answer(answer, specs["depth"]) == pytest.approx(value, abs=0.005 + 1e-9)
            assert specs["depth"].parse_answer(answer) == {"distance": float(answer)}  # the number only
    for row in rows_of(result.path, "correspondence"):
        targets = json.loads(row["targets"])
        for answer, point in zip(row["answers"], targets["points"]):
            assert answer == f"{round(point[0])},{round(point[1])}"
    for row in rows_of(result.path, "pose"):
        i, j = json.loads(row["meta"])["frames"]
        targets = json.loads(row["targets"])
        assert row["questions"] == ["rotation", "direction", "distance"]
        parsed = protocol.parse_pose_answers(dict(zip(targets["question_ids"], row["answers"])), specs["pose"])
        T = relative_pose(seq.poses[i], seq.poses[j])
        assert rotation_angle(parsed.R.T @ T[:3, :3]) < 0.15
        assert parsed.distance == pytest.approx(np.linalg.norm(T[:3, 3]), abs=0.006)


def test_correspondence_points_equal_the_analytic_reprojection(synthetic):
    seq, _, result = synthetic
    rows = rows_of(result.path, "correspondence")
    assert {tuple(json.loads(r["meta"])["frames"]) for r in rows} == {(i, i + g) for g in (1, 2) for i in range(FRAMES - g)}
    mapping = preparation_map(CAM, protocol.CORRESPONDENCE.preprocess)
    K1 = mapping.prepared.K
    errors = []
    for row in rows:
        i, j = json.loads(row["meta"])["frames"]
        targets = json.loads(row["targets"])
        p1, p2 = np.asarray(targets["pixels1"]), np.asarray(targets["pixels2"])
        assert len(row["questions"]) == len(p1) == 8
        for text, answer, (nx, ny), point in zip(row["questions"], row["answers"], targets["norm1"], targets["points"]):
            assert protocol.CORRESPONDENCE.parse_question(text)[1] == {"nx": nx, "ny": ny}
            assert protocol.parse_correspondence_answer(answer) == (round(point[0]), round(point[1]))
        np.testing.assert_allclose(np.asarray(targets["points"]), p2 / (mapping.prepared.width, mapping.prepared.height) * 1000,
                                   atol=2e-3)
        T_j_i = relative_pose(seq.poses[j], seq.poses[i])

        def move(uv1, z1):
            X = (np.linalg.inv(K1) @ np.c_[uv1, np.ones(len(uv1))].T).T * z1[:, None]
            Xj = X @ T_j_i[:3, :3].T + T_j_i[:3, 3]
            uv = (K1 @ Xj.T).T
            return uv[:, :2] / uv[:, 2:], Xj

        # Exact: the depth used is the scene's z at the original pixel it was resampled from.
        z_src = syn.ray_distance(seq.scene, seq.poses[i], CAM, nearest_source_pixel(mapping, p1), kind="z")
        np.testing.assert_allclose(move(p1, z_src)[0], p2, atol=1e-3)
        # Fully analytic: the scene's depth at the exact position, moved and projected; and the
        # point is visible (not occluded) from camera 2.
        z_exact = syn.ray_distance(seq.scene, seq.poses[i], CAM, mapping.to_original(p1), kind="z")
        uv2, Xj = move(p1, z_exact)
        errors.append(np.linalg.norm(uv2 - p2, axis=1))
        seen = syn.ray_distance(seq.scene, seq.poses[j], CAM, mapping.to_original(uv2))
        np.testing.assert_allclose(seen, np.linalg.norm(Xj, axis=1), rtol=0.1)
    errors = np.concatenate(errors)
    assert np.median(errors) < 1.0 and np.mean(errors < 5.0) > 0.9  # prepared pixels (1024 wide)


def test_dataset_format_protocol_file_and_summary(synthetic):
    import datasets

    _, bag, result = synthetic
    ds = datasets.load_from_disk(str(result.path / "data"))
    assert tuple(ds.column_names) == cv.DATASET_COLUMNS
    assert isinstance(ds.features["images"].feature, datasets.Image)
    assert ds[0]["images"][0].mode == "RGB"
    ds = rows_of(result.path)
    specs = protocol.load_protocol(result.path)
    assert specs == {"depth": protocol.DEPTH, "correspondence": protocol.CORRESPONDENCE, "pose": protocol.POSE}
    summary = json.loads((result.path / "summary.json").read_text())
    assert summary == result.summary
    counts = {t: sum(1 for r in ds if r["task"] == t) for t in cv.DEFAULT_TASKS}
    assert summary["samples"] == counts == {"depth": FRAMES, "correspondence": 9, "pose": 7}
    assert summary["questions"]["depth"] == 10 * FRAMES and summary["questions"]["pose"] == 4 * 7
    assert summary["frames_read"] == FRAMES and summary["skipped"]["corrupt_messages"] == 0
    assert summary["bags"][0]["depth_source"] == "depth_image" and summary["bags"][0]["pose_source"] == "topic"
    assert all(json.loads(r["meta"])["split"] == "train" for r in ds)
    assert not list(result.path.parent.glob(".dataset.*"))  # no temporary leftovers


def test_same_seed_same_dataset(synthetic, tmp_path):
    _, bag, result = synthetic
    options = cv.ConvertOptions(tasks=("depth",), seed=1)
    again = cv.convert_bags([bag], tmp_path / "again", options, progress=False)
    first = [r["targets"] for r in rows_of(result.path, "depth")]
    assert [r["targets"] for r in rows_of(again.path, "depth")] == first


def test_in_memory_frames_give_the_same_samples_as_their_bag(synthetic, tmp_path):
    seq, _, result = synthetic
    options = cv.ConvertOptions(tasks=("depth",), points_per_image=10, seed=1)
    memory = cv.convert_frames({"scene": seq.rgbd_frames()}, tmp_path / "memory", options, progress=False)
    assert [r["targets"] for r in rows_of(memory.path)] == [r["targets"] for r in rows_of(result.path, "depth")]
    assert [r["questions"] for r in rows_of(memory.path)] == [r["questions"] for r in rows_of(result.path, "depth")]
    assert json.loads(rows_of(memory.path)[0]["meta"])["source"] == "scene"
    first = next(cv.iter_samples(seq.rgbd_frames()[:1], options))
    assert first["targets"] == rows_of(result.path, "depth")[0]["targets"] and first["task"] == "depth"


def test_covisibility_of_known_motions():
    seq = syn.generate_sequence(seed=3, frames=2, intrinsics=CAM, supersample=1)
    frame = seq.frame(0)
    assert cv.covisibility(frame.depth, CAM, frame.depth, CAM, np.eye(4)) == pytest.approx(1.0)
    turned = syn.look_pose((0, 0, 0), np.pi)  # camera 2 faces the opposite way
    T = relative_pose(syn.look_pose((0, 0, 0), 0.0), turned)
    assert cv.covisibility(frame.depth, CAM, frame.depth, CAM, T) == 0.0
    # A sideways shift by a quarter of the image: covisibility drops accordingly.
    texture = syn.Texture("noise", (0, 0, 0), (1, 1, 1), 1.0)
    plane = syn.Rect(np.array([4.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]), 50, 50, texture)
    wall = syn.render(syn.Scene((plane,)), syn.look_pose((0, 0, 0), 0.0), CAM, supersample=1)[1]
    shift = np.eye(4)
    shift[0, 3] = 4.0 * 24 / 80.0  # 24 px at 4 m with f = 80
    assert cv.covisibility(wall, CAM, wall, CAM, shift, stride=1) == pytest.approx(72 / 96, abs=0.02)


def test_spec_file_with_small_focal_and_z_labels(synthetic, tmp_path):
    seq, bag, _ = synthetic
    small = protocol.TaskSpec.from_dict({**protocol.DEPTH.to_dict(), "preprocess": {"mode": "focal", "value": 120.0},
                                         "options": {"depth_kind": "z"}})
    protocol.save_protocol(tmp_path / "specs", [small])
    specs = cv.load_specs(tmp_path / "specs" / protocol.PROTOCOL_FILENAME, ["depth"])
    result = cv.convert_bags([bag], tmp_path / "ds", cv.ConvertOptions(tasks=("depth",), specs=specs, points_per_image=5),
                             progress=False)
    mapping = preparation_map(CAM, small.preprocess)
    assert (mapping.prepared.width, mapping.prepared.height) == (144, 108)
    for row in rows_of(result.path):
        targets, frame = json.loads(row["targets"]), json.loads(row["meta"])["frames"][0]
        assert targets["kind"] == "z" and row["images"][0].size == (144, 108)
        z = syn.ray_distance(seq.scene, seq.poses[frame], CAM, nearest_source_pixel(mapping, np.asarray(targets["pixels"])),
                             kind="z")
        np.testing.assert_allclose(targets["values"], z, rtol=2e-6)
    assert protocol.load_protocol(result.path)["depth"] == small


# --------------------------------------------------------------------------------------------
# Bad input, atomicity, splits
# --------------------------------------------------------------------------------------------


def _messy_bag(path: Path, seq: syn.SyntheticSequence) -> Path:
    """Good frames plus: an image without camera info (unpaired), a depth image with no image
    (unpaired), a damaged depth image and a pose with a zero quaternion (corrupt), and a frame
    whose depth is all beyond 80 m (out of range)."""
    T = typestore().types
    with RgbdBagWriter(path, depth_encoding="32FC1") as writer:
        for frame in seq:
            writer.write_frame(frame.stamp_ns, rgb=frame.rgb, intrinsics=seq.intrinsics, depth_m=frame.depth,
                               T_w_c=frame.T_w_c)
        base = int(seq.stamps_ns[-1])
        frame = seq.frame(0)
        writer.write_frame(base + 10**8, rgb=frame.rgb)  # unpaired image
        writer.write_frame(base + 2 * 10**8, depth_m=frame.depth)  # unpaired depth
        # Corrupt depth: the data is shorter than the image size needs.
        stamp = base + 3 * 10**8
        writer.write_frame(stamp, rgb=frame.rgb, intrinsics=seq.intrinsics, T_w_c=frame.T_w_c)
        header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9),
                                          frame_id="camera_optical_frame")
        bad = T["sensor_msgs/msg/Image"](header=header, height=72, width=96, encoding="32FC1", is_bigendian=0, step=384,
                                         data=np.zeros(100, dtype=np.uint8))
        writer.write("/camera/depth/image_raw", "sensor_msgs/msg/Image", stamp, bad)
        # Corrupt pose: a zero quaternion.
        stamp = base + 4 * 10**8
        writer.write_frame(stamp, rgb=frame.rgb, intrinsics=seq.intrinsics, depth_m=frame.depth)
        header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9),
                                          frame_id="map")
        pose = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=0.0, y=0.0, z=0.0),
                                           orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=0.0))
        writer.write("/ground_truth/pose", "geometry_msgs/msg/PoseStamped", stamp,
                     T["geometry_msgs/msg/PoseStamped"](header=header, pose=pose))
        # Out of range: everything at 100 m.
        writer.write_frame(base + 5 * 10**8, rgb=frame.rgb, intrinsics=seq.intrinsics,
                           depth_m=np.full((72, 96), 100.0, dtype=np.float32), T_w_c=frame.T_w_c)
    return path


def test_summary_counts_unpaired_corrupt_and_out_of_range(tmp_path):
    seq = syn.generate_sequence(seed=8, frames=3, intrinsics=CAM, supersample=1)
    bag = _messy_bag(tmp_path / "messy", seq)
    options = cv.ConvertOptions(tasks=("depth", "pose"), points_per_image=3, pose_gaps=(1,))
    result = cv.convert_bags([bag], tmp_path / "ds", options, progress=False)
    s = result.summary
    assert s["skipped"]["unpaired_messages"] == 2  # the lone image and the lone depth image
    assert s["skipped"]["corrupt_messages"] == 2  # damaged depth, zero quaternion
    assert s["skipped"]["dropped_frames"] == 2
    assert s["skipped"]["frames_out_of_range"] == 1
    assert s["frames_read"] == 4 and s["samples"] == {"depth": 3, "pose": 3}
    bag_summary = s["bags"][0]
    assert bag_summary["corrupt"]["/camera/depth/image_raw"] == 1 and bag_summary["corrupt"]["/ground_truth/pose"] == 1
    assert bag_summary["unpaired"]["/camera/image_raw"] == 1 and bag_summary["unpaired"]["/camera/depth/image_raw"] == 1
    assert any("frame 3" in r and "depth range" in r for r in s["reasons"])
    assert json.loads((result.path / "summary.json").read_text())["skipped"] == s["skipped"]


def test_failure_or_interrupt_leaves_no_dataset(synthetic, tmp_path, monkeypatch):
    _, bag, result = synthetic
    calls = {"n": 0}
    real = samples_module.png_bytes

    def interrupted(rgb):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a conversion
        return real(rgb)

    monkeypatch.setattr(samples_module, "png_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cv.convert_bags([bag], tmp_path / "ds", cv.ConvertOptions(), progress=False)
    assert calls["n"] == 4
    assert list(tmp_path.iterdir()) == []
    # An existing dataset survives a failed overwrite untouched.
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "marker").write_text("old")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        cv.convert_bags([bag], existing, cv.ConvertOptions(), overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["existing"] and (existing / "marker").read_text() == "old"
    # A bag that is not one fails after the first bag was converted: nothing is left either.
    monkeypatch.setattr(samples_module, "png_bytes", real)
    not_a_bag = tmp_path / "not_a_bag"
    not_a_bag.mkdir()
    with pytest.raises(Exception, match="not a rosbag2 directory"):
        cv.convert_bags([bag, not_a_bag], tmp_path / "ds", cv.ConvertOptions(tasks=("depth",)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "not_a_bag"]


def test_splits_by_frame_and_by_bag(synthetic, tmp_path):
    _, bag, _ = synthetic
    options = cv.ConvertOptions(tasks=("depth", "pose"), points_per_image=2, pose_gaps=(1,), split="frame",
                                val_fraction=0.34)
    result = cv.convert_bags([bag], tmp_path / "by_frame", options, progress=False)
    split_of = {json.loads(r["meta"])["frames"][0]: json.loads(r["meta"])["split"] for r in rows_of(result.path, "depth")}
    assert split_of == {0: "train", 1: "train", 2: "train", 3: "train", 4: "val", 5: "val"}
    pose_pairs = [json.loads(r["meta"])["frames"] for r in rows_of(result.path, "pose")]
    assert [3, 4] not in pose_pairs and result.summary["skipped"]["pairs_across_split"] == 1
    assert result.summary["samples_by_split"]["val"] == {"depth": 2, "pose": 1}

    other = syn.write_bag(syn.generate_sequence(seed=9, frames=2, intrinsics=CAM, supersample=1), tmp_path / "other")
    options = cv.ConvertOptions(tasks=("depth",), points_per_image=2, split="bag", val_fraction=0.5)
    result = cv.convert_bags([bag, other], tmp_path / "by_bag", options, progress=False)
    for row in rows_of(result.path):
        meta = json.loads(row["meta"])
        assert meta["split"] == ("val" if meta["source"] == str(other) else "train")
    with pytest.raises(cv.ConvertError, match="at least two bags"):
        cv.convert_bags([bag], tmp_path / "x", options, progress=False)


# --------------------------------------------------------------------------------------------
# LiDAR depth and TF poses
# --------------------------------------------------------------------------------------------


def _transform_msg(T, parent: str, child: str, stamp: int, M):
    from scipy.spatial.transform import Rotation

    qx, qy, qz, qw = Rotation.from_matrix(T[:3, :3]).as_quat()
    header = M["std_msgs/msg/Header"](stamp=M["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9),
                                      frame_id=parent)
    transform = M["geometry_msgs/msg/Transform"](
        translation=M["geometry_msgs/msg/Vector3"](x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
        rotation=M["geometry_msgs/msg/Quaternion"](x=float(qx), y=float(qy), z=float(qz), w=float(qw)))
    return M["geometry_msgs/msg/TransformStamped"](header=header, child_frame_id=child, transform=transform)


def _cloud_msg(points: np.ndarray, frame_id: str, stamp: int, M):
    from vlm3_ros.msg_codec import cloud_fields

    fields = cloud_fields({"x": points[:, 0].astype(np.float32), "y": points[:, 1].astype(np.float32),
                           "z": points[:, 2].astype(np.float32)})
    header = M["std_msgs/msg/Header"](stamp=M["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9),
                                      frame_id=frame_id)
    point_fields = [M["sensor_msgs/msg/PointField"](**f) for f in fields.pop("fields")]
    data = np.frombuffer(fields.pop("data"), dtype=np.uint8)
    return M["sensor_msgs/msg/PointCloud2"](header=header, fields=point_fields, data=data, **fields)


def test_lidar_depth_through_tf_and_tf_poses(tmp_path):
    """A robot (map -> base_link on /tf) carrying a camera and a LiDAR (static extrinsics on
    /tf_static); depth comes only from the cloud, poses only from TF."""
    seq = syn.generate_sequence(seed=12, frames=4, intrinsics=CAM, supersample=1)
    M = typestore().types
    from scipy.spatial.transform import Rotation

    T_base_cam = syn.look_pose((0.1, 0.0, 0.3), 0.0)  # forward-looking camera (optical frame)
    T_base_lidar = np.eye(4)  # a LiDAR (x forward, z up) turned by 10 degrees, above the camera
    T_base_lidar[:3, :3] = Rotation.from_euler("z", 10, degrees=True).as_matrix()
    T_base_lidar[:3, 3] = (0.05, 0.02, 0.45)
    T_cam_lidar = np.linalg.inv(T_base_cam) @ T_base_lidar
    path = tmp_path / "robot"
    with RgbdBagWriter(path, topics={"depth": None, "pose": None}) as writer:
        static = M["tf2_msgs/msg/TFMessage"](transforms=[
            _transform_msg(T_base_cam, "base_link", "camera_optical_frame", int(seq.stamps_ns[0]), M),
            _transform_msg(T_base_lidar, "base_link", "lidar", int(seq.stamps_ns[0]), M)])
        writer.write("/tf_static", "tf2_msgs/msg/TFMessage", int(seq.stamps_ns[0]), static)
        rng = np.random.default_rng(0)
        wiggle = Rotation.from_rotvec(np.radians(3.0) * np.array([0.6, 0.0, 0.8]))
        for frame in seq:
            stamp = frame.stamp_ns
            T_map_base = frame.T_w_c @ np.linalg.inv(T_base_cam)
            # Robot poses 25 ms before and after each image, off by a small motion either way:
            # interpolating them at the image stamp (slerp, linear) gives the true pose exactly.
            before, after = T_map_base.copy(), T_map_base.copy()
            before[:3, :3] = T_map_base[:3, :3] @ wiggle.as_matrix()
            after[:3, :3] = T_map_base[:3, :3] @ wiggle.inv().as_matrix()
            before[:3, 3] += (0.02, -0.01, 0.005)
            after[:3, 3] -= (0.02, -0.01, 0.005)
            for dt, T in ((-25_000_000, before), (25_000_000, after)):
                writer.write("/tf", "tf2_msgs/msg/TFMessage", stamp + dt,
                             M["tf2_msgs/msg/TFMessage"](transforms=[_transform_msg(T, "map", "base_link", stamp + dt, M)]))
            writer.write_frame(stamp, rgb=frame.rgb, intrinsics=CAM)
            # The cloud: every other pixel's scene point (in the lidar frame), plus points twice as
            # far along the same rays (hidden behind them: the z-buffer must drop them), plus
            # points behind the camera.
            rows, cols = np.nonzero(np.isfinite(frame.depth))
            keep = (rows % 2 == 0) & (cols % 2 == 0)
            rows, cols = rows[keep], cols[keep]
            z = frame.depth[rows, cols].astype(np.float64)
            cam_pts = syn.camera_rays(CAM, np.stack([cols, rows], axis=1)) * z[:, None]
            cam_pts = np.concatenate([cam_pts, cam_pts * 2.0, -cam_pts[:50]])
            lidar_pts = cam_pts @ np.linalg.inv(T_cam_lidar)[:3, :3].T + np.linalg.inv(T_cam_lidar)[:3, 3]
            lidar_pts = lidar_pts[rng.permutation(len(lidar_pts))]
            writer.write("/lidar/points", "sensor_msgs/msg/PointCloud2", stamp, _cloud_msg(lidar_pts, "lidar", stamp, M))
    options = cv.ConvertOptions(tasks=("depth", "pose"), points_per_image=10, pose_gaps=(2,), cloud_topic="/lidar/points",
                                min_covisibility=0.0)
    result = cv.convert_bags([path], tmp_path / "ds", options, progress=False)
    bag_summary = result.summary["bags"][0]
    assert bag_summary["depth_source"] == "cloud" and bag_summary["pose_source"] == "tf"
    assert bag_summary["world_frame"] == "map" and bag_summary["unpaired_clouds"] == 0
    mapping = preparation_map(CAM, protocol.DEPTH.preprocess)
    K_prep = mapping.prepared.K
    depth_rows = rows_of(result.path, "depth")
    assert len(depth_rows) == 4
    for row in depth_rows:
        targets, frame = json.loads(row["targets"]), json.loads(row["meta"])["frames"][0]
        q = np.asarray(targets["pixels"])
        source = nearest_source_pixel(mapping, q)
        assert np.all(source % 2 == 0)  # only pixels the cloud covers are labelled
        z = syn.ray_distance(seq.scene, seq.poses[frame], CAM, source, kind="z")
        ray = np.linalg.norm(np.linalg.inv(K_prep) @ np.c_[q, np.ones(len(q))].T, axis=0)
        np.testing.assert_allclose(targets["values"], z * ray, rtol=1e-5)  # float32 cloud coordinates
    pose_rows = rows_of(result.path, "pose")
    assert len(pose_rows) == 2
    for row in pose_rows:
        i, j = json.loads(row["meta"])["frames"]
        np.testing.assert_allclose(json.loads(row["targets"])["T"], relative_pose(seq.poses[i], seq.poses[j]), atol=1e-6)

    # The same cloud with the extrinsic given instead of looked up.
    options.lidar_extrinsic = T_cam_lidar
    options.tasks = ("depth",)
    again = cv.convert_bags([path], tmp_path / "ds2", options, progress=False)
    assert [r["targets"] for r in rows_of(again.path)] == [r["targets"] for r in depth_rows]


def test_odometry_poses_of_the_robot_base_composed_with_tf(tmp_path):
    """nav_msgs/Odometry of base_link in odom, and the camera mounted on the base (/tf_static)."""
    seq = syn.generate_sequence(seed=13, frames=3, intrinsics=CAM, supersample=1)
    M = typestore().types
    T_base_cam = syn.look_pose((0.2, -0.05, 0.4), 0.1, pitch=-5.0)
    path = tmp_path / "odom"
    with RgbdBagWriter(path, topics={"pose": None}) as writer:
        writer.write("/tf_static", "tf2_msgs/msg/TFMessage", int(seq.stamps_ns[0]), M["tf2_msgs/msg/TFMessage"](
            transforms=[_transform_msg(T_base_cam, "base_link", "camera_optical_frame", int(seq.stamps_ns[0]), M)]))
        for frame in seq:
            writer.write_frame(frame.stamp_ns, rgb=frame.rgb, intrinsics=CAM, depth_m=frame.depth)
            tf = _transform_msg(frame.T_w_c @ np.linalg.inv(T_base_cam), "odom", "base_link", frame.stamp_ns, M)
            t, q = tf.transform.translation, tf.transform.rotation
            pose = M["geometry_msgs/msg/PoseWithCovariance"](
                pose=M["geometry_msgs/msg/Pose"](position=M["geometry_msgs/msg/Point"](x=t.x, y=t.y, z=t.z), orientation=q),
                covariance=np.zeros(36))
            twist = M["geometry_msgs/msg/TwistWithCovariance"](
                twist=M["geometry_msgs/msg/Twist"](linear=M["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
                                                   angular=M["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)),
                covariance=np.zeros(36))
            writer.write("/odom", "nav_msgs/msg/Odometry", frame.stamp_ns,
                         M["nav_msgs/msg/Odometry"](header=tf.header, child_frame_id="base_link", pose=pose, twist=twist))
    options = cv.ConvertOptions(tasks=("pose",), pose_gaps=(1, 2), min_covisibility=0.0,
                                topics={"pose": "/odom"})
    result = cv.convert_bags([path], tmp_path / "ds", options, progress=False)
    assert result.summary["bags"][0]["pose_source"] == "topic"
    rows = rows_of(result.path, "pose")
    assert len(rows) == 3
    for row in rows:
        i, j = json.loads(row["meta"])["frames"]
        np.testing.assert_allclose(json.loads(row["targets"])["T"], relative_pose(seq.poses[i], seq.poses[j]), atol=1e-9)


@pytest.mark.parametrize("model, D", [("plumb_bob", (-0.25, 0.08, 0.001, -0.002, 0.0)),
                                      ("equidistant", (0.05, -0.01, 0.002, 0.0))])
def test_rays_and_projection_round_trip_through_lens_distortion(model, D):
    cam = Intrinsics(640, 480, 500.0, 505.0, 322.0, 238.0, model, D)
    rng = np.random.default_rng(0)
    uv = rng.uniform((20, 20), (620, 460), size=(200, 2))
    rays = cv.normalized_rays(uv, cam)
    assert np.all(rays[:, 2] == 1.0)
    depth = rng.uniform(0.5, 20.0, size=200)
    back, z = cv.project_points(rays * depth[:, None], cam)
    np.testing.assert_allclose(back, uv, atol=1e-6)
    np.testing.assert_allclose(z, depth)
    # Without distortion the rays are K^-1 [u, v, 1] exactly.
    ideal = Intrinsics(640, 480, 500.0, 505.0, 322.0, 238.0)
    np.testing.assert_allclose(cv.normalized_rays(uv, ideal), (np.linalg.inv(ideal.K) @ np.c_[uv, np.ones(200)].T).T)


def test_project_cloud_keeps_the_nearest_point_per_pixel():
    cam = Intrinsics.from_focal(8, 6, 10.0)
    near = np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.1, 0.0, 1.0], [0.0, 0.0, -1.0], [50.0, 0.0, 1.0]])
    depth = cv.project_cloud(near, np.eye(4), cam)
    # (0, 0, 2) and (0, 0, 3) hit the principal point pixel (3.5, 2.5) -> nearest (3 or 4, 2 or 3).
    assert np.count_nonzero(np.isfinite(depth)) == 2
    col, row = int(np.floor(3.5 + 0.5)), int(np.floor(2.5 + 0.5))
    assert depth[row, col] == 2.0
    assert depth[row, int(np.floor(3.5 + 10 * 0.1 + 0.5))] == 1.0


# --------------------------------------------------------------------------------------------
# Real frames
# --------------------------------------------------------------------------------------------


def test_sevenscenes_frames_yield_their_ground_truth(sevenscenes, tmp_path):
    """Real frames made into a bag by ``vlm3-ros bag from-rgbd``; every fourth frame is used."""
    from vlm3_ros.cli.main import main as vlm3_ros_main

    path = tmp_path / "kitchen"
    assert vlm3_ros_main(["bag", "from-rgbd", str(sevenscenes.root), str(path), "--layout", "7scenes", "--count", "9",
                          "--storage", "mcap", "--quiet"]) == 0
    ids = sevenscenes.frame_ids[:9]
    K = Intrinsics.from_K(sevenscenes.intrinsics(), 640, 480)
    frames = {n: (sevenscenes.load_depth(fid), sevenscenes.load_pose(fid)) for n, fid in enumerate(ids) if n % 4 == 0}
    options = cv.ConvertOptions(points_per_image=10, points_per_pair=10, frame_stride=4, correspondence_gaps=(1,),
                                pose_gaps=(1, 2))
    result = cv.convert_bags([path], tmp_path / "ds", options, progress=False)
    assert result.summary["samples"] == {"depth": 3, "correspondence": 2, "pose": 3}
    mapping = preparation_map(K, protocol.DEPTH.preprocess)
    for row in rows_of(result.path, "depth"):
        targets, n = json.loads(row["targets"]), json.loads(row["meta"])["frames"][0]
        q = np.asarray(targets["pixels"])
        src = nearest_source_pixel(mapping, q).astype(int)
        z = frames[n][0][src[:, 1], src[:, 0]].astype(np.float64)
        assert np.all(np.isfinite(z))
        z_mm = np.round(z * 1000) / 1000  # the bag stores millimetres
        ray = np.linalg.norm(np.linalg.inv(mapping.prepared.K) @ np.c_[q, np.ones(len(q))].T, axis=0)
        np.testing.assert_allclose(targets["values"], z_mm * ray, rtol=2e-6)
    pose_rows = rows_of(result.path, "pose")
    assert len(pose_rows) == 3
    for row in pose_rows:
        i, j = json.loads(row["meta"])["frames"]
        T = relative_pose(frames[i][1], frames[j][1])
        got = np.asarray(json.loads(row["targets"])["T"])
        assert rotation_angle(got[:3, :3].T @ T[:3, :3]) < 0.05  # stored poses are slightly off orthonormal
        np.testing.assert_allclose(got[:3, 3], T[:3, 3], atol=1e-4)
    corr_rows = rows_of(result.path, "correspondence")
    assert len(corr_rows) == 2
    cmap = preparation_map(K, protocol.CORRESPONDENCE.preprocess)
    for row in corr_rows:
        i, j = json.loads(row["meta"])["frames"]
        targets = json.loads(row["targets"])
        p1, p2 = np.asarray(targets["pixels1"]), np.asarray(targets["pixels2"])
        src = nearest_source_pixel(cmap, p1).astype(int)
        z1 = np.round(frames[i][0][src[:, 1], src[:, 0]].astype(np.float64) * 1000) / 1000
        Kc = cmap.prepared.K
        X = (np.linalg.inv(Kc) @ np.c_[p1, np.ones(len(p1))].T).T * z1[:, None]
        T = relative_pose(frames[j][1], frames[i][1])
        Xj = X @ T[:3, :3].T + T[:3, 3]
        uv = (Kc @ Xj.T).T
        np.testing.assert_allclose(uv[:, :2] / uv[:, 2:], p2, atol=0.05)
        # Visible in frame 2: its measured depth agrees within the occlusion tolerance.
        dst = nearest_source_pixel(cmap, p2).astype(int)
        np.testing.assert_allclose(frames[j][0][dst[:, 1], dst[:, 0]], Xj[:, 2], rtol=0.05)


def test_convert_command(synthetic, tmp_path, capsys):
    from vlm3_train.cli import main

    _, bag, _ = synthetic
    out = tmp_path / "ds"
    assert main(["convert", str(bag), str(out), "--tasks", "depth,pose", "--points-per-image", "3", "--pose-gaps", "4",
                 "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == {"depth": FRAMES, "pose": 2}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arguments"]["points_per_image"] == 3 and summary["options"]["pose_gaps"] == [4]
    assert main(["convert", str(bag), str(out), "--quiet"]) == 2  # exists
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--quiet"]) == 2
    assert main(["convert", str(bag), str(tmp_path / "y"), "--tasks", "depth,normals", "--quiet"]) == 2
    assert "unknown task 'normals'" in capsys.readouterr().err


def test_a_killed_conversion_is_cleaned_by_the_next_one(synthetic, tmp_path):
    """A real SIGKILL in the middle of a conversion leaves its staging folder; the next conversion
    into the same folder removes it (and leaves folders that are not its own alone)."""
    import signal
    import subprocess
    import sys

    _, bag, _ = synthetic
    script = (
        "import os, signal, sys\n"
        "from vlm3_train import convert as cv\n"
        "from vlm3_train.convert import samples\n"
        "real, calls = samples.png_bytes, [0]\n"
        "def png_bytes(rgb):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(rgb)\n"
        "samples.png_bytes = png_bytes\n"
        "cv.convert_bags([sys.argv[1]], sys.argv[2], cv.ConvertOptions(), progress=False)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(bag), str(tmp_path / "ds")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".ds.") and left[0].name.endswith(".partial")
    assert any((left[0] / "cache").rglob("*.arrow"))  # rows were being written
    foreign = tmp_path / ".notes.partial"
    foreign.mkdir()

    result = cv.convert_bags([bag], tmp_path / "other", cv.ConvertOptions(tasks=("depth",)), progress=False)
    assert result.summary["samples"] == {"depth": FRAMES}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.partial", "other"]


def test_no_samples_is_the_package_error(synthetic, tmp_path, capsys):
    from vlm3_train.cli import main

    _, bag, _ = synthetic
    with pytest.raises(cv.ConvertError, match="no samples could be made .*no depth topic"):
        cv.convert_bags([bag], tmp_path / "ds", cv.ConvertOptions(tasks=("depth",), topics={"depth": "/nothing"}),
                        progress=False)
    assert main(["convert", str(bag), str(tmp_path / "ds"), "--depth-topic", "/nothing", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlm3-train convert: no samples could be made") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_convert_takes_the_readme_pattern_of_synth_output(tmp_path, capsys):
    """`vlm3-train synth data/synth` then `vlm3-train convert data/synth/scene_* ...` (the README's
    commands): the pattern also matches the scenes' JSON descriptions, which are skipped."""
    import glob

    from vlm3_train.cli import main

    synth = tmp_path / "synth"
    assert main(["synth", str(synth), "--scenes", "2", "--frames", "3", "--size", "96x72", "--fx", "80",
                 "--supersample", "1", "--quiet"]) == 0
    capsys.readouterr()
    inputs = sorted(glob.glob(str(synth / "scene_*")))
    assert [Path(p).name for p in inputs] == ["scene_000", "scene_000.json", "scene_001", "scene_001.json"]
    assert main(["convert", *inputs, str(tmp_path / "ds"), "--split", "bag", "--tasks", "depth", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "scene_000.json" in captured.err and "scene_001.json" in captured.err
    printed = json.loads(captured.out)
    assert printed["samples_by_split"] == {"train": {"depth": 3}, "val": {"depth": 3}}
    # A bag's storage file is a recording by itself; only other files are skipped.
    mcap_dir = tmp_path / "mcap"
    syn.write_bag(syn.generate_sequence(seed=1, frames=2, intrinsics=CAM, supersample=1), mcap_dir, storage="mcap")
    assert main(["convert", *glob.glob(str(mcap_dir / "*.mcap")), str(tmp_path / "ds2"), "--tasks", "depth",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == {"depth": 2}
    assert main(["convert", inputs[1], inputs[3], str(tmp_path / "ds3"), "--quiet"]) == 2
    assert "no rosbag2 recording among the inputs" in capsys.readouterr().err
    assert not (tmp_path / "ds3").exists()
