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

__all__ = ["DatasetFormatError", "REQUIRED_COLUMNS", "open_dataset"]

REQUIRED_COLUMNS = ("task", "images", "questions", "answers")


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
