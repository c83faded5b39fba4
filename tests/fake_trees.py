"""Tiny fake copies of the real datasets' published folder layouts, for the reader tests.

Every image is a noisy background with one saturated ellipse (the "object"), so masks, boxes and
GrabCut have something obvious to find. Sizes are tiny; the layouts are exact.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from bgjax import variants
from bgjax.data import in9

CUB_CLASSES = (
    "Black_footed_Albatross",
    "Herring_Gull",
    "Common_Tern",
    "Mallard",
    "Horned_Grebe",
    "Eastern_Towhee",  # a waterbird only by the standard's substring quirk ("eas-tern")
    "American_Crow",
    "Blue_Jay",
    "Cardinal",
    "Song_Sparrow",
)
PLACES_CATEGORIES = ("bamboo_forest", "forest/broadleaf", "ocean", "lake/natural")


def object_image(rng: np.random.Generator, height: int, width: int):
    """(uint8 image [H, W, 3], uint8 0/1 ellipse mask) with the ellipse well inside the frame."""
    image = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
    image[..., 1] += 60  # greenish noisy background
    cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
    ry, rx = height * rng.uniform(0.18, 0.26), width * rng.uniform(0.18, 0.26)
    yy, xx = np.mgrid[:height, :width]
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
    image[mask == 1] = (230, 40, 40) + rng.integers(0, 20, (int(mask.sum()), 3))
    return image, mask


def save(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"quality": 95} if (fmt or path.suffix.lstrip(".").upper()) in ("JPEG", "JPG") else {}
    Image.fromarray(array).save(path, format=fmt or None, **kwargs)
    return path


# ----------------------------------------------------------------------------- ImageNet-9 release


def write_in9_release(root: Path, per_class: int = 2, size: int = 32, seed: int = 0) -> Path:
    """`<root>/bg_challenge/...` with every variant; the box used for only_bg_* is the mask's box
    grown by 2 px (like an annotation box), mixed_rand files carry mixed_next-style names."""
    rng = np.random.default_rng(seed)
    base = root / "bg_challenge"
    originals = {}  # (label, k) -> (stem, image, mask, box)
    for label, class_dir in enumerate(in9.CLASS_DIRS):
        for k in range(per_class):
            stem = f"n{label:08d}_{k + 1}"
            image, mask = object_image(rng, size, size)
            x0, y0, x1, y1 = variants.bbox_from_mask(mask)
            box = (max(x0 - 2, 0), max(y0 - 2, 0), min(x1 + 2, size), min(y1 + 2, size))
            originals[label, k] = (stem, image, mask, box)
            save(base / "original/val" / class_dir / f"{stem}.JPEG", image)
            (base / "fg_mask/val" / class_dir).mkdir(parents=True, exist_ok=True)
            np.save(base / "fg_mask/val" / class_dir / f"{stem}.npy", mask)
            for name in in9.DETERMINISTIC_VARIANTS:
                out = variants.composite(name, image, mask, bbox=box)
                save(base / name / "val" / class_dir / f"{stem}.JPEG", out)
    num_classes = len(in9.CLASS_DIRS)
    for (label, k), (stem, image, mask, _) in originals.items():
        class_dir = in9.CLASS_DIRS[label]
        donors = dict(
            mixed_same=(label, (k + 1) % per_class),
            mixed_next=((label + 1) % num_classes, k),
            mixed_rand=(int(rng.integers(num_classes)), k),
        )
        for name, donor_key in donors.items():
            bg_stem, bg_image, _, bg_box = originals[donor_key]
            out = variants.composite(name, image, mask, bg_image=bg_image, bg_bbox=bg_box)
            if name == "mixed_rand":  # the release's defect: named as if it were mixed_next
                bg_stem = originals[(label + 1) % num_classes, k][0]
            save(base / name / "val" / class_dir / f"fg_{stem}_bg_{bg_stem}.JPEG", out)
    return base


# ----------------------------------------------------------------------------- CUB and Places


def write_cub(
    root: Path, classes=CUB_CLASSES, per_class: int = 4, size: int = 16, seed: int = 0
) -> Path:
    """`<root>/CUB_200_2011/...` + `<root>/segmentations/` (soft: 255 inside, 128 on a rim)."""
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    lines = {name: [] for name in ("images", "labels", "split", "boxes")}
    image_id = 0
    for c, name in enumerate(classes):
        folder = f"{c + 1:03d}.{name}"
        for k in range(per_class):
            image_id += 1
            height, width = size, size + 4 * (k % 2)  # some non-square images
            image, mask = object_image(rng, height, width)
            rel = f"{folder}/{name}_{k:04d}_{image_id}.jpg"
            save(base / "images" / rel, image)
            rim = np.zeros_like(mask)
            rim[:-1] |= mask[1:]
            rim[1:] |= mask[:-1]
            segmentation = np.where(mask == 1, 255, np.where(rim == 1, 128, 0)).astype(np.uint8)
            save(root / "segmentations" / Path(rel).with_suffix(".png"), segmentation)
            x0, y0, x1, y1 = variants.bbox_from_mask(mask)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c + 1}")
            lines["split"].append(f"{image_id} {int(k % 2 == 0)}")
            lines["boxes"].append(f"{image_id} {x0}.0 {y0}.0 {x1 - x0}.0 {y1 - y0}.0")
    files = dict(
        images="images.txt",
        labels="image_class_labels.txt",
        split="train_test_split.txt",
        boxes="bounding_boxes.txt",
    )
    for key, filename in files.items():
        (base / filename).write_text("\n".join(lines[key]) + "\n")
    (base / "classes.txt").write_text(
        "".join(f"{c + 1} {c + 1:03d}.{name}\n" for c, name in enumerate(classes))
    )
    return base


def write_places(root: Path, per_category: int = 3, size: int = 12, seed: int = 0) -> Path:
    """Places categories; "ocean" in the Places365 letter layout (o/ocean) to test that path."""
    rng = np.random.default_rng(seed)
    for category in PLACES_CATEGORIES:
        folder = root / ("o/ocean" if category == "ocean" else category)
        for k in range(per_category):
            save(folder / f"{k:08d}.jpg", rng.integers(0, 255, (size, size + 2, 3), np.uint8))
    return root


def write_waterbirds_release(root: Path, cub_base: Path, seed: int = 0) -> Path:
    """A release folder whose img_filename are the fake CUB's relative paths."""
    rng = np.random.default_rng(seed)
    relpaths = [line.split()[1] for line in (cub_base / "images.txt").read_text().splitlines()]
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        for i, rel in enumerate(relpaths):
            image = np.asarray(Image.open(cub_base / "images" / rel))
            save(root / rel, image)
            water = any(k in rel for k in ("Albatross", "Gull", "Tern", "Mallard", "Grebe"))
            writer.writerow([i + 1, rel, int(water), i % 3, int(rng.integers(2)), "/o/ocean/x.jpg"])
    return root


# ----------------------------------------------------------------------------- ImageNet train


def fake_synsets() -> list[str]:
    return [f"n{9000000 + i:08d}" for i in range(1000)]


def _annotation(width: int, height: int, boxes) -> str:
    objects = "".join(
        f"<object><name>x</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes
    )
    return (
        f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth>"
        f"</size>{objects}</annotation>"
    )


def write_imagenet(root: Path, per_class: int = 2, seed: int = 0) -> dict:
    """`train/<synset>/`, `bbox/<synset>/` for the 370 synsets IN-9 maps (most empty) and a
    LOC_synset_mapping.txt of 1000 fake synsets. Per IN-9 class one synset gets `per_class`
    qualifying images, plus (class 0 only) one with two boxes, one whose box fills the image and
    one without annotation. Returns the ground-truth masks of the qualifying images by path."""
    rng = np.random.default_rng(seed)
    synsets = fake_synsets()
    root.mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{s} thing {i}\n" for i, s in enumerate(synsets))
    )
    table = in9.imagenet_to_in9()
    first_of_class = {}
    for index in np.flatnonzero(table >= 0):
        synset = synsets[index]
        (root / "train" / synset).mkdir(parents=True)
        (root / "bbox" / synset).mkdir(parents=True)
        first_of_class.setdefault(int(table[index]), synset)
    truth = {}
    for label, synset in first_of_class.items():
        for k in range(per_class + (3 if label == 0 else 0)):
            height, width = 64, 80
            image, mask = object_image(rng, height, width)
            path = save(root / "train" / synset / f"{synset}_{k}.JPEG", image)
            x0, y0, x1, y1 = variants.bbox_from_mask(mask)
            boxes = [(x0, y0, x1 - 1, y1 - 1)]  # ImageNet's max is inclusive
            if k == per_class:
                boxes.append((0, 0, 5, 5))
            elif k == per_class + 1:
                boxes = [(0, 0, width - 1, height - 1)]
            elif k == per_class + 2:
                continue  # no annotation
            else:
                truth[path] = mask
            xml = root / "bbox" / synset / f"{synset}_{k}.xml"
            xml.write_text(_annotation(width, height, boxes))
    return truth
