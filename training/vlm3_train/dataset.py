"""Opening a VLM3 dataset directory (the format ``vlm3-train convert`` writes).

A dataset directory holds ``data/`` (a Hugging Face ``save_to_disk`` dataset with the columns
``task``, ``images``, ``questions``, ``answers``, ``targets``, ``meta``) and the task specs it was
made with (``vlm3_protocol.json``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from vlm3_ros import protocol

__all__ = ["DatasetFormatError", "REQUIRED_COLUMNS", "SPEC_KEYS", "open_dataset", "spec_differences"]

REQUIRED_COLUMNS = ("task", "images", "questions", "answers")
#: The fields of a task spec a model's answers depend on: how the images are prepared (focal
#: target or edge size), the coordinate range, the number of images and the question templates.
SPEC_KEYS = ("preprocess", "coord_scale", "num_images", "questions")


class DatasetFormatError(ValueError):
    """A directory is not a readable VLM3 dataset."""


def open_dataset(path: str | os.PathLike[str], required: Sequence[str] = REQUIRED_COLUMNS) -> tuple[Any, dict[str, protocol.TaskSpec]]:
    """The Hugging Face dataset in ``path/data`` and the task specs of ``path``."""
    import datasets

    path = Path(path)
    data_dir = path / "data"
    if not data_dir.is_dir():
        raise DatasetFormatError(
            f"{path} is not a VLM3 dataset: no data/ directory (write one with `vlm3-train convert`)"
        )
    specs = protocol.load_protocol(path)
    if specs is None:
        raise DatasetFormatError(f"{path} is not a VLM3 dataset: no {protocol.PROTOCOL_FILENAME}")
    try:
        ds = datasets.load_from_disk(str(data_dir))
    except Exception as exc:  # datasets raises several types for unreadable directories
        raise DatasetFormatError(f"{data_dir} could not be loaded as a Hugging Face dataset: {exc}") from exc
    missing = set(required) - set(ds.column_names)
    if missing:
        raise DatasetFormatError(f"{data_dir} lacks column(s) {sorted(missing)}")
    return ds, specs


def spec_differences(data_spec: protocol.TaskSpec, model_spec: protocol.TaskSpec) -> list[str]:
    """The fields of :data:`SPEC_KEYS` in which a dataset's spec of a task differs from a model's
    (empty when the model was trained for data prepared like this)."""
    mine, theirs = data_spec.to_dict(), model_spec.to_dict()
    return [k for k in SPEC_KEYS if mine.get(k) != theirs.get(k)]
