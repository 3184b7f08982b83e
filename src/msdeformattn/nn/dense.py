"""Dense-attention layers with the deformable layers' signatures: the DETR-style baseline.

The encoder attends from every pixel to every pixel of every level, the
decoder's cross-attention from every query to every pixel, with ordinary
multi-head attention (padding masked). Reference points and level tables are
accepted and ignored, so the same transformer and detector run either kind.
"""

from __future__ import annotations

from torch import nn

from .transformer import _activation, _with_pos

__all__ = ["DenseDecoderLayer", "DenseEncoderLayer"]


class _FeedForward(nn.Module):
    def __init__(self, d_model, d_ffn, dropout, activation):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout_out = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x):
        y = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm(x + self.dropout_out(y))


class DenseEncoderLayer(nn.Module):
    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", nhead=8):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = _FeedForward(d_model, d_ffn, dropout, activation)

    def forward(
        self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None
    ):
        q = k = _with_pos(src, pos)
        attended = self.self_attn(q, k, src, key_padding_mask=padding_mask, need_weights=False)[0]
        return self.ffn(self.norm1(src + self.dropout1(attended)))


class DenseDecoderLayer(nn.Module):
    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", nhead=8):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = _FeedForward(d_model, d_ffn, dropout, activation)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        src,
        src_spatial_shapes,
        level_start_index,
        src_padding_mask=None,
    ):
        """src: the memory with its position encoding added (keys and values)."""
        q = k = _with_pos(tgt, query_pos)
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(
            _with_pos(tgt, query_pos),
            src,
            src,
            key_padding_mask=src_padding_mask,
            need_weights=False,
        )[0]
        return self.ffn(self.norm1(tgt + self.dropout1(attended)))
