"""Build script for the vlm3_ros ament_python package (also installable with pip)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "vlm3_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: ["py.typed"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
    ],
    python_requires=">=3.10,<3.13",
    install_requires=[
        "setuptools",
        "numpy>=1.24",
        "scipy>=1.10",
        # With the contrib modules (cv2.ximgproc: the edge-aware smoother of the depth completion).
        # Never together with opencv-python(-headless): both install the cv2 package.
        "opencv-contrib-python-headless>=4.8",
        "pyyaml>=6",
        "pillow>=10",
        "rosbags>=0.10",
        "tqdm>=4.60",
        "httpx>=0.27",  # the server backend's HTTP client
    ],
    extras_require={
        # The in-process model backend. torch is deliberately not pinned here: the environment
        # script installs the right build for the machine (or keeps the one already present).
        "model": ["torch>=2.6", "transformers>=5.4", "peft>=0.17", "accelerate>=1.0", "safetensors"],
        "test": ["pytest>=8", "hypothesis>=6.100"],
    },
    zip_safe=True,
    maintainer="vlm3_ros maintainers",
    maintainer_email="maintainers@vlm3-ros.dev",
    description="A vision-language model as a metric 3D sensor for ROS 2 (VLM3 protocol).",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "vlm3-ros = vlm3_ros.cli.main:main",
            "depth_node = vlm3_ros.ros.depth_node:main",
            "odometry_node = vlm3_ros.ros.odometry_node:main",
            "object_node = vlm3_ros.ros.object_node:main",
        ],
    },
)
