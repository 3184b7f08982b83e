"""DeformableDETR.from_pretrained: every published layout gives the source's outputs."""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import replace

import pytest
import torch

from msdeformattn.models import (
    DeformableDETR,
    DeformableDETRConfig,
    build_model,
    load_backbone_weights,
)
from msdeformattn.models.checkpoint import load_checkpoint, save_checkpoint
from msdeformattn.models.convert import config_from_transformers, hf_to_reference, read_pretrained

from .conftest import hf_model, padded_batch, randomize

ATOL, RTOL = 1e-9, 1e-7  # float64 rounding, as in test_convert


def random_model(config: DeformableDETRConfig) -> DeformableDETR:
    torch.manual_seed(0)
    return randomize(build_model(config)).eval()


def assert_same_outputs(ours, source, hf=False):
    """Both models in float64 on a small padded batch; source is ours or a transformers model."""
    images, valid = padded_batch(64, 64)
    images = images.double()
    with torch.no_grad():
        got = ours.double()(images, mask=valid == 0)
        if hf:
            out = source.double()(pixel_values=images, pixel_mask=valid)
            expected = {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}
        else:
            expected = source.double()(images, mask=valid == 0)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], atol=ATOL, rtol=RTOL)


def reference_args(config: DeformableDETRConfig) -> argparse.Namespace:
    """What the reference's main.py saves next to the weights (a few of its fields)."""
    return argparse.Namespace(
        lr=2e-4,
        backbone="resnet50",
        dilation=False,
        position_embedding="sine",
        enc_layers=config.enc_layers,
        dec_layers=config.dec_layers,
        dim_feedforward=config.dim_feedforward,
        hidden_dim=config.d_model,
        dropout=config.dropout,
        nheads=config.nheads,
        num_queries=config.num_queries,
        dec_n_points=config.dec_n_points,
        enc_n_points=config.enc_n_points,
        with_box_refine=config.with_box_refine,
        two_stage=config.two_stage,
        num_feature_levels=config.num_feature_levels,
        aux_loss=True,
        output_dir="exps/r50_deformable_detr",
    )


def test_own_checkpoint_round_trip(tmp_path):
    config = DeformableDETRConfig.tiny(num_classes=3)
    source = random_model(config)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, source, config, epoch=2, optimizer={"state": {}}, dataset="synthetic")
    model = DeformableDETR.from_pretrained(path)
    assert not model.training
    assert_same_outputs(model, source)
    # load_checkpoint reads the same file through the same loader.
    again, extra = load_checkpoint(path, output_extra=True)
    stored = again.config
    assert stored == config and extra["epoch"] == 2
    assert_same_outputs(again, source)


@pytest.mark.parametrize(
    "config",
    [
        DeformableDETRConfig.tiny(),
        DeformableDETRConfig.tiny(
            num_classes=6, nheads=4, num_queries=20, with_box_refine=True, two_stage=True
        ),
    ],
    ids=["tiny", "refine+two-stage"],
)
def test_reference_pth_with_args(tmp_path, config):
    source = random_model(config)
    path = tmp_path / "checkpoint0049.pth"
    torch.save(
        {
            "model": source.state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 49,
            "args": reference_args(config),
        },
        path,
    )
    model, report = DeformableDETR.from_pretrained(path, output_loading_info=True)
    assert report.exact, str(report)
    # Every field comes back: the trunk from its shapes, heads and queries from args.
    assert model.config == config
    assert_same_outputs(model, source)


def test_reference_state_without_args_takes_overrides():
    config = DeformableDETRConfig.tiny(
        nheads=4, num_queries=20, with_box_refine=True, two_stage=True
    )
    source = random_model(config)
    state = {"model": source.state_dict()}
    # Shapes cannot tell 4 heads x 4 points from 8 x 2, nor the two-stage query count.
    inferred = read_pretrained(state).config
    assert (inferred.nheads, inferred.enc_n_points, inferred.num_queries) == (8, 2, 300)
    model = DeformableDETR.from_pretrained(state, nheads=4, num_queries=20)
    assert_same_outputs(model, source)


@pytest.mark.parametrize(
    "variant",
    [{}, {"with_box_refine": True}, {"with_box_refine": True, "two_stage": True}],
    ids=["plain", "refine", "refine+two-stage"],
)
def test_save_pretrained_folder(tmp_path, variant):
    hf = hf_model(**variant)
    # float32 on disk; the source runs in float64 on the same (exactly widened) values.
    hf.save_pretrained(tmp_path)
    model, report = DeformableDETR.from_transformers(tmp_path, output_loading_info=True)
    assert report.exact, str(report)
    assert_same_outputs(model, hf, hf=True)


# The transformer's part of a published config.json, copied from the source model.
TRANSFORMER_FIELDS = (
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "num_queries",
    "two_stage_num_proposals",
    "num_feature_levels",
    "encoder_n_points",
    "decoder_n_points",
    "two_stage",
    "with_box_refine",
    "dropout",
    "activation_function",
    "position_embedding_type",
)


def timm_key(key: str) -> str:
    """transformers' ResNet names -> timm's (torchvision's), as SenseTime's files hold them."""
    key = key.replace("model.embedder.embedder.convolution.", "model.conv1.")
    key = key.replace("model.embedder.embedder.normalization.", "model.bn1.")
    m = re.match(
        r"(.+)\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d+)|shortcut)\."
        r"(convolution|normalization)\.(.+)",
        key,
    )
    if m is None:
        return key
    head, stage, block, conv, kind, rest = m.groups()
    if conv is None:
        part = "downsample.0" if kind == "convolution" else "downsample.1"
    else:
        part = ("conv" if kind == "convolution" else "bn") + str(int(conv) + 1)
    return f"{head}.layer{int(stage) + 1}.{block}.{part}.{rest}"


@pytest.mark.parametrize(
    "variant",
    [{}, {"with_box_refine": True, "two_stage": True}],
    ids=["deformable-detr", "with-box-refine-two-stage"],
)
def test_published_timm_layout_folder(tmp_path, variant):
    from safetensors.torch import load_file, save_file
    from transformers import ResNetConfig

    # The source: transformers' own ResNet-50 (the same function as timm's resnet50); two
    # decoder layers, as transformers cannot tie the heads of one.
    labels = {str(i): f"class {i}" for i in range(91)}
    hf = hf_model(
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]),
        encoder_layers=1,
        num_queries=10,
        two_stage_num_proposals=10,
        num_labels=91,
        id2label=labels,
        **variant,
    )
    hf.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    published = tmp_path / "SenseTime-deformable-detr"
    published.mkdir()
    save_file({timm_key(k): v for k, v in state.items()}, published / "model.safetensors")
    assert "model.backbone.conv_encoder.model.layer4.2.bn3.running_var" in load_file(
        published / "model.safetensors"
    )
    c = hf.config
    config = {
        "architectures": ["DeformableDetrForObjectDetection"],
        "model_type": "deformable_detr",
        "backbone": "resnet50",
        "use_timm_backbone": True,
        "use_pretrained_backbone": True,
        "dilation": False,
        "id2label": labels,
        "label2id": {v: int(k) for k, v in labels.items()},
        "torch_dtype": "float32",
        "transformers_version": "4.17.0.dev0",
        "decoder_layerdrop": 0.0,
        **{k: getattr(c, k) for k in TRANSFORMER_FIELDS},
    }
    (published / "config.json").write_text(json.dumps(config))
    model, report = DeformableDETR.from_pretrained(published, output_loading_info=True)
    assert report.exact, str(report)
    assert model.backbone[0].body.layer4[2].conv3.weight.shape == (2048, 512, 1, 1)
    assert_same_outputs(model, hf, hf=True)


def test_timm_names_of_both_transformers_versions():
    t = torch.zeros(1)
    state, unknown = hf_to_reference(
        {
            "model.backbone.model.conv1.weight": t,  # transformers 5 in memory
            "model.backbone.conv_encoder.model.layer3.0.downsample.1.running_var": t,  # on disk
            "model.backbone.conv_encoder.model.fc.weight": t,
        }
    )
    assert sorted(state) == [
        "backbone.0.body.conv1.weight",
        "backbone.0.body.layer3.0.downsample.1.running_var",
    ]
    assert unknown == ["model.backbone.conv_encoder.model.fc.weight"]


def test_transformers_default_resnet_has_one_backbone_level():
    hf = hf_model(backbone_config=None, encoder_layers=1)
    assert hf.config.backbone_config.out_features == ["stage4"]
    config = config_from_transformers(hf.config)
    assert config.num_backbone_levels == 1 and config.backbone == "resnet50"
    model, report = DeformableDETR.from_transformers(hf, output_loading_info=True)
    assert report.exact, str(report)
    assert model.backbone.num_channels == [2048]
    assert_same_outputs(model, hf, hf=True)
    with pytest.raises(ValueError, match="num_backbone_levels must be 1 to"):
        build_model(replace(config, num_backbone_levels=4))


def test_transformers_state_dict_needs_its_config():
    hf = hf_model()
    with pytest.raises(ValueError, match="pass its config"):
        DeformableDETR.from_transformers(hf.state_dict())
    model = DeformableDETR.from_transformers(hf.state_dict(), hf.config)
    assert_same_outputs(model, hf, hf=True)


def test_dilation_is_refused():
    from transformers import DeformableDetrConfig

    with pytest.raises(ValueError, match="dilation"):
        config_from_transformers(
            DeformableDetrConfig(use_timm_backbone=True, backbone="resnet50", dilation=True)
        )


def test_new_number_of_classes_reinitializes_the_class_heads(tmp_path):
    config = DeformableDETRConfig.tiny(with_box_refine=True, two_stage=True)
    source = random_model(config)
    path = tmp_path / "reference.pth"
    torch.save({"model": source.state_dict()}, path)
    model, report = DeformableDETR.from_pretrained(path, 7, output_loading_info=True)
    heads = [
        k
        for k in model.state_dict()
        if k.startswith(("class_embed.", "transformer.decoder.class_embed."))
    ]
    assert model.config.num_classes == 7
    assert report.exact and sorted(report.reinitialized_keys) == sorted(heads)
    assert "re-initialised keys" in str(report)
    prior = -math.log((1 - 0.01) / 0.01)
    for key, value in model.state_dict().items():
        if key in heads:
            assert value.shape[0] == 7
            if key.endswith("bias"):
                torch.testing.assert_close(value, torch.full_like(value, prior))
        else:
            torch.testing.assert_close(value, source.state_dict()[key])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        DeformableDETR.from_pretrained(tmp_path / "nowhere.pth")


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, other)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    for path in (other, text, tmp_path):  # the folder has no config.json
        with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a Deformable DETR"):
            DeformableDETR.from_pretrained(path)


def test_shape_mismatch_and_unknown_keys_are_named():
    config = DeformableDETRConfig.tiny()
    state = dict(random_model(config).state_dict())
    state["transformer.bogus"] = torch.zeros(1)
    with pytest.warns(UserWarning, match="transformer.bogus"):
        DeformableDETR.from_pretrained(state)
    state["transformer.encoder.layers.0.linear2.weight"] = torch.zeros(128, 7)
    with pytest.raises(
        ValueError,
        match=r"transformer\.encoder\.layers\.0\.linear2\.weight: \(128, 7\) in the checkpoint, \(128, 512\) expected",
    ):
        DeformableDETR.from_pretrained(state)


def test_load_backbone_weights(tmp_path):
    config = DeformableDETRConfig.tiny()
    model = build_model(config)
    trunk = dict(random_model(config).backbone[0].body.state_dict())
    imagenet = {**trunk, "fc.weight": torch.zeros(10, 256), "fc.bias": torch.zeros(10)}
    path = tmp_path / "resnet.pth"
    torch.save(imagenet, path)
    report = load_backbone_weights(model, path)
    assert report.exact, str(report)
    for key, value in model.backbone[0].body.state_dict().items():
        torch.testing.assert_close(value, trunk[key])
    partial = {k: v for k, v in trunk.items() if k != "conv1.weight"} | {"layer5.w": torch.ones(1)}
    report = load_backbone_weights(model, partial)
    assert report.missing_keys == ["conv1.weight"] and report.unexpected_keys == ["layer5.w"]
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: \(1, 1, 1, 1\)"):
        load_backbone_weights(model, {**trunk, "layer1.0.conv1.weight": torch.zeros(1, 1, 1, 1)})
