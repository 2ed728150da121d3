"""Backends created once per process and shared between nodes.

Nodes running in one process (``vlm3-ros perception``) ask :func:`shared_backend` for a backend
by its settings; a checkpoint that serves several tasks (depth, correspondence and pose) is
loaded once and the same instance is handed to every node and task. Calls to an in-process model
are serialised by a lock per backend: one model answers one request at a time, whichever node
asks. A server backend is not serialised: nodes sharing it send their frames side by side and the
server batches them (its client bounds the requests in flight). Each :func:`shared_backend` call
takes a reference that :func:`release` gives back (a node's lifecycle cleanup); the last one
closes the backend and drops it, so the model is freed.

A server fault (:class:`~vlm3_ros.engine.server_backend.ServerError`) names its diagnostic kind;
:func:`failure_kind` gives the kind a frame is counted under, :func:`check_task` lets a node start
while its server is still down, :func:`health_values` puts the connection state on /diagnostics.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ..engine import Backend, EngineError, Request, Response, load_backend

__all__ = ["BackendSettings", "SharedBackend", "check_task", "clear_cache", "failure_kind", "health_values", "register",
           "release", "settings_from_params", "shared_backend"]


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
    server_url: str = ""
    server_model: str = ""
    server_api_key_env: str = ""
    server_protocol: str = ""
    server_timeout: float = 30.0
    server_concurrency: int = 64
    server_retries: int = 2
    server_backoff: float = 0.5

    def key(self) -> Tuple[Any, ...]:
        if self.backend == "oracle":
            return ("oracle",)
        if self.backend == "server":
            return ("server", self.server_url.rstrip("/"), self.server_model, self.server_api_key_env,
                    self.server_protocol, self.server_timeout, self.server_concurrency, self.server_retries,
                    self.server_backoff)
        model = os.path.realpath(self.model) if os.path.exists(self.model) else self.model
        adapter = os.path.realpath(self.adapter) if self.adapter and os.path.exists(self.adapter) else self.adapter
        return (self.backend, model, adapter, self.device, self.dtype, self.max_batch, self.offline)

    def describe(self) -> str:
        if self.backend == "oracle":
            return "oracle"
        if self.backend == "server":
            return f"server:{self.server_url}" + (f" ({self.server_model})" if self.server_model else "")
        return f"{self.backend}:{self.model}" + (f"+{self.adapter}" if self.adapter else "")


#: server parameter (``server.<name>``) -> its type, as BackendSettings.server_<name>
_SERVER_FIELDS: Dict[str, Callable[[Any], Any]] = {
    "url": str, "model": str, "api_key_env": str, "protocol": str, "timeout": float, "concurrency": int,
    "retries": int, "backoff": float}


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
        **{f"server_{name}": kind(values[f"server.{name}"]) for name, kind in _SERVER_FIELDS.items()
           if f"server.{name}" in values},
    )


class SharedBackend(Backend):
    """A backend shared by several nodes; its :meth:`answer` calls are serialised when ``serialise``
    (one in-process model), else passed straight through (a server batches them itself)."""

    def __init__(self, inner: Backend, serialise: bool = True) -> None:
        self.inner = inner
        self.name = inner.name
        self._lock: Any = threading.Lock() if serialise else contextlib.nullcontext()

    @property
    def specs(self) -> Mapping[str, Any]:
        return self.inner.specs

    def answer(self, request: Request) -> Response:
        with self._lock:
            return self.inner.answer(request)

    def describe(self) -> Dict[str, Any]:
        return self.inner.describe()

    def health(self) -> Dict[str, Any]:
        return self.inner.health()

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
    if settings.backend == "server" and not settings.server_url:
        raise EngineError("backend 'server' needs the server.url parameter (e.g. http://127.0.0.1:8000/v1)")
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
        elif settings.backend == "server":
            inner = load_backend("server", url=settings.server_url, model=settings.server_model,
                                 api_key_env=settings.server_api_key_env, timeout=settings.server_timeout,
                                 concurrency=settings.server_concurrency, retries=settings.server_retries,
                                 backoff=settings.server_backoff, protocol_source=settings.server_protocol or None)
        else:
            inner = load_backend(settings.backend, checkpoint=settings.model, adapter=settings.adapter or None,
                                 device=settings.device, dtype=settings.dtype, max_batch=settings.max_batch,
                                 offline=settings.offline)
        shared = SharedBackend(inner, serialise=settings.backend != "server")
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


def failure_kind(exc: BaseException, default: str = "backend_error") -> str:
    """The diagnostic kind a frame failed by ``exc`` is counted under (a server fault names its own)."""
    kind = getattr(exc, "kind", None)
    return kind if isinstance(exc, EngineError) and isinstance(kind, str) and kind else default


def check_task(backend: Backend, task: str, logger: Any = None) -> None:
    """Fail early when ``backend`` does not serve ``task``. A server that cannot be asked (down,
    starting, refusing the request) is not a failure: the node starts, counts its frames under the
    fault's kind, and checks the task again with each frame until the server answers."""
    try:
        backend.spec(task)
    except EngineError as exc:
        if failure_kind(exc, "") == "":
            raise
        if logger is not None:
            logger.warning(f"{failure_kind(exc)}: {exc}; serving {task} once the server answers")


def health_values(backends: Mapping[str, Optional[Backend]]) -> Dict[str, Any]:
    """Diagnostics key/values of the distinct backends in ``backends`` (name -> backend); keys get a
    ``.name`` suffix when several distinct backends report."""
    distinct: Dict[int, Tuple[str, Backend]] = {}
    for name, backend in backends.items():
        if backend is not None and id(backend) not in distinct:
            distinct[id(backend)] = (name, backend)
    reports = [(name, backend.health()) for name, backend in distinct.values()]
    reports = [(name, values) for name, values in reports if values]
    if len(reports) == 1:
        return dict(reports[0][1])
    return {f"{key}.{name}": value for name, values in reports for key, value in values.items()}
