"""The object node: camera image + 2D detections -> metric 3D objects (vision_msgs/Detection3DArray).

Subscribes (input QoS, paired by stamp):

* ``image`` (or ``image/compressed``) and ``camera_info`` as the depth node;
* ``detections`` (vision_msgs/Detection2DArray) from any 2D detector, stamped like the image;
* ``reference_depth`` (16UC1 mm or 32FC1 m, aligned with the image) with ``backend: oracle``.

Publishes (output QoS; stamp = the image's, frame_id = the CameraInfo's, the optical frame):

* ``objects`` (vision_msgs/Detection3DArray): per measured detection, the 3D box (centre on the
  ray through the 2D box centre, size = answered width and height and the depth range of the
  answers inside the box), the 2D detection's id and class hypotheses (score carried over, pose =
  the 3D centre);
* ``objects/markers`` (visualization_msgs/MarkerArray, when subscribed): boxes and labels;
* ``/diagnostics``.

The questions, answers and geometry live in :class:`vlm3_ros.object_query.ObjectQuery`.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

from sensor_msgs.msg import Image
from vision_msgs.msg import Detection2DArray, Detection3DArray
from visualization_msgs.msg import MarkerArray

from ..camera import CameraError
from ..engine import Backend, EngineError
from ..object_query import ObjectQuery
from . import backends as backend_cache
from .conversions import FrameRejected, header
from .detections import detection3d_array, detections_from_msg, object_markers
from .node_base import PerceptionNode
from .params import OBJECT_NODE_PARAMS

__all__ = ["ObjectNode", "main"]

#: which model parameter serves each task ("" falls back to ``model``)
TASK_MODELS = {"object": "model", "depth": "depth_model"}


class ObjectNode(PerceptionNode):
    """3D objects from 2D detections and a VLM3 backend (see the module docstring).

    ``backend``: an already created backend serving both tasks, used instead of the ones the
    parameters name. Other keyword arguments go to ``rclpy.node.Node``.
    """

    def __init__(self, node_name: str = "object_node", *, backend: Optional[Backend] = None, **node_kwargs: Any) -> None:
        self._given_backend = backend
        self._backends: Dict[str, Backend] = {}
        self._query: Optional[ObjectQuery] = None
        self._query_key: Any = None
        self.objects_published = 0
        self.objects_unmeasured = 0
        self.detections_dropped = 0
        super().__init__(node_name, OBJECT_NODE_PARAMS, **node_kwargs)
        self.subscribe_stream(Detection2DArray, "detections", "detections", small=True)
        if self.params["backend"] == "oracle":
            self.subscribe_stream(Image, "reference_depth", "reference_depth")
        self.objects_pub = self.create_publisher(Detection3DArray, "objects", self.output_qos)
        self.marker_pub = self.create_publisher(MarkerArray, "objects/markers", self.output_qos)
        self.start()

    def extra_streams(self, values: Dict[str, Any]) -> Sequence[str]:
        return ("detections",) + (("reference_depth",) if values["backend"] == "oracle" else ())

    def backend_description(self) -> str:
        values = self.params.snapshot()
        if self._given_backend is not None or values["backend"] == "oracle":
            return str(getattr(self._given_backend, "name", "oracle"))
        return ", ".join(f"{task}={values[p] or values['model']}" for task, p in TASK_MODELS.items())

    def diagnostic_values(self) -> Dict[str, Any]:
        return {"objects_published": self.objects_published, "objects_unmeasured": self.objects_unmeasured,
                "detections_dropped": self.detections_dropped,
                **backend_cache.health_values({**self._backends, "given": self._given_backend})}

    # -- backends (worker thread) -----------------------------------------------------------------

    def _backend(self, task: str) -> Backend:
        if self._given_backend is not None:
            return self._given_backend
        if task not in self._backends:
            values = self.params.snapshot()
            settings = backend_cache.settings_from_params(values, model=values[TASK_MODELS[task]] or None)
            backend = backend_cache.shared_backend(settings)
            backend_cache.check_task(backend, task, self.get_logger())  # fails early, naming the tasks served
            self._backends[task] = backend
        return self._backends[task]

    def setup(self) -> None:
        for task in TASK_MODELS:
            self._backend(task)
        try:
            self._object_query(self.params.snapshot())  # fails early for an object spec without these questions
        except EngineError as exc:
            if backend_cache.failure_kind(exc, "") == "":
                raise
            # A server still down or starting: the node starts, counts its frames under the fault's kind.
            self.get_logger().warning(f"{backend_cache.failure_kind(exc)}: {exc}; serving once the server answers")
        self.get_logger().info(f"object backends ready ({self.backend_description()})")

    def teardown(self) -> None:
        for backend in self._backends.values():  # one reference taken per task by _backend()
            backend_cache.release(backend)
        self._backends.clear()
        self._query = self._query_key = None

    def _object_query(self, values: Dict[str, Any]) -> ObjectQuery:
        key = tuple(values[k] for k in ("depth_kind", "depth_grid", "depth_inner", "max_new_tokens"))
        if self._query is None or key != self._query_key:
            depth_backend = self._backend("depth")
            depth_spec = self.depth_spec(depth_backend, values["depth_kind"])
            self._query = ObjectQuery(self._backend("object"), depth_backend=depth_backend, depth_spec=depth_spec,
                                      max_new_tokens=values["max_new_tokens"], depth_grid=values["depth_grid"],
                                      depth_inner=values["depth_inner"])
            self._query_key = key
        return self._query

    # -- per frame ------------------------------------------------------------------------------

    def process(self, messages: Dict[str, Any]) -> bool:
        values = self.params.snapshot()
        image, info = messages["image"], messages["camera_info"]
        rgb, intrinsics = self.decode_frame(messages, values)
        height, width = rgb.shape[:2]
        self.require_optical_frame(info)
        detections, bad = detections_from_msg(messages["detections"])
        for reason in bad:
            self.problem("bad_detection", reason, skipped=False)
        detections = [d for d in detections if d.score >= values["min_score"]]
        detections.sort(key=lambda d: -d.score)
        if len(detections) > values["max_objects"]:
            dropped = len(detections) - values["max_objects"]
            self.detections_dropped += dropped
            self.problem("too_many_detections", f"{dropped} detection(s) beyond max_objects = "
                         f"{values['max_objects']} dropped (lowest scores)", skipped=False)
            detections = detections[: values["max_objects"]]
        reference = self.reference_depth(messages, width, height, values["max_depth"])
        measured = []
        if detections:
            try:
                result = self._object_query(values).query(rgb, intrinsics, [d.box for d in detections],
                                                           reference_depth=reference)
            except CameraError as exc:
                raise FrameRejected("bad_camera_info", f"the object task cannot prepare this camera: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - a model failure must not end the node
                raise FrameRejected(backend_cache.failure_kind(exc), f"{type(exc).__name__}: {exc}") from None
            self.stats.parse_failed(result.parse_failures, result.first_error)
            for det, est in zip(detections, result.objects):
                if est.valid:
                    measured.append((det, est))
                else:
                    self.objects_unmeasured += 1
                    self.problem("object_unmeasured", f"{det.label} ({det.id or 'no id'}): "
                                 + "; ".join(est.errors), skipped=False)
        if not measured and not values["publish_empty"]:
            return False
        hdr = header(image.header.stamp, info.header.frame_id)
        self.objects_pub.publish(detection3d_array(measured, hdr))
        self.objects_published += len(measured)
        if values["publish_markers"] and self.marker_pub.get_subscription_count() > 0:
            self.marker_pub.publish(object_markers(measured, hdr))
        return True


def main(args: Optional[Sequence[str]] = None) -> int:
    """Run the object node alone (console script ``object_node``)."""
    from .runner import run_nodes

    return run_nodes([ObjectNode], args=sys.argv if args is None else list(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
