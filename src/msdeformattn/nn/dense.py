"""The DETR-style baseline: the deformable transformer's interface with dense attention.

The encoder attends from every pixel to every pixel of every level, the
decoder's cross-attention from every query to every pixel, with ordinary
multi-head attention (padding masked). It takes and returns what
:class:`~msdeformattn.nn.DeformableTransformer` does, so the same detector runs
either (``DeformableDETRConfig(attention="dense")``) and training compares them
at equal budgets. Layer and parameter names follow the deformable layers'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import activation_fn, clones, feed_forward, flatten_levels, with_pos
from .transformer import DeformableTransformerDecoder, learned_queries

__all__ = ["DenseDecoderLayer", "DenseEncoderLayer", "DenseTransformer"]


class DenseEncoderLayer(nn.Module):
    """Multi-head self-attention over all pixels of all levels, then the feed-forward block."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_heads: int = 8,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """src, pos (N, S, C); padding_mask (N, S) True on padding -> (N, S, C)."""
        q = k = with_pos(src, pos)
        attended = self.self_attn(q, k, src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attended))
        return feed_forward(
            src, self.linear1, self.activation, self.dropout2, self.linear2, self.dropout3,
            self.norm2,
        )  # fmt: skip


class DenseDecoderLayer(nn.Module):
    """Self-attention among queries, dense cross-attention to the memory, feed-forward.

    Takes the deformable decoder layer's arguments, so
    :class:`~msdeformattn.nn.DeformableTransformerDecoder` runs it (and refines boxes
    around its reference points); the reference points and level tables go unused.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_heads: int = 8,
    ) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor | None,
        reference_points: torch.Tensor,
        src: torch.Tensor,
        src_spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        src_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tgt, query_pos (N, Q, C); src (N, S, C): the memory with its position
        encoding added (keys and values) -> (N, Q, C)."""
        q = k = with_pos(tgt, query_pos)
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(
            with_pos(tgt, query_pos),
            src,
            src,
            key_padding_mask=src_padding_mask,
            need_weights=False,
        )[0]
        tgt = self.norm1(tgt + self.dropout1(attended))
        return feed_forward(
            tgt, self.linear1, self.activation, self.dropout3, self.linear2, self.dropout4,
            self.norm3,
        )  # fmt: skip


class DenseTransformerEncoder(nn.Module):
    def __init__(self, layer: DenseEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(clones(layer, num_layers))

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos, padding_mask)
        return src


class DenseTransformer(nn.Module):
    """Dense encoder + decoder with level embeddings and learned queries (no two-stage).

    ``forward`` takes and returns what ``DeformableTransformer.forward`` does
    (``enc_class`` and ``enc_coord_unact`` are None).
    """

    two_stage = False

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        return_intermediate_dec: bool = False,
        n_levels: int = 4,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        layer_args = (d_model, d_ffn, dropout, activation, n_heads)
        self.encoder = DenseTransformerEncoder(DenseEncoderLayer(*layer_args), num_encoder_layers)
        self.decoder = DeformableTransformerDecoder(
            DenseDecoderLayer(*layer_args), num_decoder_layers, return_intermediate_dec
        )
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.reference_points = nn.Linear(d_model, 2)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        pos_embeds: Sequence[torch.Tensor],
        query_embed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, ...]:
        """srcs, pos_embeds: L maps (N, C, H, W); masks: L (N, H, W) True on padding;
        query_embed (Q, 2*C). Returns (hs, init_reference, inter_references, None, None)."""
        if query_embed is None:
            raise ValueError("query_embed (Q, 2*d_model) is required (no two-stage)")
        flat = flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder(flat.src, flat.pos, flat.mask)
        tgt, query_pos, reference_points = learned_queries(
            query_embed, self.reference_points, memory.shape[0]
        )
        hs, inter_references = self.decoder(
            tgt,
            reference_points,
            # Cross-attention needs positions on its keys: they ride on the memory.
            memory + flat.pos,
            flat.spatial_shapes,
            flat.level_start_index,
            flat.valid_ratios,
            query_pos,
            flat.mask,
        )
        return hs, reference_points, inter_references, None, None
