"""The backend interface every inference engine implements, and its request/response types."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..protocol import TASKS, TaskSpec

__all__ = ["Backend", "EngineError", "GroundTruth", "Request", "Response"]


class EngineError(RuntimeError):
    """An engine could not be loaded or could not answer a request."""


@dataclass
class GroundTruth:
    """Reference geometry for a request, in the prepared images' pixel grids.

    Attributes:
        depth: metres along the optical axis (z) of image 1, aligned with the prepared image 1;
            0 or NaN where unknown.
        K: 3x3 intrinsics of prepared image 1.
        K2: 3x3 intrinsics of prepared image 2 (correspondence derived from depth + pose).
        pose: 4x4 transform camera 1 <- camera 2 (``X_c1 = pose @ X_c2``).
        flow: (H, W, 2) pixel of prepared image 2 seen at each pixel of prepared image 1
            (NaN where not visible); derived from ``depth``, ``pose``, ``K`` and ``K2`` when absent.
        size2: (width, height) of prepared image 2.
        objects: object extents (:class:`vlm3_ros.objects.ObjectExtent`) by region text
            coordinates ``(x1, y1, x2, y2)``: object questions are answered from these instead of
            ``depth`` (a dataset sample stores the extents of its regions, not a depth image).
    """

    depth: np.ndarray | None = None
    K: np.ndarray | None = None
    K2: np.ndarray | None = None
    pose: np.ndarray | None = None
    flow: np.ndarray | None = None
    size2: tuple[int, int] | None = None
    objects: Mapping[tuple[float, float, float, float], Any] | None = None


@dataclass
class Request:
    """One request: the prepared image(s) of a frame (or frame pair) and all of its questions.

    ``images`` are RGB uint8 arrays (H, W, 3) already prepared per ``spec`` (see
    :func:`vlm3_ros.camera.prepare_image`); ``questions`` are full question texts.
    ``extra_specs`` are other tasks whose questions the request also holds (for example depth
    questions among object questions): they must prepare images exactly as ``spec`` does, so one
    image prefix serves all questions; their stop strings apply too.
    """

    images: Sequence[np.ndarray]
    questions: Sequence[str]
    spec: TaskSpec = TASKS["depth"]
    max_new_tokens: int = 128
    ground_truth: GroundTruth | None = None
    extra_specs: tuple[TaskSpec, ...] = ()

    @property
    def specs(self) -> tuple[TaskSpec, ...]:
        """``spec`` and the ``extra_specs``."""
        return (self.spec, *self.extra_specs)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings of every task in the request (an answer ends at any of them)."""
        return tuple(dict.fromkeys(s for spec in self.specs for s in spec.stop_strings))

    def __post_init__(self) -> None:
        self.extra_specs = tuple(self.extra_specs)
        for extra in self.extra_specs:
            if extra.preprocess != self.spec.preprocess or extra.num_images != self.spec.num_images:
                raise EngineError(f"task {extra.name!r} prepares its images differently from {self.spec.name!r}; "
                                  "their questions cannot share one request")
        if len(self.images) != self.spec.num_images:
            raise EngineError(
                f"task {self.spec.name!r} takes {self.spec.num_images} image(s) per request, got {len(self.images)}"
            )
        for i, image in enumerate(self.images):
            arr = np.asarray(image)
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise EngineError(f"image {i} must be an RGB uint8 array (H, W, 3), got {arr.dtype} {arr.shape}")
        if not self.questions:
            raise EngineError("a request needs at least one question")
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Response:
    """Answers to a request, in question order, with accounting.

    ``finish_reasons`` per question: ``"stop"`` (a stop string appeared), ``"eos"`` (end of turn)
    or ``"length"`` (max_new_tokens reached). ``timings`` are seconds per stage.
    """

    answers: list[str]
    prompt_tokens: list[int] = field(default_factory=list)
    generated_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    token_ids: list[list[int]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """Answers VLM3 questions about prepared images.

    ``specs`` are the task specs the loaded model serves (from its checkpoint's protocol file, or
    the built-in VLM3 specs).
    """

    name: str = "backend"

    @property
    @abc.abstractmethod
    def specs(self) -> Mapping[str, TaskSpec]:
        """Task name -> spec served by this backend."""

    @abc.abstractmethod
    def answer(self, request: Request) -> Response:
        """Answer every question of ``request``."""

    def spec(self, task: str) -> TaskSpec:
        try:
            return self.specs[task]
        except KeyError:
            raise EngineError(f"{self.name} backend does not serve task {task!r}; it serves {sorted(self.specs)}") from None

    def describe(self) -> dict[str, Any]:
        """A short description for diagnostics."""
        return {"backend": self.name, "tasks": sorted(self.specs)}

    def health(self) -> dict[str, Any]:
        """Live state for diagnostics (a remote backend's connection); empty for in-process backends."""
        return {}

    def close(self) -> None:  # pragma: no cover - default no-op
        """Release resources."""
