"""The server backend: a VLM3 checkpoint behind an OpenAI-compatible server (vLLM, SGLang).

A fleet of robots (or one small computer that cannot hold a 4B model) sends its questions to one
inference server. The client does the VLM3 preparation itself, with the same code as in process
(:mod:`vlm3_ros.camera` through the pipeline: focal unification, max-edge resize; a server only
applies its processor's resize), sends the prepared image as a PNG data URL (lossless) with each
question, greedy (temperature 0) with the task's stop strings and the request's token limit, and
sends all questions of a frame concurrently: the server batches them and its automatic prefix
cache encodes the frame's image prefix once. The answers go through the same protocol parsers as
any other backend's.

Task specs come, in this order, from an explicit protocol source (a checkpoint directory or its
``vlm3_protocol.json``), from the served model when the server names a local checkpoint directory
that carries a protocol file, or from the built-in VLM3 specs.

Faults are :class:`ServerError` with a ``kind`` the nodes count frames under:

* ``backend_unreachable``: no connection (server down, not started yet, died mid-request);
* ``backend_timeout``: no complete answer within the request timeout;
* ``backend_server_error``: HTTP 5xx;
* ``backend_rejected``: HTTP 4xx (wrong model name, bad request, missing or wrong API key);
* ``backend_bad_response``: a reply that is not the expected JSON.

Unreachable, timeout, 5xx, 408 and 429 are retried with exponential backoff; the connection pool
reconnects by itself when the server is back. :meth:`ServerBackend.health` reports the state.
The API key is read from an environment variable named by the caller; it is never logged,
described or put in an exception message.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import protocol
from ..protocol import TaskSpec
from .base import Backend, EngineError, Request, Response

__all__ = ["SERVER_ERROR_KINDS", "ServerBackend", "ServerError", "load_specs_source", "png_data_url"]

#: Diagnostic kinds of server faults (see the module docstring).
SERVER_ERROR_KINDS = ("backend_unreachable", "backend_timeout", "backend_server_error", "backend_rejected",
                      "backend_bad_response")
_RETRIED_STATUS = (408, 429)


class ServerError(EngineError):
    """A request to the inference server failed; ``kind`` is one of :data:`SERVER_ERROR_KINDS`."""

    def __init__(self, kind: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status

    @property
    def transient(self) -> bool:
        """True for faults that may go away by themselves (worth a retry, and a wait)."""
        return self.kind in ("backend_unreachable", "backend_timeout", "backend_server_error") or (
            self.status in _RETRIED_STATUS)


def png_data_url(image: np.ndarray) -> str:
    """An RGB uint8 image as a ``data:image/png;base64,...`` URL (lossless: the server sees these pixels)."""
    import cv2

    array = np.ascontiguousarray(np.asarray(image))
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise EngineError(f"a PNG data URL needs an RGB uint8 image, got {array.dtype} {array.shape}")
    ok, encoded = cv2.imencode(".png", array[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise EngineError("the image could not be encoded as PNG")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def load_specs_source(source: str | os.PathLike[str]) -> dict[str, TaskSpec]:
    """Task specs from a checkpoint directory or a ``vlm3_protocol.json`` file."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        if path.name != protocol.PROTOCOL_FILENAME:
            raise EngineError(f"protocol source {path} must be a checkpoint directory or a {protocol.PROTOCOL_FILENAME} file")
        directory = path.parent
    elif path.is_dir():
        directory = path
    else:
        raise EngineError(f"protocol source {path} does not exist")
    try:
        specs = protocol.load_protocol(directory)
    except protocol.ProtocolError as exc:
        raise EngineError(str(exc)) from None
    if specs is None:
        raise EngineError(f"{directory} has no {protocol.PROTOCOL_FILENAME}")
    return specs


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EngineError(f"server URL must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


class ServerBackend(Backend):
    """Answers VLM3 questions through an OpenAI-compatible chat completions server.

    Args:
        url: the server's base URL (``http://host:8000`` or ``http://host:8000/v1``).
        model: the served model name; empty: the server's only model (asked at first use).
        api_key_env: name of the environment variable holding the API key (empty: no key).
        timeout: seconds one HTTP request may take (connecting, sending, waiting for the answer).
        concurrency: requests in flight at most, over all frames and callers of this backend.
        retries: further attempts of a request after a transient fault.
        backoff: seconds before the first retry; doubled for each further one.
        protocol_source: checkpoint directory or protocol file with the task specs (default: the
            served model's directory when it is local and has one, else the built-in specs).

    Creating the backend contacts nothing, so a node starts while its server is still down; the
    first request (or :attr:`specs`) finds the served model.
    """

    name = "server"

    def __init__(
        self,
        url: str,
        *,
        model: str = "",
        api_key_env: str = "",
        timeout: float = 60.0,
        concurrency: int = 64,
        retries: int = 2,
        backoff: float = 0.5,
        protocol_source: str | os.PathLike[str] | None = None,
    ) -> None:
        import httpx

        if concurrency < 1:
            raise EngineError(f"concurrency must be >= 1, got {concurrency}")
        if retries < 0:
            raise EngineError(f"retries must be >= 0, got {retries}")
        if not (timeout > 0 and backoff >= 0):
            raise EngineError(f"timeout must be > 0 and backoff >= 0, got {timeout} and {backoff}")
        self.url = _base_url(url)
        self.model = model
        self.api_key_env = api_key_env
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise EngineError(f"the API key variable {api_key_env} is not set (or empty)")
            headers["Authorization"] = f"Bearer {key}"
        self.timeout = float(timeout)
        self.concurrency = int(concurrency)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._specs: dict[str, TaskSpec] | None = None
        self.specs_source = ""
        if protocol_source:
            self._specs = load_specs_source(protocol_source)
            self.specs_source = str(protocol_source)
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout), headers=headers, trust_env=False,
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency,
                                                           thread_name_prefix="vlm3-server")
        self._lock = threading.Lock()
        self.state = "not contacted"
        self.last_error = ""
        self.requests = 0
        self.failures = 0
        self.reconnects = 0

    # -- Backend interface ---------------------------------------------------------------------

    @property
    def specs(self) -> Mapping[str, TaskSpec]:
        if self._specs is None:
            self._resolve()
        assert self._specs is not None
        return self._specs

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.name, "url": self.url, "model": self.model or "(server's only model)",
                               "concurrency": self.concurrency, "timeout_s": self.timeout,
                               "api_key": f"from ${self.api_key_env}" if self.api_key_env else "none"}
        if self._specs is not None:
            out.update(tasks=sorted(self._specs), specs_source=self.specs_source)
        return out

    def health(self) -> dict[str, Any]:
        """Connection state for diagnostics: ``backend_connection`` is ``not contacted``,
        ``connected`` or the kind of the last fault; never holds the API key."""
        with self._lock:
            return {"backend_connection": self.state, "backend_url": self.url,
                    "backend_requests": self.requests, "backend_failures": self.failures,
                    "backend_reconnects": self.reconnects, "backend_last_error": self.last_error}

    def answer(self, request: Request) -> Response:
        """Every question of ``request`` as its own chat completion, sent concurrently."""
        t0 = time.perf_counter()
        model = self._served_model()
        urls = [png_data_url(image) for image in request.images]
        t_encode = time.perf_counter() - t0
        images = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        stops = list(request.spec.stop_strings)
        failed = threading.Event()  # set with the frame's first fault (see _ok)
        futures = [
            self._pool.submit(self._complete, model, images, question, stops, request.max_new_tokens, failed)
            for question in request.questions
        ]
        try:
            # The frame fails with its first fault, not after the questions before it are answered.
            finished, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            faults = [f.exception() for f in futures if f in finished and f.exception() is not None]
            if faults:
                raise faults[0]
            done = [future.result() for future in futures]
        except BaseException:
            for future in futures:  # the frame has failed: do not send what is still queued
                future.cancel()
            raise
        answers, prompt_tokens, generated, reasons = (list(column) for column in zip(*done))
        return Response(
            answers=answers, prompt_tokens=prompt_tokens, generated_tokens=generated, finish_reasons=reasons,
            timings={"preprocess": t_encode, "total": time.perf_counter() - t0},
            info={"server": self.url, "model": model},
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- requests ------------------------------------------------------------------------------

    def _complete(self, model: str, images: list[dict[str, Any]], question: str, stops: Sequence[str],
                  max_tokens: int, frame: threading.Event | None = None) -> tuple[str, int, int, str]:
        payload: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": [*images, {"type": "text", "text": question}]}],
            "temperature": 0.0,
            "max_tokens": int(max_tokens),
        }
        if stops:
            payload["stop"] = list(stops)
        reply = self._call("POST", "/chat/completions", payload, frame)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
            reason = choice.get("finish_reason")
            usage = reply.get("usage") or {}
        except (KeyError, IndexError, TypeError) as exc:
            raise self._fault(ServerError("backend_bad_response", f"{self.url}/chat/completions: reply without "
                                          f"choices[0].message.content ({type(exc).__name__}: {exc})"), frame) from None
        if not isinstance(text, str):
            raise self._fault(ServerError("backend_bad_response", "the answer content is not a string"), frame)
        # vLLM names the stop string that ended the answer in stop_reason, SGLang in matched_stop;
        # the answer text leaves it out, the in-process engine keeps it (answers close their tags).
        matched = choice.get("stop_reason", choice.get("matched_stop"))
        if reason == "stop" and isinstance(matched, str) and matched in stops:
            text += "" if text.endswith(matched) else matched  # a server may keep it already
            finish = "stop"
        elif reason == "stop":
            finish = "eos"
        else:
            finish = "length" if reason == "length" else str(reason)
        return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), finish

    def _call(self, method: str, path: str, payload: Any = None, frame: threading.Event | None = None) -> Any:
        """One HTTP request with retries on transient faults; the decoded JSON reply. ``frame``: the
        failure flag of the frame the request belongs to."""
        attempt = 0
        while True:
            try:
                reply = self._once(method, path, payload)
            except ServerError as exc:
                if not exc.transient or attempt >= self.retries:
                    raise self._fault(exc, frame) from None
                time.sleep(self.backoff * 2 ** attempt)
                attempt += 1
                continue
            self._ok(frame)
            return reply

    def _once(self, method: str, path: str, payload: Any) -> Any:
        import httpx

        url = self.url + path
        try:
            reply = self._client.request(method, url, json=payload)
        except httpx.TimeoutException as exc:
            raise ServerError("backend_timeout", f"{url}: no answer within {self.timeout:g} s "
                              f"({type(exc).__name__})") from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise ServerError("backend_unreachable", f"{url}: {type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:
            raise ServerError("backend_unreachable", f"{url}: {type(exc).__name__}: {exc}") from None
        if reply.status_code >= 400:
            kind = "backend_server_error" if reply.status_code >= 500 else "backend_rejected"
            raise ServerError(kind, f"{url}: HTTP {reply.status_code}: {_error_text(reply)}",
                              status=reply.status_code)
        try:
            return reply.json()
        except ValueError:
            raise ServerError("backend_bad_response", f"{url}: reply is not JSON: {reply.text[:200]!r}") from None

    # -- the served model and its specs ----------------------------------------------------------

    def _served_model(self) -> str:
        if not self.model or self._specs is None:
            self._resolve()
        return self.model

    def _resolve(self) -> None:
        """Find the served model (when not given) and its task specs (when not given)."""
        reply = self._call("GET", "/models")
        try:
            entries = [entry for entry in reply["data"] if isinstance(entry, Mapping) and entry.get("id")]
        except (KeyError, TypeError):
            raise self._fault(ServerError("backend_bad_response", f"{self.url}/models: no data list")) from None
        ids = [str(entry["id"]) for entry in entries]
        if self.model:
            entry = next((e for e in entries if e["id"] == self.model), None)
            if entry is None:
                raise self._fault(ServerError("backend_rejected", f"{self.url} does not serve model {self.model!r}; "
                                              f"it serves {ids}"))
        elif len(entries) == 1:
            entry = entries[0]
        else:
            raise self._fault(ServerError("backend_rejected", f"{self.url} serves {len(ids)} models {ids}; "
                                          "name one (server model)"))
        with self._lock:
            if self._specs is None:
                self._specs, self.specs_source = self._served_specs(entry)
            self.model = self.model or str(entry["id"])

    @staticmethod
    def _served_specs(entry: Mapping[str, Any]) -> tuple[dict[str, TaskSpec], str]:
        for key in ("root", "id"):
            value = entry.get(key)
            if isinstance(value, str) and value and Path(value).is_dir():
                try:
                    specs = protocol.load_protocol(value)
                except protocol.ProtocolError as exc:
                    raise EngineError(f"served model directory {value}: {exc}") from None
                if specs is not None:
                    return specs, str(Path(value) / protocol.PROTOCOL_FILENAME)
        return dict(protocol.TASKS), "built-in"

    # -- state -----------------------------------------------------------------------------------

    def _ok(self, frame: threading.Event | None = None) -> None:
        with self._lock:
            self.requests += 1
            if frame is not None and frame.is_set():
                # A question still in flight when its frame failed: its answer does not make the
                # connection good again (nor count a reconnection); the frame's fault stays the state.
                return
            if self.state not in ("connected", "not contacted"):
                self.reconnects += 1
            self.state = "connected"

    def _fault(self, exc: ServerError, frame: threading.Event | None = None) -> ServerError:
        with self._lock:
            self.requests += 1
            self.failures += 1
            self.state = exc.kind
            self.last_error = str(exc)[:300]
            if frame is not None:
                frame.set()
        return exc


def _error_text(reply: Any) -> str:
    """The server's error message (OpenAI error JSON or plain text), shortened."""
    try:
        data = reply.json()
        message = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(message, dict):
            message = message.get("message", message)
        return str(message)[:300]
    except ValueError:
        return reply.text[:300]
