"""Dense completion of sparse metric depth (vlm3_ros.completion) on known geometry and on real
7-Scenes frames, and the choice of a second round of questions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.interpolate import griddata

from vlm3_ros import completion as C
from vlm3_ros.pipeline import query_grid

W, H = 160, 120
K = np.array([[150.0, 0, 79.5], [0, 150.0, 59.5], [0, 0, 1]])


def _plane(normal=(0.15, -0.25, 1.0), offset=2.0, width=W, height=H, K=K) -> np.ndarray:
    uu, vv = np.meshgrid(np.arange(width), np.arange(height))
    rays = np.linalg.solve(K, np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)])).T
    return (offset / (rays @ np.asarray(normal, float))).reshape(height, width)


def _box_scene(seed: int = 0):
    """A box (depth 1 m, one colour) in front of a wall (3 m, another colour), with sensor-like noise
    in the colours; the box's outline is at x = 40.5 / 99.5, y = 30.5 / 89.5."""
    rng = np.random.default_rng(seed)
    depth = np.full((H, W), 3.0)
    image = np.empty((H, W, 3), np.float64)
    image[:] = (60, 110, 170)
    box = (slice(31, 90), slice(41, 100))
    depth[box] = 1.0
    image[box] = (200, 80, 40)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    return image, depth, box


def _sample(depth: np.ndarray, uv: np.ndarray) -> np.ndarray:
    return depth[np.round(uv[:, 1]).astype(int), np.round(uv[:, 0]).astype(int)]


def _bad(pred: np.ndarray, gt: np.ndarray) -> float:
    """Fraction of pixels off by a factor 1.25 or more (1 - delta1)."""
    return float(np.mean(np.maximum(pred / gt, gt / pred) >= 1.25))


def test_a_plane_is_reproduced_exactly_inside_the_samples():
    # 1/z is affine in the pixel position on a plane: linear interpolation of 1/z is exact there.
    depth = _plane()
    uv = query_grid(W, H, 30, margin=0.0)
    dense = C.complete_depth(np.full((H, W, 3), 128, np.uint8), uv, _sample(depth, uv))
    assert dense.depth.shape == (H, W) and dense.depth.dtype == np.float32 and dense.samples == len(uv)
    np.testing.assert_allclose(dense.depth, depth, rtol=2e-5)
    # ... while interpolating z linearly (the baseline) is not exact on a slanted plane.
    linear = C.interpolate_linear(uv, _sample(depth, uv), W, H)
    assert np.abs(linear / depth - 1).max() > 1e-3
    # Confidence: a plane with a gentle slope is trusted almost everywhere.
    assert np.mean(dense.confidence >= 0.5) > 0.95


def test_depth_does_not_bleed_across_an_image_edge():
    image, depth, box = _box_scene()
    uv = query_grid(W, H, 48, margin=0.02)
    z = _sample(depth, uv)
    dense = C.complete_depth(image, uv, z)
    linear = C.interpolate_linear(uv, z, W, H)
    # Linear interpolation ramps between box and wall over a whole grid cell around the outline; the
    # image-guided completion puts the step on the colour edge.
    assert _bad(linear, depth) > 0.08
    assert _bad(dense.depth, depth) < 0.01
    interior = np.zeros((H, W), bool)
    interior[box] = True
    assert np.mean(np.abs(dense.depth[interior] - 1.0) < 0.02) > 0.98
    # Confidence is low where a triangle spans the step and high on the surfaces away from it.
    outline = np.abs(C.interpolate_linear(uv, z, W, H) - depth) > 0.1
    assert dense.confidence[outline].mean() < 0.3 < 0.9 < dense.confidence[~outline & (dense.spread < 0.01)].mean()
    assert np.isnan(dense.masked(0.5)[outline]).mean() > 0.9


def test_linear_baseline_is_scipy_linear_inside_and_nearest_outside():
    rng = np.random.default_rng(3)
    uv = rng.uniform([10, 10], [W - 10, H - 10], size=(40, 2))
    z = rng.uniform(1, 4, size=40)
    ours = C.interpolate_linear(uv, z, W, H)
    yy, xx = np.mgrid[0:H, 0:W]
    ref = griddata(uv, z, (xx, yy), method="linear")
    inside = np.isfinite(ref)
    np.testing.assert_allclose(ours[inside], ref[inside], rtol=1e-5)
    np.testing.assert_allclose(ours[~inside], griddata(uv, z, (xx, yy), method="nearest")[~inside], rtol=1e-6)


def test_few_degenerate_or_bad_samples():
    grey = np.full((H, W), 90, np.uint8)
    empty = C.complete_depth(grey, np.zeros((0, 2)), np.zeros(0))
    assert np.isnan(empty.depth).all() and (empty.confidence == 0).all() and empty.samples == 0
    # Unusable samples are ignored: NaN, non-positive depth, outside the image.
    bad = C.complete_depth(grey, [[5, 5], [10, 10], [-30, 4], [50, 60]], [np.nan, -1.0, 2.0, 0.0])
    assert bad.samples == 0 and np.isnan(bad.depth).all()
    one = C.complete_depth(grey, [[80, 60]], [2.5])
    np.testing.assert_allclose(one.depth, 2.5, rtol=1e-4)
    collinear = C.complete_depth(grey, [[20, 60], [80, 60], [140, 60]], [1.0, 2.0, 4.0])
    assert np.isfinite(collinear.depth).all() and collinear.depth.min() >= 1.0 - 1e-4 and collinear.depth.max() <= 4.0 + 1e-3
    duplicates = C.complete_depth(grey, [[80, 60], [80, 60], [20, 20], [140, 100]], [2.0, 4.0, 3.0, 3.0])
    assert duplicates.samples == 3
    assert abs(duplicates.depth[60, 80] - 1 / np.mean([1 / 2.0, 1 / 4.0])) < 1e-3  # merged in inverse depth
    with pytest.raises(C.CompletionError, match="pixels but"):
        C.complete_depth(grey, [[1, 1], [2, 2]], [1.0])
    with pytest.raises(C.CompletionError, match="at least 2x2"):
        C.interpolate_linear([[0, 0]], [1.0], 1, 1)
    with pytest.raises(C.CompletionError, match="guide image must be"):
        C.complete_depth(np.zeros((H, W, 2), np.uint8), [[1, 1]], [1.0])
    with pytest.raises(C.CompletionError, match="smoothness"):
        C.CompletionConfig(smoothness=0)
    with pytest.raises(C.CompletionError, match="margin"):
        C.AdaptiveConfig(margin=0.5)


def test_large_images_are_completed_at_the_work_size():
    K2 = np.array([[600.0, 0, 639.5], [0, 600.0, 479.5], [0, 0, 1]])
    depth = _plane(width=1280, height=960, K=K2)
    uv = query_grid(1280, 960, 64, margin=0.0)
    dense = C.complete_depth(np.full((960, 1280, 3), 100, np.uint8), uv, _sample(depth, uv),
                             C.CompletionConfig(work_size=320))
    assert dense.depth.shape == (960, 1280) and dense.confidence.shape == (960, 1280)
    np.testing.assert_allclose(dense.depth[8:-8, 8:-8], depth[8:-8, 8:-8], rtol=2e-3)
    assert dense.distance.max() < 1.5 * np.hypot(1280 / 8, 960 / 8)  # in original pixels


def test_second_round_goes_where_the_completion_is_uncertain():
    image, depth, box = _box_scene(1)
    uv = query_grid(W, H, 24, margin=0.02)
    dense = C.complete_depth(image, uv, _sample(depth, uv))
    chosen = C.select_adaptive_pixels(dense, uv, 24)
    assert chosen.shape == (24, 2) and np.all(chosen == np.round(chosen))
    assert chosen[:, 0].min() >= 0.02 * (W - 1) - 1e-9 and chosen[:, 1].max() <= 0.98 * (H - 1) + 1e-9
    assert len({tuple(p) for p in chosen} | {tuple(p) for p in uv}) == len(chosen) + len(uv)  # nothing asked twice
    # In the triangles that span the box's outline (log-depth spread log 3) far more often than
    # those triangles' share of the image.
    spanning = dense.spread > 1.0
    at = spanning[chosen[:, 1].astype(int), chosen[:, 0].astype(int)]
    assert at.mean() > 0.7 and at.mean() > 1.5 * spanning.mean(), (at.mean(), spanning.mean())
    # The lower band weight moves questions toward the bottom third of the image.
    lower = C.select_adaptive_pixels(dense, uv, 24, C.AdaptiveConfig(lower_band=3.0))
    assert np.sum(lower[:, 1] >= 2 / 3 * (H - 1)) > np.sum(chosen[:, 1] >= 2 / 3 * (H - 1))
    # Image edges as a weight need the image.
    with pytest.raises(C.CompletionError, match="needs the image"):
        C.select_adaptive_pixels(dense, uv, 4, C.AdaptiveConfig(edge_weight=1.0))
    assert len(C.select_adaptive_pixels(dense, uv, 4, C.AdaptiveConfig(edge_weight=1.0), image=image)) == 4
    assert C.select_adaptive_pixels(dense, uv, 0).shape == (0, 2)


def test_completion_beats_linear_on_real_frames_in_oracle_mode(sevenscenes):
    """Real 7-Scenes frames, colour registered onto depth, 256 answers (about a third of them a
    second round): the completion is more accurate than linear interpolation of the same answers."""
    from vlm3_ros.camera import Intrinsics
    from vlm3_ros.engine import OracleBackend
    from vlm3_ros.metrics import abs_rel, delta1
    from vlm3_ros.pipeline import DepthEstimator

    estimator = DepthEstimator(OracleBackend())
    intr = Intrinsics.from_K(sevenscenes.intrinsics(), 640, 480)
    ours, linear = [], []
    for frame in sevenscenes.frame_ids[::16]:
        rgb, depth = sevenscenes.load_registered_rgb(frame), sevenscenes.load_depth(frame)
        result = estimator.estimate_dense(rgb, intr, query_grid(640, 480, 166, 0.02), second_round=90,
                                          reference_depth=depth)
        sparse = result.sparse
        assert result.second_round == 90 and sparse.valid.sum() > 0.8 * len(sparse.valid)
        valid = np.isfinite(depth)
        base = C.interpolate_linear(sparse.uv[sparse.valid], sparse.z[sparse.valid], 640, 480)
        ours.append((delta1(result.dense.depth[valid], depth[valid]), abs_rel(result.dense.depth[valid], depth[valid])))
        linear.append((delta1(base[valid], depth[valid]), abs_rel(base[valid], depth[valid])))
    ours, linear = np.mean(ours, axis=0), np.mean(linear, axis=0)
    assert ours[0] > linear[0] and ours[1] < linear[1], (ours, linear)
    assert ours[0] >= 0.975 and ours[1] <= 0.027, ours
