"""Small randomly initialised Qwen3-VL (and Qwen2.5-VL) checkpoints built offline.

Model hubs are not always reachable (CI, robots without internet), so tests, benchmarks and the
default model start from checkpoints built here: a byte-level BPE tokenizer trained offline on the
protocol's own texts (with the Qwen-VL special tokens and a ChatML chat template), a PIL image
processor, and a Qwen3-VL or Qwen2.5-VL model of a chosen size. The checkpoint is written with
``save_pretrained`` and is loaded back through exactly the path users use
(:func:`vlm3_ros.engine.checkpoint.load_checkpoint`).

Presets:

* ``test``: about 0.25 M parameters; seconds to build, milliseconds per forward.
* ``bench``: larger, shaped so that vision encoding and prefill weigh against decoding roughly as in
  Qwen3-VL-4B on a 640x480 frame unified to f = 1000 px (about 880 image tokens).
* ``default``: about 0.9 M parameters, initialised for training: the size of the default model
  that ``vlm3-train default-model`` trains on synthetic scenes on a CPU in minutes.
* ``qwen3-vl-4b``: the real Qwen3-VL-4B dimensions (random weights), for GPU measurements.
* ``test-qwen2.5-vl``: the ``test`` size in the Qwen2.5-VL architecture (14 px patches, windowed
  vision attention, no deepstack), so the engine is tested on both families.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import protocol

__all__ = ["PRESETS", "ModelPreset", "build_checkpoint", "build_tokenizer", "CHAT_TEMPLATE", "SPECIAL_TOKENS"]

# Qwen-VL special tokens, in Qwen's order.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added (non-special) tokens, as in Qwen3's vocabulary.
ADDED_TOKENS = ("<think>", "</think>")

# The pre-tokenisation split of the Qwen2/Qwen3 tokenizers (single digits, words with a leading space).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML with Qwen-VL image placeholders; string or list contents; no default system message.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class Family:
    """What differs between the Qwen-VL architectures a checkpoint can be built in (keyed by the
    checkpoint's ``model_type``, which also picks the processor class)."""

    config_class: str  # transformers class names
    model_class: str
    patch_size: int
    rope: dict[str, Any]  # rope parameters besides the type and mrope_section


FAMILIES: dict[str, Family] = {
    "qwen3_vl": Family("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", 16,
                       {"rope_theta": 5_000_000.0, "mrope_interleaved": True}),
    "qwen2_5_vl": Family("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", 14,
                         {"rope_theta": 1_000_000.0}),
}


@dataclass(frozen=True)
class ModelPreset:
    """Dimensions of a generated checkpoint."""

    text: dict[str, Any]
    vision: dict[str, Any]
    embedding_rows: int | None = None  # None: the tokenizer's size rounded up to a multiple of 64
    initializer_range: float = 0.2
    family: str = "qwen3_vl"  # a key of FAMILIES (a model_type)


PRESETS: dict[str, ModelPreset] = {
    "test": ModelPreset(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0]),
    ),
    "bench": ModelPreset(
        text=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=64, mrope_section=[8, 12, 12]),
        vision=dict(depth=6, hidden_size=96, intermediate_size=384, num_heads=2, num_position_embeddings=256,
                    deepstack_visual_indexes=[1, 3, 5]),
    ),
    "default": ModelPreset(
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, mrope_section=[4, 6, 6]),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0]),
        initializer_range=0.02,
    ),
    "qwen3-vl-4b": ModelPreset(
        text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17]),
        embedding_rows=151936,
        initializer_range=0.02,
    ),
    "test-qwen2.5-vl": ModelPreset(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                    fullatt_block_indexes=[1]),
        family="qwen2_5_vl",
    ),
}


def _rendered(rng: random.Random, template: str, coord_scale: int) -> str:
    """``template`` with every field filled: integers in [0, coord_scale] for plain fields, numbers
    of either sign for formatted ones."""
    import string

    fields = {name: (rng.uniform(-90.0, 90.0) if spec else rng.randint(0, coord_scale))
              for _, name, spec, _ in string.Formatter().parse(template) if name}
    return template.format(**fields)


def _corpus(seed: int, specs: list[protocol.TaskSpec] | None = None) -> list[str]:
    """Protocol texts (questions and answers of every task) to train the tokenizer on, with the
    texts of ``specs`` that differ from the built-in ones (e.g. compact specs)."""
    rng = random.Random(seed)
    own = [s for s in specs or () if protocol.TASKS.get(s.name) != s]
    extra: list[str] = []
    for spec in own:
        for template in [*spec.questions.values(), *spec.answers.values()]:
            extra.extend(_rendered(rng, template, spec.coord_scale or 1000) for _ in range(400))
    texts: list[str] = []
    for _ in range(400):
        texts.append(protocol.depth_question(rng.randint(0, 2000), rng.randint(0, 2000)))
        texts.append(protocol.format_depth_answer(rng.uniform(0.05, 80.0)))
        texts.append(protocol.correspondence_question(rng.randint(0, 1000), rng.randint(0, 1000), think=True))
        texts.append(protocol.format_correspondence_answer(rng.randint(0, 1000), rng.randint(0, 1000)))
    texts.extend(protocol.pose_questions().values())
    texts.extend(protocol.POSE_ANSWERS.values())
    texts.append("The camera moves left, right, up, down, forward, backward, barely, unit vector (+0.00, -1.00, +0.00).")
    texts += extra
    # The chat template's role names, once per text: every prompt holds them (one token each in
    # the Qwen tokenizers).
    return texts + ["user", "assistant"] * len(texts)


def build_tokenizer(vocab_size: int = 1000, seed: int = 0, specs: list[protocol.TaskSpec] | None = None):
    """A byte-level BPE tokenizer with the Qwen-VL special tokens, trained offline on the protocol's
    texts (and those of ``specs``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(seed, specs), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tokenizer.add_tokens(list(ADDED_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _embedding_rows(tokenizer, preset: ModelPreset) -> int:
    rows = max(len(tokenizer), preset.embedding_rows or 0)
    return (rows + 63) // 64 * 64


def build_checkpoint(
    output_dir: str | os.PathLike[str],
    preset: str = "test",
    *,
    seed: int = 0,
    specs: list[protocol.TaskSpec] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a randomly initialised checkpoint (model, processor, protocol file) of a preset.

    The directory is written atomically: built in a temporary sibling and renamed into place.
    """
    import torch
    import transformers
    from transformers import GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .checkpoint import processor_class

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    output_dir = Path(output_dir)
    if output_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{output_dir} already exists")
        shutil.rmtree(output_dir)
    cfg = PRESETS[preset]
    family = FAMILIES[cfg.family]

    tokenizer = build_tokenizer(seed=seed, specs=specs)
    merged_patch = family.patch_size * 2  # the side of one image token in pixels
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=family.patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 64 * merged_patch**2, "longest_edge": 16384 * merged_patch**2},
    )
    processor = processor_class(cfg.family)(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)

    tid = tokenizer.convert_tokens_to_ids
    text = dict(cfg.text)
    mrope_section = text.pop("mrope_section")
    config = getattr(transformers, family.config_class)(
        text_config=dict(
            vocab_size=_embedding_rows(tokenizer, cfg),
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "mrope_section": mrope_section, **family.rope},
            initializer_range=cfg.initializer_range,
            tie_word_embeddings=True,
            pad_token_id=tid("<|endoftext|>"),
            bos_token_id=tid("<|endoftext|>"),
            eos_token_id=tid("<|im_end|>"),
            **text,
        ),
        vision_config=dict(
            patch_size=family.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=cfg.text["hidden_size"],
            initializer_range=cfg.initializer_range,
            **cfg.vision,
        ),
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    config.initializer_range = cfg.initializer_range
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tid("<|im_end|>"), tid("<|endoftext|>")],
        pad_token_id=tid("<|endoftext|>"),
        do_sample=False,
    )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        protocol.save_protocol(tmp, specs or list(protocol.TASKS.values()))
        (tmp / "vlm3_model_card.json").write_text(
            json.dumps({"preset": preset, "seed": seed, "initialised": "random"}, indent=2) + "\n"
        )
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir
