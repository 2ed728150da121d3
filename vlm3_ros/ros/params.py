"""Parameter tables of the nodes, declared with descriptors and validated on every change.

Each parameter is a :class:`Param` (name, default, description, range or choices, read-only
flag). :func:`declare` declares a table on a node with a ``ParameterDescriptor`` (description,
``IntegerRange`` / ``FloatingPointRange``, ``read_only`` where a change needs a restart, the
choices in ``additional_constraints``). :class:`ParameterGuard` validates every later change in an
on-set-parameters callback: a bad value is rejected with a message naming it and the old value is
kept; accepted changes are handed to the node. Changes rclpy itself refuses from the descriptors
(type, range, read-only; our callback never sees them) are counted too, in a pre-set callback.

The tables here are the single source of truth: ``config/perception.yaml`` documents exactly
these parameters (a test checks that).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, SetParametersResult

from .qos import RELIABILITY_NAMES

__all__ = [
    "BACKEND_PARAMS",
    "DEPTH_NODE_PARAMS",
    "INPUT_PARAMS",
    "LIFECYCLE_PARAMS",
    "OBJECT_NODE_PARAMS",
    "ODOMETRY_NODE_PARAMS",
    "Param",
    "ParameterGuard",
    "SERVER_PARAMS",
    "declare",
    "check_value",
]

#: Standard optical-frame rotation of a camera looking along base_link's x axis (roll, pitch, yaw).
OPTICAL_RPY = [-math.pi / 2, 0.0, -math.pi / 2]


@dataclass(frozen=True)
class Param:
    """One parameter: its default (which fixes its type), documentation and constraints.

    ``range`` is (min, max) inclusive for numbers; ``choices`` the allowed strings; ``check`` an
    extra test returning an error message (or None) for a candidate value.
    """

    name: str
    default: Any
    description: str
    read_only: bool = False
    range: Optional[Tuple[float, float]] = None
    choices: Tuple[str, ...] = ()
    check: Optional[Callable[[Any], Optional[str]]] = None

    @property
    def kind(self) -> str:
        d = self.default
        if isinstance(d, bool):
            return "bool"
        if isinstance(d, int):
            return "int"
        if isinstance(d, float):
            return "float"
        if isinstance(d, str):
            return "str"
        if isinstance(d, (list, tuple)) and all(isinstance(v, float) for v in d):
            return "float_array"
        raise TypeError(f"parameter {self.name}: unsupported default {d!r}")

    def descriptor(self) -> ParameterDescriptor:
        types = {"bool": ParameterType.PARAMETER_BOOL, "int": ParameterType.PARAMETER_INTEGER,
                 "float": ParameterType.PARAMETER_DOUBLE, "str": ParameterType.PARAMETER_STRING,
                 "float_array": ParameterType.PARAMETER_DOUBLE_ARRAY}
        descriptor = ParameterDescriptor(name=self.name, type=types[self.kind], description=self.description,
                                         read_only=self.read_only)
        if self.choices:
            descriptor.additional_constraints = "one of: " + ", ".join(self.choices)
        if self.range is not None and self.kind == "int":
            descriptor.integer_range = [IntegerRange(from_value=int(self.range[0]), to_value=int(self.range[1]), step=1)]
        elif self.range is not None and self.kind == "float":
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(self.range[0]), to_value=float(self.range[1]), step=0.0)]
        return descriptor


def check_value(param: Param, value: Any) -> Optional[str]:
    """Why ``value`` is not acceptable for ``param`` (None if it is)."""
    kind = param.kind
    ok_type = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, float),
        "str": isinstance(value, str),
        "float_array": isinstance(value, (list, tuple)) and all(isinstance(v, float) for v in value),
    }[kind]
    if not ok_type:
        wanted = {"float": "a float (write 1.0, not 1)", "float_array": "a list of floats"}.get(kind, f"a {kind}")
        return f"{param.name} must be {wanted}, got {value!r}"
    if kind == "float" and not math.isfinite(value):
        return f"{param.name} must be finite, got {value}"
    if kind == "float_array" and not all(math.isfinite(v) for v in value):
        return f"{param.name} values must be finite, got {list(value)}"
    if param.range is not None and not (param.range[0] <= value <= param.range[1]):
        return f"{param.name} = {value} is outside [{param.range[0]}, {param.range[1]}]"
    if param.choices and value not in param.choices:
        return f"{param.name} = {value!r} is not one of {', '.join(param.choices)}"
    if param.check is not None:
        return param.check(value)
    return None


def descriptor_violation(param: Param, type_: Any, value: Any) -> Optional[str]:
    """What rclpy refuses from ``param``'s descriptor for a new value: read-only, type, range (or None)."""
    from rclpy.parameter import Parameter

    if type_ == Parameter.Type.NOT_SET:
        return None
    if param.read_only:
        return f"{param.name} is read-only (it takes effect only at start)"
    types = {"bool": Parameter.Type.BOOL, "int": Parameter.Type.INTEGER, "float": Parameter.Type.DOUBLE,
             "str": Parameter.Type.STRING, "float_array": Parameter.Type.DOUBLE_ARRAY}
    if type_ != types[param.kind]:
        return f"{param.name} must be of type {param.kind}, got {value!r}"
    if param.range is not None and not (param.range[0] <= value <= param.range[1]):
        return f"{param.name} = {value} is outside [{param.range[0]}, {param.range[1]}]"
    return None


def _frame_name(name: str) -> Callable[[Any], Optional[str]]:
    def check(value: str) -> Optional[str]:
        if value.startswith("/") or any(c.isspace() for c in value):
            return f"{name} {value!r} is not a valid TF frame id (no leading '/', no spaces)"
        return None
    return check


def _required_frame(name: str) -> Callable[[Any], Optional[str]]:
    def check(value: str) -> Optional[str]:
        if not value:
            return f"{name} must not be empty"
        return _frame_name(name)(value)
    return check


def _vector(name: str, lengths: Sequence[int]) -> Callable[[Any], Optional[str]]:
    def check(value: Sequence[float]) -> Optional[str]:
        if len(value) not in lengths:
            return f"{name} needs {' or '.join(map(str, lengths))} values, got {len(value)}"
        if len(value) == 4 and abs(math.sqrt(sum(v * v for v in value)) - 1.0) > 1e-3:
            return f"{name} as a quaternion (x, y, z, w) must have unit norm, got {list(value)}"
        return None
    return check


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def _server_url(value: str) -> Optional[str]:
    if not value.startswith(("http://", "https://")):
        return f"server.url must start with http:// or https://, got {value!r}"
    return None


def _variable_name(value: str) -> Optional[str]:
    if value and not value.replace("_", "a").isalnum():
        return f"server.api_key_env must name an environment variable (letters, digits, _), got {value!r}"
    return None


#: The server backend's parameters (backend: server): an OpenAI-compatible vLLM or SGLang server.
SERVER_PARAMS: Tuple[Param, ...] = (
    Param("server.url", "http://127.0.0.1:8000/v1", "Base URL of the OpenAI-compatible server (vLLM, SGLang) "
          "for backend server.", read_only=True, check=_server_url),
    Param("server.model", "", "Served model name (empty: the server's only model).", read_only=True),
    Param("server.api_key_env", "", "Name of the environment variable holding the server's API key (empty: "
          "none). The key itself is never a parameter and never logged.", read_only=True, check=_variable_name),
    Param("server.protocol", "", "Checkpoint directory or vlm3_protocol.json with the task specs (empty: the "
          "served model's directory when it is on this machine, else the built-in VLM3 specs).", read_only=True),
    Param("server.timeout", 30.0, "Seconds one request may take before the frame counts as backend_timeout.",
          read_only=True, range=(0.1, 3600.0)),
    Param("server.concurrency", 64, "Requests in flight at most (all nodes of the process sharing the server).",
          read_only=True, range=(1, 4096)),
    Param("server.retries", 2, "Retries of a request after a transient fault (unreachable, timeout, 5xx).",
          read_only=True, range=(0, 10)),
    Param("server.backoff", 0.5, "Seconds before the first retry, doubled for each further one.",
          read_only=True, range=(0.0, 60.0)),
)

BACKEND_PARAMS: Tuple[Param, ...] = (
    Param("backend", "transformers", "Inference backend: transformers (a Qwen3-VL checkpoint in process), "
          "server (an OpenAI-compatible vLLM / SGLang server, server.* parameters) or oracle (answers from "
          "the reference depth / pose topics, for validation).", read_only=True,
          choices=("transformers", "server", "oracle")),
    Param("model", "", "Checkpoint directory or hub id for the transformers backend (a checkpoint serving "
          "several tasks is loaded once per process).", read_only=True),
    Param("adapter", "", "Optional LoRA adapter directory merged into the model at load.", read_only=True),
    Param("device", "auto", "Torch device: auto (CUDA when available), cpu, cuda, cuda:N.", read_only=True),
    Param("dtype", "auto", "Model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.",
          read_only=True, choices=("auto", "float32", "bfloat16", "float16")),
    Param("max_batch", 64, "Questions decoded together at most (bounds memory).", read_only=True, range=(1, 4096)),
    Param("offline", True, "Resolve hub ids from the local cache only (never download).", read_only=True),
    Param("max_new_tokens", 48, "Tokens generated per answer at most.", range=(1, 4096)),
) + SERVER_PARAMS

#: How the node starts (see vlm3_ros.ros.node_base).
LIFECYCLE_PARAMS: Tuple[Param, ...] = (
    Param("managed", False, "Lifecycle: false configures and activates the node at start; true waits, "
          "unconfigured, for a lifecycle manager (launch autostart, Nav2 lifecycle_manager).", read_only=True),
)

INPUT_PARAMS: Tuple[Param, ...] = (
    Param("input_reliability", "best_available", "Reliability of the input subscriptions: best_available "
          "(adapts to the publisher; before Iron: the reliability of the topic's publishers), reliable, "
          "best_effort, system_default.",
          read_only=True, choices=RELIABILITY_NAMES),
    Param("input_depth", 5, "Queue depth of the input subscriptions (sensor data QoS uses 5).", read_only=True,
          range=(1, 5)),
    Param("output_reliability", "reliable", "Reliability of the output publishers.", read_only=True,
          choices=RELIABILITY_NAMES),
    Param("output_depth", 5, "Queue depth of the output publishers.", read_only=True, range=(1, 100)),
    Param("compressed_input", False, "Subscribe to sensor_msgs/CompressedImage on <image topic>/compressed "
          "(image_transport naming: remapping image moves it too) instead of sensor_msgs/Image on image.",
          read_only=True),
    Param("sync_tolerance", 0.0, "Largest stamp difference (s) between messages paired into one frame "
          "(0: exact stamps).", range=(0.0, 1.0)),
    Param("sync_expiry", 1.0, "A waiting message is dropped (counted unpaired) once a stream it still lacks has "
          "moved this far (s, message time) past it; a stream's own stamps going back this far twice in a row is a "
          "time jump.", range=(0.001, 60.0)),
    Param("max_image_side", 16384, "Images wider or taller than this (px) are rejected and counted.",
          range=(16, 16384)),
    Param("min_image_side", 16, "Images narrower or shorter than this (px) are rejected and counted.",
          range=(1, 4096)),
    Param("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", read_only=True, range=(0.05, 60.0)),
    Param("warn_throttle", 5.0, "Seconds between repeated warnings of one kind.", range=(0.0, 3600.0)),
)

QUERY_PARAMS: Tuple[Param, ...] = (
    Param("query_count", 64, "Number of query pixels per frame (about this many on a grid).", range=(1, 4096)),
    Param("query_margin", 0.05, "Border left out of the query pixels, as a fraction of the image size.",
          range=(0.0, 0.45)),
    Param("query_method", "grid", "Query pixels: grid (regular) or features (corners, filled up with the grid).",
          choices=("grid", "features")),
)

#: Plausibility limits of answered and reference depths (both nodes).
DEPTH_LIMIT_PARAMS: Tuple[Param, ...] = (
    Param("max_depth", 100.0, "Depths beyond this (m) are not used: answers farther away are left out of the "
          "outputs, reference depth pixels beyond it are unknown, and a PnP motion longer than it is refused.",
          range=(0.01, 1e6)),
)

DEPTH_NODE_PARAMS: Tuple[Param, ...] = LIFECYCLE_PARAMS + BACKEND_PARAMS + INPUT_PARAMS + QUERY_PARAMS + DEPTH_LIMIT_PARAMS + (
    Param("depth_kind", "spec", "What a depth answer measures: spec (as the checkpoint's task spec says; ray "
          "for VLM3), ray (distance from the camera centre) or z (along the optical axis).",
          choices=("spec", "ray", "z")),
    Param("publish_rgb", False, "Add a packed rgb field (the image colour at each point) to the cloud."),
    Param("publish_empty", True, "Publish an empty cloud and an all-NaN depth image when no answer of a frame "
          "can be used (otherwise nothing is published for that frame)."),
) + (
    # Dense depth: the answers completed into a depth map guided by the image (vlm3_ros.completion).
    Param("dense.enabled", False, "Complete each frame's answers into dense depth and publish depth/dense "
          "(32FC1, NaN below dense.min_confidence) with depth/dense/camera_info."),
    Param("dense.cloud", False, "Publish points_dense: the dense depth as a decimated PointCloud2 (x, y, z) "
          "of the pixels kept in depth/dense (computes the completion even when dense.enabled is false)."),
    Param("dense.cloud_step", 4, "points_dense takes every n-th pixel in each direction.", range=(1, 64)),
    Param("dense.min_confidence", 0.5, "Pixels whose completion confidence is below this are NaN (unknown) in "
          "depth/dense and left out of points_dense.", range=(0.0, 1.0)),
    Param("dense.adaptive_share", 0.35, "With dense outputs on: share of query_count asked in a second round "
          "about the same image, where the first round's completion is least certain (0: one round on the "
          "grid).", range=(0.0, 0.9)),
    Param("dense.lower_band_weight", 0.0, "Second round: extra weight of the lower third of the image (where "
          "a ground robot drives; 1 doubles its share).", range=(0.0, 10.0)),
)

ODOMETRY_NODE_PARAMS: Tuple[Param, ...] = LIFECYCLE_PARAMS + BACKEND_PARAMS + INPUT_PARAMS + QUERY_PARAMS + DEPTH_LIMIT_PARAMS + (
    Param("correspondence_model", "", "Checkpoint for the correspondence task (empty: model).", read_only=True),
    Param("depth_model", "", "Checkpoint for the depth answers used by PnP (empty: model).", read_only=True),
    Param("mode", "both", "Relative pose from: pose (the VLM3 pose questions), correspondence (correspondence "
          "questions + depth -> PnP) or both (fused). Changing it restarts the trajectory.",
          choices=("pose", "correspondence", "both")),
    Param("keyframe_interval", 1, "Frames measured against one keyframe before the current frame becomes the "
          "next keyframe (1: consecutive frames).", range=(1, 1000)),
    Param("min_inliers", 8, "Fewest PnP inliers accepted.", range=(4, 4096)),
    Param("ransac_px", 3.0, "PnP RANSAC inlier threshold (pixels of the focal-unified image).", range=(0.1, 100.0)),
    Param("fusion_gate", 22.46, "Squared Mahalanobis distance above which pose and PnP estimates are not "
          "averaged (the more certain one is kept); 22.46 is chi-square 99.9 % for 6 dof.", range=(0.1, 1e9)),
    Param("noise.rotation_deg", 2.0, "Pose answers: 1-sigma rotation error per axis (degrees).", range=(1e-3, 90.0)),
    Param("noise.direction_deg", 5.0, "Pose answers: 1-sigma translation direction error (degrees).",
          range=(1e-3, 90.0)),
    Param("noise.distance_rel", 0.1, "Pose answers: 1-sigma relative distance error.", range=(1e-4, 10.0)),
    Param("noise.translation_floor_m", 0.005, "Pose answers: isotropic translation sigma floor (m).",
          range=(1e-5, 10.0)),
    Param("noise.pixel_sigma", 1.0, "PnP: lower bound of the reprojection sigma (pixels).", range=(1e-3, 100.0)),
    Param("noise.depth_rel", 0.05, "PnP: relative scale error of the answered depths.", range=(1e-4, 10.0)),
    Param("noise.lost_variance", 0.01, "Variance added per frame while the pose cannot be measured.",
          range=(1e-9, 100.0)),
    Param("publish_tf", True, "Broadcast odom_frame -> base_frame on /tf."),
    Param("odom_frame", "odom", "Odometry frame id (REP-105).", check=_required_frame("odom_frame")),
    Param("base_frame", "base_link", "Robot base frame id (REP-105).", check=_required_frame("base_frame")),
    Param("camera_frame", "", "Camera optical frame id; empty: the CameraInfo's frame_id.",
          check=_frame_name("camera_frame")),
    Param("extrinsic_xyz", [0.0, 0.0, 0.0], "Static base_frame -> camera optical frame translation (m), used "
          "when TF does not provide it.", check=_vector("extrinsic_xyz", (3,))),
    Param("extrinsic_rotation", list(OPTICAL_RPY), "Static base_frame -> camera optical frame rotation: roll, "
          "pitch, yaw (rad, fixed axes) or a quaternion x, y, z, w. Default: the optical frame of a camera "
          "looking along base_frame's x axis.", check=_vector("extrinsic_rotation", (3, 4))),
    Param("extrinsic_from_tf", True, "Look base_frame -> camera frame up in TF when tf2_ros is available "
          "(falls back to the configured extrinsic while TF has none)."),
    Param("publish_extrinsic", False, "Publish the configured extrinsic on /tf_static (when nothing else, "
          "e.g. robot_state_publisher, does)."),
    Param("publish_on_failure", True, "When a frame's relative pose cannot be measured, publish the held pose "
          "(covariance growing by noise.lost_variance) instead of nothing."),
    Param("publish_debug_image", False, "Publish correspondences/image: keyframe and current frame side by "
          "side with the correspondences drawn (inliers green)."),
) + (
    # Lost frames and the first pose's covariance.
    Param("max_lost_frames", 10, "Frames in a row that cannot be measured against the keyframe before the "
          "current frame becomes the keyframe at the held pose (until then the next measured frame is measured "
          "against the keyframe, so no motion is lost).", range=(1, 10000)),
    Param("noise.initial_variance", 1e-6, "Variance of every axis of the first pose (odom is defined by it; a "
          "small positive prior keeps the covariance positive definite for filters).", range=(1e-12, 100.0)),
)

# --- object node ---


def _max_new_tokens(default: int) -> Tuple[Param, ...]:
    """BACKEND_PARAMS with another default for max_new_tokens."""
    return tuple(replace(p, default=default) if p.name == "max_new_tokens" else p for p in BACKEND_PARAMS)


OBJECT_NODE_PARAMS: Tuple[Param, ...] = LIFECYCLE_PARAMS + _max_new_tokens(96) + INPUT_PARAMS + DEPTH_LIMIT_PARAMS + (
    Param("depth_model", "", "Checkpoint for the depth questions inside each box (empty: model; the released "
          "VLM3-object checkpoint needs VLM3-depth here).", read_only=True),
    Param("depth_kind", "spec", "What a depth answer measures: spec (as the checkpoint's task spec says; ray "
          "for VLM3), ray (distance from the camera centre) or z (along the optical axis).",
          choices=("spec", "ray", "z")),
    Param("depth_grid", 3, "Depth questions per box: depth_grid x depth_grid pixels over its centre.", range=(1, 8)),
    Param("depth_inner", 0.5, "Fraction of the box (each side, centred) the depth pixels are spread over.",
          range=(0.05, 1.0)),
    Param("min_score", 0.0, "Detections whose best hypothesis scores lower are ignored.", range=(0.0, 1.0)),
    Param("max_objects", 32, "Most detections measured per frame (highest scores first; the rest are dropped "
          "and counted).", range=(1, 256)),
    Param("publish_markers", True, "Publish objects/markers (boxes and labels for RViz) when subscribed."),
    Param("publish_empty", True, "Publish an empty Detection3DArray when a frame has no detection or none "
          "could be measured (otherwise nothing is published for that frame)."),
)

TABLES: Dict[str, Tuple[Param, ...]] = {"depth_node": DEPTH_NODE_PARAMS, "odometry_node": ODOMETRY_NODE_PARAMS,
                                        "object_node": OBJECT_NODE_PARAMS}


# ------------------------------------------------------------------------------------------------
# Declaration and validation on a node
# ------------------------------------------------------------------------------------------------


def declare(node: Any, table: Iterable[Param]) -> Dict[str, Any]:
    """Declare ``table`` on ``node``; return the current values. Raises ValueError for bad values."""
    values: Dict[str, Any] = {}
    problems: List[str] = []
    from rclpy.exceptions import ParameterException

    for param in table:
        try:
            value = node.declare_parameter(param.name, param.default, param.descriptor()).value
        except ParameterException as exc:  # an override of the wrong type or out of range
            problems.append(f"{param.name}: {exc}")
            continue
        if param.kind == "float_array":
            value = list(value)
        error = check_value(param, value)
        if error:
            problems.append(error)
        values[param.name] = value
    if problems:
        raise ValueError("invalid parameters: " + "; ".join(problems))
    return values


class ParameterGuard:
    """Validates parameter changes on a node and keeps a thread-safe snapshot of the values.

    ``validate(values) -> error | None`` checks a complete candidate set (cross-parameter rules);
    ``on_change(names)`` is called after a change was accepted. The initial values are validated
    at once (ValueError) unless ``check_now`` is False (a lifecycle node checks them at configure).
    """

    def __init__(self, node: Any, table: Iterable[Param], values: Mapping[str, Any], *,
                 validate: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None,
                 on_change: Optional[Callable[[List[str]], None]] = None, check_now: bool = True) -> None:
        self.table = {p.name: p for p in table}
        self._values = dict(values)
        self._lock = threading.Lock()
        self._validate = validate
        self._on_change = on_change
        self.rejected = 0
        self.last_rejection: Optional[str] = None
        error = validate(dict(values)) if validate and check_now else None
        if error:
            raise ValueError(f"invalid parameters: {error}")
        node.add_on_set_parameters_callback(self._on_set)
        if hasattr(node, "add_pre_set_parameters_callback"):  # rclpy Iron and later
            node.add_pre_set_parameters_callback(self._pre_set)

    def snapshot(self) -> Dict[str, Any]:
        """A copy of the current values."""
        with self._lock:
            return dict(self._values)

    def __getitem__(self, name: str) -> Any:
        with self._lock:
            return self._values[name]

    def _on_set(self, parameters: List[Any]) -> SetParametersResult:
        with self._lock:
            candidate = dict(self._values)
        changed: List[str] = []
        for parameter in parameters:
            param = self.table.get(parameter.name)
            if param is None:
                continue  # not ours (use_sim_time, qos overrides...)
            value = parameter.value
            if param.kind == "float_array" and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
                value = list(value)  # rclpy hands double arrays over as array.array('d')
            if param.read_only and value != candidate[param.name]:
                return self._reject(f"{param.name} is read-only (it takes effect only at start)")
            error = check_value(param, value)
            if error:
                return self._reject(error)
            candidate[param.name] = value
            changed.append(param.name)
        if changed and self._validate is not None:
            error = self._validate(dict(candidate))
            if error:
                return self._reject(error)
        with self._lock:
            self._values = candidate
        if changed and self._on_change is not None:
            self._on_change(changed)
        return SetParametersResult(successful=True)

    def _pre_set(self, parameters: List[Any]) -> List[Any]:
        """Count a change that rclpy will refuse from the descriptor before :meth:`_on_set` runs."""
        for parameter in parameters:
            param = self.table.get(parameter.name)
            if param is None:
                continue
            reason = descriptor_violation(param, parameter.type_, parameter.value)
            if reason:
                self._reject(reason)
                break
        return parameters

    def _reject(self, reason: str) -> SetParametersResult:
        self.rejected += 1
        self.last_rejection = reason
        return SetParametersResult(successful=False, reason=reason)
