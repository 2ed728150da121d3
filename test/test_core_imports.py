"""The core is pure Python: importing it (and the engine package) never imports rclpy or ROS messages."""

import subprocess
import sys

CORE = [
    "vlm3_ros",
    "vlm3_ros.protocol",
    "vlm3_ros.camera",
    "vlm3_ros.geometry",
    "vlm3_ros.metrics",
    "vlm3_ros.pipeline",
    "vlm3_ros.completion",
    "vlm3_ros.dense_eval",
    "vlm3_ros.msg_codec",
    "vlm3_ros.detections",
    "vlm3_ros.engine",
    "vlm3_ros.engine.transformers_backend",
    "vlm3_ros.engine.shared_prefix",
    "vlm3_ros.datasets.sevenscenes",
    "vlm3_ros.cli.main",
]


def test_core_does_not_import_ros():
    code = (
        "import sys, importlib\n"
        f"for name in {CORE!r}: importlib.import_module(name)\n"
        "ros = sorted(m for m in sys.modules if m.split('.')[0] in ('rclpy', 'sensor_msgs', 'geometry_msgs', "
        "'nav_msgs', 'std_msgs', 'tf2_ros', 'tf2_msgs', 'cv_bridge', 'rosidl_runtime_py', 'vision_msgs'))\n"
        "print(','.join(ros))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported ROS modules: {out.stdout.strip()}"


def test_engine_package_import_is_light():
    code = "import sys, vlm3_ros.engine, vlm3_ros.pipeline; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
