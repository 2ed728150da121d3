"""The dataset directory a conversion writes, atomically: built in a temporary sibling and renamed
into place on success, so a failure or Ctrl-C leaves nothing (or the old dataset) at the target,
and a killed conversion's leftover is removed by the next conversion into the same folder.

* ``data/``: a Hugging Face ``datasets`` directory, one row per sample (:data:`DATASET_COLUMNS`);
* ``vlm3_protocol.json``: the task specs used;
* ``summary.json``: what was read, written and skipped, with reasons, and the arguments.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from vlm3_ros import protocol
from vlm3_ros.paths import staged_directory, write_json_atomic

from .options import ConvertError, ConvertOptions
from .samples import Stats

__all__ = ["ConvertResult", "DATASET_COLUMNS", "DATASET_FORMAT", "DATASET_VERSION", "dataset_features",
           "write_dataset"]

DATASET_COLUMNS = ("task", "images", "questions", "answers", "targets", "meta")
DATASET_FORMAT = "vlm3-dataset"
DATASET_VERSION = 1

#: ``rows(stats, source_summaries)``: the rows to write; counts go to ``stats`` and one summary
#: per source to ``source_summaries``.
RowSource = Callable[[Stats, List[Dict[str, Any]]], Iterator[Dict[str, Any]]]


@dataclass
class ConvertResult:
    """Where the dataset went and its summary (also in ``summary.json``)."""

    path: Path
    summary: Dict[str, Any]


def dataset_features() -> Any:
    """The ``datasets.Features`` of the dataset's rows."""
    import datasets

    List_ = getattr(datasets, "List", None) or datasets.Sequence
    return datasets.Features({
        "task": datasets.Value("string"),
        "images": List_(datasets.Image()),
        "questions": List_(datasets.Value("string")),
        "answers": List_(datasets.Value("string")),
        "targets": datasets.Value("string"),
        "meta": datasets.Value("string"),
    })


def write_dataset(out: str | os.PathLike[str], options: ConvertOptions, rows: RowSource, sources: Sequence[str], *,
                  overwrite: bool, arguments: Optional[Mapping[str, Any]]) -> ConvertResult:
    """Stream ``rows(stats, summaries)`` into the dataset directory ``out``, atomically."""
    import datasets

    from .. import __version__

    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ConvertError(f"{out} exists already; pass overwrite (--overwrite) to replace it")
    stats = Stats()
    summaries: List[Dict[str, Any]] = []
    start = time.perf_counter()
    produced = [0]

    def counted() -> Iterator[Dict[str, Any]]:
        for row in rows(stats, summaries):
            produced[0] += 1
            yield row

    def nothing_made() -> ConvertError:
        return ConvertError(f"no samples could be made from {', '.join(sources)}: "
                            + ("; ".join(stats.reasons[:5]) or "no frames were read"))

    # Built in a locked staging directory next to ``out`` (see vlm3_ros.paths.staged_directory):
    # the stale one of a killed conversion is removed by the next conversion into the same folder.
    with staged_directory(out, overwrite=overwrite) as tmp:
        # A fresh cache inside the temporary directory: rows are streamed to disk, never reused.
        bars_were_on = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            try:
                dataset = datasets.Dataset.from_generator(counted, features=dataset_features(),
                                                          cache_dir=str(tmp / "cache"))
            except datasets.exceptions.DatasetGenerationError as exc:
                # datasets wraps errors raised inside the generator; re-raise ours as they are.
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, ValueError):
                    raise cause from None
                raise
            except ValueError:
                if produced[0] == 0:  # datasets: 'Instruction "train" corresponds to no data!'
                    raise nothing_made() from None
                raise
            if len(dataset) == 0:
                raise nothing_made()
            dataset.save_to_disk(str(tmp / "data"))
            del dataset
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        protocol.save_protocol(tmp, [options.specs[t] for t in options.tasks])  # type: ignore[index]
        summary = _summary(options, stats, summaries, arguments, __version__, time.perf_counter() - start)
        write_json_atomic(tmp / "summary.json", summary, default=None)
        _publishable(tmp)
    return ConvertResult(out, summary)


def _publishable(root: Path) -> None:
    """Give the temporary directory and its files the permissions of ordinary new files (the
    temporary-file helpers create them private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _summary(options: ConvertOptions, stats: Stats, source_summaries: List[Dict[str, Any]],
             arguments: Optional[Mapping[str, Any]], version: str, seconds: float) -> Dict[str, Any]:
    unpaired = sum(sum(b.get("unpaired", {}).values()) + b.get("unpaired_clouds", 0) for b in source_summaries)
    corrupt = sum(sum(b.get("corrupt", {}).values()) for b in source_summaries) + stats.counts.get("corrupt_clouds", 0)
    skipped = {k: v for k, v in sorted(stats.counts.items()) if k not in ("frames_read", "frames_used")}
    skipped["unpaired_messages"] = unpaired
    skipped["corrupt_messages"] = corrupt
    skipped["dropped_frames"] = sum(b.get("dropped_frames", 0) for b in source_summaries)
    return {
        "format": DATASET_FORMAT,
        "format_version": DATASET_VERSION,
        "version": version,
        "bags": source_summaries,
        "frames_read": stats.counts.get("frames_read", 0),
        "frames_used": stats.counts.get("frames_used", 0),
        "samples": {task: stats.samples.get(task, 0) for task in options.tasks},
        "questions": {task: stats.questions.get(task, 0) for task in options.tasks},
        "samples_by_split": {split: {task: c.get(task, 0) for task in options.tasks}
                             for split, c in stats.samples_by_split.items()},
        "skipped": skipped,
        "reasons": stats.reasons,
        "options": options.to_dict(),
        "arguments": dict(arguments) if arguments is not None else None,
        "seconds": round(seconds, 2),
    }
