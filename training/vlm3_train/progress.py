"""Progress bars of the libraries the training package drives, off for a ``--quiet`` command.

The package's own bars follow each function's ``progress`` argument; the Hugging Face libraries
draw theirs (loading and writing weights, dataset building) on their own, so a quiet command turns
them off around its work with :func:`library_progress_bars`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["library_progress_bars"]


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled`` False, no progress bars from transformers, datasets or huggingface_hub
    while the block runs; their previous settings are restored after it."""
    if enabled:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    restore = []
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        restore.append(hf_logging.enable_progress_bar)
    if not datasets.are_progress_bars_disabled():
        datasets.disable_progress_bars()
        restore.append(datasets.enable_progress_bars)
    if not hub.are_progress_bars_disabled():
        hub.disable_progress_bars()
        restore.append(hub.enable_progress_bars)
    try:
        yield
    finally:
        for undo in restore:
            undo()
