"""What the depth and odometry nodes share.

:class:`PerceptionNode` is an rclpy lifecycle node. It declares and guards the parameters,
subscribes the image (or compressed image) and camera_info with the input QoS, pairs messages by
stamp (plus the reference streams a node asks for), hands each complete set to a
:class:`~vlm3_ros.ros.worker.LatestWorker` (one pending set, newest wins) and publishes
/diagnostics. A subclass implements ``setup()`` (load backends, on the worker thread),
``teardown()`` (free them) and ``process(messages) -> bool`` (convert, call the core, publish);
``process`` raises :class:`~vlm3_ros.ros.conversions.FrameRejected` for a frame it cannot serve,
which is counted and warned about (throttled per kind) while the node goes on.

Lifecycle (REP-2002, as Nav2 bring-up drives it):

* configure: validates the parameters and loads the model (``setup()``); a failure leaves the
  node unconfigured and names the reason;
* activate: opens the input subscriptions; frames are served and published;
* deactivate: closes them and waits for a frame in flight, so nothing is published while
  inactive; the model stays loaded;
* cleanup: stops the worker and frees the model (``teardown()``); shutdown does what is left of
  deactivate and cleanup.

With ``managed: false`` (the default) a node runs these transitions itself when it is created
(:meth:`start`) and raises :class:`NodeStartError` if it cannot start; with ``managed: true`` it
waits, unconfigured, for a lifecycle manager (the launch file's ``autostart``, Nav2's
lifecycle_manager, ``ros2 lifecycle set``). Both modes are the same node: the lifecycle services
exist either way, and diagnostics report the state.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence, Tuple

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ..camera import Intrinsics
from ..engine import EngineError
from .conversions import FrameRejected, check_image_size, depth_metres, image_rgb, image_size, intrinsics_for, stamp_ns
from .diagnostics import NodeStats, Throttle
from .params import Param, ParameterGuard, declare
from .qos import SMALL_MESSAGE_DEPTH, InputSubscription, stream_qos
from .sync import StampSync
from .worker import LatestWorker

__all__ = ["NodeStartError", "PerceptionNode"]

#: Seconds between looks at the graph while a best_available input waits for its first publisher (Humble).
INPUT_RECHECK_PERIOD = 0.5
#: Longest wait of deactivate for a frame in flight (s).
DEACTIVATE_TIMEOUT = 60.0

#: Seconds a node waits at shutdown for the frame in progress (a CPU model can take several seconds).
STOP_TIMEOUT_S = 30.0


class NodeStartError(RuntimeError):
    """An unmanaged node could not configure or activate itself (the message says why)."""


class PerceptionNode(LifecycleNode):
    """Base class of the perception nodes (see the module docstring)."""

    #: the streams every node pairs; subclasses add reference streams in ``extra_streams``
    BASE_STREAMS: Tuple[str, ...] = ("image", "camera_info")
    # Defaults that let destroy_node run on a node whose constructor failed (rclpy destroys it then).
    active = False
    _loaded = False
    _recheck_timer: Any = None
    inputs: Dict[str, InputSubscription] = {}

    def __init__(self, node_name: str, table: Sequence[Param], **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        values = declare(self, table)
        # Cross-parameter rules are checked by configure (a managed node reports them there).
        self.params = ParameterGuard(self, table, values, validate=self.validate_params,
                                     on_change=self._params_changed, check_now=False)
        self.throttle = Throttle(values["warn_throttle"])
        self.streams = self.BASE_STREAMS + tuple(self.extra_streams(values))
        self.sync = StampSync(self.streams, tolerance_ns=int(round(values["sync_tolerance"] * 1e9)),
                              expiry_ns=int(round(values["sync_expiry"] * 1e9)),
                              queue_size=max(5, 4 * values["input_depth"]))
        self.stats = NodeStats(self.get_fully_qualified_name(), self.streams)
        self.input_qos = stream_qos(values["input_reliability"], values["input_depth"])
        self.output_qos = stream_qos(values["output_reliability"], values["output_depth"])
        self._epoch = 0  # the sync's timeline of the last frame served (see _run_frame)
        self.lifecycle_state = "unconfigured"
        self.start_error = ""
        # Input callbacks only pair messages (thread-safe, no decoding: the worker decodes the one frame
        # it serves); in a reentrant group a multi-threaded executor may also run them side by side.
        self.input_group = ReentrantCallbackGroup()
        #: stream -> its subscription, opened by activate and closed by deactivate
        self.inputs: Dict[str, InputSubscription] = {}
        if values["compressed_input"]:
            # image_transport naming: the compressed stream of the (remapped) image topic.
            self.subscribe_stream(CompressedImage, self.resolve_topic_name("image") + "/compressed", "image")
        else:
            self.subscribe_stream(Image, "image", "image")
        self.subscribe_stream(CameraInfo, "camera_info", "camera_info", small=True)
        self.worker = self._new_worker()
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Diagnostics run on the steady clock: they report while a bag is paused or over, even with
        # use_sim_time (their header stamp is still the node's clock). Their own callback group lets
        # a multi-threaded executor report while a transition (a model loading) is in progress.
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(values["diagnostics_period"], self.publish_diagnostics, clock=self._steady,
                          callback_group=MutuallyExclusiveCallbackGroup())

    # -- hooks for subclasses ------------------------------------------------------------------

    def extra_streams(self, values: Dict[str, Any]) -> Sequence[str]:
        """Reference streams to pair with the image (subscribed by the subclass)."""
        return ()

    def validate_params(self, values: Dict[str, Any]) -> Optional[str]:
        """Cross-parameter checks of a candidate set; an error message rejects it."""
        if values["backend"] == "transformers" and not values.get("model"):
            return "backend 'transformers' needs the model parameter (a checkpoint directory or hub id)"
        if values["min_image_side"] > values["max_image_side"]:
            return (f"min_image_side {values['min_image_side']} is larger than max_image_side "
                    f"{values['max_image_side']}: every image would be rejected")
        return None

    def params_changed(self, names: Sequence[str]) -> None:
        """Called after accepted parameter changes (on the thread that set them)."""

    def setup(self) -> None:
        """Load backends (configure; runs on the worker thread before the first frame)."""

    def teardown(self) -> None:
        """Free what ``setup`` loaded (cleanup; the worker has stopped)."""

    def process(self, messages: Dict[str, Any]) -> bool:
        """Serve one paired set; True when outputs were published."""
        raise NotImplementedError

    def time_jumped(self) -> None:
        """A stream's stamps went back by more than ``sync_expiry`` (a bag restarted): forget state tied to time.

        Called on the worker thread before the first frame of the new timeline."""

    def diagnostic_values(self) -> Dict[str, Any]:
        """Extra key/values for the node's diagnostics."""
        return {}

    def backend_description(self) -> str:
        return str(self.params["backend"])

    # -- start / stop --------------------------------------------------------------------------

    def start(self) -> None:
        """Call at the end of the subclass constructor: an unmanaged node configures and activates
        itself (raising :class:`NodeStartError` if it cannot); a managed one waits for its manager."""
        if self.params["managed"]:
            self.get_logger().info("managed node: waiting (unconfigured) for the configure transition")
        else:
            self.bring_up()

    def bring_up(self) -> None:
        """Configure and activate (raises :class:`NodeStartError` naming the transition that failed)."""
        for name, transition in (("configure", self.trigger_configure), ("activate", self.trigger_activate)):
            if transition() != TransitionCallbackReturn.SUCCESS:
                raise NodeStartError(f"{self.get_name()} could not {name}: {self.start_error or 'see the log'}")

    def destroy_node(self) -> None:
        # The frame in progress finishes first (in _cleanup, up to STOP_TIMEOUT_S): a worker left inside
        # the model while the process exits aborts it (torch's threads are torn down under it).
        self._deactivate(wait=False)
        self._cleanup()
        super().destroy_node()

    # -- lifecycle transitions -------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.start_error = ""
        error = self.validate_params(self.params.snapshot())
        if error:
            return self._failed("configure", f"invalid parameters: {error}")
        if self.worker.state != "created":  # configured before: a worker thread runs once
            self.worker = self._new_worker()
        self.worker.start()
        while self.worker.state == "loading":  # setup() runs on the worker thread; wait for its result
            time.sleep(0.01)
        if self.worker.state == "failed":  # kept in that state: diagnostics report the error
            self.teardown()
            return self._failed("configure", f"the backend did not load: {self.worker.error or 'setup failed'}")
        self._loaded = True
        self.lifecycle_state = "inactive"
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for subscription in self.inputs.values():
            subscription.open()
        self.active = True
        self.lifecycle_state = "active"
        if any(s.matching for s in self.inputs.values()):
            self._recheck_timer = self.create_timer(INPUT_RECHECK_PERIOD, self._recheck_inputs, clock=self._steady)
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._cleanup()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._cleanup()
        self.lifecycle_state = "finalized"
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def _failed(self, transition: str, reason: str) -> TransitionCallbackReturn:
        self.start_error = reason
        self.stats.last_problem = f"{transition} failed: {reason}"
        self.get_logger().error(f"{transition} failed: {reason}")
        return TransitionCallbackReturn.FAILURE

    def _deactivate(self, wait: bool = True) -> None:
        was_active, self.active = self.active, False
        if self._recheck_timer is not None:
            self.destroy_timer(self._recheck_timer)
            self._recheck_timer = None
        for subscription in self.inputs.values():
            subscription.close()
        if was_active:
            self.sync.clear()  # halves of a set left unpaired never pair with a later activation's
            if wait:  # a frame in flight finishes; one still waiting finds the node inactive and is dropped
                self.worker.wait_idle(DEACTIVATE_TIMEOUT)
            self.lifecycle_state = "inactive"

    def _cleanup(self) -> None:
        if self._loaded:
            self._loaded = False
            self.worker.stop(timeout=STOP_TIMEOUT_S)
            self.teardown()
            self.sync.clear()
        self.lifecycle_state = "unconfigured"

    def _new_worker(self) -> LatestWorker:
        return LatestWorker(self._run_frame, name=f"{self.get_name()}_worker", on_error=self._on_worker_error,
                            setup=self.setup)

    def _recheck_inputs(self) -> None:
        for stream, subscription in self.inputs.items():
            if subscription.recheck():
                self.get_logger().info(f"{stream}: {subscription.resolved_topic} has a publisher now; subscribed "
                                       f"{subscription.policy.name.lower()} to match it")
        if not any(s.matching for s in self.inputs.values()) and self._recheck_timer is not None:
            self.destroy_timer(self._recheck_timer)
            self._recheck_timer = None

    # -- helpers for process() -------------------------------------------------------------------

    def decode_frame(self, messages: Dict[str, Any], values: Dict[str, Any]) -> Tuple[Any, Intrinsics]:
        """The paired image as RGB and its intrinsics, after the size and calibration checks.

        Raises :class:`FrameRejected`: ``image_size`` (outside min/max_image_side or an aspect
        ratio the models refuse; checked from the header, compressed images included, before any
        decoding), ``bad_image``, ``camera_info_size``, ``bad_camera_info``.
        """
        image, info = messages["image"], messages["camera_info"]
        limits = {"min_side": values["min_image_side"], "max_side": values["max_image_side"]}
        check_image_size(*image_size(image), **limits)
        rgb = image_rgb(image)
        height, width = rgb.shape[:2]
        check_image_size(width, height, **limits)
        return rgb, intrinsics_for(info, width, height)

    @staticmethod
    def require_optical_frame(info: Any) -> None:
        """Raise :class:`FrameRejected` ``bad_camera_info`` when the CameraInfo names no frame: outputs
        in the optical frame need it."""
        if not info.header.frame_id:
            raise FrameRejected("bad_camera_info", "camera_info has an empty frame_id; outputs need the optical frame")

    @staticmethod
    def depth_spec(backend: Any, depth_kind: str) -> Any:
        """``backend``'s depth task spec with the ``depth_kind`` parameter applied (``spec``: as the
        checkpoint says)."""
        spec = backend.spec("depth")
        return spec if depth_kind == "spec" else spec.with_options(depth_kind=depth_kind)

    def reference_depth(self, messages: Dict[str, Any], width: int, height: int,
                        max_depth: Optional[float] = None) -> Optional[Any]:
        """The paired ``reference_depth`` in metres along z (None when there is none; pixels beyond
        ``max_depth`` are unknown).

        Raises :class:`FrameRejected` ``reference_depth_size`` when it is not ``width`` x ``height``.
        """
        if "reference_depth" not in messages:
            return None
        depth = depth_metres(messages["reference_depth"], max_depth)
        if depth.shape != (height, width):
            raise FrameRejected("reference_depth_size", f"reference depth is {depth.shape[1]}x{depth.shape[0]} "
                                f"but the image is {width}x{height}")
        return depth

    # -- plumbing --------------------------------------------------------------------------------

    def subscribe_stream(self, msg_type: Any, topic: str, stream: str, *, small: bool = False) -> None:
        """Subscribe ``topic`` as the paired stream ``stream`` with the input QoS (opened while active).

        ``small`` messages (CameraInfo, poses) keep a deeper queue (:data:`~.qos.SMALL_MESSAGE_DEPTH`):
        they cost nothing to hold, and a busy process must not lose the metadata an image needs.
        """
        depth = self.input_qos.depth
        if small:
            depth = max(depth, SMALL_MESSAGE_DEPTH)
        subscription = InputSubscription(self, msg_type, topic, lambda m: self._on_message(stream, m),
                                         self.params["input_reliability"], depth, callback_group=self.input_group)
        self.inputs[stream] = subscription
        if self.active:
            subscription.open()

    def _params_changed(self, names: Sequence[str]) -> None:
        values = self.params.snapshot()
        if "sync_tolerance" in names or "sync_expiry" in names:
            self.sync.configure(tolerance_ns=int(round(values["sync_tolerance"] * 1e9)),
                                expiry_ns=int(round(values["sync_expiry"] * 1e9)))
        if "warn_throttle" in names:
            self.throttle.period = values["warn_throttle"]
        self.params_changed(names)

    @property
    def time_jumps(self) -> int:
        """Times a stream's own stamps went back (a bag restarted); see :mod:`.sync`."""
        return self.sync.counters.time_jumps

    def _on_message(self, stream: str, msg: Any) -> None:
        # Runs for every message: only pairing by stamp here (a reference is kept, nothing decoded).
        self.stats.received(stream)
        try:
            stamp = stamp_ns(msg.header.stamp)
        except Exception as exc:  # noqa: BLE001 - a message without a usable header
            self.problem("bad_header", f"{stream} message has no usable header stamp: {exc}")
            return
        offer = self.sync.offer(stream, stamp, msg)
        if offer.jumped:
            self.get_logger().warning(f"{stream} stamps went back: a new timeline (a bag played again?); "
                                      "the nodes restart from its first frame")
        elif offer.status == "late" and self.throttle.ready("late"):
            self.get_logger().warning(f"late: a {stream} message {offer.behind_ns * 1e-9:.3f} s older than the frame "
                                      "already served was dropped (counted as late)")
        if offer.messages is not None:
            self.worker.submit((offer.messages, time.perf_counter(), offer.epoch))

    def _run_frame(self, item: Tuple[Any, Any, int]) -> None:
        if not self.active:  # paired before a deactivate: nothing is published while inactive
            return
        messages, paired_at, epoch = item
        if epoch != self._epoch:
            self._epoch = epoch
            self.time_jumped()
        started = time.perf_counter()
        try:
            published = self.process(messages)
        except FrameRejected as exc:
            self.problem(exc.kind, str(exc))
            return
        if published:
            now = time.perf_counter()
            self.stats.served(now - paired_at, wait=started - paired_at, process=now - started)

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
                                   extra={"lifecycle_state": self.lifecycle_state,
                                          "parameter_rejections": self.params.rejected, **self.diagnostic_values()})
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics_pub.publish(msg)
