"""The VLM3 text protocol: task specs, questions, training answers and answer parsers.

Everything a released VLM3 checkpoint expects is data in a :class:`TaskSpec`: how the image is
prepared (focal unification or max-edge resize), the range pixel coordinates are normalised to,
the question templates, the training answer templates and the strings that end an answer. The
built-in specs (:data:`DEPTH`, :data:`CORRESPONDENCE`, :data:`POSE`, :data:`OBJECT`) reproduce the
released checkpoints byte for byte; a checkpoint trained by this project carries its own specs in a
small JSON file (:func:`save_protocol` / :func:`load_protocol`), for example the compact specs
(:data:`COMPACT_TASKS`, :func:`compact_specs`): a few tokens naming the task and the text
coordinates, answered with the number(s) only.

Given a spec, an answer is first read with the spec's own answer template (its numeric fields);
otherwise the task's lenient parser reads it: parsers accept think blocks, surrounding whitespace,
explicit signs and missing tags where the answer is still unambiguous. Anything else raises :class:`AnswerParseError`, which names the task
and quotes the text; a parser never returns a guess.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from .paths import write_json_atomic

__all__ = [
    "AnswerParseError",
    "COMPACT_CORRESPONDENCE",
    "COMPACT_DEPTH",
    "COMPACT_POSE",
    "COMPACT_TASKS",
    "CORRESPONDENCE",
    "DEPTH",
    "OBJECT",
    "POSE",
    "POSE_QUESTION_IDS",
    "PROTOCOL_FILENAME",
    "Preprocess",
    "ProtocolError",
    "RelativePose",
    "TASKS",
    "TaskSpec",
    "bbox_reference",
    "compact_specs",
    "correspondence_question",
    "denormalize_point",
    "depth_question",
    "format_correspondence_answer",
    "format_depth_answer",
    "format_pose_answers",
    "load_protocol",
    "normalize_box",
    "normalize_point",
    "parse_bbox_references",
    "parse_correspondence_answer",
    "parse_depth_answer",
    "parse_pose_answers",
    "pose_questions",
    "save_protocol",
    "strip_think",
]

PROTOCOL_FILENAME = "vlm3_protocol.json"
PROTOCOL_FORMAT = "vlm3-protocol"
PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A value cannot be expressed in, or read from, the VLM3 protocol."""


class AnswerParseError(ProtocolError):
    """A model answer could not be read without guessing."""

    def __init__(self, task: str, text: str, reason: str) -> None:
        self.task = task
        self.text = text
        self.reason = reason
        shown = text if len(text) <= 300 else text[:300] + "..."
        super().__init__(f"{task} answer not parseable ({reason}): {shown!r}")


# --------------------------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------------------------

PREPROCESS_MODES = ("focal", "max_edge")


@dataclass(frozen=True)
class Preprocess:
    """How a task prepares its input image(s).

    ``mode="focal"`` resizes so that fx = fy = ``value`` pixels (undistorting first where the camera
    is not an ideal pinhole); ``mode="max_edge"`` resizes so that max(width, height) = ``value``
    pixels, undistorting first only when ``undistort`` is set.
    """

    mode: str
    value: float
    undistort: bool = False

    def __post_init__(self) -> None:
        if self.mode not in PREPROCESS_MODES:
            raise ProtocolError(f"unknown preprocess mode {self.mode!r}; expected one of {PREPROCESS_MODES}")
        if not (math.isfinite(self.value) and self.value > 0):
            raise ProtocolError(f"preprocess value must be a positive number, got {self.value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "value": self.value, "undistort": self.undistort}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocess":
        return cls(mode=str(data["mode"]), value=float(data["value"]), undistort=bool(data.get("undistort", False)))


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class TaskSpec:
    """One task of the protocol, as data.

    Attributes:
        name: task name (``depth``, ``correspondence``, ``pose``, ``object`` or a custom one).
        preprocess: image preparation.
        coord_scale: pixel coordinates are normalised to ``[0, coord_scale]`` of the prepared
            image's width and height (``None`` where the task references no pixels).
        num_images: images per request, in order, before the question text.
        questions: question id -> template (``str.format`` fields, e.g. ``{nx}``).
        answers: question id -> training answer template.
        stop_strings: an answer is complete once its text contains one of these (the end of the
            assistant turn always ends it too).
        options: task-specific settings (e.g. ``depth_kind``: ``"ray"`` or ``"z"``).
    """

    name: str
    preprocess: Preprocess
    coord_scale: int | None
    num_images: int
    questions: Mapping[str, str]
    answers: Mapping[str, str]
    stop_strings: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "questions", _frozen(self.questions))
        object.__setattr__(self, "answers", _frozen(self.answers))
        object.__setattr__(self, "options", _frozen(self.options))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if not self.name:
            raise ProtocolError("a task spec needs a name")
        if self.num_images < 1:
            raise ProtocolError(f"task {self.name!r}: num_images must be >= 1, got {self.num_images}")
        if self.coord_scale is not None and self.coord_scale <= 0:
            raise ProtocolError(f"task {self.name!r}: coord_scale must be positive, got {self.coord_scale}")
        if not self.questions:
            raise ProtocolError(f"task {self.name!r}: no question templates")

    def _render(self, kind: str, templates: Mapping[str, str], question_id: str | None, fields: Mapping[str, Any]) -> str:
        if not templates:
            raise ProtocolError(f"task {self.name!r} has no {kind} templates")
        qid = question_id or next(iter(templates))
        try:
            template = templates[qid]
        except KeyError:
            raise ProtocolError(f"task {self.name!r} has no {kind} {qid!r}; known: {sorted(templates)}") from None
        try:
            return template.format(**fields)
        except KeyError as exc:
            raise ProtocolError(f"task {self.name!r} {kind} {qid!r} needs field {exc.args[0]!r}") from None

    def question(self, question_id: str | None = None, **fields: Any) -> str:
        """Render a question; ``question_id`` defaults to the task's only (or first) question."""
        return self._render("question", self.questions, question_id, fields)

    def answer(self, question_id: str | None = None, **fields: Any) -> str:
        """Render a training answer with the task's answer template."""
        return self._render("answer", self.answers, question_id, fields)

    def parse_question(self, text: str) -> tuple[str, dict[str, float]]:
        """The question id and field values of a question text rendered from this spec.

        A suffix in ``options["think_suffix"]`` after the question is accepted.
        """
        suffix = self.option("think_suffix")
        candidates = [text, text[: -len(suffix)]] if suffix and text.endswith(suffix) else [text]
        for qid, template in self.questions.items():
            for candidate in candidates:
                match = _template_regex(template).fullmatch(candidate)
                if match:
                    return qid, {k: float(v) for k, v in match.groupdict().items()}
        raise ProtocolError(f"not a {self.name} question of this protocol: {text[:200]!r}")

    def parse_answer(self, text: str, question_id: str | None = None) -> dict[str, float]:
        """The numeric fields of an answer written exactly in this spec's answer template (surrounding
        whitespace aside); a field that appears twice must carry the same value both times.

        Raises:
            AnswerParseError: the text does not have the template's form.
        """
        qid = question_id or next(iter(self.answers), None)
        template = self.answers.get(qid) if qid is not None else None
        if template is None:
            raise ProtocolError(f"task {self.name!r} has no answer template {question_id!r}")
        match = _answer_regex(template).fullmatch(text.strip())
        if match is None:
            raise AnswerParseError(self.name, text, f"not in the answer format {template!r}")
        values = {k: float(v) for k, v in match.groupdict().items()}
        for name, value in values.items():
            if not math.isfinite(value):
                raise AnswerParseError(self.name, text, f"{name} {value} is not finite")
        return values

    def answer_complete(self, text: str, question_id: str | None = None) -> bool:
        """Whether ``text`` is already a whole answer in the answer template: the template ends with
        a number of fixed precision (e.g. ``{distance:.2f}``) and the text has all of it, so nothing
        more can belong to the answer. False for templates that need the end of the turn to end
        (a trailing integer or text)."""
        pattern = self._complete_pattern(question_id)
        return bool(pattern is not None and pattern.fullmatch(text))

    def answer_can_complete(self, question_id: str | None = None) -> bool:
        """Whether answers to this question can be whole before the end of the turn (see :meth:`answer_complete`)."""
        return self._complete_pattern(question_id) is not None

    def _complete_pattern(self, question_id: str | None) -> re.Pattern[str] | None:
        qid = question_id or next(iter(self.answers), None)
        template = self.answers.get(qid) if qid is not None else None
        return _complete_regex(template) if template is not None else None

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def with_options(self, **options: Any) -> "TaskSpec":
        """A copy with some options replaced (for example ``depth_kind="z"``)."""
        return replace(self, options={**self.options, **options})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "preprocess": self.preprocess.to_dict(),
            "coord_scale": self.coord_scale,
            "num_images": self.num_images,
            "questions": dict(self.questions),
            "answers": dict(self.answers),
            "stop_strings": list(self.stop_strings),
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TaskSpec":
        try:
            return cls(
                name=str(data["name"]),
                preprocess=Preprocess.from_dict(data["preprocess"]),
                coord_scale=None if data.get("coord_scale") is None else int(data["coord_scale"]),
                num_images=int(data.get("num_images", 1)),
                questions=dict(data["questions"]),
                answers=dict(data.get("answers", {})),
                stop_strings=tuple(data.get("stop_strings", ())),
                options=dict(data.get("options", {})),
            )
        except KeyError as exc:
            raise ProtocolError(f"task spec is missing field {exc.args[0]!r}") from None


@functools.lru_cache(maxsize=64)
def _template_regex(template: str) -> re.Pattern[str]:
    parts = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name:
            parts.append(rf"(?P<{name}>[-+]?\d+(?:\.\d+)?)")
    return re.compile("".join(parts), re.DOTALL)


@functools.lru_cache(maxsize=64)
def _answer_regex(template: str) -> re.Pattern[str]:
    """A template's literal text with each field a number (a repeated field must repeat its value)."""
    parts, seen = [], set()
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name:
            parts.append(f"(?P={name})" if name in seen else rf"(?P<{name}>{_NUM})")
            seen.add(name)
    return re.compile("".join(parts), re.DOTALL)


@functools.lru_cache(maxsize=64)
def _complete_regex(template: str) -> re.Pattern[str] | None:
    """The whole answers of a template that ends with a fixed-precision number, else None."""
    parts = list(string.Formatter().parse(template))
    if not parts or parts[-1][1] is None or parts[-1][0] is None:
        return None
    pieces = []
    for literal, name, spec, _conv in parts:
        pieces.append(re.escape(literal or ""))
        if name is None:
            continue
        fixed = re.fullmatch(r"(\+)?\.(\d+)f", spec or "")
        if fixed is None:
            if name == parts[-1][1]:
                return None
            pieces.append(_NUM)
        else:
            sign = "[-+]" if fixed.group(1) else "-?"
            pieces.append(rf"{sign}\d+\.\d{{{int(fixed.group(2))}}}" if int(fixed.group(2)) else rf"{sign}\d+")
    if parts[-1][2] is None or not re.fullmatch(r"(\+)?\.(\d+)f", parts[-1][2]):
        return None
    return re.compile("".join(pieces))


DEPTH_QUESTION = (
    "Given this image, how far is the point at coordinates ({nx}, {ny}) from the camera? "
    "The coordinates are in normalised [0, 2000] format relative to image width and height. "
    "Output the thinking process in <think> </think> and final answer (the meter number only, "
    "without the unit) in <answer> </answer> tags."
)
DEPTH_ANSWER = (
    "<think> The point is around {distance:.2f} meters away from the camera. </think>"
    "<answer> {distance:.2f} </answer>"
)

CORRESPONDENCE_QUESTION = (
    "Given these two images, what pixel in the second image corresponds to pixel ({nx}, {ny}) "
    "in the first image? Report the answer as (x, y)."
)
CORRESPONDENCE_THINK_SUFFIX = (
    ' Please think step by step and follow the format: "<think> [think process] </think>\n\n[answer]".'
)
CORRESPONDENCE_ANSWER = "({x}, {y})"

POSE_QUESTION_IDS = ("rotation_angle", "euler", "translation_direction", "translation_distance")
POSE_QUESTIONS = {
    "rotation_angle": (
        "Given these two images captured from different viewpoints, what is the relative rotation "
        "angle (in degrees) between the two camera poses?"
    ),
    "euler": (
        "Treating the first image as the reference viewpoint, describe the camera's reorientation "
        "needed to reach the second image's viewpoint as yaw, pitch and roll about the first camera's "
        "local axes, applied intrinsically in the order yaw -> pitch -> roll.  Conventions: yaw is "
        "rotation about the vertical (down) axis, positive = turn right; pitch is about the lateral "
        "(right) axis after yaw, positive = look up; roll is about the optical (forward) axis after "
        "yaw and pitch, positive = bank to the right (image content rotates clockwise from the "
        "operator's POV)."
    ),
    "translation_direction": (
        "Where did the camera move, expressed in the first camera's local frame (X right, Y down, "
        "Z forward)?  Give a qualitative direction and the precise unit direction vector (x, y, z)."
    ),
    "translation_distance": "Estimate the magnitude of the camera translation between the two viewpoints.",
}
POSE_ANSWERS = {
    "rotation_angle": "Rotation angle: {angle:.1f} degrees",
    "euler": "Yaw={yaw:+.1f}\u00b0, Pitch={pitch:+.1f}\u00b0, Roll={roll:+.1f}\u00b0",
    "translation_direction": "The camera moves {words}, unit vector ({x:+.2f}, {y:+.2f}, {z:+.2f}).",
    "translation_distance": "Translation distance: {distance:.2f} meters",
}

DEPTH = TaskSpec(
    name="depth",
    preprocess=Preprocess("focal", 1000.0, undistort=True),
    coord_scale=2000,
    num_images=1,
    questions={"depth": DEPTH_QUESTION},
    answers={"depth": DEPTH_ANSWER},
    stop_strings=("</answer>",),
    # The released checkpoints are trained on the distance from the camera centre (ray length).
    options={"depth_kind": "ray"},
)

CORRESPONDENCE = TaskSpec(
    name="correspondence",
    preprocess=Preprocess("max_edge", 1024.0, undistort=False),
    coord_scale=1000,
    num_images=2,
    questions={"correspondence": CORRESPONDENCE_QUESTION},
    answers={"correspondence": CORRESPONDENCE_ANSWER},
    stop_strings=(),
    options={"think_suffix": CORRESPONDENCE_THINK_SUFFIX},
)

POSE = TaskSpec(
    name="pose",
    preprocess=Preprocess("focal", 750.0, undistort=True),
    coord_scale=None,
    num_images=2,
    questions=POSE_QUESTIONS,
    answers=POSE_ANSWERS,
    stop_strings=(),
    # Components of the unit direction at least this large are named in the qualitative words.
    options={"direction_word_threshold": 0.3},
)

OBJECT = TaskSpec(
    name="object",
    preprocess=Preprocess("focal", 1000.0, undistort=True),
    coord_scale=1000,
    num_images=1,
    questions={"region": "bounding box region ({x1}, {y1}, {x2}, {y2})"},
    answers={},
    stop_strings=(),
)

TASKS: Mapping[str, TaskSpec] = MappingProxyType({s.name: s for s in (DEPTH, CORRESPONDENCE, POSE, OBJECT)})

# Compact specs for checkpoints trained by this project: a few tokens naming the task and the
# text coordinates, answered with the number(s) only (no think block, no tags: the end of the
# turn ends the answer). The preprocessing is the released checkpoints'; a small model replaces it
# with its own (:func:`compact_specs`).
COMPACT_DEPTH = replace(DEPTH, questions={"depth": "depth {nx} {ny}"}, answers={"depth": "{distance:.2f}"},
                        stop_strings=())
COMPACT_CORRESPONDENCE = replace(CORRESPONDENCE, questions={"correspondence": "match {nx} {ny}"},
                                 answers={"correspondence": "{x},{y}"}, options={})
COMPACT_POSE = replace(
    POSE,
    questions={"euler": "rotation", "translation_direction": "direction", "translation_distance": "distance"},
    answers={"euler": "{yaw:+.1f} {pitch:+.1f} {roll:+.1f}", "translation_direction": "{x:+.2f} {y:+.2f} {z:+.2f}",
             "translation_distance": "{distance:.2f}"},
    options={},
)
COMPACT_TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {s.name: s for s in (COMPACT_DEPTH, COMPACT_CORRESPONDENCE, COMPACT_POSE)})


def compact_specs(*, depth_focal: float | None = None, correspondence_max_edge: float | None = None,
                  pose_focal: float | None = None, coord_scale: int | None = None) -> dict[str, TaskSpec]:
    """The compact specs with another preprocessing or coordinate range (for a small model: fewer
    image tokens, two-digit coordinates); ``None`` keeps a value of :data:`COMPACT_TASKS`."""
    out = dict(COMPACT_TASKS)
    if depth_focal is not None:
        out["depth"] = replace(out["depth"], preprocess=Preprocess("focal", float(depth_focal), undistort=True))
    if correspondence_max_edge is not None:
        out["correspondence"] = replace(out["correspondence"],
                                        preprocess=Preprocess("max_edge", float(correspondence_max_edge)))
    if pose_focal is not None:
        out["pose"] = replace(out["pose"], preprocess=Preprocess("focal", float(pose_focal), undistort=True))
    if coord_scale is not None:
        for name in ("depth", "correspondence"):
            out[name] = replace(out[name], coord_scale=int(coord_scale))
    return out


# --------------------------------------------------------------------------------------------
# Protocol file in checkpoint directories
# --------------------------------------------------------------------------------------------


def save_protocol(directory: str | os.PathLike[str], specs: Mapping[str, TaskSpec] | list[TaskSpec]) -> Path:
    """Write the protocol file stating which tasks a checkpoint answers (atomically)."""
    items = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
    if not items:
        raise ProtocolError("a protocol file needs at least one task spec")
    payload = {
        "format": PROTOCOL_FORMAT,
        "version": PROTOCOL_VERSION,
        "tasks": {spec.name: spec.to_dict() for spec in items},
    }
    return write_json_atomic(Path(directory) / PROTOCOL_FILENAME, payload, default=None)


def load_protocol(path: str | os.PathLike[str]) -> dict[str, TaskSpec] | None:
    """Read a protocol file: a checkpoint directory's (``None`` when it has none) or a file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / PROTOCOL_FILENAME
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{path}: not valid JSON ({exc})") from None
    if payload.get("format") != PROTOCOL_FORMAT:
        raise ProtocolError(f"{path}: format is {payload.get('format')!r}, expected {PROTOCOL_FORMAT!r}")
    if int(payload.get("version", 0)) > PROTOCOL_VERSION:
        raise ProtocolError(f"{path}: protocol version {payload['version']} is newer than supported ({PROTOCOL_VERSION})")
    tasks = payload.get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        raise ProtocolError(f"{path}: no tasks listed")
    return {name: TaskSpec.from_dict({"name": name, **spec}) for name, spec in tasks.items()}


# --------------------------------------------------------------------------------------------
# Coordinates
# --------------------------------------------------------------------------------------------


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ProtocolError(f"image size must be positive, got {width}x{height}")


def normalize_point(x: float, y: float, width: float, height: float, scale: int) -> tuple[int, int]:
    """Pixel (x, y) of a ``width`` x ``height`` image -> integer text coordinates in [0, scale].

    ``nx = round(x / width * scale)`` (Python rounding, half to even), likewise for y.
    """
    _check_size(width, height)
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ProtocolError(f"pixel coordinates must be finite, got ({x}, {y})")
    return int(round(x / width * scale)), int(round(y / height * scale))


def denormalize_point(nx: float, ny: float, width: float, height: float, scale: int) -> tuple[float, float]:
    """Text coordinates in [0, scale] -> pixel (x, y) of a ``width`` x ``height`` image."""
    _check_size(width, height)
    return float(nx) / scale * width, float(ny) / scale * height


def normalize_box(box: tuple[float, float, float, float], width: float, height: float, scale: int = 1000) -> tuple[int, int, int, int]:
    """Pixel box (x1, y1, x2, y2) -> integer text coordinates."""
    x1, y1 = normalize_point(box[0], box[1], width, height, scale)
    x2, y2 = normalize_point(box[2], box[3], width, height, scale)
    return x1, y1, x2, y2


# --------------------------------------------------------------------------------------------
# Answer text helpers
# --------------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUM_RE = re.compile(_NUM)
_THINK_BLOCK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
_ANSWER_BLOCK_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_METRES = r"(?:\s*(?:m|meters?|metres?))?"
_DEGREES = r"(?:\s*(?:°|deg|degrees?))?"


def strip_think(text: str) -> str:
    """Remove ``<think> ... </think>`` blocks; text before a lone closing tag is thinking too.

    An unclosed ``<think>`` means the answer never came, so the result is empty from there on.
    """
    stripped = _THINK_BLOCK_RE.sub(" ", text)
    if "</think>" in stripped:
        stripped = stripped.rsplit("</think>", 1)[1]
    if "<think>" in stripped:
        stripped = stripped.split("<think>", 1)[0]
    return stripped.strip()


def _answer_body(task: str, text: str) -> str:
    """The text that holds the answer: the (single) ``<answer>`` block if any, else the text after thinking."""
    body = strip_think(text)
    blocks = [b.strip() for b in _ANSWER_BLOCK_RE.findall(body)]
    if len(set(blocks)) > 1:
        raise AnswerParseError(task, text, "several different <answer> blocks")
    if blocks:
        return blocks[0]
    if "<answer>" in body:
        raise AnswerParseError(task, text, "<answer> is not closed")
    return body


def _finite(task: str, text: str, value: float) -> float:
    if not math.isfinite(value):
        raise AnswerParseError(task, text, f"value {value} is not finite")
    return value


def _single_number(
    task: str, text: str, body: str, pattern: re.Pattern[str] | None = None, unit: str = _METRES
) -> float:
    if pattern is not None:
        found = {m.group(1) for m in pattern.finditer(body)}
        if len(found) == 1:
            return _finite(task, text, float(found.pop()))
        if len(found) > 1:
            raise AnswerParseError(task, text, "several different values")
    if re.fullmatch(rf"\s*({_NUM}){unit}\s*\.?\s*", body):
        return _finite(task, text, float(_NUM_RE.search(body).group(0)))
    raise AnswerParseError(task, text, "no single number found")


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------


def depth_question(nx: int, ny: int, spec: TaskSpec = DEPTH) -> str:
    """The depth question for text coordinates (nx, ny) in [0, 2000]."""
    return spec.question(nx=int(nx), ny=int(ny))


def format_depth_answer(distance: float, spec: TaskSpec = DEPTH) -> str:
    """The training answer for a distance in metres."""
    if not (math.isfinite(distance) and distance > 0):
        raise ProtocolError(f"depth must be a positive finite distance in metres, got {distance!r}")
    return spec.answer(distance=float(distance))


def _template_fields(spec: TaskSpec | None, question_id: str | None, text: str) -> dict[str, float] | None:
    """The answer's fields read with ``spec``'s answer template, or None (no spec, no such template,
    or another form: the lenient parsers then read it)."""
    if spec is None or (question_id or next(iter(spec.answers), None)) not in spec.answers:
        return None
    try:
        return spec.parse_answer(text, question_id)
    except AnswerParseError:
        return None


def parse_depth_answer(text: str, spec: TaskSpec | None = None) -> float:
    """Distance in metres from a depth answer: in ``spec``'s answer format, or leniently
    (``<answer> 1.23 </answer>``, or a bare number)."""
    fields = _template_fields(spec, None, text)
    if fields is not None and "distance" in fields:
        value = fields["distance"]
    else:
        value = _single_number("depth", text, _answer_body("depth", text))
    if value <= 0:
        raise AnswerParseError("depth", text, f"distance {value} is not positive")
    return value


# --------------------------------------------------------------------------------------------
# Correspondence
# --------------------------------------------------------------------------------------------

_PAIR_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_BARE_PAIR_RE = re.compile(rf"\s*({_NUM})\s*,\s*({_NUM})\s*\.?\s*")


def correspondence_question(nx: int, ny: int, think: bool = False, spec: TaskSpec = CORRESPONDENCE) -> str:
    """The correspondence question for pixel (nx, ny) of image 1 in [0, 1000] coordinates."""
    text = spec.question(nx=int(nx), ny=int(ny))
    return text + spec.option("think_suffix", "") if think else text


def format_correspondence_answer(x: float, y: float, spec: TaskSpec = CORRESPONDENCE) -> str:
    """The training answer for image-2 text coordinates (rounded to integers)."""
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ProtocolError(f"correspondence must be finite, got ({x}, {y})")
    return spec.answer(x=int(round(x)), y=int(round(y)))


def parse_correspondence_answer(text: str, spec: TaskSpec | None = None) -> tuple[float, float]:
    """Image-2 text coordinates (x, y) from a correspondence answer (in ``spec``'s answer format,
    or leniently: ``(x, y)`` or ``x, y``, possibly after thinking)."""
    fields = _template_fields(spec, None, text)
    if fields is not None and {"x", "y"} <= set(fields):
        return fields["x"], fields["y"]
    body = _answer_body("correspondence", text)
    pairs = {(m.group(1), m.group(2)) for m in _PAIR_RE.finditer(body)}
    if len(pairs) > 1:
        raise AnswerParseError("correspondence", text, "several different (x, y) pairs")
    if not pairs:
        bare = _BARE_PAIR_RE.fullmatch(body)
        if bare is None:
            raise AnswerParseError("correspondence", text, "no (x, y) pair found")
        pairs = {(bare.group(1), bare.group(2))}
    sx, sy = pairs.pop()
    return _finite("correspondence", text, float(sx)), _finite("correspondence", text, float(sy))


# --------------------------------------------------------------------------------------------
# Pose
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelativePose:
    """Relative pose of camera 2 with respect to camera 1 (optical frames: x right, y down, z forward).

    ``R`` holds camera 2's axes in camera 1's frame; ``direction`` is the unit vector towards camera
    2's centre in camera 1's frame; ``distance`` is in metres (``None`` when not answered).
    ``matrix`` is the 4x4 transform camera 1 <- camera 2 (``X_c1 = matrix @ X_c2``), ``None``
    without a distance. ``angle_deg`` is the answered rotation angle, if any.
    """

    R: np.ndarray
    direction: np.ndarray
    distance: float | None = None
    angle_deg: float | None = None

    @property
    def translation(self) -> np.ndarray | None:
        return None if self.distance is None else self.direction * self.distance

    @property
    def matrix(self) -> np.ndarray | None:
        if self.distance is None:
            return None
        T = np.eye(4)
        T[:3, :3] = self.R
        T[:3, 3] = self.direction * self.distance
        return T


def pose_questions(spec: TaskSpec = POSE) -> dict[str, str]:
    """Question id -> question text for the four pose questions."""
    return {qid: spec.question(qid) for qid in spec.questions}


def _euler_yxz(R: np.ndarray) -> tuple[float, float, float]:
    from scipy.spatial.transform import Rotation

    yaw, pitch, roll = Rotation.from_matrix(R).as_euler("YXZ", degrees=True)
    return float(yaw), float(pitch), float(roll)


def _matrix_yxz(yaw: float, pitch: float, roll: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("YXZ", [yaw, pitch, roll], degrees=True).as_matrix()


def _direction_words(direction: np.ndarray, threshold: float) -> str:
    names = (("left", "right"), ("up", "down"), ("backward", "forward"))
    words = [pos if c > 0 else neg for c, (neg, pos) in zip(direction, names) if abs(c) >= threshold]
    return ", ".join(words) if words else "barely"


def format_pose_answers(R: np.ndarray, t: np.ndarray, spec: TaskSpec = POSE) -> dict[str, str]:
    """Training answers for the relative pose of camera 2 in camera 1 (rotation ``R``, centre ``t``)."""
    R = np.asarray(R, dtype=float)
    t = np.asarray(t, dtype=float).reshape(-1)
    if R.shape != (3, 3) or not np.all(np.isfinite(R)):
        raise ProtocolError(f"R must be a finite 3x3 matrix, got shape {R.shape}")
    if abs(np.linalg.det(R) - 1.0) > 1e-3 or not np.allclose(R.T @ R, np.eye(3), atol=1e-3):
        raise ProtocolError("R is not a rotation matrix")
    if t.shape != (3,) or not np.all(np.isfinite(t)):
        raise ProtocolError(f"t must be a finite 3-vector, got {t!r}")
    distance = float(np.linalg.norm(t))
    if distance <= 1e-9:
        raise ProtocolError("the translation direction is undefined for a zero translation")
    direction = t / distance
    yaw, pitch, roll = _euler_yxz(R)
    from scipy.spatial.transform import Rotation

    angle = float(np.degrees(Rotation.from_matrix(R).magnitude()))
    threshold = float(spec.option("direction_word_threshold", 0.3))
    values = {
        "rotation_angle": {"angle": angle},
        "euler": {"yaw": yaw, "pitch": pitch, "roll": roll},
        "translation_direction": {
            "words": _direction_words(direction, threshold),
            "x": direction[0] + 0.0,
            "y": direction[1] + 0.0,
            "z": direction[2] + 0.0,
        },
        "translation_distance": {"distance": distance},
    }
    return {qid: spec.answer(qid, **values[qid]) for qid in spec.answers if qid in values}


_ANGLE_RE = re.compile(rf"rotation\s+angle\s*[:=]?\s*({_NUM})", re.IGNORECASE)
_EULER_RE = re.compile(
    rf"yaw\s*[=:]\s*({_NUM})\s*(?:°|deg(?:rees?)?)?\s*,?\s*"
    rf"pitch\s*[=:]\s*({_NUM})\s*(?:°|deg(?:rees?)?)?\s*,?\s*"
    rf"roll\s*[=:]\s*({_NUM})",
    re.IGNORECASE,
)
_TRIPLE_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_DISTANCE_RE = re.compile(rf"distance\s*[:=]?\s*({_NUM})", re.IGNORECASE)


def _parse_angle(text: str) -> float:
    body = _answer_body("pose rotation_angle", text)
    value = _single_number("pose rotation_angle", text, body, _ANGLE_RE, _DEGREES)
    if not 0.0 <= value <= 180.0:
        raise AnswerParseError("pose rotation_angle", text, f"angle {value} outside [0, 180]")
    return value


def _parse_euler(text: str) -> tuple[float, float, float]:
    body = _answer_body("pose euler", text)
    found = {m.groups() for m in _EULER_RE.finditer(body)}
    if len(found) != 1:
        raise AnswerParseError("pose euler", text, "no single Yaw=.., Pitch=.., Roll=.. triple" if not found else "several different triples")
    yaw, pitch, roll = (_finite("pose euler", text, float(v)) for v in found.pop())
    return yaw, pitch, roll


def _parse_direction(text: str) -> np.ndarray:
    body = _answer_body("pose translation_direction", text)
    found = {m.groups() for m in _TRIPLE_RE.finditer(body)}
    if len(found) != 1:
        raise AnswerParseError(
            "pose translation_direction", text, "no (x, y, z) vector" if not found else "several different vectors"
        )
    v = np.array([_finite("pose translation_direction", text, float(c)) for c in found.pop()])
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        raise AnswerParseError("pose translation_direction", text, "zero direction vector")
    return v / norm


def _parse_distance(text: str) -> float:
    body = _answer_body("pose translation_distance", text)
    value = _single_number("pose translation_distance", text, body, _DISTANCE_RE)
    if value < 0:
        raise AnswerParseError("pose translation_distance", text, f"negative distance {value}")
    return value


# The fields each pose question answers, and its lenient parser.
_POSE_FIELDS: Mapping[str, tuple[tuple[str, ...], Any]] = {
    "rotation_angle": (("angle",), lambda text: (_parse_angle(text),)),
    "euler": (("yaw", "pitch", "roll"), _parse_euler),
    "translation_direction": (("x", "y", "z"), _parse_direction),
    "translation_distance": (("distance",), lambda text: (_parse_distance(text),)),
}


def _pose_fields(qid: str, text: str, spec: TaskSpec | None) -> dict[str, float]:
    names, lenient = _POSE_FIELDS[qid]
    fields = _template_fields(spec, qid, text)
    if fields is not None and set(names) <= set(fields):
        return {k: fields[k] for k in names}
    return dict(zip(names, (float(v) for v in lenient(text))))


def parse_pose_answers(answers: Mapping[str, str], spec: TaskSpec | None = None) -> RelativePose:
    """Read the pose answers (question id -> answer text) into a :class:`RelativePose`, each in
    ``spec``'s answer format or leniently.

    ``euler`` and ``translation_direction`` are required; ``translation_distance`` and
    ``rotation_angle`` are optional.
    """
    missing = [qid for qid in ("euler", "translation_direction") if qid not in answers]
    if missing:
        raise ProtocolError(f"pose answers need {missing}; got {sorted(answers)}")
    fields: dict[str, float] = {}
    for qid in _POSE_FIELDS:
        if qid in answers:
            fields.update(_pose_fields(qid, answers[qid], spec))
    text = answers["translation_direction"]
    v = np.array([fields["x"], fields["y"], fields["z"]])
    if float(np.linalg.norm(v)) < 1e-6:
        raise AnswerParseError("pose translation_direction", text, "zero direction vector")
    angle = fields.get("angle")
    if angle is not None and not 0.0 <= angle <= 180.0:
        raise AnswerParseError("pose rotation_angle", answers["rotation_angle"], f"angle {angle} outside [0, 180]")
    distance = fields.get("distance")
    if distance is not None and distance < 0:
        raise AnswerParseError("pose translation_distance", answers["translation_distance"],
                               f"negative distance {distance}")
    return RelativePose(R=_matrix_yxz(fields["yaw"], fields["pitch"], fields["roll"]),
                        direction=v / np.linalg.norm(v), distance=distance, angle_deg=angle)


# --------------------------------------------------------------------------------------------
# Object-level region references
# --------------------------------------------------------------------------------------------

_BBOX_RE = re.compile(rf"bounding box region\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\)")


def bbox_reference(box: tuple[float, float, float, float], width: float, height: float, spec: TaskSpec = OBJECT) -> str:
    """``bounding box region (x1, y1, x2, y2)`` for a pixel box of a ``width`` x ``height`` image."""
    x1, y1, x2, y2 = normalize_box(box, width, height, spec.coord_scale or 1000)
    return spec.question("region", x1=x1, y1=y1, x2=x2, y2=y2)


def parse_bbox_references(text: str) -> list[tuple[float, float, float, float]]:
    """All region references in a text, in order, as text coordinates."""
    return [tuple(float(v) for v in m.groups()) for m in _BBOX_RE.finditer(text)]  # type: ignore[misc]
