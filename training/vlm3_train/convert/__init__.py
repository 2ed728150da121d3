"""rosbag2 RGB-D recordings (or in-memory frame sequences) -> VLM3 training samples, the dataset
format of the training package.

Input: bags (sqlite3 or mcap, read with :mod:`vlm3_ros.bags`) holding ``sensor_msgs/Image`` +
``CameraInfo``, ground-truth depth from a depth image topic (``16UC1`` millimetres or ``32FC1``
metres) **or** from a LiDAR ``PointCloud2`` projected into the camera through a TF extrinsic
(``/tf_static`` or a given transform; z-buffered: the nearest point per pixel), and camera poses
from a ``PoseStamped`` / ``Odometry`` / ``TransformStamped`` topic or from TF. Messages are paired
by header stamp within a tolerance.

One module per concern:

* :mod:`.options`: :class:`ConvertOptions` (validated up front) and the task specs;
* :mod:`.tf_buffer`: the recording's TF tree, for extrinsics and poses at any stamp;
* :mod:`.bag_frames`: frames of one bag with depth and pose from the bag's sources;
* :mod:`.targets`: questions, answers and numeric targets per task, in the prepared images;
* :mod:`.object_targets` / :mod:`.bag_detections`: the object task's questions from 2D
  detections (a bag's Detection2DArray topic, or detections given with in-memory frames);
* :mod:`.samples`: which frames and pairs make samples, the dataset rows, skip counts;
* :mod:`.writer`: the dataset directory (``data/``, ``vlm3_protocol.json``, ``summary.json``),
  written atomically.

Lens-aware projection comes from :mod:`vlm3_ros.camera`, rigid-transform maths from
:mod:`vlm3_ros.geometry`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from vlm3_ros.camera import normalized_rays, project_cloud, project_points

from .bag_frames import BagFrames
from .options import DEFAULT_TASKS, DETECTIONS_TOPIC, TASK_NAMES, ConvertError, ConvertOptions, load_specs
from .samples import PAIR_TASKS, Stats, frame_rows
from .targets import correspondence_targets, covisibility, depth_targets, pose_targets
from .tf_buffer import TfBuffer
from .writer import DATASET_COLUMNS, ConvertResult, dataset_features, write_dataset

__all__ = [
    "ConvertError",
    "ConvertOptions",
    "ConvertResult",
    "DATASET_COLUMNS",
    "DEFAULT_TASKS",
    "DETECTIONS_TOPIC",
    "TASK_NAMES",
    "TfBuffer",
    "convert_bags",
    "convert_frames",
    "iter_samples",
    "correspondence_targets",
    "covisibility",
    "dataset_features",
    "depth_targets",
    "load_specs",
    "normalized_rays",
    "pose_targets",
    "project_cloud",
    "project_points",
]

FrameLike = Any  # (stamp_ns, rgb, intrinsics, depth_m, T_w_c), e.g. vlm3_ros.bags.RgbdFrame


def _source_splits(sources: Sequence[Any], options: ConvertOptions) -> List[Optional[str]]:
    if options.split != "bag":
        return [None] * len(sources)
    if len(sources) < 2:
        raise ConvertError("a split by bag needs at least two bags (sources)")
    n_val = min(len(sources) - 1, max(1, int(round(len(sources) * options.val_fraction))))
    return ["train"] * (len(sources) - n_val) + ["val"] * n_val


def _bag_rows(bag_index: int, bag: Path, split_of_bag: Optional[str], options: ConvertOptions, stats: Stats,
              bag_summaries: List[Dict[str, Any]], progress: bool) -> Iterator[Dict[str, Any]]:
    pair_tasks = [t for t in PAIR_TASKS if t in options.tasks]
    frames = BagFrames(bag, options, stats.skip, needs_pose=bool(pair_tasks))
    if pair_tasks and frames.pose_source == "none":
        stats.skip("bags_without_poses", f"{bag}: no pose topic or TF; {', '.join(pair_tasks)} samples skipped")
    if frames.depth_source == "none":
        stats.skip("bags_without_depth", f"{bag}: no depth topic {frames.topics.get('depth') or ''} or cloud; "
                   "nothing to label")
    yield from frame_rows(frames, len(frames), str(bag), bag.name, bag_index, split_of_bag, options, stats,
                          progress, poses_expected=frames.pose_source != "none")
    bag_summaries.append(frames.summary())


def _frame_tuples(frames: Iterable[FrameLike]) -> Iterator[Any]:
    return ((int(f[0]), f[1], f[2], f[3], f[4], f[5] if len(f) > 5 else None) for f in frames)


def convert_bags(bags: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                 options: Optional[ConvertOptions] = None, *, overwrite: bool = False,
                 progress: bool = True, arguments: Optional[Mapping[str, Any]] = None) -> ConvertResult:
    """Convert bags into a dataset directory ``out`` (see :mod:`.writer`), atomically.

    Raises :class:`ConvertError` (or :class:`vlm3_ros.bags.BagError`) for unusable options or
    inputs, and when no sample at all could be made; nothing is left at ``out`` then.
    """
    options = (options or ConvertOptions()).validate()
    paths = [Path(b) for b in bags]
    if not paths:
        raise ConvertError("no bags given")
    for path in paths:
        if not path.exists():
            raise ConvertError(f"bag {path} does not exist")
    splits = _source_splits(paths, options)

    def rows(stats: Stats, summaries: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for index, (path, split) in enumerate(zip(paths, splits)):
            yield from _bag_rows(index, path, split, options, stats, summaries, progress)

    return write_dataset(out, options, rows, [str(p) for p in paths], overwrite=overwrite, arguments=arguments)


def iter_samples(frames: Iterable[FrameLike], options: Optional[ConvertOptions] = None, *,
                 source: str = "memory", total: Optional[int] = None, source_index: int = 0,
                 stats: Optional[Any] = None) -> Iterator[Dict[str, Any]]:
    """Dataset rows (the columns of :data:`DATASET_COLUMNS`; images as PNG ``{"bytes", "path"}``)
    made from in-memory frames, without a bag: each frame is ``(stamp_ns, rgb, intrinsics,
    depth_m, T_w_c)`` (a :class:`vlm3_ros.bags.RgbdFrame` or any 5-tuple in that order; depth z
    in metres with NaN invalid, or None; ``T_w_c`` camera-to-world or None), optionally with a
    sixth item, the frame's 2D detections (:class:`vlm3_ros.detections.Detection`) for the
    object task.
    """
    options = (options or ConvertOptions()).validate()
    yield from frame_rows(_frame_tuples(frames), total, source, source, source_index, None, options,
                          stats if stats is not None else Stats(), progress=False)


def convert_frames(sources: Mapping[str, Sequence[FrameLike]], out: str | os.PathLike[str],
                   options: Optional[ConvertOptions] = None, *, overwrite: bool = False, progress: bool = True,
                   arguments: Optional[Mapping[str, Any]] = None) -> ConvertResult:
    """Like :func:`convert_bags` for in-memory frame sequences (source name -> frames; see
    :func:`iter_samples`), e.g. :meth:`vlm3_train.synthetic.SyntheticSequence.rgbd_frames`."""
    options = (options or ConvertOptions()).validate()
    if not sources:
        raise ConvertError("no frame sequences given")
    names = list(sources)
    splits = _source_splits(names, options)

    def rows(stats: Stats, summaries: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for index, (name, split) in enumerate(zip(names, splits)):
            frames = sources[name]
            total = len(frames) if hasattr(frames, "__len__") else None
            yield from frame_rows(_frame_tuples(frames), total, name, name, index, split, options, stats, progress)
            summaries.append({"path": name, "frames": total})

    return write_dataset(out, options, rows, names, overwrite=overwrite, arguments=arguments)
