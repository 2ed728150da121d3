"""vlm3_ros: a vision-language model as a metric 3D sensor for ROS 2."""

__version__ = "0.1.0"
