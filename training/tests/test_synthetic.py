"""Synthetic scenes: exact depth of known geometry, box silhouettes, smooth poses, bags, CLI."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from vlm3_ros.camera import Intrinsics
from vlm3_ros.geometry import project, relative_pose, rotation_angle, transform_points

from vlm3_train import synthetic as syn
from vlm3_train.synthetic import Box, Rect, Scene, Texture, camera_rays, cast_rays, look_pose, render

TEX = Texture("checker", (0.8, 0.2, 0.2), (0.2, 0.2, 0.8), period=0.5, seed=3)
CAM = Intrinsics(64, 48, 50.0, 50.0, 31.5, 23.5)


def wall_scene(distance: float) -> Scene:
    """A large wall facing the origin: the plane x = distance."""
    wall = Rect(np.array([distance, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]),
                50.0, 50.0, TEX, "wall")
    return Scene((wall,))


def pixel_grid(cam: Intrinsics) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(cam.width), np.arange(cam.height))
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(float)


def test_camera_facing_a_plane_sees_its_analytic_depth():
    scene = wall_scene(3.0)
    rgb, depth = render(scene, look_pose((0, 0, 0), heading=0.0), CAM)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(depth, 3.0, rtol=1e-6)  # a fronto-parallel plane: z is constant
    uv = pixel_grid(CAM)
    ray = syn.ray_distance(scene, look_pose((0, 0, 0), 0.0), CAM, uv)
    expected = 3.0 * np.linalg.norm(np.linalg.inv(CAM.K) @ np.c_[uv, np.ones(len(uv))].T, axis=0)
    np.testing.assert_allclose(ray, expected, rtol=1e-12)


@pytest.mark.parametrize("heading, pitch, roll", [(0.3, -10.0, 4.0), (-0.5, 12.0, -7.0)])
def test_tilted_camera_depth_matches_ray_plane_formula(heading, pitch, roll):
    # Plane n . X = d with n = +x, d = 4, seen from (0.5, -0.3, 0.2): z = (d - n.c) / (n . R r).
    scene = wall_scene(4.0)
    centre = np.array([0.5, -0.3, 0.2])
    T = look_pose(centre, heading, pitch, roll)
    _, depth = render(scene, T, CAM, supersample=1)
    rays = np.linalg.inv(CAM.K) @ np.c_[pixel_grid(CAM), np.ones(CAM.width * CAM.height)].T
    expected = (4.0 - centre[0]) / (T[:3, :3] @ rays)[0]
    np.testing.assert_allclose(depth.ravel(), expected, rtol=1e-6)


def test_box_face_depth_and_silhouette_agree_with_projected_corners():
    backdrop = Rect(np.array([8.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]),
                    50.0, 50.0, TEX, "backdrop")
    # Fronto-parallel box straight ahead: its near face x = 2.5 spans y in [-0.4, 0.4], z in [-0.3, 0.3].
    box = Box(np.array([3.0, 0.0, 0.0]), np.array([0.5, 0.4, 0.3]), 0.0, TEX, "box")
    scene = Scene((backdrop, box))
    T = look_pose((0, 0, 0), 0.0)
    _, depth = render(scene, T, CAM, supersample=1)
    u, v = pixel_grid(CAM).T
    # Near face corners project to u = cx -+ f * 0.4 / 2.5, v = cy -+ f * 0.3 / 2.5.
    half_u, half_v = 50.0 * 0.4 / 2.5, 50.0 * 0.3 / 2.5
    inside = (np.abs(u - CAM.cx) < half_u - 0.01) & (np.abs(v - CAM.cy) < half_v - 0.01)
    outside = (np.abs(u - CAM.cx) > half_u + 0.01) | (np.abs(v - CAM.cy) > half_v + 0.01)
    assert inside.sum() > 50 and outside.sum() > 500
    np.testing.assert_allclose(depth.ravel()[inside], 2.5, rtol=1e-6)
    np.testing.assert_allclose(depth.ravel()[outside], 8.0, rtol=1e-6)

    # A turned box seen from an oblique pose: the pixels that hit it are exactly those inside the
    # convex hull of its projected corners, and every hit lies on its surface.
    box = Box(np.array([3.2, 0.4, -0.2]), np.array([0.6, 0.3, 0.45]), 0.7, TEX, "box")
    scene = Scene((backdrop, box))
    T = look_pose((0.2, -0.3, 0.1), heading=0.15, pitch=-6.0, roll=3.0)
    uv = pixel_grid(CAM)
    hits = cast_rays(scene, T[:3, 3], camera_rays(CAM, uv) @ T[:3, :3].T)
    corners_uv, corners_z = project(transform_points(np.linalg.inv(T), box.corners()), CAM.K)
    assert np.all(corners_z > 0)
    hull = cv2.convexHull(corners_uv.astype(np.float32))
    signed = np.array([cv2.pointPolygonTest(hull, (float(a), float(b)), True) for a, b in uv])
    on_box = hits.index == 1
    assert on_box.sum() > 100
    assert np.all(on_box[signed > 0.01]) and not np.any(on_box[signed < -0.01])
    local = (hits.points[on_box] - box.center) @ box.rotation
    np.testing.assert_allclose(np.max(np.abs(local) / box.half, axis=1), 1.0, atol=1e-9)
    _, depth = render(scene, T, CAM, supersample=1)
    np.testing.assert_allclose(depth.ravel()[on_box], hits.t[on_box], rtol=1e-6)


def test_no_hit_is_invalid_depth_and_sky_colour():
    scene = wall_scene(3.0)
    rgb, depth = render(scene, look_pose((0, 0, 0), heading=math.pi), CAM, sky=(10, 200, 30))  # facing away
    assert np.isnan(depth).all()
    assert (rgb == (10, 200, 30)).all()


def test_sequence_poses_are_smooth_and_reproject_depth_exactly():
    seq = syn.generate_sequence(seed=5, frames=12, intrinsics=CAM, supersample=1)
    poses = seq.poses
    steps = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1)
    assert np.all((steps > 0.03) & (steps < 0.3)), steps
    turns = [rotation_angle(relative_pose(poses[i], poses[i + 1])[:3, :3]) for i in range(len(poses) - 1)]
    assert max(turns) < 6.0, turns
    # Smooth: consecutive steps change little (velocity is nearly constant).
    accel = np.linalg.norm(np.diff(poses[:, :3, 3], n=2, axis=0), axis=1)
    assert np.all(accel < 0.25 * steps.mean())
    assert np.all(np.diff(seq.stamps_ns) == syn.FRAME_PERIOD_NS)

    i, j = 2, 6
    fi = seq.frame(i)
    valid = np.isfinite(fi.depth)
    assert valid.mean() > 0.5
    uv_i = pixel_grid(CAM)[valid.ravel()]
    points_i = camera_rays(CAM, uv_i) * fi.depth.ravel()[valid.ravel()][:, None]
    T_j_i = relative_pose(poses[j], poses[i])
    uv_j, z_j = project(transform_points(T_j_i, points_i), CAM.K)
    inside = (z_j > 0) & (uv_j[:, 0] > -0.5) & (uv_j[:, 0] < CAM.width - 0.5) & (uv_j[:, 1] > -0.5) & (uv_j[:, 1] < CAM.height - 0.5)
    z_seen = syn.ray_distance(seq.scene, poses[j], CAM, uv_j[inside], kind="z")
    visible = np.abs(z_seen - z_j[inside]) < 0.05 * z_j[inside]  # not occluded in frame j
    assert visible.mean() > 0.5
    err = np.abs(z_seen[visible] - z_j[inside][visible])
    assert np.median(err) < 1e-5 and np.percentile(err, 95) < 1e-4


def test_cylinder_and_sphere_depth_agree_with_their_analytic_surfaces():
    backdrop = Rect(np.array([9.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]),
                    50.0, 50.0, TEX, "backdrop")
    cylinder = syn.Cylinder(np.array([3.0, -0.6, 0.0]), 0.4, 0.5, TEX)
    sphere = syn.Sphere(np.array([4.0, 0.8, 0.1]), 0.5, TEX)
    scene = Scene((backdrop, cylinder, sphere))
    T = look_pose((0.0, 0.0, 0.05), heading=0.0, pitch=-3.0)
    _, depth = render(scene, T, CAM, supersample=1)
    uv = pixel_grid(CAM)
    points = transform_points(T, (np.linalg.inv(CAM.K) @ np.c_[uv, np.ones(len(uv))].T).T * depth.reshape(-1, 1))
    hits = cast_rays(scene, T[:3, 3], (np.linalg.inv(CAM.K) @ np.c_[uv, np.ones(len(uv))].T).T @ T[:3, :3].T)
    on_cylinder, on_sphere = hits.index == 1, hits.index == 2
    assert on_cylinder.sum() > 50 and on_sphere.sum() > 50
    rel = points[on_cylinder] - cylinder.center
    side = np.abs(rel[:, 2]) < 0.5 - 1e-6
    np.testing.assert_allclose(np.hypot(rel[side, 0], rel[side, 1]), 0.4, atol=1e-6)  # on the mantle
    np.testing.assert_allclose(np.linalg.norm(points[on_sphere] - sphere.center, axis=1), 0.5, atol=1e-6)
    # Normals point out of the surface; both objects round-trip through a description.
    st, normals = sphere.surface(points[on_sphere])
    np.testing.assert_allclose(normals, (points[on_sphere] - sphere.center) / 0.5, atol=1e-6)
    again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
    np.testing.assert_array_equal(render(again, T, CAM, supersample=1)[1], depth)


def test_robot_sequences_drive_forward_and_turn_at_a_fixed_height():
    seq = syn.generate_robot_sequence(seed=3, frames=40, scene_index=1, camera_height=0.45, focal=200.0, pitch=0.0)
    assert seq.intrinsics.fx == 200.0 and np.allclose(seq.poses[:, 2, 3], 0.45)
    # Level camera: its x axis (right) and z axis (forward) stay horizontal.
    np.testing.assert_allclose(seq.poses[:, 2, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(seq.poses[:, 2, 2], 0.0, atol=1e-12)
    steps = [relative_pose(seq.poses[k], seq.poses[k + 1]) for k in range(39)]
    turns = np.array([rotation_angle(T[:3, :3]) for T in steps])
    moves = np.array([np.linalg.norm(T[:3, 3]) for T in steps])
    assert turns.max() < 9.5 and moves.max() < 0.16
    assert (moves > 0.04).sum() >= 5 and (turns > 2.5).sum() >= 3  # both driving and turning
    forward = np.array([T[2, 3] for T in steps])[moves > 0.04]
    assert np.all(forward > 0.8 * moves[moves > 0.04])  # it drives where it looks
    half_x, half_y, _ = seq.scene.room
    assert np.all(np.abs(seq.poses[:, 0, 3]) < half_x) and np.all(np.abs(seq.poses[:, 1, 3]) < half_y)
    assert not any(o.contains(seq.poses[:, :3, 3]).any() for o in seq.scene.objects)
    drawn = [syn.generate_robot_sequence(seed=3, frames=2, scene_index=k) for k in range(6)]
    assert len({round(d.intrinsics.fx) for d in drawn}) > 3 and len({round(d.poses[0, 2, 3], 2) for d in drawn}) > 3
    np.testing.assert_array_equal(syn.generate_robot_sequence(seed=3, frames=2, scene_index=0).frame(1).rgb,
                                  drawn[0].frame(1).rgb)
    kinds = {type(o).__name__ for k in range(8) for o in syn.generate_robot_sequence(7, 1, scene_index=k).scene.objects}
    assert kinds == {"Box", "Cylinder", "Sphere"}


def test_sequences_are_deterministic_and_cover_a_depth_range():
    a = syn.generate_sequence(seed=11, frames=3, intrinsics=CAM)
    b = syn.generate_sequence(seed=11, frames=3, intrinsics=CAM)
    c = syn.generate_sequence(seed=12, frames=3, intrinsics=CAM)
    fa, fb, fc = a.frame(2), b.frame(2), c.frame(2)
    np.testing.assert_array_equal(fa.rgb, fb.rgb)
    np.testing.assert_array_equal(fa.depth, fb.depth)
    assert not np.array_equal(fa.rgb, fc.rgb)
    depths = np.concatenate([syn.generate_sequence(seed=s, frames=1, intrinsics=CAM).frame(0).depth.ravel()
                             for s in range(6)])
    depths = depths[np.isfinite(depths)]
    assert depths.min() > 0.3 and depths.max() < 20.0
    assert np.percentile(depths, 5) < 2.0 and np.percentile(depths, 95) > 4.5
    # Texture gives structure: many distinct colours, strong local gradients.
    gray = cv2.cvtColor(fa.rgb, cv2.COLOR_RGB2GRAY).astype(float)
    assert np.abs(np.diff(gray, axis=1)).mean() > 2.0


def test_scene_description_round_trips():
    seq = syn.generate_sequence(seed=2, frames=2, intrinsics=CAM)
    again = syn.SyntheticSequence.from_dict(json.loads(json.dumps(seq.to_dict())))
    np.testing.assert_array_equal(again.frame(1).rgb, seq.frame(1).rgb)
    np.testing.assert_array_equal(again.frame(1).depth, seq.frame(1).depth)


def test_invalid_requests_raise_specific_errors():
    with pytest.raises(syn.SyntheticError, match="frames"):
        syn.generate_sequence(seed=0, frames=0)
    with pytest.raises(syn.SyntheticError, match="texture kind"):
        Texture("plaid", (0, 0, 0), (1, 1, 1), 1.0)
    with pytest.raises(syn.SyntheticError, match="distortion"):
        render(wall_scene(2.0), np.eye(4), Intrinsics(64, 48, 50.0, 50.0, 31.5, 23.5, "plumb_bob", (0.1, 0, 0, 0, 0)))
    with pytest.raises(syn.SyntheticError, match="rotation"):
        render(wall_scene(2.0), np.diag([1.0, 1.0, -1.0, 1.0]), CAM)


@pytest.mark.parametrize("storage, encoding", [("sqlite3", "32FC1"), ("mcap", "16UC1")])
def test_bag_round_trip(tmp_path, storage, encoding):
    from vlm3_ros.bags import iter_rgbd_frames

    seq = syn.generate_sequence(seed=4, frames=3, intrinsics=CAM, supersample=1)
    path = syn.write_bag(seq, tmp_path / "bag", storage=storage, depth_encoding=encoding)
    frames = list(iter_rgbd_frames(path))
    assert [f.stamp_ns for f in frames] == seq.stamps_ns.tolist()
    for got, want in zip(frames, seq):
        np.testing.assert_array_equal(got.rgb, want.rgb)
        assert got.intrinsics.K.tolist() == CAM.K.tolist()
        np.testing.assert_array_equal(np.isnan(got.depth_m), np.isnan(want.depth))
        tol = 0 if encoding == "32FC1" else 5.0e-4 + 1e-6  # millimetre rounding
        np.testing.assert_allclose(got.depth_m, want.depth, atol=tol, rtol=0)
        np.testing.assert_allclose(got.T_w_c, want.T_w_c, atol=1e-12)


def test_synth_command(tmp_path):
    from vlm3_train.cli import main

    out = tmp_path / "synth"
    rc = main(["synth", str(out), "--scenes", "2", "--frames", "2", "--size", "40x30", "--fx", "32",
               "--seed", "7", "--quiet", "--supersample", "1"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["scene_000", "scene_000.json", "scene_001", "scene_001.json"]
    description = syn.SyntheticSequence.from_dict(json.loads((out / "scene_001.json").read_text()))
    expected = syn.generate_sequence(seed=7, frames=2, intrinsics=Intrinsics.from_focal(40, 30, 32.0),
                                     scene_index=1, supersample=1)
    np.testing.assert_array_equal(description.poses, expected.poses)
    np.testing.assert_array_equal(description.frame(0).rgb, expected.frame(0).rgb)
    assert main(["synth", str(out), "--scenes", "1", "--frames", "2", "--size", "40x30", "--quiet"]) == 2  # exists
