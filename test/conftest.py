"""pytest configuration shared by all tests.

ROS 2 fixtures live in ``ros_helpers.py`` (documented there) and are registered here:
``ros_domain_id`` (a test-unique domain with loopback-only discovery) and ``ros`` (an rclpy
context, executor and node factory that are shut down after the test). ``server_helpers.py``
holds the fixtures of the tests against a real vLLM server.
"""

from ros_helpers import ros, ros_domain_id  # noqa: F401  (fixtures registered by import)
from model_helpers import tiny_backend, tiny_checkpoint  # noqa: F401,E402  (fixtures registered by import)
from data_helpers import sevenscenes  # noqa: F401,E402  (fixtures registered by import)
from colcon_helpers import colcon_install, colcon_symlink_install, colcon_toolchain  # noqa: F401,E402  (fixtures)
from server_helpers import default_checkpoint, default_engine, vllm_server  # noqa: F401,E402  (fixtures registered by import)
