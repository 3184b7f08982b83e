"""Reading published Deformable DETR weights: this package's, the reference's and transformers'.

Every source becomes a config and a state dict in our layout (:func:`read_pretrained`):

- this package's checkpoint (``{"config", "model", ...}``);
- the reference implementation's ``.pth`` (``{"model", "args", ...}``): its module
  names are ours, the config is read from the shapes (:func:`config_from_state`);
- transformers' ``DeformableDetrForObjectDetection``: the model, its state dict or
  a ``save_pretrained`` folder, SenseTime's published timm-backbone ones included
  (renamed by :func:`hf_to_reference`, config by :func:`config_from_transformers`).

:func:`load_reference_checkpoint` loads such a state dict into a model and
returns a :class:`LoadReport`. Building the model is
``DeformableDETR.from_pretrained``'s part: this module imports only the config.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import DeformableDETRConfig, config_from_dict

__all__ = [
    "CLASS_HEADS",
    "LoadReport",
    "Pretrained",
    "config_from_state",
    "config_from_transformers",
    "hf_to_reference",
    "load_backbone_weights",
    "load_reference_checkpoint",
    "read_pretrained",
]

#: Key prefixes of the class heads, re-initialised when the number of classes changes.
CLASS_HEADS = ("class_embed.", "transformer.decoder.class_embed.")

_EXPECTED = (
    "expected this package's checkpoint {'config', 'model'}, the reference implementation's "
    "{'model': state dict}, a transformers DeformableDetrForObjectDetection, its state dict "
    "or a save_pretrained folder with config.json and model.safetensors"
)

#: torchvision's ResNets by name: block and blocks per stage (stem 64, widths 64-512).
_RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


@dataclass
class LoadReport:
    """What a checkpoint load did not match; ``exact`` means nothing missing or unexpected.

    ``reinitialized_keys`` are the class heads left freshly initialised because the
    number of classes changed; they do not make a load inexact.
    """

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    reinitialized_keys: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.missing_keys and not self.unexpected_keys

    def __str__(self) -> str:
        lines = (
            ["all keys matched"]
            if self.exact
            else [
                f"missing keys ({len(self.missing_keys)}): {self.missing_keys}",
                f"unexpected keys ({len(self.unexpected_keys)}): {self.unexpected_keys}",
            ]
        )
        if self.reinitialized_keys:
            lines.append(
                f"re-initialised keys ({len(self.reinitialized_keys)}): {self.reinitialized_keys}"
            )
        return "\n".join(lines)


class Pretrained(NamedTuple):
    """A source read into our layout: the config to build, the state dict to load, and the
    source's keys that have no counterpart here (reported as unexpected)."""

    config: DeformableDETRConfig
    state: dict[str, torch.Tensor]
    unknown_keys: list[str]


def _load(
    module: nn.Module, state: Mapping[str, torch.Tensor], reinitialize: Sequence[str] = ()
) -> LoadReport:
    own = module.state_dict(keep_vars=True)
    # BatchNorm's step counter means nothing to frozen BatchNorm; never report it either way.
    state = {k: v for k, v in state.items() if k in own or not k.endswith("num_batches_tracked")}
    # One tensor listed under several names (a head shared by every decoder layer, or
    # registered under the decoder too): any one of the names in the file loads them all.
    aliases: dict[int, list[str]] = {}
    for key, tensor in own.items():
        aliases.setdefault(id(tensor), []).append(key)
    for names in aliases.values():
        given = next((n for n in names if n in state), None)
        if given is not None:
            for name in names:
                state.setdefault(name, state[given])
    reinitialized = [k for k in own if k.startswith(tuple(reinitialize))]
    for key in reinitialized:
        state.pop(key, None)
    wrong = [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} expected by the model"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError("checkpoint shapes do not fit the model:\n" + "\n".join(wrong))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadReport(
        missing_keys=[
            k
            for k in own
            if k not in state and k not in reinitialized and not k.endswith("num_batches_tracked")
        ],
        unexpected_keys=[k for k in state if k not in own],
        reinitialized_keys=reinitialized,
    )


def load_reference_checkpoint(
    model: nn.Module, checkpoint: Mapping[str, Any], *, reinitialize: Sequence[str] = ()
) -> LoadReport:
    """Load a reference-layout state dict (or a dict with ``"model"``) into ``model``.

    Keys starting with a prefix in ``reinitialize`` keep the model's own values and are
    listed as re-initialised. A shape that differs from the model's raises ``ValueError``
    naming the key and both shapes; unknown keys are reported as unexpected.
    """
    state = checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    return _load(model, state, reinitialize)


def load_backbone_weights(
    model: nn.Module, weights: str | Path | Mapping[str, torch.Tensor]
) -> LoadReport:
    """Load ImageNet weights in torchvision's ResNet layout into ``model.backbone[0].body``.

    ``weights``: a file written by ``torch.save(resnet.state_dict())`` or the state dict
    (``conv1``, ``bn1``, ``layer1`` .. ``layer4``). The classifier (``fc.*``) and BatchNorm's
    ``num_batches_tracked`` are ignored. The report names keys by their torchvision names.
    """
    what = "a ResNet state dict (expected name -> tensor)"
    name = "the given state dict" if isinstance(weights, Mapping) else str(weights)
    state = weights if isinstance(weights, Mapping) else read_weights_file(_existing(weights), what)
    if not _is_state(state):
        raise ValueError(f"{name} is not {what}")
    return _load(
        model.backbone[0].body, {k: v for k, v in state.items() if not k.startswith("fc.")}
    )


# (pattern, replacement) applied in order to every transformers key; the first match wins.
_HF_RULES: list[tuple[str, str]] = [
    # heads registered under the decoder too (box refinement, two-stage), as in the reference
    (r"^model\.decoder\.(class_embed|bbox_embed)\.", r"transformer.decoder.\1."),
    # timm's ResNet (SenseTime's checkpoints): torchvision's names, as ours
    (
        r"^model\.backbone\.(?:conv_encoder\.)?model\.((?:conv1|bn1|layer[1-4])\.)",
        r"backbone.0.body.\1",
    ),
    # transformers' own ResNet (v4 and v5 prefixes); its stages: _stage_key
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


def hf_to_reference(
    hf_state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a transformers state dict (any version, timm or transformers ResNet) to ours.

    Returns the renamed dict and the keys no rule knows (reported, not dropped silently).
    Heads that ``save_pretrained`` leaves out because transformers ties them are filled
    in as transformers ties them.
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
    # transformers ties the top-level heads to the decoder's copies (refinement, two-stage),
    # and otherwise every layer's head to layer 0's; save_pretrained writes one of each.
    for key in [k for k in out if k.startswith("transformer.decoder.")]:
        if key.startswith(("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")):
            out.setdefault(key.removeprefix("transformer.decoder."), out[key])
    num_pred = _count(out, "transformer.decoder.layers.") + ("transformer.enc_output.weight" in out)
    for head in ("class_embed", "bbox_embed"):
        first = {
            k.removeprefix(f"{head}.0."): v for k, v in out.items() if k.startswith(f"{head}.0.")
        }
        for i in range(1, num_pred):
            for rest, value in first.items():
                out.setdefault(f"{head}.{i}.{rest}", value)
    return out, unknown


def _count(state: Mapping[str, Any], prefix: str) -> int:
    """How many ``prefix.N.`` blocks the keys hold."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _trunk(block: str, depths: Sequence[int], widths: Sequence[int], stem: int) -> dict[str, Any]:
    """The backbone fields of our config: a named ResNet when the trunk is one."""
    for name, spec in _RESNETS.items():
        if spec == (block, tuple(depths)) and tuple(widths) == (64, 128, 256, 512) and stem == 64:
            return {"backbone": name}
    return {
        "backbone_block": block,
        "backbone_widths": tuple(widths),
        "backbone_depths": tuple(depths),
        "backbone_stem": None if stem == widths[0] else stem,
    }


def _backbone_levels(count: int, num_feature_levels: int) -> int | None:
    return None if count == min(3, num_feature_levels) else count


def config_from_state(
    state: Mapping[str, torch.Tensor], args: Any = None, **overrides: Any
) -> DeformableDETRConfig:
    """The config of a reference-layout state dict, read from its keys and shapes.

    ``args`` (the reference's argparse Namespace, saved in its checkpoints) supplies what
    the shapes do not tell: heads (else 8), two-stage query count (else 300), dropout.
    ``overrides`` set any field, and ``nheads`` among them decides the sampling points.
    """
    if getattr(args, "dilation", False):
        raise ValueError("the checkpoint was trained with dilation (DC5), which is not supported")

    def shape(key: str) -> torch.Size:
        if key not in state:
            raise ValueError(f"the state dict has no {key}: not a Deformable DETR checkpoint")
        return state[key].shape

    levels, d_model = shape("transformer.level_embed")
    nheads = overrides.get("nheads", getattr(args, "nheads", 8))

    def points(attention: str, default: int) -> int:
        key = f"transformer.{attention}.attention_weights.weight"
        if key not in state:
            return default
        rows = state[key].shape[0]
        if rows % (nheads * levels):
            raise ValueError(
                f"{key} has {rows} rows, not a multiple of nheads * levels = {nheads} * {levels}; "
                "pass the number of heads (nheads=...)"
            )
        return rows // (nheads * levels)

    body = "backbone.0.body."
    stem = shape(body + "conv1.weight")[0]
    block = "bottleneck" if body + "layer1.0.conv3.weight" in state else "basic"
    depths = [_count(state, f"{body}layer{i}.") for i in range(1, 5)]
    widths = [shape(f"{body}layer{i}.0.conv1.weight")[0] for i in range(1, 5)]
    ffn = {
        part: state[f"transformer.{part}.layers.0.linear1.weight"].shape[0]
        for part in ("encoder", "decoder")
        if f"transformer.{part}.layers.0.linear1.weight" in state
    }
    if len(set(ffn.values())) > 1:
        raise ValueError(
            f"encoder and decoder feed-forward widths differ ({ffn}); one is supported"
        )
    two_stage = "transformer.enc_output.weight" in state
    # input_proj: 1x1 convolutions on backbone stages, then 3x3 strided ones on top
    from_backbone = sum(
        1
        for i in range(levels)
        if f"input_proj.{i}.0.weight" in state and state[f"input_proj.{i}.0.weight"].shape[-1] == 1
    )
    defaults = DeformableDETRConfig()
    config = DeformableDETRConfig(
        num_classes=shape("class_embed.0.weight")[0],
        backbone_norm=(
            "batch"
            if any(k.startswith(body) and k.endswith("num_batches_tracked") for k in state)
            else "frozen"
        ),
        **_trunk(block, depths, widths, stem),
        d_model=d_model,
        nheads=nheads,
        enc_layers=_count(state, "transformer.encoder.layers."),
        dec_layers=_count(state, "transformer.decoder.layers."),
        dim_feedforward=next(iter(ffn.values()), defaults.dim_feedforward),
        dropout=getattr(args, "dropout", defaults.dropout),
        num_feature_levels=levels,
        num_backbone_levels=_backbone_levels(from_backbone, levels),
        enc_n_points=points("encoder.layers.0.self_attn", defaults.enc_n_points),
        dec_n_points=points("decoder.layers.0.cross_attn", defaults.dec_n_points),
        num_queries=(
            getattr(args, "num_queries", defaults.num_queries)
            if two_stage
            else shape("query_embed.weight")[0]
        ),
        aux_loss=getattr(args, "aux_loss", defaults.aux_loss),
        with_box_refine=any(k.startswith("transformer.decoder.bbox_embed.") for k in state),
        two_stage=two_stage,
    )
    return replace(config, **overrides)


def _hf_trunk(hf_config: Any) -> tuple[dict[str, Any], list[int]]:
    """Our backbone fields and the ResNet stages transformers feeds on (1 = C2 ... 4 = C5)."""
    bc = getattr(hf_config, "backbone_config", None)
    if bc is None and getattr(hf_config, "use_timm_backbone", False):  # transformers 4
        name = hf_config.backbone
        out_indices = [2, 3, 4] if hf_config.num_feature_levels > 1 else [4]
    elif getattr(bc, "model_type", None) == "timm_backbone":
        if bc.output_stride not in (None, 32):
            raise ValueError(f"output_stride={bc.output_stride} (a dilated C5) is not supported")
        name, out_indices = bc.backbone, list(bc.out_indices)
    elif getattr(bc, "model_type", None) == "resnet":
        if bc.downsample_in_bottleneck or bc.downsample_in_first_stage:
            raise ValueError(
                "only torchvision's ResNet v1.5 converts (downsample_in_bottleneck and "
                "downsample_in_first_stage False)"
            )
        expansion = 4 if bc.layer_type == "bottleneck" else 1
        trunk = _trunk(
            "bottleneck" if expansion == 4 else "basic",
            bc.depths,
            [h // expansion for h in bc.hidden_sizes],
            bc.embedding_size,
        )
        return trunk, list(bc.out_indices or [len(bc.depths)])
    else:
        raise ValueError(
            f"backbone {getattr(bc, 'model_type', None)!r} does not convert: only ResNets "
            f"(transformers' own, or timm's {sorted(_RESNETS)})"
        )
    if name not in _RESNETS:
        raise ValueError(f"timm backbone {name!r} does not convert; one of {sorted(_RESNETS)}")
    return {"backbone": name}, out_indices


def config_from_transformers(hf_config: Any) -> DeformableDETRConfig:
    """Our config for a transformers ``DeformableDetrConfig`` (version 4 or 5).

    The backbone may be transformers' own ResNet or a timm ResNet by name (SenseTime's
    published configs: ``use_timm_backbone``, ``backbone="resnet50"``); its outputs
    (``out_features`` / ``out_indices``) must be the last 1 to 3 of C3, C4, C5.
    """
    c = hf_config
    if c.dilation:
        raise ValueError("dilation=True (a dilated C5, 'DC5') is not supported")
    for enc, dec in (
        ("encoder_ffn_dim", "decoder_ffn_dim"),
        ("encoder_attention_heads", "decoder_attention_heads"),
    ):
        if getattr(c, enc) != getattr(c, dec):
            raise ValueError(
                f"{enc} ({getattr(c, enc)}) and {dec} ({getattr(c, dec)}) must be equal"
            )
    if c.position_embedding_type != "sine" or c.activation_function != "relu":
        raise ValueError(
            "only sine position embeddings and relu convert, got "
            f"{c.position_embedding_type!r} and {c.activation_function!r}"
        )
    trunk, out_indices = _hf_trunk(c)
    n = len(out_indices)
    if sorted(out_indices) != list(range(5 - n, 5)) or not 1 <= n <= min(3, c.num_feature_levels):
        stages = [f"stage{i}" for i in out_indices]
        raise ValueError(
            f"backbone outputs {stages}: the last 1 to 3 of stage2, stage3, stage4 "
            f"(at most num_feature_levels = {c.num_feature_levels}) are supported"
        )
    return DeformableDETRConfig(
        num_classes=c.num_labels,
        backbone_norm="frozen",
        **trunk,
        d_model=c.d_model,
        nheads=c.encoder_attention_heads,
        enc_layers=c.encoder_layers,
        dec_layers=c.decoder_layers,
        dim_feedforward=c.encoder_ffn_dim,
        dropout=c.dropout,
        num_feature_levels=c.num_feature_levels,
        num_backbone_levels=_backbone_levels(n, c.num_feature_levels),
        enc_n_points=c.encoder_n_points,
        dec_n_points=c.decoder_n_points,
        num_queries=c.two_stage_num_proposals if c.two_stage else c.num_queries,
        with_box_refine=c.with_box_refine,
        two_stage=c.two_stage,
    )


def _is_state(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def read_weights_file(path: Path, what: str = f"a Deformable DETR checkpoint ({_EXPECTED})") -> Any:
    """``torch.load`` of weights on the CPU; a file that is not one is a ValueError naming it."""
    # weights_only, plus the one class the reference pickles next to its weights
    # (its argparse Namespace of hyper-parameters): no code from the file runs.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as e:
        # torch's own text is pages long; its first line says what failed.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not {what}: {first}") from e


def _as_config(config: Any) -> DeformableDETRConfig:
    if isinstance(config, DeformableDETRConfig):
        return config
    if getattr(config, "model_type", None) == "deformable_detr":
        return config_from_transformers(config)
    raise TypeError(
        "config must be a DeformableDETRConfig or a transformers DeformableDetrConfig, "
        f"got {type(config).__name__}"
    )


def _from_transformers_state(
    hf_state: Mapping[str, torch.Tensor], config: Any, name: str
) -> Pretrained:
    if config is None:
        raise ValueError(
            f"{name} is a transformers state dict: pass its config (config=DeformableDETRConfig "
            "or transformers DeformableDetrConfig)"
        )
    state, unknown = hf_to_reference(hf_state)
    return Pretrained(_as_config(config), state, unknown)


def _from_mapping(
    data: Mapping[str, Any], config: Any, name: str, overrides: Mapping[str, Any]
) -> Pretrained:
    model, stored = data.get("model"), data.get("config")
    if _is_state(model) and isinstance(stored, (Mapping, DeformableDETRConfig)):
        if config is None:
            config = (
                stored if isinstance(stored, DeformableDETRConfig) else config_from_dict(stored)
            )
        return Pretrained(_as_config(config), dict(model), [])
    if not _is_state(model):
        model, data = data, {}
    if _is_state(model) and "transformer.level_embed" in model:
        if config is None:
            config = config_from_state(model, data.get("args"), **overrides)
        return Pretrained(_as_config(config), dict(model), [])
    if _is_state(model) and "model.level_embed" in model:
        return _from_transformers_state(model, config, name)
    raise ValueError(f"{name} is not a Deformable DETR checkpoint ({_EXPECTED})")


def _from_folder(path: Path, config: Any) -> Pretrained:
    weights = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
    if not (path / "config.json").is_file() or not weights:
        raise ValueError(f"{path} is not a Deformable DETR checkpoint ({_EXPECTED})")
    if config is None:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "deformable_detr":
            raise ValueError(
                f"{path} holds a {model_type!r} model, not a Deformable DETR checkpoint "
                f"({_EXPECTED})"
            )
        from transformers import DeformableDetrConfig

        config = DeformableDetrConfig.from_pretrained(path)
    if weights[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        hf_state = load_file(weights[0])
    else:
        hf_state = read_weights_file(weights[0])
    return _from_transformers_state(hf_state, config, str(path))


def read_pretrained(
    source: str | Path | Mapping[str, Any] | nn.Module, config: Any = None, **overrides: Any
) -> Pretrained:
    """Read any supported source into (config, state dict in our layout, unknown keys).

    ``source``: a path (this package's checkpoint, the reference's ``.pth``, a transformers
    ``.safetensors`` file or ``save_pretrained`` folder), the loaded dict, or a transformers
    ``DeformableDetrForObjectDetection``. ``config`` (ours or transformers') replaces the
    source's own or inferred one; a bare transformers state dict needs it. ``overrides``
    then set config fields (``nheads`` also guides the inference of sampling points).
    Missing path: ``FileNotFoundError``; anything else: ``ValueError`` naming the source.
    """
    if isinstance(source, nn.Module):
        hf_config = getattr(source, "config", None)
        if getattr(hf_config, "model_type", None) != "deformable_detr":
            raise ValueError(
                f"{type(source).__name__} is not a Deformable DETR checkpoint ({_EXPECTED})"
            )
        read = _from_transformers_state(source.state_dict(), config or hf_config, "the model")
    elif isinstance(source, Mapping):
        read = _from_mapping(source, config, "the given dict", overrides)
    else:
        path = _existing(source)
        if path.is_dir():
            read = _from_folder(path, config)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            read = _from_transformers_state(load_file(path), config, str(path))
        else:
            data = read_weights_file(path)
            if not isinstance(data, Mapping):
                raise ValueError(f"{path} is not a Deformable DETR checkpoint ({_EXPECTED})")
            read = _from_mapping(data, config, str(path), overrides)
    return read._replace(config=replace(read.config, **overrides))
