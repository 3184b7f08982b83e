"""The deformable transformer of Deformable DETR: encoder, decoder and the two joined.

Module and parameter names follow the reference implementation
(``transformer.encoder.layers.N.self_attn.sampling_offsets`` and so on), so
its checkpoints map onto these modules one to one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .attention import MSDeformAttn
from .blocks import (
    FlatLevels,
    activation_fn,
    clones,
    feed_forward,
    flatten_levels,
    sine_encoding,
    with_pos,
)

__all__ = [
    "DeformableTransformer",
    "DeformableTransformerDecoder",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "inverse_sigmoid",
    "learned_queries",
]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [eps, 1 - eps] on both sides of the ratio."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then the feed-forward block (post-norm)."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor | None,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """src, pos (N, S, C); reference_points (N, S, L, 2) -> (N, S, C)."""
        attended = self.self_attn(
            with_pos(src, pos),
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            padding_mask,
        )
        src = self.norm1(src + self.dropout1(attended))
        return feed_forward(
            src, self.linear1, self.activation, self.dropout2, self.linear2, self.dropout3,
            self.norm2,
        )  # fmt: skip


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(clones(encoder_layer, num_layers))
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(
        spatial_shapes: Sequence[tuple[int, int]],
        valid_ratios: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """Pixel centres of every level, normalised by the valid (unpadded) extent.

        Returns (N, S, L, 2): each pixel's centre seen from every level.
        """
        points = []
        for lvl, (H, W) in enumerate(spatial_shapes):
            # arange, not linspace: the same numbers, and export keeps its length symbolic.
            ref_y, ref_x = torch.meshgrid(
                torch.arange(H, dtype=valid_ratios.dtype, device=device) + 0.5,
                torch.arange(W, dtype=valid_ratios.dtype, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
            points.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(points, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        pos: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        spatial_shapes_list: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """src (N, S, C); valid_ratios (N, L, 2) -> memory (N, S, C).

        ``spatial_shapes_list`` gives the level sizes as Python (or symbolic)
        ints; without it they are read from the tensor, which export cannot trace.
        """
        shapes = spatial_shapes_list or [tuple(s) for s in spatial_shapes.tolist()]
        reference_points = self.get_reference_points(shapes, valid_ratios, src.device)
        output = src
        for layer in self.layers:
            output = layer(
                output, pos, reference_points, spatial_shapes, level_start_index, padding_mask
            )
        return output

    def encode(self, flat: FlatLevels) -> torch.Tensor:
        """``forward`` on the levels :func:`flatten_levels` gives: memory (N, S, C)."""
        return self(
            flat.src,
            flat.spatial_shapes,
            flat.level_start_index,
            flat.valid_ratios,
            flat.pos,
            flat.mask,
            flat.shapes,
        )


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention, feed-forward (post-norm)."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
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
        """tgt, query_pos (N, Q, C); reference_points (N, Q, L, 2|4); src (N, S, C)
        -> (N, Q, C)."""
        q = k = with_pos(tgt, query_pos)
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(
            with_pos(tgt, query_pos),
            reference_points,
            src,
            src_spatial_shapes,
            level_start_index,
            src_padding_mask,
        )
        tgt = self.norm1(tgt + self.dropout1(attended))
        return feed_forward(
            tgt, self.linear1, self.activation, self.dropout3, self.linear2, self.dropout4,
            self.norm3,
        )  # fmt: skip


class DeformableTransformerDecoder(nn.Module):
    """Decoder layers; with ``bbox_embed`` set, each layer refines the previous boxes."""

    def __init__(
        self,
        decoder_layer: nn.Module,
        num_layers: int,
        return_intermediate: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(clones(decoder_layer, num_layers))
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        # Set by the detector for box refinement and two-stage.
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: torch.Tensor,
        reference_points: torch.Tensor,
        src: torch.Tensor,
        src_spatial_shapes: torch.Tensor,
        src_level_start_index: torch.Tensor,
        src_valid_ratios: torch.Tensor,
        query_pos: torch.Tensor | None = None,
        src_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hs, references): (layers, N, Q, C) and (layers, N, Q, 2|4) if intermediate."""
        output = tgt
        outputs, references = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([src_valid_ratios, src_valid_ratios], -1)
            else:
                ratios = src_valid_ratios
            reference_input = reference_points[:, :, None] * ratios[:, None]
            output = layer(
                output,
                query_pos,
                reference_input,
                src,
                src_spatial_shapes,
                src_level_start_index,
                src_padding_mask,
            )
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    refined = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    refined = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1
                    ).sigmoid()
                reference_points = refined.detach()
            if self.return_intermediate:
                outputs.append(output)
                references.append(reference_points)
        if self.return_intermediate:
            return torch.stack(outputs), torch.stack(references)
        return output, reference_points


class DeformableTransformer(nn.Module):
    """Encoder + decoder with level embeddings, valid ratios and (optionally) two-stage queries."""

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
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        layer_args = (d_model, d_ffn, dropout, activation, n_levels, n_heads)
        self.encoder = DeformableTransformerEncoder(
            DeformableTransformerEncoderLayer(*layer_args, enc_n_points, backend=backend),
            num_encoder_layers,
        )
        self.decoder = DeformableTransformerDecoder(
            DeformableTransformerDecoderLayer(*layer_args, dec_n_points, backend=backend),
            num_decoder_layers,
            return_intermediate_dec,
        )
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """Sine embedding of proposal boxes (N, Q, 4) -> (N, Q, 2*d_model).

        The reference fixes 128 features per coordinate, i.e. d_model // 2 at
        its d_model of 256; d_model // 2 keeps other widths working.
        """
        return sine_encoding(proposals.sigmoid() * (2 * math.pi), self.d_model // 2).flatten(2)

    def gen_encoder_output_proposals(
        self,
        memory: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One proposal per encoder pixel (its centre, a size growing with the level).

        Returns the masked, projected memory and the proposals in logit space
        (inf where padded or too close to the border).
        """
        N = memory.shape[0]
        proposals = []
        cur = 0
        for lvl, (H, W) in enumerate(spatial_shapes):
            mask = memory_padding_mask[:, cur : cur + H * W].view(N, H, W, 1)
            valid_H = (~mask[:, :, 0, 0]).sum(1)
            valid_W = (~mask[:, 0, :, 0]).sum(1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(H, dtype=memory.dtype, device=memory.device),
                torch.arange(W, dtype=memory.dtype, device=memory.device),
                indexing="ij",
            )
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_W.unsqueeze(-1), valid_H.unsqueeze(-1)], 1).view(N, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(N, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((grid, wh), -1).view(N, -1, 4))
            cur += H * W
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), math.inf)
        output_proposals = output_proposals.masked_fill(~valid, math.inf)
        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    def forward(
        self,
        srcs: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        pos_embeds: Sequence[torch.Tensor],
        query_embed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """srcs, pos_embeds: L maps (N, C, H, W); masks: L (N, H, W) True on padding;
        query_embed (Q, 2*C) unless two-stage.

        Returns (hs, init_reference, inter_references, enc_class, enc_coord_unact):
        decoder states (layers, N, Q, C), the first reference points, the
        refined ones per layer, and in two-stage the encoder's proposal
        logits and boxes (else None).
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed (Q, 2*d_model) is required unless two_stage=True")
        flat = flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder.encode(flat)
        mask_flatten, shapes = flat.mask, flat.shapes
        N, _, C = memory.shape
        enc_class = enc_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(
                memory, mask_flatten, shapes
            )
            head = self.decoder.num_layers
            enc_class = self.decoder.class_embed[head](output_memory)
            enc_coord_unact = self.decoder.bbox_embed[head](output_memory) + output_proposals
            topk = self.two_stage_num_proposals
            topk_idx = torch.topk(enc_class[..., 0], topk, dim=1)[1]
            topk_coords = torch.gather(
                enc_coord_unact, 1, topk_idx.unsqueeze(-1).expand(-1, -1, 4)
            ).detach()
            reference_points = topk_coords.sigmoid()
            pos_trans = self.pos_trans_norm(
                self.pos_trans(self.get_proposal_pos_embed(topk_coords))
            )
            query_pos, tgt = torch.split(pos_trans, C, dim=2)
        else:
            tgt, query_pos, reference_points = learned_queries(
                query_embed, self.reference_points, N
            )
        hs, inter_references = self.decoder(
            tgt,
            reference_points,
            memory,
            flat.spatial_shapes,
            flat.level_start_index,
            flat.valid_ratios,
            query_pos,
            mask_flatten,
        )
        return hs, reference_points, inter_references, enc_class, enc_coord_unact


def learned_queries(
    query_embed: torch.Tensor, reference_points: nn.Linear, batch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query_embed (Q, 2*C) -> (tgt, query_pos, reference points): (N, Q, C), (N, Q, C) and
    (N, Q, 2) in [0, 1], the points predicted from query_pos (the reference's one-stage
    queries)."""
    query_pos, tgt = torch.split(query_embed, query_embed.shape[1] // 2, dim=1)
    query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
    tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
    return tgt, query_pos, reference_points(query_pos).sigmoid()
