"""What the depth and odometry nodes share.

:class:`PerceptionNode` declares and guards the parameters, subscribes the image (or compressed
image) and camera_info with the input QoS, pairs messages by stamp (plus the reference streams a
node asks for), hands each complete set to a :class:`~vlm3_ros.ros.worker.LatestWorker` (one
pending set, newest wins) and publishes /diagnostics. A subclass implements ``setup()`` (load
backends, on the worker thread) and ``process(messages) -> bool`` (convert, call the core,
publish); ``process`` raises :class:`~vlm3_ros.ros.conversions.FrameRejected` for a frame it
cannot serve, which is counted and warned about (throttled per kind) while the node goes on.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence, Tuple

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ..camera import Intrinsics
from ..engine import EngineError
from .conversions import FrameRejected, check_image_size, image_rgb, intrinsics_for, stamp_ns
from .diagnostics import NodeStats, Throttle
from .params import Param, ParameterGuard, declare
from .qos import SMALL_MESSAGE_DEPTH, stream_qos
from .sync import StampSync
from .worker import LatestWorker

__all__ = ["PerceptionNode"]


class PerceptionNode(Node):
    """Base class of the perception nodes (see the module docstring)."""

    #: the streams every node pairs; subclasses add reference streams in ``extra_streams``
    BASE_STREAMS: Tuple[str, ...] = ("image", "camera_info")

    def __init__(self, node_name: str, table: Sequence[Param], **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        values = declare(self, table)
        self.params = ParameterGuard(self, table, values, validate=self.validate_params,
                                     on_change=self._params_changed)
        self.throttle = Throttle(values["warn_throttle"])
        self.streams = self.BASE_STREAMS + tuple(self.extra_streams(values))
        self.sync = StampSync(self.streams, tolerance_ns=int(round(values["sync_tolerance"] * 1e9)),
                              expiry_ns=int(round(values["sync_expiry"] * 1e9)),
                              queue_size=max(5, 4 * values["input_depth"]))
        self.stats = NodeStats(self.get_fully_qualified_name(), self.streams)
        self.input_qos = stream_qos(values["input_reliability"], values["input_depth"])
        self.output_qos = stream_qos(values["output_reliability"], values["output_depth"])
        self._newest_ns: Optional[int] = None
        self.time_jumps = 0
        self._jump_pending = False
        # Input callbacks only pair messages (thread-safe); in a reentrant group a multi-threaded
        # executor runs them side by side, so a busy image callback never starves camera_info.
        self.input_group = ReentrantCallbackGroup()
        if values["compressed_input"]:
            self.subscribe_stream(CompressedImage, "image/compressed", "image")
        else:
            self.subscribe_stream(Image, "image", "image")
        self.subscribe_stream(CameraInfo, "camera_info", "camera_info", small=True)
        self.worker = LatestWorker(self._run_frame, name=f"{node_name}_worker", on_error=self._on_worker_error,
                                   setup=self.setup)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Diagnostics run on the steady clock: they report while a bag is paused or over, even with
        # use_sim_time (their header stamp is still the node's clock).
        self.create_timer(values["diagnostics_period"], self.publish_diagnostics,
                          clock=Clock(clock_type=ClockType.STEADY_TIME))

    # -- hooks for subclasses ------------------------------------------------------------------

    def extra_streams(self, values: Dict[str, Any]) -> Sequence[str]:
        """Reference streams to pair with the image (subscribed by the subclass)."""
        return ()

    def validate_params(self, values: Dict[str, Any]) -> Optional[str]:
        """Cross-parameter checks of a candidate set; an error message rejects it."""
        if values["backend"] == "transformers" and not values.get("model"):
            return "backend 'transformers' needs the model parameter (a checkpoint directory or hub id)"
        return None

    def params_changed(self, names: Sequence[str]) -> None:
        """Called after accepted parameter changes (on the thread that set them)."""

    def setup(self) -> None:
        """Load backends (runs on the worker thread before the first frame)."""

    def process(self, messages: Dict[str, Any]) -> bool:
        """Serve one paired set; True when outputs were published."""
        raise NotImplementedError

    def time_jumped(self) -> None:
        """Stamps went back in time by more than ``sync_expiry`` (a bag restarted): forget state tied to time."""

    def diagnostic_values(self) -> Dict[str, Any]:
        """Extra key/values for the node's diagnostics."""
        return {}

    def backend_description(self) -> str:
        return str(self.params["backend"])

    # -- start / stop --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker (call at the end of the subclass constructor)."""
        self.worker.start()

    def destroy_node(self) -> None:
        self.worker.stop(timeout=2.0)
        super().destroy_node()

    # -- helpers for process() -------------------------------------------------------------------

    def decode_frame(self, messages: Dict[str, Any], values: Dict[str, Any]) -> Tuple[Any, Intrinsics]:
        """The paired image as RGB and its intrinsics, after the size and calibration checks.

        Raises :class:`FrameRejected`: ``image_size`` (outside min/max_image_side, checked before
        decoding), ``bad_image``, ``camera_info_size``, ``bad_camera_info``.
        """
        image, info = messages["image"], messages["camera_info"]
        limits = {"min_side": values["min_image_side"], "max_side": values["max_image_side"]}
        if hasattr(image, "encoding"):
            check_image_size(int(image.width), int(image.height), **limits)
        rgb = image_rgb(image)
        height, width = rgb.shape[:2]
        check_image_size(width, height, **limits)
        return rgb, intrinsics_for(info, width, height)

    # -- plumbing --------------------------------------------------------------------------------

    def subscribe_stream(self, msg_type: Any, topic: str, stream: str, *, small: bool = False) -> None:
        """Subscribe ``topic`` as the paired stream ``stream`` with the input QoS.

        ``small`` messages (CameraInfo, poses) keep a deeper queue (:data:`~.qos.SMALL_MESSAGE_DEPTH`):
        they cost nothing to hold, and a busy process must not lose the metadata an image needs.
        """
        qos = self.input_qos
        if small and qos.depth < SMALL_MESSAGE_DEPTH:
            qos = stream_qos(self.params["input_reliability"], SMALL_MESSAGE_DEPTH)
        self.create_subscription(msg_type, topic, lambda m: self._on_message(stream, m), qos,
                                 callback_group=self.input_group)

    def _params_changed(self, names: Sequence[str]) -> None:
        values = self.params.snapshot()
        if "sync_tolerance" in names or "sync_expiry" in names:
            self.sync.configure(tolerance_ns=int(round(values["sync_tolerance"] * 1e9)),
                                expiry_ns=int(round(values["sync_expiry"] * 1e9)))
        if "warn_throttle" in names:
            self.throttle.period = values["warn_throttle"]
        self.params_changed(names)

    def _on_message(self, stream: str, msg: Any) -> None:
        self.stats.received(stream)
        try:
            stamp = stamp_ns(msg.header.stamp)
        except Exception as exc:  # noqa: BLE001 - a message without a usable header
            self.problem("bad_header", f"{stream} message has no usable header stamp: {exc}")
            return
        last = self._newest_ns
        if last is not None and stamp < last - self.sync.expiry_ns:
            # Far behind everything seen: a bag started again (or the clock was reset).
            self.time_jumps += 1
            self.get_logger().warning(f"{stream} stamps jumped back by {(last - stamp) * 1e-9:.3f} s; restarting")
            self.sync.clear()
            self._jump_pending = True
            self._newest_ns = stamp
        else:
            self._newest_ns = stamp if last is None else max(stamp, last)
        paired = self.sync.add(stream, stamp, msg)
        if paired is not None:
            self.worker.submit((paired, time.perf_counter()))

    def _run_frame(self, item: Tuple[Any, Any]) -> None:
        messages, paired_at = item
        if self._jump_pending:
            self._jump_pending = False
            self.time_jumped()
        try:
            published = self.process(messages)
        except FrameRejected as exc:
            self.problem(exc.kind, str(exc))
            return
        if published:
            self.stats.served(time.perf_counter() - paired_at)

    def _on_worker_error(self, item: Any, exc: BaseException) -> None:
        # A server fault raised outside process()'s own handling still counts under its kind.
        kind = getattr(exc, "kind", None) if isinstance(exc, EngineError) else None
        self.problem(kind or "internal_error", f"{type(exc).__name__}: {exc}")

    def problem(self, kind: str, message: str, *, skipped: bool = True) -> None:
        """Count a problem of ``kind`` and warn about it (throttled per kind)."""
        self.stats.reject(kind, message)
        if self.throttle.ready(kind):
            suffix = "; frame skipped" if skipped else ""
            self.get_logger().warning(f"{kind}: {message}{suffix}")

    def publish_diagnostics(self) -> None:
        status = self.stats.status(hardware_id=self.get_fully_qualified_name(), backend=self.backend_description(),
                                   worker=self.worker, sync=self.sync,
                                   extra={"time_jumps": self.time_jumps, "parameter_rejections": self.params.rejected,
                                          **self.diagnostic_values()})
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics_pub.publish(msg)
