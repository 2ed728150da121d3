"""vlm3_train: turn recorded (or synthetic) RGB-D data into VLM3 training samples, fine-tune and evaluate.

Subpackages and modules:

* :mod:`vlm3_train.synthetic`: ray-cast synthetic scenes with exact depth and poses.
* :mod:`vlm3_train.convert`: rosbag2 bags -> a VLM3 dataset on disk.
* :mod:`vlm3_train.cli`: the ``vlm3-train`` command.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
