"""Greedy decoding of many questions that share one image prefix.

A frame's questions differ only after the image: the chat-formatted prompts of all questions share
their first ``P`` tokens (the image tokens and whatever text precedes the question's first
difference). This module prefills that prefix once, at batch size one, and then decodes all
questions as one batch whose attention reads the shared prefix keys and values in place:

* attention of a row = softmax over [prefix keys ; the row's own keys] (:class:`RowCache`):
  every row's scores against the one prefix are a single product, normalised together with the
  row's scores against its own tokens (padding masked); long questions over a long prefix, whose
  scores would take more memory than the keys, take one fused attention call instead;
* each row's tokens carry their exact positions (text and multimodal RoPE), so a row sees exactly
  what it would see in a prompt of its own;
* a row stops at end of turn, at a stop string or at ``max_new_tokens``; finished rows are removed
  from the batch and cost nothing more.

The prefill and the decoding are separate steps (:func:`prefill_prefix`, :func:`decode_suffixes`):
a prefilled :class:`Prefix` can serve a later request about the same image (a second round of
questions about one frame) without running the vision tower or the prefix again.

Qwen3-VL models run their text layers and vision tower directly (:mod:`.qwen3_vl`); other models
run their own forward, with the attention plugged in through transformers' ``AttentionInterface``:
the model's text attention implementation is replaced by a function that behaves exactly like the
original one unless a :class:`RowCache` is passed in the forward call's keyword arguments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .qwen3_vl import TextRows, VisionTower

__all__ = [
    "DecodeResult",
    "Prefix",
    "PrefixInputs",
    "RowCache",
    "decode_shared_prefix",
    "decode_suffixes",
    "install_shared_prefix_attention",
    "prefill_prefix",
]

_STATE_KWARG = "vlm3_shared_prefix"
_IMPL_PREFIX = "vlm3_shared_prefix:"


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------


class RowCache:
    """Keys and values per layer of a batch of rows that share one prefix: the prefix's own
    ``[Hkv, P, d]`` (read in place by every row) and each row's tokens ``[B, Hkv, capacity, d]``.

    ``length`` is the number of each row's columns written; ``mask`` is the visibility
    ``[B, l, length + l]`` of the row's own columns for the ``l`` tokens of the current forward
    (every token sees the whole prefix)."""

    #: score matrices above this many elements are not materialised (see :meth:`attend`)
    MAX_SCORES = 1 << 22

    def __init__(self, prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int, capacity: int) -> None:
        self.prefix = [(k[0], v[0]) for k, v in prefix_kv]
        hkv, _, dim = self.prefix[0][0].shape
        shape = (batch, hkv, capacity, dim)
        self.keys = [torch.empty(shape, dtype=k.dtype, device=k.device) for k, _ in self.prefix]
        self.values = [torch.empty(shape, dtype=v.dtype, device=v.device) for _, v in self.prefix]
        self.length = 0
        self._mask: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, mask: torch.Tensor) -> None:
        self._mask, self._bias = mask, None

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows (``rows``: indices to keep)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def _score_bias(self, group: int, dtype: torch.dtype) -> torch.Tensor:
        """0 / -inf ``[B, 1, group * l, P + S]`` for scores whose rows are (head in group, token)."""
        if self._bias is None:
            batch, width, columns = self._mask.shape
            own = torch.zeros(self._mask.shape, dtype=dtype, device=self._mask.device)
            own.masked_fill_(~self._mask, float("-inf"))
            own = own[:, None].expand(batch, group, width, columns).reshape(batch, 1, group * width, columns)
            prefix = own.new_zeros(batch, 1, group * width, self.prefix[0][0].shape[1])
            self._bias = torch.cat([prefix, own], dim=-1)
        return self._bias

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Write the forward's keys and values ``[B, Hkv, w, d]`` at ``length`` and attend ``query``
        ``[B, H, l, d]`` over the prefix and each row's own columns. Returns ``[B, l, H, d]``.

        Small score matrices (decoding, short questions) are computed whole and take one softmax,
        the prefix read in place; large ones (long questions over a long prefix, where the scores
        would take more memory than the keys) go through one fused attention call over the prefix
        broadcast to the rows, which never holds the scores."""
        batch, heads, width, dim = query.shape
        start, end = self.length, self.length + key.shape[2]
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value
        own_k, own_v = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        prefix_k, prefix_v = self.prefix[layer]
        kv_heads, prefix_len = prefix_k.shape[0], prefix_k.shape[1]
        if batch * heads * width * (prefix_len + own_k.shape[2]) > self.MAX_SCORES:
            keys = torch.cat([prefix_k.expand(batch, -1, -1, -1), own_k], dim=2)
            values = torch.cat([prefix_v.expand(batch, -1, -1, -1), own_v], dim=2)
            visible = torch.cat([self._mask.new_ones(batch, width, prefix_len), self._mask], dim=-1)
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible[:, None], scale=scaling,
                                                 enable_gqa=heads != kv_heads)
            return out.transpose(1, 2)
        rows = heads // kv_heads * width
        # Query head h reads kv head h // group (as repeat_kv does): group the heads under their kv head.
        q = query.reshape(batch, kv_heads, rows, dim)
        # The prefix part: every row of every question against the one prefix, as a single product.
        scores_p = torch.matmul(q.transpose(0, 1).reshape(kv_heads, batch * rows, dim), prefix_k.transpose(-1, -2))
        scores_p = scores_p.view(kv_heads, batch, rows, prefix_len).transpose(0, 1)
        scores = torch.cat([scores_p, torch.matmul(q, own_k.transpose(-1, -2))], dim=-1).float()
        scores = scores * scaling + self._score_bias(heads // kv_heads, scores.dtype)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        out_p = torch.matmul(probs[..., :prefix_len].transpose(0, 1).reshape(kv_heads, batch * rows, prefix_len), prefix_v)
        out = out_p.view(kv_heads, batch, rows, dim).transpose(0, 1) + torch.matmul(probs[..., prefix_len:], own_v)
        return out.reshape(batch, heads, width, dim).transpose(1, 2)


def install_shared_prefix_attention(model: torch.nn.Module) -> str:
    """Make ``model``'s text attention able to read a shared prefix; returns the implementation name.

    Without a :class:`RowCache` in the call, the installed function forwards to the
    model's original implementation (and mask construction is the original's), so the model's
    ordinary ``forward`` and ``generate`` are unchanged.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    text_config = model.config.get_text_config()
    original = text_config._attn_implementation or "eager"
    if original.startswith(_IMPL_PREFIX):
        return original
    name = _IMPL_PREFIX + original
    fallback = eager_attention_forward if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        state = kwargs.pop(_STATE_KWARG, None)
        if state is None:
            return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return state.attend(module.layer_idx, query, key, value, scale), None

    AttentionInterface.register(name, attention)
    mask_original = "sdpa" if original not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else original
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_original])
    model.set_attn_implementation({"text_config": name})
    return name


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------


@dataclass
class PrefixInputs:
    """Model inputs of the shared prefix (batch 1) as the processor makes them."""

    input_ids: torch.Tensor  # [1, P]
    mm_token_type_ids: torch.Tensor  # [1, P]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


@dataclass
class DecodeResult:
    tokens: list[list[int]]
    finish_reasons: list[str]
    timings: dict[str, float] = field(default_factory=dict)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Prefix:
    """The shared prefix after its prefill: per layer keys and values ``[1, Hkv, P, d]``, its length
    and the model's multimodal RoPE offset for the tokens after it.

    The keys and values of a causal prefix depend only on the tokens before them, so the first
    ``n`` positions of a prefix are themselves a valid prefix (:meth:`truncated`): a later request
    about the same image whose prompts agree with this one for ``n`` tokens reuses them as they are.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int
    rope_delta: int

    def truncated(self, length: int) -> "Prefix":
        if not 0 < length <= self.length:
            raise ValueError(f"a prefix of {self.length} tokens cannot be cut to {length}")
        if length == self.length:
            return self
        return Prefix([(k[:, :, :length], v[:, :, :length]) for k, v in self.kv], length, self.rope_delta)


@torch.inference_mode()
def prefill_prefix(model: torch.nn.Module, prefix: PrefixInputs, timings: dict[str, float] | None = None) -> Prefix:
    """Run the vision tower and prefill the shared prefix once (batch 1); ``timings`` gets
    ``vision`` and ``prefix_prefill`` seconds."""
    inner = model.model
    device = prefix.input_ids.device
    rows, tower = TextRows.for_model(model), VisionTower.for_model(model)
    t0 = _now(device)
    if rows is not None and tower is not None:
        embeds, deepstack = (None, [])
        if prefix.pixel_values is not None:
            embeds, deepstack = tower(prefix.pixel_values, prefix.image_grid_thw)
        t1 = _now(device)
        kv, rope_delta = rows.prefill(prefix.input_ids, prefix.mm_token_type_ids, prefix.image_grid_thw, embeds, deepstack)
    else:
        encoder_outputs = None
        if prefix.pixel_values is not None:
            features = inner.get_image_features(prefix.pixel_values, prefix.image_grid_thw, return_dict=True)
            encoder_outputs = {"image": features}
        t1 = _now(device)
        out = inner(
            input_ids=prefix.input_ids,
            attention_mask=torch.ones_like(prefix.input_ids),
            mm_token_type_ids=prefix.mm_token_type_ids,
            image_grid_thw=prefix.image_grid_thw,
            mm_encoder_outputs=encoder_outputs,
            use_cache=True,
        )
        # transformers >= 5.2x names the output ``cache`` (``past_key_values`` still works, with a warning).
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        rope_delta = int(inner.rope_deltas.reshape(-1)[0]) if getattr(inner, "rope_deltas", None) is not None else 0
    t2 = _now(device)
    if timings is not None:
        timings["vision"] = timings.get("vision", 0.0) + t1 - t0
        timings["prefix_prefill"] = timings.get("prefix_prefill", 0.0) + t2 - t1
    return Prefix(kv=kv, length=int(prefix.input_ids.shape[1]), rope_delta=rope_delta)


@torch.inference_mode()
def decode_suffixes(
    model: torch.nn.Module,
    prefix: Prefix,
    suffixes: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: set[int],
    is_stopped: Callable[[list[int]], bool] | None = None,
    max_batch: int = 64,
    pad_token_id: int = 0,
    timings: dict[str, float] | None = None,
) -> DecodeResult:
    """Greedy answers for ``suffixes`` (each question's tokens after ``prefix``), read over the
    prefilled prefix; arguments as :func:`decode_shared_prefix`."""
    if any(len(s) == 0 for s in suffixes):
        raise ValueError("every question needs at least one token after the shared prefix")
    inner, rows = model.model, TextRows.for_model(model)
    lm_head = model.get_output_embeddings()
    device = prefix.kv[0][0].device
    timings = {"vision": 0.0, "prefix_prefill": 0.0, **(timings or {}), "suffix_prefill": 0.0, "decode": 0.0}
    tokens: list[list[int]] = [[] for _ in suffixes]
    reasons: list[str] = ["length"] * len(suffixes)
    for start in range(0, len(suffixes), max_batch):
        chunk = list(range(start, min(start + max_batch, len(suffixes))))
        _decode_chunk(
            inner, rows, lm_head, prefix.kv, prefix.length, prefix.rope_delta, [suffixes[i] for i in chunk], chunk,
            tokens, reasons, max_new_tokens, eos_token_ids, is_stopped, pad_token_id, device, timings,
        )
    return DecodeResult(tokens=tokens, finish_reasons=reasons, timings=timings)


def decode_shared_prefix(
    model: torch.nn.Module,
    prefix: PrefixInputs,
    suffixes: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: set[int],
    is_stopped: Callable[[list[int]], bool] | None = None,
    max_batch: int = 64,
    pad_token_id: int = 0,
) -> DecodeResult:
    """Greedy answers for ``suffixes`` (each question's tokens after the shared prefix).

    ``is_stopped(tokens)`` reports whether a row's generated tokens already hold a complete answer
    (e.g. its text contains a stop string). Returns the generated token ids per row (the end-of-turn
    token included when it ended the row, as ``generate`` returns it).
    """
    if any(len(s) == 0 for s in suffixes):
        raise ValueError("every question needs at least one token after the shared prefix")
    timings: dict[str, float] = {}
    prefilled = prefill_prefix(model, prefix, timings)
    return decode_suffixes(model, prefilled, suffixes, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                           is_stopped=is_stopped, max_batch=max_batch, pad_token_id=pad_token_id, timings=timings)


def _positions(text_positions: torch.Tensor, rope_delta: int) -> torch.Tensor:
    """[B, l] text positions -> [4, B, l] (text row, then the three multimodal RoPE rows)."""
    mrope = (text_positions + rope_delta).unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text_positions.unsqueeze(0), mrope], dim=0)


def _last_hidden(inner, rows: TextRows | None, ids, text_positions, rope_delta: int, cache: RowCache,
                 last: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden state ``[B, hidden]`` of each row's token at ``last`` (``[B]``; ``None``: one
    token per row), the rows' keys and values written to ``cache``. Qwen3-VL text layers run
    directly (``rows``, the model's :class:`~.qwen3_vl.TextRows`); other models run their whole forward."""
    if rows is not None:
        return rows.last_hidden(ids, text_positions + rope_delta, cache, last)
    batch, width = ids.shape
    last = torch.full((batch,), width - 1, dtype=torch.long, device=ids.device) if last is None else last
    hidden = inner(
        input_ids=ids, position_ids=_positions(text_positions, rope_delta), attention_mask=cache.mask[:, None],
        use_cache=False, **{_STATE_KWARG: cache},
    ).last_hidden_state
    return hidden[torch.arange(batch, device=ids.device), last]


def _decode_chunk(
    inner, rows, lm_head, prefix_kv, prefix_len, rope_delta, suffixes, row_ids, tokens, reasons,
    max_new_tokens, eos_token_ids, is_stopped, pad_token_id, device, timings,
) -> None:
    batch = len(suffixes)
    lengths = torch.tensor([len(s) for s in suffixes], device=device)
    width = int(lengths.max())
    ids = torch.tensor([list(s) + [pad_token_id] * (width - len(s)) for s in suffixes], dtype=torch.long, device=device)
    columns = torch.arange(width, device=device)
    valid = columns[None, :] < lengths[:, None]  # [B, width]

    t0 = _now(device)
    cache = RowCache(prefix_kv, batch, width + max_new_tokens)
    # Suffix prefill: causal within the row, pads invisible (the prefix is always visible).
    cache.mask = valid[:, None, :] & (columns[None, None, :] <= columns[None, :, None])
    last = _last_hidden(inner, rows, ids, prefix_len + columns[None, :].expand(batch, -1), rope_delta, cache, lengths - 1)
    cache.length += width
    next_tokens = lm_head(last).argmax(dim=-1)
    t1 = _now(device)
    timings["suffix_prefill"] += t1 - t0

    active = list(row_ids)  # global row index of each batch row
    next_pos = prefix_len + lengths  # text position of the token being fed next
    # own columns each row's next token sees: its question's tokens and those it generated
    seen = torch.zeros(batch, width + max_new_tokens, dtype=torch.bool, device=device)
    seen[:, :width] = valid
    for step in range(max_new_tokens):
        toks = next_tokens.tolist()
        keep: list[int] = []
        for b, (row, tok) in enumerate(zip(active, toks)):
            tokens[row].append(tok)
            if tok in eos_token_ids:
                reasons[row] = "eos"
            elif is_stopped is not None and is_stopped(tokens[row]):
                reasons[row] = "stop"
            elif step + 1 < max_new_tokens:
                keep.append(b)
        if not keep:
            break
        if len(keep) < len(active):
            kept = torch.tensor(keep, device=device)
            cache.keep_rows(kept)
            next_tokens, next_pos, seen = next_tokens[kept], next_pos[kept], seen[kept]
            active = [active[b] for b in keep]
        seen[:, cache.length] = True
        cache.mask = seen[:, None, : cache.length + 1]
        last = _last_hidden(inner, rows, next_tokens[:, None], next_pos[:, None], rope_delta, cache)
        cache.length += 1
        next_pos = next_pos + 1
        next_tokens = lm_head(last).argmax(dim=-1)
    timings["decode"] += _now(device) - t1
