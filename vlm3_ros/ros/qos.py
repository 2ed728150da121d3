"""QoS profiles from parameter values, and input subscriptions that follow them.

Input reliability defaults to ``best_available`` (rclpy Iron and later): the subscription
matches best-effort and reliable publishers alike, and receives reliably from reliable ones.
Humble's rclpy has no such policy. There an :class:`InputSubscription` asks the graph for the
publishers of its topic and takes their reliability: reliable when every publisher is reliable,
best-effort when any is best-effort (a reliable subscription would get nothing from it). With no
publisher yet it subscribes best-effort, which matches whichever comes, and decides again when the
first publisher appears (:meth:`InputSubscription.recheck`). Best-effort alone is not a good
default: camera-sized images between processes were measured to be lost entirely over
best-effort Fast DDS while reliable delivery received all of them (docs/ROS.md, QoS).

Outputs default to reliable (RViz and most subscribers ask for reliable).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

__all__ = ["RELIABILITY_NAMES", "HAS_BEST_AVAILABLE", "SMALL_MESSAGE_DEPTH", "InputSubscription", "latched_qos",
           "matched_reliability", "reliability_policy", "stream_qos"]

RELIABILITY_NAMES = ("best_available", "reliable", "best_effort", "system_default")
#: Queue depth of small input messages (CameraInfo, reference poses): a process busy with inference
#: can fall behind taking them from DDS for a few frames (measured here with a depth of 5); they
#: cost nothing to keep and an image cannot be served without its CameraInfo.
SMALL_MESSAGE_DEPTH = 10
#: rclpy has ReliabilityPolicy.BEST_AVAILABLE (Iron and later). Read at call time, so a test can
#: switch it off to run the Humble behaviour.
HAS_BEST_AVAILABLE = hasattr(ReliabilityPolicy, "BEST_AVAILABLE")


def reliability_policy(name: str) -> ReliabilityPolicy:
    """The policy for a parameter value (one of :data:`RELIABILITY_NAMES`).

    ``best_available`` without the policy (Humble) gives best-effort here, what a subscription
    without publishers to match uses; :class:`InputSubscription` matches the publishers instead.
    """
    if name == "best_available":
        return ReliabilityPolicy.BEST_AVAILABLE if HAS_BEST_AVAILABLE else ReliabilityPolicy.BEST_EFFORT
    if name == "reliable":
        return ReliabilityPolicy.RELIABLE
    if name == "best_effort":
        return ReliabilityPolicy.BEST_EFFORT
    if name == "system_default":
        return ReliabilityPolicy.SYSTEM_DEFAULT
    raise ValueError(f"unknown reliability {name!r}; expected one of {RELIABILITY_NAMES}")


def matched_reliability(publishers: Sequence[ReliabilityPolicy]) -> Optional[ReliabilityPolicy]:
    """The reliability a subscription takes to match ``publishers`` (their reliabilities).

    Reliable when there are publishers and every one is reliable; best-effort when any is
    best-effort (a reliable subscription does not match it); None when there is none to match.
    """
    if not publishers:
        return None
    if all(p == ReliabilityPolicy.RELIABLE for p in publishers):
        return ReliabilityPolicy.RELIABLE
    return ReliabilityPolicy.BEST_EFFORT


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


class InputSubscription:
    """One input subscription of a node, opened and closed with the node's activation.

    ``reliability`` is a parameter value (:data:`RELIABILITY_NAMES`). ``best_available`` where rclpy
    lacks the policy takes the reliability of the topic's publishers when opened (see the module
    docstring); :attr:`matching` stays True while no publisher has been seen, and :meth:`recheck`
    subscribes again once the first one appears.
    """

    def __init__(self, node: Any, msg_type: Any, topic: str, callback: Callable[[Any], None], reliability: str,
                 depth: int, callback_group: Any = None) -> None:
        self.node = node
        self.msg_type = msg_type
        self.topic = topic
        self.callback = callback
        self.reliability = reliability
        self.depth = depth
        self.callback_group = callback_group
        self.subscription: Any = None
        self.matching = False

    @property
    def resolved_topic(self) -> str:
        """The topic name after namespace expansion and remapping."""
        return self.node.resolve_topic_name(self.topic)

    def _profile(self) -> QoSProfile:
        profile = stream_qos(self.reliability, self.depth)
        self.matching = False
        if self.reliability == "best_available" and not HAS_BEST_AVAILABLE:
            found = self.node.get_publishers_info_by_topic(self.resolved_topic)
            policy = matched_reliability([info.qos_profile.reliability for info in found])
            if policy is None:
                self.matching = True  # best-effort matches whichever publisher comes; decided again then
            else:
                profile.reliability = policy
        return profile

    @property
    def policy(self) -> Optional[ReliabilityPolicy]:
        """The reliability of the open subscription (None when closed)."""
        return None if self.subscription is None else self.subscription.qos_profile.reliability

    def open(self) -> None:
        if self.subscription is None:
            self.subscription = self.node.create_subscription(self.msg_type, self.topic, self.callback,
                                                              self._profile(), callback_group=self.callback_group)

    def close(self) -> None:
        if self.subscription is not None:
            self.node.destroy_subscription(self.subscription)
            self.subscription = None
        self.matching = False

    def recheck(self) -> bool:
        """While matching: once the topic has a publisher, subscribe again with its reliability.

        Returns True when the subscription was replaced.
        """
        if self.subscription is None or not self.matching:
            return False
        if self.node.count_publishers(self.resolved_topic) == 0:
            return False
        profile = self._profile()
        if profile.reliability == self.subscription.qos_profile.reliability:
            return False
        self.node.destroy_subscription(self.subscription)
        self.subscription = self.node.create_subscription(self.msg_type, self.topic, self.callback, profile,
                                                          callback_group=self.callback_group)
        return True
