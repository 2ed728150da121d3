"""This package built with colcon, and the ros2 command line, for tests of the installed package.

``scripts/setup_env.py`` (step "launch") builds the toolchain: colcon in a venv of its own
(``.ros2/colcon``) and an underlay of the ROS packages ``ros2 launch`` / ``ros2 run`` need that
PyPI does not have, from the unmodified upstream sources in ``../shared/vendor``
(``.ros2/underlay/install``). ``.ros2/toolchain.json`` describes it, or says why there is none.

Fixtures (session scope, registered through ``test/conftest.py``):

``colcon_toolchain``
    That description; tests skip with its reason where there is none (no ``../shared/vendor``).
``colcon_install`` / ``colcon_symlink_install``
    A :class:`Workspace` where ``colcon build --packages-select vlm3_ros`` (plain, and
    ``--symlink-install``) built this checkout into a temporary folder, with the underlay
    sourced, as a user builds it in a ROS workspace.

Commands run in a clean environment (the venv's tools, ``source install/setup.bash``, a
test-unique ``ROS_DOMAIN_ID`` on loopback, uncoloured logs in the workspace).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLCHAIN_FILE = REPO / ".ros2" / "toolchain.json"
#: bash: source a setup script ($1), then run the rest of the arguments in its place
SOURCED = 'source "$1" && shift && exec "$@"'


def read_toolchain() -> Dict[str, Any]:
    """The toolchain description written by setup_env (``reason`` set where there is none)."""
    try:
        return json.loads(TOOLCHAIN_FILE.read_text())
    except (OSError, ValueError):
        return {"reason": f"{TOOLCHAIN_FILE} is missing: run `make env` (scripts/setup_env.py)"}


def base_env(domain_id: Optional[int] = None, log_dir: Optional[Path] = None) -> Dict[str, str]:
    """A clean environment: the venv's tools first on PATH, nothing of the test process's ROS setup."""
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
           "HOME": os.environ.get("HOME", "/root"), "PYTHONUNBUFFERED": "1", "RCUTILS_COLORIZED_OUTPUT": "0",
           "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    for name in ("LANG", "LC_ALL", "TMPDIR", "HF_HOME", "VLM3_CACHE"):
        if name in os.environ:
            env[name] = os.environ[name]
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    if log_dir is not None:
        env["ROS_LOG_DIR"] = str(log_dir)
    return env


class Workspace:
    """A colcon workspace holding this package (``install/``), and commands run with it sourced."""

    def __init__(self, root: Path, symlink: bool) -> None:
        self.root = root
        self.install = root / "install"
        self.symlink = symlink

    def command(self, *args: Any) -> List[str]:
        return ["bash", "-c", SOURCED, "bash", str(self.install / "setup.bash"), *map(str, args)]

    def env(self, domain_id: Optional[int] = None) -> Dict[str, str]:
        return base_env(domain_id, self.root / "ros_log")

    def run(self, *args: Any, domain_id: Optional[int] = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a command to its end (stdout and stderr together in ``.stdout``)."""
        return subprocess.run(self.command(*args), env=self.env(domain_id), cwd=self.root, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def start(self, *args: Any, domain_id: int) -> subprocess.Popen:
        """Start a command (its own process group, so that nothing it starts outlives the test)."""
        return subprocess.Popen(self.command(*args), env=self.env(domain_id), cwd=self.root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop(process: subprocess.Popen, timeout: float = 30.0) -> Tuple[int, str]:
    """SIGINT to the process group (what Ctrl-C in a terminal does) and wait; the group is killed if it
    does not end in time."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"{process.args[5:]} did not stop on SIGINT:\n{out[-4000:]}")
    return process.returncode, out


def wait_exit(process: subprocess.Popen, timeout: float) -> Tuple[Optional[int], str]:
    """Wait for a command to end by itself; (None, output so far) if it did not (it is then stopped)."""
    try:
        out, _ = process.communicate(timeout=timeout)
        return process.returncode, out
    except subprocess.TimeoutExpired:
        return None, stop(process)[1]


def build_workspace(root: Path, toolchain: Dict[str, Any], symlink: bool) -> Workspace:
    """``colcon build --packages-select vlm3_ros`` of this checkout into ``root``."""
    command = [toolchain["colcon"], "--log-base", root / "log", "build", "--base-paths", REPO,
               "--packages-select", "vlm3_ros", "--build-base", root / "build", "--install-base", root / "install",
               "--event-handlers", "console_direct-"] + (["--symlink-install"] if symlink else [])
    env = base_env()
    if toolchain.get("distutils_cfg"):
        env["DIST_EXTRA_CONFIG"] = toolchain["distutils_cfg"]  # installed scripts run with the venv's python
    if toolchain.get("underlay"):
        command = ["bash", "-c", SOURCED, "bash", str(Path(toolchain["underlay"]) / "setup.bash"), *command]
    else:  # a sourced ROS 2 installation: keep its environment
        env = {**os.environ, **{k: v for k, v in env.items() if k != "PATH"}}
    done = subprocess.run([str(c) for c in command], env=env, cwd=root, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"colcon build failed ({done.returncode}):\n{done.stdout[-4000:]}")
    return Workspace(root, symlink)


@pytest.fixture(scope="session")
def colcon_toolchain() -> Dict[str, Any]:
    toolchain = read_toolchain()
    if toolchain.get("reason"):
        pytest.skip(f"no ros2 launch toolchain: {toolchain['reason']}")
    return toolchain


@pytest.fixture(scope="session")
def colcon_install(colcon_toolchain, tmp_path_factory) -> Workspace:
    return build_workspace(tmp_path_factory.mktemp("colcon_ws"), colcon_toolchain, symlink=False)


@pytest.fixture(scope="session")
def colcon_symlink_install(colcon_toolchain, tmp_path_factory) -> Workspace:
    return build_workspace(tmp_path_factory.mktemp("colcon_ws_symlink"), colcon_toolchain, symlink=True)
