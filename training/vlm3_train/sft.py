"""Supervised fine-tuning of a Qwen-VL checkpoint on VLM3 datasets (Hugging Face ``Trainer``).

* Data: one or more dataset directories (``DATASET.md``: ``data/`` + ``vlm3_protocol.json``), mixed
  with :mod:`vlm3_train.mixture` weights; each sample's K question/answer turns follow its
  image(s) in one conversation (:mod:`vlm3_train.collate`), or are split into samples of at most
  ``questions_per_sample`` questions (``1`` = one question per sample, image repeated).
* Loss on answer tokens only (+ each answer's end-of-turn token).
* Full fine-tuning or LoRA (``peft``), exported merged or as an adapter directory.
* bfloat16 on CUDA, float32 on CPU; gradient accumulation; several GPUs through
  ``accelerate launch`` / ``torchrun`` with no code change (the ``Trainer`` does the distribution).
* Checkpoints ``<run_dir>/checkpoint-N`` are written into a staging directory and renamed into
  place only when complete, so an interrupted save never leaves a checkpoint that looks whole;
  ``resume=True`` continues from the latest one with the same step, optimizer, scheduler, RNG and
  data order.
* The result is a checkpoint directory (weights, processor, the datasets' protocol file, a
  training record) written atomically, which ``vlm3_ros.engine.load_backend("transformers",
  checkpoint=...)`` loads as it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlm3_ros import protocol
from vlm3_ros.paths import remove_stale_staging, staged_directory, write_json_atomic
from vlm3_ros.protocol import TaskSpec

from .collate import SFTCollator
from .mixture import MixtureSampler, mixture_weights

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "TrainingSet",
    "SFTDataset",
    "export_checkpoint",
    "latest_checkpoint",
    "load_training_set",
    "merge_specs",
    "option_name",
    "train",
]

log = logging.getLogger(__name__)

#: Linear layers of the Qwen-VL language model adapted by default with LoRA (the vision tower's
#: layers have other names and stay frozen).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINING_RECORD = "vlm3_training.json"
RUN_RECORD = "vlm3_run.json"
STAGING_DIR = ".staging"
# Settings an interrupted run is resumed with unchanged (the run record); the others (output,
# checkpoint cadence, logging, loader workers, export form) may differ freely.
_RESUME_KEYS = ("data", "model", "mixture", "weights", "questions_per_sample", "shuffle_questions", "batch_size",
                "grad_accum", "seed", "split", "tasks", "samples_per_epoch", "lora_r", "lora_targets", "lora_alpha",
                "lora_dropout", "freeze_vision", "learning_rate", "weight_decay", "warmup", "scheduler", "epochs",
                "max_steps", "max_grad_norm", "max_length", "gradient_checkpointing", "precision", "device")
#: Of those, the ones a resumed run takes up from its resumed step when asked (``allow_changed``,
#: ``--allow-changed``). The rest are fixed by what the checkpoint holds: the optimizer and
#: scheduler state carry the learning rate, weight decay and schedule (a new value would be
#: silently ignored), the weights carry the LoRA and freezing layout, and the data order is
#: replayed from the seed, mixture and batch settings.
CHANGEABLE_ON_RESUME = ("epochs", "max_steps", "max_grad_norm", "max_length", "gradient_checkpointing", "precision",
                        "device")
# Command-line spelling of settings whose option is not ``--`` + the name with dashes.
_OPTION_NAMES = {"learning_rate": "--lr", "device": "--cpu", "shuffle_questions": "--no-shuffle-questions",
                 "data": "DATA"}


class TrainError(ValueError):
    """Invalid training input or settings (bad dataset, conflicting task specs, bad options)."""


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainingSet:
    """One dataset directory opened for training: the rows used and their question counts."""

    path: Path
    dataset: Any  # datasets.Dataset
    specs: dict[str, TaskSpec]
    rows: np.ndarray
    num_questions: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.size)

    def tasks(self) -> list[str]:
        """The tasks of the rows used."""
        import pyarrow.compute as pc

        return sorted(pc.unique(self.dataset.data.column("task").take(self.rows)).to_pylist())


def _open_dataset(path: Path):
    from .dataset import DatasetFormatError, open_dataset

    try:
        return open_dataset(path)
    except DatasetFormatError as exc:
        raise TrainError(str(exc)) from None


def load_training_set(path: str | os.PathLike[str], *, split: str | None = "train", tasks: Sequence[str] | None = None) -> TrainingSet:
    """Open a dataset directory and select its rows of ``split`` (``None``: all) and ``tasks``."""
    import pyarrow.compute as pc

    path = Path(path)
    ds, specs = _open_dataset(path)
    table = ds.data
    counts = np.asarray(pc.list_value_length(table.column("questions")).to_numpy(zero_copy_only=False), dtype=np.int64)
    answers = np.asarray(pc.list_value_length(table.column("answers")).to_numpy(zero_copy_only=False), dtype=np.int64)
    bad = np.flatnonzero(counts != answers)
    if bad.size:
        raise TrainError(f"{path}: row {int(bad[0])} has {counts[bad[0]]} questions but {answers[bad[0]]} answers")
    keep = counts > 0
    task_column = np.asarray(table.column("task").to_pylist(), dtype=object)
    unknown = sorted(set(task_column.tolist()) - set(specs))
    if unknown:
        raise TrainError(f"{path}: task(s) {unknown} have no spec in its {protocol.PROTOCOL_FILENAME}")
    if tasks:
        keep &= np.isin(task_column, list(tasks))
    if split is not None and "meta" in ds.column_names:
        splits = np.asarray([json.loads(m).get("split", "train") if m else "train" for m in table.column("meta").to_pylist()])
        keep &= splits == split
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise TrainError(f"{path}: no rows of split {split!r}" + (f" and task(s) {list(tasks)}" if tasks else ""))
    return TrainingSet(path=path, dataset=ds, specs=specs, rows=rows, num_questions=counts[rows])


def merge_specs(sets: Sequence[TrainingSet]) -> dict[str, TaskSpec]:
    """The task specs of several datasets; a task defined differently by two of them is an error."""
    merged: dict[str, TaskSpec] = {}
    origin: dict[str, Path] = {}
    for s in sets:
        for name, spec in s.specs.items():
            if name in merged and merged[name].to_dict() != spec.to_dict():
                raise TrainError(
                    f"task {name!r} is defined differently by {origin[name]} and {s.path}; "
                    "datasets trained together must share their task specs"
                )
            merged.setdefault(name, spec)
            origin.setdefault(name, s.path)
    return merged


class SFTDataset:
    """The training items of several datasets, in one index space (a map-style torch dataset).

    An item is a row's question/answer turns ``[start, stop)``; with ``questions_per_sample`` = 0
    a row is one item, with ``n`` its questions are split into items of at most ``n``. Indices
    above ``len(self)`` carry an epoch (see :class:`~vlm3_train.mixture.MixtureSampler`): with
    ``shuffle_questions`` the turn order of an item is a fixed function of ``(seed, epoch, item)``.
    """

    def __init__(self, sets: Sequence[TrainingSet], *, questions_per_sample: int = 0, shuffle_questions: bool = True,
                 seed: int = 0) -> None:
        if questions_per_sample < 0:
            raise TrainError(f"questions_per_sample must be >= 0, got {questions_per_sample}")
        self.sets = list(sets)
        self.shuffle_questions = shuffle_questions
        self.seed = seed
        tables = []
        for d, s in enumerate(self.sets):
            per = s.num_questions if questions_per_sample == 0 else np.minimum(s.num_questions, questions_per_sample)
            chunks = -(-s.num_questions // per)
            row = np.repeat(s.rows, chunks)
            k = np.concatenate([np.arange(c) for c in chunks])
            start = k * np.repeat(per, chunks)
            stop = np.minimum(start + np.repeat(per, chunks), np.repeat(s.num_questions, chunks))
            tables.append(np.stack([np.full(row.size, d), row, start, stop], axis=1))
        self.items = np.concatenate(tables).astype(np.int64)
        self.sizes = [int(t.shape[0]) for t in tables]

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def num_labels_hint(self) -> int:
        """Questions in the whole index (each is one supervised answer)."""
        return int((self.items[:, 3] - self.items[:, 2]).sum())

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, position = divmod(int(index), len(self))
        d, row, start, stop = (int(v) for v in self.items[position])
        s = self.sets[d]
        record = s.dataset[row]
        spec = s.specs[record["task"]]
        images = list(record["images"])
        if len(images) != spec.num_images:
            raise TrainError(f"{s.path} row {row}: task {spec.name!r} takes {spec.num_images} image(s), the row has {len(images)}")
        questions = list(record["questions"])[start:stop]
        answers = list(record["answers"])[start:stop]
        if self.shuffle_questions and len(questions) > 1:
            order = np.random.default_rng([self.seed, epoch, position]).permutation(len(questions))
            questions = [questions[i] for i in order]
            answers = [answers[i] for i in order]
        return {"images": images, "questions": questions, "answers": answers, "task": spec.name}


# ------------------------------------------------------------------------------------------------
# Configuration and result
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Settings of a fine-tuning run (the ``vlm3-train train`` options).

    Attributes:
        data: dataset directories.
        model: base checkpoint (a directory or a hub id in the local cache).
        output: the checkpoint directory to write (atomically).
        run_dir: where resumable checkpoints go (default ``<output>.run``).
        mixture, weights: how often each dataset is drawn (``uniform``, ``size``, ``explicit``).
        samples_per_epoch: items drawn per epoch (default: the number of items).
        questions_per_sample: 0 = all of a row's questions in one sample; n = at most n.
        shuffle_questions: vary the turn order of a sample's questions per epoch.
        split, tasks: the rows used (``meta.split``; ``None`` = all) and task filter.
        epochs, max_steps: training length (``max_steps`` > 0 overrides ``epochs``).
        batch_size, grad_accum: per-device batch and gradient accumulation steps.
        learning_rate, weight_decay, warmup, scheduler, max_grad_norm: optimiser settings
            (``warmup``: a fraction of the steps when < 1, else a number of steps).
        lora_r: 0 = full fine-tuning; > 0 = LoRA rank (``lora_alpha``, ``lora_dropout``,
            ``lora_targets``); ``lora_export``: ``merged`` (a plain checkpoint) or ``adapter``.
        freeze_vision: keep the vision tower frozen in full fine-tuning.
        precision: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``bf16`` or ``fp32``.
        device: ``auto`` or ``cpu`` (force CPU even where CUDA exists).
        save_steps, save_total_limit: checkpoint every n optimizer steps (0 = never), keep the last m.
        resume: continue from the latest complete checkpoint in ``run_dir``.
        max_length: drop trailing turns of samples longer than this many tokens.
        overwrite: replace an existing ``output``.
        progress: show progress bars; ``logging_steps``: log the loss every n steps.
        allow_changed: settings of :data:`CHANGEABLE_ON_RESUME` that may differ from the
            interrupted run's on ``resume`` (any other change is refused).
        allow_spec_change: train on data whose task specs differ from the ones the base
            checkpoint serves (the result then serves the data's specs); refused otherwise.
    """

    data: list[str]
    model: str
    output: str
    run_dir: str | None = None
    mixture: str = "size"
    weights: list[float] | None = None
    samples_per_epoch: int | None = None
    questions_per_sample: int = 0
    shuffle_questions: bool = True
    split: str | None = "train"
    tasks: list[str] | None = None
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    lora_r: int = 0
    lora_alpha: int | None = None
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lora_export: str = "merged"
    freeze_vision: bool = False
    gradient_checkpointing: bool = False
    precision: str = "auto"
    device: str = "auto"
    save_steps: int = 500
    save_total_limit: int | None = 2
    resume: bool = False
    seed: int = 0
    max_length: int | None = None
    num_workers: int = 0
    logging_steps: int = 10
    progress: bool = True
    overwrite: bool = False
    allow_changed: list[str] = field(default_factory=list)
    allow_spec_change: bool = False

    def resolved_run_dir(self) -> Path:
        out = Path(self.output)
        return Path(self.run_dir) if self.run_dir else out.with_name(out.name + ".run")


@dataclass
class TrainResult:
    """What a run produced."""

    output: Path
    global_step: int
    train_loss: float
    seconds: float
    samples_seen: int
    labels_seen: int
    log_history: list[dict[str, Any]]
    resumed_from: str | None = None


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------


def _trainer_class():
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class VLM3Trainer(Trainer):
        """``Trainer`` with the mixture sampler and atomic checkpoints."""

        def __init__(self, *args, train_sampler=None, **kwargs) -> None:
            self._vlm3_sampler = train_sampler
            self._vlm3_staging: str | None = None
            self.vlm3_labels_seen = 0
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            return self._vlm3_sampler if self._vlm3_sampler is not None else super()._get_train_sampler(train_dataset)

        def _get_output_dir(self, trial) -> str:
            return self._vlm3_staging or super()._get_output_dir(trial)

        def _run_epoch(self, *args, **kwargs):
            # Resumed from the checkpoint of the last step (an export cut short): nothing is left
            # to train, but the Trainer would take one more step before checking its limit.
            if 0 < self.state.max_steps <= self.state.global_step:
                self.control.should_training_stop = True
                return None
            return super()._run_epoch(*args, **kwargs)

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.vlm3_labels_seen += int((inputs["labels"] != -100).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

        def _save_checkpoint(self, model, trial) -> None:
            run_dir = super()._get_output_dir(trial)
            name = f"checkpoint-{self.state.global_step}"
            staging_root = os.path.join(run_dir, STAGING_DIR)
            staged = os.path.join(staging_root, name)
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
                os.makedirs(staging_root, exist_ok=True)
            self.accelerator.wait_for_everyone()
            limit = self.args.save_total_limit
            self.args.save_total_limit = None
            self._vlm3_staging = staging_root
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._vlm3_staging = None
                self.args.save_total_limit = limit
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                final = os.path.join(run_dir, name)
                if os.path.isdir(final):
                    shutil.rmtree(final)
                _fsync_tree(Path(staged))
                os.replace(staged, final)
                _fsync_dir(Path(run_dir))
                rotate_checkpoints(output_dir=run_dir, save_total_limit=limit, use_mtime=False)
            self.accelerator.wait_for_everyone()

    return VLM3Trainer


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush a directory's files to disk before it is renamed into place."""
    for file in path.rglob("*"):
        if file.is_file():
            try:
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
            except OSError:
                pass
    _fsync_dir(path)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``run_dir`` (``None`` when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    last = get_last_checkpoint(str(run_dir))
    return Path(last) if last else None


def _precision(config: TrainConfig):
    import torch

    cuda = torch.cuda.is_available() and config.device != "cpu"
    if config.precision not in ("auto", "bf16", "fp32"):
        raise TrainError(f"precision must be auto, bf16 or fp32, got {config.precision!r}")
    bf16 = config.precision == "bf16" or (config.precision == "auto" and cuda)
    if bf16 and not cuda:
        raise TrainError("bf16 training needs a CUDA device; use --precision fp32 on CPU")
    return cuda, bf16


def _prepare_model(config: TrainConfig, loaded):
    model = loaded.model
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = False
    if config.lora_r > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise TrainError("LoRA needs the 'peft' package") from None
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha or 2 * config.lora_r,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            bias="none",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise TrainError(f"LoRA could not be applied with target modules {config.lora_targets}: {exc}") from None
    elif config.freeze_vision:
        visual = getattr(getattr(model, "model", model), "visual", None)
        if visual is None:
            raise TrainError("freeze_vision: the model has no vision tower named 'visual'")
        for p in visual.parameters():
            p.requires_grad_(False)
    if config.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def _check_config(config: TrainConfig) -> None:
    if not config.data:
        raise TrainError("no training data given")
    if config.batch_size < 1 or config.grad_accum < 1:
        raise TrainError(f"batch_size and grad_accum must be >= 1, got {config.batch_size} and {config.grad_accum}")
    if config.lora_r < 0:
        raise TrainError(f"lora_r must be >= 0, got {config.lora_r}")
    if config.lora_export not in ("merged", "adapter"):
        raise TrainError(f"lora_export must be 'merged' or 'adapter', got {config.lora_export!r}")
    if config.lora_export == "adapter" and config.lora_r == 0:
        raise TrainError("lora_export='adapter' needs LoRA (lora_r > 0)")
    if config.max_steps <= 0 and not config.epochs > 0:
        raise TrainError(f"train for epochs > 0 or max_steps > 0, got epochs={config.epochs}, max_steps={config.max_steps}")
    out = Path(config.output)
    if out.exists() and not config.overwrite:
        raise TrainError(f"output {out} already exists (pass --overwrite to replace it)")


def _check_specs(specs: Mapping[str, TaskSpec], loaded, model: str) -> None:
    """Refuse data prepared with other task specs than the ones the checkpoint serves (the same
    comparison as evaluation's): training on it would silently change the checkpoint's protocol.
    A task the checkpoint does not serve yet is new to it, not a change."""
    from .dataset import spec_differences

    for name, spec in specs.items():
        differ = spec_differences(spec, loaded.specs[name]) if name in loaded.specs else []
        if differ:
            how = (f"its protocol file (vlm3-train convert --spec-file {loaded.path})" if loaded.protocol_file
                   else "the built-in VLM3 specs (vlm3-train convert without --spec-file)")
            raise TrainError(
                f"task {name!r}: the data was prepared with other specs than the checkpoint {model} serves "
                f"({', '.join(differ)} differ); convert the data with {how}, or pass --allow-spec-change to train "
                "the checkpoint for the data's specs (the result then serves those)"
            )


def _checkpoint_step(checkpoint: str | os.PathLike[str]) -> int | None:
    try:
        return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_record(config: TrainConfig) -> dict[str, Any]:
    data = asdict(config)
    return {k: data[k] for k in _RESUME_KEYS}


def option_name(key: str) -> str:
    """The command-line option of a :class:`TrainConfig` setting (``learning_rate`` -> ``--lr``)."""
    return _OPTION_NAMES.get(key, "--" + key.replace("_", "-"))


def _option(key: str) -> str:
    return f"{key} ({option_name(key)})"


def _check_resume(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to resume with settings other than the interrupted run's, except those of
    ``config.allow_changed`` (which must be in :data:`CHANGEABLE_ON_RESUME`)."""
    by_option = {option_name(k).lstrip("-"): k for k in _RESUME_KEYS}
    allowed = {by_option.get(name.lstrip("-"), name.lstrip("-").replace("-", "_")) for name in config.allow_changed}
    fixed = sorted(allowed - set(CHANGEABLE_ON_RESUME))
    if fixed:
        raise TrainError(f"allow_changed: {', '.join(fixed)} cannot change on resume; only "
                         f"{', '.join(CHANGEABLE_ON_RESUME)} can (start a new run for other changes)")
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(_run_record(config)))
    # A record written by an older version may lack some settings: those cannot be compared.
    changed = [k for k in now if k in before and before[k] != now[k] and k not in allowed]
    if changed:
        listed = "; ".join(f"{_option(k)}: {before[k]!r} -> {now[k]!r}" for k in changed)
        hint = "run the same command as before, or start a new run (another --run-dir, or without --resume)"
        takes = [k for k in changed if k in CHANGEABLE_ON_RESUME]
        if takes:
            hint += (f"; to continue with the new {', '.join(takes)}, add --allow-changed "
                     + ",".join(option_name(k).lstrip("-") for k in takes))
        raise TrainError(f"cannot resume {run_dir}: settings differ from the interrupted run: {listed} ({hint})")


def export_checkpoint(model, processor, specs: Mapping[str, TaskSpec], output: str | os.PathLike[str], *,
                      record: Mapping[str, Any] | None = None, adapter: bool = False, overwrite: bool = False) -> Path:
    """Write a trained model as a checkpoint directory, atomically.

    ``model`` may be a ``peft`` model: with ``adapter=False`` its LoRA weights are merged into the
    base weights and a plain checkpoint is written; with ``adapter=True`` only the adapter is
    written (load it with ``load_backend("transformers", checkpoint=BASE, adapter=output)``). The
    processor, the protocol file (``specs``) and ``record`` (``vlm3_training.json``) go with it.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise TrainError(f"output {output} already exists")
    # A locked staging directory next to ``output`` (vlm3_ros.paths.staged_directory): a killed
    # export leaves it behind and the next export into the same folder removes it.
    with staged_directory(output, overwrite=overwrite) as tmp:
        to_save = model
        if not adapter and hasattr(model, "merge_and_unload"):
            to_save = model.merge_and_unload()
        to_save.config.use_cache = True
        if getattr(to_save.config, "text_config", None) is not None:
            to_save.config.text_config.use_cache = True
        to_save.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        protocol.save_protocol(tmp, dict(specs))
        if record is not None:
            write_json_atomic(tmp / TRAINING_RECORD, dict(record))
        _fsync_tree(tmp)
    _fsync_dir(output.parent)
    return output


def train(config: TrainConfig, *, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the checkpoint ``config.output``.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects.

    Raises:
        TrainError: invalid settings or data.
    """
    import torch
    from transformers import TrainingArguments, set_seed

    from vlm3_ros.engine.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    _check_config(config)
    cuda, bf16 = _precision(config)
    set_seed(config.seed)

    remove_stale_staging(Path(config.output).absolute().parent)  # what a killed export left
    sets = [load_training_set(p, split=config.split, tasks=config.tasks) for p in config.data]
    trained = sorted({task for s in sets for task in s.tasks()})
    specs = {task: spec for task, spec in merge_specs(sets).items() if task in trained}
    dataset = SFTDataset(sets, questions_per_sample=config.questions_per_sample,
                         shuffle_questions=config.shuffle_questions, seed=config.seed)
    probabilities = mixture_weights(dataset.sizes, config.mixture, config.weights)
    sampler = MixtureSampler(dataset.sizes, probabilities, num_samples=config.samples_per_epoch, seed=config.seed)

    loaded = load_checkpoint(config.model, device="cpu", dtype="bfloat16" if bf16 else "float32")
    if not config.allow_spec_change:
        _check_specs(specs, loaded, config.model)
    model = _prepare_model(config, loaded)
    collator = SFTCollator(loaded.processor, max_length=config.max_length)

    run_dir = config.resolved_run_dir()
    resume_from = None
    if config.resume:
        _check_resume(run_dir, config)
        last = latest_checkpoint(run_dir)
        if last is None:
            log.warning("no complete checkpoint in %s; starting from the beginning", run_dir)
        else:
            resume_from = str(last)
    shutil.rmtree(run_dir / STAGING_DIR, ignore_errors=True)

    import inspect

    checkpointing_arg = ("activation_checkpointing" if "activation_checkpointing" in
                         inspect.signature(TrainingArguments.__init__).parameters else "gradient_checkpointing")
    args = TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup,
        lr_scheduler_type=config.scheduler,
        max_grad_norm=config.max_grad_norm,
        bf16=bf16,
        use_cpu=not cuda,
        **{checkpointing_arg: config.gradient_checkpointing},
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=max(config.save_steps, 1),
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        label_names=["labels"],
        dataloader_num_workers=config.num_workers,
        report_to=[],
        disable_tqdm=not config.progress,
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        train_sampler=sampler,
        callbacks=list(callbacks),
    )
    if not config.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # no per-step log lines either
    if trainer.is_world_process_zero():
        write_json_atomic(run_dir / RUN_RECORD, _run_record(config))
    if config.progress and trainer.is_world_process_zero():
        print(
            f"training {config.model} on {len(dataset)} items ({dataset.num_labels_hint()} questions) from "
            f"{len(sets)} dataset(s), mixture {config.mixture} {np.round(probabilities, 3).tolist()}"
            + (f", resuming from {resume_from}" if resume_from else ""),
            flush=True,
        )
    output = trainer.train(resume_from_checkpoint=resume_from)
    train_loss = float(output.training_loss)
    if resume_from and trainer.state.global_step == _checkpoint_step(resume_from):
        # Resumed from the last step (only the export was left): the loss logged before the interruption.
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        train_loss = float(np.mean(logged)) if logged else float("nan")
    record = {
        "base_model": str(config.model),
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "datasets": [{"path": str(s.path), "rows": len(s), "items": n} for s, n in zip(sets, dataset.sizes)],
        "mixture_probabilities": probabilities.tolist(),
        "global_step": trainer.state.global_step,
        "train_loss": train_loss,
        "log_history": trainer.state.log_history,
        "resumed_from": resume_from,
        "seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
    }
    final_model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero():
        export_checkpoint(final_model, loaded.processor, specs, config.output, record=record,
                          adapter=config.lora_export == "adapter", overwrite=config.overwrite)
    trainer.accelerator.wait_for_everyone()
    seen = trainer.state.global_step * config.batch_size * config.grad_accum * trainer.args.world_size
    return TrainResult(
        output=Path(config.output),
        global_step=trainer.state.global_step,
        train_loss=train_loss,
        seconds=time.perf_counter() - t0,
        samples_seen=seen,
        labels_seen=trainer.vlm3_labels_seen,
        log_history=list(trainer.state.log_history),
        resumed_from=resume_from,
    )
