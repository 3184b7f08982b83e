"""The deformable transformer of Deformable DETR: encoder, decoder and the two joined.

Module and parameter names follow the reference implementation
(``transformer.encoder.layers.N.self_attn.sampling_offsets`` and so on), so
its checkpoints map onto these modules one to one.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MSDeformAttn

__all__ = [
    "DeformableTransformer",
    "DeformableTransformerDecoder",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "inverse_sigmoid",
]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [eps, 1 - eps] on both sides of the ratio."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _activation(name: str):
    try:
        return {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}[name]
    except KeyError:
        raise ValueError(f"activation must be 'relu', 'gelu' or 'glu', got {name!r}") from None


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then the feed-forward block (post-norm)."""

    def __init__(
        self,
        d_model=256,
        d_ffn=1024,
        dropout=0.1,
        activation="relu",
        n_levels=4,
        n_heads=8,
        n_points=4,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None
    ):
        """src, pos (N, S, C); reference_points (N, S, L, 2) -> (N, S, C)."""
        attended = self.self_attn(
            _with_pos(src, pos),
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            padding_mask,
        )
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_clone(encoder_layer, num_layers))
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios, device):
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
        src,
        spatial_shapes,
        level_start_index,
        valid_ratios,
        pos=None,
        padding_mask=None,
        spatial_shapes_list=None,
    ):
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


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention, feed-forward (post-norm)."""

    def __init__(
        self,
        d_model=256,
        d_ffn=1024,
        dropout=0.1,
        activation="relu",
        n_levels=4,
        n_heads=8,
        n_points=4,
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
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

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
        """tgt, query_pos (N, Q, C); reference_points (N, Q, L, 2|4); src (N, S, C)."""
        q = k = _with_pos(tgt, query_pos)
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(
            _with_pos(tgt, query_pos),
            reference_points,
            src,
            src_spatial_shapes,
            level_start_index,
            src_padding_mask,
        )
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerDecoder(nn.Module):
    """Decoder layers; with ``bbox_embed`` set, each layer refines the previous boxes."""

    def __init__(
        self,
        decoder_layer: DeformableTransformerDecoderLayer,
        num_layers: int,
        return_intermediate: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_clone(decoder_layer, num_layers))
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        # Set by the detector for box refinement and two-stage.
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt,
        reference_points,
        src,
        src_spatial_shapes,
        src_level_start_index,
        src_valid_ratios,
        query_pos=None,
        src_padding_mask=None,
    ):
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


def _clone(module: nn.Module, n: int) -> list[nn.Module]:
    return [copy.deepcopy(module) for _ in range(n)]


class DeformableTransformer(nn.Module):
    """Encoder + decoder with level embeddings, valid ratios and (optionally) two-stage queries."""

    def __init__(
        self,
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=1024,
        dropout=0.1,
        activation="relu",
        return_intermediate_dec=False,
        num_feature_levels=4,
        dec_n_points=4,
        enc_n_points=4,
        two_stage=False,
        two_stage_num_proposals=300,
        backend: str | None = None,
        attention: str = "deformable",
    ) -> None:
        super().__init__()
        if attention not in ("deformable", "dense"):
            raise ValueError(f"attention must be 'deformable' or 'dense', got {attention!r}")
        self.attention = attention
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        if attention == "dense":
            from .dense import DenseDecoderLayer, DenseEncoderLayer

            enc = DenseEncoderLayer(d_model, dim_feedforward, dropout, activation, nhead)
            dec = DenseDecoderLayer(d_model, dim_feedforward, dropout, activation, nhead)
        else:
            enc = DeformableTransformerEncoderLayer(
                d_model,
                dim_feedforward,
                dropout,
                activation,
                num_feature_levels,
                nhead,
                enc_n_points,
                backend,
            )
            dec = DeformableTransformerDecoderLayer(
                d_model,
                dim_feedforward,
                dropout,
                activation,
                num_feature_levels,
                nhead,
                dec_n_points,
                backend,
            )
        self.encoder = DeformableTransformerEncoder(enc, num_encoder_layers)
        self.decoder = DeformableTransformerDecoder(
            dec, num_decoder_layers, return_intermediate_dec
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
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
        num_pos_feats, temperature, scale = self.d_model // 2, 10000, 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=proposals.dtype, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid() * scale
        pos = pos[:, :, :, None] / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes):
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

    @staticmethod
    def get_valid_ratio(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, H, W) padding mask -> (N, 2) unpadded fraction as (width, height)."""
        _, H, W = mask.shape
        valid_H = (~mask[:, :, 0]).sum(1)
        valid_W = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_W.to(dtype) / W, valid_H.to(dtype) / H], -1)

    def forward(self, srcs, masks, pos_embeds, query_embed=None):
        """srcs, pos_embeds: L maps (N, C, H, W); masks: L (N, H, W) True on padding.

        Returns (hs, init_reference, inter_references, enc_class, enc_coord_unact):
        decoder states (layers, N, Q, C), the first reference points, the
        refined ones per layer, and in two-stage the encoder's proposal
        logits and boxes (else None).
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed (Q, 2*d_model) is required unless two_stage=True")
        src_flatten, mask_flatten, pos_flatten, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds, strict=True)):
            N, C, H, W = src.shape
            shapes.append((H, W))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(
                pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
            )
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        pos_flatten = torch.cat(pos_flatten, 1)
        device = src_flatten.device
        # Counted with ops rather than built from Python ints, so that an exported
        # graph computes the level sizes from its input (as_tensor would bake the
        # example's sizes into ONNX as a constant).
        spatial_shapes = torch.stack(
            [
                torch.stack([torch.ones(d, dtype=torch.long, device=device).sum() for d in hw])
                for hw in shapes
            ]
        )
        areas = spatial_shapes.prod(1)
        level_start_index = torch.cat((areas.new_zeros((1,)), areas.cumsum(0)[:-1]))
        # In the features' dtype: float32 ratios would cap a float64 model's precision.
        valid_ratios = torch.stack([self.get_valid_ratio(m, src_flatten.dtype) for m in masks], 1)
        memory = self.encoder(
            src_flatten,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            pos_flatten,
            mask_flatten,
            shapes,
        )

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
            query_pos, tgt = torch.split(query_embed, C, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(N, -1, -1)
            tgt = tgt.unsqueeze(0).expand(N, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        init_reference = reference_points
        # Dense cross-attention needs positions on its keys: they ride on the memory.
        src = memory + pos_flatten if self.attention == "dense" else memory
        hs, inter_references = self.decoder(
            tgt,
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            query_pos,
            mask_flatten,
        )
        return hs, init_reference, inter_references, enc_class, enc_coord_unact
