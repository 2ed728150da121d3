"""In-process Hugging Face transformers backend with shared-prefix batched decoding."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..protocol import TaskSpec
from .base import Backend, EngineError, Request, Response
from .checkpoint import LoadedCheckpoint, load_checkpoint

__all__ = ["EncodedRequest", "TransformersBackend", "same_tokens", "truncate_at_stop"]


class EncodedRequest:
    """The token ids of every question's full prompt, and the image features, of one request."""

    def __init__(self, input_ids: list[list[int]], pixel_values, image_grid_thw, image_token_id: int,
                 features: Any = None) -> None:
        self.input_ids = input_ids
        self.pixel_values = pixel_values
        self.image_grid_thw = image_grid_thw
        self.image_token_id = image_token_id
        self.features = features

    def shared_prefix_length(self) -> int:
        """Length of the longest common token prefix, leaving every question at least one token."""
        first = self.input_ids[0]
        limit = min(len(ids) for ids in self.input_ids) - 1
        n = limit
        for ids in self.input_ids[1:]:
            n = _common_length(first[:n], ids[:n])
        last_image = max((i for i, t in enumerate(first) if t == self.image_token_id), default=-1)
        if any(t == self.image_token_id for ids in self.input_ids for t in ids[n:]):
            raise EngineError("the questions' prompts differ before their image tokens; cannot share the image prefix")
        if last_image >= n:
            raise EngineError("the shared prompt prefix does not hold all image tokens")
        return n


@dataclass
class _CachedPrefix:
    """A prefilled prefix kept for later requests about the same images."""

    features: Any  # the image processor's output for the images
    input_ids: list[int]  # the prefix tokens
    prefix: Any  # shared_prefix.Prefix


def _images_key(images: Sequence[np.ndarray]) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    for image in images:
        array = np.ascontiguousarray(image)
        digest.update(repr((array.shape, array.dtype.str)).encode())
        digest.update(array.data)
    return digest.digest()


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the usual case, compared in one call
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class TransformersBackend(Backend):
    """Runs a Qwen3-VL / Qwen2.5-VL checkpoint in process.

    Args:
        checkpoint: a local checkpoint directory or a hub id (or an already :class:`LoadedCheckpoint`).
        device, dtype: ``auto`` picks CUDA + bfloat16 when available, else CPU + float32.
        adapter: optional LoRA adapter directory (merged into the weights at load).
        offline: look hub ids up in the local cache only.
        max_batch: questions decoded together at most (bounds memory; larger requests are chunked).
        warmup: run one tiny request at load so the first real frame is not slow.
        prefix_cache: prefilled image prefixes kept for later requests about the same image(s)
            (0: none). A second round of questions about a frame then runs neither the image
            processor, the vision tower nor the prefix prefill again; its answers are the same as
            without the cache. Each entry holds the prefix keys and values (about 150 MB for a
            1000-token prefix of a 4B model in bfloat16).
    """

    name = "transformers"

    def __init__(
        self,
        checkpoint: str | os.PathLike[str] | LoadedCheckpoint,
        *,
        device: str | None = "auto",
        dtype: str | None = "auto",
        adapter: str | os.PathLike[str] | None = None,
        offline: bool = True,
        max_batch: int = 64,
        warmup: bool = True,
        prefix_cache: int = 1,
    ) -> None:
        from .shared_prefix import install_shared_prefix_attention

        if max_batch < 1:
            raise EngineError(f"max_batch must be >= 1, got {max_batch}")
        if prefix_cache < 0:
            raise EngineError(f"prefix_cache must be >= 0, got {prefix_cache}")
        self.prefix_cache = int(prefix_cache)
        self._prefixes: OrderedDict[bytes, _CachedPrefix] = OrderedDict()
        self._prefix_lock = threading.Lock()
        t0 = time.perf_counter()
        self.checkpoint = (
            checkpoint
            if isinstance(checkpoint, LoadedCheckpoint)
            else load_checkpoint(checkpoint, device=device, dtype=dtype, adapter=adapter, offline=offline)
        )
        self.model = self.checkpoint.model
        self.processor = self.checkpoint.processor
        self.tokenizer = self.processor.tokenizer
        self.max_batch = max_batch
        install_shared_prefix_attention(self.model)
        self.image_token = getattr(self.processor, "image_token", "<|image_pad|>")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._renderers: dict[int, Any] = {}
        self._direct_images: bool | None = None  # None: not yet checked against the processor
        self._direct = _DirectImages(self.processor.image_processor)
        self.load_seconds = time.perf_counter() - t0
        if warmup:
            self.warmup()

    # -- Backend interface ---------------------------------------------------------------------

    @property
    def specs(self) -> Mapping[str, TaskSpec]:
        return self.checkpoint.specs

    @property
    def device(self):
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "checkpoint": str(self.checkpoint.path),
            "model_type": self.checkpoint.model_type,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "protocol_file": self.checkpoint.protocol_file,
        }

    def answer(self, request: Request) -> Response:
        """All of the request's questions, decoded together over one shared image prefix.

        When a previous request was about the same image(s) and its prefix is still cached, the
        longest part of that prefix the new prompts agree with (always all image tokens) is reused.
        """
        from .shared_prefix import PrefixInputs, decode_suffixes, prefill_prefix

        t0 = time.perf_counter()
        key = _images_key(request.images) if self.prefix_cache else b""
        cached = self._cached(key)
        encoded = self.encode(request, features=cached.features if cached else None)
        t_encode = time.perf_counter() - t0
        n = encoded.shared_prefix_length()
        ids = encoded.input_ids[0]
        timings: dict[str, float] = {"vision": 0.0, "prefix_prefill": 0.0}
        prefix = None
        if cached is not None:
            common = _common_length(cached.input_ids, ids[:n])
            last_image = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1)
            if common > last_image:
                n, prefix = common, cached.prefix.truncated(common)
        reused = prefix is not None
        if prefix is None:
            import torch

            device = self.device
            prefix_ids = torch.tensor([ids[:n]], device=device)
            prefix = prefill_prefix(
                self.model,
                PrefixInputs(
                    input_ids=prefix_ids,
                    mm_token_type_ids=(prefix_ids == self.image_token_id).int(),
                    pixel_values=encoded.pixel_values.to(device, self.model.dtype),
                    image_grid_thw=encoded.image_grid_thw.to(device),
                ),
                timings,
            )
            self._keep(key, _CachedPrefix(encoded.features, list(ids[:n]), prefix))
        result = decode_suffixes(
            self.model,
            prefix,
            [row[n:] for row in encoded.input_ids],
            max_new_tokens=request.max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            is_stopped=self._stop_check(request.stop_strings),
            max_batch=self.max_batch,
            pad_token_id=self.pad_token_id,
            timings=timings,
        )
        timings = {"preprocess": t_encode, **result.timings, "total": time.perf_counter() - t0}
        response = self._response(request.stop_strings, encoded, result.tokens, result.finish_reasons, timings, shared=n)
        response.info["prefix_reused"] = reused
        return response

    def _cached(self, key: bytes) -> _CachedPrefix | None:
        if not self.prefix_cache:
            return None
        with self._prefix_lock:
            entry = self._prefixes.get(key)
            if entry is not None:
                self._prefixes.move_to_end(key)
            return entry

    def _keep(self, key: bytes, entry: _CachedPrefix) -> None:
        if not self.prefix_cache:
            return
        with self._prefix_lock:
            self._prefixes[key] = entry
            self._prefixes.move_to_end(key)
            while len(self._prefixes) > self.prefix_cache:
                self._prefixes.popitem(last=False)

    def clear_prefix_cache(self) -> None:
        """Forget the cached image prefixes (frees their memory)."""
        with self._prefix_lock:
            self._prefixes.clear()

    def answer_reference(self, request: Request) -> Response:
        """The reference way: full prompt through the processor and one ``generate`` per question.

        This is how the public VLM3 notebook queries a model (the image is re-encoded for every
        question); it is the baseline the shared-prefix engine must reproduce token for token.
        """
        import torch
        from PIL import Image

        t0 = time.perf_counter()
        images = [Image.fromarray(np.asarray(im)) for im in request.images]
        tokens, reasons, prompt_lengths = [], [], []
        with torch.inference_mode():
            for question in request.questions:
                inputs = self.processor.apply_chat_template(
                    self._messages(images, question),
                    tokenize=True,
                    add_generation_prompt=True,
                    return_dict=True,
                    return_tensors="pt",
                ).to(self.device)
                out = self.model.generate(**inputs, max_new_tokens=request.max_new_tokens, do_sample=False)
                prompt_len = inputs["input_ids"].shape[1]
                generated = out[0, prompt_len:].tolist()
                tokens.append(generated)
                prompt_lengths.append(prompt_len)
                reasons.append("eos" if generated and generated[-1] in self.eos_token_ids else "length")
        timings = {"total": time.perf_counter() - t0}
        response = Response(
            answers=[self._text(request.stop_strings, t) for t in tokens],
            prompt_tokens=prompt_lengths,
            generated_tokens=[len(t) for t in tokens],
            finish_reasons=reasons,
            timings=timings,
            token_ids=tokens,
        )
        return response

    def warmup(self) -> None:
        """One tiny request through the whole path (allocations, lazy initialisation)."""
        spec = next(iter(self.specs.values()))
        image = np.full((64, 64, 3), 127, dtype=np.uint8)
        self.answer(Request(images=[image] * spec.num_images, questions=["warm up", "warm"], spec=spec, max_new_tokens=2))

    # -- encoding ------------------------------------------------------------------------------

    @staticmethod
    def _messages(images: Sequence[Any], question: str) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images]
        content.append({"type": "text", "text": question})
        return [{"role": "user", "content": content}]

    def encode(self, request: Request, features: Any = None) -> EncodedRequest:
        """Token ids of every question's prompt (exactly as the processor makes them) and image features.

        ``features``: the image processor's output for these very images, when already known.
        """
        if features is None:
            features = self.image_features(request.images)
        grid = features["image_grid_thw"]
        merge = self.processor.image_processor.merge_size ** 2
        counts = tuple(int(g.prod()) // merge for g in grid)
        render = self._prompt_renderer(len(request.images))
        if isinstance(render, _SplitPrompt):
            input_ids = render.token_ids(self, counts, request.questions)
        else:
            input_ids = self.tokenizer([self._expand(render(q), counts) for q in request.questions])["input_ids"]
        return EncodedRequest(input_ids, features["pixel_values"], grid, self.image_token_id, features)

    def image_features(self, images: Sequence[np.ndarray]) -> Mapping[str, Any]:
        """``pixel_values`` and ``image_grid_thw`` of ``images`` exactly as the image processor makes them.

        For the Qwen2-VL family's PIL image processor, its own steps (resize, rescale, normalize,
        patchify) are called directly on the arrays, without the generic argument handling and
        image conversions around them that cost twice as much as the steps for a small frame. The
        first time, the result is compared with the processor's own output, bit for bit; where they
        differ, and for any other processor, the processor is called as it is.
        """
        if self._direct_images is not False and _DirectImages.applies(self.processor.image_processor, images):
            features = self._direct(images)
            if self._direct_images is None:
                import torch

                reference = self._processor_features(images)
                self._direct_images = all(
                    features[k].dtype == reference[k].dtype and torch.equal(features[k], reference[k])
                    for k in ("pixel_values", "image_grid_thw")
                )
                return reference
            return features
        return self._processor_features(images)

    def _processor_features(self, images: Sequence[np.ndarray]) -> Mapping[str, Any]:
        from PIL import Image

        return self.processor.image_processor(images=[Image.fromarray(np.asarray(im)) for im in images], return_tensors="pt")

    def _expand(self, text: str, counts: Sequence[int]) -> str:
        """``text`` with its image placeholders repeated as many times as each image has tokens."""
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(counts):
            raise EngineError(f"the chat template produced {len(parts) - 1} image placeholders for {len(counts)} image(s)")
        return parts[0] + "".join(self.image_token * c + p for c, p in zip(counts, parts[1:]))

    def _prompt_renderer(self, num_images: int):
        """``question -> prompt text`` through the chat template, or a :class:`_SplitPrompt` where
        the rendered template is a fixed head and tail around the question. Cached per number of
        images."""
        if num_images not in self._renderers:
            self._renderers[num_images] = self._make_renderer(num_images)
        return self._renderers[num_images]

    def _make_renderer(self, num_images: int):
        def render(question: str) -> str:
            return self.processor.apply_chat_template(
                self._messages([None] * num_images, question), tokenize=False, add_generation_prompt=True
            )

        marker = "\x00vlm3-question\x00"
        frame = render(marker)
        if frame.count(marker) != 1:
            return render
        head, tail = frame.split(marker)
        probes = ("depth 12 34", "Given these two images, what pixel?  (x, y)", " depth 1 2 ", "\n3.5\n")
        if any(render(q) != head + q + tail for q in probes):
            return render
        split = _SplitPrompt.make(self, head, tail, probes)
        return split if split is not None else (lambda question: head + question + tail)

    # -- answers -------------------------------------------------------------------------------

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.append(im_end)
        if not ids:
            raise EngineError(f"checkpoint {self.checkpoint.path} defines no end-of-turn token")
        return set(ids)

    def _stop_check(self, stops: tuple[str, ...]):
        if not stops:
            return None
        decode = self.tokenizer.decode
        last_chars = {s[-1] for s in stops}

        def stopped(tokens: list[int]) -> bool:
            tail = decode(tokens[-1:], skip_special_tokens=True)
            if not any(c in tail for c in last_chars):
                return False
            text = decode(tokens, skip_special_tokens=True)
            return any(s in text for s in stops)

        return stopped

    def _text(self, stops: tuple[str, ...], tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return truncate_at_stop(text, stops)

    def _texts(self, stops: tuple[str, ...], tokens: list[list[int]]) -> list[str]:
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [truncate_at_stop(text, stops) for text in texts]

    def _response(self, stops, encoded, tokens, reasons, timings, shared: int) -> Response:
        return Response(
            answers=self._texts(stops, tokens),
            prompt_tokens=[len(ids) for ids in encoded.input_ids],
            generated_tokens=[len(t) for t in tokens],
            finish_reasons=list(reasons),
            timings=timings,
            token_ids=tokens,
            info={"shared_prefix_tokens": shared},
        )


class _DirectImages:
    """The steps of a Qwen2-VL-family PIL image processor's ``_preprocess`` on RGB uint8 arrays."""

    def __init__(self, processor) -> None:
        self.p = processor
        self._table: np.ndarray | None = None

    def _value_table(self, channels: int) -> np.ndarray:
        """``[channels, 256]``: what rescale then normalize make of each uint8 value in each channel,
        computed by those very steps on an image holding every value once. Both are element-wise,
        so looking a pixel's value up gives the number the steps give for it."""
        if self._table is None or self._table.shape[0] != channels:
            p = self.p
            values = np.broadcast_to(np.arange(256, dtype=np.uint8), (channels, 1, 256)).copy()
            table = p.normalize(p.rescale(values, p.rescale_factor), p.image_mean, p.image_std)
            self._table = np.ascontiguousarray(table.reshape(channels, 256))
        return self._table

    @staticmethod
    def applies(processor, images: Sequence[np.ndarray]) -> bool:
        return (
            type(processor).__name__ == "Qwen2VLImageProcessorPil"
            and all(hasattr(processor, k) for k in ("resize", "rescale", "normalize", "patchify"))
            and all(isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
                    for im in images)
        )

    def __call__(self, images: Sequence[np.ndarray]) -> dict[str, Any]:
        import torch

        p = self.p
        patches, grids = [], []
        for image in images:
            image = np.moveaxis(np.asarray(image), -1, 0)  # HWC -> CHW, as the processor's own conversion
            if p.do_resize:
                image = p.resize(image, size=p.size, resample=p.resample, factor=p.patch_size * p.merge_size)
            if p.do_rescale and p.do_normalize and image.dtype == np.uint8:
                table = self._value_table(image.shape[0])
                image = np.stack([np.take(table[c], image[c]) for c in range(image.shape[0])])
            else:
                if p.do_rescale:
                    image = p.rescale(image, p.rescale_factor)
                if p.do_normalize:
                    image = p.normalize(image, p.image_mean, p.image_std)
            flat, grid_h, grid_w = p.patchify(image, patch_size=p.patch_size, merge_size=p.merge_size,
                                              temporal_patch_size=p.temporal_patch_size)
            patches.append(flat)
            grids.append([1, grid_h, grid_w])
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(np.concatenate(patches, axis=0))),
            "image_grid_thw": torch.tensor(grids, dtype=torch.int64),
        }


#: Questions whose token ids a split prompt keeps (a node's grid is a few hundred at most).
REST_CACHE_SIZE = 4096


class _SplitPrompt:
    """A chat template that renders ``head + question + tail``, where the head ends and the tail
    starts with a special token. The tokenizer splits its input at special tokens before anything
    else, so a prompt's ids are the head's ids followed by the ids of ``question + tail``: the head
    (with the image tokens, the bulk of the text) is tokenized once per image size, and only the
    short questions per request. Made only where that is checked to equal tokenizing whole prompts."""

    def __init__(self, head: str, tail: str) -> None:
        self.head = head
        self.tail = tail
        self._heads: dict[tuple[int, ...], list[int]] = {}  # head ids per image token counts
        # ids of ``question + tail`` per question: a node asks the same grid of questions every frame
        self._rests: dict[str, list[int]] = {}

    def __call__(self, question: str) -> str:
        return self.head + question + self.tail

    @staticmethod
    def make(backend: "TransformersBackend", head: str, tail: str, probes: Sequence[str]) -> "_SplitPrompt | None":
        tokenizer = backend.tokenizer
        special = {t.content: t for t in tokenizer.added_tokens_decoder.values() if t.special}
        end = next((t for c, t in special.items() if head.endswith(c)), None)
        start = next((t for c, t in special.items() if tail.startswith(c)), None)
        if end is None or start is None or end.rstrip or start.lstrip:
            return None
        split = _SplitPrompt(head, tail)
        for counts in ((1,) * head.count(backend.image_token), (3,) * head.count(backend.image_token)):
            whole = tokenizer([backend._expand(head + q + tail, counts) for q in probes])["input_ids"]
            if whole != split.token_ids(backend, counts, probes):
                return None
        return split

    def token_ids(self, backend: "TransformersBackend", counts: tuple[int, ...], questions: Sequence[str]) -> list[list[int]]:
        head = self._heads.get(counts)
        if head is None:
            head = backend.tokenizer(backend._expand(self.head, counts))["input_ids"]
            if len(self._heads) >= 8:
                self._heads = {}
            self._heads[counts] = head
        tail, rests = self.tail, self._rests
        new = [q for q in dict.fromkeys(questions) if q not in rests]
        if new:
            if len(rests) + len(new) > REST_CACHE_SIZE:
                rests.clear()
            ids = backend.tokenizer([q + tail for q in new], add_special_tokens=False)["input_ids"]
            rests.update(zip(new, ids))
        return [head + rests[q] for q in questions]


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to and including the first stop string (unchanged when none occurs)."""
    ends = [text.find(s) + len(s) for s in stop_strings if s in text]
    return text[: min(ends)] if ends else text


def same_tokens(engine: Response, reference: Response) -> bool:
    """Whether the engine produced the reference's greedy tokens, question by question.

    A row the engine ended on a stop string must be a prefix of the reference row (the reference
    only stops at end of turn); every other row must be identical.
    """
    if engine.token_ids is None or reference.token_ids is None or len(engine.token_ids) != len(reference.token_ids):
        return False
    for got, ref, reason in zip(engine.token_ids, reference.token_ids, engine.finish_reasons):
        if got != (ref[: len(got)] if reason == "stop" else ref):
            return False
    return True
