"""QoS profiles from parameter values.

Input reliability defaults to ``best_available`` (rclpy Iron and later): the subscription
matches best-effort and reliable publishers alike, and receives reliably from reliable ones.
Older rclpy has no such policy; ``best_available`` then falls back to best-effort, which every
publisher matches. Outputs default to reliable (RViz and most subscribers ask for reliable).
"""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

__all__ = ["RELIABILITY_NAMES", "HAS_BEST_AVAILABLE", "SMALL_MESSAGE_DEPTH", "reliability_policy", "stream_qos",
           "latched_qos"]

RELIABILITY_NAMES = ("best_available", "reliable", "best_effort", "system_default")
#: Queue depth of small input messages (CameraInfo, reference poses): a process busy with inference
#: can fall behind taking them from DDS for a few frames (measured here with a depth of 5); they
#: cost nothing to keep and an image cannot be served without its CameraInfo.
SMALL_MESSAGE_DEPTH = 10
HAS_BEST_AVAILABLE = hasattr(ReliabilityPolicy, "BEST_AVAILABLE")


def reliability_policy(name: str) -> ReliabilityPolicy:
    """The policy for a parameter value (one of :data:`RELIABILITY_NAMES`)."""
    if name == "best_available":
        return ReliabilityPolicy.BEST_AVAILABLE if HAS_BEST_AVAILABLE else ReliabilityPolicy.BEST_EFFORT
    if name == "reliable":
        return ReliabilityPolicy.RELIABLE
    if name == "best_effort":
        return ReliabilityPolicy.BEST_EFFORT
    if name == "system_default":
        return ReliabilityPolicy.SYSTEM_DEFAULT
    raise ValueError(f"unknown reliability {name!r}; expected one of {RELIABILITY_NAMES}")


def stream_qos(reliability: str, depth: int) -> QoSProfile:
    """Keep-last ``depth``, volatile, with the named reliability (sensor streams and outputs)."""
    if depth < 1:
        raise ValueError(f"QoS depth must be >= 1, got {depth}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth), reliability=reliability_policy(reliability),
                      durability=DurabilityPolicy.VOLATILE)


def latched_qos(depth: int = 1) -> QoSProfile:
    """Reliable, transient-local (late joiners get the last message): /tf_static."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
