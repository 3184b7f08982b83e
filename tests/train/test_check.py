"""check_dataset on a COCO folder of the kind people have: what is fatal, what is repaired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from msdeformattn.train.check import check_dataset
from msdeformattn.train.data import CocoDetection
from msdeformattn.util.errors import UsageError

from .conftest import real_like


def test_a_real_like_folder_is_usable_and_its_boxes_repaired(tmp_path):
    data = real_like(tmp_path / "data")
    report = check_dataset(data, workers=2)
    assert report.fatal == [] and report.images == {"train": 5, "val": 5}
    repaired = {(p.split, p.kind): p.count for p in report.repaired}
    assert repaired == {
        (split, kind): 1
        for split in ("train", "val")
        for kind in (
            "box without area dropped",
            "box clipped to its image",
            "box outside its image dropped",
            "missing area computed from the box",
        )
    }
    anns = {a["id"]: a for a in report.cleaned["train"]["annotations"]}
    assert sorted(anns) == [10, 11, 13, 15]
    assert anns[13]["bbox"] == [30, 60, 10, 12]  # clipped to 40 x 72
    assert anns[15]["area"] == 110
    assert "box clipped to its image" in report.table()
    assert "train: 1 x box clipped to its image" in report.summary()
    # The dataset reads the cleaned annotations and every image mode.
    dataset = CocoDetection(data / "train", report.cleaned["train"])
    assert dataset.category_ids == [1, 3, 7]
    for k in range(len(dataset)):
        image, target = dataset[k]
        assert image.shape[0] == 3 and (target["boxes"] >= 0).all()


def _edit(data: Path, split: str, change) -> None:
    path = data / "annotations" / f"instances_{split}.json"
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


CASES = {
    "missing image": (lambda d: (d / "train" / "b.jpg").unlink(), "missing image", "b.jpg"),
    "truncated JPEG": (lambda d: _truncate(d / "train" / "a.jpg"), "unreadable image", "a.jpg"),
    "not an image": (
        lambda d: (d / "val" / "gray.png").write_text("hello"),
        "unreadable image",
        "gray.png: not an image",
    ),
    "malformed JSON": (
        lambda d: (d / "annotations/instances_val.json").write_text('{"images": [,]}'),
        "malformed JSON",
        "instances_val.json:1:13",
    ),
    "unknown category": (
        lambda d: _edit(d, "train", lambda c: c["annotations"][0].update(category_id=2)),
        "unknown category id",
        "annotation id 10: 2",
    ),
    "unknown image": (
        lambda d: _edit(d, "train", lambda c: c["annotations"][0].update(image_id=99)),
        "annotation of an unknown image id",
        "annotation id 10",
    ),
    "malformed box": (
        lambda d: _edit(d, "val", lambda c: c["annotations"][0].update(bbox=[1, 2, "3"])),
        "malformed box",
        "annotation id 10",
    ),
    "duplicate image id": (
        lambda d: _edit(d, "train", lambda c: c["images"].append({**c["images"][1], "id": 1})),
        "duplicate image id",
        "id 1",
    ),
    "duplicate annotation id": (
        lambda d: _edit(d, "train", lambda c: c["annotations"][1].update(id=10)),
        "duplicate annotation id",
        "id 10",
    ),
    "category mismatch": (
        lambda d: _edit(d, "val", lambda c: c["categories"].append({"id": 9, "name": "x"})),
        "train and val categories differ",
        "val [1, 3, 7, 9]",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fatal_problems_are_found_and_named(tmp_path, case):
    data = real_like(tmp_path / "data")
    spoil, kind, where = CASES[case]
    spoil(data)
    report = check_dataset(data, workers=2)
    (problem,) = report.fatal
    assert problem.kind.startswith(kind) and where in problem.examples[0], problem
    assert "FATAL" in report.table() and kind in report.table()
    with pytest.raises(UsageError, match=f"--data {data}: .*{kind}") as e:
        report.raise_if_fatal()
    assert "\n" not in str(e.value)


def test_a_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"--data: .*nowhere does not exist"):
        check_dataset(tmp_path / "nowhere")


def test_an_image_gone_after_the_check_is_named_when_read(tmp_path):
    data = real_like(tmp_path / "data")
    dataset = CocoDetection(data / "train", check_dataset(data).cleaned["train"])
    (data / "train" / "a.jpg").unlink()
    with pytest.raises(UsageError, match=r"a\.jpg: not a readable image"):
        dataset[0]
