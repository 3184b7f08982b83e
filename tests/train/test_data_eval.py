"""Synthetic data on disk, the COCO reader and transforms, batching, COCO metrics."""

from __future__ import annotations

import json

import pytest
import torch

from msdeformattn.train.coco_eval import coco_metrics
from msdeformattn.train.data import (
    CocoDetection,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    Resize,
    collate,
)
from msdeformattn.train.synthetic import CLASSES, generate


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth"), num_train=12, num_val=6, seed=3)


def test_generator_is_seeded_and_honest(synthetic, tmp_path):
    again = generate(tmp_path / "again", num_train=12, num_val=6, seed=3)
    a = json.loads((synthetic / "annotations/instances_train.json").read_text())
    b = json.loads((again / "annotations/instances_train.json").read_text())
    assert a == b
    assert (synthetic / "train/000000.png").read_bytes() == (
        again / "train/000000.png"
    ).read_bytes()
    per_image = {}
    for ann in a["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 160 and y + h <= 160
        assert w <= 71 and h <= 71
    assert all(1 <= len(v) <= 5 for v in per_image.values())
    assert {c["name"] for c in a["categories"]} == set(CLASSES)


def test_reader_targets_are_normalised_cxcywh(synthetic):
    ds = CocoDetection(synthetic / "train", synthetic / "annotations/instances_train.json")
    image, target = ds[0]
    assert image.shape == (3, 160, 160) and ds.num_classes == 4
    raw = ds.coco.imgToAnns[target["image_id"]]
    x, y, w, h = raw[0]["bbox"]
    expected = torch.tensor([(x + w / 2) / 160, (y + h / 2) / 160, w / 160, h / 160])
    torch.testing.assert_close(target["boxes"][0], expected)
    assert target["labels"][0] == ds.label_of[raw[0]["category_id"]]


def test_flip_and_resize_keep_boxes_on_the_objects(synthetic):
    plain = CocoDetection(synthetic / "train", synthetic / "annotations/instances_train.json")
    flipped = CocoDetection(
        synthetic / "train",
        synthetic / "annotations/instances_train.json",
        Compose([RandomHorizontalFlip(p=1.0), Resize([80])]),
    )
    image, target = plain[1]
    image2, target2 = flipped[1]
    assert image2.shape == (3, 80, 80)
    expected = target["boxes"].clone()
    expected[:, 0] = 1 - expected[:, 0]
    torch.testing.assert_close(target2["boxes"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        image2,
        torch.nn.functional.interpolate(
            image.flip(-1)[None], size=(80, 80), mode="bilinear", antialias=True
        )[0],
    )


def test_collate_pads_and_masks():
    a = (torch.ones(3, 4, 6), {"boxes": torch.zeros(0, 4)})
    b = (torch.ones(3, 5, 3), {"boxes": torch.zeros(0, 4)})
    images, mask, targets = collate([Normalize()(*a), b])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert not mask[0, :4, :6].any() and mask[0, 4].all()
    assert not mask[1, :, :3].any() and mask[1, :, 3:].all()
    assert (images[1, :, :, 3:] == 0).all() and len(targets) == 2


def test_coco_metrics_perfect_and_wrong(synthetic):
    ds = CocoDetection(synthetic / "val", synthetic / "annotations/instances_val.json")
    gt = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in ds.coco.dataset["annotations"]
    ]
    perfect = coco_metrics(ds.coco, gt)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] * 0.6, *d["bbox"][1:]]} for d in gt]
    assert coco_metrics(ds.coco, shifted)["AP"] < 0.2
    assert coco_metrics(ds.coco, [])["AP"] == 0.0
