"""Tests for vlm3_ros.geometry: conventions, round trips, known geometry and pose estimation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from vlm3_ros import geometry as g
from vlm3_ros.geometry import GeometryError

K = np.array([[585.0, 0.0, 320.0], [0.0, 585.0, 240.0], [0.0, 0.0, 1.0]])
K_ASYM = np.array([[600.0, 0.0, 300.5], [0.0, 550.0, 210.25], [0.0, 0.0, 1.0]])

finite = dict(allow_nan=False, allow_infinity=False)


def Rx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def Ry(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def Rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def random_pose(rng: np.random.Generator, max_angle_deg: float = 60.0, max_t: float = 2.0) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    R = Rotation.from_rotvec(axis * np.radians(rng.uniform(0, max_angle_deg))).as_matrix()
    return g.make_pose(R, rng.uniform(-max_t, max_t, size=3))


# ------------------------------------------------------------------------------------------
# Rays and depth
# ------------------------------------------------------------------------------------------


def test_principal_point_ray_equals_z():
    assert g.ray_norm([320.0, 240.0], K) == pytest.approx(1.0, abs=1e-15)
    assert g.ray_to_z(2.5, [320.0, 240.0], K) == pytest.approx(2.5, abs=1e-15)
    assert g.z_to_ray(2.5, [320.0, 240.0], K) == pytest.approx(2.5, abs=1e-15)


def test_corner_pixel_ratio_is_analytic():
    # Centre of the top-left pixel is (0, 0): offsets (-320, -240) px at f = 585 px.
    expected = np.sqrt(1.0 + (320.0 / 585.0) ** 2 + (240.0 / 585.0) ** 2)
    assert expected == pytest.approx(1.2114, abs=1e-4)
    uv = np.array([[0.0, 0.0], [639.0, 479.0]])
    n = g.ray_norm(uv, K)
    assert n[0] == pytest.approx(expected, rel=1e-14)
    assert n[1] == pytest.approx(np.sqrt(1 + (319 / 585) ** 2 + (239 / 585) ** 2), rel=1e-14)
    assert g.z_to_ray(2.0, uv, K)[0] / 2.0 == pytest.approx(expected, rel=1e-14)
    assert g.ray_to_z(2.0 * expected, uv, K)[0] == pytest.approx(2.0, rel=1e-14)


def test_backprojected_point_distance_matches_kind():
    uv = np.array([[10.0, 20.0], [600.0, 400.0]])
    p_ray = g.backproject(uv, [1.5, 3.0], K, kind="ray")
    np.testing.assert_allclose(np.linalg.norm(p_ray, axis=1), [1.5, 3.0], rtol=1e-14)
    p_z = g.backproject(uv, [1.5, 3.0], K, kind="z")
    np.testing.assert_allclose(p_z[:, 2], [1.5, 3.0], rtol=1e-14)
    # x right, y down: the top-left region has negative x and y.
    assert p_z[0, 0] < 0 and p_z[0, 1] < 0 and p_z[1, 0] > 0 and p_z[1, 1] > 0


@settings(max_examples=60, deadline=None)
@given(
    u=st.floats(-200, 900, **finite),
    v=st.floats(-200, 700, **finite),
    z=st.floats(0.05, 80.0, **finite),
    fx=st.floats(100, 2000, **finite),
    fy=st.floats(100, 2000, **finite),
    skew=st.floats(-5, 5, **finite),
)
def test_ray_z_and_projection_round_trips(u, v, z, fx, fy, skew):
    Km = np.array([[fx, skew, 320.0], [0.0, fy, 240.0], [0.0, 0.0, 1.0]])
    uv = np.array([[u, v]])
    d = g.z_to_ray(z, uv, Km)
    assert d[0] >= z * (1 - 1e-12)
    np.testing.assert_allclose(g.ray_to_z(d, uv, Km), [z], rtol=1e-12)
    for kind, depth in (("z", z), ("ray", d[0])):
        p = g.backproject(uv, [depth], Km, kind=kind)
        uv2, z2 = g.project(p, Km)
        np.testing.assert_allclose(uv2, uv, atol=1e-7)
        np.testing.assert_allclose(z2, [z], rtol=1e-12)


def test_project_marks_points_behind_camera():
    uv, z = g.project(np.array([[0.1, 0.2, 2.0], [0.1, 0.2, -1.0], [0.0, 0.0, 0.0]]), K)
    np.testing.assert_allclose(uv[0], [320 + 585 * 0.05, 240 + 585 * 0.1])
    assert np.all(np.isnan(uv[1:])) and list(z[1:]) == [-1.0, 0.0]


def test_depth_image_to_points_plane_and_masking():
    h, w = 6, 8
    Km = np.array([[10.0, 0.0, 3.5], [0.0, 10.0, 2.5], [0.0, 0.0, 1.0]])
    depth = np.full((h, w), 2.0)
    depth[0, 0] = 0.0
    depth[1, 2] = np.nan
    depth[5, 7] = -1.0
    pts, uv = g.depth_image_to_points(depth, Km)
    assert len(pts) == h * w - 3
    np.testing.assert_allclose(pts[:, 2], 2.0)
    uvp, _ = g.project(pts, Km)
    np.testing.assert_allclose(uvp, uv, atol=1e-12)
    # Row-major order, integer pixel centres; the first valid pixel is (1, 0).
    np.testing.assert_array_equal(uv[0], [1.0, 0.0])
    np.testing.assert_allclose(pts[0], [(1 - 3.5) / 10 * 2, (0 - 2.5) / 10 * 2, 2.0])
    pts_s, uv_s = g.depth_image_to_points(depth, Km, stride=2)
    assert set(map(tuple, uv_s.astype(int))) == {(c, r) for r in (0, 2, 4) for c in (0, 2, 4, 6)} - {(0, 0)}
    mask = np.zeros((h, w), bool)
    mask[3, 4] = True
    pts_m, uv_m = g.depth_image_to_points(depth, Km, mask=mask)
    np.testing.assert_array_equal(uv_m, [[4.0, 3.0]])
    np.testing.assert_allclose(pts_m, [[0.05 * 2, 0.05 * 2, 2.0]])


def test_sample_nearest_rounds_to_pixel_centres():
    img = np.arange(12, dtype=float).reshape(3, 4)
    uv = np.array([[0.0, 0.0], [1.49, 0.51], [3.4, 2.4], [3.6, 0.0], [-0.6, 0.0], [np.nan, 1.0]])
    out = g.sample_nearest(img, uv)
    np.testing.assert_array_equal(out[:3], [0.0, 5.0, 11.0])
    assert np.all(np.isnan(out[3:]))


# ------------------------------------------------------------------------------------------
# Euler angles and rotations
# ------------------------------------------------------------------------------------------


def test_euler_matches_explicit_matrices():
    for yaw, pitch, roll in [(30.0, 0, 0), (0, 20.0, 0), (0, 0, -15.0), (89.6, 2.6, 6.1), (-120, 45, 170)]:
        expected = Ry(np.radians(yaw)) @ Rx(np.radians(pitch)) @ Rz(np.radians(roll))
        np.testing.assert_allclose(g.euler_to_matrix(yaw, pitch, roll), expected, atol=1e-14)
        np.testing.assert_allclose(
            g.euler_to_matrix(np.radians(yaw), np.radians(pitch), np.radians(roll), degrees=False),
            expected,
            atol=1e-14,
        )


def test_euler_sign_conventions():
    forward = np.array([0.0, 0.0, 1.0])
    right = np.array([1.0, 0.0, 0.0])
    # Columns of R are camera 2's axes in camera 1's frame.
    f_yaw = g.euler_to_matrix(10, 0, 0) @ forward
    assert f_yaw[0] > 0.17 and abs(f_yaw[1]) < 1e-15  # turned right: forward toward +x
    f_pitch = g.euler_to_matrix(0, 10, 0) @ forward
    assert f_pitch[1] < -0.17 and abs(f_pitch[0]) < 1e-15  # looked up: forward toward -y
    x_roll = g.euler_to_matrix(0, 0, 10) @ right
    assert x_roll[1] > 0.17 and abs(x_roll[2]) < 1e-15  # x axis toward +y
    np.testing.assert_allclose(f_yaw, [np.sin(np.radians(10)), 0, np.cos(np.radians(10))], atol=1e-15)


def test_euler_batch_matches_scalar():
    yaw = np.array([10.0, -40.0, 170.0])
    pitch = np.array([5.0, 60.0, -80.0])
    roll = np.array([0.0, 30.0, -179.0])
    Rs = g.euler_to_matrix(yaw, pitch, roll)
    assert Rs.shape == (3, 3, 3)
    for i in range(3):
        np.testing.assert_allclose(Rs[i], g.euler_to_matrix(yaw[i], pitch[i], roll[i]), atol=1e-15)
    y, p, r = g.matrix_to_euler(Rs)
    np.testing.assert_allclose(np.stack([y, p, r], 1), np.stack([yaw, pitch, roll], 1), atol=1e-9)


def _wrap(a):
    return (np.asarray(a) + 180.0) % 360.0 - 180.0


@settings(max_examples=200, deadline=None)
@given(
    yaw=st.floats(-180, 180, **finite),
    pitch=st.floats(-88.0, 88.0, **finite),
    roll=st.floats(-180, 180, **finite),
)
def test_euler_round_trip_away_from_gimbal_lock(yaw, pitch, roll):
    R = g.euler_to_matrix(yaw, pitch, roll)
    y, p, r = g.matrix_to_euler(R)
    assert -90 <= p <= 90
    assert abs(_wrap(y - yaw)) < 1e-8 and abs(p - pitch) < 1e-8 and abs(_wrap(r - roll)) < 1e-8
    np.testing.assert_allclose(g.euler_to_matrix(y, p, r), R, atol=1e-12)


def test_matrix_to_euler_at_gimbal_lock_reconstructs_matrix():
    R = g.euler_to_matrix(30.0, 90.0, 20.0)
    y, p, r = g.matrix_to_euler(R)
    assert p == pytest.approx(90.0) and r == 0.0
    np.testing.assert_allclose(g.euler_to_matrix(y, p, r), R, atol=1e-12)


def test_rotation_angle_small_large_and_random():
    assert g.rotation_angle(np.eye(3)) == 0.0
    assert g.rotation_angle(Rz(np.radians(1e-6))) == pytest.approx(1e-6, rel=1e-6)
    assert g.rotation_angle(Rx(np.pi)) == pytest.approx(180.0, abs=1e-12)
    assert g.rotation_angle(Ry(np.radians(179.999))) == pytest.approx(179.999, abs=1e-9)
    assert g.rotation_angle(Rz(0.3), degrees=False) == pytest.approx(0.3, abs=1e-15)
    Rs = Rotation.random(50, random_state=1)
    np.testing.assert_allclose(g.rotation_angle(Rs.as_matrix()), Rs.magnitude() * 180 / np.pi, atol=1e-9)


def test_orthonormalize_projects_to_rotation():
    R = g.euler_to_matrix(20, -10, 5) + 1e-3 * np.random.default_rng(0).normal(size=(3, 3))
    Q = g.orthonormalize(R)
    np.testing.assert_allclose(Q.T @ Q, np.eye(3), atol=1e-14)
    assert np.linalg.det(Q) == pytest.approx(1.0)
    assert g.rotation_angle(Q.T @ g.euler_to_matrix(20, -10, 5)) < 0.2


# ------------------------------------------------------------------------------------------
# Poses
# ------------------------------------------------------------------------------------------


def test_pose_inverse_compose_and_relative():
    rng = np.random.default_rng(3)
    T_w_c1, T_w_c2, T3 = (random_pose(rng) for _ in range(3))
    np.testing.assert_allclose(g.compose(T_w_c1, g.invert_pose(T_w_c1)), np.eye(4), atol=1e-14)
    np.testing.assert_allclose(g.compose(T_w_c1, T_w_c2, T3), T_w_c1 @ T_w_c2 @ T3, atol=1e-14)
    T_c1_c2 = g.relative_pose(T_w_c1, T_w_c2)
    np.testing.assert_allclose(T_w_c1 @ T_c1_c2, T_w_c2, atol=1e-13)
    # Translation = camera 2's centre in camera 1's frame.
    c2_in_c1 = g.transform_points(g.invert_pose(T_w_c1), T_w_c2[:3, 3])
    np.testing.assert_allclose(T_c1_c2[:3, 3], c2_in_c1, atol=1e-13)
    # Rotation columns = camera 2's axes in camera 1's frame.
    z2_in_c1 = g.invert_pose(T_w_c1)[:3, :3] @ T_w_c2[:3, 2]
    np.testing.assert_allclose(T_c1_c2[:3, 2], z2_in_c1, atol=1e-13)
    # Stacks.
    stack = np.stack([T_w_c1, T_w_c2, T3])
    inv = g.invert_pose(stack)
    np.testing.assert_allclose(inv @ stack, np.broadcast_to(np.eye(4), (3, 4, 4)), atol=1e-13)


def test_camera_turning_right_sees_points_move_left():
    # Camera 2 yawed 10 deg right of camera 1: a point straight ahead of camera 1 appears left of
    # centre in camera 2.
    T_c1_c2 = g.make_pose(g.euler_to_matrix(10, 0, 0), [0, 0, 0])
    p_c2 = g.transform_points(g.invert_pose(T_c1_c2), [0.0, 0.0, 5.0])
    uv, _ = g.project(p_c2, K)
    assert uv[0] < 320 - 100 and uv[1] == pytest.approx(240)


def test_unit_and_angle_between():
    np.testing.assert_allclose(g.unit([3.0, 0, 4.0]), [0.6, 0, 0.8])
    assert g.angle_between([1, 0, 0], [0, 2, 0]) == pytest.approx(90.0)
    assert g.angle_between([1, 0, 0], [-1, 1e-9, 0]) == pytest.approx(180.0, abs=1e-6)
    assert g.angle_between([1, 0, 0], [1, 1e-8, 0]) == pytest.approx(np.degrees(1e-8), rel=1e-6)
    np.testing.assert_allclose(g.angle_between([[1, 0, 0], [0, 1, 0]], [0, 1, 1]), [90.0, 45.0])
    with pytest.raises(GeometryError, match="zero-length"):
        g.unit([0.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------------
# Pose estimation
# ------------------------------------------------------------------------------------------


def _synthetic_scene(rng, n=400, T_c1_c2=None, noise_px=0.5, outlier_frac=0.2, K2=K):
    if T_c1_c2 is None:
        T_c1_c2 = g.make_pose(g.euler_to_matrix(12.0, -5.0, 3.0), [0.4, -0.1, 0.25])
    uv1 = np.stack([rng.uniform(0, 639, n), rng.uniform(0, 479, n)], 1)
    z1 = rng.uniform(1.0, 6.0, n)
    p1 = g.backproject(uv1, z1, K)
    p2 = g.transform_points(g.invert_pose(T_c1_c2), p1)
    uv2, _ = g.project(p2, K2)
    uv2 = uv2 + rng.normal(scale=noise_px, size=uv2.shape)
    n_out = int(outlier_frac * n)
    out = rng.choice(n, n_out, replace=False)
    uv2[out] = np.stack([rng.uniform(0, 639, n_out), rng.uniform(0, 479, n_out)], 1)
    return uv1, z1, uv2, T_c1_c2, out


def test_pnp_recovers_known_pose_with_noise_and_outliers():
    rng = np.random.default_rng(7)
    uv1, z1, uv2, T_gt, out = _synthetic_scene(rng)
    est = g.pose_from_correspondences(uv1, z1, uv2, K)
    E = g.invert_pose(T_gt) @ est.T
    assert g.rotation_angle(E[:3, :3]) < 0.1
    assert g.angle_between(est.T[:3, 3], T_gt[:3, 3]) < 0.5
    # Outliers are rejected (a few random ones may land within 2 px by chance).
    assert est.inliers[out].mean() < 0.05
    assert est.num_inliers == est.inliers.sum() and est.num_inliers >= 0.75 * len(uv1)
    assert est.residual < 1.0


def test_pnp_with_ray_depth_and_second_intrinsics():
    rng = np.random.default_rng(11)
    uv1, z1, uv2, T_gt, _ = _synthetic_scene(rng, noise_px=0.0, outlier_frac=0.0, K2=K_ASYM)
    d1 = g.z_to_ray(z1, uv1, K)
    est = g.pose_from_correspondences(uv1, d1, uv2, K, K_ASYM, depth_kind="ray")
    np.testing.assert_allclose(est.T, T_gt, atol=1e-6)
    # The same depth read as z gives a different (wrong) pose.
    est_wrong = g.pose_from_correspondences(uv1, d1, uv2, K, K_ASYM, depth_kind="z")
    assert np.abs(est_wrong.T - T_gt).max() > 1e-3


def test_pnp_skips_invalid_rows_and_reports_them():
    rng = np.random.default_rng(5)
    uv1, z1, uv2, T_gt, _ = _synthetic_scene(rng, n=100, noise_px=0.0, outlier_frac=0.0)
    z1[:5] = np.nan
    z1[5:8] = 0.0
    uv2[8] = np.nan
    est = g.pose_from_correspondences(uv1, z1, uv2, K)
    assert not est.inliers[:9].any() and est.inliers[9:].all()
    np.testing.assert_allclose(est.T, T_gt, atol=1e-6)


def test_pnp_rejects_bad_input():
    rng = np.random.default_rng(2)
    uv1, z1, uv2, _, _ = _synthetic_scene(rng, n=20, outlier_frac=0.0)
    with pytest.raises(GeometryError, match="too few valid correspondences"):
        g.pose_from_correspondences(uv1[:5], z1[:5], uv2[:5], K)
    with pytest.raises(GeometryError, match="same shape"):
        g.pose_from_correspondences(uv1, z1, uv2[:10], K)
    with pytest.raises(GeometryError, match="depth1"):
        g.pose_from_correspondences(uv1, z1[:3], uv2, K)
    line = np.stack([np.linspace(0, 600, 20), np.full(20, 240.0)], 1)
    with pytest.raises(GeometryError, match="collinear"):
        g.pose_from_correspondences(line, np.ones(20), uv2, K)
    with pytest.raises(GeometryError, match="depth kind"):
        g.pose_from_correspondences(uv1, z1, uv2, K, depth_kind="disparity")


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(50, 3))
    R = g.euler_to_matrix(40, -20, 75)
    t = np.array([1.0, -2.0, 0.5])
    dst = 2.5 * src @ R.T + t
    R_e, t_e, s_e = g.umeyama(src, dst, with_scale=True)
    np.testing.assert_allclose(R_e, R, atol=1e-12)
    np.testing.assert_allclose(t_e, t, atol=1e-12)
    assert s_e == pytest.approx(2.5, rel=1e-12)
    # Without scale: still the right rotation, s = 1.
    R_k, _, s_k = g.umeyama(src, src @ R.T + t)
    np.testing.assert_allclose(R_k, R, atol=1e-12)
    assert s_k == 1.0


def test_umeyama_returns_proper_rotation_for_reflected_data():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(30, 3))
    dst = src * np.array([1.0, 1.0, -1.0])  # a mirror image: best proper rotation, not a reflection
    R, _, _ = g.umeyama(src, dst)
    assert np.linalg.det(R) == pytest.approx(1.0)


def test_umeyama_degenerate_raises():
    line = np.outer(np.arange(5.0), [1.0, 2.0, 3.0])
    with pytest.raises(GeometryError, match="degenerate"):
        g.umeyama(line, line + 1.0)
    R, t, _ = g.umeyama(line, line + 1.0, allow_degenerate=True)
    np.testing.assert_allclose(line @ R.T + t, line + 1.0, atol=1e-12)


def test_pose_from_3d_matches_with_ransac_rejects_outliers():
    rng = np.random.default_rng(4)
    T_gt = g.make_pose(g.euler_to_matrix(-25, 8, 2), [0.3, 0.05, -0.2])
    p2 = rng.uniform([-2, -1.5, 1], [2, 1.5, 6], size=(300, 3))
    p1 = g.transform_points(T_gt, p2) + rng.normal(scale=0.005, size=(300, 3))
    out = rng.choice(300, 90, replace=False)
    p1[out] += rng.uniform(-1, 1, size=(90, 3))
    T_ls = g.pose_from_3d_matches(p1, p2)
    T_r = g.pose_from_3d_matches(p1, p2, ransac=True, threshold=0.03)
    err_ls = g.rotation_angle(T_ls[:3, :3].T @ T_gt[:3, :3])
    err_r = g.rotation_angle(T_r[:3, :3].T @ T_gt[:3, :3])
    assert err_r < 0.3 and err_r < err_ls
    assert np.linalg.norm(T_r[:3, 3] - T_gt[:3, 3]) < 0.01
    est = g.estimate_pose_3d(p1, p2, ransac=True, threshold=0.03)
    assert est.inliers[out].mean() < 0.1 and np.delete(est.inliers, out).mean() > 0.95
    assert est.residual < 0.015


def test_pose_from_3d_matches_similarity_and_exact():
    rng = np.random.default_rng(9)
    T_gt = g.make_pose(g.euler_to_matrix(15, 30, -45), [1.0, 2.0, 3.0])
    p2 = rng.normal(size=(20, 3))
    np.testing.assert_allclose(g.pose_from_3d_matches(g.transform_points(T_gt, p2), p2), T_gt, atol=1e-12)
    p1 = 0.5 * p2 @ T_gt[:3, :3].T + T_gt[:3, 3]
    T_s = g.pose_from_3d_matches(p1, p2, ransac=True, with_scale=True, threshold=1e-6)
    np.testing.assert_allclose(T_s[:3, :3], 0.5 * T_gt[:3, :3], atol=1e-10)


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.eye(2), r"shape \(3, 3\)"),
        (np.array([[585.0, 0, 320], [0, 585, 240], [0, 0, 2]]), "bottom row"),
        (np.array([[-585.0, 0, 320], [0, 585, 240], [0, 0, 1]]), "focal lengths must be positive"),
        (np.array([[585.0, 0, np.nan], [0, 585, 240], [0, 0, 1]]), "non-finite"),
    ],
)
def test_bad_intrinsics_are_named(bad, match):
    with pytest.raises(GeometryError, match=match):
        g.ray_norm([[1.0, 2.0]], bad)


def test_bad_shapes_and_matrices_are_named():
    with pytest.raises(GeometryError, match=r"uv must have shape \(N, 2\)"):
        g.ray_norm(np.zeros((4, 3)), K)
    with pytest.raises(GeometryError, match=r"points must have shape \(N, 3\)"):
        g.project(np.zeros((4, 2)), K)
    with pytest.raises(GeometryError, match="not a rotation matrix"):
        g.rotation_angle(np.diag([1.0, 2.0, 1.0]))
    with pytest.raises(GeometryError, match="bottom row"):
        g.invert_pose(np.zeros((4, 4)))
    with pytest.raises(GeometryError, match="stride"):
        g.depth_image_to_points(np.ones((4, 4)), K, stride=0)
    with pytest.raises(GeometryError, match=r"depth image must have shape \(H, W\)"):
        g.depth_image_to_points(np.ones(4), K)
    with pytest.raises(GeometryError, match="non-finite"):
        g.euler_to_matrix(np.nan, 0, 0)


def test_intrinsics_objects_are_accepted_unless_distorted():
    from vlm3_ros.camera import Intrinsics

    cam = Intrinsics.from_K(K, 640, 480)
    assert g.ray_norm([0.0, 0.0], cam) == pytest.approx(g.ray_norm([0.0, 0.0], K), abs=0)
    distorted = Intrinsics.from_K(K, 640, 480, D=(0.1, 0.0, 0.0, 0.0, 0.0))
    with pytest.raises(GeometryError, match="distortion"):
        g.ray_norm([0.0, 0.0], distorted)
