"""Mask2Former's multi-scale deformable pixel decoder, and its conversion from transformers.

Module and parameter names follow the official Mask2Former
(``input_proj.0.0.weight``, ``transformer.level_embed``,
``transformer.encoder.layers.N.self_attn.sampling_offsets.weight``, ``adapter_1.norm.weight``,
``layer_1.weight``, ``mask_features.weight``), so its checkpoints map onto this module one to
one; :meth:`MSDeformAttnPixelDecoder.from_transformers` renames transformers' keys to these.

Unlike Mask2Former, the decoder takes a padding mask, and is then padding-invariant: the
outputs at valid pixels do not depend on what the padded ones hold (see
:meth:`MSDeformAttnPixelDecoder.forward`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import MSDeformAttn
from ..nn.blocks import flatten_levels
from ..nn.transformer import DeformableTransformerEncoder, DeformableTransformerEncoderLayer
from .backbone import PositionEmbeddingSine, resize_mask
from .convert import LoadReport

__all__ = ["MSDeformAttnPixelDecoder", "PixelDecoderOutput"]

#: GroupNorm's groups in every projection and FPN convolution (Mask2Former's choice).
_GROUPS = 32


class PixelDecoderOutput(NamedTuple):
    """What the pixel decoder returns.

    mask_features: (N, mask_dim, H_0, W_0), the finest backbone level's size (stride 4).
    multi_scale_features: the encoder's outputs, coarsest first, each (N, d_model, H_l, W_l)
        (strides 32, 16, 8 by default), as Mask2Former's query decoder reads them.
    """

    mask_features: torch.Tensor
    multi_scale_features: list[torch.Tensor]


def _group_norm(x: torch.Tensor, norm: nn.GroupNorm, valid: torch.Tensor | None) -> torch.Tensor:
    """``norm(x)`` for x (N, C, H, W); with ``valid`` (N, H, W) bool, the statistics are over
    valid pixels only and padded pixels come out as zero (a convolution after it then sees
    the zero padding it would see at the border of the unpadded image)."""
    if valid is None:
        return norm(x)
    N, C, H, W = x.shape
    w = valid[:, None, None].to(x.dtype)  # (N, 1, 1, H, W)
    groups = x.reshape(N, norm.num_groups, C // norm.num_groups, H, W)
    dims = (2, 3, 4)
    count = (w.sum(dims, keepdim=True) * groups.shape[2]).clamp(min=1)
    mean = (groups * w).sum(dims, keepdim=True) / count
    centred = groups - mean
    var = (centred.square() * w).sum(dims, keepdim=True) / count
    out = (centred * (var + norm.eps).rsqrt()).reshape(N, C, H, W)
    if norm.affine:
        out = out * norm.weight[:, None, None] + norm.bias[:, None, None]
    return out * valid[:, None].to(x.dtype)


def _extend_border(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Copy each image's last valid row and column over its padding: x (N, C, H, W), valid
    (N, H, W) bool (valid region at the top left). Bilinear upsampling then reads at the valid
    border what it reads at the border of the unpadded image (align_corners=False clamps)."""
    N, C, H, W = x.shape
    last_row = (valid[:, :, 0].sum(1) - 1).clamp(min=0)
    last_col = (valid[:, 0, :].sum(1) - 1).clamp(min=0)
    rows = torch.minimum(torch.arange(H, device=x.device)[None], last_row[:, None])
    cols = torch.minimum(torch.arange(W, device=x.device)[None], last_col[:, None])
    x = x.gather(2, rows[:, None, :, None].expand(N, C, H, W))
    return x.gather(3, cols[:, None, None, :].expand(N, C, H, W))


class _ConvNorm(nn.Conv2d):
    """detectron2's ``Conv2d(..., norm=GroupNorm)``: a bias-free convolution owning its norm
    (keys ``weight``, ``norm.weight``, ``norm.bias``, as in Mask2Former's checkpoints)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.norm = nn.GroupNorm(_GROUPS, out_channels)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C_in, H, W), valid (N, H, W) bool or None -> (N, C_out, H, W)."""
        return _group_norm(super().forward(x), self.norm, valid)


class _EncoderOnly(nn.Module):
    """Level embeddings and the deformable encoder (Mask2Former's
    ``MSDeformAttnTransformerEncoderOnly``, under ``transformer``)."""

    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.encoder = DeformableTransformerEncoder(layer, num_layers)
        attn = layer.self_attn
        self.level_embed = nn.Parameter(torch.empty(attn.n_levels, attn.d_model))

    def forward(
        self,
        srcs: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        pos: Sequence[torch.Tensor],
    ) -> list[torch.Tensor]:
        """srcs, pos: L maps (N, C, H_l, W_l); masks: L (N, H_l, W_l) True on padding
        -> the encoded maps, L (N, C, H_l, W_l)."""
        flat = flatten_levels(srcs, masks, pos, self.level_embed)
        memory = self.encoder.encode(flat)
        N, _, C = memory.shape
        levels = memory.split([h * w for h, w in flat.shapes], 1)
        # Contiguous maps: CPU bilinear upsampling of the transposed view is ~7x slower.
        return [
            m.transpose(1, 2).reshape(N, C, h, w).contiguous()
            for m, (h, w) in zip(levels, flat.shapes, strict=True)
        ]


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: deformable encoder over the coarse levels, then an FPN.

    The ``n_levels`` coarsest backbone maps are projected to ``d_model`` channels (1x1 conv
    + GroupNorm(32)), given the sine position encoding plus a learnt level embedding and
    encoded by ``num_encoder_layers`` deformable self-attention layers (reference points at
    pixel centres). The finer maps join through an FPN path (lateral 1x1 conv + GroupNorm,
    bilinear upsample-add, 3x3 conv + GroupNorm + ReLU), and a 1x1 convolution of the
    finest map gives the mask features. ``num_encoder_layers=0`` is the plain FPN.

    Args:
        in_channels: channels of the backbone maps, finest first (strides 4, 8, 16, 32).
        d_model: channels inside the decoder; a multiple of 32 (GroupNorm's groups).
        mask_dim: channels of the mask features.
        n_heads, n_points: attention heads, and sampling points per head and level.
        num_encoder_layers: deformable encoder layers.
        d_ffn: hidden width of the encoder layers' feed-forward block.
        dropout: dropout in the encoder layers (Mask2Former: 0).
        activation: the feed-forward activation, ``"relu"`` or ``"gelu"``.
        n_levels: how many of the coarsest maps the encoder reads (at most all of them);
            the rest go through the FPN.
        backend: operator backend (None: the fastest that supports the call).

    Example:
        >>> dec = MSDeformAttnPixelDecoder([64, 128, 256, 512], d_model=64, mask_dim=64)
        >>> feats = [torch.randn(2, c, 64 // s, 64 // s)
        ...          for c, s in zip([64, 128, 256, 512], [1, 2, 4, 8])]
        >>> out = dec(feats)
        >>> out.mask_features.shape, [tuple(f.shape[-2:]) for f in out.multi_scale_features]
        (torch.Size([2, 64, 64, 64]), [(8, 8), (16, 16), (32, 32)])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        d_model: int = 256,
        mask_dim: int = 256,
        n_heads: int = 8,
        n_points: int = 4,
        num_encoder_layers: int = 6,
        d_ffn: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        n_levels: int = 3,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if not 1 <= n_levels <= len(in_channels):
            raise ValueError(
                f"n_levels must be between 1 and len(in_channels)={len(in_channels)}, "
                f"got {n_levels}"
            )
        if d_model % _GROUPS != 0:
            raise ValueError(
                f"d_model must be a multiple of {_GROUPS} (GroupNorm's groups), got {d_model}"
            )
        self.in_channels = in_channels
        self.d_model = d_model
        self.mask_dim = mask_dim
        self.n_levels = n_levels
        #: backbone maps below the encoder's levels, each an FPN step (finest first)
        self.num_fpn_levels = len(in_channels) - n_levels
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(_GROUPS, d_model))
            for c in reversed(in_channels[self.num_fpn_levels :])
        )
        layer = DeformableTransformerEncoderLayer(
            d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points, backend=backend
        )
        self.transformer = _EncoderOnly(layer, num_encoder_layers)
        # DETR's encoding (no -0.5 offset), as Mask2Former's; it holds no parameters.
        self.pe_layer = PositionEmbeddingSine(d_model // 2, offset=0.0)
        self.mask_features = nn.Conv2d(d_model, mask_dim, 1)
        for i, c in enumerate(in_channels[: self.num_fpn_levels]):
            self.add_module(f"adapter_{i + 1}", _ConvNorm(c, d_model, 1))
            self.add_module(f"layer_{i + 1}", _ConvNorm(d_model, d_model, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mask2Former's initialisation: Xavier-uniform matrices and projections, the
        attention's own scheme, normal level embeddings, c2_xavier_fill for the FPN."""
        for p in self.transformer.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.transformer.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.transformer.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for conv in [self.mask_features, *self._fpn_convs()]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def _fpn_convs(self) -> list[_ConvNorm]:
        return [
            getattr(self, f"{kind}_{i + 1}")
            for i in range(self.num_fpn_levels)
            for kind in ("adapter", "layer")
        ]

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, n_levels={self.n_levels}"

    def forward(
        self, features: Sequence[torch.Tensor], mask: torch.Tensor | None = None
    ) -> PixelDecoderOutput:
        """Decode the backbone maps into mask features and multi-scale features.

        Args:
            features (list of Tensor[N, C_l, H_l, W_l]): the backbone maps, finest first
                (strides 4 to 32), ``C_l = in_channels[l]``.
            mask (Tensor[N, H, W], bool, optional): True on padding, at any resolution
                (normally the input image's), valid region at the top left; resized to
                each level by nearest neighbour. None: no padding (Mask2Former).

        Returns:
            :class:`PixelDecoderOutput`: mask features (N, mask_dim, H_0, W_0) and the
            encoder outputs, coarsest first, (N, d_model, H_l, W_l).

        With a mask, padded pixels take no part (masked attention values, GroupNorm
        statistics over valid pixels, zeros before each 3x3 convolution, border copied
        before upsampling): when every level's valid region is exactly the unpadded
        image's map (image sizes multiples of 32), the outputs at valid pixels equal those
        for the unpadded image alone to float rounding. Outputs at padded pixels are
        unspecified.
        """
        self._check(features, mask)
        N = features[0].shape[0]
        if mask is None:
            pads = [
                torch.zeros(N, *f.shape[-2:], dtype=torch.bool, device=f.device) for f in features
            ]
            valids: list[torch.Tensor | None] = [None] * len(features)
        else:
            pads = [resize_mask(mask, f.shape[-2:]) for f in features]
            valids = [~p for p in pads]
        srcs, masks, pos = [], [], []
        # The encoder's levels run coarsest first, as the input projections do.
        coarse_first = reversed(range(self.num_fpn_levels, len(features)))
        for proj, lvl in zip(self.input_proj, coarse_first, strict=True):
            x = features[lvl]
            srcs.append(_group_norm(proj[0](x), proj[1], valids[lvl]))
            masks.append(pads[lvl])
            pos.append(self.pe_layer(pads[lvl], x.dtype))
        encoded = self.transformer(srcs, masks, pos)
        y = encoded[-1]
        for lvl in reversed(range(self.num_fpn_levels)):
            lateral = getattr(self, f"adapter_{lvl + 1}")(features[lvl], valids[lvl])
            if valids[lvl] is not None:
                y = _extend_border(y, valids[lvl + 1])
            y = lateral + F.interpolate(
                y, size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            if valids[lvl] is not None:
                y = y * valids[lvl][:, None].to(y.dtype)
            y = F.relu(getattr(self, f"layer_{lvl + 1}")(y, valids[lvl]))
        return PixelDecoderOutput(self.mask_features(y), encoded)

    def _check(self, features: Sequence[torch.Tensor], mask: torch.Tensor | None) -> None:
        got = [tuple(f.shape) for f in features]
        if len(features) != len(self.in_channels) or any(
            f.dim() != 4 or f.shape[1] != c or f.shape[0] != features[0].shape[0]
            for f, c in zip(features, self.in_channels, strict=True)
        ):
            raise ValueError(
                f"features must be {len(self.in_channels)} maps (N, C_l, H_l, W_l) with C_l = "
                f"{self.in_channels}, finest first, got shapes {got}"
            )
        if mask is not None and (
            mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[0] != features[0].shape[0]
        ):
            raise ValueError(
                f"mask must be a bool tensor (N, H, W) with N = {features[0].shape[0]} "
                f"(True on padding), got {mask.dtype} {tuple(mask.shape)}"
            )

    @classmethod
    def from_transformers(
        cls,
        module: nn.Module,
        *,
        backend: str | None = None,
        output_loading_info: bool = False,
    ) -> MSDeformAttnPixelDecoder | tuple[MSDeformAttnPixelDecoder, LoadReport]:
        """Ours, with the weights of a transformers ``Mask2FormerPixelDecoder`` (a
        Mask2Former's ``model.pixel_level_module.decoder``), on its device and dtype, in
        eval mode. Warns unless every key maps; ``output_loading_info=True`` returns
        ``(decoder, report)`` instead.

        Example:
            >>> hf = Mask2FormerModel(config).pixel_level_module.decoder  # doctest: +SKIP
            >>> ours = MSDeformAttnPixelDecoder.from_transformers(hf)  # doctest: +SKIP
        """
        config = module.config
        hf_fpn = int(getattr(module, "num_fpn_levels", 0))
        n_levels = int(module.num_feature_levels)
        channels = list(module.feature_channels)
        if hf_fpn != len(channels) - n_levels:
            raise ValueError(
                f"the transformers decoder runs {hf_fpn} FPN levels for {len(channels)} "
                f"backbone maps and {n_levels} encoder levels; ours runs every map below the "
                f"encoder's through the FPN ({len(channels) - n_levels}): set its config's "
                "common_stride to the finest feature stride"
            )
        layers = module.encoder.layers
        decoder = cls(
            channels,
            d_model=module.level_embed.shape[1],
            mask_dim=module.mask_projection.out_channels,
            n_heads=config.num_attention_heads,
            n_points=layers[0].self_attn.n_points if len(layers) else 4,
            num_encoder_layers=len(layers),
            d_ffn=config.encoder_feedforward_dim,
            dropout=config.dropout,
            n_levels=n_levels,
            backend=backend,
        )
        state, unknown = {}, []
        for key, value in module.state_dict().items():
            ours = _ours(key)
            if ours is None:
                unknown.append(key)
            else:
                state[ours] = value
        result = decoder.load_state_dict(state, strict=False)
        report = LoadReport(list(result.missing_keys), list(result.unexpected_keys) + unknown)
        param = next(module.parameters())
        decoder = decoder.to(device=param.device, dtype=param.dtype).eval()
        if output_loading_info:
            return decoder, report
        if not report.exact:
            warnings.warn(f"weights did not load exactly:\n{report}", stacklevel=2)
        return decoder


#: transformers' Mask2FormerPixelDecoder keys -> ours (Mask2Former's), by full match.
_RENAMES = [
    (re.compile(pattern), replacement)
    for pattern, replacement in [
        (r"input_projections\.(\d+)\.(.+)", r"input_proj.\1.\2"),
        (r"level_embed", "transformer.level_embed"),
        (r"mask_projection\.(.+)", r"mask_features.\1"),
        (r"(adapter|layer)_(\d+)\.0\.(.+)", r"\1_\2.\3"),
        (r"(adapter|layer)_(\d+)\.1\.(.+)", r"\1_\2.norm.\3"),
    ]
]
_ENCODER_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(\w+)\.(.+)")
#: transformers' modules of an encoder layer -> ours
_LAYER_MODULES = {
    "self_attn": "self_attn",
    "self_attn_layer_norm": "norm1",
    "fc1": "linear1",
    "fc2": "linear2",
    "final_layer_norm": "norm2",
}


def _ours(key: str) -> str | None:
    """Our name of a transformers pixel-decoder key, None for a key we have no rule for."""
    layer = _ENCODER_LAYER.fullmatch(key)
    if layer is not None:
        index, module, rest = layer.groups()
        if module not in _LAYER_MODULES:
            return None
        return f"transformer.encoder.layers.{index}.{_LAYER_MODULES[module]}.{rest}"
    for pattern, replacement in _RENAMES:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return None
