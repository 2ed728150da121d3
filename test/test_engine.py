"""The transformers backend on tiny random Qwen3-VL (and Qwen2.5-VL) models: loading, encoding, and
shared-prefix decoding that reproduces the reference (one ``generate`` per question) token for token."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vlm3_ros import protocol  # noqa: E402
from vlm3_ros.engine import EngineError, Request, load_backend  # noqa: E402
from vlm3_ros.engine.checkpoint import load_checkpoint  # noqa: E402
from vlm3_ros.engine.transformers_backend import TransformersBackend, same_tokens, truncate_at_stop  # noqa: E402


def _image(seed: int, width: int = 160, height: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 64 * 4], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


QUESTIONS = [
    protocol.depth_question(100, 200),
    protocol.depth_question(1999, 3),
    protocol.depth_question(7, 1234),
    "How far?",  # much shorter than the others
    protocol.depth_question(640, 480) + " Answer quickly, please, in metres.",  # longer
    protocol.correspondence_question(12, 34),
]


def _assert_same_tokens(engine, reference):
    """Engine tokens == reference tokens, the reference cut where the engine stopped on a stop string."""
    assert same_tokens(engine, reference), f"engine {engine.token_ids} != reference {reference.token_ids}"


def test_checkpoint_loads_through_the_user_path(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint, device="cpu")
    assert loaded.model_type == "qwen3_vl"
    assert loaded.protocol_file and set(loaded.specs) == set(protocol.TASKS)
    assert loaded.model.dtype == torch.float32
    assert type(loaded.processor).__name__ == "ImageOnlyQwen3VLProcessor"
    config = json.loads((tiny_checkpoint / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen3VLProcessor"


def test_encode_matches_the_processor(tiny_backend):
    images = [_image(1), _image(2, 200, 100)]
    request = Request(images=images, questions=QUESTIONS[:3], spec=protocol.CORRESPONDENCE)
    encoded = tiny_backend.encode(request)
    from PIL import Image

    for question, ids in zip(request.questions, encoded.input_ids):
        ref = tiny_backend.processor.apply_chat_template(
            tiny_backend._messages([Image.fromarray(im) for im in images], question),
            tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt",
        )
        assert ids == ref["input_ids"][0].tolist()
        assert torch.equal(encoded.pixel_values, ref["pixel_values"])
        assert torch.equal(encoded.image_grid_thw, ref["image_grid_thw"])
    # The fast paths were taken (and are what was just checked against the processor): the prompt's
    # head tokenized apart from the questions, the image processor's steps called directly.
    from vlm3_ros.engine.transformers_backend import _SplitPrompt

    assert isinstance(tiny_backend._prompt_renderer(2), _SplitPrompt)
    assert tiny_backend._direct_images is True
    n = encoded.shared_prefix_length()
    image_tokens = int(sum(int(g.prod()) // 4 for g in encoded.image_grid_thw))
    assert n > image_tokens  # the images and the common start of the questions are shared
    assert all(ids[:n] == encoded.input_ids[0][:n] for ids in encoded.input_ids)
    # Questions asked again (a node's grid, every frame) reuse their ids: the same ids, also in
    # another order and mixed with a new question.
    renderer = tiny_backend._prompt_renderer(2)
    assert set(request.questions) <= set(renderer._rests)
    again = Request(images=images, questions=[QUESTIONS[3], *reversed(QUESTIONS[:3])], spec=protocol.CORRESPONDENCE)
    assert tiny_backend.encode(again).input_ids[1:] == list(reversed(encoded.input_ids))
    tokenize = lambda q: tiny_backend.tokenizer([q + renderer.tail], add_special_tokens=False)["input_ids"][0]
    head = encoded.input_ids[0][: len(encoded.input_ids[0]) - len(tokenize(QUESTIONS[0]))]
    assert tiny_backend.encode(again).input_ids[0] == head + tokenize(QUESTIONS[3])


@pytest.mark.parametrize("max_scores", [None, 0], ids=["scores-whole", "fused-attention"])
def test_direct_qwen3_vl_layers_equal_the_models_own_forward(tiny_backend, max_scores, monkeypatch):
    """The engine runs Qwen3-VL's vision tower and text layers directly (per-grid and per-head
    tensors kept, fused projections, the last layer for each row's last token only). The prefix's
    keys and values, and the rows' final hidden states and keys, equal those of the model's own
    modules (to float rounding); two images (a correspondence prompt) exercise the DeepStack and
    multimodal positions of both. Both ways of attending are checked: the score matrix computed
    whole (small batches) and the fused attention call (large ones, forced with a zero limit)."""
    from vlm3_ros.engine import shared_prefix as sp
    from vlm3_ros.engine.qwen3_vl import TextRows, VisionTower
    from vlm3_ros.engine.shared_prefix import RowCache

    if max_scores is not None:
        monkeypatch.setattr(RowCache, "MAX_SCORES", max_scores)

    model, inner = tiny_backend.model, tiny_backend.model.model
    rows, tower = TextRows.for_model(model), VisionTower.for_model(model)
    assert rows is not None and tower is not None
    assert TextRows.for_model(model) is rows  # made once per model
    # The modules' weights are views into the fused projections: one copy of the numbers.
    attn = inner.language_model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == rows.layers[0].qkv.data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == rows.layers[0].qkv.untyped_storage().data_ptr()
    # ... ordinary tensors, though made while answering (inference mode): the model still trains.
    with torch.enable_grad():
        model.model.language_model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
        model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)

    request = Request(images=[_image(4), _image(5, 200, 100)], questions=QUESTIONS, spec=protocol.CORRESPONDENCE)
    encoded = tiny_backend.encode(request)
    n = encoded.shared_prefix_length()
    ids = encoded.input_ids[0]
    prefix_ids = torch.tensor([ids[:n]])
    types = (prefix_ids == tiny_backend.image_token_id).int()
    with torch.inference_mode():
        embeds, deepstack = tower(encoded.pixel_values, encoded.image_grid_thw)
        direct_kv, direct_delta = rows.prefill(prefix_ids, types, encoded.image_grid_thw, embeds, deepstack)
        own = inner(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids), mm_token_type_ids=types,
                    pixel_values=encoded.pixel_values, image_grid_thw=encoded.image_grid_thw, use_cache=True)
    cache = own["cache"] if "cache" in own else own["past_key_values"]
    assert direct_delta == int(inner.rope_deltas.reshape(-1)[0]) != 0
    assert len(direct_kv) == len(cache.layers) == 2
    for (k, v), layer in zip(direct_kv, cache.layers):
        assert k.shape == layer.keys.shape and k.shape[2] == n
        assert torch.allclose(k, layer.keys, atol=1e-5, rtol=1e-5)
        assert torch.allclose(v, layer.values, atol=1e-5, rtol=1e-5)

    prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
    suffixes = [row[n:] for row in encoded.input_ids]
    width = max(len(s) for s in suffixes)
    batch_ids = torch.tensor([s + [0] * (width - len(s)) for s in suffixes])
    lengths = torch.tensor([len(s) for s in suffixes])
    columns = torch.arange(width)
    text_positions = n + columns[None, :].expand(len(suffixes), -1)
    mask = (columns[None, :] < lengths[:, None])[:, None, :] & (columns[None, None, :] <= columns[None, :, None])
    results = []
    for direct in (True, False):
        rows_cache = RowCache(prefix_kv, len(suffixes), width + 1)
        rows_cache.mask = mask
        with torch.inference_mode():
            if direct:
                results.append(rows.last_hidden(batch_ids, text_positions + direct_delta, rows_cache, lengths - 1))
            else:  # the model's own modules, attention over the same cache
                hidden = inner.language_model(
                    input_ids=batch_ids, position_ids=sp._positions(text_positions, direct_delta),
                    attention_mask=mask[:, None], use_cache=False, **{sp._STATE_KWARG: rows_cache}).last_hidden_state
                results.append(hidden[torch.arange(len(suffixes)), lengths - 1])
        results.append([k[:, :, :width].clone() for k in rows_cache.keys])
    assert results[0].shape == results[2].shape == (len(suffixes), model.config.text_config.hidden_size)
    assert torch.allclose(results[0], results[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(results[0][0], results[0][1])  # the rows differ: the comparison can fail
    for a, b in zip(results[1], results[3]):  # the keys every row's later tokens read
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def qwen25_checkpoint(tmp_path_factory):
    from vlm3_ros.engine.model_factory import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("models") / "tiny-qwen2.5", preset="test-qwen2.5-vl", seed=0)


def test_qwen25_checkpoint_loads_through_the_user_path(qwen25_checkpoint):
    loaded = load_checkpoint(qwen25_checkpoint, device="cpu")
    assert loaded.model_type == "qwen2_5_vl"
    assert type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(loaded.processor).__name__ == "ImageOnlyQwen2_5_VLProcessor"
    assert loaded.processor.image_processor.patch_size == 14
    config = json.loads((qwen25_checkpoint / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2_5_VLProcessor"


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def varied_backend(request, tiny_checkpoint):
    """A backend whose end-of-turn set includes a frequent token, so answers end at different lengths
    (once per model family)."""
    checkpoint = tiny_checkpoint if request.param == "qwen3_vl" else request.getfixturevalue("qwen25_checkpoint")
    backend = TransformersBackend(checkpoint, device="cpu", dtype="float32", max_batch=64)
    assert backend.model.config.model_type == request.param
    request = Request(images=[_image(3)], questions=QUESTIONS, max_new_tokens=24)
    tokens = backend.answer_reference(request).token_ids
    first_positions: dict[int, set[int]] = {}
    for row in tokens:
        for tok in set(row[1:]):
            first_positions.setdefault(tok, set()).add(row.index(tok, 1))
    # The token whose first appearance varies most across the answers ends them at different lengths.
    extra = max((t for t in first_positions if t not in backend.eos_token_ids), key=lambda t: len(first_positions[t]))
    backend.eos_token_ids = backend.eos_token_ids | {extra}
    backend.model.generation_config.eos_token_id = sorted(backend.eos_token_ids)
    return backend


@pytest.mark.parametrize("max_scores", [None, 0], ids=["scores-whole", "fused-attention"])
def test_shared_prefix_equals_reference_token_for_token(varied_backend, max_scores, monkeypatch):
    from vlm3_ros.engine.shared_prefix import RowCache

    if max_scores is not None:
        monkeypatch.setattr(RowCache, "MAX_SCORES", max_scores)
    request = Request(images=[_image(3)], questions=QUESTIONS, max_new_tokens=24)
    reference = varied_backend.answer_reference(request)
    engine = varied_backend.answer(request)
    lengths = [len(t) for t in reference.token_ids]
    assert len(set(lengths)) >= 2, f"answers should end at different lengths, got {lengths}"
    assert len(set(engine.prompt_tokens)) >= 4, "questions of different token lengths"
    _assert_same_tokens(engine, reference)
    assert engine.answers == reference.answers
    assert engine.finish_reasons == reference.finish_reasons
    assert engine.prompt_tokens == reference.prompt_tokens
    assert engine.info["shared_prefix_tokens"] > 0


@pytest.mark.parametrize("max_batch", [1, 2, 5])
def test_chunked_batches_give_the_same_answers(varied_backend, max_batch):
    request = Request(images=[_image(4)], questions=QUESTIONS, max_new_tokens=16)
    full = varied_backend.answer(request)
    varied_backend.max_batch = max_batch
    try:
        chunked = varied_backend.answer(request)
    finally:
        varied_backend.max_batch = 64
    assert chunked.token_ids == full.token_ids


def test_stop_strings_end_rows_early(tiny_backend):
    request = Request(images=[_image(5)], questions=QUESTIONS[:4], max_new_tokens=20)
    reference = tiny_backend.answer_reference(request)
    # Stop on a piece of text the model really produces in some (not all) answers.
    texts = [tiny_backend.tokenizer.decode(t, skip_special_tokens=True) for t in reference.token_ids]
    stop = next(texts[0][i : i + 2] for i in range(3, len(texts[0]) - 2) if texts[0][i : i + 2].strip())
    spec = replace(protocol.DEPTH, stop_strings=(stop,))
    engine = tiny_backend.answer(replace(request, spec=spec))
    assert engine.finish_reasons[0] == "stop"
    _assert_same_tokens(engine, reference)
    for text, answer, reason in zip(texts, engine.answers, engine.finish_reasons):
        assert answer == truncate_at_stop(text, (stop,))
        assert (reason == "stop") == (stop in text)
    assert sum(engine.generated_tokens) < sum(reference.generated_tokens)


def test_two_image_requests_match_the_reference(varied_backend):
    request = Request(
        images=[_image(6), _image(7, 120, 160)],
        questions=[protocol.correspondence_question(x, y) for x, y in [(1, 2), (999, 10), (500, 500)]],
        spec=protocol.CORRESPONDENCE,
        max_new_tokens=12,
    )
    _assert_same_tokens(varied_backend.answer(request), varied_backend.answer_reference(request))


def test_timings_and_counts_are_reported(tiny_backend):
    response = tiny_backend.answer(Request(images=[_image(8)], questions=QUESTIONS[:2], max_new_tokens=4))
    assert set(response.timings) >= {"preprocess", "vision", "prefix_prefill", "suffix_prefill", "decode", "total"}
    assert all(v >= 0 for v in response.timings.values())
    assert response.generated_tokens == [len(t) for t in response.token_ids]
    assert all(0 < n <= 4 for n in response.generated_tokens)


def test_request_validation():
    with pytest.raises(EngineError, match="2 image"):
        Request(images=[_image(0)], questions=["q"], spec=protocol.POSE)
    with pytest.raises(EngineError, match="RGB uint8"):
        Request(images=[np.zeros((4, 4), np.uint8)], questions=["q"])
    with pytest.raises(EngineError, match="at least one question"):
        Request(images=[_image(0)], questions=[])


def test_missing_and_broken_checkpoints_are_named(tmp_path, tiny_checkpoint):
    with pytest.raises(EngineError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(EngineError, match=r"incomplete: missing model weights .* tokenizer files") as info:
        load_checkpoint(broken)
    assert str(broken) in str(info.value)
    shutil.copy(tiny_checkpoint / "model.safetensors", broken / "model.safetensors")
    shutil.copy(tiny_checkpoint / "tokenizer.json", broken / "tokenizer.json")
    (broken / "config.json").write_text("{oops")
    with pytest.raises(EngineError, match="config.json is not valid JSON"):
        load_checkpoint(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EngineError, match="'bert' is not supported"):
        load_checkpoint(broken)
    with pytest.raises(EngineError, match="not in the local Hugging Face cache"):
        load_checkpoint("some-org/not-downloaded-model")
    with pytest.raises(EngineError, match="unknown backend"):
        load_backend("magic")


def test_checkpoint_without_protocol_file_serves_builtin_specs(tmp_path, tiny_checkpoint):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_checkpoint, plain)
    (plain / protocol.PROTOCOL_FILENAME).unlink()
    loaded = load_checkpoint(plain, device="cpu")
    assert not loaded.protocol_file
    assert loaded.specs["depth"] == protocol.DEPTH and loaded.specs["pose"] == protocol.POSE
    custom = tmp_path / "custom"
    shutil.copytree(plain, custom)
    protocol.save_protocol(custom, [protocol.DEPTH.with_options(depth_kind="z")])
    loaded = load_checkpoint(custom, device="cpu")
    assert set(loaded.specs) == {"depth"} and loaded.specs["depth"].option("depth_kind") == "z"


def test_lora_adapter_is_merged(tmp_path, tiny_checkpoint, tiny_backend):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    lora = peft.get_peft_model(base, config)
    adapter_dir = tmp_path / "adapter"
    lora.save_pretrained(adapter_dir)
    merged = lora.merge_and_unload()

    backend = TransformersBackend(tiny_checkpoint, device="cpu", adapter=adapter_dir, warmup=False)
    for name, param in merged.state_dict().items():
        torch.testing.assert_close(backend.model.state_dict()[name], param, msg=name)
    request = Request(images=[_image(9)], questions=QUESTIONS[:2], max_new_tokens=8)
    assert backend.answer(request).token_ids != tiny_backend.answer(request).token_ids
    assert backend.specs == tiny_backend.specs  # no protocol file in the adapter: the base checkpoint's
    protocol.save_protocol(adapter_dir, [protocol.DEPTH.with_options(depth_kind="z")])
    adapted = TransformersBackend(tiny_checkpoint, device="cpu", adapter=adapter_dir, warmup=False)
    assert set(adapted.specs) == {"depth"} and adapted.specs["depth"].option("depth_kind") == "z"
    with pytest.raises(EngineError, match="adapter_config.json"):
        TransformersBackend(tiny_checkpoint, device="cpu", adapter=tmp_path, warmup=False)


def test_same_tokens_detects_any_difference():
    from vlm3_ros.engine import Response

    ref = Response(answers=["a", "b"], token_ids=[[1, 2, 3], [4, 5]], finish_reasons=["length", "eos"])
    assert same_tokens(Response(answers=[], token_ids=[[1, 2, 3], [4, 5]], finish_reasons=["length", "eos"]), ref)
    assert same_tokens(Response(answers=[], token_ids=[[1, 2], [4, 5]], finish_reasons=["stop", "eos"]), ref)
    assert not same_tokens(Response(answers=[], token_ids=[[1, 2], [4, 5]], finish_reasons=["length", "eos"]), ref)
    assert not same_tokens(Response(answers=[], token_ids=[[1, 9, 3], [4, 5]], finish_reasons=["length", "eos"]), ref)
    assert not same_tokens(Response(answers=[], token_ids=[[1, 2, 3]], finish_reasons=["length"]), ref)


def test_second_round_about_the_same_image_reuses_the_prefix(varied_backend):
    """A later request about the same image (a second round of questions) runs neither the vision
    tower nor the prefix again and still answers exactly as one generate() per question."""
    image = _image(11)
    first = Request(images=[image], questions=QUESTIONS[:3], max_new_tokens=16)
    second = Request(images=[image.copy()], questions=[protocol.depth_question(x, y) for x, y in
                                                       [(1500, 20), (3, 1999), (1000, 1000), (250, 750)]],
                     max_new_tokens=16)
    varied_backend.clear_prefix_cache()
    cold = varied_backend.answer(first)
    assert cold.info["prefix_reused"] is False and cold.timings["vision"] > 0
    warm = varied_backend.answer(second)
    assert warm.info["prefix_reused"] is True
    assert warm.timings["vision"] == 0 and warm.timings["prefix_prefill"] == 0
    assert 0 < warm.info["shared_prefix_tokens"] <= cold.info["shared_prefix_tokens"]
    _assert_same_tokens(warm, varied_backend.answer_reference(second))
    # Another image is not served from the cache; the cache holds one entry by default.
    other = varied_backend.answer(replace(second, images=[_image(12)]))
    assert other.info["prefix_reused"] is False
    assert varied_backend.answer(first).info["prefix_reused"] is False


def test_prefix_cache_can_be_switched_off(tiny_checkpoint):
    backend = TransformersBackend(tiny_checkpoint, device="cpu", dtype="float32", warmup=False, prefix_cache=0)
    request = Request(images=[_image(13)], questions=QUESTIONS[:2], max_new_tokens=4)
    first, again = backend.answer(request), backend.answer(request)
    assert not first.info["prefix_reused"] and not again.info["prefix_reused"] and again.timings["vision"] > 0
    assert again.token_ids == first.token_ids
    with pytest.raises(EngineError, match="prefix_cache"):
        TransformersBackend(tiny_checkpoint, device="cpu", warmup=False, prefix_cache=-1)
