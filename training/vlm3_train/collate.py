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

With ``isolate_turns`` a sample is laid out as the inference engine asks its questions: the shared
image prefix once, then one block per question (the question's prompt after the image and its
answer), each block seeing the prefix and itself only, at the positions it has at inference (every
block starts right after the prefix). The batch then carries a 4D attention mask and the
``turn_offsets`` (-1 on prefix tokens, else the offset in the block) from which
:func:`turn_position_ids` makes the model's position ids. Each answer is thus trained on exactly
the tokens it is generated from, and all of a sample's questions still share one image encoding.
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
    "turn_attention_mask",
    "turn_position_ids",
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
    turn_offsets: list[int] | None = None

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
    isolate_turns: bool = False,
) -> EncodedSample:
    """Tokens and labels of one sample (see the module docstring).

    Args:
        processor: a Qwen-VL processor (tokenizer + image processor + chat template), e.g. from
            :func:`vlm3_ros.engine.checkpoint.load_checkpoint`.
        images: PIL images or RGB uint8 arrays, already prepared per the task spec.
        questions, answers: the K question and answer texts (same length, K >= 1).
        max_length: drop trailing question/answer turns until the sequence fits (the image and
            the first turn always stay; a first turn that does not fit raises).
        isolate_turns: lay the turns out as independent blocks after one image prefix (see the
            module docstring).

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
    if isolate_turns:
        return _encode_isolated(processor, render, end_token, features, len(pil), questions, answers, max_length)
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

    ids, labels, token_spans = _labelled_tokens(tokenizer, full, char_spans)

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


def _labelled_tokens(tokenizer, text: str, char_spans: Sequence[tuple[int, int]]) -> tuple[list[int], np.ndarray, list[tuple[int, int]]]:
    """Token ids of ``text``, labels on the tokens of each character span, and the spans' token ranges."""
    encoded = tokenizer(text, return_offsets_mapping=True)
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
    return ids, labels, token_spans


def _encode_isolated(processor, render, end_token: str, features, num_images: int, questions: Sequence[str],
                     answers: Sequence[str], max_length: int | None) -> EncodedSample:
    """One image prefix, then one independent block per question (see the module docstring)."""
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))
    prefix: list[int] | None = None
    ids: list[int] = []
    labels: list[int] = []
    offsets: list[int] = []
    spans: list[tuple[int, int]] = []
    for k, (question, answer) in enumerate(zip(questions, answers)):
        prompt = render(sample_messages(num_images, [question]), True)
        full = render(sample_messages(num_images, [question], [answer]), False)
        body = full[len(prompt):]
        stop = body.find(end_token)
        if not full.startswith(prompt) or stop < 0 or answer not in body[:stop]:
            raise CollationError(f"answer {k} ({answer[:60]!r}) is not followed by {end_token!r} in the rendered turn")
        turn_ids, turn_labels, (span,) = _labelled_tokens(
            tokenizer, full, [(len(prompt), len(prompt) + stop + len(end_token))])
        # The prefix: up to the token after the last image token (the end of the image).
        cut = max(i for i, t in enumerate(turn_ids) if t == image_token_id) + 2
        if prefix is None:
            prefix = turn_ids[:cut]
            ids, labels, offsets = list(prefix), [IGNORE_INDEX] * cut, [-1] * cut
        elif turn_ids[:cut] != prefix:
            raise CollationError("the questions' prompts differ before the end of their images; the image prefix "
                                 "cannot be shared")
        if span[0] < cut:
            raise CollationError(f"answer {k} starts inside the image prefix")
        block = turn_ids[cut:]
        if max_length is not None and len(ids) + len(block) > max_length:
            if k == 0:
                raise CollationError(f"the first question/answer turn needs {len(ids) + len(block)} tokens, more than "
                                     f"max_length={max_length}")
            break
        start = len(ids)
        spans.append((start + span[0] - cut, start + span[1] - cut))
        ids.extend(block)
        labels.extend(int(v) for v in turn_labels[cut:])
        offsets.extend(range(len(block)))
    return EncodedSample(input_ids=[int(t) for t in ids], labels=labels, pixel_values=features["pixel_values"],
                         image_grid_thw=features["image_grid_thw"], answer_spans=spans, num_questions=len(spans),
                         turn_offsets=offsets)


def turn_attention_mask(turn_offsets: Any, padding: Any) -> Any:
    """The ``[B, 1, L, L]`` boolean attention mask of isolated turns: prefix tokens see the prefix
    causally; a block's tokens see the prefix and their own block causally; padding sees itself."""
    import torch

    offsets = torch.as_tensor(turn_offsets)
    valid = torch.as_tensor(padding).bool()
    length = offsets.shape[1]
    index = torch.arange(length, device=offsets.device)
    causal = index[None, :, None] >= index[None, None, :]
    in_prefix = (offsets < 0) & valid
    # A block is the run of tokens since the last offset 0; tokens of one block share its start.
    block_start = torch.where(offsets == 0, index[None], torch.zeros_like(offsets))
    block_start = torch.cummax(block_start, dim=1).values
    same_block = (block_start[:, :, None] == block_start[:, None, :]) & (offsets >= 0)[:, :, None] & (offsets >= 0)[:, None, :]
    mask = causal & (in_prefix[:, None, :] | same_block) & valid[:, None, :] & valid[:, :, None]
    mask |= torch.eye(length, dtype=torch.bool, device=offsets.device)[None] & ~valid[:, :, None]
    return mask[:, None]


def turn_position_ids(rope_positions: Any, turn_offsets: Any, padding: Any) -> Any:
    """``[4, B, L]`` position ids (text row, then the three multimodal RoPE rows) of isolated turns.

    ``rope_positions`` ``[3, B, L]`` are the model's multimodal positions of the sequence read
    contiguously (right for the prefix); a block's token at offset ``j`` gets the positions the
    token right after the prefix has, plus ``j``: the positions it has at inference.
    """
    import torch

    offsets = torch.as_tensor(turn_offsets)
    valid = torch.as_tensor(padding).bool()
    prefix_len = ((offsets < 0) & valid).sum(dim=1)  # [B]
    batch = torch.arange(offsets.shape[0], device=offsets.device)
    after = rope_positions[:, batch, prefix_len - 1] + 1  # [3, B] the position after the prefix
    in_block = offsets >= 0
    mrope = torch.where(in_block[None], after[:, :, None] + offsets.clamp(min=0)[None], rope_positions)
    index = torch.arange(offsets.shape[1], device=offsets.device)[None].expand_as(offsets)
    text = torch.where(in_block, prefix_len[:, None] + offsets, index)
    out = torch.cat([text[None], mrope], dim=0)
    return torch.where(valid[None], out, torch.zeros_like(out))


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
    batch_inputs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "mm_token_type_ids": mm,
        "pixel_values": torch.cat([s.pixel_values for s in samples], dim=0),
        "image_grid_thw": torch.cat([s.image_grid_thw for s in samples], dim=0),
    }
    if any(s.turn_offsets is not None for s in samples):
        if not all(s.turn_offsets is not None for s in samples):
            raise CollationError("a batch mixes samples with and without isolated turns")
        offsets = torch.full((batch, length), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            offsets[i, : len(s.turn_offsets)] = torch.tensor(s.turn_offsets)
        batch_inputs["turn_offsets"] = offsets
    return batch_inputs


class SFTCollator:
    """Collate function for the training data loader.

    Each feature is a mapping with ``images`` (PIL images or arrays), ``questions`` and
    ``answers``; the result holds the model inputs (``input_ids``, ``attention_mask``, ``labels``,
    ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``).
    """

    def __init__(self, processor, *, max_length: int | None = None, isolate_turns: bool = False) -> None:
        self.processor = processor
        self.max_length = max_length
        self.isolate_turns = isolate_turns
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.image_token_id = tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))

    def encode(self, feature: Mapping[str, Any]) -> EncodedSample:
        return encode_sample(self.processor, feature["images"], feature["questions"], feature["answers"],
                             max_length=self.max_length, isolate_turns=self.isolate_turns)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return pad_batch([self.encode(f) for f in features], pad_token_id=self.pad_token_id, image_token_id=self.image_token_id)
