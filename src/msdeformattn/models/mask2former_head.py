"""Mask2Former's masked-attention transformer decoder: learnt queries that predict one class
and one mask each, refined by cross-attention restricted to their own predicted masks.

Module and parameter names follow the official Mask2Former
(``transformer_cross_attention_layers.N.multihead_attn``, ``transformer_self_attention_layers``,
``transformer_ffn_layers``, ``query_feat``, ``query_embed``, ``level_embed``,
``decoder_norm``, ``class_embed``, ``mask_embed.layers.N``), as the pixel decoder's do.

Unlike Mask2Former, the decoder takes a padding mask: queries never attend to padded
pixels, and the outputs do not depend on what the padded pixels hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.blocks import activation_fn, feed_forward, with_pos
from .backbone import PositionEmbeddingSine, resize_mask
from .deformable_detr import MLP
from .pixel_decoder import _extend_border

__all__ = ["MaskedAttentionDecoder", "attention_mask", "semantic_scores"]


def attention_mask(
    mask_logits: torch.Tensor,
    size: Sequence[int],
    padding: torch.Tensor | None = None,
    mask_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Where each query may not attend at a level: Mask2Former's masked attention.

    Args:
        mask_logits (Tensor[N, Q, h, w]): the previous prediction's mask logits.
        size: the level's (H_l, W_l); the logits are resized to it bilinearly.
        padding (Tensor[N, H_l, W_l], bool, optional): True on the level's padded pixels.
        mask_padding (Tensor[N, h, w], bool, optional): True on the logits' padded pixels;
            their values are replaced by the valid border's before resizing, so they
            change nothing.

    Returns:
        Tensor[N, Q, H_l * W_l], bool: True where blocked: where sigmoid(mask) < 0.5, and
        on padding. A query whose mask holds no valid pixel attends to every valid pixel
        (Mask2Former's rule, so that no row of the attention is empty).
    """
    logits = mask_logits.detach()  # the mask steers attention; it is not trained through it
    if mask_padding is not None:
        logits = _extend_border(logits, ~mask_padding)
    resized = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    blocked = resized.sigmoid().flatten(2) < 0.5
    if padding is None:
        return blocked & ~blocked.all(-1, keepdim=True)
    pad = padding.flatten(1)[:, None]  # (N, 1, S)
    blocked = blocked | pad
    return torch.where(blocked.all(-1, keepdim=True), pad, blocked)


def semantic_scores(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, size: Sequence[int] | None = None
) -> torch.Tensor:
    """Mask2Former's semantic inference: each class's score at a pixel is the sum over
    queries of P(class) * P(pixel in the query's mask).

    class_logits (N, Q, K + 1) (the last: no object), mask_logits (N, Q, h, w); size: the
    (H, W) to upsample the mask logits to first, bilinearly (None: keep (h, w)) ->
    (N, K, H, W) scores in [0, Q].
    """
    if size is not None:
        mask_logits = F.interpolate(
            mask_logits, size=tuple(size), mode="bilinear", align_corners=False
        )
    probs = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("nqk,nqhw->nkhw", probs, mask_logits.sigmoid())


class _CrossAttentionLayer(nn.Module):
    """Masked cross-attention from the queries to one level, post-norm."""

    def __init__(self, d_model: int, nheads: int, dropout: float) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nheads, dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        blocked: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """tgt, query_pos (N, Q, C); memory, pos (N, S, C); blocked (N, Q, S) bool ->
        (N, Q, C)."""
        heads = self.multihead_attn.num_heads
        attended = self.multihead_attn(
            with_pos(tgt, query_pos),
            with_pos(memory, pos),
            memory,
            # nn.MultiheadAttention wants one mask per (image, head), image-major.
            attn_mask=blocked.repeat_interleave(heads, 0),
            need_weights=False,
        )[0]
        return self.norm(tgt + self.dropout(attended))


class _SelfAttentionLayer(nn.Module):
    """Self-attention among the queries, post-norm."""

    def __init__(self, d_model: int, nheads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos (N, Q, C) -> (N, Q, C)."""
        q = k = with_pos(tgt, query_pos)
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        return self.norm(tgt + self.dropout(attended))


class _FFNLayer(nn.Module):
    """The feed-forward block, post-norm."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = activation_fn("relu")
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        """tgt (N, Q, C) -> (N, Q, C)."""
        return feed_forward(
            tgt, self.linear1, self.activation, self.dropout, self.linear2, self.dropout, self.norm
        )


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's query decoder over the pixel decoder's outputs.

    ``num_queries`` learnt query features (with learnt position embeddings) pass through
    ``num_layers`` layers; layer i reads level ``i % num_levels`` of the multi-scale
    features (coarsest first; Mask2Former: 9 layers = 3 rounds of 3 levels). Each layer is
    masked cross-attention (each query sees only the pixels of the mask predicted before
    the layer), self-attention, then the feed-forward block, all post-norm. Before the first
    layer and after each, the normed queries give class logits (``num_classes + 1``, the
    last "no object") and mask embeddings, whose dot product with the mask features are
    the mask logits.

    Args:
        num_classes: classes, without the no-object class.
        d_model: channels of the queries and of the multi-scale features.
        mask_dim: channels of the mask features.
        num_queries, nheads, dim_feedforward, num_layers, dropout: as Mask2Former's
            (100, 8, 2048, 9, 0.0).
        num_levels: how many of the multi-scale features (coarsest first) the layers read.

    Example:
        >>> head = MaskedAttentionDecoder(3, d_model=64, mask_dim=64, num_queries=10,
        ...                               nheads=4, num_layers=3)
        >>> levels = [torch.randn(2, 64, s, s) for s in (4, 8, 16)]
        >>> out = head(torch.randn(2, 64, 32, 32), levels)
        >>> out["pred_logits"].shape, out["pred_masks"].shape, len(out["aux_outputs"])
        (torch.Size([2, 10, 4]), torch.Size([2, 10, 32, 32]), 3)
    """

    def __init__(
        self,
        num_classes: int,
        d_model: int = 256,
        mask_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 9,
        num_levels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_layers = num_layers
        # Levels no layer reads would hold an untrained level embedding.
        self.num_levels = min(num_levels, num_layers)
        self.pe_layer = PositionEmbeddingSine(d_model // 2, offset=0.0)  # Mask2Former's
        self.transformer_cross_attention_layers = nn.ModuleList(
            _CrossAttentionLayer(d_model, nheads, dropout) for _ in range(num_layers)
        )
        self.transformer_self_attention_layers = nn.ModuleList(
            _SelfAttentionLayer(d_model, nheads, dropout) for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            _FFNLayer(d_model, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        self.query_feat = nn.Embedding(num_queries, d_model)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.level_embed = nn.Embedding(self.num_levels, d_model)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.mask_embed = MLP(d_model, d_model, mask_dim, 3)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mask2Former's: Xavier-uniform matrices in the layers; PyTorch's defaults for the
        embeddings and heads."""
        for layers in (
            self.transformer_cross_attention_layers,
            self.transformer_self_attention_layers,
            self.transformer_ffn_layers,
        ):
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(
        self,
        mask_features: torch.Tensor,
        multi_scale_features: Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> dict:
        """Class and mask predictions of every query.

        Args:
            mask_features (Tensor[N, mask_dim, h, w]): the pixel decoder's (stride 4).
            multi_scale_features (list of Tensor[N, d_model, H_l, W_l]): coarsest first; the
                first ``num_levels`` are read.
            mask (Tensor[N, H, W], bool, optional): True on padding, valid region at the top
                left, at any resolution (normally the image's); resized to each map by
                nearest neighbour. None: no padding.

        Returns:
            dict: ``pred_logits`` (N, Q, num_classes + 1) and ``pred_masks`` (N, Q, h, w)
            after the last layer; ``aux_outputs``: the same two for the queries before the
            first layer and after each earlier one (``num_layers`` dicts, first to last).
            Mask logits at padded pixels are unspecified.
        """
        levels = list(multi_scale_features[: self.num_levels])
        if len(levels) < self.num_levels:
            raise ValueError(
                f"multi_scale_features must hold at least {self.num_levels} maps, got {len(levels)}"
            )
        N = mask_features.shape[0]
        memories, pos, pads = [], [], []
        for lvl, x in enumerate(levels):
            pad = (
                torch.zeros(N, *x.shape[-2:], dtype=torch.bool, device=x.device)
                if mask is None
                else resize_mask(mask, x.shape[-2:])
            )
            pads.append(pad)
            pos.append(self.pe_layer(pad, x.dtype).flatten(2).transpose(1, 2))
            memories.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[lvl])
        mask_pad = None if mask is None else resize_mask(mask, mask_features.shape[-2:])

        query = self.query_feat.weight.expand(N, -1, -1)
        query_pos = self.query_embed.weight.expand(N, -1, -1)
        predictions = [self._predict(query, mask_features)]
        for i in range(self.num_layers):
            lvl = i % self.num_levels
            blocked = attention_mask(
                predictions[-1]["pred_masks"], levels[lvl].shape[-2:], pads[lvl], mask_pad
            )
            query = self.transformer_cross_attention_layers[i](
                query, memories[lvl], blocked, pos[lvl], query_pos
            )
            query = self.transformer_self_attention_layers[i](query, query_pos)
            query = self.transformer_ffn_layers[i](query)
            predictions.append(self._predict(query, mask_features))
        return {**predictions[-1], "aux_outputs": predictions[:-1]}

    def _predict(self, query: torch.Tensor, mask_features: torch.Tensor) -> dict:
        """query (N, Q, C), mask_features (N, D, h, w) -> pred_logits (N, Q, K + 1),
        pred_masks (N, Q, h, w)."""
        normed = self.decoder_norm(query)
        masks = torch.einsum("nqd,ndhw->nqhw", self.mask_embed(normed), mask_features)
        return {"pred_logits": self.class_embed(normed), "pred_masks": masks}
