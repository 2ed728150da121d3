"""The embedded default model: a small checkpoint trained by this package on synthetic scenes.

Model hubs are not always reachable and the released VLM3 checkpoints need a GPU, so the project
ships a recipe instead of weights: :func:`ensure_default_model` builds the checkpoint on first use
(on a CPU, in minutes) and caches it; later calls return the cached directory at once. The cache
entry is named by :data:`DEFAULT_MODEL_VERSION` and a hash of the recipe, so changing either
builds a new one.

The build runs the package's own pipeline end to end:

1. a random Qwen3-VL checkpoint of the ``default`` size (:func:`vlm3_ros.engine.model_factory.build_checkpoint`)
   whose protocol file holds a depth spec adapted to its size (a focal target that makes the
   synthetic image about 64 image tokens, coordinates in [0, 100], a short question and answer);
2. synthetic scenes (:mod:`vlm3_train.synthetic`) converted with :func:`vlm3_train.convert.convert_frames`
   (training scenes and held-out scenes, split by scene);
3. :func:`vlm3_train.sft.train`;
4. :func:`vlm3_train.evaluate.evaluate_datasets` on the held-out scenes, for the trained model and
   the untrained one, beside a constant predictor (the training set's median depth).

The trained model must beat both baselines on held-out delta1; otherwise the build fails and
nothing is cached. The numbers go into ``vlm3_default_model.json`` in the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "DEFAULT_MODEL_VERSION",
    "DEFAULT_RECIPE",
    "DefaultModelError",
    "DefaultModelRecipe",
    "build_default_model",
    "default_model_path",
    "default_model_specs",
    "ensure_default_model",
]

#: Bump to invalidate every cached default model (the recipe hash also invalidates on any change).
DEFAULT_MODEL_VERSION = "1"
REPORT_NAME = "vlm3_default_model.json"


class DefaultModelError(RuntimeError):
    """The default model could not be built, or did not learn (it is then not cached)."""


@dataclass(frozen=True)
class DefaultModelRecipe:
    """Everything that determines the default model (hashed into its cache key).

    Attributes:
        preset: model size (a :data:`vlm3_ros.engine.model_factory.PRESETS` name).
        focal: the depth spec's focal target in pixels (the synthetic camera has f = 220 px on a
            256 x 192 image; 256 px gives about 64 image tokens).
        coord_scale: text coordinates range [0, coord_scale].
        question, answer: the depth spec's question and answer templates.
        min_image_tokens: the image processor's minimum size, in image tokens.
        camera_height: the synthetic camera is a ground robot's: at this height (metres), level;
            ``None`` keeps the generator's hand-held paths (varying height, pitch and roll).
        train_scenes, frames: training scenes (one sequence each) and frames per scene.
        val_scenes, val_frames: held-out scenes (another seed) and their frames.
        points: depth questions per image.
        questions_per_sample: questions per training sample (see :class:`vlm3_train.sft.TrainConfig`).
        steps, batch_size, learning_rate, warmup: training length and optimiser.
        seed: everything is deterministic for a seed.
    """

    preset: str = "default"
    focal: float = 256.0
    coord_scale: int = 100
    question: str = "How far is the point at coordinates ({nx}, {ny}) from the camera?"
    answer: str = "<answer> {distance:.2f} </answer>"
    min_image_tokens: int = 16
    camera_height: float | None = 0.6
    train_scenes: int = 12
    frames: int = 20
    val_scenes: int = 4
    val_frames: int = 5
    points: int = 20
    questions_per_sample: int = 4
    steps: int = 1000
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
    """The task specs of the default model (its protocol file)."""
    from vlm3_ros import protocol
    from vlm3_ros.protocol import Preprocess

    depth = replace(
        protocol.DEPTH,
        preprocess=Preprocess("focal", float(recipe.focal), undistort=True),
        coord_scale=int(recipe.coord_scale),
        questions={"depth": recipe.question},
        answers={"depth": recipe.answer},
    )
    return {"depth": depth}


def default_model_path(cache_dir: str | os.PathLike[str] | None = None, recipe: DefaultModelRecipe = DEFAULT_RECIPE) -> Path:
    """Where the default model of ``recipe`` is cached (``$VLM3_CACHE/models`` by default)."""
    if cache_dir is None:
        from vlm3_ros.paths import cache_dir as project_cache

        root = project_cache("models")
    else:
        root = Path(cache_dir)
    return root / recipe.key()


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
                         recipe: DefaultModelRecipe = DEFAULT_RECIPE, progress: bool = True) -> Path:
    """The default checkpoint directory, built on first use and cached (atomically).

    A second call returns the cached path without work. ``force`` rebuilds it. Concurrent callers
    wait for one build.

    Raises:
        DefaultModelError: the build failed or the model did not beat its baselines.
    """
    target = default_model_path(cache_dir, recipe)
    if not force and (target / REPORT_NAME).is_file():
        return target
    with _lock(target.with_name(target.name + ".lock")):
        if not force and (target / REPORT_NAME).is_file():
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
        try:
            build_default_model(work / "model", recipe=recipe, progress=progress, workdir=work)
            if target.exists():
                old = work / "old"
                os.replace(target, old)
            os.replace(work / "model", target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def robot_sequence(seed: int, scene_index: int, frames: int, camera_height: float | None):
    """A synthetic scene and camera path (:func:`vlm3_train.synthetic.generate_sequence`'s), with the
    camera of a ground robot when ``camera_height`` is given: at that height, level (no pitch, no
    roll), looking where the generated path looks."""
    import math

    from .synthetic import FRAME_PERIOD_NS, SyntheticSequence, generate_sequence, look_pose, make_scene, make_trajectory

    if camera_height is None:
        return generate_sequence(seed=seed, frames=frames, scene_index=scene_index, supersample=1)
    reference = generate_sequence(seed=seed, frames=1, scene_index=scene_index, supersample=1)
    rng = np.random.default_rng([int(seed), int(scene_index)])  # the generator's own draws, in its order
    room = (float(rng.uniform(2.5, 6.0)), float(rng.uniform(2.5, 6.0)), float(rng.uniform(2.4, 3.5)))
    path = make_trajectory(rng, int(frames), room)
    poses = np.stack([look_pose((T[0, 3], T[1, 3], camera_height), math.atan2(T[1, 2], T[0, 2]), 0.0, 0.0)
                      for T in path])
    scene = make_scene(rng, keep_clear=poses[:, :3, 3], room=room)
    stamps = int(reference.stamps_ns[0]) + FRAME_PERIOD_NS * np.arange(int(frames), dtype=np.int64)
    return SyntheticSequence(scene, reference.intrinsics, poses, stamps, 1, int(seed))


def _synthetic_sources(seed: int, count: int, frames: int, camera_height: float | None) -> dict[str, Any]:
    return {f"synthetic-{seed}-{k:03d}": robot_sequence(seed, k, frames, camera_height).rgbd_frames()
            for k in range(count)}


def _depth_values(path: Path) -> np.ndarray:
    import datasets

    ds = datasets.load_from_disk(str(path / "data"))
    return np.concatenate([json.loads(t)["values"] for t in ds.data.column("targets").to_pylist()])


def build_default_model(output: str | os.PathLike[str], *, recipe: DefaultModelRecipe = DEFAULT_RECIPE,
                        progress: bool = True, workdir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Build, train and check the default model into ``output``; returns its report.

    Raises:
        DefaultModelError: the trained model does not beat the untrained model and the constant
            predictor on held-out delta1 (``output`` is then not written).
    """
    from vlm3_ros import metrics
    from vlm3_ros.engine.checkpoint import load_checkpoint
    from vlm3_ros.engine.model_factory import build_checkpoint
    from vlm3_ros.engine.transformers_backend import TransformersBackend

    from .convert import ConvertOptions, convert_frames
    from .evaluate import evaluate_datasets
    from .sft import TrainConfig, train

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    output = Path(output)
    tmp = tempfile.TemporaryDirectory(prefix="vlm3-default-") if workdir is None else None
    root = Path(workdir) if workdir is not None else Path(tmp.name)  # type: ignore[union-attr]
    try:
        specs = default_model_specs(recipe)
        say = print if progress else (lambda *a, **k: None)

        # 1. The untrained checkpoint, with an image processor sized for small images.
        base = root / "base"
        build_checkpoint(base, preset=recipe.preset, seed=recipe.seed, specs=list(specs.values()), overwrite=True)
        loaded = load_checkpoint(base, device="cpu", dtype="float32")
        image_processor = loaded.processor.image_processor
        tokens = image_processor.patch_size * image_processor.merge_size
        image_processor.size = {"shortest_edge": recipe.min_image_tokens * tokens * tokens,
                                "longest_edge": 4096 * tokens * tokens}
        loaded.processor.save_pretrained(base)
        timings["base_model"] = time.perf_counter() - t0

        # 2. Synthetic data: training scenes and held-out scenes.
        t = time.perf_counter()
        options = dict(tasks=("depth",), specs=specs, points_per_image=recipe.points, split="none", seed=recipe.seed)
        train_data = convert_frames(_synthetic_sources(recipe.seed, recipe.train_scenes, recipe.frames,
                                                       recipe.camera_height),
                                    root / "train", ConvertOptions(**options), overwrite=True, progress=progress).path
        val_data = convert_frames(_synthetic_sources(recipe.seed + 1000, recipe.val_scenes, recipe.val_frames,
                                                     recipe.camera_height),
                                  root / "val", ConvertOptions(**options), overwrite=True, progress=progress).path
        timings["data"] = time.perf_counter() - t

        # 3. Baselines on the held-out scenes.
        t = time.perf_counter()
        train_values = _depth_values(train_data)
        val_values = _depth_values(val_data)
        constant = float(np.median(train_values))
        constant_delta1 = metrics.delta1(np.full(val_values.shape, constant), val_values)
        limit = {"depth": 12}
        untrained = evaluate_datasets(TransformersBackend(loaded, warmup=False), [val_data], None, split="all",
                                      max_new_tokens=limit, plots=False, progress=progress)
        timings["baselines"] = time.perf_counter() - t

        # 4. Training.
        t = time.perf_counter()
        model_dir = root / "trained"
        config = TrainConfig(data=[str(train_data)], model=str(base), output=str(model_dir), split=None,
                             questions_per_sample=recipe.questions_per_sample, max_steps=recipe.steps,
                             batch_size=recipe.batch_size, learning_rate=recipe.learning_rate, warmup=recipe.warmup,
                             scheduler="cosine", save_steps=0, seed=recipe.seed, device="cpu", precision="fp32",
                             progress=progress, logging_steps=max(recipe.steps // 20, 1), overwrite=True)
        result = train(config)
        timings["training"] = time.perf_counter() - t

        # 5. The trained model on the held-out scenes.
        t = time.perf_counter()
        trained_backend = TransformersBackend(str(model_dir), device="cpu", dtype="float32", warmup=False)
        trained = evaluate_datasets(trained_backend, [val_data], root / "report", split="all", max_new_tokens=limit,
                                    plots=True, progress=progress)
        timings["evaluation"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0

        report = {
            "version": DEFAULT_MODEL_VERSION,
            "key": recipe.key(),
            "recipe": asdict(recipe),
            "heldout_delta1": {
                "trained": trained["depth"]["delta1"],
                "untrained": untrained["depth"]["delta1"],
                "constant_median": constant_delta1,
            },
            "heldout_abs_rel": {"trained": trained["depth"]["abs_rel"],
                                "constant_median": float(np.mean(np.abs(constant - val_values) / val_values))},
            "constant_median_m": constant,
            "heldout_points": int(val_values.size),
            "training_points": int(train_values.size),
            "train_loss": result.train_loss,
            "steps": result.global_step,
            "unparseable": trained["depth"]["num_unparseable"],
            "seconds": {k: round(v, 1) for k, v in timings.items()},
        }
        say(f"default model: held-out delta1 {report['heldout_delta1']['trained']:.3f} (untrained "
            f"{report['heldout_delta1']['untrained']:.3f}, constant {constant:.2f} m "
            f"{constant_delta1:.3f}); built in {timings['total']:.0f} s")
        best_baseline = max(report["heldout_delta1"]["untrained"], constant_delta1)
        if not report["heldout_delta1"]["trained"] > best_baseline:
            raise DefaultModelError(
                f"the default model did not learn: held-out delta1 {report['heldout_delta1']['trained']:.3f} does not "
                f"beat the untrained model ({report['heldout_delta1']['untrained']:.3f}) and the constant "
                f"{constant:.2f} m ({constant_delta1:.3f})"
            )
        (model_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        shutil.copytree(root / "report", model_dir / "heldout_report")
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.exists():
            shutil.rmtree(output)
        os.replace(model_dir, output)
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()
