"""Launch the vlm3_ros depth and odometry nodes (ROS 2 Humble, Jazzy and later).

    ros2 launch vlm3_ros perception.launch.py model:=/path/to/checkpoint image:=/camera/image_raw

Arguments: params_file (default: the package's config/perception.yaml), model, backend,
image, camera_info, reference_depth, reference_pose (topics remapped onto the nodes' inputs),
namespace, use_sim_time, detections (a vision_msgs/Detection2DArray topic: when set, the object
node is started too and subscribes it). `vlm3-ros perception` runs the same nodes with the same parameter file
and topic arguments in one process, for installs without `ros2 launch`.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "vlm3_ros"
#: parameter file, relative to the package share directory
PARAMS_FILE = "config/perception.yaml"
#: (executable, node name): console scripts of setup.py
NODES = (
    ("depth_node", "depth_node"),
    ("odometry_node", "odometry_node"),
    ("object_node", "object_node"),  # only with detections:=<topic>
)
#: launch argument -> default topic, remapped onto the node-relative topic of the same name
TOPICS = {
    "image": "/camera/image_raw",
    "camera_info": "/camera/camera_info",
    "reference_depth": "/camera/depth/image_raw",
    "reference_pose": "/ground_truth/pose",
}
#: other launch arguments: name -> (default, description)
ARGUMENTS = {
    "model": ("", "Checkpoint directory or hub id (overrides the model parameter when set)"),
    "backend": ("", "transformers or oracle (overrides the backend parameter when set)"),
    "namespace": ("", "Namespace of both nodes"),
    "use_sim_time": ("false", "Use /clock (bag playback)"),
    "detections": ("", "vision_msgs/Detection2DArray topic; when set, object_node is started and subscribes it"),
}


def _nodes(context, *args, **kwargs):
    params_file = LaunchConfiguration("params_file").perform(context)
    overrides = {"use_sim_time": LaunchConfiguration("use_sim_time").perform(context).lower() in ("true", "1")}
    for name in ("model", "backend"):
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = value
    remappings = [(topic, LaunchConfiguration(topic).perform(context)) for topic in TOPICS]
    namespace = LaunchConfiguration("namespace").perform(context)
    detections = LaunchConfiguration("detections").perform(context)
    if detections:
        remappings.append(("detections", detections))
    return [
        Node(
            package=PACKAGE,
            executable=executable,
            name=name,
            namespace=namespace,
            parameters=[params_file, overrides],
            remappings=remappings,
            output="screen",
            emulate_tty=True,
        )
        for executable, name in NODES
        if name != "object_node" or detections
    ]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory(PACKAGE), PARAMS_FILE)
    arguments = [DeclareLaunchArgument("params_file", default_value=default_params,
                                       description="ROS parameter YAML of both nodes")]
    arguments += [DeclareLaunchArgument(topic, default_value=default, description=f"Topic for the nodes' {topic}")
                  for topic, default in TOPICS.items()]
    arguments += [DeclareLaunchArgument(name, default_value=default, description=description)
                  for name, (default, description) in ARGUMENTS.items()]
    return LaunchDescription(arguments + [OpaqueFunction(function=_nodes)])
