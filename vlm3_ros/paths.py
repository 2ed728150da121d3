"""Where the project keeps generated artefacts (models built on first use, demo outputs)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str) -> Path:
    """``$VLM3_CACHE`` (default ``~/.cache/vlm3_ros``) joined with ``parts``; created if missing."""
    root = Path(os.environ.get("VLM3_CACHE") or Path.home() / ".cache" / "vlm3_ros").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
