"""Tests of vlm3_ros.camera: intrinsics, focal unification, max-edge resize, pixel mappings."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vlm3_ros.camera import (
    CameraError,
    Intrinsics,
    prepare_depth,
    prepare_image,
    preparation_map,
    resize_image,
    resize_max_edge,
    unify_focal,
)

try:  # torch is an optional dependency (the "model" extra); its tests skip without it
    import torch
except ImportError:  # pragma: no cover
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def _with_torch(image: np.ndarray) -> list:
    """The image, plus the same as a CPU tensor when torch is installed."""
    return [image] if torch is None else [image, torch.from_numpy(image)]

_DATA = Path(os.environ.get("VLM3_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
SCENES = _DATA / "7scenes_redkitchen"

PLUMB_BOB = Intrinsics(640, 480, 600.0, 610.0, 330.0, 250.0, "plumb_bob", (-0.28, 0.09, 0.0012, -0.0008, -0.012))
# coefficients of the size found in Kinect-style rational calibrations (mild pincushion here)
RATIONAL = Intrinsics(640, 480, 520.0, 520.0, 318.0, 243.0, "rational_polynomial",
                      (0.46, -2.4, 0.0005, 0.0003, 1.4, 0.34, -2.25, 1.33))
FISHEYE = Intrinsics(640, 480, 280.0, 281.0, 322.0, 238.0, "equidistant", (0.02, -0.01, 0.004, -0.001))
ANISO = Intrinsics(640, 480, 585.0, 600.0, 320.0, 240.0)


# ---------------------------------------------------------------------------------------------
# helpers (independent of the module under test)
# ---------------------------------------------------------------------------------------------


def _blobs(width: int, height: int, centres: np.ndarray, sigma: float) -> np.ndarray:
    """float32 image with a Gaussian blob (peak 200) at each (x, y) centre (pixel-centre coords)."""
    xs, ys = np.arange(width), np.arange(height)
    img = np.zeros((height, width), np.float64)
    for cx, cy in centres:
        img += np.exp(-((xs[None, :] - cx) ** 2) / (2 * sigma**2)) * np.exp(-((ys[:, None] - cy) ** 2) / (2 * sigma**2))
    return (200 * img).astype(np.float32)


def _centroid(img: np.ndarray, near: np.ndarray, radius: int) -> np.ndarray:
    """Intensity-weighted centroid of the window of +-radius px around each position."""
    out = []
    for x, y in near:
        x0, y0 = int(round(x)) - radius, int(round(y)) - radius
        win = img[y0:y0 + 2 * radius + 1, x0:x0 + 2 * radius + 1].astype(np.float64)
        win = np.where(win > 0.02 * win.max(), win, 0.0)
        gy, gx = np.mgrid[0:win.shape[0], 0:win.shape[1]]
        out.append(((win * gx).sum() / win.sum() + x0, (win * gy).sum() / win.sum() + y0))
    return np.array(out)


def _bilinear(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear sample of img (H, W[, C]) at float pixel positions (N, 2), all inside."""
    x, y = xy[:, 0], xy[:, 1]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, img.shape[1] - 1), np.minimum(y0 + 1, img.shape[0] - 1)
    wx, wy = x - x0, y - y0
    if img.ndim == 3:
        wx, wy = wx[:, None], wy[:, None]
    img = img.astype(np.float64)
    top = img[y0, x0] * (1 - wx) + img[y0, x1] * wx
    bottom = img[y1, x0] * (1 - wx) + img[y1, x1] * wx
    return top * (1 - wy) + bottom * wy


def _rays(cam: Intrinsics, uv: np.ndarray) -> np.ndarray:
    """Unit rays K^-1 [u, v, 1] (no distortion)."""
    r = np.linalg.solve(cam.K, np.column_stack([uv, np.ones(len(uv))]).T).T
    return r / np.linalg.norm(r, axis=1, keepdims=True)


def _project(cam: Intrinsics, pts: np.ndarray) -> np.ndarray:
    """Pixel positions of 3D points through cam's full model (OpenCV projection)."""
    zero = np.zeros((3, 1))
    if cam.distortion_model == "equidistant":
        px, _ = cv2.fisheye.projectPoints(pts.reshape(-1, 1, 3), zero, zero, cam.K, np.array(cam.D))
    else:
        px, _ = cv2.projectPoints(pts, zero, zero, cam.K, np.array(cam.D) if cam.D else None)
    return px.reshape(-1, 2)


def _grid(width: int, height: int, step: int = 1) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(0, width, step), np.arange(0, height, step))
    return np.column_stack([xs.ravel(), ys.ravel()]).astype(np.float64)


def _texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish random uint8 BGR texture (blurred noise), deterministic."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, (height // 4 + 1, width // 4 + 1, 3)).astype(np.float32)
    img = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

_BAD = [
    (lambda: Intrinsics(640, 480, 0.0, 585.0, 320.0, 240.0), "fx"),
    (lambda: Intrinsics(640, 480, 585.0, -1.0, 320.0, 240.0), "fy"),
    (lambda: Intrinsics(640, 480, float("nan"), 585.0, 320.0, 240.0), "fx"),
    (lambda: Intrinsics(640, 480, 585.0, float("inf"), 320.0, 240.0), "fy"),
    (lambda: Intrinsics(640, 480, 0.0, 0.0, 0.0, 0.0), "uncalibrated"),
    (lambda: Intrinsics(0, 480, 585.0, 585.0, 320.0, 240.0), "width"),
    (lambda: Intrinsics(640.0, 480, 585.0, 585.0, 320.0, 240.0), "width"),
    (lambda: Intrinsics(640, -480, 585.0, 585.0, 320.0, 240.0), "height"),
    (lambda: Intrinsics(20000, 480, 585.0, 585.0, 320.0, 240.0), "width"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, 1000.0, 240.0), "principal point cx"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, 320.0, -300.0), "principal point cy"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, float("nan"), 240.0), "cx"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, "320", 240.0), "cx"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, 320.0, 240.0, "fisheye", (0.1, 0, 0, 0)), "unknown distortion model"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, 320.0, 240.0, "plumb_bob", (0.1, 0, 0, 0)), "needs 5"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, 320.0, 240.0, "rational_polynomial", (0.1,) * 9), "8 or 12 or 14"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, 320.0, 240.0, "equidistant", (0.1,) * 5), "needs 4"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, 320.0, 240.0, "plumb_bob", (0.1, float("nan"), 0, 0, 0)), "finite"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, 320.0, 240.0, "plumb_bob", ("a", 0, 0, 0, 0)), "must be numbers"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, 320.0, 240.0, "", (0.1, 0, 0, 0, 0)), "empty"),
    (lambda: Intrinsics(640, 480, 585.0, 585.0, 320.0, 240.0, "none", (0.1, 0, 0, 0, 0)), "'none'"),
    (lambda: Intrinsics.from_K([[585, 1.5, 320], [0, 585, 240], [0, 0, 1]], 640, 480), "skew"),
    (lambda: Intrinsics.from_K([[585, 0, 320], [0, 585, 240], [0, 0, 2]], 640, 480), "pinhole form"),
    (lambda: Intrinsics.from_K([[585, 0, 320], [3, 585, 240], [0, 0, 1]], 640, 480), "pinhole form"),
    (lambda: Intrinsics.from_K([585, 0, 320, 0, 585, 240, 0, 0], 640, 480), "9 values"),
    (lambda: Intrinsics.from_K([585, 0, 320, 0, 585, 240, 0, 0, float("nan")], 640, 480), "non-finite"),
    (lambda: Intrinsics.from_K(np.diag([585.0, 585, 1]), 640, 480, D=(0.1, 0, 0, 0)), "cannot infer"),
    (lambda: Intrinsics.from_dict({"width": 640, "height": 480, "fx": 585, "fy": 585, "cx": 320}), "missing"),
    (lambda: Intrinsics.from_dict({**ANISO.to_dict(), "skew": 0}), "unknown intrinsics keys"),
    (lambda: Intrinsics.from_camera_info(SimpleNamespace(k=[585, 0, 320, 0, 585, 240, 0, 0, 1], d=[],
                                                         distortion_model="", width=640, height=480,
                                                         binning_x=2, binning_y=2)), "binning"),
    (lambda: Intrinsics.from_camera_info(SimpleNamespace(width=640, height=480)), "no field 'k'"),
    (lambda: ANISO.scaled(0.0), "sx"),
    (lambda: ANISO.scaled(1.0, float("nan")), "sy"),
    (lambda: ANISO.scaled(1e-4), "width"),
    (lambda: preparation_map(ANISO, {"mode": "crop", "value": 1000}), "mode"),
    (lambda: preparation_map(ANISO, {"mode": "focal", "value": -5}), "value"),
    (lambda: prepare_image(np.zeros((480, 640), np.uint8), ANISO, {"value": 1000}), "mode"),
    (lambda: prepare_image(np.zeros((480, 640), np.uint8), ANISO, SimpleNamespace(mode="focal")), "mode and value"),
    (lambda: unify_focal(np.zeros((480, 640), np.uint8), ANISO, 0.0), "value"),
    (lambda: unify_focal(np.zeros((480, 640), np.uint8), ANISO, 40000.0), "gives an unusable image: width"),
    (lambda: unify_focal(np.zeros((480, 640), np.uint8), ANISO, 0.5), "gives an unusable image: height"),
    (lambda: resize_max_edge(np.zeros((480, 2), np.uint8), Intrinsics.from_focal(2, 480, 500), 100), "short side"),
    (lambda: unify_focal(np.zeros((240, 320), np.uint8), ANISO, 1000.0), "320x240 but the camera is 640x480"),
    (lambda: unify_focal(np.zeros((480, 640), np.int32), ANISO, 1000.0), "dtype int32"),
    (lambda: unify_focal(np.zeros((480, 640, 3, 1), np.uint8), ANISO, 1000.0), "shape"),
    (lambda: unify_focal([[0]], ANISO, 1000.0), "numpy array or torch tensor"),
    (lambda: unify_focal(np.zeros((480, 640), np.uint8), ANISO.to_dict(), 1000.0), "Intrinsics"),
    (lambda: unify_focal(np.zeros((480, 640), np.uint8), ANISO, 1000.0, interpolation="cubic"), "interpolation"),
    (lambda: resize_image(np.zeros((10, 10), np.uint8), 0, 5), "width"),
    (lambda: prepare_depth(np.zeros((10, 10), np.float32), unify_focal(np.zeros((480, 640), np.uint8), ANISO, 100)),
     "depth map is 10x10"),
    (lambda: preparation_map(ANISO, {"mode": "focal", "value": 500, "undistort": "yes"}), "undistort"),
    (lambda: preparation_map(PLUMB_BOB, {"mode": "focal", "value": 1000}).to_prepared([1, 2, 3]), "(..., 2)"),
] + ([] if torch is None else [
    (lambda: unify_focal(torch.zeros((480, 640), dtype=torch.int32), ANISO, 1000.0), "dtype"),
])


@pytest.mark.parametrize("make, message", _BAD, ids=[f"{i}-{m}" for i, (_, m) in enumerate(_BAD)])
def test_bad_input_raises_camera_error_naming_the_problem(make, message):
    with pytest.raises(CameraError) as info:
        make()
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_constructors_agree_and_normalise():
    a = Intrinsics.from_K([585, 0, 320, 0, 585, 240, 0, 0, 1], 640, 480)
    b = Intrinsics.from_focal(640, 480, 585, 320, 240)
    info = SimpleNamespace(k=(585.0, 0.0, 320.0, 0.0, 585.0, 240.0, 0.0, 0.0, 1.0), d=[0.0] * 5,
                           distortion_model="", width=np.uint32(640), height=480)
    c = Intrinsics.from_camera_info(info)
    assert a == b == c and c.distortion_model == "none" and c.D == () and type(c.width) is int
    assert c.is_ideal_pinhole and not c.has_distortion
    assert Intrinsics.from_dict(a.to_dict()) == a
    assert Intrinsics.from_dict(PLUMB_BOB.to_dict()) == PLUMB_BOB
    # ROS image_geometry treats an empty D as no distortion, whatever the model name.
    assert Intrinsics(640, 480, 585, 585, 320, 240, "plumb_bob", ()).distortion_model == "none"
    # all-zero plumb_bob is a valid model without distortion
    z = Intrinsics(640, 480, 585, 585, 320, 240, "plumb_bob", np.zeros(5))
    assert z.is_ideal_pinhole and z.D == (0.0,) * 5
    assert Intrinsics.from_focal(641, 480, 500).cx == 320.0 and Intrinsics.from_focal(641, 480, 500).cy == 239.5
    assert not ANISO.is_ideal_pinhole and not PLUMB_BOB.is_ideal_pinhole
    assert Intrinsics(10, 10, 100.0, 100.0 * (1 + 1e-12), 5, 5).is_ideal_pinhole
    np.testing.assert_array_equal(PLUMB_BOB.K, [[600, 0, 330], [0, 610, 250], [0, 0, 1]])
    # camera info of the rectified image uses P and has no distortion (REP-104)
    rect = SimpleNamespace(k=list(PLUMB_BOB.K.ravel()), d=list(PLUMB_BOB.D), distortion_model="plumb_bob",
                           p=[590.0, 0, 331, -30.0, 0, 590.0, 251, 0, 0, 0, 1, 0], width=640, height=480)
    assert Intrinsics.from_camera_info(rect) == PLUMB_BOB
    assert Intrinsics.from_camera_info(rect, rectified=True) == Intrinsics(640, 480, 590.0, 590.0, 331.0, 251.0)
    assert Intrinsics.from_K(np.diag([500.0, 500, 1]), 10, 10, D=(0.0,) * 14).distortion_model == "rational_polynomial"


# ---------------------------------------------------------------------------------------------
# the resize convention against real OpenCV output
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1000 / 585, 750 / 585, 2.513, 0.62, 0.37])
def test_scaled_intrinsics_match_real_cv2_resize_output(scale):
    """A blob at the projection of known 3D points lands, after cv2.resize by `scale`, at the
    projection through Intrinsics.scaled(scale); also via the module's own resize."""
    cam = Intrinsics(211, 157, 150.0, 150.0, 101.3, 80.6)
    pts3d = np.array([[-0.4, -0.3, 1.0], [0.35, 0.25, 1.0], [0.05, -0.1, 1.0], [-0.3, 0.35, 1.0]])
    sigma = 2.0 * max(1.0, 1.0 / scale)
    img = _blobs(cam.width, cam.height, _project(cam, pts3d), sigma)
    flag = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = cv2.resize(img, None, fx=scale, fy=scale, interpolation=flag)
    new = cam.scaled(scale)
    assert (new.width, new.height) == (out.shape[1], out.shape[0]) == (round(211 * scale), round(157 * scale))
    expected = _project(new, pts3d)
    radius = int(4 * sigma * scale) + 2
    np.testing.assert_allclose(_centroid(out, expected, radius), expected, atol=0.02)
    # the module's resampler (numpy and torch) follows the same convention
    for src in _with_torch(img):
        prepared = unify_focal(src, cam, 150.0 * scale)
        assert prepared.intrinsics.fx == 150.0 * scale
        assert (prepared.width, prepared.height) == (new.width, new.height)
        np.testing.assert_allclose(_centroid(np.asarray(prepared.image), expected, radius), expected, atol=0.03)


def test_scaled_round_trip_and_pixel_centre_convention():
    cam = Intrinsics(640, 480, 585.0, 590.0, 320.0, 240.0, "plumb_bob", PLUMB_BOB.D)
    up = cam.scaled(2.0)
    # pixel (0, 0) covers [-0.5, 0.5]; at scale 2 it covers [-0.5, 1.5], centre 0.5
    assert (up.width, up.height, up.fx, up.fy, up.cx, up.cy) == (1280, 960, 1170.0, 1180.0, 640.5, 480.5)
    assert up.D == cam.D and up.distortion_model == "plumb_bob"
    back = up.scaled(0.5)
    assert back == cam
    s = 1000 / 585
    rt = cam.scaled(s).scaled(1 / s)
    assert (rt.width, rt.height) == (640, 480)
    np.testing.assert_allclose([rt.fx, rt.fy, rt.cx, rt.cy], [585, 590, 320, 240], rtol=1e-13)


def test_resize_image_nearest_and_linear_follow_the_convention():
    # a 4x3 label image doubled: nearest gives each pixel twice
    lab = np.arange(12, dtype=np.uint16).reshape(3, 4)
    for src in _with_torch(lab.astype(np.float32)):
        np.testing.assert_array_equal(resize_image(src, 8, 6, interpolation="nearest"), np.kron(lab, np.ones((2, 2))))
    assert resize_image(lab, 8, 6, interpolation="nearest").dtype == np.uint16
    # a linear ramp resized is the ramp at the mapped positions (x = (x' + 0.5) / s - 0.5)
    ramp = np.tile(np.arange(100, dtype=np.float32), (50, 1))
    for src in _with_torch(ramp):
        out = np.asarray(resize_image(src, 173, 50))
        expected = (np.arange(173) + 0.5) * 100 / 173 - 0.5
        np.testing.assert_allclose(out[25, 2:-2], expected[2:-2], atol=1e-3)
    # shrinking: OpenCV's area weights are computed in single precision (about 0.04 px here)
    for src in _with_torch(ramp):
        down = np.asarray(resize_image(src, 37, 20))
        np.testing.assert_allclose(down[10, 1:-1], ((np.arange(37) + 0.5) * 100 / 37 - 0.5)[1:-1], atol=0.05)


# ---------------------------------------------------------------------------------------------
# focal unification on real frames
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kitchen():
    if not (SCENES / "camera-intrinsics.txt").exists():
        pytest.skip(f"7-Scenes sample data not found at {SCENES} (set VLM3_SHARED_DATA)")
    K = np.loadtxt(SCENES / "camera-intrinsics.txt")
    color = cv2.imread(str(SCENES / "rgbd-frames" / "frame-000150.color.png"), cv2.IMREAD_COLOR)
    depth = cv2.imread(str(SCENES / "rgbd-frames" / "frame-000150.depth.png"), cv2.IMREAD_UNCHANGED)
    assert color is not None and depth is not None
    return Intrinsics.from_K(K, color.shape[1], color.shape[0]), color, depth


@pytest.mark.parametrize("target", [1000.0, 750.0])
def test_focal_unification_on_7scenes(kitchen, target):
    cam, color, _ = kitchen
    assert (cam.fx, cam.fy, cam.cx, cam.cy) == (585.0, 585.0, 320.0, 240.0)
    prepared = unify_focal(color, cam, target)
    s = target / 585.0
    assert (prepared.width, prepared.height) == (round(640 * s), round(480 * s))
    if target == 1000.0:
        assert (prepared.width, prepared.height) == (1094, 821)
    assert prepared.image.shape == (prepared.height, prepared.width, 3) and prepared.image.dtype == np.uint8
    k = prepared.intrinsics
    assert k.fx == target and k.fy == target and k.is_ideal_pinhole and prepared.source == cam
    assert k.cx == pytest.approx((320 + 0.5) * s - 0.5, abs=1e-12)
    # rays through mapped pixels agree
    uv = _grid(640, 480, 7) + 0.25
    uv2 = prepared.mapping.to_prepared(uv)
    cos = np.clip(np.sum(_rays(cam, uv) * _rays(k, uv2), axis=1), -1, 1)
    assert np.max(np.arccos(cos)) < 1e-6
    np.testing.assert_allclose(prepared.mapping.to_original(uv2), uv, atol=1e-9)
    # content: the prepared pixel equals the original bilinearly sampled at its mapped position
    inner = _grid(prepared.width, prepared.height, 3)
    src = prepared.mapping.to_original(inner)
    inside = np.all((src >= 0) & (src <= (639, 479)), axis=1)
    expected = _bilinear(color, src[inside])
    got = prepared.image[inner[inside, 1].astype(int), inner[inside, 0].astype(int)].astype(np.float64)
    diff = np.abs(got - expected)
    assert diff.mean() < 0.5 and diff.max() <= 1.0 + 1e-9


def test_depth_follows_the_prepared_image_on_7scenes(kitchen):
    cam, color, depth_mm = kitchen
    prepared = unify_focal(color, cam, 1000.0)
    depth = depth_mm.astype(np.float32) / 1000.0
    depth[depth == 0] = np.nan
    out = prepare_depth(depth, prepared)
    assert out.shape == (prepared.height, prepared.width) and out.dtype == np.float32
    uv = _grid(prepared.width, prepared.height, 5)
    src = np.floor(prepared.mapping.to_original(uv) + 0.5).astype(int)
    src = np.clip(src, 0, (639, 479))
    np.testing.assert_array_equal(out[uv[:, 1].astype(int), uv[:, 0].astype(int)], depth[src[:, 1], src[:, 0]])
    # integer depth keeps its dtype and values; torch gives the same
    out16 = prepare_depth(depth_mm, prepared)
    assert out16.dtype == np.uint16 and set(np.unique(out16)) <= set(np.unique(depth_mm))
    for src in _with_torch(depth)[1:]:
        np.testing.assert_array_equal(prepare_depth(src, prepared).numpy(), out)
    assert abs(np.isnan(out).mean() - np.isnan(depth).mean()) < 0.01


# ---------------------------------------------------------------------------------------------
# distorted and anisotropic cameras
# ---------------------------------------------------------------------------------------------


def _dot_pattern(cam: Intrinsics, spacing_px: float) -> np.ndarray:
    """3D points (z = 1) whose projections lie on a grid inside the image, away from the edges."""
    us, vs = np.meshgrid(np.arange(40, cam.width - 40, spacing_px), np.arange(40, cam.height - 40, spacing_px))
    ideal = np.column_stack([(us.ravel() - cam.cx) / cam.fx, (vs.ravel() - cam.cy) / cam.fy])
    return np.column_stack([ideal, np.ones(len(ideal))])


@pytest.mark.parametrize("cam", [PLUMB_BOB, RATIONAL, FISHEYE, ANISO], ids=["plumb_bob", "rational", "equidistant",
                                                                            "fx!=fy"])
@pytest.mark.parametrize("target", [1000.0, 400.0])
def test_undistortion_puts_pattern_where_the_ideal_pinhole_does(cam, target):
    pts3d = _dot_pattern(cam, 55.0)
    observed = _project(cam, pts3d)
    inside = np.all((observed > 15) & (observed < (cam.width - 15, cam.height - 15)), axis=1)
    pts3d, observed = pts3d[inside], observed[inside]
    img = _blobs(cam.width, cam.height, observed, 1.6)
    prepared = unify_focal(img, cam, target)
    k = prepared.intrinsics
    assert k.fx == k.fy == target and k.is_ideal_pinhole
    assert (k.width, k.height) == (round(cam.width * target / cam.fx), round(cam.height * target / cam.fy))
    ideal = (pts3d[:, :2] * target + (k.cx, k.cy))
    keep = np.all((ideal > 12) & (ideal < (k.width - 12, k.height - 12)), axis=1)
    assert keep.sum() >= 20
    radius = max(4, int(5 * 1.6 * target / cam.fx))
    for src in _with_torch(img):
        image = np.asarray(unify_focal(src, cam, target).image)
        found = _centroid(image, ideal[keep], radius)
        assert np.max(np.linalg.norm(found - ideal[keep], axis=1)) < 0.5
    # the mapping agrees with the model, and round-trips
    np.testing.assert_allclose(prepared.mapping.to_prepared(observed), ideal, atol=1e-6)
    uv = _grid(cam.width, cam.height, 9) + 0.3
    back = prepared.mapping.to_original(prepared.mapping.to_prepared(uv))
    assert np.max(np.abs(back - uv)) < 1e-3
    uv2 = _grid(k.width, k.height, 13)
    assert np.max(np.abs(prepared.mapping.to_prepared(prepared.mapping.to_original(uv2)) - uv2)) < 1e-3


@pytest.mark.parametrize("cam", [PLUMB_BOB, FISHEYE, ANISO], ids=["plumb_bob", "equidistant", "fx!=fy"])
@pytest.mark.parametrize("backend", ["numpy", pytest.param("torch", marks=needs_torch)])
@pytest.mark.parametrize("target", [1000.0, 330.0])
def test_resampled_ramp_equals_the_mapping_everywhere(cam, backend, target):
    """Bilinear (and box / Gaussian / triangle) filtering reproduces a linear ramp exactly, so the
    prepared image of the ramps x and y IS the mapping to_original, pixel by pixel."""
    xs, ys = np.meshgrid(np.arange(cam.width, dtype=np.float32), np.arange(cam.height, dtype=np.float32))
    ramp = np.dstack([xs, ys])
    src = torch.from_numpy(ramp) if backend == "torch" else ramp
    prepared = unify_focal(src, cam, target)
    out = np.asarray(prepared.image)[::3, ::3]  # every third row and column keeps this fast
    uv = _grid(prepared.width, prepared.height, 3)
    expected = prepared.mapping.to_original(uv).reshape(out.shape)
    margin = 4.0 * max(1.0, cam.fx / target)  # filters see the image edge within this distance
    inside = np.all((expected > margin) & (expected < (cam.width - 1 - margin, cam.height - 1 - margin)), axis=2)
    err = np.abs(out[inside] - expected[inside])
    # Enlarging: bilinear is exact up to OpenCV remap's 1/32 px position quantisation. Shrinking:
    # the area (OpenCV, single-precision weights) and triangle (torch, weights sampled at pixel
    # centres) filters are exact only up to their discretisation, measured up to 0.074 px.
    assert err.max() < (0.04 if target >= cam.fx else 0.1), err.max()
    # nearest neighbour picks the pixel whose centre is nearest to the mapped position
    near = prepare_depth(ramp if backend == "numpy" else torch.from_numpy(ramp), prepared)
    near = np.asarray(near)[::3, ::3]
    agree = np.all(near[inside] == np.floor(expected[inside] + 0.5), axis=1).mean()
    assert agree > 0.999


def test_undistortion_maps_outside_pixels_to_black_and_nan():
    prepared = unify_focal(np.full((480, 640), 255, np.uint8), FISHEYE, 600.0)
    corners = prepared.mapping.to_original([[0, 0], [prepared.width - 1, prepared.height - 1]])
    # equidistant fisheye undistorted to a pinhole at the same scale: corners see beyond the sensor
    assert corners[0, 0] > 0 and corners[1, 0] < 639
    centre = prepared.mapping.to_prepared([[322.0, 238.0]])
    np.testing.assert_allclose(centre, [[prepared.intrinsics.cx, prepared.intrinsics.cy]], atol=1e-9)
    pincushion = Intrinsics(640, 480, 500.0, 500.0, 320.0, 240.0, "plumb_bob", (0.25, 0.1, 0, 0, 0))
    p = unify_focal(np.full((480, 640), 255, np.uint8), pincushion, 500.0)
    assert p.image[0, 0] == 0 and p.image[240, 320] == 255
    d = prepare_depth(np.ones((480, 640), np.float32), p)
    assert np.isnan(d[0, 0]) and d[240, 320] == 1.0
    # a pixel outside the region where the distortion can be inverted maps to NaN, not a guess
    strong = Intrinsics(640, 480, 300.0, 300.0, 320.0, 240.0, "plumb_bob", (-0.6, 0.0, 0, 0, 0))
    m = preparation_map(strong, {"mode": "focal", "value": 300.0})
    # r_d = r (1 - 0.6 r^2) peaks at r_d = 0.497; r_d = 0.45 has a true preimage (r = 0.5496) and a
    # folded one (r = 0.925); r_d = 5 and r_d = 0.6 have only preimages on the far side (r < 0)
    far = m.to_prepared([[320.0 + 300.0 * 5, 240.0], [320.0 + 300 * 0.45, 240.0], [320.0, 240.0],
                         [320.0, 240 + 300 * 0.6]])
    assert np.isnan(far[0]).all() and np.isnan(far[3]).all()
    np.testing.assert_allclose(far[1:3], [[320 + 300 * 0.54961613, 240.0], [m.prepared.cx, m.prepared.cy]], atol=0.05)


# ---------------------------------------------------------------------------------------------
# max-edge resize
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, expected", [((600, 400), (1024, 683)), ((400, 600), (683, 1024)),
                                            ((1215, 920), (1024, 775)), ((2048, 1536), (1024, 768))])
def test_max_edge_resize(size, expected):
    w, h = size
    cam = Intrinsics.from_focal(w, h, 0.8 * w)
    centres = np.array([[0.2 * w, 0.3 * h], [0.77 * w, 0.81 * h], [0.5 * w + 0.3, 0.5 * h - 0.2]])
    sigma = 2.0 * max(1.0, max(w, h) / 1024)
    img = _blobs(w, h, centres, sigma)
    prepared = resize_max_edge(img, cam, 1024)
    assert (prepared.width, prepared.height) == expected and prepared.image.shape == expected[::-1]
    sx, sy = expected[0] / w, expected[1] / h
    mapped = prepared.mapping.to_prepared(centres)
    np.testing.assert_allclose(mapped, (centres + 0.5) * (sx, sy) - 0.5, atol=1e-12)
    assert prepared.intrinsics == cam.scaled(sx, sy)
    radius = int(4 * sigma * sx) + 2
    np.testing.assert_allclose(_centroid(prepared.image, mapped, radius), mapped, atol=0.03)
    same = prepare_image(img, cam, {"mode": "max_edge", "value": 1024})
    np.testing.assert_array_equal(same.image, prepared.image)


def test_max_edge_keeps_or_removes_distortion():
    img = _texture(480, 640)
    kept = resize_max_edge(img, PLUMB_BOB, 1024)
    assert kept.intrinsics.D == PLUMB_BOB.D and kept.intrinsics.fx == pytest.approx(600 * 1.6)
    assert not kept.mapping.undistort
    flat = resize_max_edge(img, PLUMB_BOB, 1024, undistort=True)
    k = flat.intrinsics
    assert k.is_ideal_pinhole and max(k.width, k.height) == 1024 and flat.mapping.undistort
    assert k.height == round(480 * k.fy / 610.0)
    uv = _grid(640, 480, 11)
    assert np.max(np.abs(flat.mapping.to_original(flat.mapping.to_prepared(uv)) - uv)) < 1e-3
    # an ideal pinhole is not touched by undistort=True
    ideal = Intrinsics.from_focal(640, 480, 585.0)
    np.testing.assert_array_equal(resize_max_edge(img, ideal, 1024, undistort=True).image,
                                  resize_max_edge(img, ideal, 1024).image)


# ---------------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------------

_cameras = st.builds(
    lambda w, h, f, ratio, ox, oy: Intrinsics(w, h, f, f * ratio, (w - 1) / 2 + ox * w, (h - 1) / 2 + oy * h),
    st.integers(16, 4000), st.integers(16, 4000), st.floats(50.0, 5000.0), st.sampled_from([1.0, 1.0, 0.97, 1.04]),
    st.floats(-0.2, 0.2), st.floats(-0.2, 0.2),
).filter(lambda c: max(c.width * 1000 / c.fx, c.height * 1000 / c.fy) < 16000)


@settings(max_examples=150, deadline=None)
@given(cam=_cameras, mode=st.sampled_from(["focal", "max_edge"]), value=st.floats(100.0, 1500.0),
       dist=st.sampled_from([None, "plumb_bob", "equidistant"]), u=st.floats(0, 1), v=st.floats(0, 1))
def test_property_mapping_round_trip(cam, mode, value, dist, u, v):
    if dist == "plumb_bob":
        cam = Intrinsics(cam.width, cam.height, cam.fx, cam.fy, cam.cx, cam.cy, dist, (-0.1, 0.02, 1e-4, -2e-4, 0.0))
    elif dist == "equidistant":
        cam = Intrinsics(cam.width, cam.height, cam.fx, cam.fy, cam.cx, cam.cy, dist, (0.01, -0.005, 0.001, 0.0))
    if mode == "max_edge":
        value = min(value, 10000 / max(cam.width, cam.height))
        assume(min(cam.width, cam.height) * value / max(cam.width, cam.height) >= 2)
    else:
        value = min(value, cam.fx)
        assume(min(cam.width * value / cam.fx, cam.height * value / cam.fy) >= 2)
    m = preparation_map(cam, {"mode": mode, "value": value, "undistort": True})
    uv = np.array([[u * (cam.width - 1), v * (cam.height - 1)], [0.0, 0.0], [cam.width - 1.0, cam.height - 1.0]])
    # keep to the region where a (barrel) distortion is one-to-one
    r = np.hypot((uv[:, 0] - cam.cx) / cam.fx, (uv[:, 1] - cam.cy) / cam.fy)
    uv = uv[r < 1.0] if dist else uv
    there = m.to_prepared(uv)
    assert np.all(np.isfinite(there))
    tol = 1e-3 if m.undistort else 1e-9 * max(cam.width, cam.height)
    np.testing.assert_allclose(m.to_original(there), uv, atol=tol)
    # and the other way round, from prepared pixels that see the original image
    np.testing.assert_allclose(m.to_prepared(m.to_original(there)), there, atol=tol * max(1.0, m.sx, m.sy))
    if mode == "focal":
        assert m.prepared.fx == m.prepared.fy == value


@settings(max_examples=200, deadline=None)
@given(cam=_cameras, a=st.floats(0.05, 20.0), b=st.floats(0.05, 20.0))
def test_property_scaled_composes(cam, a, b):
    big = max(cam.width, cam.height) * max(a, a * b, 1.0)
    small = min(cam.width, cam.height) * min(a, a * b, 1.0)
    if big > 16000 or small < 2:
        return
    ab, then = cam.scaled(a * b), cam.scaled(a).scaled(b)
    np.testing.assert_allclose([then.fx, then.fy, then.cx, then.cy], [ab.fx, ab.fy, ab.cx, ab.cy],
                               rtol=1e-12, atol=1e-9)
    # sizes compose up to the rounding of the intermediate size
    assert abs(then.width - ab.width) <= math.ceil(0.5 * b) + 1
    if float(cam.width * a).is_integer():
        assert then.width == round(round(cam.width * a) * b)
    uv = np.array([[0.0, 0.0], [cam.width - 1.0, cam.height - 1.0]])
    np.testing.assert_allclose(((uv + 0.5) * a - 0.5 + 0.5) * b - 0.5, (uv + 0.5) * a * b - 0.5, rtol=1e-12, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# torch path
# ---------------------------------------------------------------------------------------------

# (camera, target focal, tolerated mean |torch - OpenCV| on uint8). Upscaling is bilinear in both
# (measured 0.12); undistortion is the same bilinear remap in both (measured < 0.01). Shrinking is
# OpenCV's area average vs torch's antialiased (triangle) filter: on this noise-like texture they
# differ by 2.4 on average (0.4 on the real 7-Scenes frame, see test_torch_downscale_on_7scenes).
_TORCH_CASES = [(Intrinsics.from_focal(640, 480, 585.0, 320.0, 240.0), 1000.0, 0.5),
                (Intrinsics.from_focal(640, 480, 585.0, 320.0, 240.0), 750.0, 0.5),
                (Intrinsics.from_focal(640, 480, 585.0, 320.0, 240.0), 300.0, 3.0),
                (ANISO, 1000.0, 0.5), (PLUMB_BOB, 1000.0, 0.05), (PLUMB_BOB, 300.0, 0.05), (FISHEYE, 750.0, 0.05)]


@needs_torch
@pytest.mark.parametrize("cam, target, tol", _TORCH_CASES)
def test_torch_matches_opencv(cam, target, tol):
    img = _texture(cam.height, cam.width, seed=3)
    ref = unify_focal(img, cam, target)
    tensor = torch.from_numpy(img)
    got = unify_focal(tensor, cam, target)
    assert isinstance(got.image, torch.Tensor) and got.image.dtype == torch.uint8
    assert got.image.device == tensor.device and got.image.shape == ref.image.shape
    assert got.intrinsics == ref.intrinsics and got.mapping == ref.mapping
    diff = np.abs(got.image.numpy().astype(np.float64) - ref.image)
    assert diff.mean() < tol, diff.mean()
    # other dtypes and layouts
    gray16 = (img[..., 1].astype(np.uint16) * 257)
    g = unify_focal(torch.from_numpy(gray16), cam, target).image
    assert g.dtype == torch.uint16 and g.shape == ref.image.shape[:2]
    assert np.abs(g.numpy().astype(np.float64) - unify_focal(gray16, cam, target).image).mean() < 257 * tol
    f1 = img[..., :1].astype(np.float32) / 255
    t1 = unify_focal(torch.from_numpy(f1), cam, target).image
    r1 = unify_focal(f1, cam, target).image
    assert t1.dtype == torch.float32 and t1.shape == r1.shape == ref.image.shape[:2] + (1,)
    assert np.abs(t1.numpy() - r1).mean() < tol / 255


@needs_torch
def test_torch_downscale_on_7scenes(kitchen):
    cam, color, _ = kitchen
    for target, tol in ((300.0, 1.0), (1000.0, 0.5)):
        ref = unify_focal(color, cam, target).image.astype(np.float64)
        got = unify_focal(torch.from_numpy(color), cam, target).image.numpy()
        assert np.abs(got - ref).mean() < tol
