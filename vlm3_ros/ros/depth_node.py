"""The depth node: camera image + CameraInfo -> sparse metric depth as a cloud and a depth image.

Subscribes (input QoS, paired by stamp):

* ``image`` (sensor_msgs/Image: rgb8, bgr8, rgba8, bgra8, mono8, mono16) or ``image/compressed``
  (sensor_msgs/CompressedImage) with ``compressed_input``;
* ``camera_info`` (sensor_msgs/CameraInfo);
* ``reference_depth`` (sensor_msgs/Image 16UC1 mm or 32FC1 m, aligned with the image) with
  ``backend: oracle``: the ground truth the oracle answers from.

Publishes (output QoS; stamp = the image's, frame_id = the CameraInfo's):

* ``points`` (sensor_msgs/PointCloud2): float32 x, y, z (metres, optical frame) and u, v (the
  original-image pixel each answer refers to), optional packed rgb;
* ``depth/sparse`` (sensor_msgs/Image 32FC1): metres along z at the answered pixels, NaN elsewhere
  (REP-118), in the original image's geometry;
* ``depth/camera_info``: the CameraInfo of that depth image;
* with ``dense.enabled``: ``depth/dense`` (sensor_msgs/Image 32FC1): the answers completed into
  metres along z at every pixel, guided by the image, NaN where the completion's confidence is
  below ``dense.min_confidence`` (REP-118: unknown; never +-Inf), with ``depth/dense/camera_info``;
* with ``dense.cloud``: ``points_dense`` (sensor_msgs/PointCloud2 x, y, z): the kept pixels of
  that depth, every ``dense.cloud_step``-th in each direction;
* ``/diagnostics``.

With a dense output on, ``dense.adaptive_share`` of the ``query_count`` questions are asked in a
second round about the same image where the first round's completion is least certain; the
sparse outputs then hold both rounds' answers.

The maths lives in :class:`vlm3_ros.pipeline.DepthEstimator` (focal unification, text
coordinates, answers -> 3D, both rounds), :mod:`vlm3_ros.completion` (dense depth, confidence,
second-round pixels) and :func:`vlm3_ros.odometry.select_query_pixels`.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Dict, Optional, Sequence

import numpy as np
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from .. import geometry
from ..camera import CameraError
from ..completion import AdaptiveConfig
from ..engine import Backend
from ..odometry import select_query_pixels
from ..pipeline import DenseResult, DepthEstimator, dense_rounds, is_parse_failure
from . import backends as backend_cache
from .conversions import FrameRejected, cloud_msg, header, image_msg
from .node_base import PerceptionNode
from .params import DEPTH_NODE_PARAMS

__all__ = ["DepthNode", "main"]


class DepthNode(PerceptionNode):
    """Sparse metric depth from a VLM3 backend (see the module docstring).

    ``backend``: an already created backend to use instead of the one the parameters name.
    Other keyword arguments go to ``rclpy.node.Node`` (``context``, ``namespace``,
    ``parameter_overrides``, ``cli_args``...).
    """

    def __init__(self, node_name: str = "depth_node", *, backend: Optional[Backend] = None, **node_kwargs: Any) -> None:
        self._given_backend = backend
        self.backend: Optional[Backend] = None
        self._estimator: Optional[DepthEstimator] = None
        self._estimator_key: Any = None
        self._dense_stats: Dict[str, Any] = {}
        super().__init__(node_name, DEPTH_NODE_PARAMS, **node_kwargs)
        if self.params["backend"] == "oracle":
            self.subscribe_stream(Image, "reference_depth", "reference_depth")
        self.points_pub = self.create_publisher(PointCloud2, "points", self.output_qos)
        self.depth_pub = self.create_publisher(Image, "depth/sparse", self.output_qos)
        self.depth_info_pub = self.create_publisher(CameraInfo, "depth/camera_info", self.output_qos)
        self.dense_pub = self.create_publisher(Image, "depth/dense", self.output_qos)
        self.dense_info_pub = self.create_publisher(CameraInfo, "depth/dense/camera_info", self.output_qos)
        self.dense_points_pub = self.create_publisher(PointCloud2, "points_dense", self.output_qos)
        self.start()

    def extra_streams(self, values: Dict[str, Any]) -> Sequence[str]:
        return ("reference_depth",) if values["backend"] == "oracle" else ()

    def diagnostic_values(self) -> Dict[str, Any]:
        """The backend's connection state (server backend) and the last dense frame: questions per
        round and the share of pixels kept in depth/dense."""
        return {**backend_cache.health_values({"depth": self.backend}), **self._dense_stats}

    def backend_description(self) -> str:
        return backend_cache.settings_from_params(self.params.snapshot()).describe()

    def setup(self) -> None:
        if self._given_backend is not None:
            self.backend = self._given_backend
        else:
            self.backend = backend_cache.shared_backend(backend_cache.settings_from_params(self.params.snapshot()))
        # fails early, naming the tasks served, if the model has no depth task (a server still down: at the first frame)
        backend_cache.check_task(self.backend, "depth", self.get_logger())
        self.get_logger().info(f"depth backend ready: {self.backend.describe()}")

    def teardown(self) -> None:
        if self.backend is not None and self.backend is not self._given_backend:
            backend_cache.release(self.backend)
        self.backend = None
        self._estimator = self._estimator_key = None

    def _depth_estimator(self, values: Dict[str, Any]) -> DepthEstimator:
        key = (values["depth_kind"], values["max_new_tokens"], values["max_depth"])
        if self._estimator is None or key != self._estimator_key:
            spec = self.depth_spec(self.backend, values["depth_kind"])
            self._estimator = DepthEstimator(self.backend, spec=spec, max_new_tokens=values["max_new_tokens"],
                                             max_depth=values["max_depth"])
            self._estimator_key = key
        return self._estimator

    def process(self, messages: Dict[str, Any]) -> bool:
        values = self.params.snapshot()
        image, info = messages["image"], messages["camera_info"]
        rgb, intrinsics = self.decode_frame(messages, values)
        height, width = rgb.shape[:2]
        self.require_optical_frame(info)
        reference = self.reference_depth(messages, width, height, values["max_depth"])
        estimator = self._depth_estimator(values)
        dense_on = values["dense.enabled"] or values["dense.cloud"]
        total = values["query_count"]
        first, second = dense_rounds(total, values["dense.adaptive_share"]) if dense_on else (total, 0)
        uv = select_query_pixels(rgb, first, values["query_margin"], values["query_method"])
        dense: Optional[DenseResult] = None
        try:
            if dense_on:
                adaptive = AdaptiveConfig(margin=values["query_margin"], lower_band=values["dense.lower_band_weight"])
                dense = estimator.estimate_dense(rgb, intrinsics, uv, second_round=max(0, total - len(uv)) if second else 0,
                                                 reference_depth=reference, adaptive=adaptive)
                result = dense.sparse
            else:
                result = estimator.estimate(rgb, intrinsics, uv, reference_depth=reference)
        except CameraError as exc:
            raise FrameRejected("bad_camera_info", f"the depth task cannot prepare this camera: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a model failure must not end the node
            raise FrameRejected(backend_cache.failure_kind(exc), f"{type(exc).__name__}: {exc}") from None
        if result.response is not None:
            self.stats.backend_time(result.response.timings.get("total", float("nan")))
        failures = result.parse_failures
        asked = len(result.uv_query)
        first_error = next((e for e in result.errors if is_parse_failure(e)), None)
        self.stats.parse_failed(failures, first_error)
        self.stats.unreferenced(result.no_reference)
        valid = result.valid
        if not valid.any():
            reason = f"none of {asked} answers could be used" + (f" ({failures} unparseable, e.g. {first_error})"
                                                                   if failures else "")
            self.problem("no_valid_answers", reason, skipped=not values["publish_empty"])
            if not values["publish_empty"]:
                return False
        elif failures and self.throttle.ready("parse_failures"):
            self.get_logger().warning(f"parse_failures: {failures} of {asked} answers unparseable, e.g. {first_error}")
        hdr = header(image.header.stamp, info.header.frame_id)
        points, uv_ref = result.points[valid], result.uv[valid]
        colours = None
        if values["publish_rgb"]:
            colours = geometry.sample_nearest(rgb, uv_ref, fill=0).astype(np.uint8).reshape(-1, 3)
        cloud = cloud_msg({"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "u": uv_ref[:, 0],
                           "v": uv_ref[:, 1]}, hdr, rgb=colours)
        depth = image_msg(result.depth_image(width, height), "32FC1", hdr)
        depth_info = copy.deepcopy(info)
        depth_info.header = hdr
        self.points_pub.publish(cloud)
        self.depth_pub.publish(depth)
        self.depth_info_pub.publish(depth_info)
        if dense is not None:
            self._publish_dense(dense, values, hdr, depth_info)
        return True

    def _publish_dense(self, dense: DenseResult, values: Dict[str, Any], hdr: Any, info: CameraInfo) -> None:
        """depth/dense (+ camera info) and points_dense, as the dense.* parameters say."""
        threshold = values["dense.min_confidence"]
        kept = dense.dense.masked(threshold)
        self._dense_stats = {"dense_questions": f"{dense.first_round}+{dense.second_round}",
                             "dense_kept": round(float(np.isfinite(kept).mean()), 4)}
        if values["dense.enabled"]:
            self.dense_pub.publish(image_msg(kept, "32FC1", hdr))
            self.dense_info_pub.publish(info)
        if values["dense.cloud"]:
            points, _ = dense.points(step=values["dense.cloud_step"], min_confidence=threshold)
            self.dense_points_pub.publish(cloud_msg({"x": points[:, 0], "y": points[:, 1], "z": points[:, 2]}, hdr))


def main(args: Optional[Sequence[str]] = None) -> int:
    """Run the depth node alone (console script ``depth_node``)."""
    from .runner import run_nodes

    return run_nodes([DepthNode], args=sys.argv if args is None else list(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
