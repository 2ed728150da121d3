"""``vlm3-train bench-packing``: training throughput with packed questions against one question per sample.

VLM3 / DepthLM train several questions about one image in one conversation: the image is encoded
once and every question/answer turn after it is supervised. This command measures what that buys:
supervised labels (answer tokens + end-of-turn tokens) per second of training, on the same model,
the same data and the same machine, in one run:

* ``packed``: ``--questions`` (10) depth questions after each image (``questions_per_sample=0``);
* ``unpacked``: the same samples split into one question per sample (``questions_per_sample=1``),
  the image repeated for every question.

Both go through :func:`vlm3_train.sft.train` (the Hugging Face ``Trainer``); the first optimizer
step of each is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HELP = "training throughput (supervised labels/s) with packed questions per image vs one question per sample"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--preset", default="bench", help="model preset of vlm3_ros.engine.model_factory (default bench)")
    parser.add_argument("--model", help="benchmark this checkpoint instead of a generated preset")
    parser.add_argument("--focal", type=float, default=1000.0,
                        help="depth focal target in pixels (default 1000, the VLM3 protocol)")
    parser.add_argument("--questions", type=int, default=10, help="questions per image when packed (default 10)")
    parser.add_argument("--packed-steps", type=int, default=3, help="timed optimizer steps, packed (default 3)")
    parser.add_argument("--unpacked-steps", type=int, default=10, help="timed optimizer steps, unpacked (default 10)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--workdir", help="keep the generated data and model here (default: a temporary directory)")


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []

        def _sync(self) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.ends.append(time.perf_counter())

    return StepTimer()


def _dataset(root: Path, focal: float, questions: int, frames: int):
    from dataclasses import replace

    from vlm3_ros import protocol
    from vlm3_ros.protocol import Preprocess

    from .convert import ConvertOptions, convert_bags
    from .synthetic import generate_sequence, write_bag

    bag = write_bag(generate_sequence(seed=11, frames=frames, supersample=1), root / "bag")
    spec = replace(protocol.DEPTH, preprocess=Preprocess("focal", focal))
    options = ConvertOptions(tasks=("depth",), specs={"depth": spec}, points_per_image=questions, split="none")
    return convert_bags([bag], root / "dataset", options, progress=False).path


def run_benchmark(*, model: str | None = None, preset: str = "bench", focal: float = 1000.0, questions: int = 10,
                  packed_steps: int = 3, unpacked_steps: int = 10, cpu: bool = False, workdir: str | None = None,
                  progress: bool = True) -> dict:
    """Measure packed and unpacked training throughput; returns the results (see module docstring)."""
    import tempfile

    import torch

    from vlm3_ros.engine.model_factory import build_checkpoint

    from .sft import TrainConfig, train

    tmp = tempfile.TemporaryDirectory(prefix="vlm3-bench-packing-") if workdir is None else None
    root = Path(workdir) if workdir else Path(tmp.name)  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    try:
        frames = max(packed_steps + 1, -(-(unpacked_steps + 1) // questions)) + 1
        data = _dataset(root, focal, questions, frames)
        checkpoint = model or str(root / f"model-{preset}")
        if model is None and not Path(checkpoint).exists():
            build_checkpoint(checkpoint, preset=preset, seed=0)
        results = {}
        for name, per_sample, steps in (("packed", 0, packed_steps), ("unpacked", 1, unpacked_steps)):
            timer = _step_timer()
            config = TrainConfig(data=[str(data)], model=checkpoint, output=str(root / f"out-{name}"),
                                 questions_per_sample=per_sample, max_steps=steps + 1, batch_size=1, learning_rate=1e-5,
                                 warmup=0, save_steps=0, device="cpu" if cpu else "auto", progress=progress,
                                 logging_steps=1000, overwrite=True, shuffle_questions=False,
                                 allow_spec_change=True)  # a throughput measurement: --focal may differ
            result = train(config, callbacks=[timer])
            durations = [e - s for s, e in zip(timer.starts, timer.ends)]
            timed = sum(durations[1:])
            labels_per_step = result.labels_seen / max(result.global_step, 1)
            results[name] = {
                "questions_per_sample": questions if per_sample == 0 else 1,
                "timed_steps": len(durations) - 1,
                "seconds": timed,
                "seconds_per_step": timed / max(len(durations) - 1, 1),
                "labels_per_step": labels_per_step,
                "labels_per_second": labels_per_step * (len(durations) - 1) / timed,
                "questions_per_second": (questions if per_sample == 0 else 1) * (len(durations) - 1) / timed,
            }
        device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
        return {
            "model": model or f"generated preset {preset!r}",
            "depth_focal": focal,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "platform": platform.platform(),
            "torch": torch.__version__,
            "packed": results["packed"],
            "unpacked": results["unpacked"],
            "ratio_labels_per_second": results["packed"]["labels_per_second"] / results["unpacked"]["labels_per_second"],
        }
    finally:
        if tmp is not None:
            tmp.cleanup()


def run(args: argparse.Namespace) -> int:
    from .sft import TrainError

    start = time.perf_counter()
    try:
        report = run_benchmark(model=args.model, preset=args.preset, focal=args.focal, questions=args.questions,
                               packed_steps=args.packed_steps, unpacked_steps=args.unpacked_steps, cpu=args.cpu,
                               workdir=args.workdir)
    except (TrainError, ValueError) as exc:
        print(f"vlm3-train bench-packing: {exc}", file=sys.stderr)
        return 2
    report["command"] = "vlm3-train bench-packing " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2)
    print(text)
    print(f"\npacked ({args.questions} questions per image): {report['packed']['labels_per_second']:.1f} labels/s; "
          f"unpacked (1 per sample): {report['unpacked']['labels_per_second']:.1f} labels/s; "
          f"ratio {report['ratio_labels_per_second']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0
