"""``vlm3-ros perception``: the depth and odometry nodes in one process (no ``ros2 launch`` needed).

The same nodes, parameter file and topic arguments as ``launch/perception.launch.py``::

    vlm3-ros perception --params-file config/perception.yaml --model /path/to/checkpoint \\
        --image /camera/image_raw --camera-info /camera/camera_info [--ros-args ...]

Both nodes share one loaded checkpoint where their model parameters name the same one. Topic
options become remappings (``--image X`` is ``-r image:=X`` for both nodes); anything after
``--ros-args`` is passed to ROS unchanged (``-p name:=value``, ``-r from:=to``,
``--params-file``...). ``--managed`` starts them as lifecycle nodes waiting for a manager;
``--autostart`` then configures and activates them (the launch file's ``managed`` and
``autostart`` arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

HELP = "Run the depth and odometry nodes in one process."

#: node name -> (console script, "module:class"), as in launch/perception.launch.py
NODES: Dict[str, tuple] = {
    "depth_node": ("depth_node", "vlm3_ros.ros.depth_node:DepthNode"),
    "odometry_node": ("odometry_node", "vlm3_ros.ros.odometry_node:OdometryNode"),
    "object_node": ("object_node", "vlm3_ros.ros.object_node:ObjectNode"),  # with --detections
}
#: the nodes run when --nodes is not given (the object node joins them with --detections)
DEFAULT_NODES = ("depth_node", "odometry_node")

#: launch argument / option -> (node-relative topic it remaps, default target; relative targets
#: resolve in the namespace)
TOPICS: Dict[str, tuple] = {
    "image": ("image", "camera/image_raw"),
    "camera_info": ("camera_info", "camera/camera_info"),
    "reference_depth": ("reference_depth", "camera/depth/image_raw"),
    "reference_pose": ("reference_pose", "ground_truth/pose"),
}

#: the parameter file the launch file uses by default (share/vlm3_ros/config/perception.yaml)
PARAMS_FILE = "config/perception.yaml"


def default_params_file() -> str:
    """config/perception.yaml of a source checkout or of the installed package share, if found."""
    here = Path(__file__).resolve()
    # a source checkout, then the data files of a pip install (setup.py installs them under the prefix)
    candidates = [here.parents[2] / PARAMS_FILE, Path(sys.prefix) / "share" / "vlm3_ros" / PARAMS_FILE]
    try:
        from ament_index_python.packages import get_package_share_directory  # type: ignore[import-not-found]

        candidates.append(Path(get_package_share_directory("vlm3_ros")) / PARAMS_FILE)
    except Exception:  # noqa: BLE001 - no ament index (pip install)
        pass
    for path in candidates:
        if path.is_file():
            return str(path)
    return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params-file", default=None,
                        help=f"ROS parameter YAML (default: {PARAMS_FILE} of the package, if found)")
    parser.add_argument("--model", default="", help="checkpoint directory or hub id (sets the model parameter)")
    parser.add_argument("--backend", choices=("transformers", "server", "oracle"), default=None,
                        help="sets the backend parameter of both nodes")
    parser.add_argument("--server-url", default="", metavar="URL",
                        help="sets server.url of both nodes (backend server: an OpenAI-compatible vLLM / SGLang server)")
    for name, (_, default) in TOPICS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default,
                            help=f"topic remapped to the nodes' {name} (default {default})")
    parser.add_argument("--namespace", default="", help="namespace of both nodes")
    parser.add_argument("--use-sim-time", action="store_true", help="use /clock (bag playback)")
    parser.add_argument("--managed", action="store_true",
                        help="run managed lifecycle nodes: they wait, unconfigured, for a lifecycle manager")
    parser.add_argument("--autostart", action="store_true",
                        help="with --managed: configure and activate the nodes through their lifecycle")
    parser.add_argument("--detections", default="",
                        help="vision_msgs/Detection2DArray topic: also run the object node on it")
    parser.add_argument("--nodes", default=",".join(DEFAULT_NODES),
                        help="comma-separated nodes to run (default: both)")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=[],
                        help="ROS arguments passed through unchanged (must come last)")


def ros_arguments(args: argparse.Namespace) -> List[str]:
    """The rclpy argument list equivalent to the launch file with these options."""
    out = ["vlm3-ros", "--ros-args"]
    params_file = args.params_file if args.params_file is not None else default_params_file()
    if params_file:
        out += ["--params-file", str(params_file)]
    if args.model:
        out += ["-p", f"model:={args.model}"]
    if args.backend:
        out += ["-p", f"backend:={args.backend}"]
    if getattr(args, "server_url", ""):
        out += ["-p", f"server.url:={args.server_url}"]
    out += ["-p", f"use_sim_time:={'true' if args.use_sim_time else 'false'}"]
    out += ["-p", f"managed:={'true' if args.managed else 'false'}"]
    for name, (topic, _) in TOPICS.items():
        out += ["-r", f"{topic}:={getattr(args, name)}"]
    if args.detections:
        out += ["-r", f"detections:={args.detections}"]
    if args.namespace:
        out += ["-r", f"__ns:={args.namespace if args.namespace.startswith('/') else '/' + args.namespace}"]
    extra = list(args.ros_args or [])
    if extra and extra[0] == "--ros-args":
        extra = extra[1:]
    return out + extra


def run(args: argparse.Namespace) -> int:
    import importlib

    from ..ros.runner import run_nodes

    names = [n.strip() for n in args.nodes.split(",") if n.strip()]
    if args.detections and "object_node" not in names:
        names.append("object_node")
    unknown = [n for n in names if n not in NODES]
    if unknown or not names:
        print(f"error: unknown node(s) {unknown}; choose from {', '.join(NODES)}")
        return 2
    factories = []
    for name in names:
        module_name, class_name = NODES[name][1].split(":")
        factories.append(getattr(importlib.import_module(module_name), class_name))
    return run_nodes(factories, args=ros_arguments(args), duration=args.duration, autostart=args.autostart)
