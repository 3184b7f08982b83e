"""The segmentation folder reader, its transforms and batching, and the synthetic generator."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from msdeformattn.train.data import Compose
from msdeformattn.train.segmentation_data import (
    IGNORE_INDEX,
    SegmentationDataset,
    SegmentationHorizontalFlip,
    SegmentationResize,
    collate_segmentation,
    generate_segmentation,
    segmentation_classes,
    segmentation_eval_transforms,
    segmentation_train_transforms,
)
from msdeformattn.train.synthetic import CLASSES, generate
from msdeformattn.util.errors import UsageError

from .conftest import segmentation_sample


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_segmentation(
        tmp_path_factory.mktemp("seg"), num_train=6, num_val=2, seed=5, size=96
    )


def asymmetric_mask(h: int = 24, w: int = 32) -> np.ndarray:
    """An L in the top-left corner (class 1), a block at the right (class 2), ignore below."""
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[2:14, 3:7] = 1
    mask[10:14, 3:12] = 1
    mask[4:9, 20:29] = 2
    mask[-3:, :] = IGNORE_INDEX
    return mask


def image_of(mask: np.ndarray) -> np.ndarray:
    """An image whose red channel says the class: 0, 100, 200, and 250 on ignore."""
    red = np.where(mask == IGNORE_INDEX, 250, mask.astype(np.int64) * 100).astype(np.uint8)
    return np.stack([red, np.full_like(red, 30), np.full_like(red, 60)], -1)


@pytest.fixture
def folder(tmp_path):
    mask = asymmetric_mask()
    segmentation_sample(tmp_path, "train", "a", mask, image_of(mask))
    segmentation_sample(tmp_path, "train", "b", np.ones((20, 16), np.uint8), suffix=".jpg")
    segmentation_sample(tmp_path, "val", "c", np.zeros((16, 16), np.uint8))
    (tmp_path / "classes.json").write_text(json.dumps(["bg", "ell", "block"]))
    return tmp_path


# --- the generator ---------------------------------------------------------------------


def test_generator_is_seeded(synthetic, tmp_path):
    again = generate_segmentation(tmp_path / "a", num_train=6, num_val=2, seed=5, size=96)
    other = generate_segmentation(tmp_path / "b", num_train=6, num_val=2, seed=6, size=96)
    files = sorted(p.relative_to(synthetic) for p in synthetic.rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * (6 + 2)
    assert all((synthetic / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert (synthetic / files[-1]).read_bytes() != (other / files[-1]).read_bytes()
    assert json.loads((synthetic / "classes.json").read_text()) == ["background", *CLASSES]


def test_generator_masks_follow_the_painted_shapes(synthetic):
    """Colour jumps where the label changes and stays smooth inside a region: across
    label boundaries the mean colour step is several times the step inside regions."""
    across, inside, seen = [], [], set()
    for path in sorted((synthetic / "annotations" / "train").glob("*.png")):
        mask = np.asarray(Image.open(path))
        image = np.asarray(Image.open(synthetic / "images/train" / path.name), dtype=np.float64)
        assert mask.shape == image.shape[:2] == (96, 96)
        seen |= set(np.unique(mask).tolist())
        step = np.abs(np.diff(image, axis=1)).sum(-1)
        boundary = mask[:, 1:] != mask[:, :-1]
        across.append(step[boundary])
        inside.append(step[~boundary & (mask[:, 1:] > 0)])  # inside shapes: flat colour
    assert seen <= set(range(len(CLASSES) + 1)) and 0 in seen and len(seen) >= 3
    assert np.concatenate(across).mean() > 5 * np.concatenate(inside).mean()


@pytest.mark.parametrize("size", [32, 48, 64])
def test_generators_paint_small_images(tmp_path, size):
    """Objects shrink to fit images under 70 px; every label is a class, every image full."""
    root = generate_segmentation(tmp_path / "seg", num_train=4, num_val=1, seed=0, size=size)
    labels = set()
    for path in sorted((root / "annotations" / "train").glob("*.png")):
        mask = np.asarray(Image.open(path))
        assert mask.shape == (size, size)
        labels |= set(np.unique(mask).tolist())
    assert labels <= set(range(len(CLASSES) + 1)) and labels - {0}
    det = generate(tmp_path / "det", num_train=4, num_val=1, seed=0, size=size)
    boxes = json.loads((det / "annotations/instances_train.json").read_text())["annotations"]
    assert boxes and all(
        x >= 0 and y >= 0 and x + w <= size and y + h <= size
        for x, y, w, h in (a["bbox"] for a in boxes)
    )


@pytest.mark.parametrize("size", [31, 0, -5, 64.0, True])
def test_generators_refuse_sizes_they_cannot_paint(tmp_path, size):
    for make in (generate_segmentation, generate):
        with pytest.raises(ValueError, match=r"size must be an integer >= 32"):
            make(tmp_path / "x", num_train=1, num_val=1, size=size)
    assert not (tmp_path / "x").exists()


# --- the reader ------------------------------------------------------------------------


def test_reader_returns_unit_image_and_int64_classes(synthetic):
    ds = SegmentationDataset(synthetic, "train")
    assert len(ds) == 6 and ds.num_classes == 5
    assert ds.class_names == ["background", *CLASSES]
    image, target = ds[0]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    assert target.shape == (96, 96) and target.dtype == torch.int64
    expected = np.asarray(Image.open(synthetic / "annotations/train/000000.png"))
    assert torch.equal(target, torch.from_numpy(expected.astype(np.int64)))


def test_reader_pairs_jpg_and_png_by_name(folder):
    ds = SegmentationDataset(folder, "train")
    assert [(i.name, m.name) for i, m in ds.samples] == [("a.png", "a.png"), ("b.jpg", "b.png")]
    image, target = ds[1]
    assert image.shape == (3, 20, 16) and torch.equal(target, torch.ones(20, 16, dtype=torch.int64))


def test_class_names_without_classes_json(folder):
    """K = largest index in any split + 1, ignore (255) excluded."""
    (folder / "classes.json").unlink()
    segmentation_sample(folder, "val", "d", np.full((8, 8), 3, np.uint8))
    assert segmentation_classes(folder) == ["0", "1", "2", "3"]
    assert SegmentationDataset(folder, "train").num_classes == 4
    assert SegmentationDataset(folder, "train", class_names=["x", "y", "z"]).num_classes == 3


def test_palette_annotations_read_as_indices(tmp_path):
    mask = Image.fromarray(asymmetric_mask()).convert("P")
    mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (3 * 253))
    segmentation_sample(tmp_path, "train", "a", np.zeros((24, 32), np.uint8))
    mask.save(tmp_path / "annotations/train/a.png")
    _, target = SegmentationDataset(tmp_path, "train", class_names=["0", "1", "2"])[0]
    assert torch.equal(target, torch.from_numpy(asymmetric_mask().astype(np.int64)))


# --- errors name the file ----------------------------------------------------------------


def test_missing_folder_is_named(folder):
    with pytest.raises(UsageError, match=re.escape(str(folder / "images" / "test"))):
        SegmentationDataset(folder, "test")


def test_image_without_annotation_is_named(folder):
    (folder / "annotations/train/b.png").unlink()
    with pytest.raises(UsageError, match=r"b\.jpg: no annotation .*b\.png"):
        SegmentationDataset(folder, "train")


def test_annotation_without_image_is_named(folder):
    (folder / "images/train/a.png").unlink()
    with pytest.raises(UsageError, match=r"annotations/train/a\.png: no image"):
        SegmentationDataset(folder, "train")


def test_size_mismatch_is_named(folder):
    Image.fromarray(np.zeros((20, 17), np.uint8)).save(folder / "annotations/train/b.png")
    ds = SegmentationDataset(folder, "train")
    with pytest.raises(UsageError, match=r"train/b\.png: annotation is 17x20 .* b\.jpg is 16x20"):
        ds[1]


def test_class_index_out_of_range_is_named(folder):
    mask = asymmetric_mask()
    mask[0, 0] = 3  # classes.json names 3 classes; 255 elsewhere is fine
    Image.fromarray(mask).save(folder / "annotations/train/a.png")
    ds = SegmentationDataset(folder, "train")
    with pytest.raises(UsageError, match=r"train/a\.png: class indices \[3\] outside 0\.\.2"):
        ds[0]


def test_rgb_annotation_and_bad_classes_json_are_named(folder):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "annotations/val/c.png")
    with pytest.raises(UsageError, match=r"val/c\.png: expected one class index .* RGB"):
        SegmentationDataset(folder, "val")[0]
    (folder / "classes.json").write_text('{"0": "bg"}')
    with pytest.raises(UsageError, match=r"classes\.json: expected a non-empty JSON list"):
        segmentation_classes(folder)


# --- transforms keep image and mask aligned -----------------------------------------------


def test_flip_moves_mask_with_image(folder):
    plain = SegmentationDataset(folder, "train")
    flipped = SegmentationDataset(folder, "train", SegmentationHorizontalFlip(p=1.0))
    (image, target), (image2, target2) = plain[0], flipped[0]
    assert torch.equal(image2, image.flip(-1)) and torch.equal(target2, target.flip(-1))
    # the red channel still says the class wherever the class is known
    red = (image2[0] * 255).round().long()
    assert torch.equal(red, torch.where(target2 == IGNORE_INDEX, 250, target2 * 100))
    assert target2[2, -4] == 1 and target2[2, 3] == 0  # the L is now top right


def test_resize_is_nearest_for_the_mask_and_centred(folder):
    """Integer factors: exact duplication up, and each 2x2 block's pixel down; a
    non-integer factor keeps each region's centroid where the image puts it."""
    image, target = SegmentationDataset(folder, "train")[0]  # 24 x 32
    up_image, up = SegmentationResize([48])(image, target)
    assert up_image.shape == (3, 48, 64)
    assert torch.equal(up, target.repeat_interleave(2, 0).repeat_interleave(2, 1))
    down_image, down = SegmentationResize([12])(image, target)
    assert down_image.shape == (3, 12, 16) and torch.equal(down, target[1::2, 1::2])
    torch.testing.assert_close(
        down_image,
        torch.nn.functional.interpolate(image[None], (12, 16), mode="bilinear", antialias=True)[0],
    )
    big = torch.zeros(3, 60, 60)
    mask = torch.zeros(60, 60, dtype=torch.int64)
    big[:, 13:41, 22:31], mask[13:41, 22:31] = 1.0, 1
    small_image, small = SegmentationResize([37])(big, mask)
    yy, xx = torch.meshgrid(torch.arange(37.0), torch.arange(37.0), indexing="ij")
    weight = small_image[0] / small_image[0].sum()
    on = (small == 1).double()
    centroid_image = torch.stack([(yy * weight).sum(), (xx * weight).sum()])
    centroid_mask = torch.stack([(yy * on).sum(), (xx * on).sum()]) / on.sum()
    torch.testing.assert_close(centroid_mask.float(), centroid_image, atol=0.25, rtol=0)


def test_seeded_augmentation_keeps_pairs_aligned(folder):
    """Whatever is drawn, the red channel and the class map agree at every pixel that is
    not blended across a class boundary; the draw depends on (seed, epoch, index) only."""
    transforms = Compose([SegmentationHorizontalFlip(0.5), SegmentationResize([24, 48], 64)])
    ds = SegmentationDataset(folder, "train", transforms, seed=1)
    flips = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        image, target = ds[0]
        assert image.shape[-2:] == target.shape and target.shape in ((24, 32), (48, 64))
        red = image[0] * 255
        labelled = torch.where(target == IGNORE_INDEX, 250, target * 100).float()
        flat = torch.nn.functional.max_pool2d(-(red - labelled).abs()[None], 3, 1, 1)[0] > -0.5
        assert flat.float().mean() > 0.5  # interiors: most of the picture
        scale = target.shape[0] // 24
        flips.add(bool(target[2 * scale, -4 * scale] == 1))
        again = ds[0]
        assert torch.equal(again[0], image) and torch.equal(again[1], target)
    assert flips == {True, False}


def test_ready_made_transforms(folder):
    ds = SegmentationDataset(folder, "train", segmentation_train_transforms([12, 48], 40))
    image, target = ds[0]
    assert image.shape[-2:] == target.shape and max(target.shape) <= 40
    assert image.min() < 0  # normalised
    image, target = SegmentationDataset(folder, "train", segmentation_eval_transforms(12))[0]
    assert image.shape == (3, 12, 16) and target.shape == (12, 16)
    assert segmentation_train_transforms(12, flip=False).transforms[0].__class__ is (
        SegmentationResize
    )


# --- batching ----------------------------------------------------------------------------


def test_collate_pads_images_with_zero_and_targets_with_ignore():
    a = (torch.ones(3, 4, 6), torch.zeros(4, 6, dtype=torch.int64))
    b = (torch.ones(3, 5, 3), torch.ones(5, 3, dtype=torch.int64))
    images, mask, targets = collate_segmentation([a, b])
    assert images.shape == (2, 3, 5, 6) and mask.shape == targets.shape == (2, 5, 6)
    assert targets.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(mask, (images == 0).all(1))
    assert torch.equal(targets == IGNORE_INDEX, mask)
    assert torch.equal(targets[0, :4, :6], a[1]) and torch.equal(targets[1, :5, :3], b[1])
