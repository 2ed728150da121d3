"""Geometry and metrics checked against real 7-Scenes RGB-D frames with ground-truth poses.

The loader tests at the top use small synthetic files and always run; the rest read
``../shared/data/7scenes_redkitchen`` (or ``$VLM3_SHARED_DATA/7scenes_redkitchen``) and skip
when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from vlm3_ros import geometry as g
from vlm3_ros import metrics as m
from vlm3_ros.datasets.sevenscenes import DEFAULT_INTRINSICS, DatasetError, SevenScenes

PAIRS = [(150, 160), (150, 175), (150, 199)]


# ------------------------------------------------------------------------------------------
# Loader on synthetic files
# ------------------------------------------------------------------------------------------


def _write_frame(folder: Path, i: int, depth_raw: np.ndarray, pose: np.ndarray) -> None:
    bgr = np.zeros(depth_raw.shape + (3,), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's BGR order
    bgr[..., 2] = 10  # red
    cv2.imwrite(str(folder / f"frame-{i:06d}.color.png"), bgr)
    cv2.imwrite(str(folder / f"frame-{i:06d}.depth.png"), depth_raw.astype(np.uint16))
    np.savetxt(folder / f"frame-{i:06d}.pose.txt", pose)


def test_loader_units_invalid_depth_rgb_order_and_layout(tmp_path):
    raw = np.array([[0, 1000, 2500], [65535, 1234, 1]], np.uint16)
    pose = g.make_pose(g.euler_to_matrix(10, 0, 0), [1.0, 2.0, 3.0])
    _write_frame(tmp_path, 3, raw, pose)
    _write_frame(tmp_path, 1, raw, np.eye(4))
    ds = SevenScenes(tmp_path)  # frames directly in the folder, no intrinsics file
    assert ds.frame_ids == [1, 3] and len(ds) == 2
    np.testing.assert_array_equal(ds.intrinsics(), DEFAULT_INTRINSICS)
    rgb, depth, T = ds.load_frame(3)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert (rgb[..., 0] == 10).all() and (rgb[..., 2] == 200).all()  # converted to RGB
    assert depth.dtype == np.float32
    np.testing.assert_allclose(depth, [[np.nan, 1.0, 2.5], [np.nan, 1.234, 0.001]], rtol=1e-6)
    np.testing.assert_allclose(T, pose, atol=1e-15)
    assert ds.poses().shape == (2, 4, 4)
    with pytest.raises(DatasetError, match="frame 2 not in this sequence"):
        ds.load_depth(2)

    # tsdf-fusion layout: rgbd-frames/ plus camera-intrinsics.txt.
    seq = tmp_path / "seq"
    (seq / "rgbd-frames").mkdir(parents=True)
    _write_frame(seq / "rgbd-frames", 7, raw, np.eye(4))
    K = np.array([[500.0, 0, 1.0], [0, 510.0, 1.0], [0, 0, 1]])
    np.savetxt(seq / "camera-intrinsics.txt", K)
    ds2 = SevenScenes(seq)
    assert ds2.frame_ids == [7]
    np.testing.assert_array_equal(ds2.intrinsics(), K)


def test_loader_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        SevenScenes(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no frame"):
        SevenScenes(tmp_path)
    (tmp_path / "frame-000000.pose.txt").write_text("1 0 0\n0 1 0\n")
    with pytest.raises(DatasetError, match="4x4"):
        SevenScenes(tmp_path).load_pose(0)


# ------------------------------------------------------------------------------------------
# Real frames
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene(sevenscenes):
    ds = sevenscenes
    frames = {i: ds.load_frame(i) for i in {i for pair in PAIRS for i in pair}}
    return ds, frames


def _project_into(scene, i: int, j: int, stride: int):
    """Frame i's depth projected into frame j with ground truth; returns everything needed."""
    ds, frames = scene
    K = ds.intrinsics()
    _, depth_i, T_w_i = frames[i]
    _, depth_j, T_w_j = frames[j]
    p_i, uv_i = g.depth_image_to_points(depth_i, K, stride=stride)
    T_j_i = g.relative_pose(T_w_j, T_w_i)
    p_j = g.transform_points(T_j_i, p_i)
    uv_j, z_j = g.project(p_j, K)
    z_meas = g.sample_nearest(depth_j, uv_j)
    return K, p_i, uv_i, depth_i, uv_j, z_j, z_meas, g.relative_pose(T_w_i, T_w_j)


def test_real_frame_facts(scene):
    ds, frames = scene
    assert len(ds) == 50 and ds.frame_ids[0] == 150 and ds.frame_ids[-1] == 199
    np.testing.assert_array_equal(ds.intrinsics(), [[585, 0, 320], [0, 585, 240], [0, 0, 1]])
    rgb, depth, T = frames[150]
    assert rgb.shape == (480, 640, 3) and depth.shape == (480, 640)
    assert 0.85 < np.nanmean(~np.isnan(depth)) < 0.92  # about 88% valid
    assert np.nanmin(depth) == pytest.approx(0.94, abs=0.01)
    assert np.nanmax(depth) == pytest.approx(2.86, abs=0.01)
    # Colour is RGB: matches OpenCV's BGR read reversed.
    bgr = cv2.imread(str(ds.path(150, "color.png")))
    np.testing.assert_array_equal(rgb, bgr[..., ::-1])
    # Camera motion from the first to the last frame: about 32 degrees and 0.21 m.
    T_rel = g.relative_pose(ds.load_pose(150), ds.load_pose(199))
    assert g.rotation_angle(T_rel[:3, :3]) == pytest.approx(32.0, abs=1.5)
    assert np.linalg.norm(T_rel[:3, 3]) == pytest.approx(0.21, abs=0.01)


@pytest.mark.parametrize("i, j", PAIRS)
def test_depth_reprojects_consistently_with_ground_truth_poses(scene, i, j):
    _, _, _, _, _, z_j, z_meas, _ = _project_into(scene, i, j, stride=2)
    ok = np.isfinite(z_meas)
    assert ok.mean() > 0.3
    err = np.abs(z_meas[ok] - z_j[ok])
    assert np.median(err) < 0.03  # measured here: 0.9, 1.3 and 2.0 cm


def test_wrong_pose_direction_breaks_reprojection(scene):
    """The same check with the relative pose inverted fails: the convention matters."""
    ds, frames = scene
    K = ds.intrinsics()
    _, depth_i, T_w_i = frames[150]
    _, depth_j, T_w_j = frames[199]
    p_i, _ = g.depth_image_to_points(depth_i, K, stride=4)
    wrong = g.relative_pose(T_w_i, T_w_j)  # camera i <- camera j, applied the wrong way round
    uv, z = g.project(g.transform_points(wrong, p_i), K)
    z_meas = g.sample_nearest(depth_j, uv)
    ok = np.isfinite(z_meas)
    assert np.median(np.abs(z_meas[ok] - z[ok])) > 0.05


def _visible_correspondences(scene, i, j, stride=4, tol=0.03):
    K, p_i, uv_i, depth_i, uv_j, z_j, z_meas, T_gt = _project_into(scene, i, j, stride)
    vis = np.isfinite(z_meas) & (np.abs(z_meas - z_j) < tol)
    return K, p_i[vis], uv_i[vis], p_i[vis][:, 2], uv_j[vis], z_meas[vis], T_gt


@pytest.mark.parametrize("i, j", PAIRS)
def test_pnp_recovers_ground_truth_relative_pose(scene, i, j):
    K, _, uv_i, z_i, uv_j, _, T_gt = _visible_correspondences(scene, i, j)
    assert len(uv_i) > 1000
    # Pixel-quantised matches (as a matcher would report), plus 15% gross outliers.
    uv2 = np.floor(uv_j + 0.5)
    rng = np.random.default_rng(i + j)
    out = rng.choice(len(uv2), len(uv2) * 15 // 100, replace=False)
    uv2[out] = np.stack([rng.uniform(0, 639, len(out)), rng.uniform(0, 479, len(out))], 1)
    est = g.pose_from_correspondences(uv_i, z_i, uv2, K)
    E = g.invert_pose(T_gt) @ est.T
    rot_err = g.rotation_angle(E[:3, :3])
    dir_err = g.angle_between(est.T[:3, 3], T_gt[:3, 3])
    assert rot_err < 0.5, rot_err  # measured: <= 0.003 deg
    assert dir_err < 2.0, dir_err  # measured: <= 0.1 deg
    assert est.inliers[out].mean() < 0.05
    # The same numbers through the metric used for pose AUC.
    r, t = m.relative_pose_errors(est.T[:3, :3], est.T[:3, 3], T_gt[:3, :3], T_gt[:3, 3])
    assert r == pytest.approx(rot_err, abs=1e-6) and t <= dir_err + 1e-9


@pytest.mark.parametrize("i, j", PAIRS)
def test_umeyama_on_measured_3d_matches_recovers_pose(scene, i, j):
    # Frame i's points against frame j's own measured depth at the matching pixels: real sensor
    # noise on both sides, so the tolerances are looser than for PnP.
    K, p_i, _, _, uv_j, _, T_gt = _visible_correspondences(scene, i, j)
    uv_px = np.floor(uv_j + 0.5)
    _, frames = scene
    p_j = g.backproject(uv_px, g.sample_nearest(frames[j][1], uv_px), K)
    est = g.estimate_pose_3d(p_i, p_j, ransac=True, threshold=0.02)
    E = g.invert_pose(T_gt) @ est.T
    assert g.rotation_angle(E[:3, :3]) < 0.75  # measured: 0.06 / 0.18 / 0.47 deg
    assert np.linalg.norm(E[:3, 3]) < 0.03  # measured: 0.3 / 0.7 / 2.1 cm
    assert est.num_inliers > 0.6 * len(p_i)
    # With ground-truth transformed points the recovery is exact up to the stored poses being
    # about 2e-4 off orthonormal (the fit returns a proper rotation).
    T_exact = g.pose_from_3d_matches(p_i, g.transform_points(g.invert_pose(T_gt), p_i))
    np.testing.assert_allclose(T_exact, T_gt, atol=1e-4)
    assert np.abs(T_exact[:3, :3].T @ T_exact[:3, :3] - np.eye(3)).max() < 1e-12


def test_ate_and_rpe_of_ground_truth_trajectory(scene):
    ds, _ = scene
    gt = ds.poses()
    A = g.make_pose(g.euler_to_matrix(120, -35, 60), [3.0, -1.0, 10.0])
    pred = A @ gt
    res = m.ate(pred, gt)
    assert res["rmse"] < 1e-9 and res["max"] < 1e-9
    assert m.ate(pred, gt, align="none")["rmse"] > 5.0
    scaled = pred.copy()
    scaled[:, :3, 3] *= 0.5
    assert m.ate(scaled, gt, align="sim3")["rmse"] < 1e-9
    r = m.rpe(pred, gt)
    assert r["trans_max"] < 1e-9 and r["rot_max_deg"] < 1e-3 and r["num_pairs"] == 49
    # Consecutive frames move about 0.7 degrees and 5 mm: a prediction that stands still has
    # RPE of that size.
    still = np.broadcast_to(gt[0], gt.shape)
    r_still = m.rpe(still, gt)
    assert 0.3 < r_still["rot_mean_deg"] < 1.2 and 0.002 < r_still["trans_mean"] < 0.01


# ------------------------------------------------------------------------------------------
# Colour/depth registration
# ------------------------------------------------------------------------------------------


def _edge_agreement(rgb: np.ndarray, depth: np.ndarray) -> float:
    """Mean colour-gradient magnitude at the depth image's edges."""
    logd = np.log(np.where(np.isfinite(depth), depth, 1.0)).astype(np.float32)
    edges = (np.hypot(cv2.Sobel(logd, cv2.CV_32F, 1, 0), cv2.Sobel(logd, cv2.CV_32F, 0, 1)) > 0.3)
    edges &= cv2.erode(np.isfinite(depth).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))[edges].mean())


def test_registration_recovers_a_known_colour_to_depth_similarity():
    from vlm3_ros.datasets.sevenscenes import register_colour_to_depth

    rng = np.random.default_rng(0)
    scale, shift = 1.08, (6.0, -3.0)
    centre = np.array([159.5, 119.5])
    A = np.array([[scale, 0, (1 - scale) * centre[0] + shift[0]], [0, scale, (1 - scale) * centre[1] + shift[1]]])
    rgbs, depths = [], []
    for _ in range(3):
        depth = np.full((240, 320), 3.0, np.float32)
        colour = np.zeros((240, 320, 3), np.uint8)
        colour[:] = rng.integers(0, 255, 3)
        for _ in range(4):  # boxes at other depths, each its own colour
            x, y = rng.integers(20, 220), rng.integers(20, 150)
            w, h = rng.integers(30, 80, size=2)
            depth[y:y + h, x:x + w] = rng.uniform(0.8, 2.5)
            colour[y:y + h, x:x + w] = rng.integers(0, 255, 3)
        # The colour camera sees the scene through A^-1 (A maps colour pixels onto depth pixels).
        rgbs.append(cv2.warpAffine(colour, A, (320, 240), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_REPLICATE))
        depths.append(depth)
    found = register_colour_to_depth(rgbs, depths)
    assert found[0, 0] == pytest.approx(scale, abs=0.005) and found[1, 1] == found[0, 0]
    assert np.abs(found @ [10.0, 20.0, 1.0] - A @ [10.0, 20.0, 1.0]).max() < 1.5
    assert np.abs(found @ [300.0, 220.0, 1.0] - A @ [300.0, 220.0, 1.0]).max() < 1.5
    with pytest.raises(DatasetError, match="no depth edges"):
        register_colour_to_depth([rgbs[0]], [np.full((240, 320), 2.0)])


def test_registered_colour_puts_object_outlines_on_the_depth_edges(scene):
    ds, frames = scene
    affine = ds.colour_registration()
    # The two Kinect cameras: colour about 10 % larger in scale than depth, a few pixels apart.
    assert 1.05 < affine[0, 0] < 1.15 and affine[0, 0] == affine[1, 1]
    for frame in (150, 175, 199):
        rgb, depth, _ = frames[frame]
        registered = ds.load_registered_rgb(frame)
        assert registered.shape == rgb.shape and registered.dtype == np.uint8
        assert _edge_agreement(registered, depth) > 1.5 * _edge_agreement(rgb, depth)
