"""Loading published checkpoints: the reference implementation's layout and transformers'.

The reference layout is this package's own (``backbone.0.body...``,
``transformer.encoder.layers.N.self_attn...``), so it loads directly; Hugging
Face ``DeformableDetrForObjectDetection`` state dicts are renamed first.
Every load returns a :class:`LoadReport` naming missing and unexpected keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .deformable_detr import DeformableDETR, DeformableDETRConfig, build_model

__all__ = ["LoadReport", "from_transformers", "hf_to_reference", "load_reference_checkpoint"]


@dataclass
class LoadReport:
    """What a checkpoint load did not match; empty lists mean an exact load."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.missing_keys and not self.unexpected_keys

    def __str__(self) -> str:
        if self.exact:
            return "all keys matched"
        return (
            f"missing keys ({len(self.missing_keys)}): {self.missing_keys}\n"
            f"unexpected keys ({len(self.unexpected_keys)}): {self.unexpected_keys}"
        )


def load_reference_checkpoint(
    model: nn.Module, checkpoint: dict, strict: bool = False
) -> LoadReport:
    """Load a reference-implementation checkpoint (a state dict, or a dict with ``"model"``)."""
    state = checkpoint.get("model", checkpoint)
    result = model.load_state_dict(state, strict=strict)
    return LoadReport(list(result.missing_keys), list(result.unexpected_keys))


# (pattern, replacement) applied in order to every transformers key; None drops the key.
_HF_RULES: list[tuple[str, str | None]] = [
    # heads copied inside the decoder for refinement / two-stage: rebuilt from the top-level ones
    (r"^model\.decoder\.(class_embed|bbox_embed)\..*", None),
    # ResNet stem (transformers' own ResNet, v4 and v5 prefixes); stages: _stage_key
    (
        r"^model\.backbone\.(?:conv_encoder\.)?model\.embedder\.embedder\.convolution\.",
        "backbone.0.body.conv1.",
    ),
    (
        r"^model\.backbone\.(?:conv_encoder\.)?model\.embedder\.embedder\.normalization\.",
        "backbone.0.body.bn1.",
    ),
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (
        r"^model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.",
        r"transformer.\1.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.",
        r"transformer.encoder.layers.\1.norm1.",
    ),
    (r"^model\.encoder\.layers\.(\d+)\.(?:mlp\.)?fc1\.", r"transformer.encoder.layers.\1.linear1."),
    (r"^model\.encoder\.layers\.(\d+)\.(?:mlp\.)?fc2\.", r"transformer.encoder.layers.\1.linear2."),
    (
        r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.",
        r"transformer.encoder.layers.\1.norm2.",
    ),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (
        r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.",
        r"transformer.decoder.layers.\1.cross_attn.",
    ),
    (
        r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.",
        r"transformer.decoder.layers.\1.norm1.",
    ),
    (
        r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
        r"transformer.decoder.layers.\1.norm2.",
    ),
    (r"^model\.decoder\.layers\.(\d+)\.(?:mlp\.)?fc1\.", r"transformer.decoder.layers.\1.linear1."),
    (r"^model\.decoder\.layers\.(\d+)\.(?:mlp\.)?fc2\.", r"transformer.decoder.layers.\1.linear2."),
    (
        r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.",
        r"transformer.decoder.layers.\1.norm3.",
    ),
    (
        r"^model\.decoder\.layers\.(\d+)\.self_attn\.(?:o_proj|out_proj)\.",
        r"transformer.decoder.layers.\1.self_attn.out_proj.",
    ),
    (r"^(class_embed|bbox_embed)\.", r"\1."),
]
_STAGE = re.compile(
    r"^model\.backbone\.(?:conv_encoder\.)?model\.encoder\.stages\.(\d+)\.layers\.(\d+)\."
    r"(?:layer\.(\d+)|shortcut)\.(convolution|normalization)\.(.+)$"
)
_QKV = re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _stage_key(key: str) -> str | None:
    m = _STAGE.match(key)
    if m is None:
        return None
    stage, block, conv, kind, rest = m.groups()
    prefix = f"backbone.0.body.layer{int(stage) + 1}.{block}."
    if conv is None:  # the shortcut: torchvision's downsample.0 (conv) and .1 (norm)
        return prefix + ("downsample.0." if kind == "convolution" else "downsample.1.") + rest
    return (
        prefix
        + (f"conv{int(conv) + 1}." if kind == "convolution" else f"bn{int(conv) + 1}.")
        + rest
    )


def hf_to_reference(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a transformers state dict to the reference layout.

    Returns the renamed dict and the keys no rule knows (reported, not dropped silently).
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        stage_key = _stage_key(key)
        if stage_key is not None:
            out[stage_key] = value
            continue
        m = _QKV.match(key)
        if m is not None:
            layer, which, kind = m.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        for pattern, repl in _HF_RULES:
            if re.match(pattern, key):
                if repl is not None:
                    out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    # nn.MultiheadAttention keeps q, k and v projections stacked in one tensor.
    for (layer, kind), parts in qkv.items():
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"transformer.decoder.layers.{layer}.self_attn.{name}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out, unknown


def config_from_transformers(hf_config) -> DeformableDETRConfig:
    """Our config for a transformers ``DeformableDetrConfig`` with its own ResNet backbone."""
    if getattr(hf_config, "use_timm_backbone", False):
        raise ValueError(
            "only transformers' own ResNet backbone (use_timm_backbone=False) converts"
        )
    if hf_config.encoder_ffn_dim != hf_config.decoder_ffn_dim:
        raise ValueError("encoder_ffn_dim and decoder_ffn_dim must be equal")
    bc = hf_config.backbone_config
    block = "bottleneck" if bc.layer_type == "bottleneck" else "basic"
    expansion = 4 if block == "bottleneck" else 1
    return DeformableDETRConfig(
        num_classes=hf_config.num_labels,
        backbone_norm="frozen",
        backbone_block=block,
        backbone_widths=tuple(h // expansion for h in bc.hidden_sizes),
        backbone_depths=tuple(bc.depths),
        backbone_stem=bc.embedding_size,
        d_model=hf_config.d_model,
        nheads=hf_config.encoder_attention_heads,
        enc_layers=hf_config.encoder_layers,
        dec_layers=hf_config.decoder_layers,
        dim_feedforward=hf_config.encoder_ffn_dim,
        dropout=0.0,
        num_feature_levels=hf_config.num_feature_levels,
        enc_n_points=hf_config.encoder_n_points,
        dec_n_points=hf_config.decoder_n_points,
        num_queries=hf_config.num_queries,
        with_box_refine=hf_config.with_box_refine,
        two_stage=hf_config.two_stage,
    )


def from_transformers(
    hf_model_or_state: nn.Module | dict, config: DeformableDETRConfig | None = None
) -> tuple[DeformableDETR, LoadReport]:
    """Our detector with the weights of a transformers ``DeformableDetrForObjectDetection``.

    Pass the model (its config is read) or a state dict with our ``config``.
    The report lists keys that did not match (unknown transformers keys count
    as unexpected).
    """
    if isinstance(hf_model_or_state, nn.Module):
        config = config or config_from_transformers(hf_model_or_state.config)
        hf_state = hf_model_or_state.state_dict()
    else:
        if config is None:
            raise ValueError("a state dict needs the DeformableDETRConfig it was trained with")
        hf_state = hf_model_or_state
    model = build_model(config)
    state, unknown = hf_to_reference(hf_state)
    # The reference registers the refinement and two-stage heads under the
    # decoder too (the same modules): its checkpoints list them twice.
    shared = (["bbox_embed."] if config.with_box_refine else []) + (
        ["class_embed."] if config.two_stage else []
    )
    for key in [k for k in state if k.startswith(tuple(shared))]:
        state["transformer.decoder." + key] = state[key]
    report = load_reference_checkpoint(model, state)
    report.unexpected_keys += unknown
    return model.eval(), report
