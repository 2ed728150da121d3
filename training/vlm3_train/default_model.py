"""The embedded default model: a small checkpoint trained by this package on synthetic scenes.

Model hubs are not always reachable and the released VLM3 checkpoints need a GPU, so the project
ships a recipe instead of weights: :func:`ensure_default_model` builds the checkpoint on first use
(on a CPU, in minutes) and caches it; later calls return the cached directory at once. The cache
entry is named by :data:`DEFAULT_MODEL_VERSION` and a hash of the recipe, so changing either
builds a new one.

The model answers depth, correspondence and pose with the compact task specs
(:func:`vlm3_ros.protocol.compact_specs`: two-digit text coordinates, numbers-only answers), sized
for small images. The build runs the package's own pipeline end to end:

1. a random Qwen3-VL checkpoint of the ``default`` size (:func:`vlm3_ros.engine.model_factory.build_checkpoint`)
   whose protocol file holds those specs (its tokenizer is trained on their texts too);
2. synthetic scenes seen by a ground robot's camera (:func:`vlm3_train.synthetic.generate_robot_sequence`:
   random rooms, objects, textures, light, camera heights and focal lengths, forward and turning
   motion) converted with :func:`vlm3_train.convert.convert_frames`, training scenes and held-out
   scenes of another seed;
3. :func:`vlm3_train.sft.train` for a fixed number of steps (the build is deterministic);
4. :func:`vlm3_train.evaluate.evaluate_datasets` on the held-out scenes, each metric beside its
   baseline (:func:`vlm3_train.evaluate.baseline_comparison`): depth against the best constants of
   the training set, correspondence against the identity, pose and the chained trajectory against
   zero motion (and a constant direction); depth also on the real 7-Scenes frames of the shared
   data folder where present (never trained on).

The comparison is printed at build and stored beside the model (``vlm3_default_model.json``, and
the evaluation reports with their plots). A metric that does not beat its baseline is said so
plainly (it is reported, not hidden, and does not stop the build); a model whose answers do not
parse (it did not learn the protocol) fails the build and is not cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "DEFAULT_MODEL_VERSION",
    "DEFAULT_RECIPE",
    "DefaultModelError",
    "DefaultModelRecipe",
    "build_default_model",
    "default_model_path",
    "default_model_specs",
    "ensure_default_model",
    "format_comparison",
    "shared_data_dir",
]

#: Bump to invalidate every cached default model (the recipe hash also invalidates on any change).
DEFAULT_MODEL_VERSION = "2"
REPORT_NAME = "vlm3_default_model.json"
#: Maximum answer lengths used to evaluate the default model (its answers are a few tokens).
EVAL_MAX_NEW_TOKENS = {"depth": 8, "correspondence": 10, "pose": 20}


class DefaultModelError(RuntimeError):
    """The default model could not be built, or did not learn (it is then not cached)."""


@dataclass(frozen=True)
class DefaultModelRecipe:
    """Everything that determines the default model (hashed into its cache key).

    Attributes:
        preset: model size (a :data:`vlm3_ros.engine.model_factory.PRESETS` name).
        depth_focal: the depth spec's focal target in pixels (256 px makes a 640x480 f = 585 frame
            280 x 210, about 63 image tokens).
        correspondence_max_edge: the correspondence spec's image size (longest side, pixels).
        pose_focal: the pose spec's focal target in pixels.
        coord_scale: text coordinates range [0, coord_scale].
        min_image_tokens: the image processor's minimum size, in image tokens.
        camera_height, camera_pitch: the robot's camera mount (metres above the floor, degrees
            up), the demo robot's; ``None`` draws one per scene (0.3-1.0 m, -6 to +2 degrees). A
            model this small cannot read its height from the image, so the default keeps it fixed.
        max_unparseable: the largest fraction of held-out answers per task that may fail to parse
            (a model above it did not learn the protocol and is not cached).
        train_scenes, frames: training scenes (one robot sequence each) and frames per scene.
        val_scenes, val_frames: held-out scenes (another seed) and their frames.
        depth_points: depth questions per image; correspondence_points: per frame pair.
        correspondence_gaps, pose_gaps: frame gaps of the pairs.
        questions_per_sample: questions per training sample (0: all of a row's), and
        isolate_turns: each question trained as the engine asks it (see :class:`vlm3_train.sft.TrainConfig`).
        steps, batch_size, learning_rate, warmup: training length and optimiser.
        seed: everything is deterministic for a seed.
    """

    preset: str = "default"
    depth_focal: float = 256.0
    correspondence_max_edge: float = 224.0
    pose_focal: float = 160.0
    coord_scale: int = 100
    min_image_tokens: int = 16
    camera_height: float | None = 0.6
    camera_pitch: float | None = 0.0
    max_unparseable: float = 0.1
    train_scenes: int = 16
    frames: int = 20
    val_scenes: int = 4
    val_frames: int = 20
    depth_points: int = 20
    correspondence_points: int = 8
    correspondence_gaps: tuple[int, ...] = (1,)
    pose_gaps: tuple[int, ...] = (1,)
    questions_per_sample: int = 0
    isolate_turns: bool = True
    steps: int = 2400
    batch_size: int = 4
    learning_rate: float = 1e-3
    warmup: float = 30
    seed: int = 0

    def key(self) -> str:
        """Cache key: version and a hash of the recipe."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"default-v{DEFAULT_MODEL_VERSION}-{digest}"


DEFAULT_RECIPE = DefaultModelRecipe()


def default_model_specs(recipe: DefaultModelRecipe = DEFAULT_RECIPE):
    """The task specs of the default model (its protocol file): the compact specs at its sizes."""
    from vlm3_ros.protocol import compact_specs

    return compact_specs(depth_focal=recipe.depth_focal, correspondence_max_edge=recipe.correspondence_max_edge,
                         pose_focal=recipe.pose_focal, coord_scale=recipe.coord_scale)


def default_model_path(cache_dir: str | os.PathLike[str] | None = None, recipe: DefaultModelRecipe = DEFAULT_RECIPE) -> Path:
    """Where the default model of ``recipe`` is cached (``$VLM3_CACHE/models`` by default)."""
    if cache_dir is None:
        from vlm3_ros.paths import cache_dir as project_cache

        root = project_cache("models")
    else:
        root = Path(cache_dir)
    return root / recipe.key()


def shared_data_dir() -> Path:
    """The shared real-data folder: ``$VLM3_SHARED_DATA``, else ``../shared/data`` beside the
    project's root (present on development and CI machines only)."""
    env = os.environ.get("VLM3_SHARED_DATA")
    if env:
        return Path(env)
    import vlm3_ros

    return Path(vlm3_ros.__file__).resolve().parents[1].parent / "shared" / "data"


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock file, so that two processes do not build the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def ensure_default_model(cache_dir: str | os.PathLike[str] | None = None, force: bool = False, *,
                         recipe: DefaultModelRecipe = DEFAULT_RECIPE, progress: bool = True,
                         real_frames: bool = True) -> Path:
    """The default checkpoint directory, built on first use and cached (atomically).

    A second call returns the cached path without work. ``force`` rebuilds it. Concurrent callers
    wait for one build. ``real_frames``: also evaluate on the real 7-Scenes frames of the shared
    data folder when present (an evaluation only: the model is the same either way).

    Raises:
        DefaultModelError: the build failed or the model did not learn the protocol.
    """
    target = default_model_path(cache_dir, recipe)
    if not force and (target / REPORT_NAME).is_file():
        return target
    with _lock(target.with_name(target.name + ".lock")):
        if not force and (target / REPORT_NAME).is_file():
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
        try:
            build_default_model(work / "model", recipe=recipe, progress=progress, workdir=work, real_frames=real_frames)
            if target.exists():
                old = work / "old"
                os.replace(target, old)
            os.replace(work / "model", target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _robot_sources(seed: int, count: int, frames: int, recipe: DefaultModelRecipe) -> dict[str, Any]:
    from .synthetic import generate_robot_sequence

    return {f"synthetic-{seed}-{k:03d}": generate_robot_sequence(seed, frames, scene_index=k, camera_height=recipe.camera_height,
                                                                pitch=recipe.camera_pitch).rgbd_frames()
            for k in range(count)}


def _sevenscenes_frames(root: Path) -> list[tuple]:
    """The real 7-Scenes frames as ``(stamp_ns, rgb, intrinsics, depth z, T_w_c)`` at 30 Hz."""
    from vlm3_ros.camera import Intrinsics
    from vlm3_ros.datasets.sevenscenes import SevenScenes

    scenes = SevenScenes(root)
    frames = []
    for k, frame_id in enumerate(scenes.frame_ids):
        rgb, depth, pose = scenes.load_frame(frame_id)
        K = Intrinsics.from_K(scenes.intrinsics(), rgb.shape[1], rgb.shape[0])
        frames.append((1_000_000_000 + k * 33_333_333, rgb, K, depth, pose))
    return frames


def format_comparison(rows: list[dict[str, Any]], title: str) -> str:
    """Lines stating each metric beside its baseline, and plainly which ones it does not beat."""
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [title]
    for row in rows:
        verdict = "beats it" if row["beats"] else "DOES NOT BEAT IT"
        lines.append(f"  {row['task']:<15} {row['metric']:<29} {fmt(row['model']):>8}   "
                     f"{row['baseline']:<19} {fmt(row['baseline_value']):>8}   {verdict}")
    failed = [f"{r['task']} {r['metric']} (against {r['baseline']})" for r in rows if not r["beats"]]
    if failed:
        lines.append("  the model does not beat its baseline on: " + "; ".join(failed))
    return "\n".join(lines)


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The metrics of an evaluation report without its bulk (per-chain trajectories, examples)."""
    keep = {}
    for task in ("depth", "correspondence", "pose", "trajectory"):
        if task in report:
            keep[task] = {k: v for k, v in report[task].items() if k not in ("trajectories",)}
    keep["samples"] = report.get("samples")
    keep["against_baselines"] = report.get("against_baselines", [])
    return keep


def _unparseable_fractions(report: dict[str, Any]) -> dict[str, float]:
    """Per task, the fraction of held-out questions (pose: pairs) whose answer did not parse."""
    out = {}
    for task, total in (("depth", "num_points"), ("correspondence", "num_points"), ("pose", "num_pairs")):
        part = report.get(task)
        if part and part.get(total):
            out[task] = part["num_unparseable"] / part[total]
    return out


def build_default_model(output: str | os.PathLike[str], *, recipe: DefaultModelRecipe = DEFAULT_RECIPE,
                        progress: bool = True, workdir: str | os.PathLike[str] | None = None,
                        real_frames: bool = True) -> dict[str, Any]:
    """Build, train and check the default model into ``output``; returns its report.

    Raises:
        DefaultModelError: more than ``recipe.max_unparseable`` of a task's held-out answers do
            not parse (the model did not learn the protocol; ``output`` is then not written).
    """
    from vlm3_ros.engine.checkpoint import load_checkpoint
    from vlm3_ros.engine.model_factory import build_checkpoint
    from vlm3_ros.engine.transformers_backend import TransformersBackend
    from vlm3_ros.paths import write_json_atomic

    from .convert import ConvertOptions, convert_frames
    from .evaluate import evaluate_datasets, training_constants
    from .sft import TrainConfig, train

    t0, c0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    output = Path(output)
    tmp = tempfile.TemporaryDirectory(prefix="vlm3-default-") if workdir is None else None
    root = Path(workdir) if workdir is not None else Path(tmp.name)  # type: ignore[union-attr]
    say: Callable[..., None] = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    try:
        specs = default_model_specs(recipe)

        # 1. The untrained checkpoint, with an image processor sized for small images.
        base = root / "base"
        build_checkpoint(base, preset=recipe.preset, seed=recipe.seed, specs=list(specs.values()), overwrite=True)
        loaded = load_checkpoint(base, device="cpu", dtype="float32")
        image_processor = loaded.processor.image_processor
        tokens = image_processor.patch_size * image_processor.merge_size
        image_processor.size = {"shortest_edge": recipe.min_image_tokens * tokens * tokens,
                                "longest_edge": 4096 * tokens * tokens}
        loaded.processor.save_pretrained(base)
        del loaded
        timings["base_model"], cpu["base_model"] = time.perf_counter() - t0, time.process_time() - c0

        # 2. Synthetic data: training scenes and held-out scenes (another seed).
        t, c = time.perf_counter(), time.process_time()
        options = dict(tasks=tuple(specs), specs=specs, points_per_image=recipe.depth_points,
                       points_per_pair=recipe.correspondence_points, correspondence_gaps=recipe.correspondence_gaps,
                       pose_gaps=recipe.pose_gaps, split="none", seed=recipe.seed)
        train_data = convert_frames(_robot_sources(recipe.seed, recipe.train_scenes, recipe.frames, recipe), root / "train",
                                    ConvertOptions(**options), overwrite=True, progress=progress).path
        val_data = convert_frames(_robot_sources(recipe.seed + 1000, recipe.val_scenes, recipe.val_frames, recipe),
                                  root / "val", ConvertOptions(**options), overwrite=True, progress=progress).path
        constants = training_constants(train_data)
        timings["data"], cpu["data"] = time.perf_counter() - t, time.process_time() - c

        # 3. Training.
        t, c = time.perf_counter(), time.process_time()
        model_dir = root / "trained"
        config = TrainConfig(data=[str(train_data)], model=str(base), output=str(model_dir), split=None,
                             questions_per_sample=recipe.questions_per_sample, isolate_turns=recipe.isolate_turns,
                             max_steps=recipe.steps,
                             batch_size=recipe.batch_size, learning_rate=recipe.learning_rate, warmup=recipe.warmup,
                             scheduler="cosine", save_steps=0, seed=recipe.seed, device="cpu", precision="fp32",
                             progress=progress, logging_steps=max(recipe.steps // 20, 1), overwrite=True)
        result = train(config)
        timings["training"], cpu["training"] = time.perf_counter() - t, time.process_time() - c

        # 4. The trained model on the held-out scenes (and real frames), beside the baselines.
        t, c = time.perf_counter(), time.process_time()
        backend = TransformersBackend(str(model_dir), device="cpu", dtype="float32", warmup=False)
        heldout = evaluate_datasets(backend, [val_data], root / "report", split="all",
                                    max_new_tokens=EVAL_MAX_NEW_TOKENS, plots=True, progress=progress,
                                    constants=constants)
        real: dict[str, Any] = {}
        real_dir = shared_data_dir() / "7scenes_redkitchen"
        if real_frames and real_dir.is_dir():
            real_options = ConvertOptions(**{**options, "correspondence_gaps": (5,), "pose_gaps": (5,),
                                             "points_per_image": 10})
            real_data = convert_frames({"7scenes_redkitchen": _sevenscenes_frames(real_dir)}, root / "real",
                                       real_options, overwrite=True, progress=progress).path
            real = evaluate_datasets(backend, [real_data], root / "report_7scenes", split="all",
                                     max_new_tokens=EVAL_MAX_NEW_TOKENS, plots=True, progress=progress,
                                     constants=constants)
        timings["evaluation"], cpu["evaluation"] = time.perf_counter() - t, time.process_time() - c
        timings["total"], cpu["total"] = time.perf_counter() - t0, time.process_time() - c0

        unparseable = _unparseable_fractions(heldout)
        report = {
            "version": DEFAULT_MODEL_VERSION,
            "key": recipe.key(),
            "recipe": asdict(recipe),
            "tasks": sorted(specs),
            "heldout": _summary(heldout),
            "real_7scenes": _summary(real) if real else {"skipped": f"no real frames at {real_dir}" if real_frames
                                                         else "not asked (real_frames=False)"},
            "unparseable_fraction": unparseable,
            "training_constants": constants,
            "training": {"loss": result.train_loss, "steps": result.global_step,
                         "samples": json.loads((train_data / "summary.json").read_text())["samples"],
                         "labels_seen": result.labels_seen},
            "seconds": {k: round(v, 1) for k, v in timings.items()},
            "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        }
        say(format_comparison(heldout["against_baselines"],
                              f"default model: held-out synthetic scenes ({recipe.val_scenes} scenes of another seed)"))
        if real:
            say(format_comparison(real["against_baselines"], "default model: real 7-Scenes frames (never trained on)"))
        else:
            say(f"default model: real 7-Scenes frames not evaluated ({report['real_7scenes']['skipped']})")
        say(f"default model: built in {timings['total']:.0f} s (training {timings['training']:.0f} s, "
            f"{result.global_step} steps)")
        bad = {task: f for task, f in unparseable.items() if not f <= recipe.max_unparseable}
        if bad or set(unparseable) != set(specs):
            raise DefaultModelError(
                "the default model did not learn the protocol: unparseable held-out answers "
                + ", ".join(f"{task} {f:.0%}" for task, f in sorted(unparseable.items()))
                + f" (at most {recipe.max_unparseable:.0%} allowed; tasks evaluated: {sorted(unparseable)})"
            )
        write_json_atomic(model_dir / REPORT_NAME, report, default=float)
        shutil.copytree(root / "report", model_dir / "heldout_report")
        if real:
            shutil.copytree(root / "report_7scenes", model_dir / "heldout_report_7scenes")
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.exists():
            shutil.rmtree(output)
        os.replace(model_dir, output)
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()
