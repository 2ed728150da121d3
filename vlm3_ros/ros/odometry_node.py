"""The odometry node: camera frames -> relative poses -> TF odom -> base_link and nav_msgs/Odometry.

Subscribes (input QoS, paired by stamp):

* ``image`` (or ``image/compressed``) and ``camera_info`` as the depth node;
* with ``backend: oracle``: ``reference_pose`` (geometry_msgs/PoseStamped, the camera optical
  frame's pose in a fixed world frame) and ``reference_depth`` (16UC1 mm or 32FC1 m, aligned), the
  ground truth the oracle answers from.

Publishes (stamp = the image's):

* TF ``odom_frame -> base_frame`` (``publish_tf``), REP-105: the chained optical-frame motion
  composed with the static base_frame -> camera transform (from TF where tf2_ros is available,
  else the ``extrinsic_*`` parameters); on ``/tf`` as tf2_msgs/TFMessage where tf2_ros is missing;
* ``odom`` (nav_msgs/Odometry): pose with covariance in ``odom_frame``, twist with covariance in
  ``base_frame``;
* ``correspondences`` (visualization_msgs/MarkerArray, when subscribed): the keyframe's matched 3D
  points in the current camera frame, PnP inliers green, outliers red;
* ``correspondences/image`` (sensor_msgs/Image rgb8, ``publish_debug_image``): keyframe | current
  frame with the matches drawn;
* ``/diagnostics``.

Service ``~/reset`` (std_srvs/Trigger): the trajectory restarts at identity from the next frame.

The estimation, fusion, covariance and chaining live in :mod:`vlm3_ros.odometry`.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

import cv2
import numpy as np
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point, PoseStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import Image
from std_msgs.msg import ColorRGBA
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker, MarkerArray

from .. import geometry
from ..camera import CameraError
from ..engine import Backend, EngineError
from ..odometry import LateFrame, NoiseModel, OdometryConfig, OdometryError, OdometryFrame, OdometryUpdate, \
    VisualOdometry, xyz_rotation_to_pose
from ..pipeline import CorrespondenceMatcher, DepthEstimator, PoseEstimator
from . import backends as backend_cache
from .conversions import FrameRejected, header, image_msg, odometry_msg, pose_matrix, stamp_seconds, \
    transform_msg
from .node_base import PerceptionNode
from .params import ODOMETRY_NODE_PARAMS
from .tf import ExtrinsicSource, TfBroadcaster

__all__ = ["OdometryNode", "main", "odometry_config"]

#: which model parameter serves each task ("" falls back to ``model``)
TASK_MODELS = {"pose": "model", "correspondence": "correspondence_model", "depth": "depth_model"}
MODE_TASKS = {"pose": ("pose",), "correspondence": ("correspondence", "depth"),
              "both": ("pose", "correspondence", "depth")}


def odometry_config(values: Dict[str, Any], T_base_camera: Optional[np.ndarray] = None) -> OdometryConfig:
    """The core's configuration from the node's parameter values (raises OdometryError)."""
    noise = NoiseModel(**{name: values[f"noise.{name}"] for name in (
        "rotation_deg", "direction_deg", "distance_rel", "translation_floor_m", "pixel_sigma", "depth_rel",
        "lost_variance", "initial_variance")})
    return OdometryConfig(
        mode=values["mode"], keyframe_interval=values["keyframe_interval"], query_count=values["query_count"],
        query_margin=values["query_margin"], query_method=values["query_method"], min_inliers=values["min_inliers"],
        ransac_px=values["ransac_px"], fusion_gate=values["fusion_gate"], noise=noise,
        T_base_camera=T_base_camera if T_base_camera is not None else configured_extrinsic(values),
        max_lost_frames=values["max_lost_frames"], max_depth=values["max_depth"])


def configured_extrinsic(values: Dict[str, Any]) -> np.ndarray:
    return xyz_rotation_to_pose(values["extrinsic_xyz"], values["extrinsic_rotation"])


class OdometryNode(PerceptionNode):
    """Visual odometry from VLM3 answers (see the module docstring).

    ``backends``: already created backends by task ("pose", "correspondence", "depth") to use
    instead of the ones the parameters name. Other keyword arguments go to ``rclpy.node.Node``.
    """

    def __init__(self, node_name: str = "odometry_node", *, backends: Optional[Dict[str, Backend]] = None,
                 **node_kwargs: Any) -> None:
        self._given = dict(backends or {})
        self._backends: Dict[str, Backend] = {}
        self._vo: Optional[VisualOdometry] = None
        self._vo_key: Any = None
        self._static_sent: Any = None
        self._reset_requested = False
        self.last_update: Optional[OdometryUpdate] = None
        super().__init__(node_name, ODOMETRY_NODE_PARAMS, **node_kwargs)
        values = self.params.snapshot()
        if values["backend"] == "oracle":
            self.subscribe_stream(PoseStamped, "reference_pose", "reference_pose", small=True)
            self.subscribe_stream(Image, "reference_depth", "reference_depth")
        self.tf = TfBroadcaster(self)
        if not self.tf.available and values["publish_tf"]:
            self.get_logger().warning(self.tf.reason)
        self.extrinsic = ExtrinsicSource(self, configured_extrinsic(values), from_tf=values["extrinsic_from_tf"])
        self.odom_pub = self.create_publisher(Odometry, "odom", self.output_qos)
        self.marker_pub = self.create_publisher(MarkerArray, "correspondences", self.output_qos)
        self.debug_pub = self.create_publisher(Image, "correspondences/image", self.output_qos)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.start()

    # -- parameters ----------------------------------------------------------------------------

    def extra_streams(self, values: Dict[str, Any]) -> Sequence[str]:
        return ("reference_pose", "reference_depth") if values["backend"] == "oracle" else ()

    def validate_params(self, values: Dict[str, Any]) -> Optional[str]:
        error = super().validate_params(values)
        if error:
            return error
        try:
            odometry_config(values)
        except OdometryError as exc:
            return str(exc)
        if values["odom_frame"] == values["base_frame"]:
            return f"odom_frame and base_frame must differ, both are {values['odom_frame']!r}"
        return None

    def params_changed(self, names: Sequence[str]) -> None:
        if "extrinsic_xyz" in names or "extrinsic_rotation" in names:
            self.extrinsic.configured = configured_extrinsic(self.params.snapshot())

    def backend_description(self) -> str:
        values = self.params.snapshot()
        if values["backend"] in ("oracle", "server"):
            return backend_cache.settings_from_params(values).describe()
        return ", ".join(f"{task}={values[p] or values['model']}" for task, p in TASK_MODELS.items())

    def diagnostic_values(self) -> Dict[str, Any]:
        u = self.last_update
        out: Dict[str, Any] = {"tf_output": self.tf.backend, "extrinsic_source": self.extrinsic.source}
        out.update(backend_cache.health_values({**self._backends, **self._given}))
        if u is not None:
            out.update({"status": u.status, "source": u.estimate.source if u.estimate else "",
                        "inliers": u.estimate.inliers if u.estimate else 0,
                        "position_sigma_m": f"{float(np.sqrt(np.trace(u.covariance[:3, :3]))):.4f}"})
        return out

    # -- backends and estimators (worker thread) ------------------------------------------------

    def _backend(self, task: str) -> Backend:
        if task in self._given:
            return self._given[task]
        if task not in self._backends:
            values = self.params.snapshot()
            settings = backend_cache.settings_from_params(values, model=values[TASK_MODELS[task]] or None)
            self._backends[task] = backend_cache.shared_backend(settings)  # released by teardown
        return self._backends[task]

    def setup(self) -> None:
        values = self.params.snapshot()
        tasks = MODE_TASKS[values["mode"]]
        missing = []
        for task in tasks:
            backend = self._backend(task)
            try:
                served = backend.specs
            except EngineError as exc:
                if backend_cache.failure_kind(exc, "") == "":
                    raise
                # A server still down or starting: the node starts and checks with each frame.
                self.get_logger().warning(f"{backend_cache.failure_kind(exc)}: {exc}; serving {task} once the server "
                                          "answers")
                continue
            if task not in served:
                source = "oracle" if values["backend"] == "oracle" else values[TASK_MODELS[task]] or values["model"]
                missing.append(f"{task} ({TASK_MODELS[task]}: {source} serves {', '.join(sorted(backend.specs))})")
        if missing:
            raise EngineError(f"mode {values['mode']!r} needs the tasks {', '.join(tasks)}; not served: "
                              f"{'; '.join(missing)}. Set mode to one the checkpoint serves, or give checkpoints "
                              "for the others (correspondence_model, depth_model)")
        self.get_logger().info(f"odometry backends ready ({self.backend_description()})")

    def teardown(self) -> None:
        self._vo = self._vo_key = None
        self.last_update = None
        for backend in self._backends.values():
            backend_cache.release(backend)
        self._backends.clear()

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self._reset_requested = True  # taken by the worker thread before the next frame
        response.success = True
        response.message = "the trajectory restarts at identity from the next frame"
        self.get_logger().info("reset requested: " + response.message)
        return response

    def _odometry(self, config: OdometryConfig, values: Dict[str, Any]) -> VisualOdometry:
        tasks = MODE_TASKS[config.mode]
        key = (values["max_new_tokens"], tasks)
        if self._vo is None or key != self._vo_key:
            n = values["max_new_tokens"]
            self._vo = VisualOdometry(
                config,
                pose_estimator=PoseEstimator(self._backend("pose"), max_new_tokens=n) if "pose" in tasks else None,
                matcher=CorrespondenceMatcher(self._backend("correspondence"), max_new_tokens=n)
                if "correspondence" in tasks else None,
                depth_estimator=DepthEstimator(self._backend("depth"), max_new_tokens=n) if "depth" in tasks else None,
            )
            self._vo_key = key
        else:
            self._vo.reconfigure(config)
        return self._vo

    def time_jumped(self) -> None:
        if self._vo is not None:
            self._vo.reset()

    # -- per frame ------------------------------------------------------------------------------

    def process(self, messages: Dict[str, Any]) -> bool:
        values = self.params.snapshot()
        image, info = messages["image"], messages["camera_info"]
        rgb, intrinsics = self.decode_frame(messages, values)
        height, width = rgb.shape[:2]
        camera_frame = values["camera_frame"] or info.header.frame_id
        if not camera_frame:
            raise FrameRejected("bad_camera_info", "camera_info has an empty frame_id and camera_frame is not set")
        reference_pose = pose_matrix(messages["reference_pose"]) if "reference_pose" in messages else None
        reference_depth = self.reference_depth(messages, width, height, values["max_depth"])
        T_base_camera = self.extrinsic.lookup(values["base_frame"], camera_frame)
        vo = self._odometry(odometry_config(values, T_base_camera), values)
        if self._reset_requested:
            self._reset_requested = False
            vo.reset()
        frame = OdometryFrame(stamp_seconds(image.header.stamp), rgb, intrinsics, reference_depth, reference_pose)
        try:
            update = vo.process(frame)
        except LateFrame as exc:  # not after the keyframe: skip it, the trajectory goes on
            raise FrameRejected("late", f"{exc}; the trajectory goes on") from None
        except CameraError as exc:
            raise FrameRejected("bad_camera_info", f"the odometry tasks cannot prepare this camera: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a model failure must not end the node
            raise FrameRejected(backend_cache.failure_kind(exc), f"{type(exc).__name__}: {exc}") from None
        self.last_update = update
        self.stats.parse_failed(update.parse_failures, update.errors[0] if update.errors else None)
        self.stats.unreferenced(update.no_reference)
        if update.status == "lost":
            self.problem("pose_lost", "; ".join(update.errors) or "no estimate",
                         skipped=not values["publish_on_failure"])
            if not values["publish_on_failure"]:
                return False
        self._publish(update, image.header.stamp, camera_frame, values, rgb)
        return True

    def _publish(self, update: OdometryUpdate, stamp: Any, camera_frame: str, values: Dict[str, Any],
                 rgb: np.ndarray) -> None:
        odom, base = values["odom_frame"], values["base_frame"]
        if values["publish_extrinsic"]:
            key = (base, camera_frame, self.extrinsic.configured.tobytes())
            if key != self._static_sent:
                self.tf.send_static([transform_msg(self.extrinsic.configured, stamp, base, camera_frame)])
                self._static_sent = key
        if values["publish_tf"]:
            self.tf.send([transform_msg(update.T_odom_base, stamp, odom, base)])
        self.odom_pub.publish(odometry_msg(update.T_odom_base, update.covariance, update.twist,
                                           update.twist_covariance, stamp, odom, base))
        if update.matches is not None and self.marker_pub.get_subscription_count() > 0:
            self.marker_pub.publish(self._markers(update, stamp, camera_frame))
        if values["publish_debug_image"] and update.matches is not None and self._key_image is not None:
            self.debug_pub.publish(image_msg(self._debug_image(update, rgb), "rgb8", header(stamp, camera_frame)))
        if update.keyframe:
            self._key_image = rgb

    _key_image: Optional[np.ndarray] = None

    @staticmethod
    def _markers(update: OdometryUpdate, stamp: Any, camera_frame: str) -> MarkerArray:
        m = update.matches
        ok = np.all(np.isfinite(m.points1), axis=1)
        points = m.points1[ok]
        if update.estimate is not None:  # keyframe points seen from the current camera
            points = geometry.transform_points(geometry.invert_pose(update.estimate.T), points)
        inliers = m.inliers[ok]
        marker = Marker(header=header(stamp, camera_frame), ns="correspondences", id=0, type=Marker.POINTS,
                        action=Marker.ADD, lifetime=Duration(sec=1))
        marker.pose.orientation.w = 1.0
        marker.scale.x = marker.scale.y = 0.02
        marker.points = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in points]
        green, red = ColorRGBA(r=0.1, g=0.9, b=0.1, a=1.0), ColorRGBA(r=0.9, g=0.1, b=0.1, a=1.0)
        marker.colors = [green if i else red for i in inliers]
        return MarkerArray(markers=[marker])

    def _debug_image(self, update: OdometryUpdate, rgb: np.ndarray) -> np.ndarray:
        key = self._key_image
        h = max(key.shape[0], rgb.shape[0])
        canvas = np.zeros((h, key.shape[1] + rgb.shape[1], 3), np.uint8)
        canvas[: key.shape[0], : key.shape[1]] = key
        canvas[: rgb.shape[0], key.shape[1]:] = rgb
        m = update.matches
        ok = np.all(np.isfinite(m.uv1), axis=1) & np.all(np.isfinite(m.uv2), axis=1)
        offset = np.array([key.shape[1], 0.0])
        for good in (False, True):
            sel = ok & (m.inliers == good)
            lines = [np.array([a, b + offset]).round().astype(np.int32) for a, b in zip(m.uv1[sel], m.uv2[sel])]
            if lines:
                cv2.polylines(canvas, lines, False, (40, 220, 40) if good else (220, 40, 40), 1, cv2.LINE_AA)
        return canvas


def main(args: Optional[Sequence[str]] = None) -> int:
    """Run the odometry node alone (console script ``odometry_node``)."""
    from .runner import run_nodes

    return run_nodes([OdometryNode], args=sys.argv if args is None else list(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
