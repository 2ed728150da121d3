"""package.xml declares every ROS package the code, the launch file and the tests use, and nothing else.

The imports (and ROS interface type names such as "rosgraph_msgs/msg/Clock", which code resolves at run
time) of vlm3_ros/, launch/ and the tests are read with ast and compared with package.xml: a ROS package
used at run time must be an exec_depend (or depend), one used only by the tests a test_depend, and
every declared ROS package must be used. Python libraries that are not ROS packages are declared by
their rosdep key (python3-*) or named in the package.xml comment on what pip installs.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Iterable, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGE_XML = REPO / "package.xml"

#: Python modules that are not ROS packages -> their rosdep key in package.xml
ROSDEP_KEYS = {"numpy": "python3-numpy", "scipy": "python3-scipy", "cv2": "python3-opencv",
               "yaml": "python3-yaml", "PIL": "python3-pil", "tqdm": "python3-tqdm",
               "pytest": "python3-pytest", "hypothesis": "python3-hypothesis",
               "httpx": "python3-httpx"}
#: Python modules installed with pip (no rosdep key), each named in package.xml's comment
PIP_ONLY = {"torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "huggingface_hub",
            "rosbags", "matplotlib", "datasets"}
#: this repository's own modules
PROJECT = {"vlm3_ros", "vlm3_train"}
INTERFACE_NAME = re.compile(r"^([a-z][a-z0-9_]*)/(msg|srv|action)/[A-Z][A-Za-z0-9]*$")


def used_modules(paths: Iterable[Path], type_names: bool = True) -> Set[str]:
    """Top-level modules imported by the files, plus (``type_names``) packages named by ROS interface
    type strings."""
    used: Set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                used.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                used.add(node.module.split(".")[0])
            elif type_names and isinstance(node, ast.Constant) and isinstance(node.value, str):
                match = INTERFACE_NAME.match(node.value)
                if match:
                    used.add(match.group(1))
    return used


def launched_packages(path: Path) -> Set[str]:
    """Packages whose executables a launch file starts (``package="..."`` literals)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords
            if kw.arg == "package" and isinstance(kw.value, ast.Constant)}


def declared() -> Dict[str, Set[str]]:
    root = ET.parse(PACKAGE_XML).getroot()
    out: Dict[str, Set[str]] = {"exec": set(), "test": set()}
    for element in root:
        if element.tag in ("depend", "exec_depend"):
            out["exec"].add(element.text.strip())
        elif element.tag == "test_depend":
            out["test"].add(element.text.strip())
    return out


def ros_packages(modules: Set[str], local: Set[str]) -> Set[str]:
    """The modules that are neither the standard library, this project, test helpers nor plain
    Python libraries (the tables above): ROS packages, declared by their own name."""
    return {m for m in modules if m not in sys.stdlib_module_names and m not in PROJECT and m not in local
            and m not in ROSDEP_KEYS and m not in PIP_ONLY and m != "__future__"}


def test_package_xml_declares_what_the_code_and_tests_use():
    code = sorted((REPO / "vlm3_ros").rglob("*.py")) + sorted((REPO / "launch").glob("*.py"))
    tests = sorted((REPO / "test").rglob("*.py")) + sorted((REPO / "training" / "tests").rglob("*.py"))
    local = {p.stem for p in tests}  # test helper modules import each other
    # Tests make up interface types of their own (in bags); their ROS use is what they import.
    run_time, test_time = used_modules(code), used_modules(tests, type_names=False)
    deps = declared()
    ros_run = ros_packages(run_time, local) | launched_packages(REPO / "launch" / "perception.launch.py")
    ros_test = ros_packages(test_time, local) - ros_run
    assert not ros_run - deps["exec"], f"used at run time but not exec_depend: {sorted(ros_run - deps['exec'])}"
    assert not ros_test - deps["exec"] - deps["test"], \
        f"used by the tests but not declared: {sorted(ros_test - deps['exec'] - deps['test'])}"
    python_keys = {ROSDEP_KEYS[m] for m in run_time if m in ROSDEP_KEYS}
    assert not python_keys - deps["exec"], f"missing rosdep keys: {sorted(python_keys - deps['exec'])}"
    test_keys = {ROSDEP_KEYS[m] for m in test_time if m in ROSDEP_KEYS} - python_keys
    assert not test_keys - deps["test"] - deps["exec"], f"missing test rosdep keys: {sorted(test_keys)}"
    # Nothing declared that nothing uses.
    declared_ros = {d for d in deps["exec"] | deps["test"] if not d.startswith("python3-")}
    assert declared_ros - ros_run - ros_test == set(), f"declared but unused: {sorted(declared_ros - ros_run - ros_test)}"
    # pip-only libraries are named where package.xml says what pip installs.
    text = PACKAGE_XML.read_text(encoding="utf-8")
    comment = next(c for c in re.findall(r"<!--(.*?)-->", text, re.S) if "pip" in c)
    pip_used = {m for m in run_time if m in PIP_ONLY}
    assert {m for m in pip_used if not re.search(rf"\b{m}\b", comment)} == set()


def test_ros_names_in_package_xml_are_ament_packages_where_installed(monkeypatch):
    """Each ROS package declared and importable here is registered in the ament index (so the table of
    plain Python libraries above cannot hide a ROS package, nor a pip library pass as one)."""
    import importlib.util
    import os

    # The ROS 2 wheels register their packages in the environment's prefix (a ROS installation sets this).
    monkeypatch.setenv("AMENT_PREFIX_PATH", os.environ.get("AMENT_PREFIX_PATH") or sys.prefix)
    from ament_index_python.packages import get_packages_with_prefixes

    index = set(get_packages_with_prefixes())
    deps = declared()
    for name in sorted(d for d in deps["exec"] | deps["test"] if not d.startswith("python3-")):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin not in (None, "namespace"):  # not a bare folder such as launch/
            assert name in index, f"{name} is importable but not an ament package"
    for module in ROSDEP_KEYS.keys() | PIP_ONLY:
        assert module not in index, f"{module} is a ROS package: declare it by name"


def test_package_xml_matches_setup_py():
    root = ET.parse(PACKAGE_XML).getroot()
    assert root.get("format") == "3" and root.findtext("name") == "vlm3_ros"
    setup = (REPO / "setup.py").read_text()
    assert f'version="{root.findtext("version")}"' in setup
    assert root.find("export/build_type").text == "ament_python"
