"""ImageNet-9 (the "Noise or Signal" backgrounds challenge release), read from the user's disk.

The release (`bg_challenge/`) has one folder per variant and the foreground masks:

    <root>/<variant>/val/<class_dir>/<file>.JPEG      class_dir e.g. "02_wheeled vehicle"
    <root>/fg_mask/val/<class_dir>/<stem>.npy         2-D 0/1 mask of original/<stem>.JPEG

Mixed files are named `fg_<synset>_<num>_bg_<bgsynset>_<bgnum>.JPEG`; their foreground is the
original `<synset>_<num>` (same class folder), so its mask is `fg_mask/.../<synset>_<num>.npy`.

What a `source[i]` of variant v is:
  * image: the released v image.
  * mask: the foreground mask of the image's FOREGROUND original (for only_bg_* the silhouette
    of the object that was removed, for mixed_* the pasted foreground): always where the object
    is or was, so early/late masking and the regenerated variants are defined for every variant.
  * bbox: the mask's tight box (`box_source="mask"`, default) or the box recovered from the
    released only_bg_b image (`box_source="only_bg_b"`, the black rectangle = the annotation box
    the release used for only_bg_b/only_bg_t; one more JPEG decode per example).
  * habitat: -1. The background class is not trustworthy across the release: `mixed_rand` files
    carry `mixed_next`-style names (a known defect), so `source.bg_stems[i]` is None there and the
    `<bgsynset>_<bgnum>` of the name elsewhere.

Two uses: (a) score the released files of every variant (`variants_from="released"`, the
default: `source.variant_input(v)` is the In9Source of v's folder, fed to the pipeline as
"original"), as the paper's BG-gap is defined on them; (b) `variants_from="regenerated"`: the
original (image, mask) pairs, from which the Grain pipeline regenerates every variant with
bgjax's own partners and boxes. `consistency_report` measures how close (b) comes to (a) for
the deterministic variants (`bgjax prepare in9 --check`). Scoring released files reads no mask:
without a `fg_mask` folder the source has `has_masks=False` (all-ones masks), which suffices
unless the model masks or the variants are regenerated (`tasks.require_masks` refuses those).

Rows of every released variant are in the order of their foreground original (class, then the
original's file name), so row i of each variant is the same foreground (the bucket table needs
that alignment; `foreground_ids` lets a caller check it).

Config keys (`config.data`): name="in9", root (the bg_challenge folder, or a folder containing
it), variant="original", variants_from="released" | "regenerated", box_source="mask" |
"only_bg_b", skip_corrupt=False. Only split "val" exists. Labels follow the sorted class
folders; normalisation is the IN-9 mean/std.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bgjax import variants
from bgjax.data import DatasetInfo
from bgjax.data import imagefiles as files

CLASS_DIRS = (
    "00_dog",
    "01_bird",
    "02_wheeled vehicle",
    "03_reptile",
    "04_carnivore",
    "05_insect",
    "06_musical instrument",
    "07_primate",
    "08_fish",
)
CLASS_NAMES = tuple(d.split("_", 1)[1] for d in CLASS_DIRS)
SPLITS = ("val",)
MASK_DIR = "fg_mask"
DETERMINISTIC_VARIANTS = ("only_bg_b", "only_bg_t", "no_fg", "only_fg")
BOX_SOURCES = ("mask", "only_bg_b")
VARIANTS_FROM = ("released", "regenerated")
# Normalisation of IN-9-trained models (docs/reference.md#in9-normalisation); ImageNet models use
# DatasetInfo's default.
MEAN = (0.4717, 0.4499, 0.3837)
STD = (0.2600, 0.2516, 0.2575)

# ImageNet-1k class index -> IN-9 class (inclusive ranges), as in the evaluation code of
# github.com/MadryLab/backgrounds_challenge (docs/reference.md#in9-class-mapping).
# fmt: off
_IMAGENET_RANGES: dict[str, Sequence[int | tuple[int, int]]] = {
    "dog": [(151, 170), (173, 268)],  # 151-268 except 171, 172
    "bird": [(7, 24), (87, 100), (127, 146)],
    "wheeled vehicle": [407, 408, 428, 436, 444, 468, 511, 547, 555, 561, 565, 569, 573, 586, 603,
                        609, 612, 627, 656, 661, 665, 670, 671, 675, 690, 705, 717, 734, 751, 757,
                        791, 802, 803, 817, 820, 829, 847, 864, 866, 867, 870, 880],
    "reptile": [(33, 68)],
    "carnivore": [(269, 280), (286, 299), (356, 362), (387, 388)],
    "insect": [(300, 326)],
    "musical instrument": [401, 402, 420, 432, 486, 494, 513, 541, 546, 558, 566, 577, 579, 593,
                           594, 641, 642, 683, 684, 687, 699, 776, 822, 875, 881, 889],
    "primate": [(365, 384)],
    "fish": [(0, 6), (389, 397)],
}
# fmt: on

_MIXED_NAME = re.compile(r"^fg_(?P<fg>.+?)_bg_(?P<bg>.+)$")
log = logging.getLogger(__name__)


def imagenet_to_in9() -> np.ndarray:
    """int32 [1000]: the IN-9 label of each ImageNet-1k class index, -1 for the 630 unmapped."""
    table = np.full(1000, -1, np.int32)
    for label, name in enumerate(CLASS_NAMES):
        for item in _IMAGENET_RANGES[name]:
            lo, hi = item if isinstance(item, tuple) else (item, item)
            table[lo : hi + 1] = label
    return table


def split_mixed_name(stem: str) -> tuple[str, str | None]:
    """(foreground stem, background stem or None) of a released file stem."""
    match = _MIXED_NAME.match(stem)
    return (match["fg"], match["bg"]) if match else (stem, None)


def resolve_root(root: str | Path | None) -> Path:
    if not root:
        raise ValueError("data.root must name the ImageNet-9 release folder (bg_challenge)")
    root = files.require_dir(root, "ImageNet-9 release (data.root)")
    return root / "bg_challenge" if (root / "bg_challenge").is_dir() else root


def recover_box(only_bg_b: np.ndarray, mask: np.ndarray, dark: int = 40) -> np.ndarray:
    """The black rectangle of a released ONLY_BG_B image: the annotation box it blacked out.

    Starts from the mask's box (always inside the annotation box) and grows each side while the
    next row/column over the current span is mostly (>= 90%) dark; JPEG ringing keeps the border
    pixels of the rectangle from being exactly black, hence the `dark` threshold.
    """
    is_dark = only_bg_b.max(axis=-1) <= dark
    height, width = is_dark.shape
    x0, y0, x1, y1 = variants.bbox_from_mask(mask)
    grown = True
    while grown:
        grown = False
        if x0 > 0 and is_dark[y0:y1, x0 - 1].mean() >= 0.9:
            x0, grown = x0 - 1, True
        if x1 < width and is_dark[y0:y1, x1].mean() >= 0.9:
            x1, grown = x1 + 1, True
        if y0 > 0 and is_dark[y0 - 1, x0:x1].mean() >= 0.9:
            y0, grown = y0 - 1, True
        if y1 < height and is_dark[y1, x0:x1].mean() >= 0.9:
            y1, grown = y1 + 1, True
    return np.array([x0, y0, x1, y1], np.int32)


class In9Source:
    """One released variant of ImageNet-9 `val`, with the foreground masks when the release has
    its `fg_mask` folder (see module docstring)."""

    def __init__(
        self,
        root: str | Path,
        variant: str = "original",
        *,
        box_source: str = "mask",
        skip_corrupt: bool = False,
        variants_from: str = "released",
    ):
        if variant not in variants.VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; released: {variants.VARIANTS}")
        if box_source not in BOX_SOURCES:
            raise ValueError(f"box_source must be one of {BOX_SOURCES}, got {box_source!r}")
        if variants_from not in VARIANTS_FROM:
            raise ValueError(
                f"data.variants_from must be one of {VARIANTS_FROM}, got {variants_from!r}"
            )
        self.root = resolve_root(root)
        self.variant, self.box_source, self.variants_from = variant, box_source, variants_from
        self._options = dict(box_source=box_source, skip_corrupt=skip_corrupt)
        self._variant_sources: dict[str, In9Source] = {}
        # Released files of every variant are read as they are: no variant is composited here.
        self.released_variants = variants.VARIANTS if variants_from == "released" else ()
        image_root = files.require_dir(self.root / variant / "val", f"IN-9 variant {variant!r}")
        mask_root = self.root / MASK_DIR / "val"
        self.has_masks = mask_root.is_dir()
        self.masks_hint = f"add the release's {MASK_DIR}/ folder under {self.root}"
        if box_source == "only_bg_b":
            files.require_dir(mask_root, "IN-9 foreground masks (box_source='only_bg_b')")
            files.require_dir(self.root / "only_bg_b" / "val", "IN-9 only_bg_b (box_source)")
        rows = []  # (label, foreground file name, path, background stem)
        for label, class_dir in enumerate(CLASS_DIRS):
            class_images = files.list_images(
                files.require_dir(image_root / class_dir, f"IN-9 class {class_dir!r}")
            )
            for path in class_images:
                fg, bg = split_mixed_name(path.stem)
                # The release's mixed_rand names follow mixed_next's pattern: not a bg identity.
                rows.append(
                    (label, f"{fg}{path.suffix}", path, None if variant == "mixed_rand" else bg)
                )
        if not rows:
            raise ValueError(f"no images under {image_root}")
        # Foreground order, so row i of every released variant shows the same object.
        rows.sort(key=lambda row: row[:2])
        images = [row[2] for row in rows]
        masks = [mask_root / CLASS_DIRS[row[0]] / f"{Path(row[1]).stem}.npy" for row in rows]
        if self.has_masks:
            files.require_files(masks, f"foreground masks of IN-9 {variant!r} images")
        keep, self.skipped = np.arange(len(images)), ()
        if skip_corrupt:
            keep, self.skipped = files.drop_corrupt(images, f"IN-9 {variant}")
        self.images = [images[i] for i in keep]
        self.masks = [masks[i] for i in keep]
        self.bg_stems = [rows[i][3] for i in keep]
        self.foreground_ids = [f"{CLASS_DIRS[rows[i][0]]}/{Path(rows[i][1]).stem}" for i in keep]
        # The synset of a file name gives its class (a background stem names its synset too).
        self._synset_label = {row[1].split("_")[0]: row[0] for row in rows}
        with Image.open(self.images[0]) as first:  # header only; the release is uniform 224 px
            width, height = first.size
        self.info = DatasetInfo(
            name="in9",
            split="val",
            class_names=CLASS_NAMES,
            labels=np.asarray([row[0] for row in rows], np.int32)[keep],
            image_size=width if width == height else None,
            mean=MEAN,
            std=STD,
        )

    def __len__(self) -> int:
        return len(self.images)

    def image_file(self, index: int) -> Path:
        return self.images[index]

    def variant_input(self, variant: str) -> tuple[In9Source, str]:
        """(source, pipeline variant) that gives `variant`: its released folder read as it is,
        or, with variants_from="regenerated", this source composited by the pipeline."""
        if self.variants_from == "regenerated":
            return self, variant
        if variant == self.variant:
            return self, "original"
        if variant not in self._variant_sources:
            self._variant_sources[variant] = In9Source(self.root, variant, **self._options)
        return self._variant_sources[variant], "original"

    def background(self, index: int) -> tuple[str | None, int]:
        """(file of the original whose background a released mixed image shows, its class), or
        (None, -1) where the release does not say (mixed_rand's names; unmixed variants)."""
        stem = self.bg_stems[index]
        if stem is None:
            return None, -1
        label = self._synset_label.get(stem.split("_")[0], -1)
        if label < 0:
            return None, -1
        folder = self.root / "original" / "val" / CLASS_DIRS[label]
        return str(folder / f"{stem}{self.images[index].suffix}"), label

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image = files.read_rgb(self.images[index])
        if self.has_masks:
            mask = files.read_npy_mask(self.masks[index])
            files.check_same_size(mask, image, str(self.masks[index]), str(self.images[index]))
            if not mask.any():
                raise ValueError(f"mask {self.masks[index]} has no foreground pixel")
        else:  # released files need no mask; `require_masks` refuses the uses that do
            mask = np.ones(image.shape[:2], np.uint8)
        if self.box_source == "only_bg_b":
            bbox = recover_box(files.read_rgb(self._only_bg_b_file(index)), mask)
        else:
            bbox = np.asarray(variants.bbox_from_mask(mask), np.int32)
        return dict(
            image=image,
            mask=mask,
            bbox=bbox,
            label=self.info.labels[index],
            habitat=np.int32(-1),
        )

    def _only_bg_b_file(self, index: int) -> Path:
        path = self.images[index]
        fg, _ = split_mixed_name(path.stem)
        return self.root / "only_bg_b" / "val" / path.parent.name / f"{fg}{path.suffix}"

    def __repr__(self) -> str:
        return f"In9Source({self.root}, variant={self.variant!r}, n={len(self)})"


def make_source(config: Any, split: str) -> In9Source:
    if split not in SPLITS:
        raise ValueError(f"ImageNet-9 has only the split 'val', got {split!r}")
    return In9Source(
        config.get("root"),
        config.get("variant", "original") or "original",
        box_source=config.get("box_source", "mask"),
        skip_corrupt=bool(config.get("skip_corrupt", False)),
        variants_from=config.get("variants_from", "released") or "released",
    )


# ----------------------------------------------------------------------------- consistency report


def consistency_report(
    root: str | Path,
    n: int = 100,
    *,
    seed: int = 0,
    box_source: str = "mask",
    tolerance: int = 8,
    variant_names: Sequence[str] = DETERMINISTIC_VARIANTS,
) -> dict[str, dict[str, float]]:
    """Regenerated (from original + fg_mask) vs released images, per deterministic variant.

    For `n` originals drawn with `seed`: mean absolute pixel difference (0..255), PSNR in dB
    (from the pooled MSE), the fraction of pixels whose largest channel difference is within
    `tolerance` (JPEG noise), the count compared and the count whose released file is missing.
    """
    source = In9Source(root, "original", box_source=box_source, variants_from="regenerated")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(source), size=min(n, len(source)), replace=False)
    sums = {v: dict(abs=0.0, sq=0.0, within=0.0, pixels=0, n=0, missing=0) for v in variant_names}
    for index in np.sort(picks):
        example = source[index]
        path = source.image_file(index)
        for name in variant_names:
            released_path = source.root / name / "val" / path.parent.name / path.name
            acc = sums[name]
            if not released_path.is_file():
                acc["missing"] += 1
                continue
            released = files.read_rgb(released_path).astype(np.int16)
            ours = variants.composite(name, example["image"], example["mask"], bbox=example["bbox"])
            if released.shape != ours.shape:
                raise ValueError(
                    f"{released_path} has shape {released.shape}, its original {path} "
                    f"has {ours.shape}"
                )
            diff = np.abs(released - ours)
            acc["abs"] += float(diff.sum())
            acc["sq"] += float(np.square(diff, dtype=np.float64).sum())
            acc["within"] += float((diff.max(axis=-1) <= tolerance).sum())
            acc["pixels"] += diff.shape[0] * diff.shape[1]
            acc["n"] += 1
    report = {}
    for name, acc in sums.items():
        values = acc["pixels"] * 3
        mse = acc["sq"] / values if values else float("nan")
        report[name] = dict(
            n=acc["n"],
            missing=acc["missing"],
            mean_abs_diff=acc["abs"] / values if values else float("nan"),
            psnr=float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse),
            frac_within_tolerance=acc["within"] / acc["pixels"] if values else float("nan"),
        )
    return report


def format_report(report: dict[str, dict[str, float]], tolerance: int = 8) -> str:
    lines = [
        f"{'variant':<10} {'n':>5} {'missing':>7} {'mean|diff|':>10} {'PSNR dB':>8} "
        f"{f'within {tolerance}':>10}"
    ]
    for name, r in report.items():
        lines.append(
            f"{name:<10} {r['n']:>5} {r['missing']:>7} {r['mean_abs_diff']:>10.2f} "
            f"{r['psnr']:>8.2f} {r['frac_within_tolerance']:>10.3f}"
        )
    return "\n".join(lines)
