"""Launch the vlm3_ros depth and odometry nodes (ROS 2 Humble, Jazzy and later).

    ros2 launch vlm3_ros perception.launch.py model:=/path/to/checkpoint image:=/camera/image_raw

Arguments: params_file (default: the package's config/perception.yaml), model, backend,
server_url (backend server), image, camera_info, reference_depth, reference_pose (topics remapped onto the nodes' inputs),
namespace, use_sim_time. `vlm3-ros perception` runs the same nodes with the same parameter file
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
    "backend": ("", "transformers, server or oracle (overrides the backend parameter when set)"),
    "server_url": ("", "Base URL of the OpenAI-compatible server for backend server (overrides server.url when set)"),
    "namespace": ("", "Namespace of both nodes"),
    "use_sim_time": ("false", "Use /clock (bag playback)"),
}


def _nodes(context, *args, **kwargs):
    params_file = LaunchConfiguration("params_file").perform(context)
    overrides = {"use_sim_time": LaunchConfiguration("use_sim_time").perform(context).lower() in ("true", "1")}
    for name, parameter in (("model", "model"), ("backend", "backend"), ("server_url", "server.url")):
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[parameter] = value
    remappings = [(topic, LaunchConfiguration(topic).perform(context)) for topic in TOPICS]
    namespace = LaunchConfiguration("namespace").perform(context)
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
