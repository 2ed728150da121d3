"""Small VLM3 datasets for the training and evaluation tests, made by the package's own tools.

``small_dataset(root)``: two short synthetic sequences (:mod:`vlm3_train.synthetic`) written as
bags and converted (:func:`vlm3_train.convert.convert_bags`) with depth and pose specs whose
focal target is 110 px (about 64 image tokens per image with the test checkpoint's processor), 4
depth questions per image, consecutive pose pairs, the last third of each bag's frames as the
``val`` split.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

SMALL_FOCAL = 110.0


def small_specs():
    from vlm3_ros import protocol
    from vlm3_ros.protocol import Preprocess

    return {
        "depth": replace(protocol.DEPTH, preprocess=Preprocess("focal", SMALL_FOCAL)),
        "pose": replace(protocol.POSE, preprocess=Preprocess("focal", SMALL_FOCAL)),
    }


def small_dataset(root: Path, *, bags: int = 2, frames: int = 6, points: int = 4, seed: int = 3) -> Path:
    from vlm3_train.convert import ConvertOptions, convert_bags
    from vlm3_train.synthetic import generate_sequence, write_bag

    root.mkdir(parents=True, exist_ok=True)
    paths = [write_bag(generate_sequence(seed=seed, frames=frames, scene_index=k, supersample=1), root / f"bag{k}")
             for k in range(bags)]
    options = ConvertOptions(tasks=("depth", "pose"), specs=small_specs(), points_per_image=points, pose_gaps=(1,),
                             split="frame", val_fraction=0.34, seed=seed)
    return convert_bags(paths, root / "dataset", options, progress=False).path
