"""Waterbirds (group DRO): CUB birds on Places backgrounds, from the release or made on the fly.

Two modes, chosen by the config:

* `root` set: the released folder, `<root>/metadata.csv` (img_id, img_filename, y, split, place,
  place_filename; split 0 train / 1 val / 2 test) with the images at `<root>/<img_filename>`.
  The release has no masks. With `cub_root` set, the mask is the CUB segmentation of the same
  bird (> 0; img_filename is the CUB relative path) and the box CUB's annotation. Without it the
  mask is all ones, the box the whole image, `source.has_masks` is False and a warning is logged:
  fine for plain classification and worst-group accuracy, meaningless for early/late masking and
  the IN-9 variants, which `bgjax train` / `bgjax eval` refuse then (`bgjax.tasks.require_masks`).
* otherwise (`cub_root` and `places_root`): generated on the fly, deterministically from `seed`,
  by the procedure of the group DRO generation script (Sagawa et al., ICLR 2020,
  github.com/kohpangwei/group_DRO `dataset_scripts/`; docs/reference.md#waterbirds):
    - a bird is a waterbird if its species name contains one of `WATERBIRD_NAMES`
      (case-insensitive substring; this keeps the standard's quirk that "Tern" also matches
      Eastern_Towhee, Western_Meadowlark and Western_Wood_Pewee; `whole_word_species=True`
      drops it);
    - test = CUB's official test images (the masking paper's Waterbirds test is built from them);
      val = a random `val_fraction` (0.2) of CUB's train images; train = the rest;
    - place (habitat, 1 = water): in train a fraction `correlation` (0.95) of the waterbirds and
      1 - correlation of the landbirds get water, rounded per class; val and test 50/50 per class;
    - each bird gets its own background from the Places pool of its habitat
      (land = bamboo_forest + forest/broadleaf, water = ocean + lake/natural), pools shuffled once;
    - `source[i]` is `composite_like_release`: the background fitted to the bird image as the
      generator does (`places.fit_background`: upscale if smaller, int() centre crop, Lanczos),
      bird and background weighted by segmentation / 255 and rounded each as the generator
      does, then (`jpeg_quality`, default 75 = PIL's default, with which the release was saved)
      encoded and decoded as JPEG; `jpeg_quality=0` keeps the lossless composite.
    What still differs from the released files: the random draws (the generator's RNGs were not
    seeded, so the release's split, places and background files come from its metadata.csv
    only: read the release with `root` to score on exactly those images) and the JPEG encoder
    (the libjpeg build of the PIL that saves, which may differ by a level here and there).
  mask = segmentation > 0, bbox = CUB's box.

Labels: `label="waterbird"` (2 classes, y; default) or `label="species"` (CUB's 200 classes, as
the masking paper evaluates CUB-trained models). habitat = place; `info.habitats` and
`info.train_group_proportions` (group = label * 2 + place, from the train split) come from the
metadata alone.

Config keys (`config.data`): name="waterbirds", root | (cub_root, places_root), segmentations
(CUB's, optional), label="waterbird" | "species", correlation=0.95, val_fraction=0.2, seed=0,
whole_word_species=False, skip_corrupt=False, jpeg_quality=75 (generated only).
Splits: "train", "val", "test".
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bgjax.data import DatasetInfo, cub
from bgjax.data import imagefiles as files
from bgjax.data.places import WATERBIRDS_HABITATS, PlacesBackgrounds, fit_background

WATERBIRD_NAMES = ("Albatross", "Auklet", "Cormorant", "Frigatebird", "Fulmar", "Gull", "Jaeger",
                   "Kittiwake", "Pelican", "Puffin", "Tern", "Gadwall", "Grebe", "Mallard",
                   "Merganser", "Guillemot", "Pacific_Loon")  # fmt: skip
CLASS_NAMES = ("landbird", "waterbird")
SPLITS = ("train", "val", "test")
LABELS = ("waterbird", "species")
METADATA_COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")

log = logging.getLogger(__name__)


def is_waterbird(species: str, whole_word: bool = False) -> bool:
    """`species` like "Black_footed_Albatross" (an optional "001." prefix is ignored)."""
    name = species.split(".", 1)[-1].lower()
    if whole_word:  # "tern" must be a whole word: Eastern_Towhee is no longer a waterbird
        return any(f"_{key.lower()}_" in f"_{name}_" for key in WATERBIRD_NAMES)
    return any(key.lower() in name for key in WATERBIRD_NAMES)


def assign_splits_and_places(
    y: np.ndarray,
    cub_is_train: np.ndarray,
    correlation: float,
    val_fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(split int8 [N] 0/1/2, place int8 [N] 0 land / 1 water) by the standard procedure."""
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [0, 1], got {correlation}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    split = np.where(cub_is_train, 0, 2).astype(np.int8)
    train = np.flatnonzero(cub_is_train)
    split[rng.choice(train, size=round(val_fraction * train.size), replace=False)] = 1
    place = np.zeros(y.shape, np.int8)
    for s in range(3):
        for label in (0, 1):
            ids = np.flatnonzero((split == s) & (y == label))
            water = (correlation if label == 1 else 1.0 - correlation) if s == 0 else 0.5
            place[rng.choice(ids, size=round(water * ids.size), replace=False)] = 1
    return split, place


def composite_like_release(
    image: np.ndarray, segmentation: np.ndarray, background: np.ndarray, jpeg_quality: int = 75
) -> np.ndarray:
    """The Waterbirds image of a bird (uint8 [H, W, 3]) with its CUB segmentation (uint8
    [H, W], a soft alpha * 255) on a Places `background`, as the group-DRO generator makes it:
    round(bird * alpha) + round(fitted background * (1 - alpha)), each rounded to uint8 on its
    own and summed in uint8; then a JPEG round trip at `jpeg_quality` (0: none)."""
    if segmentation.shape != image.shape[:2]:
        raise ValueError(
            f"segmentation {segmentation.shape} does not match the image's H x W {image.shape[:2]}"
        )
    alpha = segmentation[..., None] / 255.0
    bird = np.around(image * alpha).astype(np.uint8)
    scene = np.around(fit_background(background, *image.shape[:2]) * (1 - alpha)).astype(np.uint8)
    combined = bird + scene
    if not jpeg_quality:
        return combined
    buffer = io.BytesIO()
    Image.fromarray(combined).save(buffer, format="JPEG", quality=int(jpeg_quality))
    return np.array(Image.open(buffer).convert("RGB"))


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown Waterbirds split {split!r}; known: {SPLITS}")
    return SPLITS.index(split)


def _make_info(
    split: str,
    rows: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    places: np.ndarray,
    train_rows: np.ndarray,
    birds: np.ndarray | None = None,
) -> DatasetInfo:
    """Labels/habitats of `rows`, group proportions of `train_rows` (indices into all rows).
    `birds` (waterbird or not, all rows), given when the labels are species: the groups stay
    Waterbirds' four, so species-labelled runs report the usual group accuracies."""
    group_of = labels if birds is None else birds
    groups = group_of[train_rows].astype(np.int64) * 2 + places[train_rows]
    counts = np.bincount(groups, minlength=2 * (len(class_names) if birds is None else 2))
    extra = {}
    if birds is not None:
        extra = dict(group_labels=birds[rows].astype(np.int32), group_label_names=CLASS_NAMES)
    return DatasetInfo(
        name="waterbirds",
        split=split,
        class_names=class_names,
        labels=labels[rows].astype(np.int32),
        habitats=places[rows].astype(np.int32),
        habitat_names=WATERBIRDS_HABITATS,
        train_group_proportions=counts / max(counts.sum(), 1),
        **extra,
    )


def _check_label(label: str) -> str:
    if label not in LABELS:
        raise ValueError(f"data.label must be one of {LABELS}, got {label!r}")
    return label


class WaterbirdsRelease:
    """The released Waterbirds folder (metadata.csv); CUB segmentations as masks if available."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        cub_root: str | Path | None = None,
        segmentations: str | Path | None = None,
        label: str = "waterbird",
        skip_corrupt: bool = False,
    ):
        code, label = _split_code(split), _check_label(label)
        self.root = files.require_dir(root, "Waterbirds release (data.root)")
        table = self._read_metadata(self.root / "metadata.csv")
        filenames = table["img_filename"]
        y, splits, place = (np.asarray(table[k], np.int64) for k in ("y", "split", "place"))
        self.cub = None
        if cub_root:
            meta = cub.read_metadata(cub_root)
            self.cub = cub.CubSource(
                None, "all", segmentations=segmentations, metadata=meta, skip_corrupt=False
            )
            position = {p: i for i, p in enumerate(meta.relpaths)}
            missing = [f for f in filenames if f not in position]
            if missing:
                raise ValueError(
                    f"{self.root / 'metadata.csv'}: {len(missing)} img_filename not in CUB "
                    f"{meta.root / 'images.txt'}, e.g. {missing[0]!r}"
                )
            self._cub_index = np.array([position[f] for f in filenames], np.int64)
        else:
            log.warning(
                "Waterbirds release without cub_root: masks are all ones (source.has_masks=False)"
            )
        self.has_masks = self.cub is not None
        # What `bgjax.tasks.require_masks` tells a run that needs masks this source lacks.
        self.masks_hint = (
            None
            if self.has_masks
            else "set data.cub_root to the CUB-200-2011 folder the release was made from (its "
            "segmentations are the birds' masks)"
        )
        self._filenames = filenames
        if label == "species":
            labels, class_names = self._species_of_rows()
        else:
            labels, class_names = y, CLASS_NAMES
        rows = np.flatnonzero(splits == code)
        self.files = [self.root / filenames[r] for r in rows]
        files.require_files(self.files, f"Waterbirds {split} images")
        self.skipped: tuple[str, ...] = ()
        if skip_corrupt:
            keep, self.skipped = files.drop_corrupt(self.files, f"Waterbirds {split}")
            rows, self.files = rows[keep], [self.files[k] for k in keep]
        self.rows = rows
        self.info = _make_info(
            split, rows, labels, class_names, place, np.flatnonzero(splits == 0),
            birds=y if label == "species" else None,
        )  # fmt: skip

    @staticmethod
    def _read_metadata(path: Path) -> dict[str, list]:
        files.require_file(path, "Waterbirds metadata")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in METADATA_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"{path}: missing columns {missing}; has {reader.fieldnames}")
            rows = list(reader)
        table: dict[str, list] = {c: [row[c] for row in rows] for c in METADATA_COLUMNS}
        for column, allowed in (("y", "01"), ("place", "01"), ("split", "012")):
            bad = [(n, v) for n, v in enumerate(table[column], 2) if v.strip() not in allowed]
            if bad:
                raise ValueError(
                    f"{path}:{bad[0][0]}: column {column!r} must be one of {list(allowed)}, "
                    f"got {bad[0][1]!r}"
                )
            table[column] = [int(v) for v in table[column]]
        return table

    def species(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """(CUB species label of every example, the species names)."""
        labels, names = self._species_of_rows()
        return labels[self.rows].astype(np.int32), names

    def _species_of_rows(self) -> tuple[np.ndarray, tuple[str, ...]]:
        filenames = self._filenames
        if self.cub is not None:
            return self.cub.meta.labels[self._cub_index], self.cub.meta.class_names
        # "001.Black_footed_Albatross/..." -> label 0; names from the folders seen.
        folders = [f.split("/", 1)[0] for f in filenames]
        try:
            labels = np.array([int(d.split(".", 1)[0]) - 1 for d in folders])
        except ValueError:
            raise ValueError(
                f"label='species' needs CUB class folders 'NNN.Name' in img_filename, got "
                f"{folders[0]!r}"
            ) from None
        names = [f"class_{k + 1:03d}" for k in range(labels.max() + 1)]
        for label, folder in zip(labels, folders):
            names[label] = folder.split(".", 1)[-1]
        return labels, tuple(names)

    def __len__(self) -> int:
        return len(self.files)

    def image_file(self, index: int) -> Path:
        return self.files[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image = files.read_rgb(self.files[index])
        height, width = image.shape[:2]
        if self.cub is None:
            mask = np.ones((height, width), np.uint8)
            bbox = np.array([0, 0, width, height], np.int32)
        else:
            position = int(self._cub_index[self.rows[index]])
            seg_path = self.cub.meta.segmentation_path(self.cub.segmentations, position)
            segmentation = files.read_grey(seg_path)
            files.check_same_size(segmentation, image, str(seg_path), str(self.files[index]))
            mask = (segmentation > 0).astype(np.uint8)
            bbox = self.cub.bbox(position, height, width)
        return dict(
            image=image,
            mask=mask,
            bbox=bbox,
            label=self.info.labels[index],
            habitat=self.info.habitats[index],
        )


class WaterbirdsGenerated:
    """Waterbirds made on the fly from CUB + Places (see the module docstring)."""

    def __init__(
        self,
        cub_root: str | Path | None,
        places_root: str | Path | None,
        split: str,
        *,
        segmentations: str | Path | None = None,
        correlation: float = 0.95,
        val_fraction: float = 0.2,
        seed: int = 0,
        label: str = "waterbird",
        whole_word_species: bool = False,
        skip_corrupt: bool = False,
        jpeg_quality: int = 75,
    ):
        code, label = _split_code(split), _check_label(label)
        if not 0 <= jpeg_quality <= 95:
            raise ValueError(f"data.jpeg_quality must be 0 (no JPEG) to 95, got {jpeg_quality}")
        self.jpeg_quality = jpeg_quality
        if not cub_root:
            raise ValueError("generating Waterbirds needs data.cub_root (and data.places_root)")
        self.cub = cub.CubSource(cub_root, "all", segmentations=segmentations)
        meta = self.cub.meta
        y_of_class = np.array([is_waterbird(c, whole_word_species) for c in meta.class_names])
        y = y_of_class[meta.labels].astype(np.int64)
        rng = np.random.default_rng(seed)
        splits, place = assign_splits_and_places(y, meta.is_train, correlation, val_fraction, rng)
        places = PlacesBackgrounds(places_root)
        backgrounds = places.assign(place, rng)
        rows = np.flatnonzero(splits == code)
        self.skipped: tuple[str, ...] = ()
        if skip_corrupt:
            groups = [(*self.cub._files(r), backgrounds[r]) for r in rows]
            keep, self.skipped = files.drop_corrupt(groups, f"Waterbirds {split} (generated)")
            rows = rows[keep]
        self.rows = rows  # positions in CUB order
        self.backgrounds = [backgrounds[r] for r in rows]
        self.has_masks = True
        labels, names = (meta.labels, meta.class_names) if label == "species" else (y, CLASS_NAMES)
        self.info = _make_info(
            split, rows, labels, names, place, np.flatnonzero(splits == 0),
            birds=y if label == "species" else None,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.rows)

    def image_file(self, index: int) -> None:
        return None  # composited: there is no file to store as is

    def species(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """(CUB species label of every example, the species names)."""
        return self.cub.meta.labels[self.rows], self.cub.meta.class_names

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        position = int(self.rows[index])
        image, segmentation = self.cub.load(position)
        background = files.read_rgb(self.backgrounds[index])
        return dict(
            image=composite_like_release(image, segmentation, background, self.jpeg_quality),
            mask=(segmentation > 0).astype(np.uint8),
            bbox=self.cub.bbox(position, *image.shape[:2]),
            label=self.info.labels[index],
            habitat=self.info.habitats[index],
        )


def make_source(config: Any, split: str):
    common = dict(
        segmentations=config.get("segmentations"),
        label=config.get("label", "waterbird"),
        skip_corrupt=bool(config.get("skip_corrupt", False)),
    )
    if config.get("root"):
        return WaterbirdsRelease(
            config.get("root"), split, cub_root=config.get("cub_root"), **common
        )
    if not config.get("cub_root") or not config.get("places_root"):
        raise ValueError(
            "Waterbirds needs data.root (the released folder with metadata.csv), or "
            "data.cub_root and data.places_root to generate it"
        )
    return WaterbirdsGenerated(
        config.get("cub_root"),
        config.get("places_root"),
        split,
        correlation=float(config.get("correlation", 0.95)),
        val_fraction=float(config.get("val_fraction", 0.2)),
        seed=int(config.get("seed", 0)),
        whole_word_species=bool(config.get("whole_word_species", False)),
        jpeg_quality=int(config.get("jpeg_quality", 75)),
        **common,
    )
