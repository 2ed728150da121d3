"""Encoding and decoding of ROS message payloads with numpy, for any message implementation.

The functions read and return plain fields (``height``, ``width``, ``encoding``, ``step``,
``data``...), so they work the same on rclpy messages, on rosbags messages and on any object with
those attributes; nothing here imports ROS. Builders return dicts of fields, which the caller
passes to its own message class.

Image encodings (sensor_msgs/image_encodings): ``rgb8``, ``bgr8``, ``rgba8``, ``bgra8``,
``mono8``, ``mono16``, ``8UC1``, ``8UC3``, ``16UC1``, ``32FC1``. PointCloud2 clouds are built and
read in one vectorised step (a structured numpy array).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "ENCODINGS",
    "MessageError",
    "camera_info_fields",
    "cloud_fields",
    "cdr_header_stamp",
    "compressed_size",
    "compressed_to_array",
    "decode_image",
    "depth_to_metres",
    "encode_image",
    "image_to_rgb",
    "read_cloud",
]


class MessageError(ValueError):
    """A message's payload is inconsistent or in an unsupported format."""


# encoding -> (dtype, channels)
ENCODINGS: Mapping[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "8UC1": (np.dtype(np.uint8), 1),
    "8UC3": (np.dtype(np.uint8), 3),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
}
MAX_SIDE = 16384


def _buffer(data: Any) -> memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).cast("B")
    # rclpy's array.array('B') or a list of ints
    try:
        return memoryview(data).cast("B")
    except TypeError:
        return memoryview(bytes(data))


def decode_image(msg: Any) -> np.ndarray:
    """sensor_msgs/Image -> array (H, W) or (H, W, C) in the message's own encoding and dtype.

    Raises :class:`MessageError` for an unknown encoding, a zero or absurd size, a step smaller
    than a row, or data shorter than ``step * height``.
    """
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise MessageError(f"unsupported image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}")
    dtype, channels = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise MessageError(f"image size {width}x{height} is outside 1..{MAX_SIDE}")
    row = width * channels * dtype.itemsize
    if step < row:
        raise MessageError(f"image step {step} is smaller than a row of {width} {encoding} pixels ({row} bytes)")
    buf = _buffer(msg.data)
    if len(buf) < step * (height - 1) + row:
        raise MessageError(f"image data has {len(buf)} bytes, {encoding} {width}x{height} with step {step} needs {step * height}")
    raw = np.frombuffer(buf, dtype=np.uint8, count=step * (height - 1) + row)
    rows = np.lib.stride_tricks.as_strided(raw, shape=(height, row), strides=(step, 1))
    big_endian = bool(getattr(msg, "is_bigendian", False))
    pixel_dtype = dtype.newbyteorder(">" if big_endian else "<") if dtype.itemsize > 1 else dtype
    array = np.ascontiguousarray(rows).view(pixel_dtype).reshape(height, width, channels)
    if pixel_dtype.byteorder not in ("=", "|") and pixel_dtype.byteorder != ("<" if sys.byteorder == "little" else ">"):
        array = array.astype(dtype)
    return array[..., 0] if channels == 1 else array


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image (any supported colour or mono encoding) -> RGB uint8 (H, W, 3)."""
    array = decode_image(msg)
    encoding = str(msg.encoding)
    if encoding in ("rgb8", "8UC3"):
        return array
    if encoding == "bgr8":
        return array[..., ::-1].copy()
    if encoding == "rgba8":
        return array[..., :3].copy()
    if encoding == "bgra8":
        return array[..., 2::-1].copy()
    if encoding in ("mono8", "8UC1"):
        return np.repeat(array[..., None], 3, axis=2)
    if encoding in ("mono16", "16UC1"):
        scaled = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
        return np.repeat(scaled[..., None], 3, axis=2)
    raise MessageError(f"image encoding {encoding!r} is not a colour or intensity image")


def depth_to_metres(msg: Any, *, millimetres_per_unit: float = 1.0) -> np.ndarray:
    """A depth image (``16UC1`` / ``mono16`` in millimetres, or ``32FC1`` in metres) -> float32 metres, NaN invalid."""
    array = decode_image(msg)
    encoding = str(msg.encoding)
    if encoding in ("16UC1", "mono16"):
        depth = array.astype(np.float32) * np.float32(millimetres_per_unit / 1000.0)
        depth[array == 0] = np.nan
    elif encoding == "32FC1":
        depth = array.astype(np.float32, copy=True)
        depth[~np.isfinite(depth) | (depth <= 0)] = np.nan
    else:
        raise MessageError(f"depth images must be 16UC1 (mm) or 32FC1 (m), got {encoding!r}")
    return depth


def compressed_size(msg: Any) -> tuple[int, int]:
    """``(width, height)`` of a sensor_msgs/CompressedImage read from its header bytes only.

    Nothing is decompressed (a small PNG can hold a huge image): the size can be checked first.
    Raises :class:`MessageError` when the data is not an image format that can be identified.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    data = _buffer(msg.data)
    if len(data) == 0:
        raise MessageError("compressed image has no data")
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header; pixels are decoded lazily
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MessageError(f"compressed image (format {getattr(msg, 'format', '?')!r}) is not a readable image: "
                           f"{exc}") from None
    return int(width), int(height)


def compressed_to_array(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> RGB uint8 (H, W, 3)."""
    import cv2

    buf = np.frombuffer(_buffer(msg.data), dtype=np.uint8)
    if buf.size == 0:
        raise MessageError("compressed image has no data")
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise MessageError(f"compressed image (format {getattr(msg, 'format', '?')!r}) could not be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_image(array: np.ndarray, encoding: str) -> dict[str, Any]:
    """Fields of a sensor_msgs/Image (``height, width, encoding, is_bigendian, step, data``)."""
    if encoding not in ENCODINGS:
        raise MessageError(f"unsupported image encoding {encoding!r}")
    dtype, channels = ENCODINGS[encoding]
    array = np.asarray(array)
    expected = (array.shape[0], array.shape[1]) + ((channels,) if channels > 1 else ())
    if array.shape != expected and not (channels == 1 and array.shape == expected + (1,)):
        raise MessageError(f"array of shape {array.shape} does not fit encoding {encoding!r}")
    data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<"))
    height, width = array.shape[:2]
    return {
        "height": int(height),
        "width": int(width),
        "encoding": encoding,
        "is_bigendian": 0,
        "step": int(width * channels * dtype.itemsize),
        "data": data.tobytes(),
    }


def camera_info_fields(intrinsics: Any) -> dict[str, Any]:
    """Fields of a sensor_msgs/CameraInfo for a :class:`vlm3_ros.camera.Intrinsics` (no header)."""
    K = np.asarray(intrinsics.K, dtype=float)
    P = np.zeros((3, 4))
    P[:3, :3] = K
    model = intrinsics.distortion_model if intrinsics.distortion_model != "none" else "plumb_bob"
    D = list(intrinsics.D) if intrinsics.D else ([0.0] * 5 if model == "plumb_bob" else [])
    return {
        "height": int(intrinsics.height),
        "width": int(intrinsics.width),
        "distortion_model": model,
        "d": [float(v) for v in D],
        "k": K.reshape(-1).tolist(),
        "r": np.eye(3).reshape(-1).tolist(),
        "p": P.reshape(-1).tolist(),
    }


# PointField datatypes (sensor_msgs/PointField)
_POINTFIELD = {np.dtype(np.float32): 7, np.dtype(np.float64): 8, np.dtype(np.uint32): 6, np.dtype(np.int32): 5,
               np.dtype(np.uint8): 2, np.dtype(np.uint16): 4, np.dtype(np.int8): 1, np.dtype(np.int16): 3}
_POINTFIELD_DTYPE = {v: k for k, v in _POINTFIELD.items()}


def cloud_fields(columns: Mapping[str, np.ndarray], *, rgb: np.ndarray | None = None) -> dict[str, Any]:
    """Fields of an unorganised sensor_msgs/PointCloud2 (no header) built in one vectorised step.

    ``columns``: name -> 1D array (all the same length; float32 unless given otherwise).
    ``rgb``: optional (N, 3) uint8 colours packed into a float32 ``rgb`` field (PCL convention).
    Returns ``height, width, fields`` (a list of dicts ``name, offset, datatype, count``),
    ``is_bigendian, point_step, row_step, data, is_dense``.
    """
    names = list(columns)
    arrays = [np.asarray(columns[n]) for n in names]
    if rgb is not None:
        rgb = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
        packed = (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2].astype(np.uint32)
        names.append("rgb")
        arrays.append(packed.view(np.float32))
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise MessageError(f"cloud columns have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    dtypes = [a.dtype if a.dtype in _POINTFIELD else np.dtype(np.float32) for a in arrays]
    record = np.dtype({"names": names, "formats": [d.newbyteorder("<") for d in dtypes]})
    table = np.empty(n, dtype=record)
    for name, array in zip(names, arrays):
        table[name] = array
    finite = all(np.isfinite(table[name]).all() for name, d in zip(names, dtypes) if d.kind == "f" and name != "rgb")
    return {
        "height": 1,
        "width": int(n),
        "fields": [
            {"name": name, "offset": int(record.fields[name][1]), "datatype": _POINTFIELD[d], "count": 1}
            for name, d in zip(names, dtypes)
        ],
        "is_bigendian": False,
        "point_step": int(record.itemsize),
        "row_step": int(record.itemsize * n),
        "data": table.tobytes(),
        "is_dense": bool(finite),
    }


def read_cloud(msg: Any, names: Sequence[str] | None = None) -> np.ndarray:
    """sensor_msgs/PointCloud2 -> structured array with the requested (default: all) fields."""
    fields = list(msg.fields)
    by_name = {f.name: f for f in fields}
    wanted: Iterable[str] = names if names is not None else [f.name for f in fields]
    formats, offsets, selected = [], [], []
    order = ">" if msg.is_bigendian else "<"
    for name in wanted:
        if name not in by_name:
            raise MessageError(f"cloud has no field {name!r}; it has {sorted(by_name)}")
        f = by_name[name]
        if f.datatype not in _POINTFIELD_DTYPE:
            raise MessageError(f"cloud field {name!r} has unknown datatype {f.datatype}")
        selected.append(name)
        formats.append(_POINTFIELD_DTYPE[f.datatype].newbyteorder(order))
        offsets.append(f.offset)
    record = np.dtype({"names": selected, "formats": formats, "offsets": offsets, "itemsize": int(msg.point_step)})
    count = int(msg.width) * int(msg.height)
    buf = _buffer(msg.data)
    if len(buf) < count * int(msg.point_step):
        raise MessageError(f"cloud data has {len(buf)} bytes, {count} points of {msg.point_step} need more")
    return np.frombuffer(buf, dtype=record, count=count)


def cdr_header_stamp(data: bytes) -> int | None:
    """Header stamp (ns) of a CDR-serialized message whose first field is ``std_msgs/Header``.

    Reads the 8 bytes after the encapsulation header; None when they cannot be a stamp.
    """
    import struct

    if len(data) < 12 or data[0] != 0 or data[1] not in (0, 1):
        return None
    sec, nanosec = struct.unpack_from("<iI" if data[1] == 1 else ">iI", data, 4)
    if nanosec >= 1_000_000_000:
        return None
    return int(sec) * 1_000_000_000 + int(nanosec)
