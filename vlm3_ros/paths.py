"""Where the project keeps generated artefacts (models built on first use, demo outputs), and how
it writes files so that a failure never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["STAGING_SUFFIX", "cache_dir", "remove_stale_staging", "staged_directory", "write_atomic",
           "write_json_atomic"]

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------
# Directories built in a staging sibling and renamed into place
# ------------------------------------------------------------------------------------------------

#: Staging directories are named ``.<target name>.<random><STAGING_SUFFIX>`` next to their target.
STAGING_SUFFIX = ".partial"
# Held (flock) by the process that owns a staging directory for as long as it works in it; the
# kernel releases it when that process ends in any way, a SIGKILL or a power cut included.
_STAGING_LOCK = ".vlm3-staging.lock"


def _locked_staging(target: Path) -> tuple[Path, int | None]:
    """A new staging directory next to ``target`` and the descriptor of its held lock.

    The lock file appears under its final name only once it is locked, so a cleaner can never
    take a directory whose owner is still setting it up for abandoned.
    """
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=STAGING_SUFFIX, dir=target.parent))
    try:
        import fcntl
    except ImportError:  # no flock (Windows): staging works, stale directories are not recognised
        return path, None
    pending = path / (_STAGING_LOCK + ".new")
    fd = os.open(pending, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        os.replace(pending, path / _STAGING_LOCK)
    except BaseException:
        os.close(fd)
        _remove_staging(path)
        raise
    return path, fd


def _remove_staging(path: Path) -> None:
    """Remove a staging directory, its lock file last (an interrupted removal stays recognisable)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for child in path.iterdir():
            if child.name != _STAGING_LOCK:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_staging(parent: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging directories in ``parent`` whose owner has ended without finishing them
    (a killed conversion or export); returns the directories removed.

    Only directories made by :func:`staged_directory` are considered, and only when their lock is
    free: the directory of a run still going on (in this process, another one, or another machine
    sharing the file system with working locks) is never touched, nor is anything else in ``parent``.
    """
    try:
        import fcntl
    except ImportError:
        return []
    removed: list[Path] = []
    try:
        candidates = sorted(Path(parent).glob(f".*{STAGING_SUFFIX}"))
    except OSError:
        return removed
    for path in candidates:
        lock = path / _STAGING_LOCK
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:  # not ours, or being finished by its owner right now
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            try:
                if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                    continue  # published or replaced between our open and our lock
            except OSError:
                continue
            try:
                owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except (OSError, ValueError):
                owner = {}
            _remove_staging(path)
            removed.append(path)
            log.warning("removed %s, left by an interrupted run (pid %s on %s)", path, owner.get("pid", "?"),
                        owner.get("host", "?"))
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Build the directory ``target`` atomically: yields an empty staging directory next to it, to
    fill; when the block ends normally the staging directory is renamed to ``target`` (replacing an
    existing one when ``overwrite``, else :class:`FileExistsError`), when it raises (Ctrl-C
    included) it is removed and ``target`` is left as it was.

    While the block runs, the staging directory is locked by this process: a process killed in it
    leaves the directory behind, and the next :func:`remove_stale_staging` of the same parent (done
    on entry here) removes it; a run going on at the same time keeps its own.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)
    path, fd = _locked_staging(target)
    aside: Path | None = None
    aside_fd: int | None = None
    try:
        yield path
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{target} exists already")
            aside, aside_fd = _locked_staging(target)
            os.replace(target, aside / "previous")
        (path / _STAGING_LOCK).unlink(missing_ok=True)
        os.replace(path, target)
    except BaseException:
        if aside is not None and (aside / "previous").exists() and not target.exists():
            os.replace(aside / "previous", target)  # put the old one back
        _remove_staging(path)
        raise
    finally:
        if fd is not None:
            os.close(fd)
        if aside is not None:
            _remove_staging(aside)
        if aside_fd is not None:
            os.close(aside_fd)
