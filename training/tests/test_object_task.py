"""The object task in the training package: object Q/A converted from synthetic scenes (checked
against the scene's exact geometry) and from bags with vision_msgs/Detection2DArray + depth, the
SpatialRGPT-style metrics of ``vlm3-train eval`` (exact for the oracle), the training recipe
convert -> train -> eval on a tiny model, and the oracle on real 7-Scenes frames."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vlm3_ros import bags, objects, protocol
from vlm3_ros.detections import DETECTION_ARRAY_TYPE, Detection, detection_array_msg
from vlm3_ros.engine import load_backend
from vlm3_ros.protocol import Preprocess
from vlm3_train import synthetic as syn
from vlm3_train.convert import ConvertError, ConvertOptions, convert_bags, convert_frames
from vlm3_train.convert.bag_detections import BagDetections
from vlm3_train.synthetic_objects import ObjectFrames, frame_detections, object_in_camera

#: every object question but the volume comparisons (the thin boxes below have no measurable depth extent)
QUESTIONS = tuple(q for q, spec in protocol.OBJECT_QUESTIONS.items() if spec.measure != "volume")
#: thin boxes facing the camera: (centre, half extents), world frame (z up); seen from (-3, 0, 1.2)
#: looking along +x: A left and a little below the camera, B right, higher and farther, C nearest and low
BOXES = {"A": ((0.0, 0.8, 1.0), (0.03, 0.4, 0.3)), "B": ((1.0, -0.9, 1.4), (0.03, 0.3, 0.5)),
         "C": ((-1.0, 0.0, 0.6), (0.03, 0.2, 0.2))}


def _sequence(frames: int = 2) -> syn.SyntheticSequence:
    rng = np.random.default_rng(5)
    room = (4.0, 4.0, 3.0)
    surfaces = syn.room_surfaces(*room, [syn.random_texture(rng) for _ in range(5)])
    surfaces += [syn.Box(np.array(c), np.array(h), 0.0, syn.random_texture(rng), name) for name, (c, h) in BOXES.items()]
    scene = syn.Scene(tuple(surfaces), np.array([0.3, 0.2, 0.93]), 0.4, room)
    poses = np.stack([syn.look_pose((-3.0, 0.1 * k, 1.2), 0.0) for k in range(frames)])
    stamps = syn.START_STAMP_NS + syn.FRAME_PERIOD_NS * np.arange(frames, dtype=np.int64)
    return syn.SyntheticSequence(scene, syn.default_intrinsics(), poses, stamps, 1, 0)


def _options(**kw) -> ConvertOptions:
    return ConvertOptions(tasks=("object",), objects_per_image=6, object_relations=1000, object_questions=QUESTIONS, **kw)


def _rows(path: Path) -> list:
    import datasets

    return list(datasets.load_from_disk(str(path / "data")))


@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("objects")
    seq = _sequence()
    bag = syn.write_bag(seq, root / "bag", detections=True)
    from_frames = convert_frames({"scene": ObjectFrames(seq)}, root / "frames", _options(), progress=False)
    from_bag = convert_bags([bag], root / "from_bag", _options(), progress=False)
    return seq, bag, from_frames, from_bag


def test_synthetic_object_targets_equal_the_scene_geometry(scene_data):
    seq, _, result, _ = scene_data
    rows = _rows(result.path)
    assert result.summary["samples"] == {"object": 2} and len(rows) == 2
    by_name = {s.name: s for s in seq.scene.surfaces}
    for row in rows:
        meta, targets = json.loads(row["meta"]), json.loads(row["targets"])
        T = seq.poses[meta["frames"][0]]
        K = np.asarray(meta["K"][0])
        scale = K[0, 0] / seq.intrinsics.fx  # prepared (focal 1000) / original
        truth = {}
        assert sorted(o["id"] for o in targets["objects"]) == ["A", "B", "C"]
        for obj in targets["objects"]:
            lower, upper = object_in_camera(by_name[obj["id"]], T)
            truth[tuple(obj["region"])] = objects.ObjectExtent(lower, upper, 1)
            size = upper - lower
            assert obj["label"] == "box" and obj["score"] == 1.0
            # The detection box is the bounding box of the projected corners (within a pixel).
            front = lower[2]
            corners = (by_name[obj["id"]].corners() - T[:3, 3]) @ T[:3, :3]
            uv = corners[:, :2] / corners[:, 2:] * (seq.intrinsics.fx, seq.intrinsics.fy) \
                + (seq.intrinsics.cx + 0.5, seq.intrinsics.cy + 0.5)
            projected = [*uv.min(axis=0), *uv.max(axis=0)]
            np.testing.assert_allclose(obj["box"], projected, atol=1.0)
            # The measured extent is the visible face's: width and height within the 1st-99th
            # percentile trimming (2 %) and a prepared pixel; the nearest z is the front face.
            measured = np.asarray(obj["upper"]) - np.asarray(obj["lower"])
            np.testing.assert_allclose(measured[:2], size[:2], atol=0.01, rtol=0.025)
            assert obj["lower"][2] == pytest.approx(front, abs=1e-3)
            np.testing.assert_allclose((np.asarray(obj["lower"]) + obj["upper"])[:2] / 2, (lower + upper)[:2] / 2,
                                       atol=0.01)
        assert scale > 4
        ids = targets["question_ids"]
        assert sorted(set(ids)) == sorted(QUESTIONS)  # every question, every ordered pair
        assert len(ids) == 3 * 2 + 6 * (len(QUESTIONS) - 2) == len(row["questions"])
        for qid, regions, value, question, answer in zip(ids, targets["regions"], targets["values"], row["questions"],
                                                         row["answers"]):
            expected = objects.true_answer(qid, *[truth[tuple(r)] for r in regions])
            kind = protocol.OBJECT_QUESTIONS[qid].kind
            if kind == "quantity":
                assert value == pytest.approx(expected, abs=0.03, rel=0.03), (qid, question)
            else:
                assert value == expected, (qid, question)
            # The question references the regions; the answer text reads back as the value.
            assert protocol.parse_object_question(question) == (qid, [tuple(r) for r in regions])
            parsed = protocol.parse_object_answer(qid, answer, [tuple(r) for r in regions])
            assert parsed == (pytest.approx(value, abs=0.005 + 1e-9) if kind == "quantity" else value)


def test_a_bag_with_detections_gives_the_same_questions_and_answers(scene_data):
    seq, bag, from_frames, from_bag = scene_data
    assert "/detections" in bags.bag_info(bag)["topics"]
    found = BagDetections(bag, "/detections", 0, lambda *a, **k: None)
    for i in range(len(seq)):
        expected = frame_detections(seq, i)
        got = found.at(int(seq.stamps_ns[i]))
        assert [(d.id, d.label, d.score) for d in got] == [(d.id, d.label, d.score) for d in expected]
        np.testing.assert_array_equal(np.stack([d.box for d in got]), np.stack([d.box for d in expected]))
    a, b = _rows(from_frames.path), _rows(from_bag.path)
    assert [r["questions"] for r in a] == [r["questions"] for r in b]
    assert [r["answers"] for r in a] == [r["answers"] for r in b]
    assert [json.loads(r["targets"]) for r in a] == [json.loads(r["targets"]) for r in b]
    assert from_bag.summary["bags"][0]["detections"] == {"topic": "/detections", "messages": 2, "unpaired": 0}


def test_bad_detections_and_bags_without_them_are_counted_or_refused(tmp_path):
    seq = _sequence(3)
    boxes = frame_detections(seq, 0)
    with bags.RgbdBagWriter(tmp_path / "bag", depth_encoding="32FC1") as writer:
        for i in range(3):
            f = seq.frame(i)
            writer.write_frame(f.stamp_ns, rgb=f.rgb, intrinsics=seq.intrinsics, depth_m=f.depth, T_w_c=f.T_w_c)
            if i == 1:
                continue  # frame 1 has no detections
            dets = boxes + [Detection(np.array([10.0, 10.0, 10.0, 20.0]), "empty", [("box", 0.9)])]
            if i == 2:  # a detector box outside the image, and one over a region without depth pixels
                dets = [Detection(np.array([300.0, 10.0, 320.0, 20.0]), "outside", [("box", 0.9)]), boxes[0]]
            writer.write("/detections", DETECTION_ARRAY_TYPE, f.stamp_ns,
                         detection_array_msg(writer.store, f.stamp_ns, writer.camera_frame, dets))
    result = convert_bags([tmp_path / "bag"], tmp_path / "ds", _options(), progress=False)
    skipped = result.summary["skipped"]
    assert result.summary["samples"] == {"object": 2}
    assert skipped["bad_detections"] == 1 and skipped["frames_without_detections"] == 1
    assert skipped["objects_outside"] == 1
    rows = _rows(tmp_path / "ds")
    assert [len(json.loads(r["targets"])["objects"]) for r in rows] == [3, 1]
    assert len(rows[1]["questions"]) == 2  # one object: its width and height only

    syn.write_bag(seq, tmp_path / "plain")
    with pytest.raises(ConvertError, match="no detections topic /detections"):
        convert_bags([tmp_path / "plain"], tmp_path / "none", _options(), progress=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ConvertError, match="object_questions.*unknown object question 'size'"):
        ConvertOptions(tasks=("object",), object_questions=("size",)).validate()


def _oracle_is_exact(report: dict, questions: int) -> None:
    obj = report["object"]
    assert obj["num_questions"] == questions and obj["num_unparseable"] == 0
    quant, qual = obj["quantitative"], obj["qualitative"]
    assert quant["count"] + (qual["count"] if qual else 0) == questions
    assert quant["success_rate"] == 1.0 and quant["unparseable"] == 0
    assert qual is None or (qual["accuracy"] == 1.0 and qual["unparseable"] == 0)
    # Answers have 2 decimals: |error| <= 0.005 m, so the relative error is within 0.005 / truth.
    assert quant["abs_rel"] <= 0.005 / 0.2
    for qid, per in obj["per_type"].items():
        key = "success_rate" if protocol.OBJECT_QUESTIONS[qid].kind == "quantity" else "accuracy"
        assert per[key] == 1.0 and per["unparseable"] == 0


def test_eval_of_the_oracle_is_exact_within_rounding(scene_data, tmp_path, capsys):
    from vlm3_train.cli import main
    from vlm3_train.evaluate import evaluate_datasets

    _, bag, _, from_bag = scene_data
    questions = from_bag.summary["questions"]["object"]
    report = evaluate_datasets(load_backend("oracle"), [from_bag.path], tmp_path / "r", oracle=True, split="all",
                               progress=False)
    _oracle_is_exact(report, questions)
    assert json.loads((tmp_path / "r" / "report.json").read_text())["object"] == report["object"]
    capsys.readouterr()
    assert main(["eval", "--oracle", "--bag", str(bag), "--tasks", "object", "--output", str(tmp_path / "b"),
                 "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # Converted with the default options: per frame the 3 objects' width and height and 8 relations.
    _oracle_is_exact(printed, 2 * (3 * 2 + 8))
    assert printed["samples"] == {"object": 2}


def test_recipe_convert_train_eval_trains_the_object_task(tmp_path, tiny_checkpoint, capsys):
    """The documented recipe on a tiny model: synthetic bags with detections -> convert --tasks
    object -> train -> eval of the checkpoint (and of the oracle) on held-out data."""
    import torch

    from vlm3_ros.engine.checkpoint import load_checkpoint
    from vlm3_train.cli import main
    from vlm3_train.collate import SFTCollator
    from vlm3_train.sft import SFTDataset, TrainConfig, load_training_set, train

    assert main(["synth", str(tmp_path / "synth"), "--scenes", "2", "--frames", "3", "--seed", "4", "--supersample",
                 "1", "--detections", "--quiet"]) == 0
    # Small prepared images (focal 110 px) keep the tiny model fast: the object spec with another focal.
    spec = replace(protocol.OBJECT, preprocess=Preprocess("focal", 110.0))
    protocol.save_protocol(tmp_path / "spec", [spec])
    assert main(["convert", str(tmp_path / "synth" / "scene_000"), str(tmp_path / "synth" / "scene_001"),
                 str(tmp_path / "data"), "--tasks", "object", "--spec-file", str(tmp_path / "spec"),
                 "--object-relations", "4", "--split", "bag", "--val-fraction", "0.5", "--quiet"]) == 0
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    n_train, n_val = summary["samples_by_split"]["train"]["object"], summary["samples_by_split"]["val"]["object"]
    assert n_train >= 2 and n_val >= 1
    rows = _rows(tmp_path / "data")
    assert all(r["task"] == "object" and r["answers"] for r in rows)

    def fixed_batch_loss(checkpoint) -> float:
        loaded = load_checkpoint(checkpoint, device="cpu", dtype="float32")
        data = SFTDataset([load_training_set(tmp_path / "data")], shuffle_questions=False)
        batch = SFTCollator(loaded.processor)([data[0], data[1]])
        with torch.no_grad():
            return float(loaded.model(**batch).loss)

    result = train(TrainConfig(data=[str(tmp_path / "data")], model=str(tiny_checkpoint), output=str(tmp_path / "model"),
                               max_steps=6, batch_size=2, learning_rate=2e-3, warmup=0, save_steps=0, progress=False,
                               logging_steps=1, seed=0, allow_spec_change=True))
    assert result.global_step == 6
    assert protocol.load_protocol(result.output) == {"object": spec}
    before, after = fixed_batch_loss(tiny_checkpoint), fixed_batch_loss(result.output)
    assert after < 0.8 * before, (before, after)

    val_questions = sum(len(r["questions"]) for r in rows if json.loads(r["meta"])["split"] == "val")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "data"), "--checkpoint", str(result.output), "--output", str(tmp_path / "ev"),
                 "--max-new-tokens", "48", "--quiet", "--no-plots"]) == 0
    printed = json.loads(capsys.readouterr().out)
    obj = printed["object"]
    assert printed["samples"] == {"object": n_val} and obj["num_questions"] == val_questions
    kinds = [obj[k] for k in ("quantitative", "qualitative") if obj[k]]
    assert sum(k["count"] for k in kinds) == val_questions
    assert sum(k["unparseable"] for k in kinds) == obj["num_unparseable"]
    assert all(0.0 <= k.get("success_rate", k.get("accuracy")) <= 1.0 for k in kinds)
    assert main(["eval", str(tmp_path / "data"), "--oracle", "--output", str(tmp_path / "ev-oracle"), "--split", "all",
                 "--quiet", "--no-plots"]) == 0
    oracle = json.loads(capsys.readouterr().out)
    _oracle_is_exact(oracle, sum(len(r["questions"]) for r in rows))
    assert oracle["object"]["qualitative"]["count"] > 0


def test_7scenes_frames_with_segmented_boxes_give_object_metrics(sevenscenes, tiny_checkpoint, tmp_path, capsys):
    """Done-when of the object task: real 7-Scenes frames (depth as reference, boxes around
    depth-segmented regions as detections) evaluated in oracle mode and with a checkpoint."""
    from object_helpers import segmented_boxes

    from vlm3_ros.camera import Intrinsics
    from vlm3_train.cli import main

    K = sevenscenes.intrinsics()
    intr = Intrinsics(width=640, height=480, fx=K[0, 0], fy=K[1, 1], cx=K[0, 2], cy=K[1, 2])
    frames = sevenscenes.frame_ids[::40][:3]
    total_boxes = 0
    with bags.RgbdBagWriter(tmp_path / "7scenes", depth_encoding="16UC1") as writer:
        for k, fid in enumerate(frames):
            rgb, depth, _ = sevenscenes.load_frame(fid)
            stamp = syn.START_STAMP_NS + k * syn.FRAME_PERIOD_NS
            writer.write_frame(stamp, rgb=rgb, intrinsics=intr, depth_m=depth)
            boxes = segmented_boxes(depth)
            total_boxes += len(boxes)
            dets = [Detection(b, f"r{j}", [("region", 1.0)]) for j, b in enumerate(boxes)]
            writer.write("/detections", DETECTION_ARRAY_TYPE, stamp, detection_array_msg(writer.store, stamp,
                                                                                          writer.camera_frame, dets))
    assert total_boxes >= 3
    capsys.readouterr()
    assert main(["eval", "--oracle", "--bag", str(tmp_path / "7scenes"), "--tasks", "object", "--output",
                 str(tmp_path / "oracle"), "--keep-dataset", str(tmp_path / "ds"), "--quiet", "--no-plots"]) == 0
    printed = json.loads(capsys.readouterr().out)
    questions = json.loads((tmp_path / "ds" / "summary.json").read_text())["questions"]["object"]
    assert questions >= 2 * 3
    _oracle_is_exact(printed, questions)
    # A checkpoint (the tiny random test model, built-in specs): the same metrics, whatever it answers.
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--bag", str(tmp_path / "7scenes"), "--tasks", "object",
                 "--frame-stride", "3", "--max-new-tokens", "16", "--output", str(tmp_path / "ckpt"), "--quiet",
                 "--no-plots"]) == 0
    obj = json.loads(capsys.readouterr().out)["object"]
    kinds = [obj[k] for k in ("quantitative", "qualitative") if obj[k]]
    assert obj["num_questions"] > 0 and sum(k["count"] for k in kinds) == obj["num_questions"]
    assert sum(k["unparseable"] for k in kinds) == obj["num_unparseable"]
