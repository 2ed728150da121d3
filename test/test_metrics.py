"""Tests for vlm3_ros.metrics with hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from vlm3_ros import geometry as g
from vlm3_ros import metrics as m
from vlm3_ros.metrics import MetricError

# ------------------------------------------------------------------------------------------
# Depth
# ------------------------------------------------------------------------------------------


def test_delta1_counts_missing_and_invalid_predictions_as_wrong():
    pred = [1.0, 1.3, None, float("nan"), -1.0, 2.0, 0.0, float("inf")]
    gt = [1.0, 1.0, 1.0, 1.0, 1.0, 1.7, 1.0, 1.0]
    # Correct: 1.0/1.0 and 2.0/1.7 = 1.176. Wrong: 1.3 and the five invalid predictions.
    assert m.delta1(pred, gt) == pytest.approx(2 / 8, abs=0)
    assert m.delta1(pred, gt, threshold=1.31) == pytest.approx(3 / 8, abs=0)


def test_delta1_is_symmetric_and_strict_at_threshold():
    assert m.delta1([0.81], [1.0]) == 1.0  # 1 / 0.81 = 1.235
    assert m.delta1([1.25], [1.0]) == 0.0  # ratio exactly 1.25 is not < 1.25
    assert m.delta1([1.0], [1.25]) == 0.0
    assert m.delta1([1.0], [1.2499]) == 1.0
    assert m.delta1(np.array([2.0, 0.5]), np.array([1.0, 1.0])) == 0.0


def test_abs_rel_excludes_invalid_predictions_and_reports_counts():
    pred = [1.1, 1.8, None, -2.0]
    gt = [1.0, 2.0, 3.0, 4.0]
    assert m.abs_rel(pred, gt) == pytest.approx((0.1 / 1.0 + 0.2 / 2.0) / 2, rel=1e-12)
    res = m.depth_metrics(pred, gt)
    assert res["num_points"] == 4 and res["num_valid"] == 2 and res["num_invalid"] == 2
    assert res["delta1"] == 0.5 and res["abs_rel"] == pytest.approx(0.1)
    assert np.isnan(m.abs_rel([None, np.nan], [1.0, 2.0]))


@pytest.mark.parametrize("gt", [[1.0, 0.0], [1.0, -2.0], [1.0, np.nan], [1.0, np.inf]])
def test_depth_ground_truth_must_be_positive_and_finite(gt):
    with pytest.raises(MetricError, match="ground-truth depth"):
        m.delta1([1.0, 1.0], gt)
    with pytest.raises(MetricError, match="ground-truth depth"):
        m.abs_rel([1.0, 1.0], gt)


def test_depth_input_errors_are_named():
    with pytest.raises(MetricError, match="same number of points"):
        m.delta1([1.0], [1.0, 2.0])
    with pytest.raises(MetricError, match="empty"):
        m.delta1([], [])
    with pytest.raises(MetricError, match="not text"):
        m.delta1(["1.5"], [1.0])


# ------------------------------------------------------------------------------------------
# Correspondence
# ------------------------------------------------------------------------------------------


def test_epe_hand_computed_and_invalid_rows():
    pred = np.array([[0.0, 0.0], [3.0, 4.0], [np.nan, np.nan]])
    gt = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert m.epe(pred, gt) == pytest.approx(2.5, abs=0)
    assert m.epe([[1.0, 1.0], None], [[0.0, 0.0], [5.0, 5.0]]) == pytest.approx(np.sqrt(2))
    res = m.correspondence_metrics(pred, gt, thresholds=(1.0, 6.0))
    assert res["num_valid"] == 2 and res["num_invalid"] == 1
    assert res["within_1"] == pytest.approx(1 / 3) and res["within_6"] == pytest.approx(2 / 3)
    with pytest.raises(MetricError, match=r"\(N, 2\)"):
        m.epe([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]])


# ------------------------------------------------------------------------------------------
# Relative pose
# ------------------------------------------------------------------------------------------


def Rz(deg: float) -> np.ndarray:
    return Rotation.from_euler("z", deg, degrees=True).as_matrix()


def test_rotation_error_is_geodesic_angle():
    rot, trans = m.relative_pose_errors(Rz(10.0), [0, 0, 1.0], np.eye(3), [0, 0, 2.0])
    assert rot == pytest.approx(10.0, abs=1e-12) and trans == pytest.approx(0.0, abs=1e-12)
    R1 = g.euler_to_matrix(30, 10, -5)
    R2 = g.euler_to_matrix(35, 10, -5)
    rot, _ = m.relative_pose_errors(R1, [1, 0, 0], R2, [1, 0, 0])
    assert rot == pytest.approx(5.0, abs=1e-9)


def test_translation_error_is_folded():
    tg = [1.0, 0.0, 0.0]
    cases = {
        (-1.0, 0.0, 0.0): 0.0,  # opposite direction: 180 -> folded to 0
        (0.0, 1.0, 0.0): 90.0,
        (np.cos(np.radians(100)), np.sin(np.radians(100)), 0.0): 80.0,
        (np.cos(np.radians(30)), 0.0, np.sin(np.radians(30))): 30.0,
        (5.0, 0.0, 0.0): 0.0,  # scale does not matter
    }
    for tp, expected in cases.items():
        _, e = m.relative_pose_errors(np.eye(3), tp, np.eye(3), tg)
        assert e == pytest.approx(expected, abs=1e-9), tp


def test_zero_translation_and_invalid_predictions():
    I = np.eye(3)
    assert m.relative_pose_errors(I, [0, 0, 0], I, [0, 0, 0])[1] == 0.0
    assert m.relative_pose_errors(I, [0, 0, 0], I, [0, 0, 1])[1] == 90.0
    assert m.relative_pose_errors(I, [0, 0, 1], I, [0, 0, 0])[1] == 90.0
    rot, trans = m.relative_pose_errors(np.full((3, 3), np.nan), [np.nan] * 3, I, [1, 0, 0])
    assert rot == np.inf and trans == np.inf


def test_relative_pose_errors_batch_matches_singles():
    rng = np.random.default_rng(0)
    Rp = Rotation.random(20, random_state=1).as_matrix()
    Rg = Rotation.random(20, random_state=2).as_matrix()
    tp, tg = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    rot, trans = m.relative_pose_errors(Rp, tp, Rg, tg)
    assert rot.shape == (20,) and trans.shape == (20,)
    for i in range(20):
        r, t = m.relative_pose_errors(Rp[i], tp[i], Rg[i], tg[i])
        assert rot[i] == pytest.approx(r) and trans[i] == pytest.approx(t)
        assert r == pytest.approx(g.rotation_angle(Rp[i].T @ Rg[i]))
        e = g.angle_between(tp[i], tg[i])
        assert t == pytest.approx(min(e, 180 - e))
    assert np.all(trans <= 90.0)


def test_relative_pose_errors_reject_bad_input():
    with pytest.raises(MetricError, match="shape"):
        m.relative_pose_errors(np.eye(3), [1, 0, 0], np.eye(3)[None], [[1, 0, 0]])
    with pytest.raises(MetricError, match="not a rotation"):
        m.relative_pose_errors(2 * np.eye(3), [1, 0, 0], np.eye(3), [1, 0, 0])
    with pytest.raises(MetricError, match="ground-truth"):
        m.relative_pose_errors(np.eye(3), [1, 0, 0], np.eye(3), [np.nan, 0, 0])


# ------------------------------------------------------------------------------------------
# AUC
# ------------------------------------------------------------------------------------------


def test_auc_hand_computed():
    # Bins [0,1) [1,2) ... [29,30]: cumulative fractions are 1/4 for bin 0, 2/4 for bins 1..9,
    # 3/4 for bins 10..29 (the 40 degree pair never counts).
    errors = [0.5, 1.5, 10.0, 40.0]
    expected = (0.25 + 9 * 0.5 + 20 * 0.75) / 30
    assert m.auc(errors) == pytest.approx(expected, abs=1e-15)
    assert m.auc_percent(errors) == pytest.approx(100 * expected, abs=1e-12)
    # Two-array form: the per-pair error is the max of rotation and translation errors.
    rot = [0.5, 0.2, 10.0, 1.0]
    trans = [0.1, 1.5, 2.0, 40.0]
    assert m.auc(rot, trans_err_deg=trans) == pytest.approx(expected, abs=1e-15)


def test_auc_edges():
    assert m.auc([0.0, 0.0]) == 1.0
    assert m.auc([30.0]) == pytest.approx(1 / 30)  # the last bin is closed
    assert m.auc([30.0001]) == 0.0
    assert m.auc([1.0]) == pytest.approx(29 / 30)  # 1.0 falls in [1, 2)
    assert m.auc([0.5, np.nan, np.inf]) == pytest.approx(1 / 3)  # failures stay in the denominator
    assert m.auc([0.5, 2.5], max_deg=5) == pytest.approx((0.5 + 0.5 + 1 + 1 + 1) / 5)
    with pytest.raises(MetricError, match="non-negative"):
        m.auc([-1.0])
    with pytest.raises(MetricError, match="max_deg"):
        m.auc([1.0], max_deg=2.5)
    with pytest.raises(MetricError, match="differ in length"):
        m.auc([1.0], trans_err_deg=[1.0, 2.0])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(0, 45, allow_nan=False), min_size=1, max_size=40))
def test_auc_equals_mean_fraction_below_each_degree(errors):
    e = np.asarray(errors)
    frac = [np.mean(e < k) for k in range(1, 30)] + [np.mean(e <= 30)]
    assert m.auc(errors) == pytest.approx(np.mean(frac), abs=1e-12)


def test_pose_auc_end_to_end():
    Rg = np.stack([np.eye(3)] * 3)
    Rp = np.stack([Rz(0.5), Rz(5.0), Rz(50.0)])
    tg = np.array([[0, 0, 1.0]] * 3)
    tp = np.array([[0, 0, 1.0], [0, np.sin(np.radians(12)), np.cos(np.radians(12))], [0, 0, -1.0]])
    res = m.pose_auc(Rp, tp, Rg, tg)
    np.testing.assert_allclose(res["rot_err_deg"], [0.5, 5.0, 50.0], atol=1e-9)
    np.testing.assert_allclose(res["trans_err_deg"], [0.0, 12.0, 0.0], atol=1e-9)
    # Per-pair errors 0.5, 12, 50.
    assert res["auc"] == pytest.approx((1 / 3 * 12 + 2 / 3 * 18) / 30)


# ------------------------------------------------------------------------------------------
# Trajectories
# ------------------------------------------------------------------------------------------


def _trajectory(n: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    angles = np.cumsum(rng.normal(scale=2.0, size=(n, 3)), axis=0)
    R = Rotation.from_euler("YXZ", angles, degrees=True).as_matrix()
    t = np.cumsum(rng.normal(scale=0.05, size=(n, 3)), axis=0)
    return g.make_pose(R, t)


def test_ate_invariant_to_global_transform():
    gt = _trajectory()
    A = g.make_pose(g.euler_to_matrix(70, -30, 15), [5.0, -3.0, 2.0])
    pred = A @ gt
    res = m.ate(pred, gt)
    assert res["rmse"] < 1e-12 and res["max"] < 1e-12 and res["num_poses"] == 30
    np.testing.assert_allclose(res["alignment"], g.invert_pose(A), atol=1e-10)
    assert m.ate(pred, gt, align="none")["rmse"] > 1.0
    # Similarity: scaled prediction needs sim3.
    pred_s = pred.copy()
    pred_s[:, :3, 3] *= 3.0
    assert m.ate(pred_s, gt, align="sim3")["rmse"] < 1e-12
    assert m.ate(pred_s, gt, align="se3")["rmse"] > 0.01
    # Positions-only input gives the same answer.
    assert m.ate(pred[:, :3, 3], gt[:, :3, 3])["rmse"] < 1e-12


def test_ate_known_errors_without_alignment():
    gt = np.zeros((4, 3))
    pred = np.array([[0.1, 0, 0], [0, 0.2, 0], [0, 0, 0.3], [0.4, 0, 0]])
    res = m.ate(pred, gt, align="none")
    assert res["rmse"] == pytest.approx(np.sqrt((0.01 + 0.04 + 0.09 + 0.16) / 4))
    assert res["mean"] == pytest.approx(0.25) and res["median"] == pytest.approx(0.25)
    assert res["max"] == pytest.approx(0.4)
    with pytest.raises(MetricError, match="align"):
        m.ate(pred, gt, align="affine")
    with pytest.raises(MetricError, match="differ in length"):
        m.ate(pred[:3], gt)


def test_rpe_zero_for_identical_and_invariant_to_global_transform():
    gt = _trajectory()
    A = g.make_pose(g.euler_to_matrix(-40, 20, 5), [1.0, 2.0, 3.0])
    for pred in (gt, A @ gt):
        res = m.rpe(pred, gt)
        assert res["trans_rmse"] < 1e-12 and res["rot_rmse_deg"] < 1e-6 and res["num_pairs"] == 29


def test_rpe_equals_known_offset():
    # Straight line: ground truth advances 0.10 m per frame, prediction 0.12 m.
    n = 11
    gt = g.make_pose(np.stack([np.eye(3)] * n), np.outer(np.arange(n) * 0.10, [0, 0, 1.0]))
    pred = g.make_pose(np.stack([np.eye(3)] * n), np.outer(np.arange(n) * 0.12, [0, 0, 1.0]))
    res = m.rpe(pred, gt)
    assert res["trans_rmse"] == pytest.approx(0.02, abs=1e-12)
    assert res["trans_max"] == pytest.approx(0.02, abs=1e-12) and res["num_pairs"] == 10
    assert m.rpe(pred, gt, delta=5)["trans_mean"] == pytest.approx(0.10, abs=1e-12)
    # One jump on a rotating trajectory: a world-frame shift c and rotation th from frame k on
    # gives exactly one pair with error |c| and th, the others zero.
    gt = _trajectory(20, seed=3)
    jump = g.make_pose(g.euler_to_matrix(3.0, 0, 0), [0.05, 0.0, 0.0])
    pred = gt.copy()
    pred[8:] = jump @ gt[8:]
    res = m.rpe(pred, gt)
    E = g.invert_pose(gt[8]) @ jump @ gt[8]
    assert res["trans_max"] == pytest.approx(np.linalg.norm(E[:3, 3]), abs=1e-12)
    assert res["rot_max_deg"] == pytest.approx(3.0, abs=1e-9)
    assert res["rot_mean_deg"] == pytest.approx(3.0 / 19, abs=1e-9)
    assert res["trans_mean"] == pytest.approx(res["trans_max"] / 19, abs=1e-12)


def test_rpe_rejects_bad_input():
    gt = _trajectory(5)
    with pytest.raises(MetricError, match="full poses"):
        m.rpe(gt[:, :3, 3], gt[:, :3, 3])
    with pytest.raises(MetricError, match="no frame pairs"):
        m.rpe(gt, gt, delta=5)
    with pytest.raises(MetricError, match="delta"):
        m.rpe(gt, gt, delta=0)
