"""Padding-free forwards for the BERT family: a batch's real tokens packed into one `[N, d]` tensor.

Every position-wise step (embeddings, Q/K/V and output projections, feed-forward, LayerNorms, the routed
adapters, token heads) runs on the N real tokens only; attention alone needs rows, so each layer scatters
Q, K and V into a padded `[B, heads, T, d_head]` view, runs scaled-dot-product attention with a key mask,
and gathers the real tokens back. Maths per layer (eval mode, dropout off), for the packed hidden `h`:

    a = LayerNorm_attn(h + adapter_attn(W_o . attention(W_q h, W_k h, W_v h)))
    h' = LayerNorm_ffn(a + adapter_ffn(W_2 . act(W_1 a)))

exactly the padded forward's, row by row (a padded position never reaches a real one: attention masks it).
The modules are the model's own (with the slot pool's routed projections and norms in place), so the
packed and the padded forward share every weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from service.modeling.backbone import ArchSpec, get_submodule


# The BERT layer layout the packed forward reaches into, by attribute name (BertLayer, RobertaLayer and
# ElectraLayer share it but no class). Projections and norms are any Module: the slot pool's routed
# layers and int8's quantised Linears stand in for nn.Linear and nn.LayerNorm.
class SelfAttentionLayout(Protocol):
    query: nn.Module
    key: nn.Module
    value: nn.Module
    num_attention_heads: int


class SublayerOutputLayout(Protocol):
    dense: nn.Module
    LayerNorm: nn.Module


class AttentionLayout(Protocol):
    self: SelfAttentionLayout
    output: SublayerOutputLayout


class BertLayerLayout(Protocol):
    attention: AttentionLayout
    intermediate: nn.Module
    output: SublayerOutputLayout


class PaddingConfig(Protocol):
    pad_token_id: int


class BertModelLayout(Protocol):
    config: PaddingConfig
    embeddings: nn.Module


@dataclass(frozen=True)
class Packing:
    """Where each row's tokens sit in a packed batch (rows in batch order, tokens in row order)."""

    lengths: tuple[int, ...]  # real tokens per row
    offsets: tuple[int, ...]  # B + 1 cumulative lengths: row i holds packed tokens [offsets[i], offsets[i+1])
    starts: torch.Tensor  # [B] long: offsets[:-1] on the device (each row's first token, [CLS])
    row_of_token: torch.Tensor  # [N] long: the row of each packed token
    positions: torch.Tensor  # [N] long: each token's position within its row
    pad_index: torch.Tensor  # [N] long: each packed token's place in the flattened padded [B * T] view
    key_mask: torch.Tensor  # [B, 1, 1, T] bool: True at real tokens

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def uniform(self) -> bool:
        """Every row has the same length: the padded view is a plain reshape."""
        return min(self.lengths) == max(self.lengths)

    @classmethod
    def of(cls, lengths: Sequence[int], device: torch.device) -> Packing:
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError("a packed batch needs at least one row, each with at least one token")
        B, T = len(lengths), max(lengths)
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        lens = torch.tensor(lengths)
        row_of_token = torch.repeat_interleave(torch.arange(B), lens)
        within = torch.arange(offsets[-1]) - torch.tensor(offsets[:-1]).repeat_interleave(lens)
        key_mask = (torch.arange(T)[None, :] < lens[:, None]).view(B, 1, 1, T)
        return cls(lengths, tuple(offsets), torch.tensor(offsets[:-1], device=device), row_of_token.to(device),
                   within.to(device), (row_of_token * T + within).to(device), key_mask.to(device))

    def pool(self, hidden: torch.Tensor, kind: str) -> torch.Tensor:
        """[N, d] -> [B, d]: each row's [CLS] token, or the mean of its tokens (accumulated in float32)."""
        if kind == "cls":
            return hidden.index_select(0, self.starts)
        sums = torch.zeros(len(self.lengths), hidden.shape[-1], device=hidden.device, dtype=torch.float32)
        sums.index_add_(0, self.row_of_token, hidden.float())
        counts = torch.tensor(self.lengths, device=hidden.device, dtype=torch.float32)[:, None]
        return (sums / counts).to(hidden.dtype)

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...] with zeros at padded positions."""
        B, T = len(self.lengths), self.max_length
        if self.uniform:
            return x.view(B, T, *x.shape[1:])
        out = x.new_zeros(B * T, *x.shape[1:])
        out.index_copy_(0, self.pad_index, x)
        return out.view(B, T, *x.shape[1:])

    def from_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]: the real tokens."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.uniform else flat.index_select(0, self.pad_index)


def adjacent_columns(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """[N, 3, d] over the memory of q, k, v [N, d] where they are consecutive column blocks of one [N, 3d]
    tensor (a stacked projection's output, `int8.StackedInt8`), so that they need no copy; else None."""
    N, d = q.shape
    step = d * q.element_size()
    if (q.stride() == (3 * d, 1) and k.stride() == q.stride() and v.stride() == q.stride()
            and k.shape == q.shape == v.shape and k.dtype == q.dtype == v.dtype
            and k.untyped_storage().data_ptr() == q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
            and k.data_ptr() == q.data_ptr() + step and v.data_ptr() == q.data_ptr() + 2 * step):
        return q.as_strided((N, 3, d), (3 * d, d, 1))
    return None


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, packing: Packing,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """Multi-head self-attention of packed [N, d] queries, keys and values within each row -> [N, d], computed in
    `dtype` (None: theirs; `Precision.attention_dtype`) and returned in theirs."""
    N, d = q.shape
    fused = adjacent_columns(q, k, v)
    qkv = torch.stack((q, k, v), 1) if fused is None else fused  # [N, 3, d]
    qkv = packing.to_padded(qkv if dtype is None else qkv.to(dtype))  # [B, T, 3, d]: one scatter
    B, T = qkv.shape[:2]
    qkv = qkv.view(B, T, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # [3, B, H, T, dh]
    mask = None if packing.uniform else packing.key_mask
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # [B, H, T, dh]
    return packing.from_padded(out.transpose(1, 2).reshape(B, T, d)).to(q.dtype)


def packed_layer(layer: BertLayerLayout, h: torch.Tensor, packing: Packing,
                 attention_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One BERT-layout encoder layer on packed tokens (see the module docstring), attention in `attention_dtype`
    (None: h's)."""
    sa = layer.attention.self
    ctx = packed_attention(sa.query(h), sa.key(h), sa.value(h), sa.num_attention_heads, packing, attention_dtype)
    out = layer.attention.output
    h = out.LayerNorm(out.dense(ctx) + h)
    ffn = layer.output
    h_out: torch.Tensor = ffn.LayerNorm(ffn.dense(layer.intermediate(h)) + h)
    return h_out


def packed_forward(
    model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
    packing: Packing, attention_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The encoder's last hidden states for packed `input_ids` [N] -> [N, d], attention computed in
    `attention_dtype` (None: the hidden states' dtype)."""
    # casts: only packable (BERT-layout) models get here, see `Backbone.packable`
    bert = cast(BertModelLayout, model)
    layers = cast("Iterable[BertLayerLayout]", get_submodule(model, spec.layers))
    positions = packing.positions
    if spec.positions_after_padding:
        positions = positions + bert.config.pad_token_id + 1
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    h: torch.Tensor = bert.embeddings(input_ids=input_ids[None], token_type_ids=token_type_ids[None],
                                      position_ids=positions[None])[0]
    project = getattr(model, "embeddings_project", None)  # ELECTRA: embedding width -> hidden width
    if project is not None:
        h = project(h)
    for layer in layers:
        h = packed_layer(layer, h, packing, attention_dtype)
    return h
