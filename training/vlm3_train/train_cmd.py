"""``vlm3-train train``: supervised fine-tuning of a checkpoint on VLM3 datasets.

One GPU: ``vlm3-train train DATA --model CKPT --output OUT``. Several GPUs, same command under
``accelerate launch`` (or ``torchrun --nproc_per_node N -m vlm3_train.cli train ...``): the
Hugging Face ``Trainer`` distributes it, no option changes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HELP = "fine-tune a Qwen-VL checkpoint on VLM3 datasets (answer-only loss, packed questions, mixtures, LoRA, resumable)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .sft import CHANGEABLE_ON_RESUME, DEFAULT_LORA_TARGETS, option_name

    parser.add_argument("data", nargs="+", help="dataset directories (from `vlm3-train convert`)")
    parser.add_argument("--model", required=True, help="base checkpoint: a directory or a hub id in the local cache")
    parser.add_argument("--output", required=True, help="checkpoint directory to write (atomically)")
    parser.add_argument("--run-dir", help="resumable training checkpoints (default OUTPUT.run)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    data = parser.add_argument_group("data")
    data.add_argument("--mixture", choices=("uniform", "size", "explicit"), default="size",
                      help="how often each dataset is drawn: in proportion to its size (default), equally, "
                           "or by --weights")
    data.add_argument("--weights", help="explicit mixture weights, one per dataset, e.g. 0.5,0.3,0.2")
    data.add_argument("--samples-per-epoch", type=_positive_int, help="samples drawn per epoch (default: all items)")
    data.add_argument("--questions-per-sample", type=int, default=0,
                      help="questions packed after one image: 0 = all of a sample's questions (default), "
                           "1 = one question per sample (the image repeated for each)")
    data.add_argument("--no-shuffle-questions", action="store_true",
                      help="keep the stored question order (default: vary it per epoch)")
    data.add_argument("--split", default="train", choices=("train", "val", "all"), help="rows used (default train)")
    data.add_argument("--tasks", help="comma-separated tasks to train on (default: all in the data)")
    data.add_argument("--max-length", type=int, help="drop trailing question turns beyond this many tokens")
    data.add_argument("--num-workers", type=int, default=0, help="data loader worker processes (default 0: load in the training process)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=float, default=1.0, help="training epochs (default 1)")
    opt.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0 (default -1: use --epochs)")
    opt.add_argument("--batch-size", type=_positive_int, default=1, help="samples per device per step (default 1)")
    opt.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation steps (default 1)")
    opt.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5; LoRA: try 1e-4)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    opt.add_argument("--warmup", type=float, default=0.03, help="warmup: fraction of steps (< 1) or steps (>= 1) (default 0.03)")
    opt.add_argument("--scheduler", default="cosine", help="learning-rate schedule (transformers names; default cosine)")
    opt.add_argument("--max-grad-norm", type=float, default=1.0,
                     help="clip the gradient norm to this (default 1.0; 0 = no clipping)")
    opt.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                     help="default auto: bfloat16 on CUDA, float32 on CPU")
    opt.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is available")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    opt.add_argument("--freeze-vision", action="store_true", help="full fine-tuning with the vision tower frozen")
    opt.add_argument("--seed", type=int, default=0,
                     help="seed of the data order, question shuffling and LoRA initialisation (default 0)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=0, help="LoRA rank (default 0 = full fine-tuning)")
    lora.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 2 * rank)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA layers (default 0.05)")
    lora.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                      help="comma-separated module names to adapt (default: the language model's linear layers)")
    lora.add_argument("--lora-export", choices=("merged", "adapter"), default="merged",
                      help="merged (default): a plain checkpoint; adapter: an adapter directory (engine: adapter=OUTPUT)")
    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--save-steps", type=int, default=500, help="checkpoint every n optimizer steps (default 500; 0 = never)")
    ckpt.add_argument("--save-total-limit", type=int, default=2, help="keep the last n checkpoints (default 2)")
    ckpt.add_argument("--resume", action="store_true",
                      help="continue from the latest complete checkpoint in the run dir (changed settings are refused)")
    ckpt.add_argument("--allow-changed", metavar="SETTINGS",
                      help="with --resume: comma-separated settings that may differ from the interrupted run, among "
                           + ", ".join(option_name(k).lstrip("-") for k in CHANGEABLE_ON_RESUME)
                           + " (e.g. max-steps to train longer; default: none)")
    parser.add_argument("--allow-spec-change", action="store_true",
                        help="train on data prepared with other task specs (focal, coordinate range, questions) than "
                             "the checkpoint serves; the result then serves the data's specs (default: refused)")
    parser.add_argument("--logging-steps", type=_positive_int, default=10, help="log the loss every n steps (default 10)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace):
    """The :class:`~vlm3_train.sft.TrainConfig` of parsed command-line arguments."""
    from .mixture import parse_weights
    from .sft import TrainConfig

    return TrainConfig(
        data=list(args.data),
        model=args.model,
        output=args.output,
        run_dir=args.run_dir,
        mixture=args.mixture,
        weights=parse_weights(args.weights),
        samples_per_epoch=args.samples_per_epoch,
        questions_per_sample=args.questions_per_sample,
        shuffle_questions=not args.no_shuffle_questions,
        split=None if args.split == "all" else args.split,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        scheduler=args.scheduler,
        max_grad_norm=args.max_grad_norm,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
        lora_export=args.lora_export,
        freeze_vision=args.freeze_vision,
        gradient_checkpointing=args.gradient_checkpointing,
        precision=args.precision,
        device="cpu" if args.cpu else "auto",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        resume=args.resume,
        seed=args.seed,
        max_length=args.max_length,
        num_workers=args.num_workers,
        logging_steps=args.logging_steps,
        progress=not args.quiet,
        overwrite=args.overwrite,
        allow_changed=[t.strip() for t in (args.allow_changed or "").split(",") if t.strip()],
        allow_spec_change=args.allow_spec_change,
    )


def run(args: argparse.Namespace) -> int:
    from vlm3_ros.engine import EngineError

    from .collate import CollationError
    from .mixture import MixtureError
    from .progress import library_progress_bars
    from .sft import TrainError, train

    try:
        with library_progress_bars(not args.quiet):
            result = train(config_from_args(args))
    except (TrainError, MixtureError, CollationError, EngineError) as exc:
        print(f"vlm3-train train: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:  # one summary per distributed run
        return 0
    print(json.dumps({"output": str(result.output), "global_step": result.global_step,
                      "train_loss": result.train_loss, "seconds": round(result.seconds, 1),
                      "labels_seen": result.labels_seen, "resumed_from": result.resumed_from}, indent=2))
    return 0
