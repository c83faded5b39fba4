"""CUB-200-2011 with its segmentations, from the published folder layout (or a prepared TFDS).

    <root>/images.txt               <id> <relpath>               (relpath = <NNN.Name>/<file>.jpg)
    <root>/image_class_labels.txt   <id> <1..200>
    <root>/train_test_split.txt     <id> <1 train | 0 test>
    <root>/bounding_boxes.txt       <id> <x> <y> <w> <h>
    <root>/classes.txt              <label> <NNN.Name>
    <root>/images/<relpath>
    <segmentations>/<NNN.Name>/<file>.png    grey-level soft masks (separate download)

`root` may also be the folder holding `CUB_200_2011/`. The segmentations folder is
`data.segmentations`, else `<root>/segmentations`, else `<root>/../segmentations` (where the
separate tarball unpacks next to CUB_200_2011).

Examples: mask = segmentation > 0 (as the masking paper binarises); the soft segmentation stays
available through `source.load(i)` -> (image, segmentation uint8 0..255), which Waterbirds uses as
alpha (/255). bbox = the annotated box, clipped to the image. habitat = -1. Labels 0..199.

Config keys (`config.data`): name="cub", root, segmentations=None, mask_from="segmentation" |
"bbox" (a box-filled mask, for users without the segmentation download), skip_corrupt=False;
source="folder" | "tfds" with data_dir and tfds_name="caltech_birds2011" (an already prepared
TFDS dataset; `bgjax prepare cub` writes one named "cub"). Splits: "train", "test", "all".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from bgjax.data import DatasetInfo
from bgjax.data import imagefiles as files

METADATA_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "classes.txt",
)
SPLITS = ("train", "test", "all")
MASK_FROM = ("segmentation", "bbox")


@dataclasses.dataclass(frozen=True)
class CubMetadata:
    """Everything in CUB's text files, in images.txt order (no image is decoded)."""

    root: Path
    ids: np.ndarray  # int64 [N]
    relpaths: tuple[str, ...]  # relative to <root>/images
    labels: np.ndarray  # int32 [N], 0-based
    is_train: np.ndarray  # bool [N]
    boxes: np.ndarray  # float64 [N, 4], (x0, y0, x1, y1)
    class_names: tuple[str, ...]  # "Black_footed_Albatross" (the "001." prefix dropped)

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self.relpaths[index]

    def segmentation_path(self, segmentations: Path, index: int) -> Path:
        return segmentations / Path(self.relpaths[index]).with_suffix(".png")


def resolve_root(root: str | Path | None) -> Path:
    if not root:
        raise ValueError("data.root must name the CUB_200_2011 folder")
    root = files.require_dir(root, "CUB-200-2011 (data.root)")
    if not (root / "images.txt").exists() and (root / "CUB_200_2011").is_dir():
        root = root / "CUB_200_2011"
    return root


def _by_id(path: Path, fields: int) -> dict[int, list[str]]:
    table = {}
    for row in files.read_lines(path, fields):
        try:
            table[int(row[0])] = row[1:]
        except ValueError:
            raise ValueError(f"{path}: image id {row[0]!r} is not an integer") from None
    return table


def read_metadata(root: str | Path | None) -> CubMetadata:
    root = resolve_root(root)
    for name in METADATA_FILES:
        files.require_file(root / name, "CUB-200-2011 metadata")
    files.require_dir(root / "images", "CUB-200-2011 images")
    images = _by_id(root / "images.txt", 2)
    tables = {
        name: _by_id(root / name, fields)
        for name, fields in [
            ("image_class_labels.txt", 2),
            ("train_test_split.txt", 2),
            ("bounding_boxes.txt", 5),
        ]
    }
    for name, table in tables.items():
        missing = [i for i in images if i not in table]
        if missing:
            raise ValueError(f"{root / name}: no line for image id {missing[0]} (of images.txt)")
    classes = [row[1].strip() for row in files.read_lines(root / "classes.txt", 2)]
    ids = np.array(sorted(images), np.int64)
    try:
        labels = np.array([int(tables["image_class_labels.txt"][i][0]) for i in ids]) - 1
        is_train = np.array([int(tables["train_test_split.txt"][i][0]) for i in ids]) == 1
        xywh = np.array([[float(v) for v in tables["bounding_boxes.txt"][i]] for i in ids])
    except ValueError as e:
        raise ValueError(f"{root}: malformed CUB metadata: {e}") from None
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(
            f"{root / 'image_class_labels.txt'}: labels must be in 1..{len(classes)} "
            f"(classes.txt), got {labels.min() + 1}..{labels.max() + 1}"
        )
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return CubMetadata(
        root=root,
        ids=ids,
        relpaths=tuple(images[i][0].strip() for i in ids),
        labels=labels.astype(np.int32),
        is_train=is_train,
        boxes=boxes,
        class_names=tuple(c.split(".", 1)[-1] for c in classes),
    )


def find_segmentations(root: Path, segmentations: str | Path | None) -> Path:
    if segmentations:
        return files.require_dir(segmentations, "CUB segmentations (data.segmentations)")
    for candidate in (root / "segmentations", root.parent / "segmentations"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"CUB segmentations: neither {root / 'segmentations'} nor "
        f"{root.parent / 'segmentations'} exists; set data.segmentations, or "
        f"data.mask_from='bbox' to use box-shaped masks"
    )


def split_indices(meta: CubMetadata, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"unknown CUB split {split!r}; known: {SPLITS}")
    if split == "all":
        return np.arange(len(meta.ids))
    return np.flatnonzero(meta.is_train == (split == "train"))


class CubSource:
    """CUB-200-2011 `split` from the folder layout (see the module docstring)."""

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        segmentations: str | Path | None = None,
        mask_from: str = "segmentation",
        skip_corrupt: bool = False,
        metadata: CubMetadata | None = None,
    ):
        if mask_from not in MASK_FROM:
            raise ValueError(f"mask_from must be one of {MASK_FROM}, got {mask_from!r}")
        self.meta = read_metadata(root) if metadata is None else metadata
        self.segmentations = (
            find_segmentations(self.meta.root, segmentations)
            if mask_from == "segmentation"
            else None
        )
        indices = split_indices(self.meta, split)
        example_files = [self._files(i) for i in indices]
        files.require_files([p for group in example_files for p in group], f"CUB {split}")
        self.skipped: tuple[str, ...] = ()
        if skip_corrupt:
            keep, self.skipped = files.drop_corrupt(example_files, f"CUB {split}")
            indices = indices[keep]
        self.indices = indices  # positions in `meta`
        self.info = DatasetInfo(
            name="cub",
            split=split,
            class_names=self.meta.class_names,
            labels=self.meta.labels[indices],
        )

    def _files(self, position: int) -> tuple[Path, ...]:
        image = self.meta.image_path(position)
        if self.segmentations is None:
            return (image,)
        return image, self.meta.segmentation_path(self.segmentations, position)

    def __len__(self) -> int:
        return len(self.indices)

    def image_file(self, index: int) -> Path:
        return self.meta.image_path(self.indices[index])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(image uint8 [H, W, 3], soft segmentation uint8 [H, W] 0..255, or None)."""
        paths = self._files(self.indices[index])
        image = files.read_rgb(paths[0])
        if len(paths) == 1:
            return image, None
        segmentation = files.read_grey(paths[1])
        files.check_same_size(segmentation, image, str(paths[1]), str(paths[0]))
        return image, segmentation

    def bbox(self, index: int, height: int, width: int) -> np.ndarray:
        return files.clip_box(self.meta.boxes[self.indices[index]], height, width)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image, segmentation = self.load(index)
        bbox = self.bbox(index, *image.shape[:2])
        if segmentation is None:
            mask = np.zeros(image.shape[:2], np.uint8)
            mask[bbox[1] : bbox[3], bbox[0] : bbox[2]] = 1
        else:
            mask = (segmentation > 0).astype(np.uint8)
        return dict(
            image=image, mask=mask, bbox=bbox, label=self.info.labels[index], habitat=np.int32(-1)
        )

    def __repr__(self) -> str:
        return f"CubSource({self.meta.root}, split={self.info.split!r}, n={len(self)})"


def make_source(config: Any, split: str):
    if config.get("source", "folder") == "tfds":
        from bgjax.data import tfds  # imports TFDS only when asked for

        return tfds.TfdsSource(
            config.get("tfds_name", "caltech_birds2011"), split, config.get("data_dir")
        )
    return CubSource(
        config.get("root"),
        split,
        segmentations=config.get("segmentations"),
        mask_from=config.get("mask_from", "segmentation"),
        skip_corrupt=bool(config.get("skip_corrupt", False)),
    )
