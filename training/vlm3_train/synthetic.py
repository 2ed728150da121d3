"""Synthetic RGB-D scenes with exact depth and camera poses, rendered by ray casting.

A scene is a room (floor, four walls and optionally a ceiling, each a textured rectangle) holding
a few textured objects (boxes, upright cylinders, spheres) under a random light, seen by a small
pinhole camera moving along a smooth hand-held path (:func:`generate_sequence`) or carried by a
ground robot that drives forward and turns (:func:`generate_robot_sequence`). Every pixel is
rendered by casting its ray analytically against the surfaces (ray-rectangle and ray-box slab
intersections, vectorised with numpy), so the depth and the poses are exact, not estimated.

Conventions (those of :mod:`vlm3_ros.geometry`):

* world frame: z up, floor at ``z = 0``, the room centred on the origin;
* camera frame: the optical frame (x right, y down, z forward); poses are camera-to-world
  ``T_w_c``;
* depth images hold ``z`` along the optical axis of the nearest hit, NaN where a ray hits nothing
  (the sky above the walls of a room without a ceiling). Rays are cast with unit ``z`` in the
  camera frame, so the ray parameter of a hit *is* its z depth.

Textures are procedural (checkerboards, stripes, tiles and value noise with per-surface colours,
always with fine noise detail so that every surface has structure for correspondence), lit by a
directional light plus a headlight term. Colour is supersampled (``supersample`` x
``supersample`` rays per pixel, averaged); depth is the value at the pixel centre.

Everything is deterministic for a seed. Typical use::

    seq = generate_sequence(seed=0, frames=30)
    frame = seq.frame(0)              # SyntheticFrame(stamp_ns, rgb, depth, T_w_c)
    write_bag(seq, "out/scene_000")   # rosbag2: image, camera info, depth, ground-truth pose
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence as SequenceABC
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from vlm3_ros.camera import Intrinsics
from vlm3_ros.geometry import euler_to_matrix, make_pose
from vlm3_ros.paths import write_json_atomic

__all__ = [
    "Box",
    "Cylinder",
    "DEFAULT_FOCAL",
    "DEFAULT_SIZE",
    "FRAME_PERIOD_NS",
    "Hits",
    "Rect",
    "RgbdFrames",
    "Scene",
    "Sphere",
    "SyntheticError",
    "SyntheticFrame",
    "SyntheticSequence",
    "Texture",
    "camera_rays",
    "cast_rays",
    "default_intrinsics",
    "generate_robot_sequence",
    "generate_sequence",
    "look_pose",
    "make_robot_path",
    "make_scene",
    "make_trajectory",
    "ray_distance",
    "render",
    "synthesize",
    "write_bag",
]

#: Default image size (width, height) and focal length: a small robot camera (about 60 degrees
#: horizontal field of view).
DEFAULT_SIZE = (256, 192)
DEFAULT_FOCAL = 220.0
#: Time between frames of a sequence (10 Hz) and the stamp of the first frame of scene 0.
FRAME_PERIOD_NS = 100_000_000
START_STAMP_NS = 1_700_000_000_000_000_000
#: Rays closer than this (metres) do not count as hits.
_EPS = 1e-6
_NOISE_TABLE = 64
_GAMMA = 1.6  # display gamma of the rendered colours
TEXTURE_KINDS = ("checker", "stripes", "tiles", "noise", "dots", "waves")


class SyntheticError(ValueError):
    """Invalid synthetic scene, camera or generation request."""


# --------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _noise_table(seed: int) -> np.ndarray:
    table = np.random.default_rng(seed).random((_NOISE_TABLE, _NOISE_TABLE))
    table.setflags(write=False)
    return table


def _value_noise(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1] on a periodic lattice (bilinear with smoothstep weights)."""
    n = table.shape[0]
    xf, yf = np.floor(x), np.floor(y)
    fx, fy = x - xf, y - yf
    fx = fx * fx * (3.0 - 2.0 * fx)
    fy = fy * fy * (3.0 - 2.0 * fy)
    i0 = np.mod(xf, n).astype(np.int64)
    j0 = np.mod(yf, n).astype(np.int64)
    i1, j1 = (i0 + 1) % n, (j0 + 1) % n
    top = table[j0, i0] * (1 - fx) + table[j0, i1] * fx
    bottom = table[j1, i0] * (1 - fx) + table[j1, i1] * fx
    return top * (1 - fy) + bottom * fy


@dataclass(frozen=True)
class Texture:
    """A procedural surface texture, evaluated on surface coordinates in metres.

    Attributes:
        kind: ``checker``, ``stripes``, ``tiles``, ``noise``, ``dots`` or ``waves`` (the large-scale
            pattern).
        color_a, color_b: the pattern's two RGB colours in [0, 1].
        period: pattern period in metres.
        angle: pattern rotation on the surface (radians).
        detail: amplitude of the fine multi-octave noise modulating the brightness (0..1).
        seed: seed of the noise lattice.
    """

    kind: str
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    period: float
    angle: float = 0.0
    detail: float = 0.35
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TEXTURE_KINDS:
            raise SyntheticError(f"unknown texture kind {self.kind!r}; expected one of {TEXTURE_KINDS}")
        if not (math.isfinite(self.period) and self.period > 0):
            raise SyntheticError(f"texture period must be a positive number of metres, got {self.period!r}")
        for name in ("color_a", "color_b"):
            value = tuple(float(c) for c in getattr(self, name))
            if len(value) != 3 or not all(0.0 <= c <= 1.0 for c in value):
                raise SyntheticError(f"texture {name} must be three values in [0, 1], got {value}")
            object.__setattr__(self, name, value)

    def evaluate(self, st: np.ndarray) -> np.ndarray:
        """RGB in [0, 1] at surface coordinates ``st`` ``(N, 2)`` (metres) -> ``(N, 3)``."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (st[:, 0] * c - st[:, 1] * s) / self.period
        v = (st[:, 0] * s + st[:, 1] * c) / self.period
        table = _noise_table(self.seed)
        if self.kind == "checker":
            mix = np.mod(np.floor(u) + np.floor(v), 2.0)
        elif self.kind == "stripes":
            mix = np.mod(np.floor(2.0 * u), 2.0)
        elif self.kind == "tiles":
            fu, fv = u - np.floor(u), v - np.floor(v)
            mix = ((fu < 0.07) | (fv < 0.07)).astype(np.float64)
        elif self.kind == "dots":
            fu, fv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
            mix = (fu * fu + fv * fv < 0.09).astype(np.float64)
        elif self.kind == "waves":
            mix = 0.5 + 0.5 * np.sin(2.0 * math.pi * (u + 0.8 * _value_noise(table, 0.5 * u, 0.5 * v)))
        else:
            mix = np.clip(1.6 * _value_noise(table, 2.0 * u, 2.0 * v) - 0.3, 0.0, 1.0)
        a, b = np.asarray(self.color_a), np.asarray(self.color_b)
        rgb = a[None] * (1.0 - mix[:, None]) + b[None] * mix[:, None]
        # Fine detail: three octaves of noise at 1/4, 1/8 and 1/16 of the period.
        detail = np.zeros_like(u)
        for octave, weight in ((4.0, 0.5), (8.0, 0.3), (16.0, 0.2)):
            detail += weight * _value_noise(table, octave * u + 17.0 * octave, octave * v + 5.0 * octave)
        return np.clip(rgb * (1.0 + self.detail * (2.0 * detail[:, None] - 1.0)), 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "color_a": list(self.color_a), "color_b": list(self.color_b),
                "period": self.period, "angle": self.angle, "detail": self.detail, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Texture":
        return cls(kind=str(data["kind"]), color_a=tuple(data["color_a"]), color_b=tuple(data["color_b"]),
                   period=float(data["period"]), angle=float(data.get("angle", 0.0)),
                   detail=float(data.get("detail", 0.35)), seed=int(data.get("seed", 0)))


def _random_color(rng: np.random.Generator) -> np.ndarray:
    import colorsys

    h, s, v = rng.random(), rng.uniform(0.25, 0.85), rng.uniform(0.35, 0.95)
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def random_texture(rng: np.random.Generator, period_range: tuple[float, float] = (0.2, 0.8)) -> Texture:
    """A random texture with two clearly different colours."""
    a = _random_color(rng)
    for _ in range(20):
        b = _random_color(rng)
        if np.abs(a - b).sum() > 0.6:
            break
    return Texture(
        kind=str(rng.choice(TEXTURE_KINDS)),
        color_a=tuple(a), color_b=tuple(b),
        period=float(rng.uniform(*period_range)),
        angle=float(rng.uniform(-math.pi / 4, math.pi / 4)),
        detail=float(rng.uniform(0.25, 0.5)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------------------------
# Surfaces
# --------------------------------------------------------------------------------------------


def _vec3(name: str, value: Any) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise SyntheticError(f"{name} must be a finite 3-vector, got {value!r}")
    return v


@dataclass(frozen=True, eq=False)
class Rect:
    """A textured rectangle: ``center + s * axis_u + t * axis_v`` for ``|s| <= half_u``, ``|t| <= half_v``.

    ``axis_u`` and ``axis_v`` are orthonormal; the normal is ``axis_u x axis_v`` (both sides are
    visible). Texture coordinates are ``(s, t)`` in metres.
    """

    center: np.ndarray
    axis_u: np.ndarray
    axis_v: np.ndarray
    half_u: float
    half_v: float
    texture: Texture
    name: str = "rect"

    def __post_init__(self) -> None:
        for key in ("center", "axis_u", "axis_v"):
            object.__setattr__(self, key, _vec3(f"{self.name} {key}", getattr(self, key)))
        for key in ("axis_u", "axis_v"):
            if abs(np.linalg.norm(getattr(self, key)) - 1.0) > 1e-9:
                raise SyntheticError(f"{self.name} {key} must be a unit vector, got {getattr(self, key)}")
        if abs(float(self.axis_u @ self.axis_v)) > 1e-9:
            raise SyntheticError(f"{self.name}: axis_u and axis_v must be orthogonal")
        if not (self.half_u > 0 and self.half_v > 0):
            raise SyntheticError(f"{self.name}: half sizes must be positive, got {self.half_u}, {self.half_v}")

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.axis_u, self.axis_v)

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Ray parameter of the hit for each ray ``origin + t * dirs[i]`` (``inf`` for a miss)."""
        basis = np.stack([self.axis_u, self.axis_v, self.normal], axis=1)
        o = (origin - self.center) @ basis  # origin in the rectangle's frame
        d = dirs @ basis
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -o[2] / d[:, 2]
            ok = np.isfinite(t) & (t > _EPS)
            ok &= np.abs(o[0] + t * d[:, 0]) <= self.half_u
            ok &= np.abs(o[1] + t * d[:, 1]) <= self.half_v
        return np.where(ok, t, np.inf)

    def surface(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Texture coordinates ``(N, 2)`` and normals ``(N, 3)`` at points on the rectangle."""
        rel = points - self.center
        st = np.stack([rel @ self.axis_u, rel @ self.axis_v], axis=1)
        return st, np.broadcast_to(self.normal, points.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "rect", "name": self.name, "center": self.center.tolist(), "axis_u": self.axis_u.tolist(),
                "axis_v": self.axis_v.tolist(), "half_u": self.half_u, "half_v": self.half_v,
                "texture": self.texture.to_dict()}


@dataclass(frozen=True, eq=False)
class Box:
    """A textured box: centre, half extents along its own axes, turned by ``yaw`` (radians) about world z.

    Each face is textured with the box's texture in the face's own 2D coordinates (metres).
    """

    center: np.ndarray
    half: np.ndarray
    yaw: float
    texture: Texture
    name: str = "box"

    def __post_init__(self) -> None:
        object.__setattr__(self, "center", _vec3(f"{self.name} center", self.center))
        object.__setattr__(self, "half", _vec3(f"{self.name} half", self.half))
        if not np.all(self.half > 0):
            raise SyntheticError(f"{self.name}: half extents must be positive, got {self.half}")

    @property
    def rotation(self) -> np.ndarray:
        """Box axes in the world frame (columns)."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def corners(self) -> np.ndarray:
        """The eight corners in world coordinates ``(8, 3)``."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
        return (signs * self.half) @ self.rotation.T + self.center

    def contains(self, points: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Whether points ``(N, 3)`` are inside the box grown by ``margin``."""
        local = (np.atleast_2d(points) - self.center) @ self.rotation
        return np.all(np.abs(local) <= self.half + margin, axis=1)

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Entry ray parameter for each ray (``inf`` for a miss or a ray starting inside)."""
        R = self.rotation
        o = (origin - self.center) @ R
        d = np.ascontiguousarray((dirs @ R).T)
        t_in = np.full(d.shape[1], -np.inf)
        t_out = np.full(d.shape[1], np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            for k in range(3):
                # Slab method; a ray parallel to a slab gets -inf/inf (inside) or an empty interval.
                inv = 1.0 / d[k]
                ta = (-self.half[k] - o[k]) * inv
                tb = (self.half[k] - o[k]) * inv
                np.maximum(t_in, np.minimum(ta, tb), out=t_in)
                np.minimum(t_out, np.maximum(ta, tb), out=t_out)
            ok = (t_in <= t_out) & (t_in > _EPS)
        return np.where(ok, t_in, np.inf)

    def surface(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        local = (points - self.center) @ self.rotation
        axis = np.argmax(np.abs(local) / self.half, axis=1)
        sign = np.sign(local[np.arange(len(local)), axis])
        normal_local = np.zeros_like(local)
        normal_local[np.arange(len(local)), axis] = sign
        # Face coordinates: the two other local axes, shifted per face so faces differ.
        other = np.array([[1, 2], [0, 2], [0, 1]])[axis]
        st = np.take_along_axis(local, other, axis=1) + (axis * 2 + (sign > 0))[:, None] * 3.1
        return st, normal_local @ self.rotation.T

    def to_dict(self) -> dict[str, Any]:
        return {"type": "box", "name": self.name, "center": self.center.tolist(), "half": self.half.tolist(),
                "yaw": self.yaw, "texture": self.texture.to_dict()}


@dataclass(frozen=True, eq=False)
class Cylinder:
    """A textured upright cylinder (axis along world z): centre, radius and half height, with caps.

    The side is textured in (arc length, height) coordinates, the caps in world (x, y).
    """

    center: np.ndarray
    radius: float
    half_height: float
    texture: Texture
    name: str = "cylinder"

    def __post_init__(self) -> None:
        object.__setattr__(self, "center", _vec3(f"{self.name} center", self.center))
        if not (self.radius > 0 and self.half_height > 0):
            raise SyntheticError(f"{self.name}: radius and half height must be positive")

    def contains(self, points: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Whether points ``(N, 3)`` are inside the cylinder grown by ``margin``."""
        rel = np.atleast_2d(points) - self.center
        return (np.hypot(rel[:, 0], rel[:, 1]) <= self.radius + margin) & (np.abs(rel[:, 2]) <= self.half_height + margin)

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        o = origin - self.center
        d = dirs
        t = np.full(len(d), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            a = d[:, 0] ** 2 + d[:, 1] ** 2
            b = 2.0 * (o[0] * d[:, 0] + o[1] * d[:, 1])
            c = o[0] ** 2 + o[1] ** 2 - self.radius ** 2
            disc = b * b - 4.0 * a * c
            root = np.sqrt(np.where(disc >= 0, disc, np.nan))
            for side in ((-b - root) / (2 * a), (-b + root) / (2 * a)):
                ok = np.isfinite(side) & (side > _EPS) & (np.abs(o[2] + side * d[:, 2]) <= self.half_height)
                t = np.where(ok & (side < t), side, t)
            for cap in (-self.half_height, self.half_height):
                tc = (cap - o[2]) / d[:, 2]
                px, py = o[0] + tc * d[:, 0], o[1] + tc * d[:, 1]
                ok = np.isfinite(tc) & (tc > _EPS) & (px * px + py * py <= self.radius ** 2)
                t = np.where(ok & (tc < t), tc, t)
        return t

    def surface(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rel = points - self.center
        on_cap = np.abs(np.abs(rel[:, 2]) - self.half_height) < 1e-7 * max(1.0, self.half_height)
        on_cap &= np.hypot(rel[:, 0], rel[:, 1]) < self.radius * (1 - 1e-9)
        angle = np.arctan2(rel[:, 1], rel[:, 0])
        st = np.where(on_cap[:, None], rel[:, :2] + 7.3, np.stack([angle * self.radius, rel[:, 2]], axis=1))
        radial = np.stack([np.cos(angle), np.sin(angle), np.zeros_like(angle)], axis=1)
        cap_normal = np.stack([np.zeros_like(angle), np.zeros_like(angle), np.sign(rel[:, 2])], axis=1)
        return st, np.where(on_cap[:, None], cap_normal, radial)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "cylinder", "name": self.name, "center": self.center.tolist(), "radius": self.radius,
                "half_height": self.half_height, "texture": self.texture.to_dict()}


@dataclass(frozen=True, eq=False)
class Sphere:
    """A textured sphere, textured in (longitude, latitude) arc lengths."""

    center: np.ndarray
    radius: float
    texture: Texture
    name: str = "sphere"

    def __post_init__(self) -> None:
        object.__setattr__(self, "center", _vec3(f"{self.name} center", self.center))
        if not self.radius > 0:
            raise SyntheticError(f"{self.name}: radius must be positive, got {self.radius}")

    def contains(self, points: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Whether points ``(N, 3)`` are inside the sphere grown by ``margin``."""
        return np.linalg.norm(np.atleast_2d(points) - self.center, axis=1) <= self.radius + margin

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        o = origin - self.center
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.einsum("ij,ij->i", dirs, dirs)
            b = 2.0 * dirs @ o
            c = float(o @ o) - self.radius ** 2
            disc = b * b - 4.0 * a * c
            near = (-b - np.sqrt(np.where(disc >= 0, disc, np.nan))) / (2 * a)
            ok = np.isfinite(near) & (near > _EPS)
        return np.where(ok, near, np.inf)

    def surface(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rel = points - self.center
        normal = rel / np.linalg.norm(rel, axis=1, keepdims=True)
        lon = np.arctan2(normal[:, 1], normal[:, 0])
        lat = np.arcsin(np.clip(normal[:, 2], -1.0, 1.0))
        return np.stack([lon, lat], axis=1) * self.radius, normal

    def to_dict(self) -> dict[str, Any]:
        return {"type": "sphere", "name": self.name, "center": self.center.tolist(), "radius": self.radius,
                "texture": self.texture.to_dict()}


Surface = Any  # Rect | Box | Cylinder | Sphere (all have intersect, surface, to_dict)
#: Objects a scene holds (those with ``contains``); ``make_scene`` draws them with these weights.
OBJECT_KINDS = {"box": 0.55, "cylinder": 0.3, "sphere": 0.15}


def _surface_from_dict(data: Mapping[str, Any]) -> Surface:
    texture = Texture.from_dict(data["texture"])
    if data["type"] == "rect":
        return Rect(np.array(data["center"]), np.array(data["axis_u"]), np.array(data["axis_v"]),
                    float(data["half_u"]), float(data["half_v"]), texture, str(data.get("name", "rect")))
    if data["type"] == "box":
        return Box(np.array(data["center"]), np.array(data["half"]), float(data["yaw"]), texture,
                   str(data.get("name", "box")))
    if data["type"] == "cylinder":
        return Cylinder(np.array(data["center"]), float(data["radius"]), float(data["half_height"]), texture,
                        str(data.get("name", "cylinder")))
    if data["type"] == "sphere":
        return Sphere(np.array(data["center"]), float(data["radius"]), texture, str(data.get("name", "sphere")))
    raise SyntheticError(f"unknown surface type {data['type']!r}")


@dataclass(frozen=True, eq=False)
class Scene:
    """Surfaces and lighting of a synthetic scene.

    Attributes:
        surfaces: rectangles and boxes.
        light: unit direction *towards* the light (world frame).
        ambient: brightness of unlit surfaces (0..1).
        room: ``(half_x, half_y, height)`` of the room (for trajectory planning), or ``None``.
        light_color: RGB tint of the light (the directional and headlight terms).
        exposure: overall brightness gain of the rendered colours.
    """

    surfaces: tuple
    light: np.ndarray = field(default_factory=lambda: np.array([0.3, 0.2, 0.93]))
    ambient: float = 0.35
    room: tuple[float, float, float] | None = None
    light_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    exposure: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "surfaces", tuple(self.surfaces))
        if not self.surfaces:
            raise SyntheticError("a scene needs at least one surface")
        light = _vec3("light", self.light)
        if np.linalg.norm(light) == 0:
            raise SyntheticError("light direction must be non-zero")
        object.__setattr__(self, "light", light / np.linalg.norm(light))

    @property
    def boxes(self) -> list[Box]:
        return [s for s in self.surfaces if isinstance(s, Box)]

    @property
    def objects(self) -> list[Any]:
        """The scene's objects (boxes, cylinders, spheres): everything but the room's rectangles."""
        return [s for s in self.surfaces if not isinstance(s, Rect)]

    def to_dict(self) -> dict[str, Any]:
        return {"surfaces": [s.to_dict() for s in self.surfaces], "light": self.light.tolist(),
                "ambient": self.ambient, "room": None if self.room is None else list(self.room),
                "light_color": list(self.light_color), "exposure": self.exposure}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Scene":
        room = data.get("room")
        return cls(tuple(_surface_from_dict(s) for s in data["surfaces"]), np.array(data["light"]),
                   float(data["ambient"]), None if room is None else tuple(float(v) for v in room),
                   tuple(float(v) for v in data.get("light_color", (1.0, 1.0, 1.0))),
                   float(data.get("exposure", 1.0)))


def room_surfaces(half_x: float, half_y: float, height: float, textures: Sequence[Texture],
                  ceiling: bool = False) -> list[Rect]:
    """Floor, four walls (and a ceiling) of a room centred on the origin with the floor at z = 0.

    ``textures`` gives one texture per surface in that order (5, or 6 with a ceiling).
    """
    ex, ey, ez = np.eye(3)
    h2 = height / 2
    specs = [
        ("floor", (0, 0, 0), ex, ey, half_x, half_y),
        ("wall_north", (0, half_y, h2), ex, ez, half_x, h2),
        ("wall_south", (0, -half_y, h2), ex, ez, half_x, h2),
        ("wall_east", (half_x, 0, h2), ey, ez, half_y, h2),
        ("wall_west", (-half_x, 0, h2), ey, ez, half_y, h2),
    ]
    if ceiling:
        specs.append(("ceiling", (0, 0, height), ex, ey, half_x, half_y))
    if len(textures) < len(specs):
        raise SyntheticError(f"room needs {len(specs)} textures, got {len(textures)}")
    return [Rect(np.array(c, dtype=float), u, v, hu, hv, tex, name)
            for (name, c, u, v, hu, hv), tex in zip(specs, textures)]


# --------------------------------------------------------------------------------------------
# Ray casting and rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hits:
    """Nearest hits of a bundle of rays ``origin + t * dirs``.

    ``t``: ray parameter (``inf`` for no hit); ``index``: surface index (-1 for no hit);
    ``points``: hit points (NaN for no hit).
    """

    t: np.ndarray
    index: np.ndarray
    points: np.ndarray

    @property
    def hit(self) -> np.ndarray:
        return self.index >= 0


def cast_rays(scene: Scene, origin: Any, dirs: Any) -> Hits:
    """Nearest surface hit of each ray ``origin + t * dirs[i]`` (t > 0), vectorised over rays."""
    origin = _vec3("ray origin", origin)
    dirs = np.asarray(dirs, dtype=np.float64)
    if dirs.ndim != 2 or dirs.shape[1] != 3:
        raise SyntheticError(f"ray directions must have shape (N, 3), got {dirs.shape}")
    t = np.full(len(dirs), np.inf)
    index = np.full(len(dirs), -1, dtype=np.int64)
    for i, surface in enumerate(scene.surfaces):
        ti = surface.intersect(origin, dirs)
        closer = ti < t
        t[closer] = ti[closer]
        index[closer] = i
    points = np.where(np.isfinite(t)[:, None], origin[None] + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs, np.nan)
    return Hits(t, index, points)


def _check_pose(T_w_c: Any) -> np.ndarray:
    T = np.asarray(T_w_c, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise SyntheticError(f"camera pose must be a finite 4x4 matrix, got shape {T.shape}")
    R = T[:3, :3]
    if not np.allclose(R.T @ R, np.eye(3), atol=1e-6) or np.linalg.det(R) < 0:
        raise SyntheticError("camera pose rotation is not a rotation matrix")
    return T


def _check_intrinsics(intrinsics: Any) -> Intrinsics:
    if not isinstance(intrinsics, Intrinsics):
        raise SyntheticError(f"intrinsics must be a vlm3_ros.camera.Intrinsics, got {type(intrinsics).__name__}")
    if intrinsics.has_distortion:
        raise SyntheticError("synthetic cameras are ideal pinholes; got intrinsics with distortion")
    return intrinsics


def camera_rays(intrinsics: Intrinsics, uv: Any) -> np.ndarray:
    """Camera-frame ray directions with unit z, ``K^-1 [u, v, 1]``, for pixels ``uv`` ``(N, 2)``."""
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    return np.stack([(uv[:, 0] - intrinsics.cx) / intrinsics.fx, (uv[:, 1] - intrinsics.cy) / intrinsics.fy,
                     np.ones(len(uv))], axis=1)


def _pixel_grid(width: int, height: int, offsets: Sequence[float] = (0.0,)) -> np.ndarray:
    """Pixel coordinates ``(len(offsets)**2, H*W, 2)`` of sub-pixel samples (offsets from the centre)."""
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
    return np.stack([grid + (dx, dy) for dy in offsets for dx in offsets])


def _shade(scene: Scene, hits: Hits, dirs: np.ndarray) -> np.ndarray:
    """Linear RGB in [0, 1] for each ray (black for no hit)."""
    rgb = np.zeros((len(dirs), 3))
    unit_dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    for i, surface in enumerate(scene.surfaces):
        sel = np.nonzero(hits.index == i)[0]
        if sel.size == 0:
            continue
        st, normals = surface.surface(hits.points[sel])
        facing = np.abs(np.einsum("ij,ij->i", normals, unit_dirs[sel]))
        # Normals facing the camera: light from the camera's side of the surface only.
        n = normals * -np.sign(np.einsum("ij,ij->i", normals, unit_dirs[sel]))[:, None]
        diffuse = np.clip(n @ scene.light, 0.0, 1.0)
        lit = (1.0 - scene.ambient) * (0.6 * diffuse + 0.4 * facing)
        light = scene.ambient + lit[:, None] * np.asarray(scene.light_color)[None]
        rgb[sel] = surface.texture.evaluate(st) * light * scene.exposure
    return rgb


def render(scene: Scene, T_w_c: Any, intrinsics: Intrinsics, *, supersample: int = 2,
           sky: tuple[int, int, int] = (150, 190, 235)) -> tuple[np.ndarray, np.ndarray]:
    """Render one view: ``(rgb uint8 (H, W, 3), depth_z float32 (H, W) metres, NaN where no hit)``.

    ``supersample``: colour is the mean of ``supersample**2`` rays per pixel; depth is exact at
    the pixel centre. Pixels whose centre ray hits nothing show the ``sky`` colour.
    """
    T = _check_pose(T_w_c)
    cam = _check_intrinsics(intrinsics)
    if not isinstance(supersample, (int, np.integer)) or supersample < 1:
        raise SyntheticError(f"supersample must be a positive integer, got {supersample!r}")
    R, origin = T[:3, :3], T[:3, 3]
    W, H = cam.width, cam.height
    sky_linear = np.power(np.asarray(sky, dtype=np.float64) / 255.0, _GAMMA)
    centre = _pixel_grid(W, H)[0]
    dirs = camera_rays(cam, centre) @ R.T
    hits = cast_rays(scene, origin, dirs)
    depth = np.where(hits.hit, hits.t, np.nan).astype(np.float32).reshape(H, W)
    if supersample == 1:
        colour, sky_mask = _shade(scene, hits, dirs), ~hits.hit
    else:
        offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
        samples = _pixel_grid(W, H, offsets).reshape(-1, 2)
        sub_dirs = camera_rays(cam, samples) @ R.T
        sub_hits = cast_rays(scene, origin, sub_dirs)
        shaded = _shade(scene, sub_hits, sub_dirs)
        shaded[~sub_hits.hit] = sky_linear
        colour = shaded.reshape(supersample * supersample, H * W, 3).mean(axis=0)
        sky_mask = np.zeros(H * W, dtype=bool)
    colour[sky_mask] = sky_linear
    # Display gamma so that the textures use the 8-bit range well.
    rgb = np.clip(np.rint(255.0 * np.power(np.clip(colour, 0.0, 1.0), 1 / _GAMMA)), 0, 255).astype(np.uint8)
    return rgb.reshape(H, W, 3), depth


def ray_distance(scene: Scene, T_w_c: Any, intrinsics: Intrinsics, uv: Any, kind: str = "ray") -> np.ndarray:
    """Analytic depth at arbitrary (sub-)pixels ``uv`` ``(N, 2)`` of a view: the Euclidean distance
    from the camera centre to the nearest hit (``kind="ray"``) or its z (``kind="z"``); NaN where
    the ray hits nothing."""
    if kind not in ("ray", "z"):
        raise SyntheticError(f"kind must be 'ray' or 'z', got {kind!r}")
    T = _check_pose(T_w_c)
    rays = camera_rays(_check_intrinsics(intrinsics), uv)
    hits = cast_rays(scene, T[:3, 3], rays @ T[:3, :3].T)
    z = np.where(hits.hit, hits.t, np.nan)
    return z * np.linalg.norm(rays, axis=1) if kind == "ray" else z


# --------------------------------------------------------------------------------------------
# Cameras and trajectories
# --------------------------------------------------------------------------------------------


def default_intrinsics(width: int = DEFAULT_SIZE[0], height: int = DEFAULT_SIZE[1],
                       focal: float = DEFAULT_FOCAL) -> Intrinsics:
    """An ideal pinhole camera with the principal point at the image centre."""
    return Intrinsics.from_focal(int(width), int(height), float(focal))


def look_pose(position: Any, heading: float, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Camera-to-world pose of a camera at ``position`` (world, z up) looking along ``heading``
    (radians from world +x towards +y), then pitched (positive = look up) and rolled about its own
    axes (VLM3 Euler convention, degrees for ``pitch`` and ``roll``)."""
    c, s = math.cos(heading), math.sin(heading)
    forward = np.array([c, s, 0.0])
    right = np.array([s, -c, 0.0])
    down = np.array([0.0, 0.0, -1.0])
    R_level = np.stack([right, down, forward], axis=1)
    R = R_level @ euler_to_matrix(0.0, pitch, roll)
    return make_pose(R, _vec3("position", position))


def make_trajectory(rng: np.random.Generator, frames: int, room: tuple[float, float, float], *,
                    step: tuple[float, float] = (0.06, 0.14), margin: float = 1.0) -> np.ndarray:
    """A smooth camera path in a room: ``(frames, 4, 4)`` camera-to-world poses.

    The camera moves along an ellipse arc (``step`` metres per frame) at a gently varying height
    (0.35-1.3 m), looking along the path or across the room with a slowly oscillating yaw offset,
    a small pitch and roll; everything varies smoothly with the frame index.
    """
    half_x, half_y, height = room
    rx = rng.uniform(0.35, 1.0) * max(half_x - margin, 0.3)
    ry = rng.uniform(0.35, 1.0) * max(half_y - margin, 0.3)
    cx = rng.uniform(-1, 1) * max(half_x - margin - rx, 0.0)
    cy = rng.uniform(-1, 1) * max(half_y - margin - ry, 0.0)
    ds = rng.uniform(*step)
    direction = rng.choice([-1.0, 1.0])
    theta = rng.uniform(0, 2 * math.pi) + direction * ds / (0.5 * (rx + ry)) * np.arange(frames)
    x, y = cx + rx * np.cos(theta), cy + ry * np.sin(theta)
    tangent = np.arctan2(direction * ry * np.cos(theta), -direction * rx * np.sin(theta))
    i = np.arange(frames, dtype=np.float64)
    # Look mostly across the room (towards the inside of the arc) to see far walls and boxes.
    yaw_offset = direction * math.radians(rng.uniform(-15, 60)) + math.radians(rng.uniform(5, 20)) * np.sin(
        rng.uniform(0.05, 0.2) * i + rng.uniform(0, 2 * math.pi))
    z = rng.uniform(0.35, min(1.3, height - 0.5)) + 0.05 * np.sin(rng.uniform(0.05, 0.2) * i + rng.uniform(0, 6.3))
    pitch = rng.uniform(-15, 3) + 4.0 * np.sin(rng.uniform(0.05, 0.2) * i + rng.uniform(0, 6.3))
    roll = rng.uniform(-2, 2) + 1.5 * np.sin(rng.uniform(0.05, 0.2) * i + rng.uniform(0, 6.3))
    return np.stack([look_pose((x[k], y[k], z[k]), tangent[k] + yaw_offset[k], pitch[k], roll[k])
                     for k in range(frames)])


def make_robot_path(rng: np.random.Generator, frames: int, room: tuple[float, float, float], *, height: float,
                    pitch: float = 0.0, margin: float = 1.0) -> np.ndarray:
    """The camera of a ground robot driving in a room: ``(frames, 4, 4)`` camera-to-world poses.

    The camera sits at ``height`` metres, level (or pitched by ``pitch`` degrees, positive = up),
    looking where the robot heads. The robot drives in segments of 4-12 frames, each forward
    (5-15 cm per frame, a slight curve), along an arc, or turning on the spot (3-9 degrees per
    frame, barely moving); near a wall it turns towards the room's centre instead of going on.
    """
    half_x, half_y, _ = room
    lim = np.array([max(half_x - margin, 0.2), max(half_y - margin, 0.2)])
    xy = rng.uniform(-1, 1, 2) * lim * 0.7
    heading = float(rng.uniform(-math.pi, math.pi))
    poses = []
    remaining, speed, turn = 0, 0.0, 0.0
    for _ in range(int(frames)):
        poses.append(look_pose((xy[0], xy[1], height), heading, pitch, 0.0))
        if remaining == 0:
            remaining = int(rng.integers(4, 13))
            kind = rng.choice(["forward", "arc", "turn"], p=[0.45, 0.3, 0.25])
            sign = float(rng.choice([-1.0, 1.0]))
            if kind == "forward":
                speed, turn = rng.uniform(0.05, 0.15), sign * math.radians(rng.uniform(0.0, 1.5))
            elif kind == "arc":
                speed, turn = rng.uniform(0.05, 0.12), sign * math.radians(rng.uniform(2.0, 5.0))
            else:
                speed, turn = rng.uniform(0.0, 0.02), sign * math.radians(rng.uniform(3.0, 9.0))
        remaining -= 1
        step = speed * np.array([math.cos(heading + turn / 2), math.sin(heading + turn / 2)])
        if np.any(np.abs(xy + step) > lim):
            # Near a wall: turn on the spot towards the centre of the room.
            to_centre = math.atan2(-xy[1], -xy[0])
            delta = (to_centre - heading + math.pi) % (2 * math.pi) - math.pi
            heading += float(np.clip(delta, -math.radians(9.0), math.radians(9.0)))
            remaining = 0
            continue
        xy = xy + step
        heading += turn
    return np.stack(poses)


def generate_robot_sequence(seed: int = 0, frames: int = 30, *, scene_index: int = 0,
                            camera_height: float | None = None, focal: float | None = None,
                            pitch: float | None = None, size: tuple[int, int] = DEFAULT_SIZE,
                            supersample: int = 1) -> SyntheticSequence:
    """A random scene seen by a ground robot's camera (:func:`make_robot_path`), deterministic for
    ``(seed, scene_index)``.

    ``None`` draws a value per sequence: ``camera_height`` 0.3-1.0 m, ``focal`` 170-300 px (on the
    ``size`` image: about 46-74 degrees of horizontal field of view), ``pitch`` -6 to +2 degrees.
    """
    if not isinstance(frames, (int, np.integer)) or frames < 1:
        raise SyntheticError(f"frames must be a positive integer, got {frames!r}")
    rng = np.random.default_rng([int(seed), int(scene_index), 1])
    room = (float(rng.uniform(2.5, 6.0)), float(rng.uniform(2.5, 6.0)), float(rng.uniform(2.4, 3.5)))
    height = float(rng.uniform(0.3, 1.0)) if camera_height is None else float(camera_height)
    f = float(rng.uniform(170.0, 300.0)) if focal is None else float(focal)
    tilt = float(rng.uniform(-6.0, 2.0)) if pitch is None else float(pitch)
    if not 0.05 <= height < room[2] - 0.2:
        raise SyntheticError(f"camera height {height} m does not fit a room {room[2]:.2f} m high")
    poses = make_robot_path(rng, int(frames), room, height=height, pitch=tilt)
    scene = make_scene(rng, keep_clear=poses[:, :3, 3], room=room)
    start = START_STAMP_NS + int(scene_index) * 10**12
    stamps = start + FRAME_PERIOD_NS * np.arange(int(frames), dtype=np.int64)
    return SyntheticSequence(scene, default_intrinsics(size[0], size[1], f), poses, stamps, int(supersample), int(seed))


def _random_object(rng: np.random.Generator, kind: str, room: tuple[float, float, float], name: str) -> Any:
    """One object of ``kind`` standing on the floor (sometimes raised or stacked), inside the room."""
    half_x, half_y, height = room
    texture = random_texture(rng, (0.12, 0.6))
    if kind == "box":
        half = np.array([rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.1, 1.0)])
        reach, up = float(np.hypot(half[0], half[1])), float(half[2])
    elif kind == "cylinder":
        radius, up = float(rng.uniform(0.08, 0.6)), float(rng.uniform(0.1, 1.1))
        reach = radius
    else:
        radius = float(rng.uniform(0.1, 0.6))
        reach = up = radius
    if half_x - reach < 0.2 or half_y - reach < 0.2:
        return None
    center = np.array([rng.uniform(-half_x + reach, half_x - reach), rng.uniform(-half_y + reach, half_y - reach), up])
    if rng.random() < 0.25:  # raised or floating objects for vertical structure
        center[2] += rng.uniform(0.0, max(height - 2 * up - 0.2, 0.0))
    if kind == "box":
        return Box(center, half, float(rng.uniform(0, math.pi)), texture, name)
    if kind == "cylinder":
        return Cylinder(center, radius, up, texture, name)
    return Sphere(center, radius, texture, name)


def make_scene(rng: np.random.Generator, *, keep_clear: np.ndarray | None = None, num_boxes: int | None = None,
               room: tuple[float, float, float] | None = None, ceiling: bool | None = None,
               clearance: float = 0.8, kinds: Mapping[str, float] | None = None) -> Scene:
    """A random room with textured walls and objects (boxes, cylinders, spheres) under random light.

    ``keep_clear``: ``(N, 3)`` points (camera positions) no object may come within ``clearance``
    metres of (horizontally). Room half sizes are 2.5-6 m (depths up to about 10 m), height
    2.4-3.5 m; without a ceiling the sky above the walls has no depth. ``num_boxes``: how many
    objects (default 4-10); ``kinds``: object kind -> weight (default :data:`OBJECT_KINDS`). The
    light comes from a random direction (high or low), with a random tint, ambient level and
    exposure.
    """
    if room is None:
        room = (float(rng.uniform(2.5, 6.0)), float(rng.uniform(2.5, 6.0)), float(rng.uniform(2.4, 3.5)))
    if ceiling is None:
        ceiling = bool(rng.random() < 0.5)
    half_x, half_y, height = room
    textures = [random_texture(rng, (0.3, 1.0)) for _ in range(6)]
    surfaces: list = room_surfaces(half_x, half_y, height, textures, ceiling=ceiling)
    count = int(rng.integers(4, 11)) if num_boxes is None else int(num_boxes)
    weights = dict(kinds or OBJECT_KINDS)
    names = sorted(weights)
    p = np.array([weights[k] for k in names], dtype=float)
    clear = np.zeros((0, 3)) if keep_clear is None else np.asarray(keep_clear, dtype=float).reshape(-1, 3)
    placed = 0
    for _ in range(50 * max(count, 1)):
        if placed >= count:
            break
        kind = str(rng.choice(names, p=p / p.sum()))
        obj = _random_object(rng, kind, room, f"{kind}_{placed}")
        if obj is None:
            continue
        if len(clear) and np.any(obj.contains(clear * (1, 1, 0) + (0, 0, obj.center[2]), margin=clearance)):
            continue
        surfaces.append(obj)
        placed += 1
    light = np.array([rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0), rng.uniform(0.25, 1.0)])
    tint = np.clip(1.0 + rng.uniform(-0.15, 0.15) * np.array([1.0, 0.0, -1.0]) + rng.uniform(-0.05, 0.05, 3), 0.7, 1.2)
    return Scene(tuple(surfaces), light, float(rng.uniform(0.2, 0.55)), room,
                 tuple(float(v) for v in tint), float(rng.uniform(0.75, 1.25)))


# --------------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticFrame:
    """One rendered frame: stamp, RGB uint8, depth z (float32 metres, NaN invalid), pose ``T_w_c``."""

    stamp_ns: int
    rgb: np.ndarray
    depth: np.ndarray
    T_w_c: np.ndarray


@dataclass(frozen=True, eq=False)
class SyntheticSequence:
    """A scene, a camera and its poses; frames are rendered on demand."""

    scene: Scene
    intrinsics: Intrinsics
    poses: np.ndarray
    stamps_ns: np.ndarray
    supersample: int = 2
    seed: int | None = None

    def __len__(self) -> int:
        return len(self.poses)

    def frame(self, i: int) -> SyntheticFrame:
        """Render frame ``i``."""
        if not -len(self) <= i < len(self):
            raise SyntheticError(f"frame {i} out of range for a sequence of {len(self)} frames")
        rgb, depth = render(self.scene, self.poses[i], self.intrinsics, supersample=self.supersample)
        return SyntheticFrame(int(self.stamps_ns[i]), rgb, depth, self.poses[i].copy())

    def __iter__(self) -> Iterator[SyntheticFrame]:
        for i in range(len(self)):
            yield self.frame(i)

    def rgbd_frames(self) -> "RgbdFrames":
        """The frames as :class:`vlm3_ros.bags.RgbdFrame` records (what a bag yields), rendered on
        access: the in-memory input of :func:`vlm3_train.convert.convert_frames`."""
        return RgbdFrames(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (scene, camera, poses, stamps)."""
        return {"seed": self.seed, "intrinsics": self.intrinsics.to_dict(), "scene": self.scene.to_dict(),
                "poses": self.poses.tolist(), "stamps_ns": [int(s) for s in self.stamps_ns],
                "supersample": self.supersample}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SyntheticSequence":
        return cls(Scene.from_dict(data["scene"]), Intrinsics.from_dict(data["intrinsics"]),
                   np.asarray(data["poses"], dtype=np.float64), np.asarray(data["stamps_ns"], dtype=np.int64),
                   int(data.get("supersample", 2)), data.get("seed"))


class RgbdFrames(SequenceABC):
    """A lazy sequence of :class:`vlm3_ros.bags.RgbdFrame` for a :class:`SyntheticSequence`."""

    def __init__(self, sequence: SyntheticSequence) -> None:
        self.sequence = sequence

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, i: Any) -> Any:
        from vlm3_ros.bags import RgbdFrame

        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame {i} out of range for a sequence of {len(self)} frames")
        f = self.sequence.frame(i)
        return RgbdFrame(f.stamp_ns, f.rgb, self.sequence.intrinsics, f.depth, f.T_w_c)


def generate_sequence(seed: int = 0, frames: int = 30, intrinsics: Intrinsics | None = None, *,
                      scene_index: int = 0, supersample: int = 2,
                      step: tuple[float, float] = (0.06, 0.14)) -> SyntheticSequence:
    """A random scene and a smooth camera path through it, deterministic for ``(seed, scene_index)``.

    Args:
        seed: base seed.
        frames: number of frames.
        intrinsics: the camera (default :func:`default_intrinsics`).
        scene_index: which scene of the seed (each index gives an independent scene).
        supersample: colour supersampling per axis.
        step: range of the camera's travel per frame (metres).
    """
    if not isinstance(frames, (int, np.integer)) or frames < 1:
        raise SyntheticError(f"frames must be a positive integer, got {frames!r}")
    cam = _check_intrinsics(intrinsics if intrinsics is not None else default_intrinsics())
    rng = np.random.default_rng([int(seed), int(scene_index)])
    room = (float(rng.uniform(2.5, 6.0)), float(rng.uniform(2.5, 6.0)), float(rng.uniform(2.4, 3.5)))
    poses = make_trajectory(rng, int(frames), room, step=step)
    scene = make_scene(rng, keep_clear=poses[:, :3, 3], room=room)
    start = START_STAMP_NS + int(scene_index) * 10**12
    stamps = start + FRAME_PERIOD_NS * np.arange(int(frames), dtype=np.int64)
    return SyntheticSequence(scene, cam, poses, stamps, int(supersample), int(seed))


# --------------------------------------------------------------------------------------------
# Bags
# --------------------------------------------------------------------------------------------

DEPTH_ENCODINGS = ("32FC1", "16UC1")


def write_bag(sequence: SyntheticSequence, path: str | os.PathLike[str], *, storage: str = "sqlite3",
              depth_encoding: str = "32FC1", topics: Mapping[str, str] | None = None,
              camera_frame: str | None = None, world_frame: str | None = None,
              overwrite: bool = False, progress: bool = False, detections: bool = False) -> Path:
    """Write a sequence as a rosbag2 bag: rgb8 Image, CameraInfo, depth Image and ground-truth
    PoseStamped (plus the world -> camera transform on ``/tf``), all stamped with the frame's stamp.

    ``depth_encoding``: ``32FC1`` (metres, NaN where invalid; exact) or ``16UC1`` (millimetres,
    0 where invalid). ``topics``/``camera_frame``/``world_frame`` default to those of
    :mod:`vlm3_ros.bags`. ``detections``: also write each frame's objects as a 2D detector would
    see them (vision_msgs/Detection2DArray on ``/detections``, :mod:`vlm3_train.synthetic_objects`),
    for the object task. Written atomically by :class:`vlm3_ros.bags.RgbdBagWriter`.
    """
    from vlm3_ros import bags

    if depth_encoding not in DEPTH_ENCODINGS:
        raise SyntheticError(f"depth_encoding must be one of {DEPTH_ENCODINGS}, got {depth_encoding!r}")
    frames: Any = iter(sequence)
    if progress:
        from tqdm import tqdm

        frames = tqdm(frames, total=len(sequence), desc=Path(path).name, unit="frame", leave=False)
    kwargs: dict[str, Any] = {"storage": storage, "overwrite": overwrite, "depth_encoding": depth_encoding}
    if topics is not None:
        kwargs["topics"] = dict(topics)
    if camera_frame is not None:
        kwargs["camera_frame"] = camera_frame
    if world_frame is not None:
        kwargs["world_frame"] = world_frame
    with bags.RgbdBagWriter(path, **kwargs) as writer:
        for i, frame in enumerate(frames):
            writer.write_frame(frame.stamp_ns, rgb=frame.rgb, intrinsics=sequence.intrinsics,
                               depth_m=frame.depth, T_w_c=frame.T_w_c)
            if detections:
                from .synthetic_objects import write_detections

                write_detections(writer, sequence, i)
    return Path(path)


def synthesize(out_dir: str | os.PathLike[str], *, scenes: int = 4, frames: int = 30, seed: int = 0,
               intrinsics: Intrinsics | None = None, storage: str = "sqlite3", depth_encoding: str = "32FC1",
               supersample: int = 2, overwrite: bool = False, progress: bool = True,
               detections: bool = False) -> list[Path]:
    """Write ``scenes`` synthetic bags ``out_dir/scene_NNN`` with a ``scene_NNN.json`` description each.

    ``detections``: the bags also carry the objects' 2D detections (see :func:`write_bag`).
    Returns the bag paths. Each bag is written atomically; an existing bag is an error unless
    ``overwrite``.
    """
    if not isinstance(scenes, (int, np.integer)) or scenes < 1:
        raise SyntheticError(f"scenes must be a positive integer, got {scenes!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    indices: Any = range(int(scenes))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="scenes", unit="scene")
    for k in indices:
        seq = generate_sequence(seed, frames, intrinsics, scene_index=k, supersample=supersample)
        bag = out / f"scene_{k:03d}"
        write_bag(seq, bag, storage=storage, depth_encoding=depth_encoding, overwrite=overwrite, progress=progress,
                  detections=detections)
        write_json_atomic(out / f"scene_{k:03d}.json", seq.to_dict(), default=None)
        paths.append(bag)
    return paths
