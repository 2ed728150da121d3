"""Odometry core: covariance models against Monte Carlo, fusion, chaining, and oracle odometry on
real 7-Scenes frames against the ground-truth trajectory."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from vlm3_ros import geometry as g
from vlm3_ros.camera import Intrinsics
from vlm3_ros.engine import OracleBackend
from vlm3_ros.odometry import (
    LateFrame,
    NoiseModel,
    OdometryConfig,
    OdometryError,
    OdometryFrame,
    RelativeEstimate,
    TrajectoryChain,
    VisualOdometry,
    estimate_from_correspondences,
    estimate_from_pose_answers,
    fuse,
    mahalanobis2,
    pose_to_xyz_quaternion,
    select_query_pixels,
    transform_covariance,
    xyz_rotation_to_pose,
)
from vlm3_ros.pipeline import CorrespondenceMatcher, DepthEstimator, PoseEstimator
from vlm3_ros.protocol import RelativePose

RNG = np.random.default_rng(7)


def _tangent(T, T_ref):
    """Left-perturbation tangent (dt, dw) of a pose or a stack of poses about T_ref."""
    T = np.asarray(T)
    dw = Rotation.from_matrix(T[..., :3, :3] @ T_ref[:3, :3].T).as_rotvec()
    return np.concatenate([T[..., :3, 3] - T_ref[:3, 3], dw], axis=-1)


def _sample(T, C, n, rng):
    """Poses drawn from the left-perturbation Gaussian (T, C)."""
    d = rng.multivariate_normal(np.zeros(6), C, size=n)
    out = np.repeat(T[None], n, axis=0)
    out[:, :3, 3] += d[:, :3]
    out[:, :3, :3] = Rotation.from_rotvec(d[:, 3:]).as_matrix() @ T[:3, :3]
    return out


def _random_pose(rng, angle=0.3, dist=0.5):
    R = Rotation.from_rotvec(rng.normal(size=3) * angle).as_matrix()
    return g.make_pose(R, rng.normal(size=3) * dist)


def _random_cov(rng, scale=1e-3):
    A = rng.normal(size=(6, 6)) * scale
    return A @ A.T + np.eye(6) * scale**2


# ------------------------------------------------------------------------------------------------
# Covariance models
# ------------------------------------------------------------------------------------------------


def test_pose_answer_covariance_is_along_and_across_the_direction():
    direction = np.array([0.6, 0.0, 0.8])
    pose = RelativePose(R=np.eye(3), direction=direction, distance=2.0)
    noise = NoiseModel(rotation_deg=3.0, direction_deg=4.0, distance_rel=0.1, translation_floor_m=0.01)
    est = estimate_from_pose_answers(pose, noise)
    np.testing.assert_allclose(est.T[:3, 3], 2.0 * direction)
    C = est.covariance
    along = direction @ C[:3, :3] @ direction
    across = np.array([0.0, 1.0, 0.0]) @ C[:3, :3] @ np.array([0.0, 1.0, 0.0])
    assert along == pytest.approx((0.1 * 2.0) ** 2 + 0.01**2)
    assert across == pytest.approx((2.0 * np.radians(4.0)) ** 2 + 0.01**2)
    np.testing.assert_allclose(np.diag(C[3:, 3:]), np.radians(3.0) ** 2)
    with pytest.raises(OdometryError, match="distance"):
        estimate_from_pose_answers(RelativePose(R=np.eye(3), direction=direction, distance=None))


def test_pnp_covariance_matches_the_spread_of_noisy_solutions():
    """Gauss-Newton covariance of PnP vs the empirical covariance over pixel-noise draws."""
    rng = np.random.default_rng(3)
    K = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])
    n = 60
    uv1 = np.column_stack([rng.uniform(40, 600, n), rng.uniform(40, 440, n)])
    z1 = rng.uniform(1.5, 4.0, n)
    T12 = g.make_pose(Rotation.from_rotvec([0.02, -0.05, 0.01]).as_matrix(), [0.15, -0.02, 0.05])
    X2 = g.transform_points(g.invert_pose(T12), g.backproject(uv1, z1, K))
    uv2, _ = g.project(X2, K)
    sigma_px = 1.0
    noise = NoiseModel(pixel_sigma=sigma_px, depth_rel=1e-4)
    errors, predicted = [], None
    for _ in range(150):
        est, inliers = estimate_from_correspondences(uv1, z1, uv2 + rng.normal(0, sigma_px, uv2.shape), K, K,
                                                     noise=noise, ransac_px=5.0)
        assert inliers.sum() >= n - 3
        errors.append(_tangent(est.T, T12))
        predicted = est.covariance if predicted is None else predicted
    empirical = np.cov(np.array(errors).T)
    # Compare the standard deviations axis by axis: first order theory within 35 %.
    ratio = np.sqrt(np.diag(empirical) / np.diag(predicted))
    assert np.all((ratio > 0.65) & (ratio < 1.35)), ratio
    # A clean solution recovers the pose.
    est, _ = estimate_from_correspondences(uv1, z1, uv2, K, K)
    np.testing.assert_allclose(est.T, T12, atol=1e-6)
    with pytest.raises(OdometryError, match="PnP failed"):
        estimate_from_correspondences(uv1[:3], z1[:3], uv2[:3], K, K)


def test_pnp_refuses_implausible_solutions():
    rng = np.random.default_rng(4)
    K = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])
    uv1 = np.column_stack([rng.uniform(40, 600, 40), rng.uniform(40, 440, 40)])
    T12 = g.make_pose(np.eye(3), [0.15, -0.02, 0.05])
    # Absurd depths (a broken reference): the same pixels at 1e6 m give a motion of kilometres.
    z1 = rng.uniform(1.5, 4.0, 40)
    uv2, _ = g.project(g.transform_points(g.invert_pose(T12), g.backproject(uv1, z1, K)), K)
    with pytest.raises(OdometryError, match="beyond max_depth 100 m"):
        estimate_from_correspondences(uv1, z1 * 1e6, uv2, K, K, max_translation=100.0)
    est, _ = estimate_from_correspondences(uv1, z1, uv2, K, K, max_translation=100.0)
    np.testing.assert_allclose(est.T, T12, atol=1e-6)


def test_fusion_is_the_information_weighted_mean_and_gates_outliers():
    T = np.eye(4)
    a = RelativeEstimate(T=g.make_pose(np.eye(3), [0.10, 0.0, 0.0]), covariance=np.diag([1e-4] * 3 + [1e-4] * 3),
                         source="correspondence")
    b = RelativeEstimate(T=g.make_pose(np.eye(3), [0.13, 0.0, 0.0]), covariance=np.diag([4e-4] * 3 + [1e-4] * 3),
                         source="pose")
    fused = fuse([a, b])
    # x: (0.10/1e-4 + 0.13/4e-4) / (1/1e-4 + 1/4e-4) = 0.106
    assert fused.T[0, 3] == pytest.approx(0.106)
    assert fused.covariance[0, 0] == pytest.approx(1 / (1 / 1e-4 + 1 / 4e-4))
    assert fused.source == "fused" and fused.disagreement == pytest.approx(0.03**2 / 5e-4)
    # Rotations fuse on the manifold: two rotations about z by 1 and 3 degrees, equal weights.
    ra = RelativeEstimate(T=g.make_pose(Rotation.from_euler("z", 1, degrees=True).as_matrix(), [0, 0, 0]),
                          covariance=np.eye(6) * 1e-3, source="pose")
    rb = RelativeEstimate(T=g.make_pose(Rotation.from_euler("z", 3, degrees=True).as_matrix(), [0, 0, 0]),
                          covariance=np.eye(6) * 1e-3, source="correspondence")
    assert g.rotation_angle(fuse([ra, rb]).T[:3, :3]) == pytest.approx(2.0, abs=1e-9)
    # Far apart relative to their covariance: not averaged, the more certain kept.
    c = RelativeEstimate(T=g.make_pose(np.eye(3), [0.5, 0.0, 0.0]), covariance=np.eye(6) * 4e-4, source="pose")
    gated = fuse([a, c], gate=22.46)
    assert mahalanobis2(a, c) > 22.46
    np.testing.assert_allclose(gated.T, a.T)
    assert gated.source == "correspondence" and gated.disagreement > 22.46
    assert fuse([a]) is a
    with pytest.raises(OdometryError):
        fuse([])
    del T


def test_chain_covariance_propagation_matches_monte_carlo():
    rng = np.random.default_rng(11)
    chain = TrajectoryChain()
    chain.start()
    first = RelativeEstimate(T=_random_pose(rng), covariance=_random_cov(rng, 2e-2), source="pose")
    second = RelativeEstimate(T=_random_pose(rng), covariance=_random_cov(rng, 2e-2), source="pose")
    chain.update(first)
    chain.make_keyframe()
    chain.update(second)
    n = 20000
    A = _sample(first.T, first.covariance, n, rng)
    B = _sample(second.T, second.covariance, n, rng)
    errors = _tangent(A @ B, chain.T_cur)
    np.testing.assert_allclose(chain.T_cur, first.T @ second.T, atol=1e-12)
    empirical = np.cov(errors.T)
    ratio = np.diag(empirical) / np.diag(chain.C_cur)
    assert np.all(np.abs(ratio - 1) < 0.1), ratio
    # Holding (a lost frame) keeps the pose and grows the covariance.
    before = chain.C_cur.copy()
    chain.lost_variance = 0.5
    chain.hold()
    np.testing.assert_allclose(chain.C_cur - before, 0.5 * np.eye(6))


def test_transform_covariance_matches_monte_carlo():
    rng = np.random.default_rng(5)
    T_ab = _random_pose(rng, angle=1.0, dist=0.3)
    T = _random_pose(rng)
    C = _random_cov(rng, 3e-2)
    n = 20000
    samples = _sample(T, C, n, rng)
    mapped = T_ab @ samples @ g.invert_pose(T_ab)
    centre = T_ab @ T @ g.invert_pose(T_ab)
    errors = _tangent(mapped, centre)
    predicted = transform_covariance(C, T_ab, T)
    ratio = np.diag(np.cov(errors.T)) / np.diag(predicted)
    assert np.all(np.abs(ratio - 1) < 0.1), ratio


def test_extrinsic_from_rpy_and_quaternion():
    # The default optical rotation: the camera's z (forward) is base x, its x (right) is base -y.
    T = xyz_rotation_to_pose([0.1, 0.2, 0.3], [-np.pi / 2, 0.0, -np.pi / 2])
    np.testing.assert_allclose(T[:3, 2], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(T[:3, 0], [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(T[:3, 1], [0, 0, -1], atol=1e-12)
    xyz, quat = pose_to_xyz_quaternion(T)
    np.testing.assert_allclose(xyz_rotation_to_pose(xyz, quat), T, atol=1e-12)
    with pytest.raises(OdometryError, match="unit norm"):
        xyz_rotation_to_pose([0, 0, 0], [0, 0, 0, 2.0])
    with pytest.raises(OdometryError, match="3 values"):
        xyz_rotation_to_pose([0, 0, 0], [0, 0])


def test_feature_query_pixels_find_the_corners_of_a_checkerboard():
    image = np.zeros((240, 320), np.uint8)
    size = 40
    for r in range(0, 240, size):
        for c in range(0, 320, size):
            if (r // size + c // size) % 2:
                image[r:r + size, c:c + size] = 255
    uv = select_query_pixels(np.repeat(image[..., None], 3, axis=2), 20, margin=0.1, method="features")
    assert len(uv) == 20
    inner = [(x, y) for x in range(40, 320, 40) for y in range(40, 240, 40)]
    nearest = np.min(np.linalg.norm(uv[:, None, :] - np.array(inner, float)[None], axis=2), axis=1)
    assert np.all(nearest <= 1.5)
    assert np.all(uv[:, 0] >= 0.1 * 319 - 0.5) and np.all(uv[:, 0] <= 0.9 * 319 + 0.5)
    # A flat image has no corners: the grid fills in.
    flat = select_query_pixels(np.zeros((240, 320, 3), np.uint8), 16, method="features")
    np.testing.assert_array_equal(np.sort(flat, axis=0), np.sort(select_query_pixels(image, 16), axis=0))
    with pytest.raises(OdometryError):
        select_query_pixels(image, 10, method="sift")


def test_config_rejects_bad_values():
    with pytest.raises(OdometryError, match="mode"):
        OdometryConfig(mode="stereo")
    with pytest.raises(OdometryError, match="keyframe_interval"):
        OdometryConfig(keyframe_interval=0)
    with pytest.raises(OdometryError, match="below min_inliers"):
        OdometryConfig(query_count=4, min_inliers=8)
    with pytest.raises(OdometryError, match="noise model"):
        NoiseModel(rotation_deg=0.0)
    with pytest.raises(OdometryError, match="needs a pose estimator"):
        VisualOdometry(OdometryConfig(mode="pose"))


# ------------------------------------------------------------------------------------------------
# Oracle odometry on real frames
# ------------------------------------------------------------------------------------------------


def _vo(mode: str, keyframe_interval: int = 1, T_base_camera=None) -> VisualOdometry:
    oracle = OracleBackend()
    config = OdometryConfig(mode=mode, keyframe_interval=keyframe_interval, query_count=48,
                            T_base_camera=T_base_camera)
    return VisualOdometry(config, pose_estimator=PoseEstimator(oracle), matcher=CorrespondenceMatcher(oracle),
                          depth_estimator=DepthEstimator(oracle))


@pytest.mark.parametrize("mode,interval", [("correspondence", 1), ("both", 3), ("pose", 4)])
def test_oracle_odometry_follows_the_ground_truth_trajectory(sevenscenes, mode, interval):
    K = Intrinsics.from_K(sevenscenes.intrinsics(), 640, 480)
    T_bc = xyz_rotation_to_pose([0.05, -0.02, 0.3], [-np.pi / 2, 0.0, -np.pi / 2])
    vo = _vo(mode, interval, T_bc)
    ids = sevenscenes.frame_ids[:9]
    keyframes, T0 = [], None
    for n, i in enumerate(ids):
        rgb, depth, T_wc = sevenscenes.load_frame(i)
        T0 = T_wc if T0 is None else T0
        update = vo.process(OdometryFrame(10.0 + n / 30, rgb, K, depth, T_wc))
        keyframes.append(update.keyframe)
        gt_camera = g.relative_pose(T0, T_wc)
        gt_base = T_bc @ gt_camera @ g.invert_pose(T_bc)
        # REP-105: odom is base_link at the first frame.
        np.testing.assert_allclose(update.T_odom_base, T_bc @ (g.invert_pose(T_bc) @ update.T_odom_camera)
                                   @ g.invert_pose(T_bc), atol=1e-9)
        terr = np.linalg.norm(update.T_odom_base[:3, 3] - gt_base[:3, 3])
        rerr = g.rotation_angle(update.T_odom_base[:3, :3].T @ gt_base[:3, :3])
        assert terr < 0.012 and rerr < 0.4, (n, terr, rerr)
        assert update.status == ("initialised" if n == 0 else "tracking")
        C = update.covariance
        assert np.allclose(C, C.T) and np.all(np.linalg.eigvalsh(C) >= -1e-15)
    assert keyframes == [n % interval == 0 for n in range(len(ids))]
    # The covariance after 8 frames is larger than after the first measured frame.
    assert np.trace(update.covariance) > 0
    if mode != "pose":
        assert update.matches is not None and update.matches.inliers.sum() >= 8
        assert update.estimate.source in ("correspondence", "fused")


def test_unmeasurable_frames_hold_the_pose(tiny_backend):
    """Random tiny-model answers do not parse: the pose is held and the covariance grows."""
    K = Intrinsics.from_focal(96, 72, 750.0)
    config = OdometryConfig(mode="pose", keyframe_interval=2, noise=NoiseModel(lost_variance=0.04),
                            max_lost_frames=2)
    vo = VisualOdometry(config, pose_estimator=PoseEstimator(tiny_backend, max_new_tokens=4))
    images = [RNG.integers(0, 255, (72, 96, 3), dtype=np.uint8) for _ in range(4)]
    updates = [vo.process(OdometryFrame(1.0 + 0.1 * n, im, K)) for n, im in enumerate(images)]
    assert [u.status for u in updates] == ["initialised", "lost", "lost", "lost"]
    assert all(u.errors and "unparseable" in u.errors[0] for u in updates[1:])
    assert all(u.parse_failures == 1 for u in updates[1:])
    for n, u in enumerate(updates):
        np.testing.assert_allclose(u.T_odom_base, np.eye(4), atol=1e-12)
        # The first pose has the prior; each lost frame adds 0.04 to every variance (expressed in
        # base_link, a rotation of it).
        assert np.trace(u.covariance) == pytest.approx(6 * (1e-6 + 0.04 * n))
    # The keyframe stays while frames are lost, max_lost_frames (2) in a row make the current one the keyframe.
    assert [u.keyframe for u in updates] == [True, False, True, False]
    with pytest.raises(LateFrame, match="not after the keyframe"):
        vo.process(OdometryFrame(0.5, images[0], K))


class _GarbageOnce(OracleBackend):
    """The oracle, answering nonsense for the frames listed in ``garbage`` (by call number)."""

    def __init__(self, garbage):
        super().__init__()
        self.garbage, self.calls = set(garbage), 0

    def answer(self, request):
        self.calls += 1
        response = super().answer(request)
        if self.calls in self.garbage:
            response.answers = ["<answer> far-ish </answer>"] * len(response.answers)
        return response


def _moving_frames(poses, size=(160, 120), f=150.0):
    K = Intrinsics.from_focal(size[0], size[1], f)
    rgb = np.zeros((size[1], size[0], 3), np.uint8)
    depth = np.full((size[1], size[0]), 2.0)
    return [OdometryFrame(1.0 + 0.1 * n, rgb, K, depth, T_wc) for n, T_wc in enumerate(poses)]


def test_a_lost_frame_keeps_the_keyframe_and_no_motion_is_lost():
    # The camera moves 5 cm along x per frame; the third frame's answers do not parse.
    poses = [g.make_pose(np.eye(3), [0.05 * n, 0.0, 0.0]) for n in range(5)]
    vo = VisualOdometry(OdometryConfig(mode="pose"), pose_estimator=PoseEstimator(_GarbageOnce({2})))
    updates = [vo.process(frame) for frame in _moving_frames(poses)]
    assert [u.status for u in updates] == ["initialised", "tracking", "lost", "tracking", "tracking"]
    assert [u.keyframe for u in updates] == [True, True, False, True, True]
    x = [vo.chain.T_base_camera[:3, :3].T @ u.T_odom_base[:3, 3] for u in updates]  # optical-frame position
    # Held at frame 2, then measured from frame 1 again: no motion lost (today's chain restarts there).
    np.testing.assert_allclose([p[0] for p in x], [0.0, 0.05, 0.05, 0.15, 0.2], atol=0.006)
    # First pose: the configured prior, not zero (filters need a positive definite covariance).
    np.testing.assert_allclose(updates[0].covariance, 1e-6 * np.eye(6), atol=1e-18)


def test_twist_is_the_body_velocity_in_the_child_frame():
    """A ground robot on an arc: 1 m/s forward, turning at 2 rad/s. REP-105 wants the twist in base_link
    (the child frame): forward speed on x, no sideways speed, the turn rate on z."""
    T_bc = xyz_rotation_to_pose([0.0, 0.0, 0.0], [-np.pi / 2, 0.0, -np.pi / 2])
    v, w, dt = 1.0, 2.0, 0.1

    def base(t):
        return g.make_pose(Rotation.from_rotvec([0, 0, w * t]).as_matrix(),
                           [v / w * np.sin(w * t), v / w * (1 - np.cos(w * t)), 0.0])

    poses = [base(n * dt) @ T_bc for n in range(3)]
    vo = VisualOdometry(OdometryConfig(mode="pose", T_base_camera=T_bc), pose_estimator=PoseEstimator(OracleBackend()))
    updates = [vo.process(frame) for frame in _moving_frames(poses)]
    twist = updates[-1].twist
    np.testing.assert_allclose(twist[:3], [v, 0.0, 0.0], atol=0.03)
    np.testing.assert_allclose(twist[3:], [0.0, 0.0, w], atol=0.05)
    C = updates[-1].twist_covariance
    assert np.allclose(C, C.T) and np.all(np.linalg.eigvalsh(C) > 0)


def test_absurd_reference_depths_are_not_used():
    """A reference depth of 1e30 m: the oracle has nothing within max_depth; the pose is held, not sent
    to 1e26 m."""
    poses = [g.make_pose(np.eye(3), [0.05 * n, 0.0, 0.0]) for n in range(3)]
    oracle = OracleBackend()
    vo = VisualOdometry(OdometryConfig(mode="correspondence", query_count=32, max_depth=100.0),
                        matcher=CorrespondenceMatcher(oracle), depth_estimator=DepthEstimator(oracle))
    frames = _moving_frames(poses)
    rng = np.random.default_rng(0)
    for frame in frames:
        frame.image = rng.integers(0, 255, frame.image.shape, dtype=np.uint8)
        frame.reference_depth = np.full(frame.image.shape[:2], 1e30)
    updates = [vo.process(frame) for frame in frames]
    assert [u.status for u in updates] == ["initialised", "lost", "lost"]
    assert "within max_depth" in updates[1].errors[0]
    assert np.abs(updates[-1].T_odom_base[:3, 3]).max() == 0.0
