"""``vlm3-ros play BAG``: publish a rosbag2 recording with rclpy at its own timing.

Messages are published as stored (their CDR bytes, checked once per topic against the rclpy
message type named in the bag), at the bag's log times scaled by ``--rate``, with ``/clock``
(rosgraph_msgs/Clock) following the bag time so nodes with ``use_sim_time`` run on it. Topics
whose type is not installed here (for example tf2_msgs in a plain rclpy install) are skipped with
a warning naming them.

With ``--loop`` the bag plays again from its start (``/clock`` jumps back to the bag's start).
Pausing: ``--start-paused`` waits before the first message; Enter on a terminal, or a
``std_msgs/Bool`` on ``/<node name>/pause`` (true pauses, false resumes) pause and resume.

Exit status: 0 at the end of the bag, 1 for an error, 130 after Ctrl-C (143 after SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HELP = "publish a rosbag2 recording with rclpy at its timing (rate factor, /clock, loop, pause)"

DEFAULT_NODE_NAME = "vlm3_bag_player"
#: Seconds waited after ``--wait-for-subscribers`` is met, for the subscribers to match us too.
SETTLE_S = 0.25
#: Seconds to wait at the end for reliable subscribers to acknowledge the last messages.
ACK_TIMEOUT_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("bag", metavar="BAG", type=Path, help="rosbag2 directory")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--loop", action="store_true", help="play again from the start at the end")
    parser.add_argument("--topics", nargs="+", default=None, metavar="TOPIC", help="play only these topics")
    parser.add_argument("--start-paused", action="store_true", help="wait for a resume before the first message")
    parser.add_argument("--qos-reliability", choices=("reliable", "best_effort"), default="reliable",
                        help="reliability of the publishers (default reliable: large images between processes "
                             "are not delivered reliably over best effort)")
    parser.add_argument("--qos-depth", type=int, default=10, help="history depth of the publishers (default 10)")
    parser.add_argument("--clock", action=argparse.BooleanOptionalAction, default=True,
                        help="publish /clock from the bag time (default on)")
    parser.add_argument("--clock-rate", type=float, default=100.0, metavar="HZ",
                        help="/clock messages per second of wall time between messages (default 100)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="S",
                        help="wait S seconds before playing (after --wait-for-subscribers)")
    parser.add_argument("--wait-for-subscribers", type=int, default=0, metavar="N",
                        help="before playing, wait until the played topics have N subscriptions in total "
                             "(a node subscribed to 3 of them counts 3)")
    parser.add_argument("--wait-timeout", type=float, default=60.0, metavar="S",
                        help="give up waiting for subscribers after S seconds (exit 1; default 60)")
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME,
                        help=f"player node name (default {DEFAULT_NODE_NAME})")
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")


class PlayError(ValueError):
    """The bag cannot be played as asked."""


def message_class(msgtype: str) -> Any:
    """rclpy message class for ``pkg/msg/Name`` (or ``pkg/Name``); raises ImportError if absent."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ImportError(f"malformed message type name {msgtype!r}")
    module = importlib.import_module(f"{parts[0]}.{parts[1]}")
    try:
        return getattr(module, parts[2])
    except AttributeError:
        raise ImportError(f"{parts[0]}.{parts[1]} has no {parts[2]}") from None


def _log(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _warn(text: str) -> None:
    print(f"vlm3-ros play: warning: {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        return _play(args)
    except (PlayError, ValueError, OSError) as exc:
        print(f"vlm3-ros play: error: {exc}", file=sys.stderr)
        return 1


def _play(args: argparse.Namespace) -> int:
    from ..bags import bag_info, read_raw

    if not (args.rate > 0 and args.rate != float("inf")):
        raise PlayError(f"--rate must be a positive finite factor, got {args.rate}")
    if args.clock_rate <= 0:
        raise PlayError(f"--clock-rate must be positive, got {args.clock_rate}")
    if args.delay < 0 or args.wait_for_subscribers < 0 or args.qos_depth < 1:
        raise PlayError("--delay and --wait-for-subscribers must be >= 0 and --qos-depth >= 1")
    info = bag_info(args.bag)
    topics = info["topics"]
    if args.topics:
        missing = [t for t in args.topics if t not in topics]
        if missing:
            raise PlayError(f"bag {args.bag} has no topic {', '.join(missing)}; it has {', '.join(topics) or 'none'}")
        topics = {t: topics[t] for t in args.topics}

    from ..ros.dds import use_large_shared_memory

    use_large_shared_memory()  # camera-sized messages through shared memory without losses (see ros/dds.py)
    import rclpy
    from rclpy.context import Context
    from rclpy.duration import Duration
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message
    from rclpy.signals import SignalHandlerOptions

    classes: Dict[str, Any] = {}
    unknown: Dict[str, str] = {}
    for topic, entry in topics.items():
        try:
            classes[topic] = message_class(entry["type"])
        except ImportError:
            unknown[topic] = entry["type"]
    if unknown:
        _warn("skipping topics whose message type is not installed: "
              + ", ".join(f"{t} ({m})" for t, m in unknown.items()))
    if not classes:
        raise PlayError(f"nothing to play in {args.bag}: no topic with an installed message type")

    stop = threading.Event()
    received: List[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)

    context = Context()
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    executor = None
    try:
        node = rclpy.create_node(args.node_name, context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        reliability = (ReliabilityPolicy.RELIABLE if args.qos_reliability == "reliable"
                       else ReliabilityPolicy.BEST_EFFORT)
        publishers = {}
        for topic, cls in classes.items():
            durable = topic == "/tf_static"
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=args.qos_depth, reliability=reliability,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if durable else DurabilityPolicy.VOLATILE)
            publishers[topic] = node.create_publisher(cls, topic, qos)
        clock_pub = None
        clock_cls = None
        if args.clock:
            try:
                clock_cls = message_class("rosgraph_msgs/msg/Clock")
            except ImportError:
                _warn("rosgraph_msgs is not installed: no /clock")
            else:
                # reliable: matches reliable and best-effort (rclpy's time source) subscriptions alike
                clock_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
                clock_pub = node.create_publisher(clock_cls, "/clock", clock_qos)

        paused = threading.Event()
        if args.start_paused:
            paused.set()

        def on_pause(msg: Any) -> None:
            if msg.data:
                paused.set()
            else:
                paused.clear()
            _log(args, "paused" if msg.data else "resumed")

        try:
            bool_cls = message_class("std_msgs/msg/Bool")
            node.create_subscription(bool_cls, "~/pause", on_pause, 10)
        except ImportError:
            pass
        if sys.stdin is not None and sys.stdin.isatty():
            def read_keys() -> None:
                for _line in sys.stdin:
                    if paused.is_set():
                        paused.clear()
                        _log(args, "resumed")
                    else:
                        paused.set()
                        _log(args, "paused (Enter resumes)")

            threading.Thread(target=read_keys, daemon=True).start()

        def publish_clock(stamp_ns: int) -> None:
            if clock_pub is None:
                return
            msg = clock_cls()
            msg.clock.sec, msg.clock.nanosec = divmod(int(stamp_ns), 1_000_000_000)
            clock_pub.publish(msg)

        clock_period = 1.0 / args.clock_rate

        def idle(seconds: float, stamp_ns: Optional[int] = None) -> None:
            """Spin (pause commands) for ``seconds`` of wall time, publishing /clock if given."""
            end = time.monotonic() + seconds
            while not stop.is_set():
                if stamp_ns is not None:
                    publish_clock(stamp_ns)
                left = end - time.monotonic()
                if left <= 0:
                    return
                executor.spin_once(timeout_sec=min(left, clock_period))

        start_ns = info["start_ns"]
        if args.wait_for_subscribers > 0 and not stop.is_set():
            deadline = time.monotonic() + args.wait_timeout
            while not stop.is_set():
                matched = sum(p.get_subscription_count() for p in publishers.values())
                if matched >= args.wait_for_subscribers:
                    break
                if time.monotonic() > deadline:
                    raise PlayError(f"only {matched} of {args.wait_for_subscribers} subscriptions matched "
                                    f"within {args.wait_timeout} s")
                idle(0.02, start_ns)
            # Discovery completes on the publisher's side first; give the subscribers' side a moment
            # so that the first messages are not sent before they listen.
            idle(SETTLE_S, start_ns)
        if args.delay > 0:
            idle(args.delay, start_ns)
        if paused.is_set() and not stop.is_set():
            _log(args, "paused before the first message; resume with Enter or a false on "
                       f"{node.get_fully_qualified_name()}/pause")

        checked: Dict[str, bool] = {}
        played = 0
        loops = 0
        wall_begin = time.monotonic()
        while not stop.is_set():
            bag_t0: Optional[int] = None
            wall_t0 = 0.0
            for message in read_raw(args.bag, list(classes)):
                if bag_t0 is None:
                    bag_t0, wall_t0 = message.log_time_ns, time.monotonic()
                target_offset = (message.log_time_ns - bag_t0) / 1e9 / args.rate
                # wait for the message's time, publishing /clock and honouring pauses
                while not stop.is_set():
                    if paused.is_set():
                        pause_start = time.monotonic()
                        now_bag = bag_t0 + int((pause_start - wall_t0) * args.rate * 1e9)
                        while paused.is_set() and not stop.is_set():
                            publish_clock(min(now_bag, message.log_time_ns))
                            executor.spin_once(timeout_sec=clock_period)
                        wall_t0 += time.monotonic() - pause_start
                        continue
                    elapsed = time.monotonic() - wall_t0
                    left = target_offset - elapsed
                    if left <= 0:
                        break
                    publish_clock(min(bag_t0 + int(elapsed * args.rate * 1e9), message.log_time_ns))
                    executor.spin_once(timeout_sec=min(left, clock_period))
                if stop.is_set():
                    break
                topic = message.topic
                if topic not in checked:
                    try:
                        deserialize_message(message.data, classes[topic])
                        checked[topic] = True
                    except Exception as exc:  # the bag's definition does not fit the installed type
                        checked[topic] = False
                        _warn(f"skipping {topic}: its {message.msgtype} data does not decode as the installed "
                              f"type ({exc})")
                if not checked[topic]:
                    continue
                publish_clock(message.log_time_ns)
                publishers[topic].publish(message.data)
                played += 1
            loops += 1
            if not args.loop:
                break
        # Reliable delivery needs the publishers alive until the subscribers have acknowledged.
        ack_deadline = time.monotonic() + (0.5 if received else ACK_TIMEOUT_S)
        for publisher in publishers.values():
            left = ack_deadline - time.monotonic()
            if left <= 0 or not publisher.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))):
                _warn(f"{publisher.topic_name}: not every subscriber acknowledged the last messages")
        wall = time.monotonic() - wall_begin
        if received:
            _log(args, f"stopped after {played} messages ({wall:.2f} s)")
            return 128 + received[0]
        _log(args, f"played {played} messages on {sum(checked.values())} topics from {args.bag} "
                   f"in {wall:.2f} s (rate {args.rate:g}{f', {loops} loops' if loops > 1 else ''})")
        return 0
    finally:
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        context.try_shutdown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
