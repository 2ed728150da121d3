"""Turning VLM3 samples into training tensors: chat rendering, tokenisation, answer-only labels.

A sample is one or two prepared images and K question/answer pairs. It becomes one conversation
(the images precede the first question in the first user turn, then one assistant turn per
answer, then the next question as a new user turn) rendered with the checkpoint's own chat
template and tokenised the way the inference engine tokenises a prompt
(:meth:`vlm3_ros.engine.transformers_backend.TransformersBackend.encode`): the template text with
each image placeholder expanded to the image's number of merged patches, through the tokenizer in
one call. The first question's prompt is therefore token for token what the engine sends for that
question.

Labels are ``-100`` everywhere except on the assistant answers and the end-of-turn token that
closes each of them (what the model must generate and where it must stop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "CollationError",
    "EncodedSample",
    "IGNORE_INDEX",
    "SFTCollator",
    "encode_sample",
    "pad_batch",
    "sample_messages",
]

#: Label value of tokens that carry no loss (the convention of Hugging Face models).
IGNORE_INDEX = -100


class CollationError(ValueError):
    """A sample cannot be turned into training tokens (bad sample, or a template that cannot be split)."""


def sample_messages(num_images: int, questions: Sequence[str], answers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The chat messages of a sample: images + question 1, answer 1, question 2, answer 2, ...

    ``answers=None`` (or shorter than ``questions``) leaves the trailing questions unanswered.
    Image items carry ``"image": None``; the chat template only needs their place.
    """
    messages: list[dict[str, Any]] = []
    for k, question in enumerate(questions):
        content: list[dict[str, Any]] = [{"type": "image", "image": None} for _ in range(num_images if k == 0 else 0)]
        content.append({"type": "text", "text": question})
        messages.append({"role": "user", "content": content})
        if answers is not None and k < len(answers):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[k]}]})
    return messages


@dataclass
class EncodedSample:
    """Token ids, labels and image features of one sample.

    ``answer_spans`` are (start, stop) token index ranges of each answer (+ its end-of-turn token);
    ``num_questions`` how many question/answer turns the sample kept (see ``max_length``).
    """

    input_ids: list[int]
    labels: list[int]
    pixel_values: Any
    image_grid_thw: Any
    answer_spans: list[tuple[int, int]]
    num_questions: int

    @property
    def num_labels(self) -> int:
        return sum(stop - start for start, stop in self.answer_spans)


def _end_of_turn(processor) -> str:
    tokenizer = processor.tokenizer
    token = "<|im_end|>"
    if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
        token = tokenizer.eos_token
    if not token:
        raise CollationError("the tokenizer defines no end-of-turn token (<|im_end|> or eos_token)")
    return token


def encode_sample(
    processor,
    images: Sequence[Any],
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    max_length: int | None = None,
) -> EncodedSample:
    """Tokens and labels of one sample (see the module docstring).

    Args:
        processor: a Qwen-VL processor (tokenizer + image processor + chat template), e.g. from
            :func:`vlm3_ros.engine.checkpoint.load_checkpoint`.
        images: PIL images or RGB uint8 arrays, already prepared per the task spec.
        questions, answers: the K question and answer texts (same length, K >= 1).
        max_length: drop trailing question/answer turns until the sequence fits (the image and
            the first turn always stay; a first turn that does not fit raises).

    Raises:
        CollationError: mismatched questions/answers, a template whose rendering of a longer
            conversation does not extend the shorter one, or an answer whose tokens cannot be
            separated from the prompt's.
    """
    from PIL import Image

    if len(questions) != len(answers):
        raise CollationError(f"a sample needs one answer per question, got {len(questions)} questions and {len(answers)} answers")
    if not questions:
        raise CollationError("a sample needs at least one question")
    if not images:
        raise CollationError("a sample needs at least one image")
    pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
    pil = [im.convert("RGB") if im.mode != "RGB" else im for im in pil]
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    features = processor.image_processor(images=pil, return_tensors="pt")
    grid = features["image_grid_thw"]
    merge = processor.image_processor.merge_size ** 2
    counts = [int(g.prod()) // merge for g in grid]

    def render(messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        parts = text.split(image_token)
        if len(parts) - 1 != len(pil):
            raise CollationError(f"the chat template produced {len(parts) - 1} image placeholders for {len(pil)} image(s)")
        return parts[0] + "".join(image_token * c + p for c, p in zip(counts, parts[1:]))

    end_token = _end_of_turn(processor)
    char_spans: list[tuple[int, int]] = []
    previous = ""
    full = ""
    for k in range(len(questions)):
        prompt = render(sample_messages(len(pil), questions[: k + 1], answers[:k]), True)
        full = render(sample_messages(len(pil), questions[: k + 1], answers[: k + 1]), False)
        if not prompt.startswith(previous) or not full.startswith(prompt):
            raise CollationError(
                "the chat template does not render a longer conversation as an extension of a shorter one; "
                "answer tokens cannot be located"
            )
        body = full[len(prompt):]
        stop = body.find(end_token)
        if stop < 0 or answers[k] not in body[:stop]:
            raise CollationError(f"answer {k} ({answers[k][:60]!r}) is not followed by {end_token!r} in the rendered turn")
        char_spans.append((len(prompt), len(prompt) + stop + len(end_token)))
        previous = full

    encoded = tokenizer(full, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = encoded["offset_mapping"]
    starts = np.array([s for s, _ in offsets])
    ends = np.array([e for _, e in offsets])
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    token_spans: list[tuple[int, int]] = []
    for a, b in char_spans:
        inside = (starts >= a) & (ends <= b) & (ends > starts)
        straddle = (starts < a) & (ends > a) | (starts < b) & (ends > b)
        if straddle.any():
            raise CollationError(f"a token spans the boundary of an answer at characters {a}-{b}; answer and prompt tokens are not separable")
        idx = np.flatnonzero(inside)
        if idx.size == 0 or idx[-1] - idx[0] + 1 != idx.size:
            raise CollationError(f"answer at characters {a}-{b} maps to no contiguous tokens")
        labels[idx] = np.asarray(ids)[idx]
        token_spans.append((int(idx[0]), int(idx[-1]) + 1))

    keep = len(token_spans)
    if max_length is not None:
        while keep > 0 and token_spans[keep - 1][1] > max_length:
            keep -= 1
        if keep == 0:
            raise CollationError(f"the first question/answer turn needs {token_spans[0][1]} tokens, more than max_length={max_length}")
    end = token_spans[keep - 1][1]
    if keep < len(token_spans):
        # cut after the end-of-turn token of the last kept answer
        ids, labels = ids[:end], labels[:end]
    return EncodedSample(
        input_ids=[int(t) for t in ids],
        labels=[int(t) for t in labels],
        pixel_values=features["pixel_values"],
        image_grid_thw=grid,
        answer_spans=token_spans[:keep],
        num_questions=keep,
    )


def pad_batch(samples: Sequence[EncodedSample], *, pad_token_id: int, image_token_id: int) -> dict[str, Any]:
    """Right-pad encoded samples into model inputs (``labels`` padded with ``-100``)."""
    import torch

    if not samples:
        raise CollationError("cannot collate an empty batch")
    length = max(len(s.input_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        attention[i, :n] = 1
    mm = ((input_ids == image_token_id) & (attention == 1)).int()
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "mm_token_type_ids": mm,
        "pixel_values": torch.cat([s.pixel_values for s in samples], dim=0),
        "image_grid_thw": torch.cat([s.image_grid_thw for s in samples], dim=0),
    }


class SFTCollator:
    """Collate function for the training data loader.

    Each feature is a mapping with ``images`` (PIL images or arrays), ``questions`` and
    ``answers``; the result holds the model inputs (``input_ids``, ``attention_mask``, ``labels``,
    ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``).
    """

    def __init__(self, processor, *, max_length: int | None = None) -> None:
        self.processor = processor
        self.max_length = max_length
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.image_token_id = tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))

    def encode(self, feature: Mapping[str, Any]) -> EncodedSample:
        return encode_sample(self.processor, feature["images"], feature["questions"], feature["answers"], max_length=self.max_length)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return pad_batch([self.encode(f) for f in features], pad_token_id=self.pad_token_id, image_token_id=self.image_token_id)
