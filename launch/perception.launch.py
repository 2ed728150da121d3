"""Launch the vlm3_ros depth and odometry nodes (ROS 2 Humble, Jazzy and later).

    ros2 launch vlm3_ros perception.launch.py model:=/path/to/checkpoint image:=/camera/image_raw

Arguments: params_file (default: the package's config/perception.yaml), model, backend,
server_url (the backend server's base URL), image, camera_info, reference_depth, reference_pose
(topics remapped onto the nodes' inputs; relative names resolve in the namespace), namespace,
use_sim_time, managed, autostart, rviz, detections.

* ``managed:=true`` starts the nodes as lifecycle nodes waiting, unconfigured, for a manager;
  with ``autostart:=true`` (the default) this launch file configures and activates them through
  their lifecycle services. ``autostart:=false`` leaves that to another manager (Nav2's
  lifecycle_manager, ``ros2 lifecycle set``).
* ``rviz:=true`` also starts RViz with the package's rviz/perception.rviz (its topics moved into
  the namespace).
* ``detections:=<topic>`` (a vision_msgs/Detection2DArray topic) also starts the object node,
  subscribed to it.
* A node that exits with an error (a model that does not load, bad parameters), or a managed node
  that fails to configure under ``autostart``, ends the launch with a non-zero status.

`vlm3-ros perception` runs the same nodes with the same parameter file and topic arguments in one
process, for installs without `ros2 launch`.
"""

import os
import tempfile

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

PACKAGE = "vlm3_ros"
#: parameter file and RViz configuration, relative to the package share directory
PARAMS_FILE = "config/perception.yaml"
RVIZ_FILE = "rviz/perception.rviz"
#: (executable, node name): console scripts of setup.py
NODES = (
    ("depth_node", "depth_node"),
    ("odometry_node", "odometry_node"),
    ("object_node", "object_node"),  # only with detections:=<topic>
)
#: launch argument -> default topic (relative: it moves with the namespace), remapped onto the
#: node-relative topic of the same name
TOPICS = {
    "image": "camera/image_raw",
    "camera_info": "camera/camera_info",
    "reference_depth": "camera/depth/image_raw",
    "reference_pose": "ground_truth/pose",
}
#: other launch arguments: name -> (default, description)
ARGUMENTS = {
    "model": ("", "Checkpoint directory or hub id (overrides the model parameter when set)"),
    "backend": ("", "transformers, server or oracle (overrides the backend parameter when set)"),
    "server_url": ("", "Base URL of the OpenAI-compatible server for backend server (overrides server.url when set)"),
    "namespace": ("", "Namespace of both nodes"),
    "use_sim_time": ("false", "Use /clock (bag playback)"),
    "managed": ("false", "Run the nodes as managed lifecycle nodes (they wait unconfigured for a manager)"),
    "autostart": ("true", "With managed:=true, configure and activate the nodes from this launch file"),
    "rviz": ("false", "Also start RViz with the package's configuration"),
    "detections": ("", "vision_msgs/Detection2DArray topic; when set, object_node is started and subscribes it"),
}


def _flag(context, name):
    return LaunchConfiguration(name).perform(context).strip().lower() in ("true", "1", "yes")


def _exit_failed(event, context):
    """A node process ended with an error: end the launch with a non-zero status (raising is how
    a launch file does that; launch reports the message and shuts the other processes down)."""
    if event.returncode != 0 and not context.is_shutdown:
        raise RuntimeError(f"{event.action.name} exited with status {event.returncode} (its output above says why)")


def _autostart(node):
    """Events configuring then activating a lifecycle node; a failed configure ends the launch."""
    def change(transition_id):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node), transition_id=transition_id))

    def configure_failed(context, *args, **kwargs):
        raise RuntimeError(f"{node.node_name} failed to configure (its output above says why)")

    return [
        RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, start_state="configuring",
                                               goal_state="inactive",
                                               entities=[change(Transition.TRANSITION_ACTIVATE)])),
        RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, start_state="configuring",
                                               goal_state="unconfigured",
                                               entities=[OpaqueFunction(function=configure_failed)])),
        change(Transition.TRANSITION_CONFIGURE),
    ]


def namespaced_rviz_config(path, namespace):
    """The RViz configuration at ``path`` with its display topics moved under ``namespace`` (a new
    file; /tf and /tf_static stay global); ``path`` itself without a namespace."""
    namespace = namespace.strip("/")
    if not namespace:
        return path
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)

    def move(displays):
        for display in displays:
            move(display.get("Displays", []))
            topic = display.get("Topic")
            if isinstance(topic, dict) and topic.get("Value", "").startswith("/") \
                    and topic["Value"] not in ("/tf", "/tf_static"):
                topic["Value"] = f"/{namespace}{topic['Value']}"

    move(config["Visualization Manager"]["Displays"])
    handle, out = tempfile.mkstemp(prefix=f"{PACKAGE}-{namespace.replace('/', '_')}-", suffix=".rviz")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        yaml.safe_dump(config, stream, sort_keys=False)
    return out


def _nodes(context, *args, **kwargs):
    params_file = LaunchConfiguration("params_file").perform(context)
    managed = _flag(context, "managed")
    overrides = {"use_sim_time": _flag(context, "use_sim_time"), "managed": managed}
    for name, parameter in (("model", "model"), ("backend", "backend"), ("server_url", "server.url")):
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[parameter] = value
    remappings = [(topic, LaunchConfiguration(topic).perform(context)) for topic in TOPICS]
    namespace = LaunchConfiguration("namespace").perform(context)
    detections = LaunchConfiguration("detections").perform(context)
    if detections:
        remappings.append(("detections", detections))
    actions = []
    for executable, name in NODES:
        if name == "object_node" and not detections:
            continue
        node = (LifecycleNode if managed else Node)(
            package=PACKAGE,
            executable=executable,
            name=name,
            namespace=namespace,
            parameters=[params_file, overrides],
            remappings=remappings,
            output="screen",
            emulate_tty=True,
        )
        actions += [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_exit_failed))]
        if managed and _flag(context, "autostart"):
            actions += _autostart(node)
    if _flag(context, "rviz"):
        config = os.path.join(get_package_share_directory(PACKAGE), RVIZ_FILE)
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", namespace=namespace,
                            arguments=["-d", namespaced_rviz_config(config, namespace)],
                            parameters=[{"use_sim_time": overrides["use_sim_time"]}], output="screen"))
    return actions


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory(PACKAGE), PARAMS_FILE)
    arguments = [DeclareLaunchArgument("params_file", default_value=default_params,
                                       description="ROS parameter YAML of both nodes")]
    arguments += [DeclareLaunchArgument(topic, default_value=default, description=f"Topic for the nodes' {topic}")
                  for topic, default in TOPICS.items()]
    arguments += [DeclareLaunchArgument(name, default_value=default, description=description)
                  for name, (default, description) in ARGUMENTS.items()]
    return LaunchDescription(arguments + [OpaqueFunction(function=_nodes)])
