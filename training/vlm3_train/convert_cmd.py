"""``vlm3-train convert``: rosbag2 RGB-D recordings -> a VLM3 training dataset."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "turn rosbag2 recordings (image, camera info, depth or LiDAR, poses) into a VLM3 training dataset"

#: Files that can be a recording by themselves (a rosbag2 storage file without its directory).
BAG_FILE_SUFFIXES = (".mcap", ".db3")


def split_bag_inputs(paths):
    """``(bags, others)``: the inputs that can be recordings (directories, ``.mcap`` / ``.db3``
    files, paths that do not exist: those fail with their own error) and the other files, which a
    shell pattern picks up next to bags (``data/synth/scene_*`` matches ``scene_000.json`` too)."""
    from pathlib import Path

    bags, others = [], []
    for path in paths:
        is_other = Path(path).is_file() and Path(path).suffix.lower() not in BAG_FILE_SUFFIXES
        (others if is_other else bags).append(path)
    return bags, others


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _tasks(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _transform(text: str):
    import numpy as np
    from scipy.spatial.transform import Rotation

    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'x y z qx qy qz qw', got {text!r}") from None
    if len(values) != 7 or not np.isfinite(values).all() or np.linalg.norm(values[3:]) < 1e-9:
        raise argparse.ArgumentTypeError(f"expected 'x y z qx qy qz qw' (7 finite numbers), got {text!r}")
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat(values[3:]).as_matrix()
    T[:3, 3] = values[:3]
    return T


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vlm3_ros.bags import TOPICS

    parser.add_argument("bags", nargs="+", metavar="BAG",
                        help="rosbag2 directories (sqlite3 or mcap) or their .db3 / .mcap files; other files are "
                             "skipped with a notice (a pattern like data/synth/scene_* also matches scene_000.json)")
    parser.add_argument("out", metavar="OUT", help="dataset directory to create (written atomically)")
    parser.add_argument("--tasks", type=_tasks, default=("depth", "correspondence", "pose"),
                        help="comma-separated tasks: depth, correspondence, pose, object (default: depth, correspondence, "
                             "pose; object needs a Detection2DArray topic, --detections-topic)")
    parser.add_argument("--points-per-image", type=int, default=10, help="depth questions per image (default 10)")
    parser.add_argument("--points-per-pair", type=int, default=10,
                        help="correspondence questions per frame pair (default 10)")
    parser.add_argument("--protocol", choices=("vlm3", "compact"), default="vlm3",
                        help="task specs to label with: vlm3 (the released checkpoints' protocol, default) or compact "
                             "(short questions, numbers-only answers: for checkpoints trained by this package); "
                             "--spec-file overrides either")
    parser.add_argument("--spec-file", default=None,
                        help="protocol JSON (or a directory with vlm3_protocol.json) giving task specs; "
                             "default: the built-in VLM3 specs")
    parser.add_argument("--correspondence-gaps", type=_int_list, default=(2, 5),
                        help="frame gaps of correspondence pairs (default 2,5)")
    parser.add_argument("--pose-gaps", type=_int_list, default=(3, 8), help="frame gaps of pose pairs (default 3,8)")
    parser.add_argument("--frame-stride", type=int, default=1, help="use every n-th frame (default 1)")
    parser.add_argument("--max-pairs-per-frame", type=int, default=0,
                        help="at most this many pairs per task ending at one frame (default 0: no cap)")
    parser.add_argument("--margin", type=float, default=0.03,
                        help="border margin as a fraction of the prepared image size (default 0.03)")
    parser.add_argument("--min-depth", type=float, default=0.1, help="smallest depth label in metres (default 0.1)")
    parser.add_argument("--max-depth", type=float, default=80.0, help="largest depth label in metres (default 80)")
    parser.add_argument("--occlusion-tolerance", type=float, default=0.05,
                        help="relative depth tolerance of the occlusion check (default 0.05)")
    parser.add_argument("--min-covisibility", type=float, default=0.25,
                        help="pose pairs need this covisibility (default 0.25)")
    topics = parser.add_argument_group("topics and frames")
    topics.add_argument("--image-topic", default=TOPICS["image"],
                        help=f"colour image topic, sensor_msgs/Image (default {TOPICS['image']})")
    topics.add_argument("--camera-info-topic", default=TOPICS["camera_info"],
                        help=f"sensor_msgs/CameraInfo topic of the image (default {TOPICS['camera_info']})")
    topics.add_argument("--depth-topic", default=TOPICS["depth"],
                        help=f"depth image topic, 16UC1 mm or 32FC1 m (default {TOPICS['depth']})")
    topics.add_argument("--pose-topic", default=TOPICS["pose"],
                        help=f"PoseStamped / Odometry / TransformStamped topic (default {TOPICS['pose']})")
    topics.add_argument("--cloud-topic", default=None,
                        help="take depth from this PointCloud2 topic (projected into the camera) instead of a depth image")
    topics.add_argument("--lidar-extrinsic", type=_transform, default=None, metavar="'X Y Z QX QY QZ QW'",
                        help="pose of the cloud's frame in the camera optical frame (default: looked up in TF)")
    topics.add_argument("--pose-source", choices=("auto", "topic", "tf", "none"), default="auto",
                        help="camera poses from the pose topic, from TF, or none (default auto: the topic if present, else TF)")
    topics.add_argument("--camera-frame", default=None, help="camera optical frame in TF (default: CameraInfo frame_id)")
    topics.add_argument("--world-frame", default=None, help="fixed frame of TF poses (default: root of the TF tree)")
    topics.add_argument("--pose-child-frame", default=None,
                        help="frame the pose topic describes when not the camera (composed with TF to the camera)")
    topics.add_argument("--tolerance-ms", type=float, default=10.0,
                        help="stamp pairing tolerance in milliseconds (default 10)")
    obj = parser.add_argument_group("object task (--tasks object)")
    obj.add_argument("--detections-topic", default="/detections",
                     help="vision_msgs/Detection2DArray topic of the 2D detections, paired with the images by stamp "
                          "(default /detections)")
    obj.add_argument("--objects-per-image", type=int, default=6,
                     help="at most this many detections per frame, highest score first (default 6)")
    obj.add_argument("--object-relations", type=int, default=8,
                     help="questions about two objects per frame (distances, left of, behind, bigger...; default 8)")
    obj.add_argument("--object-questions", type=_tasks, default=(),
                     help="comma-separated question ids or short names (width, height, distance, left, behind, "
                          "bigger...; default: all of the object spec's)")
    split = parser.add_argument_group("split")
    split.add_argument("--split", choices=("none", "frame", "bag"), default="none",
                       help="validation split: the last frames of each bag, or the last bags (default none)")
    split.add_argument("--val-fraction", type=float, default=0.1, help="validation fraction (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from vlm3_ros.bags import BagError

    from .convert import ConvertError, ConvertOptions, convert_bags, load_specs

    bags, others = split_bag_inputs(args.bags)
    if others:
        if not bags:
            print(f"vlm3-train convert: no rosbag2 recording among the inputs ({', '.join(others)} are files, "
                  "not bags)", file=sys.stderr)
            return 2
        print(f"vlm3-train convert: skipping {', '.join(others)}: not rosbag2 recordings", file=sys.stderr)
    try:
        specs = load_specs(args.spec_file, args.tasks, base=args.protocol)
        options = ConvertOptions(
            tasks=args.tasks, specs=specs, points_per_image=args.points_per_image,
            points_per_pair=args.points_per_pair, correspondence_gaps=args.correspondence_gaps,
            pose_gaps=args.pose_gaps, frame_stride=args.frame_stride, margin=args.margin,
            min_depth=args.min_depth, max_depth=args.max_depth, occlusion_tolerance=args.occlusion_tolerance,
            min_covisibility=args.min_covisibility, max_pairs_per_frame=args.max_pairs_per_frame,
            topics={"image": args.image_topic, "camera_info": args.camera_info_topic, "depth": args.depth_topic,
                    "pose": args.pose_topic, "detections": args.detections_topic},
            cloud_topic=args.cloud_topic, lidar_extrinsic=args.lidar_extrinsic, pose_source=args.pose_source,
            camera_frame=args.camera_frame, world_frame=args.world_frame, pose_child_frame=args.pose_child_frame,
            tolerance_ns=int(round(args.tolerance_ms * 1e6)), split=args.split, val_fraction=args.val_fraction,
            seed=args.seed, objects_per_image=args.objects_per_image, object_relations=args.object_relations,
            object_questions=args.object_questions,
        )
        arguments = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in vars(args).items() if not k.startswith("_")}
        result = convert_bags(bags, args.out, options, overwrite=args.overwrite, progress=not args.quiet,
                              arguments=arguments)
    except (ConvertError, BagError) as exc:
        print(f"vlm3-train convert: {exc}", file=sys.stderr)
        return 2
    s = result.summary
    print(json.dumps({"dataset": str(result.path), "frames_read": s["frames_read"], "samples": s["samples"],
                      "samples_by_split": s["samples_by_split"], "skipped": s["skipped"]}, indent=2))
    return 0
