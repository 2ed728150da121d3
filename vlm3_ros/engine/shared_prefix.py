"""Greedy decoding of many questions that share one image prefix.

A frame's questions differ only after the image: the chat-formatted prompts of all questions share
their first ``P`` tokens (the image tokens and whatever text precedes the question's first
difference). This module prefills that prefix once, at batch size one, and then decodes all
questions as one batch whose attention reads the shared prefix keys and values in place:

* attention of a row = softmax over [prefix keys ; the row's own suffix keys]. While decoding
  (one new token per row) it is computed as two partial softmaxes merged with their log-sum-exp,
  so the prefix is read in place and never copied per row; for the questions' own tokens (many
  per row, once per request) one fused attention call over the broadcast prefix is cheaper;
* each row's tokens carry their exact positions (text and multimodal RoPE), so a row sees exactly
  what it would see in a prompt of its own;
* a row stops at end of turn, at a stop string or at ``max_new_tokens``; finished rows are removed
  from the batch and cost nothing more.

The prefill and the decoding are separate steps (:func:`prefill_prefix`, :func:`decode_suffixes`):
a prefilled :class:`Prefix` can serve a later request about the same image (a second round of
questions about one frame) without running the vision tower or the prefix again.

The attention is plugged in through transformers' ``AttentionInterface``: the model's text
attention implementation is replaced by a function that behaves exactly like the original one
unless a :class:`SharedPrefixState` is passed in the forward call's keyword arguments.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

__all__ = [
    "DecodeResult",
    "Prefix",
    "PrefixInputs",
    "SharedPrefixState",
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


class SharedPrefixState:
    """Keys/values of the shared prefix (batch 1) and of each row's own tokens (batch B)."""

    def __init__(
        self,
        prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
        batch: int,
        capacity: int,
    ) -> None:
        self.prefix = [(k[0], v[0]) for k, v in prefix_kv]  # per layer: [Hkv, P, d]
        k0 = self.prefix[0][0]
        hkv, _, dim = k0.shape
        shape = (batch, hkv, capacity, dim)
        self.keys = [torch.empty(shape, dtype=k.dtype, device=k.device) for k, _ in self.prefix]
        self.values = [torch.empty(shape, dtype=v.dtype, device=v.device) for _, v in self.prefix]
        self.length = 0  # columns of the suffix store already written
        self.mask: torch.Tensor | None = None  # [B, l, length + l] visibility for the current forward

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows (``rows``: indices to keep)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


def _merged_attention(
    state: SharedPrefixState,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    batch, heads, q_len, dim = query.shape
    start = state.length
    state.keys[layer][:, :, start : start + q_len] = key
    state.values[layer][:, :, start : start + q_len] = value
    suffix_k = state.keys[layer][:, :, : start + q_len]
    suffix_v = state.values[layer][:, :, : start + q_len]
    prefix_k, prefix_v = state.prefix[layer]
    kv_heads = prefix_k.shape[0]
    group = heads // kv_heads
    if q_len > 1:
        return _prefill_attention(state, prefix_k, prefix_v, query, suffix_k, suffix_v, scaling)
    rows = group * q_len

    # Query head h reads kv head h // group (as repeat_kv does): group the heads under their kv head.
    q = query.reshape(batch, kv_heads, rows, dim)
    # Prefix part: every row of every question against the one shared prefix, as a single matmul.
    qp = q.transpose(0, 1).reshape(kv_heads, batch * rows, dim)
    sp = torch.matmul(qp, prefix_k.transpose(-1, -2)).float() * scaling  # [Hkv, B*rows, P]
    mp = sp.amax(dim=-1, keepdim=True)
    ep = torch.exp(sp - mp)
    dp = ep.sum(dim=-1, keepdim=True)
    op = torch.matmul(ep.to(prefix_v.dtype), prefix_v).float()  # [Hkv, B*rows, d]
    mp = mp.view(kv_heads, batch, rows, 1).transpose(0, 1)
    dp = dp.view(kv_heads, batch, rows, 1).transpose(0, 1)
    op = op.view(kv_heads, batch, rows, dim).transpose(0, 1)

    # Suffix part: each row against its own tokens, with the visibility mask of this step.
    ss = torch.matmul(q, suffix_k.transpose(-1, -2)).float() * scaling  # [B, Hkv, rows, S]
    visible = state.mask[:, None, None, :, :].expand(batch, 1, group, q_len, suffix_k.shape[2])
    ss = ss.masked_fill(~visible.reshape(batch, 1, rows, -1), float("-inf"))
    ms = ss.amax(dim=-1, keepdim=True)
    ms = torch.where(torch.isfinite(ms), ms, torch.zeros_like(ms))
    es = torch.exp(ss - ms)
    ds = es.sum(dim=-1, keepdim=True)
    os_ = torch.matmul(es.to(suffix_v.dtype), suffix_v).float()

    m = torch.maximum(mp, ms)
    wp = torch.exp(mp - m)
    ws = torch.exp(ms - m) * (ds > 0)
    out = (op * wp + os_ * ws) / (dp * wp + ds * ws)
    out = out.to(query.dtype).view(batch, kv_heads, group, q_len, dim).reshape(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous()


def _prefill_attention(state, prefix_k, prefix_v, query, suffix_k, suffix_v, scaling) -> torch.Tensor:
    """Several new tokens per row (the questions themselves): one fused attention call over
    [prefix ; own tokens]. The prefix is broadcast to the rows for this one step only; for such
    long query blocks that is cheaper than materialising two score matrices per layer."""
    batch, heads, q_len, dim = query.shape
    kv_heads, prefix_len = prefix_k.shape[0], prefix_k.shape[1]
    keys = torch.cat([prefix_k.expand(batch, -1, -1, -1), suffix_k], dim=2)
    values = torch.cat([prefix_v.expand(batch, -1, -1, -1), suffix_v], dim=2)
    visible = torch.cat([state.mask.new_ones(batch, q_len, prefix_len), state.mask], dim=-1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=visible[:, None], scale=scaling, enable_gqa=heads != kv_heads
    )
    return out.transpose(1, 2).contiguous()


def install_shared_prefix_attention(model: torch.nn.Module) -> str:
    """Make ``model``'s text attention able to read a shared prefix; returns the implementation name.

    Without a :class:`SharedPrefixState` in the call, the installed function forwards to the
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
        return _merged_attention(state, module.layer_idx, query, key, value, scale), None

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
    t0 = _now(device)
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
    prefilled prefix in place; arguments as :func:`decode_shared_prefix`."""
    if any(len(s) == 0 for s in suffixes):
        raise ValueError("every question needs at least one token after the shared prefix")
    inner = model.model
    lm_head = model.get_output_embeddings()
    device = prefix.kv[0][0].device
    timings = {"vision": 0.0, "prefix_prefill": 0.0, **(timings or {}), "suffix_prefill": 0.0, "decode": 0.0}
    tokens: list[list[int]] = [[] for _ in suffixes]
    reasons: list[str] = ["length"] * len(suffixes)
    for start in range(0, len(suffixes), max_batch):
        chunk = list(range(start, min(start + max_batch, len(suffixes))))
        _decode_chunk(
            inner, lm_head, prefix.kv, prefix.length, prefix.rope_delta, [suffixes[i] for i in chunk], chunk,
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


def _last_hidden(inner, ids, positions, state: SharedPrefixState, last: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden state ``[B, hidden]`` of each row's token at ``last`` (``[B]``; ``None``: one
    token per row), the rows' keys and values written to ``state``.

    Only that token's hidden state is read, so the model's last layer needs every token's keys and
    values but the rest (query, attention output, MLP, final norm) for that one token alone. For
    Qwen3-VL text layers the layers are called directly (the text model's forward adds nothing
    here: no cache, no image features, the masks are the state's) and the last layer is run that
    way, the same operations on the rows that matter. Other models run their whole forward."""
    batch, width = ids.shape
    rows = torch.arange(batch, device=ids.device)
    last = torch.full((batch,), width - 1, dtype=torch.long, device=ids.device) if last is None else last
    text = getattr(inner, "language_model", inner)
    layers = getattr(text, "layers", None)
    if layers is None or type(layers[-1]).__name__ != "Qwen3VLTextDecoderLayer":
        hidden = inner(
            input_ids=ids, position_ids=positions, attention_mask=state.mask[:, None], use_cache=False,
            **{_STATE_KWARG: state},
        ).last_hidden_state
        return hidden[rows, last]
    rope = sys.modules[type(layers[-1]).__module__].apply_rotary_pos_emb
    hidden = text.embed_tokens(ids)
    cos, sin = text.rotary_emb(hidden, positions[1:])
    for layer in layers[:-1]:
        hidden = layer(
            hidden, attention_mask=None, position_ids=positions[0], position_embeddings=(cos, sin),
            **{_STATE_KWARG: state},
        )
    layer = layers[-1]
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    shape = (batch, width, -1, attn.head_dim)
    keys = attn.k_norm(attn.k_proj(normed).view(shape)).transpose(1, 2)
    values = attn.v_proj(normed).view(shape).transpose(1, 2)
    _, keys = rope(keys, keys, cos, sin)
    if width > 1:
        normed, hidden = normed[rows, last][:, None], hidden[rows, last][:, None]
        cos, sin = cos[rows, last][:, None], sin[rows, last][:, None]
    query = attn.q_norm(attn.q_proj(normed).view(batch, 1, -1, attn.head_dim)).transpose(1, 2)
    query, _ = rope(query, query, cos, sin)
    index = attn.layer_idx
    start = state.length
    if width == 1:
        out = _merged_attention(state, index, query, keys, values, attn.scaling)
    else:
        state.keys[index][:, :, start : start + width] = keys
        state.values[index][:, :, start : start + width] = values
        prefix_k, prefix_v = state.prefix[index]
        full_mask = state.mask
        state.mask = full_mask[rows, last][:, None]
        out = _prefill_attention(state, prefix_k, prefix_v, query, state.keys[index][:, :, : start + width],
                                 state.values[index][:, :, : start + width], attn.scaling)
        state.mask = full_mask
    hidden = hidden + attn.o_proj(out.reshape(batch, 1, -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return text.norm(hidden)[:, 0]


def _decode_chunk(
    inner, lm_head, prefix_kv, prefix_len, rope_delta, suffixes, row_ids, tokens, reasons,
    max_new_tokens, eos_token_ids, is_stopped, pad_token_id, device, timings,
) -> None:
    batch = len(suffixes)
    lengths = torch.tensor([len(s) for s in suffixes], device=device)
    width = int(lengths.max())
    ids = torch.tensor([list(s) + [pad_token_id] * (width - len(s)) for s in suffixes], dtype=torch.long, device=device)
    columns = torch.arange(width, device=device)
    valid = columns[None, :] < lengths[:, None]  # [B, width]

    state = SharedPrefixState(prefix_kv, batch, width + max_new_tokens)
    # Suffix prefill: causal within the row, pads invisible.
    state.mask = valid[:, None, :] & (columns[None, None, :] <= columns[None, :, None])
    t0 = _now(device)
    positions = _positions(prefix_len + columns[None, :].expand(batch, -1), rope_delta)
    last = _last_hidden(inner, ids, positions, state, lengths - 1)
    state.length = width
    next_tokens = lm_head(last).argmax(dim=-1)
    t1 = _now(device)
    timings["suffix_prefill"] += t1 - t0

    active = list(row_ids)  # global row index of each batch row
    next_pos = prefix_len + lengths  # text position of the token being fed next
    seen = valid  # [B, columns written so far]
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
            rows = torch.tensor(keep, device=device)
            state.keep_rows(rows)
            next_tokens, next_pos, seen = next_tokens[rows], next_pos[rows], seen[rows]
            active = [active[b] for b in keep]
        n = len(active)
        seen = torch.cat([seen, torch.ones(n, 1, dtype=torch.bool, device=device)], dim=1)
        state.mask = seen[:, None, :]
        last = _last_hidden(inner, next_tokens[:, None], _positions(next_pos[:, None], rope_delta), state)
        state.length += 1
        next_pos = next_pos + 1
        next_tokens = lm_head(last).argmax(dim=-1)
    timings["decode"] += _now(device) - t1
