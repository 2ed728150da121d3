"""Locating and loading Qwen-VL checkpoints (local directories or Hugging Face hub ids).

Loading is offline by default: a hub id is looked up in the local Hugging Face cache only, unless
``offline=False``. A missing or broken checkpoint raises :class:`EngineError` naming the path and
what is missing. The processor is assembled from the checkpoint's tokenizer and image-processor
configuration with the PIL image processor, so no video processor (and no torchvision) is needed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from .. import protocol
from .base import EngineError

__all__ = ["processor_class", "LoadedCheckpoint", "load_checkpoint", "resolve_checkpoint", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen2_vl")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
_IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _image_only(base):
    """A processor class like ``base`` (a Qwen-VL processor) that has no video processor."""

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

        def save_pretrained(self, save_directory, *args, **kwargs):
            out = super().save_pretrained(save_directory, *args, **kwargs)
            # Record the standard class so other tools (with a video processor) load it as usual.
            path = Path(save_directory) / "processor_config.json"
            if path.is_file():
                data = json.loads(path.read_text())
                data["processor_class"] = base.__name__
                path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            return out

    ImageOnlyProcessor.__name__ = f"ImageOnly{base.__name__}"
    ImageOnlyProcessor.__qualname__ = ImageOnlyProcessor.__name__
    return ImageOnlyProcessor


@functools.cache
def processor_class(model_type: str):
    """The image-only processor class for a checkpoint's ``model_type`` (one of SUPPORTED_MODEL_TYPES)."""
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor

    base = {"qwen3_vl": Qwen3VLProcessor, "qwen3_vl_moe": Qwen3VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor,
            "qwen2_vl": Qwen2_5_VLProcessor}[model_type]
    return _image_only(base)


@dataclass
class LoadedCheckpoint:
    """A model, its processor and the task specs it serves."""

    path: Path
    model: Any
    processor: Any
    specs: Mapping[str, protocol.TaskSpec]
    model_type: str
    protocol_file: bool

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def resolve_checkpoint(name_or_path: str | os.PathLike[str], *, offline: bool = True, revision: str | None = None) -> Path:
    """A local directory for ``name_or_path`` (a directory, or a hub id found in the local cache)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    text = str(name_or_path)
    looks_like_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_id:
        raise EngineError(f"checkpoint directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, revision=revision, local_files_only=offline))
    except Exception as exc:  # the hub library raises several unrelated types
        hint = (
            "it is not in the local Hugging Face cache (loading is offline by default; pass offline=False / "
            "--online to download it)"
            if offline
            else f"download failed: {exc}"
        )
        raise EngineError(f"checkpoint {text!r} is neither a local directory nor available: {hint}") from None


def _check_files(path: Path) -> dict[str, Any]:
    missing = []
    config_path = path / "config.json"
    if not config_path.is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in _WEIGHT_FILES) and not list(path.glob("*.safetensors")):
        missing.append("model weights (" + " or ".join(_WEIGHT_FILES) + ")")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer files (" + " or ".join(_TOKENIZER_FILES) + ")")
    if not any((path / f).is_file() for f in _IMAGE_PROCESSOR_FILES):
        missing.append("image processor config (" + " or ".join(_IMAGE_PROCESSOR_FILES) + ")")
    if missing:
        raise EngineError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"checkpoint {path}: config.json is not valid JSON ({exc})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(
            f"checkpoint {path}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
        )
    return config


def _load_processor(path: Path, model_type: str):
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    chat_template = getattr(tokenizer, "chat_template", None)
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        chat_template = template_file.read_text()
    elif (path / "chat_template.json").is_file():
        chat_template = json.loads((path / "chat_template.json").read_text()).get("chat_template", chat_template)
    if not chat_template:
        raise EngineError(f"checkpoint {path} has no chat template (chat_template.jinja or in tokenizer_config.json)")
    return processor_class(model_type)(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Loading a checkpoint prints no progress bar (transformers shows one per load otherwise)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def pick_device_dtype(device: str | None = "auto", dtype: str | None = "auto"):
    """``auto`` -> CUDA + bfloat16 when available, else CPU + float32."""
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available")
    if dtype in (None, "auto"):
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        try:
            torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[str(dtype)]
        except KeyError:
            raise EngineError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None
    return dev, torch_dtype


def load_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | None = "auto",
    dtype: str | None = "auto",
    adapter: str | os.PathLike[str] | None = None,
    offline: bool = True,
    revision: str | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint (and optionally a LoRA adapter, merged into the weights) for inference.

    The task specs come from the adapter's protocol file when it has one, else the checkpoint's,
    else the built-in VLM3 specs.
    """
    from transformers import AutoModelForImageTextToText

    path = resolve_checkpoint(name_or_path, offline=offline, revision=revision)
    config = _check_files(path)
    model_type = config["model_type"]
    dev, torch_dtype = pick_device_dtype(device, dtype)
    try:
        processor = _load_processor(path, model_type)
        with _no_progress_bars():
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"checkpoint {path} could not be loaded: {type(exc).__name__}: {exc}") from exc
    if adapter is not None:
        model = _merge_adapter(model, Path(adapter))
    model = model.to(dev).eval()
    # An adapter trained for other task specs carries its own protocol file; it takes precedence.
    try:
        specs = (protocol.load_protocol(adapter) if adapter is not None else None) or protocol.load_protocol(path)
    except (protocol.ProtocolError, KeyError, TypeError, ValueError) as exc:
        where = adapter if adapter is not None and (Path(adapter) / protocol.PROTOCOL_FILENAME).is_file() else path
        raise EngineError(f"{Path(where) / protocol.PROTOCOL_FILENAME} is not a usable protocol file: "
                          f"{type(exc).__name__}: {exc}") from None
    return LoadedCheckpoint(
        path=path,
        model=model,
        processor=processor,
        specs=specs if specs is not None else dict(protocol.TASKS),
        model_type=model_type,
        protocol_file=specs is not None,
    )


def _merge_adapter(model, adapter: Path):
    if not (adapter / "adapter_config.json").is_file():
        raise EngineError(f"LoRA adapter directory {adapter} has no adapter_config.json")
    try:
        from peft import PeftModel
    except ImportError:
        raise EngineError("loading a LoRA adapter needs the 'peft' package") from None
    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except Exception as exc:
        raise EngineError(f"LoRA adapter {adapter} could not be applied: {type(exc).__name__}: {exc}") from exc
