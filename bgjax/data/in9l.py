"""ImageNet-9 / ImageNet-9L training sets, built from an ImageNet train folder with its boxes.

Inputs (the standard ILSVRC-2012 layouts):

    <train_dir>/<synset>/<synset>_<n>.JPEG       ImageNet train images
    <bbox_dir>/<synset>/<synset>_<n>.xml         box annotations (ILSVRC2012_bbox_train_v2, or
                                                 ILSVRC/Annotations/CLS-LOC/train on Kaggle)
    the 1000 synsets in class-index order: a `LOC_synset_mapping.txt` / `synsets.txt` (one synset
    per line, optionally followed by its words; ImageNet ships it), else the list packaged with
    timm (read from timm's data files; timm is not imported).

An image of one of the 370 synsets that IN-9 maps (`in9.imagenet_to_in9`;
docs/reference.md#in9-class-mapping) qualifies as the paper's pipeline required
(docs/reference.md#in9-variants): its annotation has exactly one box; after the standard resize
(shorter side 256) and centre crop (224) the box covers at most 90% of the crop and at least half
of the resized box lies inside the crop (computed geometrically); the image's size matches the
annotation; OpenCV GrabCut initialised with the box (5 iterations) marks at least 10% of the box
as foreground (else retried with new seeds, up to 10 times).

`bgjax prepare in9l` runs GrabCut ONCE per qualifying image and stores the 224 px crop (JPEG
q95, as the release), its mask (PNG) and box in a TFDS dataset "in9l" (split "train"); at
training time the variants are composited on the fly from those. IN-9L = every qualifying image;
IN-9 = a class-balanced subset (as many per class as the smallest class has, drawn with a
seed), selected when reading.

Config keys of the registered reader (`config.data`): name="in9l", data_dir (where `bgjax prepare
in9l` wrote), subset="in9l" | "in9", per_class=None (IN-9 size per class; None = smallest
class), subset_seed=0. Split "train". GrabCut is OpenCV's (a core dependency).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bgjax.data import DatasetInfo, in9
from bgjax.data import imagefiles as files

RESIZE, CROP = 256, 224
MAX_BOX_FRACTION = 0.9  # of the crop: ONLY_BG_* must keep some background
MIN_BOX_INSIDE = 0.5  # of the resized box: ONLY_FG must keep most of the object
GRABCUT_ITERATIONS = 5
GRABCUT_ATTEMPTS = 10
MIN_MASK_FRACTION = 0.1  # of the box; below it GrabCut is considered to have failed
SUBSETS = ("in9l", "in9")
SYNSET_FILES = ("LOC_synset_mapping.txt", "synsets.txt")


class Rejected(ValueError):
    """An image the paper's pipeline drops at build time; `reason` is a short tally key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SegmentationFailed(Rejected):
    """GrabCut found (almost) no foreground in the box."""

    def __init__(self, message: str):
        super().__init__("GrabCut failed", message)


def import_cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "GrabCut foreground masks need OpenCV (a bgjax dependency): "
            "pip install opencv-python-headless"
        ) from e
    return cv2


# ----------------------------------------------------------------------------- synsets


def read_synsets(path: str | Path) -> tuple[str, ...]:
    """The 1000 ImageNet synsets in class-index order from a `<synset>[ words]` per line file."""
    path = files.require_file(path, "ImageNet synset list")
    synsets = tuple(row[0].split()[0] for row in files.read_lines(path, 1))
    if len(synsets) != 1000 or len(set(synsets)) != 1000:
        raise ValueError(
            f"{path}: expected 1000 distinct synsets (one per line, in class-index order), "
            f"got {len(synsets)} lines with {len(set(synsets))} distinct"
        )
    return synsets


def find_synsets(synsets: str | Path | None, *folders: Path | None) -> tuple[str, ...]:
    """The explicit file, else LOC_synset_mapping.txt / synsets.txt in `folders`, else timm's."""
    if synsets:
        return read_synsets(synsets)
    candidates = [Path(d) / name for d in folders if d for name in SYNSET_FILES]
    for candidate in candidates:
        if candidate.is_file():
            return read_synsets(candidate)
    spec = importlib.util.find_spec("timm")  # finds the package without importing torch
    if spec is not None and spec.submodule_search_locations:
        packaged = Path(spec.submodule_search_locations[0]) / "data/_info/imagenet_synsets.txt"
        if packaged.is_file():
            return read_synsets(packaged)
    raise FileNotFoundError(
        "the ImageNet class-index -> synset list was not found: pass --synsets (ImageNet's "
        f"LOC_synset_mapping.txt), put it at one of {[str(c) for c in candidates]}, or install "
        "timm (which packages the list)"
    )


def in9_synsets(synsets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """synset -> (IN-9 label, ImageNet index), for the 370 synsets IN-9 maps."""
    table = in9.imagenet_to_in9()
    return {s: (int(table[i]), i) for i, s in enumerate(synsets) if table[i] >= 0}


# ----------------------------------------------------------------------------- boxes and crops


def parse_annotation(path: Path) -> tuple[int, int, np.ndarray]:
    """(width, height, boxes float [K, 4] as (xmin, ymin, xmax, ymax), max inclusive)."""
    try:
        root = ET.parse(path).getroot()
        width = int(root.findtext("size/width"))
        height = int(root.findtext("size/height"))
        boxes = [
            [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            for obj in root.iter("object")
        ]
    except (ET.ParseError, TypeError, ValueError) as e:
        raise ValueError(f"malformed box annotation {path}: {e}") from None
    return width, height, np.asarray(boxes, np.float64).reshape(-1, 4)


@dataclasses.dataclass(frozen=True)
class CropGeometry:
    """torchvision's Resize(256) + CenterCrop(224) of a width x height image."""

    width: int
    height: int

    @property
    def resized(self) -> tuple[int, int]:
        short, long = sorted((self.width, self.height))
        long = int(RESIZE * long / short)
        return (RESIZE, long) if self.width <= self.height else (long, RESIZE)

    @property
    def offset(self) -> tuple[int, int]:
        w, h = self.resized
        return int(round((w - CROP) / 2.0)), int(round((h - CROP) / 2.0))

    def box(self, box: np.ndarray) -> np.ndarray:
        """An annotation box (max inclusive) in crop pixels: float, end-exclusive, unclipped."""
        w, h = self.resized
        sx, sy = w / self.width, h / self.height
        left, top = self.offset
        x0, y0, x1, y1 = box[0], box[1], box[2] + 1, box[3] + 1
        return np.array([x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top])

    def crop(self, image: np.ndarray) -> np.ndarray:
        left, top = self.offset
        resized = Image.fromarray(image).resize(self.resized, Image.Resampling.BILINEAR)
        return np.asarray(resized)[top : top + CROP, left : left + CROP]


def reject_reason(width: int, height: int, boxes: np.ndarray) -> str | None:
    """Why the paper's pipeline would not use this image (None: it qualifies)."""
    if len(boxes) != 1:
        return "not exactly one box"
    geometry = CropGeometry(width, height)
    x0, y0, x1, y1 = geometry.box(boxes[0])
    inside = max(0.0, min(x1, CROP) - max(x0, 0.0)) * max(0.0, min(y1, CROP) - max(y0, 0.0))
    if inside > MAX_BOX_FRACTION * CROP * CROP:
        return "box covers > 90% of the crop"
    if inside < MIN_BOX_INSIDE * (x1 - x0) * (y1 - y0):
        return "box < 50% inside the crop"
    return None


# ----------------------------------------------------------------------------- GrabCut


def grabcut_mask(
    image: np.ndarray, bbox: np.ndarray, *, seed: int = 0, attempts: int = GRABCUT_ATTEMPTS
) -> np.ndarray:
    """uint8 {0, 1} foreground of `image` by GrabCut initialised with `bbox` (end-exclusive).

    GrabCut's GMM initialisation is random: each attempt seeds OpenCV's RNG (seed + attempt) so
    the result is reproducible; SegmentationFailed if no attempt marks >= 10% of the box.
    """
    cv2 = import_cv2()
    x0, y0, x1, y1 = (int(v) for v in bbox)
    rect = (x0, y0, x1 - x0, y1 - y0)
    image = np.ascontiguousarray(image)
    for attempt in range(attempts):
        cv2.setRNGSeed(seed + attempt)
        labels = np.zeros(image.shape[:2], np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(image, labels, rect, bgd, fgd, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_RECT)
        mask = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)
        if mask.sum() >= MIN_MASK_FRACTION * rect[2] * rect[3]:
            return mask
    raise SegmentationFailed(f"GrabCut found < 10% foreground in box {bbox} in {attempts} tries")


# ----------------------------------------------------------------------------- candidates


@dataclasses.dataclass(frozen=True)
class Candidates:
    """The qualifying images (before GrabCut) and why the others were left out."""

    images: tuple[Path, ...]
    boxes: np.ndarray  # float [N, 4], annotation coordinates
    sizes: np.ndarray  # int [N, 2], (width, height) from the annotation
    labels: np.ndarray  # int32 [N], IN-9
    imagenet_labels: np.ndarray  # int32 [N]
    rejected: dict[str, int]


def scan(train_dir: str | Path, bbox_dir: str | Path, synsets: tuple[str, ...]) -> Candidates:
    """Reads every annotation of the 370 mapped synsets (no image is decoded)."""
    train_dir = files.require_dir(train_dir, "ImageNet train images (train_dir)")
    bbox_dir = files.require_dir(bbox_dir, "ImageNet train boxes (bbox_dir)")
    mapped = sorted(in9_synsets(synsets).items(), key=lambda item: item[1])
    images, boxes, sizes, labels, imagenet_labels = [], [], [], [], []
    rejected: Counter[str] = Counter()
    for synset, (label, index) in mapped:
        image_dir = files.require_dir(train_dir / synset, f"ImageNet train class {synset}")
        xml_dir = files.require_dir(bbox_dir / synset, f"boxes of ImageNet class {synset}")
        xmls = sorted(xml_dir.glob("*.xml"))
        rejected["no box annotation"] += len(files.list_images(image_dir)) - len(xmls)
        for xml in xmls:
            width, height, found = parse_annotation(xml)
            reason = reject_reason(width, height, found)
            if reason:
                rejected[reason] += 1
                continue
            image = image_dir / f"{xml.stem}.JPEG"
            if not image.is_file():
                raise FileNotFoundError(f"image {image} of annotation {xml} does not exist")
            images.append(image)
            boxes.append(found[0])
            sizes.append((width, height))
            labels.append(label)
            imagenet_labels.append(index)
    return Candidates(
        images=tuple(images),
        boxes=np.asarray(boxes, np.float64).reshape(-1, 4),
        sizes=np.asarray(sizes, np.int64).reshape(-1, 2),
        labels=np.asarray(labels, np.int32),
        imagenet_labels=np.asarray(imagenet_labels, np.int32),
        rejected=dict(rejected),
    )


class In9lCandidates:
    """Source over the qualifying images: crop + GrabCut at `__getitem__` (slow: what `bgjax
    prepare in9l` runs once). Raises `Rejected` when GrabCut fails or the image's size differs
    from its annotation's; the builder drops and counts those by reason, as the paper did."""

    def __init__(
        self,
        train_dir: str | Path,
        bbox_dir: str | Path,
        synsets: tuple[str, ...],
        *,
        seed: int = 0,
    ):
        self.candidates = scan(train_dir, bbox_dir, synsets)
        self.seed = seed
        self.info = DatasetInfo(
            name="in9l",
            split="train",
            class_names=in9.CLASS_NAMES,
            labels=self.candidates.labels,
            image_size=CROP,
            mean=in9.MEAN,
            std=in9.STD,
        )

    def __len__(self) -> int:
        return len(self.candidates.images)

    def image_file(self, index: int) -> None:
        return None  # the stored image is the 224 crop, not the file

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        c = self.candidates
        image = files.read_rgb(c.images[index])
        width, height = c.sizes[index]
        if image.shape[:2] != (height, width):
            raise Rejected(
                "size differs from annotation",
                f"image {c.images[index]} is {image.shape[1]}x{image.shape[0]} but its "
                f"annotation says {width}x{height}",
            )
        geometry = CropGeometry(int(width), int(height))
        crop = geometry.crop(image)
        bbox = files.clip_box(geometry.box(c.boxes[index]), CROP, CROP)
        mask = grabcut_mask(crop, bbox, seed=self.seed + index * GRABCUT_ATTEMPTS)
        return dict(image=crop, mask=mask, bbox=bbox, label=c.labels[index], habitat=np.int32(-1))


# ----------------------------------------------------------------------------- IN-9 subset


def balanced_subset(labels: np.ndarray, per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted indices of `per_class` examples of every class (None: the smallest class's count)."""
    counts = np.bincount(labels, minlength=len(in9.CLASS_NAMES))
    per_class = int(counts.min()) if per_class is None else int(per_class)
    if per_class > counts.min() or per_class <= 0:
        short = in9.CLASS_NAMES[int(np.argmin(counts))]
        raise ValueError(
            f"IN-9 per_class={per_class} impossible: class {short!r} has {counts.min()} images"
        )
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
        for c in range(len(counts))
    ]
    return np.sort(np.concatenate(picks))


def make_source(config: Any, split: str):
    """The prepared IN-9L (`bgjax prepare in9l`) or its balanced IN-9 subset."""
    from bgjax.data import tfds  # imports TFDS only when asked for

    subset = config.get("subset", "in9l")
    if subset not in SUBSETS:
        raise ValueError(f"data.subset must be one of {SUBSETS}, got {subset!r}")
    source = tfds.TfdsSource("in9l", split, config.get("data_dir"))
    if subset == "in9":
        indices = balanced_subset(
            source.info.labels, config.get("per_class"), int(config.get("subset_seed", 0))
        )
        source = source.subset(indices, name="in9")
    return source
