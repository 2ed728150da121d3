"""The DDS environment of the project's ROS processes: Fast DDS set up for camera-sized messages
between processes on one machine, and the environment of a child process on a private domain.

Fast DDS (the default middleware) sends to local processes through a shared-memory segment of
512 KiB per participant. A camera frame is larger (640 x 480 rgb8 is 0.9 MB, its depth image
0.6 MB): samples that do not fit are lost and recovered by the reliability protocol one or more
messages later. Measured here at 10 Hz (image, camera_info and depth from one process): camera_info
arrived up to 0.9 s late (p95 0.71 s) and images p95 0.17 s late; with 16 MiB segments in the
publishing process, p95 11 ms for all three (BENCHMARKS.md). A late camera_info delays its frame,
and several frames then pair at once, so a node serves fewer of them.

:func:`use_large_shared_memory` points Fast DDS at a profile with 16 MiB segments (and the usual
UDPv4 transport for other machines) unless the user configured Fast DDS already or runs another
middleware. The sending side is what matters: the nodes (their depth images are 1.2 MB), ``vlm3-ros
play`` and the benchmarks call it before rclpy starts; a camera driver in another process needs
the same profile (``FASTDDS_DEFAULT_PROFILES_FILE``, see docs/ROS.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Dict, Optional

__all__ = ["PROFILE_XML", "SEGMENT_BYTES", "child_environment", "stop_child", "use_large_shared_memory"]

SEGMENT_BYTES = 16 * 1024 * 1024

PROFILE_XML = f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- vlm3_ros: Fast DDS shared-memory segments large enough for camera images (see vlm3_ros/ros/dds.py). -->
<profiles xmlns="http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles">
  <transport_descriptors>
    <transport_descriptor>
      <transport_id>vlm3_shm</transport_id>
      <type>SHM</type>
      <segment_size>{SEGMENT_BYTES}</segment_size>
    </transport_descriptor>
    <transport_descriptor>
      <transport_id>vlm3_udp</transport_id>
      <type>UDPv4</type>
    </transport_descriptor>
  </transport_descriptors>
  <participant profile_name="vlm3_large_shared_memory" is_default_profile="true">
    <rtps>
      <userTransports>
        <transport_id>vlm3_shm</transport_id>
        <transport_id>vlm3_udp</transport_id>
      </userTransports>
      <useBuiltinTransports>false</useBuiltinTransports>
    </rtps>
  </participant>
</profiles>
"""

#: Set by the user, these mean Fast DDS is configured already: nothing is changed.
_USER_SETTINGS = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_BUILTIN_TRANSPORTS")


def use_large_shared_memory() -> Optional[Path]:
    """Make this process (and its children) use the large-segment profile; returns its path, or None
    when Fast DDS is configured by the user or another middleware is selected. Call before rclpy.init."""
    if any(os.environ.get(name) for name in _USER_SETTINGS):
        return None
    if os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") not in ("", "rmw_fastrtps_cpp"):
        return None
    from ..paths import cache_dir, write_atomic

    path = cache_dir("dds") / "fastdds_large_shared_memory.xml"
    try:
        if not path.is_file() or path.read_text() != PROFILE_XML:
            write_atomic(path, PROFILE_XML)
    except OSError:
        return None  # a read-only cache: keep the defaults rather than fail
    os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(path)
    return path


def child_environment(domain_id: int) -> Dict[str, str]:
    """This process's environment for a child joining ROS domain ``domain_id`` on this machine only."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    # The PyPI ROS wheels re-execute each interpreter once to set its library path and mark it in
    # this variable; a child must set up its own.
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    return env


def stop_child(proc: "subprocess.Popen", timeout: float) -> Optional[int]:
    """Stop a child ROS process as Ctrl-C would (SIGINT: its nodes finish the frame in progress and
    shut down cleanly), killing it after ``timeout`` seconds. Returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
