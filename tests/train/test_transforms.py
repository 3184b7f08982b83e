"""Transforms and the per-sample seeding of their randomness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from msdeformattn.train.data import (
    IMAGENET_MEAN,
    CocoDetection,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    Resize,
    collate,
    detr_eval_transforms,
    detr_train_transforms,
    simple_eval_transforms,
    simple_train_transforms,
)

SCALES = list(range(480, 801, 32))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def empty_target() -> dict:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def same(a, b) -> bool:
    """Bit-identical (image, target) samples."""
    (ia, ta), (ib, tb) = a, b
    return (
        ia.shape == ib.shape
        and torch.equal(ia, ib)
        and torch.equal(ta["boxes"], tb["boxes"])
        and torch.equal(ta["labels"], tb["labels"])
        and torch.equal(ta["size"], tb["size"])
    )


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """Four noise images in COCO layout; the last has no annotations."""
    root = tmp_path_factory.mktemp("tiny_coco")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    sizes = [(48, 64), (40, 56), (64, 48), (32, 40)]  # (H, W)
    images, anns = [], []
    for k, (h, w) in enumerate(sizes):
        name = f"{k}.png"
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / name)
        images.append({"id": k + 1, "file_name": name, "height": h, "width": w})
    for k in range(3):
        for j, bbox in enumerate([[2, 3, 20, 15], [25, 10, 12, 20], [5, 20, 30, 10]]):
            anns.append(
                {
                    "id": 10 * k + j + 1,
                    "image_id": k + 1,
                    "category_id": [1, 7][j % 2],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    coco = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}],
    }
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def dataset(root, transforms, seed=0) -> CocoDetection:
    return CocoDetection(root / "images", root / "instances.json", transforms, seed=seed)


def test_same_seed_epoch_index_gives_identical_samples(tiny_coco):
    ds = dataset(tiny_coco, detr_train_transforms(), seed=5)
    again = dataset(tiny_coco, detr_train_transforms(), seed=5)
    first = [ds[i] for i in range(len(ds))]
    assert all(same(a, again[i]) for i, a in enumerate(first))
    assert all(same(a, ds[i]) for i, a in enumerate(first))
    ds.set_epoch(1)
    assert not any(same(a, ds[i]) for i, a in enumerate(first))
    ds.set_epoch(0)
    assert all(same(a, ds[i]) for i, a in enumerate(first))
    other_seed = dataset(tiny_coco, detr_train_transforms(), seed=6)
    assert not any(same(a, other_seed[i]) for i, a in enumerate(first))


def test_each_sample_gets_its_own_generator(tiny_coco):
    seen = []

    def record(image, target, generator=None):
        seen.append(generator.initial_seed())
        return image, target

    ds = dataset(tiny_coco, record, seed=3)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ds[i]
    assert len(set(seen)) == 3 * len(ds)
    ds.set_epoch(1)
    ds[2]
    assert seen[-1] == seen[len(ds) + 2]


def test_samples_do_not_depend_on_global_rng_or_workers(tiny_coco):
    ds = dataset(tiny_coco, detr_train_transforms(), seed=1)
    ds.set_epoch(2)
    torch.manual_seed(0)
    expected = [ds[i] for i in range(len(ds))]
    torch.manual_seed(1)
    assert all(same(a, ds[i]) for i, a in enumerate(expected))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert all(same(a, b) for a, b in zip(expected, loader, strict=True))


def test_set_epoch_reaches_persistent_workers(tiny_coco):
    ds = dataset(tiny_coco, detr_train_transforms(), seed=1)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=2, persistent_workers=True
    )
    for epoch in range(2):
        ds.set_epoch(epoch)
        served = list(loader)
        assert all(same(a, ds[i]) for i, a in enumerate(served))
    ds.set_epoch(0)
    assert not any(same(a, ds[i]) for i, a in enumerate(served))


def test_horizontal_flip_maps_boxes():
    image = torch.arange(3 * 4 * 6, dtype=torch.float32).view(3, 4, 6)
    target = {"boxes": torch.tensor([[1.0, 0.0, 3.0, 2.0]]), "labels": torch.tensor([2])}
    out, t = RandomHorizontalFlip(p=1.0)(image, target, gen(0))
    assert torch.equal(out, image.flip(-1))
    assert torch.equal(t["boxes"], torch.tensor([[3.0, 0.0, 5.0, 2.0]]))
    assert torch.equal(out[:, 0:2, 3:5], image[:, 0:2, 1:3].flip(-1))  # same pixels in the box
    assert torch.equal(t["labels"], target["labels"])
    kept, t = RandomHorizontalFlip(p=0.0)(image, target, gen(0))
    assert torch.equal(kept, image) and torch.equal(t["boxes"], target["boxes"])
    flips = [
        torch.equal(RandomHorizontalFlip(0.5)(image, target, gen(s))[0], image.flip(-1))
        for s in range(20)
    ]
    assert any(flips) and not all(flips)
    assert flips == [
        torch.equal(RandomHorizontalFlip(0.5)(image, target, gen(s))[0], image.flip(-1))
        for s in range(20)
    ]


def test_random_resize_keeps_aspect_respects_max_size_and_maps_boxes():
    assert Resize is RandomResize
    image = torch.rand(3, 30, 60, generator=gen(0))
    target = {"boxes": torch.tensor([[6.0, 3.0, 30.0, 15.0]]), "area": torch.tensor([288.0])}
    out, t = RandomResize([20])(image, target)
    assert out.shape == (3, 20, 40)
    torch.testing.assert_close(t["boxes"], torch.tensor([[4.0, 2.0, 20.0, 10.0]]))
    torch.testing.assert_close(t["area"], torch.tensor([128.0]))
    out, t = RandomResize([20], max_size=30)(image, target)
    assert out.shape == (3, 15, 30)
    torch.testing.assert_close(t["boxes"], torch.tensor([[3.0, 1.5, 15.0, 7.5]]))
    drawn = set()
    for s in range(30):
        out, _ = RandomResize([10, 20, 30], max_size=50)(image, target, gen(s))
        h, w = out.shape[-2:]
        assert h in (10, 20, 30) or w == 50
        assert abs(h / w - 0.5) <= 1 / h
        assert w <= 50
        drawn.add(h)
    assert drawn == {10, 20, 25}  # 30 would make the longer side 60 > 50


def crop_oracle(boxes, left, top, w, h):
    """Clip each box to the window by hand; (index, clipped box) for those with area left."""
    kept = []
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cx0, cy0 = max(x0 - left, 0.0), max(y0 - top, 0.0)
        cx1, cy1 = min(x1 - left, float(w)), min(y1 - top, float(h))
        if cx1 > cx0 and cy1 > cy0:
            kept.append((k, [cx0, cy0, cx1, cy1]))
    return kept


def test_random_size_crop_clips_and_drops_boxes_with_their_fields():
    H, W = 50, 70
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    image = torch.stack([xx, yy, xx + yy]).float()  # pixels name their coordinates
    x0y0 = torch.rand(12, 2, generator=gen(1)) * torch.tensor([W - 10.0, H - 10.0])
    boxes = torch.cat([x0y0, x0y0 + 2 + torch.rand(12, 2, generator=gen(2)) * 8], 1)
    target = {
        "boxes": boxes,
        "labels": torch.arange(12),
        "area": (boxes[:, 2:] - boxes[:, :2]).prod(1),
        "iscrowd": torch.arange(12) % 2,
        "image_id": 4,
        "orig_size": torch.tensor([H, W]),
    }
    crop = RandomSizeCrop(20, 40)
    dropped, sizes = False, set()
    for s in range(40):
        out, t = crop(image, target, gen(s))
        h, w = out.shape[-2:]
        assert 20 <= h <= 40 and 20 <= w <= 40
        sizes.add((h, w))
        left, top = int(out[0, 0, 0]), int(out[1, 0, 0])
        assert torch.equal(out, image[:, top : top + h, left : left + w])
        expected = crop_oracle(boxes, left, top, w, h)
        index = torch.tensor([k for k, _ in expected], dtype=torch.int64)
        clipped = torch.tensor([b for _, b in expected]).view(-1, 4)
        torch.testing.assert_close(t["boxes"], clipped)
        assert torch.equal(t["labels"], index)
        assert torch.equal(t["iscrowd"], index % 2)
        torch.testing.assert_close(t["area"], (clipped[:, 2:] - clipped[:, :2]).prod(1))
        assert t["image_id"] == 4 and torch.equal(t["orig_size"], target["orig_size"])
        assert (t["boxes"][:, 2:] <= torch.tensor([w, h])).all() and (t["boxes"] >= 0).all()
        dropped |= len(index) < len(boxes)
    assert dropped and len(sizes) > 10
    short = [crop(image[:, :30], empty_target(), gen(s))[0].shape[-2:] for s in range(20)]
    assert all(20 <= h <= 30 and 20 <= w <= 40 for h, w in short)
    assert max(w for _, w in short) > 30  # each side is bounded by its own extent
    small = torch.rand(3, 10, 12)
    assert crop(small, empty_target(), gen(0))[0].shape == (3, 10, 12)
    with pytest.raises(ValueError, match="min_size=50, max_size=40"):
        RandomSizeCrop(50, 40)


def test_random_select_picks_by_probability():
    def mark(value):
        return lambda image, target, generator=None: (image + value, target)

    image, target = torch.zeros(1, 1, 1), empty_target()
    assert RandomSelect(mark(1), mark(2), p=1.0)(image, target, gen(0))[0].item() == 1
    assert RandomSelect(mark(1), mark(2), p=0.0)(image, target, gen(0))[0].item() == 2
    picks = {RandomSelect(mark(1), mark(2))(image, target, gen(s))[0].item() for s in range(20)}
    assert picks == {1, 2}


def test_detr_train_transforms_sizes_and_both_branches():
    aspects = set()
    for H, W in [(48, 64), (30, 120)]:
        image = torch.rand(3, H, W, generator=gen(H))
        target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([1])}
        for s in range(12):
            out, t = detr_train_transforms()(image, target, gen(s))
            h, w = out.shape[-2:]
            assert min(h, w) in SCALES or max(h, w) == 1333
            assert max(h, w) <= 1333
            assert len(t["boxes"]) == len(t["labels"]) <= 1
            assert (t["boxes"][:, 2:] <= torch.tensor([w, h])).all()
            aspects.add(abs(h / w - H / W) <= 1 / min(h, w))
    assert aspects == {True, False}  # plain multi-scale resize and the crop branch both ran


def test_detr_train_transforms_flip_switch():
    ramp = torch.linspace(0, 1, 64).expand(3, 48, 64)  # brighter to the right
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([1])}

    def brighter_right(tf, s):
        out = tf(ramp, target, gen(s))[0]
        return bool(out[0, 0, -1] > out[0, 0, 0])

    assert all(brighter_right(detr_train_transforms(flip=False), s) for s in range(10))
    assert {brighter_right(detr_train_transforms(), s) for s in range(10)} == {True, False}


def test_detr_eval_transforms_shorter_800_longer_at_most_1333():
    tf = detr_eval_transforms()
    g = gen(0)
    state = g.get_state()
    assert tf(torch.rand(3, 400, 700), empty_target(), g)[0].shape == (3, 762, 1333)
    assert tf(torch.rand(3, 600, 500), empty_target(), g)[0].shape == (3, 960, 800)
    assert torch.equal(g.get_state(), state)  # evaluation draws nothing
    grey = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 8, 8)
    out, _ = Compose([Normalize()])(grey, empty_target())
    assert out.abs().max() < 1e-6


def test_simple_transforms():
    image = torch.rand(3, 160, 160, generator=gen(0))
    target = {"boxes": torch.tensor([[0.0, 0.0, 40.0, 80.0]]), "labels": torch.tensor([0])}
    plain, t = simple_eval_transforms(80)(image, target)
    assert plain.shape == (3, 80, 80)
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0.0, 20.0, 40.0]]))
    no_flip = [simple_train_transforms(80, flip=False)(image, target, gen(s))[0] for s in range(8)]
    assert all(torch.equal(x, plain) for x in no_flip)
    flipped = [simple_train_transforms(80)(image, target, gen(s))[0] for s in range(8)]
    # flipping before or after the antialiased resize differs by rounding only
    assert {torch.allclose(x, plain.flip(-1), atol=1e-5) for x in flipped} == {True, False}


@pytest.mark.parametrize(
    "transform",
    [
        RandomHorizontalFlip(1.0),
        RandomResize([20, 30], max_size=40),
        RandomSizeCrop(10, 20),
        detr_train_transforms(),
        detr_eval_transforms(),
        simple_train_transforms(32),
        simple_eval_transforms(32),
    ],
    ids=["flip", "resize", "crop", "detr_train", "detr_eval", "simple_train", "simple_eval"],
)
def test_empty_targets_pass_through(transform):
    for s in range(4):
        out, t = transform(
            torch.rand(3, 24, 36), {**empty_target(), "area": torch.zeros(0)}, gen(s)
        )
        assert out.shape[0] == 3
        assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["area"].shape == (0,)


def test_image_without_annotations_through_the_dataset(tiny_coco):
    ds = dataset(tiny_coco, detr_train_transforms())
    image, target = ds[3]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert min(image.shape[-2:]) in SCALES
    images, _, targets = collate([ds[0], ds[3]])
    assert images.shape[0] == 2 and targets[1]["boxes"].shape == (0, 4)
