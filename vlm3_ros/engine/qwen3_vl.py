"""Qwen3-VL's layers run as plain tensor operations for the shared-prefix engine.

The engine's requests are small and many: one image, then a batch of short questions decoded a few
tokens each. At that size a forward through the model's modules spends much of its time on module
calls, keyword plumbing, mask construction and re-deriving what does not change between frames
(rotary tables, vision grid positions, the prompt head's multimodal positions). This module runs the
same weights with the same operations directly:

* :class:`TextRows` runs the text layers for the engine's rows (each row's tokens after the shared
  prefix) over a :class:`~.shared_prefix.RowCache`, and prefills the prefix itself (batch 1) with
  its DeepStack features; the rotary tables and the prefix's multimodal positions are kept per
  prompt head.
* :class:`VisionTower` runs the vision tower with its grid-dependent tensors (interpolated position
  embeddings, rotary angles, sequence bounds) kept per image grid, and the patch embedding as the
  matrix product it is (a convolution whose stride equals its kernel; three times faster on a CPU,
  its float rounding differs from the convolution's in the last bits).

Query, key and value projections (and the MLP's gate and up projections) are fused into one matrix
each; the modules' weights become views into it, so the model's own ``forward`` and ``generate``
read the same numbers and no memory is added. Everything here is checked against the model's own
forward in the tests (hidden states, keys and values, answers token for token against ``generate``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .shared_prefix import RowCache

__all__ = ["TextRows", "VisionTower"]

_MAKING = threading.Lock()  # one thread at a time makes (and fuses) a model's direct layers


def _kept(inner: Any, name: str, current: Callable[[Any], bool], make: Callable[[], Any]) -> Any:
    """What ``make()`` makes for a model, kept on it as ``name`` and made again when ``current(kept)``
    says the model's weights are no longer those it was made over (the model was moved or cast).
    Made outside inference mode: the modules' weights may become views of what is made."""
    with _MAKING:
        kept = getattr(inner, name, None)
        if kept is None or not current(kept):
            with torch.inference_mode(False):
                kept = make()
            setattr(inner, name, kept)
    return kept


def _rms(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3-VL's RMSNorm, operation for operation."""
    dtype = hidden.dtype
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _fuse(linears: Sequence[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linear layers on the same input; the layers' own weights
    become views into it, so the model keeps one copy."""
    biases = [m.bias for m in linears]
    if any((b is None) != (biases[0] is None) for b in biases):
        raise ValueError("cannot fuse linear layers with and without bias")
    with torch.no_grad():
        fused = torch.cat([m.weight.detach() for m in linears]).contiguous()
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases]).contiguous()
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight = torch.nn.Parameter(fused[start : start + n], requires_grad=m.weight.requires_grad)
            if bias is not None:
                m.bias = torch.nn.Parameter(bias[start : start + n], requires_grad=m.bias.requires_grad)
            start += n
    return fused, bias


class _Layer:
    """One decoder layer's tensors."""

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.eps = layer.input_layernorm.variance_epsilon
        self.ln1 = layer.input_layernorm.weight
        self.ln2 = layer.post_attention_layernorm.weight
        self.qkv, self.qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o, self.o_bias = attn.o_proj.weight, attn.o_proj.bias
        self.heads = attn.q_proj.weight.shape[0] // attn.head_dim
        self.kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.q_norm, self.k_norm = attn.q_norm.weight, attn.k_norm.weight
        self.qk_eps = attn.q_norm.variance_epsilon
        if attn.k_norm.variance_epsilon != self.qk_eps:
            raise ValueError("query and key norms with different epsilons")
        # one weight row per head: the query heads' norm, then the key heads'
        self.qk_norm = torch.cat([self.q_norm.expand(self.heads, -1), self.k_norm.expand(self.kv_heads, -1)])
        self.gate_up, _ = _fuse([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj.weight
        self.act = mlp.act_fn
        self.index = attn.layer_idx

    def projections(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    query_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed input -> (query, key, value) ``[B, heads, l, d]`` with RoPE; the query only at
        ``query_rows`` (``[B]`` column per row) when given."""
        batch, width, _ = hidden.shape
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        x = _rms(hidden, self.ln1, self.eps)
        qkv = F.linear(x, self.qkv, self.qkv_bias).view(batch, width, h + 2 * hkv, d)
        v = qkv[:, :, h + hkv :].transpose(1, 2)
        if query_rows is None:  # queries and keys normed and rotated together (each head on its own)
            qk = _rotate(_rms(qkv[:, :, : h + hkv], self.qk_norm, self.qk_eps).transpose(1, 2), cos[:, None], sin[:, None])
            return qk[:, :h], qk[:, h:], v
        rows = torch.arange(batch, device=hidden.device)
        q = _rms(qkv[rows, query_rows, :h][:, None], self.q_norm, self.qk_eps).transpose(1, 2)
        k = _rms(qkv[:, :, h : h + hkv], self.k_norm, self.qk_eps).transpose(1, 2)
        qc, qs = cos[rows, query_rows][:, None, None], sin[rows, query_rows][:, None, None]
        return _rotate(q, qc, qs), _rotate(k, cos[:, None], sin[:, None]), v

    def finish(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual stream after attention output ``[B, l, H, d]``: o-projection and MLP."""
        batch, width = attended.shape[:2]
        hidden = hidden + F.linear(attended.reshape(batch, width, -1), self.o, self.o_bias)
        gate, up = F.linear(_rms(hidden, self.ln2, self.eps), self.gate_up).chunk(2, dim=-1)
        return hidden + F.linear(self.act(gate) * up, self.down)


class TextRows:
    """The text layers of a Qwen3-VL model run directly for the engine (see the module docstring)."""

    #: decoder layer class names this runs (the layer structure it reproduces)
    LAYER_TYPES = ("Qwen3VLTextDecoderLayer",)

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "TextRows | None":
        """The model's :class:`TextRows` (made once and kept on the model), or ``None`` for models
        whose text layers are not Qwen3-VL's."""
        inner = model if hasattr(model, "language_model") else getattr(model, "model", model)
        text = getattr(inner, "language_model", None)
        layers = getattr(text, "layers", None)
        if not layers or any(type(layer).__name__ not in cls.LAYER_TYPES for layer in layers):
            return None
        return _kept(inner, "_vlm3_text_rows",
                     lambda rows: rows.layers[0].qkv.data_ptr() == layers[0].self_attn.q_proj.weight.data_ptr(),
                     lambda: cls(inner, text))

    def __init__(self, inner: Any, text: Any) -> None:
        self.inner = inner
        self.layers = [_Layer(layer) for layer in text.layers]
        self.embed = text.embed_tokens.weight
        self.norm, self.norm_eps = text.norm.weight, text.norm.variance_epsilon
        self.rotary = text.rotary_emb
        self._table = (torch.empty(0), torch.empty(0))  # cos, sin of text positions 0..n-1
        self._heads: dict[Any, tuple] = {}  # multimodal positions and rotary of each prompt head

    # -- rotary --------------------------------------------------------------------------------

    def text_rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[*positions.shape, d]`` of text tokens at RoPE ``positions`` (their text
        position plus the image's offset: all three multimodal rows are equal for them)."""
        need = int(positions.max()) + 1
        cos, sin = self._table
        if cos.shape[0] < need:
            size = max(need, 2 * cos.shape[0], 256)
            grid = torch.arange(size, device=self.embed.device).view(1, 1, -1).expand(3, 1, -1)
            cos, sin = self.rotary(self.embed[:1][None], grid)
            self._table = cos, sin = cos[0], sin[0]
        return cos[positions], sin[positions]

    # -- the rows after the prefix -------------------------------------------------------------

    def last_hidden(self, ids: torch.Tensor, rope_positions: torch.Tensor, cache: RowCache,
                    last: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden state ``[B, hidden]`` of each row's token at ``last`` (``None``: the one
        token of each row), the rows' keys and values written to ``cache``.

        The last layer needs every token's keys and values but its query, attention, MLP and norm
        only for the token whose output is read."""
        cos, sin = self.text_rope(rope_positions)
        hidden = F.embedding(ids, self.embed)
        for layer in self.layers[:-1]:
            q, k, v = layer.projections(hidden, cos, sin)
            hidden = layer.finish(hidden, cache.attend(layer.index, q, k, v, layer.scaling))
        layer = self.layers[-1]
        if last is None or ids.shape[1] == 1:
            q, k, v = layer.projections(hidden, cos, sin)
            out = cache.attend(layer.index, q, k, v, layer.scaling)
        else:
            rows = torch.arange(ids.shape[0], device=ids.device)
            q, k, v = layer.projections(hidden, cos, sin, query_rows=last)
            full = cache.mask
            cache.mask = full[rows, last][:, None]
            out = cache.attend(layer.index, q, k, v, layer.scaling)
            cache.mask = full
            hidden = hidden[rows, last][:, None]
        hidden = layer.finish(hidden, out)
        return _rms(hidden[:, -1], self.norm, self.norm_eps)

    # -- the prefix ----------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                image_embeds: torch.Tensor | None, deepstack: Sequence[torch.Tensor]) -> tuple[list, int]:
        """Keys and values ``[1, Hkv, P, d]`` per layer of a prefix (batch 1) and its multimodal
        RoPE offset for the tokens after it. Only keys and values are read from a prefix: its
        last layer runs its key and value projections alone."""
        key = (tuple(input_ids[0].tolist()), None if image_grid_thw is None else tuple(image_grid_thw.reshape(-1).tolist()))
        head = self._heads.get(key)
        if head is None:
            if image_grid_thw is not None:
                positions, delta = self.inner.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw)
            else:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device).view(1, 1, -1).expand(3, 1, -1)
                delta = torch.zeros(1, 1, dtype=torch.long)
            cos, sin = self.rotary(self.embed[:1][None], positions)
            head = (cos, sin, int(delta.reshape(-1)[0]))
            if len(self._heads) > 16:
                self._heads.clear()
            self._heads[key] = head
        cos, sin, delta = head
        hidden = F.embedding(input_ids, self.embed)
        visual = None
        if image_embeds is not None:
            visual = input_ids[0] == self.inner.config.image_token_id
            if int(visual.sum()) != image_embeds.shape[0]:
                raise ValueError(f"{int(visual.sum())} image tokens in the prompt, {image_embeds.shape[0]} image features")
            hidden[0, visual] = image_embeds.to(hidden.dtype)  # the embedding's output is a new tensor
        kv = []
        for index, layer in enumerate(self.layers):
            q, k, v = layer.projections(hidden, cos, sin)
            kv.append((k, v))
            if index == len(self.layers) - 1:
                break
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scaling,
                                                 enable_gqa=layer.heads != layer.kv_heads)
            hidden = layer.finish(hidden, out.transpose(1, 2))
            if visual is not None and index < len(deepstack):  # ``finish`` made ``hidden`` anew
                hidden[0, visual] = hidden[0, visual] + deepstack[index].to(hidden.dtype)
        return kv, delta


class VisionTower:
    """Qwen3-VL's vision tower with its per-grid tensors kept (see the module docstring)."""

    MODEL_TYPES = ("Qwen3VLVisionModel",)

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "VisionTower | None":
        inner = model if hasattr(model, "visual") else getattr(model, "model", model)
        visual = getattr(inner, "visual", None)
        if visual is None or type(visual).__name__ not in cls.MODEL_TYPES:
            return None
        return _kept(inner, "_vlm3_vision_tower",
                     lambda tower: tower.patch_weight.data_ptr() == visual.patch_embed.proj.weight.data_ptr(),
                     lambda: cls(visual))

    def __init__(self, visual: Any) -> None:
        self.visual = visual
        proj = visual.patch_embed.proj
        self.patch_weight = proj.weight.reshape(proj.weight.shape[0], -1)
        self.patch_bias = proj.bias
        self._grids: dict[tuple, dict[str, Any]] = {}

    def _grid(self, grid_thw: torch.Tensor) -> dict[str, Any]:
        key = tuple(grid_thw.reshape(-1).tolist())
        found = self._grids.get(key)
        if found is not None:
            return found
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
        )

        v = self.visual
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=v.num_grid_per_side, mode=v.interpolation_mode,
            align_corners=v.interpolation_align_corners, spatial_merge_size=v.config.spatial_merge_size,
        )
        positions = get_vision_position_ids(grid_thw, v.spatial_merge_size)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, v.config)
        dtype = self.patch_weight.dtype
        pos_embeds = (v.pos_embed(indices) * weights[:, :, None]).sum(1).to(dtype)
        rotary = v.rotary_pos_emb(pos_embeds, positions)
        found = {"pos_embeds": pos_embeds, "rotary": rotary, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        if len(self._grids) > 16:
            self._grids.clear()
        self._grids[key] = found
        return found

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Merged image features ``[tokens, hidden]`` (all images) and the DeepStack features."""
        v = self.visual
        grid = self._grid(grid_thw)
        hidden = F.linear(pixel_values.to(self.patch_weight.dtype), self.patch_weight, self.patch_bias)
        hidden = hidden + grid["pos_embeds"]
        deepstack = []
        for index, block in enumerate(v.blocks):
            hidden = block(hidden, cu_seqlens=grid["cu_seqlens"], max_seqlen=grid["max_seqlen"],
                           position_embeddings=grid["rotary"])
            if index in v.deepstack_visual_indexes:
                deepstack.append(v.deepstack_merger_list[v.deepstack_visual_indexes.index(index)](hidden))
        return v.merger(hidden), deepstack
