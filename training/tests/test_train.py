"""Fine-tuning: collation, mixtures, training steps, atomic resumable checkpoints, LoRA, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

from vlm3_ros import protocol  # noqa: E402
from vlm3_ros.engine import Request, load_backend  # noqa: E402

from train_helpers import small_dataset  # noqa: E402
from vlm3_train.collate import IGNORE_INDEX, CollationError, SFTCollator, encode_sample  # noqa: E402
from vlm3_train.mixture import MixtureError, MixtureSampler, mixture_weights, parse_weights  # noqa: E402


def _image(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return small_dataset(tmp_path_factory.mktemp("train-data"))


# ------------------------------------------------------------------------------------------------
# Collation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("question", [protocol.depth_question(1234, 567), protocol.depth_question(0, 2000)])
def test_first_question_tokens_equal_the_engine_prompt(tiny_backend, question):
    image = _image(0)
    request = Request(images=[image], questions=[question], spec=protocol.DEPTH)
    engine_ids = tiny_backend.encode(request).input_ids[0]
    sample = encode_sample(tiny_backend.processor, [image], [question], [protocol.format_depth_answer(2.5)])
    assert sample.input_ids[: len(engine_ids)] == engine_ids
    # Nothing of the prompt is supervised; the first supervised token is the first answer token.
    assert all(label == IGNORE_INDEX for label in sample.labels[: len(engine_ids)])
    assert sample.labels[len(engine_ids)] != IGNORE_INDEX
    assert sample.answer_spans[0][0] == len(engine_ids)


def test_labels_are_exactly_the_answers_and_end_of_turn(tiny_backend):
    processor = tiny_backend.processor
    tokenizer = processor.tokenizer
    questions = [protocol.depth_question(100 * k, 2000 - 150 * k) for k in range(1, 6)]
    answers = [protocol.format_depth_answer(0.5 + 1.37 * k) for k in range(5)]
    sample = encode_sample(processor, [_image(1)], questions, answers)
    labels = np.asarray(sample.labels)
    supervised = np.flatnonzero(labels != IGNORE_INDEX)
    # The supervised tokens are exactly the answer spans, and each decodes to answer + end of turn.
    assert supervised.tolist() == [i for a, b in sample.answer_spans for i in range(a, b)]
    for (a, b), answer in zip(sample.answer_spans, answers):
        assert tokenizer.decode(sample.labels[a:b]) == answer + "<|im_end|>"
        assert sample.labels[a:b] == sample.input_ids[a:b]
    decoded = tokenizer.decode(labels[supervised].tolist())
    assert decoded == "".join(a + "<|im_end|>" for a in answers)
    # Later questions are in the prompt (unsupervised), each after the previous answer.
    text = tokenizer.decode(sample.input_ids)
    assert all(text.count(q) == 1 for q in questions)
    assert text.index(questions[3]) > text.index(answers[2])


def test_two_image_pose_sample(tiny_backend):
    R = np.eye(3)
    answers_by_id = protocol.format_pose_answers(R, np.array([0.3, 0.0, 0.4]))
    questions = list(protocol.pose_questions().values())
    answers = [answers_by_id[q] for q in protocol.pose_questions()]
    sample = encode_sample(tiny_backend.processor, [_image(2), _image(3)], questions, answers)
    image_token = tiny_backend.image_token_id
    assert int(sample.image_grid_thw.shape[0]) == 2
    merge = tiny_backend.processor.image_processor.merge_size ** 2
    assert sum(t == image_token for t in sample.input_ids) == int(sample.image_grid_thw.prod(dim=1).sum()) // merge
    request = Request(images=[_image(2), _image(3)], questions=questions[:1], spec=protocol.POSE)
    engine_ids = tiny_backend.encode(request).input_ids[0]
    assert sample.input_ids[: len(engine_ids)] == engine_ids
    assert sample.num_labels == sum(len(tiny_backend.tokenizer(a + "<|im_end|>")["input_ids"]) for a in answers)


def test_max_length_keeps_whole_turns(tiny_backend):
    questions = [protocol.depth_question(10 * k, 20 * k) for k in range(1, 5)]
    answers = [protocol.format_depth_answer(1.0 + k) for k in range(4)]
    full = encode_sample(tiny_backend.processor, [_image(4)], questions, answers)
    limit = full.answer_spans[1][1] + 3  # room for two turns and part of the third
    cut = encode_sample(tiny_backend.processor, [_image(4)], questions, answers, max_length=limit)
    assert cut.num_questions == 2
    assert cut.input_ids == full.input_ids[: full.answer_spans[1][1]]
    with pytest.raises(CollationError, match="max_length"):
        encode_sample(tiny_backend.processor, [_image(4)], questions, answers, max_length=full.answer_spans[0][1] - 1)
    with pytest.raises(CollationError, match="one answer per question"):
        encode_sample(tiny_backend.processor, [_image(4)], questions, answers[:2])


def test_collated_batch_pads_right_and_masks_padding(tiny_backend):
    collator = SFTCollator(tiny_backend.processor)
    long = {"images": [_image(5)], "questions": [protocol.depth_question(1, 2), protocol.depth_question(3, 4)],
            "answers": [protocol.format_depth_answer(1.0), protocol.format_depth_answer(2.0)]}
    short = {"images": [_image(6)], "questions": long["questions"][:1], "answers": long["answers"][:1]}
    batch = collator([long, short])
    n_short = int(batch["attention_mask"][1].sum())
    assert n_short < batch["input_ids"].shape[1]
    assert (batch["labels"][1, n_short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n_short:] == collator.pad_token_id).all()
    assert batch["mm_token_type_ids"].sum().item() == (batch["input_ids"] == collator.image_token_id).sum().item()
    assert batch["image_grid_thw"].shape[0] == 2
    loss = tiny_backend.model(**batch).loss
    assert np.isfinite(loss.item())


# ------------------------------------------------------------------------------------------------
# Mixtures
# ------------------------------------------------------------------------------------------------


def test_mixture_draws_follow_the_weights():
    sizes = [400, 120, 30]
    weights = parse_weights("0.5,0.3,0.2")
    p = mixture_weights(sizes, "explicit", weights)
    sampler = MixtureSampler(sizes, p, num_samples=30000, seed=1)
    counts = np.bincount(sampler.dataset_of(np.fromiter(iter(sampler), dtype=np.int64)), minlength=3) / 30000
    # binomial standard deviation <= 0.003 here; 5 sigma
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.015)
    # Within a dataset, items are drawn from permutations: the small one is cycled evenly.
    positions = sampler.draw(0)
    small = positions[(positions >= 520)] - 520
    hist = np.bincount(small, minlength=30)
    assert hist.max() - hist.min() <= 1


def test_mixture_modes_and_determinism():
    sizes = [300, 100]
    np.testing.assert_allclose(mixture_weights(sizes, "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(mixture_weights(sizes, "size"), [0.75, 0.25])
    sampler = MixtureSampler(sizes, mixture_weights(sizes, "uniform"), seed=7)
    assert len(sampler) == 400
    first = list(sampler)
    assert list(sampler) == first  # same epoch, same draw
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and min(second) >= 400  # the epoch is encoded in the index
    assert sampler.decode(second[0])[0] == 1
    counts = np.bincount(sampler.dataset_of(np.array(second)), minlength=2)
    assert abs(counts[0] - 200) < 60


@pytest.mark.parametrize(
    "mixture, weights, message",
    [("explicit", None, "needs --weights"), ("explicit", [1.0], "1 weights for 2"), ("explicit", [1.0, -1.0], "non-negative"),
     ("uniform", [1.0, 1.0], "only used with"), ("bogus", None, "unknown mixture")],
)
def test_mixture_errors(mixture, weights, message):
    with pytest.raises(MixtureError, match=message):
        mixture_weights([10, 10], mixture, weights)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _config(dataset, model, output, **overrides):
    from vlm3_train.sft import TrainConfig

    # The tiny checkpoint serves the built-in specs (focal 1000 px); the small dataset is made with
    # a focal of 110 px, so training it is a deliberate change of its protocol.
    settings = dict(data=[str(dataset)], model=str(model), output=str(output), max_steps=6, batch_size=2,
                    learning_rate=2e-3, warmup=0, save_steps=3, progress=False, logging_steps=1, seed=0,
                    allow_spec_change=True)
    settings.update(overrides)
    return TrainConfig(**settings)


def _fixed_batch_loss(checkpoint, dataset) -> float:
    import torch

    from vlm3_ros.engine.checkpoint import load_checkpoint
    from vlm3_train.sft import SFTDataset, load_training_set

    loaded = load_checkpoint(checkpoint, device="cpu", dtype="float32")
    data = SFTDataset([load_training_set(dataset)], shuffle_questions=False)
    batch = SFTCollator(loaded.processor)([data[0], data[1], data[2]])
    with torch.no_grad():
        return float(loaded.model(**batch).loss)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset, tiny_checkpoint):
    from vlm3_train.sft import train

    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    result = train(_config(dataset, tiny_checkpoint, out))
    return result


def test_training_lowers_the_loss_and_exports_a_loadable_checkpoint(uninterrupted, dataset, tiny_checkpoint):
    assert uninterrupted.global_step == 6
    before = _fixed_batch_loss(tiny_checkpoint, dataset)
    after = _fixed_batch_loss(uninterrupted.output, dataset)
    assert after < 0.8 * before, (before, after)
    out = uninterrupted.output
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    assert protocol.load_protocol(out) == protocol.load_protocol(dataset)
    record = json.loads((out / "vlm3_training.json").read_text())
    assert record["global_step"] == 6 and record["base_model"] == str(tiny_checkpoint)
    assert uninterrupted.labels_seen > 0
    backend = load_backend("transformers", checkpoint=str(out), device="cpu", dtype="float32")
    spec = backend.spec("depth")
    assert spec.preprocess.value == 110.0
    response = backend.answer(Request(images=[_image(7)], questions=[protocol.depth_question(500, 500, spec)], spec=spec,
                                      max_new_tokens=8))
    assert response.generated_tokens[0] >= 1
    # No staging leftovers; checkpoints rotated to the last two.
    run_dir = out.with_name(out.name + ".run")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-6"]
    assert not (run_dir / ".staging").exists() or not any((run_dir / ".staging").iterdir())


def test_interrupted_run_resumes_to_the_same_state(uninterrupted, dataset, tiny_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from vlm3_train.sft import latest_checkpoint, train

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("simulated crash after the step-3 checkpoint")

    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_config(dataset, tiny_checkpoint, out), callbacks=[Crash()])
    assert not out.exists()  # the final export never happened
    run_dir = out.with_name(out.name + ".run")
    (run_dir / ".staging" / "checkpoint-9").mkdir(parents=True)  # a save cut short looks like this
    assert latest_checkpoint(run_dir).name == "checkpoint-3"

    resumed = train(_config(dataset, tiny_checkpoint, out, resume=True))
    assert resumed.resumed_from.endswith("checkpoint-3")
    assert resumed.global_step == uninterrupted.global_step == 6

    a = load_file(str(uninterrupted.output / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-7, msg=name)
    base = load_file(str(Path(tiny_checkpoint) / "model.safetensors"))
    assert any(not torch.equal(base[n], a[n]) for n in a)  # training did change the weights

    opt_a = torch.load(uninterrupted.output.with_name("uninterrupted.run") / "checkpoint-6" / "optimizer.pt", weights_only=False)
    opt_b = torch.load(run_dir / "checkpoint-6" / "optimizer.pt", weights_only=False)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for key in opt_a["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_b["state"][key][field], opt_a["state"][key][field], rtol=0, atol=1e-7)
    state_a = json.loads((uninterrupted.output.with_name("uninterrupted.run") / "checkpoint-6" / "trainer_state.json").read_text())
    state_b = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert [h.get("loss") for h in state_a["log_history"]] == [h.get("loss") for h in state_b["log_history"]]


def _copy_of_run(uninterrupted, tmp_path) -> Path:
    """A copy of the uninterrupted run's checkpoints (checkpoint-3, checkpoint-6, run record)."""
    import shutil

    return Path(shutil.copytree(uninterrupted.output.with_name("uninterrupted.run"), tmp_path / "copy.run"))


def test_resume_refuses_changed_settings_and_names_them(uninterrupted, dataset, tiny_checkpoint, tmp_path):
    from vlm3_train.sft import TrainError, train

    run_dir = _copy_of_run(uninterrupted, tmp_path)
    out = tmp_path / "resumed"

    def resume(**changes):
        return train(_config(dataset, tiny_checkpoint, out, run_dir=str(run_dir), resume=True, **changes))

    # A changed learning rate would be ignored (the optimizer and scheduler state carry the old one).
    with pytest.raises(TrainError, match=r"learning_rate \(--lr\): 0\.002 -> 0\.0001"):
        resume(learning_rate=1e-4)
    with pytest.raises(TrainError) as error:
        resume(batch_size=1, warmup=2, max_steps=8)
    message = str(error.value)
    assert "batch_size (--batch-size): 2 -> 1" in message and "warmup (--warmup): 0 -> 2" in message
    assert "max_steps (--max-steps): 6 -> 8" in message and "--allow-changed max-steps" in message
    assert "learning_rate" not in message
    # Only settings a resumed run takes up can be allowed to change.
    with pytest.raises(TrainError, match="learning_rate cannot change on resume"):
        resume(learning_rate=1e-4, allow_changed=["lr"])
    assert not out.exists() and sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-3", "checkpoint-6"]

    # The documented override: train two steps more than the interrupted run planned.
    longer = resume(max_steps=8, allow_changed=["max-steps"])
    assert longer.resumed_from.endswith("checkpoint-6") and longer.global_step == 8
    assert json.loads((out / "vlm3_training.json").read_text())["global_step"] == 8
    assert json.loads((run_dir / "vlm3_run.json").read_text())["max_steps"] == 8


def test_killed_export_is_cleaned_and_resumes_at_the_last_step(uninterrupted, dataset, tiny_checkpoint, tmp_path):
    """A real SIGKILL in the middle of the final export (weights written, protocol file not yet):
    the next run removes the staging directory it left and, resumed from the last step's
    checkpoint, trains no further step."""
    import dataclasses
    import signal
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from vlm3_train.sft import train

    out = tmp_path / "models" / "killed"
    config = dataclasses.asdict(_config(dataset, tiny_checkpoint, out))
    script = (
        "import json, os, signal, sys\n"
        "from vlm3_ros import protocol\n"
        "from vlm3_train import sft\n"
        "protocol.save_protocol = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "sft.train(sft.TrainConfig(**json.loads(sys.argv[1])))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(config)], capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    left = [p for p in out.parent.iterdir() if p.name != "killed.run"]
    assert len(left) == 1 and left[0].name.startswith(".killed.") and (left[0] / "model.safetensors").is_file()
    assert not out.exists()

    resumed = train(_config(dataset, tiny_checkpoint, out, resume=True))
    assert resumed.resumed_from.endswith("checkpoint-6")
    assert resumed.global_step == 6  # not 7: the checkpoint was the last step
    assert sorted(p.name for p in out.parent.iterdir()) == ["killed", "killed.run"]
    record = json.loads((out / "vlm3_training.json").read_text())
    assert record["global_step"] == 6
    assert record["train_loss"] == pytest.approx(np.mean([h["loss"] for h in uninterrupted.log_history if "loss" in h]))
    a = load_file(str(uninterrupted.output / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-7, msg=name)


def test_other_task_specs_are_refused_and_only_trained_tasks_are_exported(uninterrupted, dataset, tiny_checkpoint,
                                                                         tmp_path):
    from vlm3_train.sft import TrainError, train

    # The tiny checkpoint serves depth at focal 1000 px; the data was prepared at 110 px.
    with pytest.raises(TrainError, match=r"task 'depth'.*\(preprocess differ\).*--allow-spec-change"):
        train(_config(dataset, tiny_checkpoint, tmp_path / "refused", allow_spec_change=False))
    assert not (tmp_path / "refused").exists()

    # The trained checkpoint serves the data's specs: fine-tuning it again needs no permission, and a
    # depth-only run exports a protocol of depth alone.
    result = train(_config(dataset, uninterrupted.output, tmp_path / "depth-only", allow_spec_change=False,
                           tasks=["depth"], max_steps=1, save_steps=0))
    assert result.global_step == 1
    assert protocol.load_protocol(result.output) == {"depth": protocol.load_protocol(dataset)["depth"]}
    assert set(protocol.load_protocol(uninterrupted.output)) == {"depth", "pose"}


def test_lora_adapter_and_merged_exports_load_in_the_engine(dataset, tiny_checkpoint, tmp_path):
    import torch

    from vlm3_train.sft import train

    adapter = train(_config(dataset, tiny_checkpoint, tmp_path / "adapter", lora_r=4, lora_export="adapter",
                            max_steps=3, save_steps=0, learning_rate=5e-3))
    assert (adapter.output / "adapter_config.json").is_file()
    assert not (adapter.output / "model.safetensors").exists()
    config = json.loads((adapter.output / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) >= {"q_proj", "v_proj"}
    adapted = load_backend("transformers", checkpoint=str(tiny_checkpoint), adapter=str(adapter.output), device="cpu",
                           dtype="float32", warmup=False)
    plain = load_backend("transformers", checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", warmup=False)
    diffs = {n: float((p - dict(plain.model.named_parameters())[n]).abs().max().detach())
             for n, p in adapted.model.named_parameters()}
    changed = [n for n, d in diffs.items() if d > 0]
    assert changed and all(any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj")) for n in changed)
    assert not any("visual" in n for n in changed)

    merged = train(_config(dataset, tiny_checkpoint, tmp_path / "merged", lora_r=4, max_steps=3, save_steps=0,
                           learning_rate=5e-3))
    backend = load_backend("transformers", checkpoint=str(merged.output), device="cpu", dtype="float32", warmup=False)
    names = dict(backend.model.named_parameters())
    assert not any("lora" in n for n in names)
    for n, p in adapted.model.named_parameters():  # same seed and data: the merged weights equal base + adapter
        torch.testing.assert_close(names[n], p, rtol=0, atol=1e-6)


def test_quiet_commands_draw_no_progress_bars(uninterrupted, dataset, tmp_path, capfd):
    import re

    from transformers.utils import logging as hf_logging

    from vlm3_train.cli import main

    out = tmp_path / "quiet"
    assert main(["train", str(dataset), "--model", str(uninterrupted.output), "--output", str(out), "--tasks", "depth",
                 "--max-steps", "1", "--save-steps", "0", "--quiet"]) == 0
    assert main(["eval", "--checkpoint", str(out), str(dataset), "--output", str(tmp_path / "report"),
                 "--tasks", "depth", "--max-samples", "1", "--no-plots", "--quiet"]) == 0
    captured = capfd.readouterr()
    bars = re.findall(r"[^\n\r]*\d+%\|[^\n\r]*", captured.err)
    assert not bars, bars[:3]  # e.g. "Loading weights: 100%|...", "Writing model shards: 100%|..."
    assert json.loads(captured.out[: captured.out.index("}\n") + 2])["global_step"] == 1
    assert hf_logging.is_progress_bar_enabled()  # the library setting is restored afterwards
