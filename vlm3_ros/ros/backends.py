"""Backends created once per process and shared between nodes.

Nodes running in one process (``vlm3-ros perception``) ask :func:`shared_backend` for a backend
by its settings; a checkpoint that serves several tasks (depth, correspondence and pose) is
loaded once and the same instance is handed to every node and task. Calls are serialised by a
lock per backend: one model answers one request at a time, whichever node asks. Each
:func:`shared_backend` call takes a reference that :func:`release` gives back (a node's lifecycle
cleanup); the last one closes the backend and drops it, so the model is freed.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from ..engine import Backend, EngineError, Request, Response, load_backend

__all__ = ["BackendSettings", "SharedBackend", "clear_cache", "register", "release", "settings_from_params",
           "shared_backend"]


@dataclass(frozen=True)
class BackendSettings:
    """What identifies a loaded backend (the node parameters of the same names)."""

    backend: str = "transformers"
    model: str = ""
    adapter: str = ""
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 64
    offline: bool = True

    def key(self) -> Tuple[Any, ...]:
        if self.backend == "oracle":
            return ("oracle",)
        model = os.path.realpath(self.model) if os.path.exists(self.model) else self.model
        adapter = os.path.realpath(self.adapter) if self.adapter and os.path.exists(self.adapter) else self.adapter
        return (self.backend, model, adapter, self.device, self.dtype, self.max_batch, self.offline)

    def describe(self) -> str:
        if self.backend == "oracle":
            return "oracle"
        return f"{self.backend}:{self.model}" + (f"+{self.adapter}" if self.adapter else "")


def settings_from_params(values: Mapping[str, Any], model: Optional[str] = None) -> BackendSettings:
    """Settings from node parameter values; ``model`` overrides the ``model`` parameter when not empty."""
    return BackendSettings(
        backend=str(values["backend"]),
        model=str(model or values["model"]),
        adapter=str(values["adapter"]),
        device=str(values["device"]),
        dtype=str(values["dtype"]),
        max_batch=int(values["max_batch"]),
        offline=bool(values["offline"]),
    )


class SharedBackend(Backend):
    """A backend whose :meth:`answer` calls are serialised (several nodes, one model)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self._lock = threading.Lock()

    @property
    def specs(self) -> Mapping[str, Any]:
        return self.inner.specs

    def answer(self, request: Request) -> Response:
        with self._lock:
            return self.inner.answer(request)

    def describe(self) -> Dict[str, Any]:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


_CACHE: Dict[Tuple[Any, ...], SharedBackend] = {}
#: references taken by shared_backend (and register) and not yet released, per cache key
_REFS: Dict[Tuple[Any, ...], int] = {}
_CACHE_LOCK = threading.Lock()
_LOADING: Dict[Tuple[Any, ...], threading.Lock] = {}


def shared_backend(settings: BackendSettings) -> SharedBackend:
    """The process-wide backend for ``settings``, loading it on first use.

    Raises :class:`~vlm3_ros.engine.EngineError` naming the problem (no model given, unknown
    backend, a checkpoint that does not load).
    """
    if settings.backend == "transformers" and not settings.model:
        raise EngineError("backend 'transformers' needs the model parameter (a checkpoint directory or hub id)")
    key = settings.key()
    with _CACHE_LOCK:
        if key in _CACHE:
            _REFS[key] += 1
            return _CACHE[key]
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:  # two nodes asking for the same checkpoint at once load it once
        with _CACHE_LOCK:
            if key in _CACHE:
                _REFS[key] += 1
                return _CACHE[key]
        if settings.backend == "oracle":
            inner = load_backend("oracle")
        else:
            inner = load_backend(settings.backend, checkpoint=settings.model, adapter=settings.adapter or None,
                                 device=settings.device, dtype=settings.dtype, max_batch=settings.max_batch,
                                 offline=settings.offline)
        shared = SharedBackend(inner)
        with _CACHE_LOCK:
            _CACHE[key] = shared
            _REFS[key] = 1
        return shared


def register(settings: BackendSettings, backend: Backend) -> SharedBackend:
    """Make ``backend`` the process-wide backend for ``settings`` (an already loaded model).

    The registration holds a reference of its own: nodes releasing theirs never close it.
    """
    shared = backend if isinstance(backend, SharedBackend) else SharedBackend(backend)
    with _CACHE_LOCK:
        _CACHE[settings.key()] = shared
        _REFS[settings.key()] = 1
    return shared


def release(backend: Backend) -> bool:
    """Give back a reference taken by :func:`shared_backend`; True when it was the last one and the
    backend was closed and dropped (its model is freed once nothing else holds it)."""
    with _CACHE_LOCK:
        key = next((k for k, v in _CACHE.items() if v is backend), None)
        if key is None:
            return False
        _REFS[key] -= 1
        if _REFS[key] > 0:
            return False
        del _CACHE[key], _REFS[key]
    backend.close()
    torch = sys.modules.get("torch")  # give cached GPU memory back to the device
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def clear_cache() -> None:
    """Forget the cached backends (they are closed)."""
    with _CACHE_LOCK:
        items = list(_CACHE.values())
        _CACHE.clear()
        _REFS.clear()
    for backend in items:
        try:
            backend.close()
        except Exception:  # noqa: BLE001
            pass
