"""Where the project keeps generated artefacts (models built on first use, demo outputs), and how
it writes files so that a failure never leaves a half-written one behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["cache_dir", "write_atomic", "write_json_atomic"]


def cache_dir(*parts: str) -> Path:
    """``$VLM3_CACHE`` (default ``~/.cache/vlm3_ros``) joined with ``parts``; created if missing."""
    root = Path(os.environ.get("VLM3_CACHE") or Path.home() / ".cache" / "vlm3_ros").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling renamed into place (mode 0644).

    Readers see the old file or the new one, never a partial one; on failure the temporary file is
    removed and the old file (if any) is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp creates the file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike[str], payload: Any, *, default: Callable[[Any], Any] | None = str) -> Path:
    """``payload`` as indented JSON (UTF-8, newline-terminated), written with :func:`write_atomic`."""
    return write_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False, default=default) + "\n")
