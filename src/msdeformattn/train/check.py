"""Check a COCO-format folder before anything trains on it, and repair what is safe to repair.

:func:`check_dataset` reads ``annotations/instances_{train,val}.json``, opens
every image they name (in threads: the work is file reads and image headers),
and returns a :class:`DataReport`: the problems found, each fatal or repaired,
and the cleaned annotations, which training and evaluation then use.

Fatal (nothing trains until they are fixed): an unreadable annotation file,
missing or unreadable images, malformed boxes or records, unknown image or
category ids, duplicate ids, train and val categories that differ.
Repaired and counted: boxes partly outside their image (clipped), boxes with
no area (dropped, also those wholly outside the image), a missing ``area``
(computed from the box), an image size in the JSON that differs from the file
(the file's size is used). A missing ``iscrowd`` is taken as 0, as COCO means it.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..util.errors import UsageError

__all__ = ["DataReport", "Problem", "annotation_file", "check_dataset"]

SPLITS = ("train", "val")


def annotation_file(data: str | Path, split: str) -> Path:
    """Where a split's COCO instances JSON lives in a dataset folder."""
    return Path(data) / "annotations" / f"instances_{split}.json"


@dataclass
class Problem:
    """One kind of problem in one split: how often, where first, and whether it was repaired."""

    split: str
    kind: str
    fatal: bool
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(where)


@dataclass
class DataReport:
    """What :func:`check_dataset` found; ``cleaned[split]`` is the repaired COCO dict."""

    data: Path
    problems: list[Problem]
    cleaned: dict[str, dict[str, Any]]
    images: dict[str, int]

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def repaired(self) -> list[Problem]:
        return [p for p in self.problems if not p.fatal]

    def table(self) -> str:
        """The problems as a text table (split, status, problem, count, first examples)."""
        if not self.problems:
            counts = ", ".join(f"{n} {split} images" for split, n in self.images.items())
            return f"{self.data}: no problems ({counts})"
        rows = [("split", "status", "problem", "count", "where (first)")]
        for p in sorted(self.problems, key=lambda p: (not p.fatal, p.split, p.kind)):
            status = "FATAL" if p.fatal else "repaired"
            rows.append((p.split, status, p.kind, str(p.count), "; ".join(p.examples)))
        widths = [max(len(r[k]) for r in rows) for k in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
            for row in rows
        ]
        return "\n".join(line.rstrip() for line in lines)

    def summary(self) -> str:
        """One line on what was repaired (empty when nothing was)."""
        return "; ".join(f"{p.split}: {p.count} x {p.kind}" for p in self.repaired)

    def raise_if_fatal(self, flag: str = "--data") -> None:
        """A :class:`UsageError` naming the fatal problems and their first files."""
        if self.fatal:
            found = "; ".join(
                f"{p.split}: {p.kind} ({p.examples[0]}, {p.count} in all)" for p in self.fatal
            )
            raise UsageError(
                f"{flag} {self.data}: {found} (msdeformattn check-data {self.data} lists them all)"
            )


class _Problems:
    def __init__(self, split: str) -> None:
        self.split = split
        self.found: dict[str, Problem] = {}

    def add(self, kind: str, where: str, *, fatal: bool) -> None:
        if kind not in self.found:
            self.found[kind] = Problem(self.split, kind, fatal)
        self.found[kind].add(where)


def _read_json(path: Path, problems: _Problems) -> dict[str, Any] | None:
    if not path.is_file():
        problems.add("annotation file missing", str(path), fatal=True)
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        problems.add("malformed JSON", f"{path}:{e.lineno}:{e.colno}: {e.msg}", fatal=True)
        return None
    except (OSError, UnicodeDecodeError) as e:
        problems.add("unreadable annotation file", f"{path}: {e}", fatal=True)
        return None
    if not isinstance(raw, dict) or not all(
        isinstance(raw.get(k), list) for k in ("images", "annotations", "categories")
    ):
        problems.add(
            "not COCO instances (needs lists images, annotations, categories)",
            str(path),
            fatal=True,
        )
        return None
    return raw


def _image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the file's header, or why it cannot be read.

    ``verify`` checks the structure without decoding every pixel; a JPEG must also
    end with its end-of-image marker, which a truncated download lacks.
    """
    try:
        with Image.open(path) as image:
            size = image.size
            kind = image.format
            image.verify()
        if kind == "JPEG":
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                if f.read(2) != b"\xff\xd9":
                    return "truncated JPEG"
        return size
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports corrupt PNG chunks as SyntaxError.
        return f"unreadable ({e})"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_split(
    data: Path, split: str, pool: ThreadPoolExecutor, problems: _Problems
) -> tuple[dict[str, Any] | None, int]:
    """The cleaned COCO dict of one split (None when unusable) and its image count."""
    path = annotation_file(data, split)
    raw = _read_json(path, problems)
    if raw is None:
        return None, 0
    name = path.name

    categories = []
    for k, cat in enumerate(raw["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            problems.add(
                "malformed category (needs an integer id)", f"{name} categories[{k}]", fatal=True
            )
            continue
        categories.append({**cat, "name": str(cat.get("name", cat["id"]))})
    if not raw["categories"]:
        problems.add("no categories", name, fatal=True)
    for cat_id, n in Counter(c["id"] for c in categories).items():
        if n > 1:
            problems.add("duplicate category id", f"{name} id {cat_id}", fatal=True)
    category_ids = {c["id"] for c in categories}

    images: dict[int, dict[str, Any]] = {}
    # Ids whose annotations are not checked further: their problem is reported once.
    skipped: set[int] = set()
    for k, info in enumerate(raw["images"]):
        if (
            not isinstance(info, dict)
            or not _is_int(info.get("id"))
            or not isinstance(info.get("file_name"), str)
        ):
            problems.add(
                "malformed image record (needs integer id and file_name)",
                f"{name} images[{k}]",
                fatal=True,
            )
            continue
        if info["id"] in images:
            problems.add("duplicate image id", f"{name} id {info['id']}", fatal=True)
            skipped.add(info["id"])
            continue
        images[info["id"]] = dict(info)

    folder = data / split
    sizes = pool.map(_image_size, [folder / info["file_name"] for info in images.values()])
    for info, size in zip(images.values(), sizes, strict=True):
        where = str(Path(split) / info["file_name"])
        if isinstance(size, str):
            kind = "missing image" if size == "missing" else "unreadable image"
            problems.add(kind, where if size == "missing" else f"{where}: {size}", fatal=True)
            skipped.add(info["id"])
            continue
        if (info.get("width"), info.get("height")) != size:
            if "width" in info or "height" in info:
                problems.add(
                    "image size in the JSON differs from the file (file's used)", where, fatal=False
                )
            info["width"], info["height"] = size

    annotations, seen_ids = [], Counter()
    for k, ann in enumerate(raw["annotations"]):
        where = f"{name} annotations[{k}]"
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            problems.add("malformed annotation (needs an integer id)", where, fatal=True)
            continue
        where = f"{name} annotation id {ann['id']}"
        seen_ids[ann["id"]] += 1
        if ann.get("image_id") in skipped:
            continue
        if ann.get("image_id") not in images:
            problems.add("annotation of an unknown image id", where, fatal=True)
            continue
        if ann.get("category_id") not in category_ids:
            problems.add("unknown category id", f"{where}: {ann.get('category_id')!r}", fatal=True)
            continue
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_number(v) for v in box):
            problems.add(
                "malformed box (needs [x, y, w, h], 4 finite numbers)",
                f"{where}: {box!r}",
                fatal=True,
            )
            continue
        info = images[ann["image_id"]]
        W, H = info["width"], info["height"]
        x, y, w, h = box
        x0, y0 = min(max(x, 0), W), min(max(y, 0), H)
        x1, y1 = min(max(x + w, 0), W), min(max(y + h, 0), H)
        ann = dict(ann)
        if w <= 0 or h <= 0:
            problems.add("box without area dropped", where, fatal=False)
            continue
        if x1 <= x0 or y1 <= y0:
            problems.add("box outside its image dropped", where, fatal=False)
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            problems.add("box clipped to its image", where, fatal=False)
            ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        if not _number(ann.get("area")):
            problems.add("missing area computed from the box", where, fatal=False)
            ann["area"] = (x1 - x0) * (y1 - y0)
        # COCOeval reads iscrowd from every box; leaving it out means "not a crowd".
        ann.setdefault("iscrowd", 0)
        annotations.append(ann)
    for ann_id, n in seen_ids.items():
        if n > 1:
            problems.add("duplicate annotation id", f"{name} id {ann_id}", fatal=True)

    cleaned = {
        **{k: v for k, v in raw.items() if k not in ("images", "annotations", "categories")},
        "images": list(images.values()),
        "annotations": annotations,
        "categories": categories,
    }
    return cleaned, len(images)


def check_dataset(
    data: str | Path, splits: Sequence[str] = SPLITS, *, workers: int | None = None
) -> DataReport:
    """Check the ``splits`` of a COCO-format folder (``<split>/`` images and
    ``annotations/instances_<split>.json``); see the module docstring for what counts.

    workers: threads that open images (default: 4 per CPU, at most 32).
    """
    data = Path(data)
    if not data.exists():
        raise UsageError(f"--data: {data} does not exist")
    if not data.is_dir():
        raise UsageError(f"--data: {data} is not a folder")
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    found: list[Problem] = []
    cleaned, counts = {}, {}
    with ThreadPoolExecutor(workers) as pool:
        for split in splits:
            problems = _Problems(split)
            coco, counts[split] = _check_split(data, split, pool, problems)
            if coco is not None:
                cleaned[split] = coco
            found.extend(problems.found.values())
    if len(cleaned) > 1:
        ids = {
            split: sorted(c["id"] for c in coco["categories"]) for split, coco in cleaned.items()
        }
        if len({tuple(v) for v in ids.values()}) > 1:
            mismatch = Problem("/".join(ids), "train and val categories differ", fatal=True)
            mismatch.add(", ".join(f"{split} {v}" for split, v in ids.items()))
            found.append(mismatch)
    return DataReport(data, found, cleaned, counts)
