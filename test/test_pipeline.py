"""Per-frame pipelines through the full question -> answer text -> parse -> 3D path.

The oracle backend answers from ground truth in the protocol's own text, so these tests check the
geometry end to end (focal unification, text coordinates and their rounding, ray vs z, mapping
back to the original camera) against known geometry and against real 7-Scenes ground truth.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vlm3_ros import geometry as g
from vlm3_ros import metrics, protocol
from vlm3_ros.camera import Intrinsics
from vlm3_ros.completion import AdaptiveConfig
from vlm3_ros.engine import OracleBackend
from vlm3_ros.pipeline import CorrespondenceMatcher, DepthEstimator, PoseEstimator, query_grid

ORACLE = OracleBackend()


def _plane_depth(K: np.ndarray, width: int, height: int, normal=(0.1, -0.2, 1.0), offset=2.0) -> np.ndarray:
    """z of the plane n . X = offset seen by camera K."""
    uu, vv = np.meshgrid(np.arange(width), np.arange(height))
    rays = np.linalg.solve(K, np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)])).T
    n = np.asarray(normal, float)
    return (offset / (rays @ n)).reshape(height, width)


def test_query_grid_covers_the_image_inside_the_margin():
    grid = query_grid(640, 480, 64, margin=0.1)
    assert 56 <= len(grid) <= 72
    assert grid[:, 0].min() >= 0.1 * 639 - 0.5 and grid[:, 0].max() <= 0.9 * 639 + 0.5
    assert grid[:, 1].min() >= 0.1 * 479 - 0.5 and grid[:, 1].max() <= 0.9 * 479 + 0.5
    assert np.all(grid == np.round(grid))
    assert len(np.unique(grid, axis=0)) == len(grid)
    with pytest.raises(ValueError):
        query_grid(10, 10, 0)


@pytest.mark.parametrize("depth_kind", ["ray", "z"])
def test_oracle_depth_on_a_plane_projects_onto_the_asked_pixels(depth_kind):
    cam = Intrinsics.from_K(np.array([[300.0, 0, 161.3], [0, 310.0, 118.7], [0, 0, 1]]), 320, 240)
    depth = _plane_depth(cam.K, 320, 240)
    image = np.zeros((240, 320, 3), np.uint8)
    spec = protocol.DEPTH.with_options(depth_kind=depth_kind)
    estimator = DepthEstimator(OracleBackend({"depth": spec}))
    uv = query_grid(320, 240, 50)
    result = estimator.estimate(image, cam, uv, reference_depth=depth)
    assert result.valid.all() and result.parse_failures == 0
    # The referenced pixel is the requested one moved by the protocol's rounding only.
    prepared = result.prepared
    half_unit = 0.5 * np.array([prepared.width * cam.fx / prepared.intrinsics.fx,
                                prepared.height * cam.fy / prepared.intrinsics.fy]) / 2000
    assert np.all(np.abs(result.uv - uv) <= half_unit + 1e-9)
    # Every point projects onto its pixel, and its distance from the origin is the answered value.
    proj, z = g.project(result.points, cam.K)
    np.testing.assert_allclose(proj, result.uv, atol=1e-6)
    answered = np.array([protocol.parse_depth_answer(a) for a in result.answers])
    measured = np.linalg.norm(result.points, axis=1) if depth_kind == "ray" else result.points[:, 2]
    np.testing.assert_allclose(measured, answered, atol=1e-9)
    # And it lies on the plane (answers carry 2 decimals: 5 mm).
    plane_z = _plane_depth(cam.K, 320, 240)
    gt_z = g.sample_nearest(plane_z, result.uv)
    assert np.abs(result.z - gt_z).max() < 0.02
    image_z = result.depth_image(320, 240)
    assert image_z.dtype == np.float32 and np.isfinite(image_z).sum() == len(uv)


def test_distorted_camera_points_project_back_through_the_distortion():
    D = (-0.28, 0.09, 0.001, -0.0015, -0.01)
    cam = Intrinsics.from_K(np.array([[420.0, 0, 322.0], [0, 415.0, 241.0], [0, 0, 1]]), 640, 480, D=D,
                            distortion_model="plumb_bob")
    depth = np.full((480, 640), 3.0)
    result = DepthEstimator(ORACLE).estimate(np.zeros((480, 640, 3), np.uint8), cam, query_grid(640, 480, 40, 0.15),
                                             reference_depth=depth)
    assert result.valid.mean() > 0.9
    ok = result.valid
    proj, _ = cv2.projectPoints(result.points[ok], np.zeros(3), np.zeros(3), cam.K, np.array(D))
    assert np.abs(proj.reshape(-1, 2) - result.uv[ok]).max() < 0.5
    assert np.abs(result.z[ok] - 3.0).max() < 0.01


def test_pixels_outside_the_image_are_not_asked():
    cam = Intrinsics.from_focal(320, 240, 250.0)
    uv = np.array([[10.0, 10.0], [-50.0, 10.0], [100.0, 500.0]])
    result = DepthEstimator(ORACLE).estimate(np.zeros((240, 320, 3), np.uint8), cam, uv,
                                             reference_depth=np.full((240, 320), 1.5))
    assert result.valid.tolist() == [True, False, False]
    assert result.answers[1] is None and result.errors[1].startswith("outside")
    assert result.parse_failures == 0 and len(result.response.answers) == 1


def test_tiny_model_answers_are_parsed_or_counted_as_failures(tiny_backend, sevenscenes):
    rgb, depth, _ = sevenscenes.load_frame(150)
    cam = Intrinsics.from_K(sevenscenes.intrinsics(), rgb.shape[1], rgb.shape[0])
    result = DepthEstimator(tiny_backend, max_new_tokens=8).estimate(rgb, cam, query_grid(640, 480, 6))
    assert len(result.answers) == 6 and all(a is not None for a in result.answers)
    # A random model does not follow the protocol: every answer is a counted parse failure, none a guess.
    assert result.parse_failures == int((~result.valid).sum())
    assert np.all(np.isnan(result.points[~result.valid]))
    assert result.prepared.intrinsics.fx == 1000.0


def test_oracle_depth_reproduces_sevenscenes_ground_truth(sevenscenes):
    """delta1 = 1.0 and 3D points within 1 cm (median) of direct back-projection of the sensor depth."""
    rgb, depth, _ = sevenscenes.load_frame(150)
    cam = Intrinsics.from_K(sevenscenes.intrinsics(), rgb.shape[1], rgb.shape[0])
    uv = query_grid(640, 480, 100, margin=0.05)
    gt_z = g.sample_nearest(depth, uv)
    uv = uv[np.isfinite(gt_z)]
    result = DepthEstimator(ORACLE).estimate(rgb, cam, uv, reference_depth=depth)
    assert result.prepared.width == 1094 and result.prepared.intrinsics.fx == 1000.0
    assert result.valid.mean() > 0.95
    direct = g.backproject(uv, g.sample_nearest(depth, uv), cam.K)
    gt_ray = np.linalg.norm(direct, axis=1)
    assert metrics.delta1(np.where(result.valid, result.distance, np.nan), gt_ray) >= result.valid.mean()
    assert metrics.delta1(result.distance[result.valid], gt_ray[result.valid]) == 1.0
    err = np.linalg.norm(result.points[result.valid] - direct[result.valid], axis=1)
    assert np.median(err) < 0.01, f"median 3D error {np.median(err):.4f} m"


def test_oracle_correspondence_on_sevenscenes(sevenscenes):
    rgb1, depth1, T1 = sevenscenes.load_frame(150)
    rgb2, _, T2 = sevenscenes.load_frame(160)
    cam = Intrinsics.from_K(sevenscenes.intrinsics(), 640, 480)
    T12 = g.relative_pose(T1, T2)
    uv1 = query_grid(640, 480, 60, 0.1)
    result = CorrespondenceMatcher(ORACLE).match(rgb1, cam, rgb2, cam, uv1, reference_depth1=depth1, reference_pose=T12)
    p1, p2 = result.prepared
    assert (p1.width, p1.height) == (1024, 768)
    # Ground truth: back-project with frame 1 depth, move into camera 2, project.
    X1 = g.backproject(uv1, g.sample_nearest(depth1, uv1), cam.K)
    expected, _ = g.project(g.transform_points(g.invert_pose(T12), X1), cam.K)
    visible = np.all(np.isfinite(expected), axis=1) & np.all((expected > -0.5) & (expected < [639.5, 479.5]), axis=1)
    assert (result.valid == visible).mean() >= 0.95  # no answer exactly where there is no ground truth
    ok = result.valid & visible
    assert ok.sum() >= 30
    err = np.linalg.norm(result.uv2[ok] - expected[ok], axis=1)
    # Integer [0, 1000] coordinates of a 640 px image: 0.64 px per unit, plus the half-unit rounding of the query.
    assert np.median(err) < 1.0 and err.max() < 3.0


def test_oracle_pose_on_sevenscenes(sevenscenes):
    _, _, T1 = sevenscenes.load_frame(150)
    rgb1 = sevenscenes.load_rgb(150)
    rgb2, _, T2 = sevenscenes.load_frame(199)
    cam = Intrinsics.from_K(sevenscenes.intrinsics(), 640, 480)
    T12 = g.relative_pose(T1, T2)
    result = PoseEstimator(ORACLE).estimate(rgb1, cam, rgb2, cam, reference_pose=T12)
    assert result.error is None
    rot_err, dir_err = metrics.relative_pose_errors(result.pose.R, result.pose.direction, T12[:3, :3], T12[:3, 3])
    assert rot_err < 0.15 and dir_err < 1.0
    assert result.pose.distance == pytest.approx(np.linalg.norm(T12[:3, 3]), abs=0.006)
    assert result.pose.angle_deg == pytest.approx(g.rotation_angle(T12[:3, :3]), abs=0.06)


# ------------------------------------------------------------------------------------------------
# Dense depth
# ------------------------------------------------------------------------------------------------


def test_dense_depth_of_a_plane_seen_through_a_distorted_lens():
    """Both rounds through the oracle, completed into a depth map in the original (distorted)
    geometry; its cloud lies on the plane, back-projected through the distortion."""
    D = (-0.2, 0.05, 0.0005, -0.001, 0.0)
    cam = Intrinsics.from_K(np.array([[420.0, 0, 322.0], [0, 415.0, 241.0], [0, 0, 1]]), 640, 480, D=D,
                            distortion_model="plumb_bob")
    n, offset = np.array([0.1, -0.3, 1.0]), 2.0
    # Ground-truth z at every original pixel: undistort the pixel, intersect its ray with the plane.
    uu, vv = np.meshgrid(np.arange(640.0), np.arange(480.0))
    und = cv2.undistortPoints(np.stack([uu.ravel(), vv.ravel()], 1)[:, None], cam.K, np.array(D)).reshape(-1, 2)
    rays = np.column_stack([und, np.ones(len(und))])
    depth = (offset / (rays @ n)).reshape(480, 640)
    estimator = DepthEstimator(ORACLE)
    uv = query_grid(640, 480, 40, 0.1)
    result = estimator.estimate_dense(np.full((480, 640, 3), 120, np.uint8), cam, uv, second_round=24,
                                      reference_depth=depth, adaptive=AdaptiveConfig(margin=0.1))
    assert (result.first_round, result.second_round) == (len(uv), 24)
    # (The undistorted image the questions refer to does not reach every corner of the original.)
    assert len(result.sparse.uv) == len(uv) + 24 and result.sparse.valid.mean() > 0.9
    assert result.dense.depth.shape == (480, 640)
    inner = np.zeros((480, 640), bool)
    inner[60:-60, 80:-80] = True
    assert np.abs(result.dense.depth[inner] / depth[inner] - 1).max() < 0.01
    points, pix = result.points(step=8, min_confidence=0.5)
    assert len(points) > 0.8 * (640 // 8) * (480 // 8)
    central = inner[pix[:, 1].astype(int), pix[:, 0].astype(int)]
    assert np.abs(points[central] @ (n / np.linalg.norm(n)) - offset / np.linalg.norm(n)).max() < 0.01  # on the plane
    proj, _ = cv2.projectPoints(points, np.zeros(3), np.zeros(3), cam.K, np.array(D))
    assert np.abs(proj.reshape(-1, 2) - pix).max() < 0.01  # and seen at its own pixel


def test_dense_second_round_reuses_the_image_prefix(tiny_backend):
    """The second round is another request about the same prepared image: the engine reuses the
    first round's image prefix (no vision tower, no prefix prefill)."""
    cam = Intrinsics.from_focal(96, 64, 1000.0)
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3)).astype(np.uint8)
    result = DepthEstimator(tiny_backend, max_new_tokens=4).estimate_dense(image, cam, query_grid(96, 64, 6),
                                                                           second_round=5)
    assert result.second_round == 5 and len(result.responses) == 2
    assert result.responses[1].info["prefix_reused"] is True and result.responses[1].timings["vision"] == 0
    # A random model's answers do not parse: nothing to complete, every pixel unknown.
    assert not result.sparse.valid.any() and np.isnan(result.dense.depth).all()
    assert result.points()[0].shape == (0, 3)
