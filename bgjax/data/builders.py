"""Writing the real datasets as TFDS datasets (array_record) without TensorFlow: `bgjax prepare`.

One `GeneratorBasedBuilder` per dataset runs the folder reader of that dataset (`in9`, `in9l`,
`cub`, `waterbirds`) over the user's files and stores every example with images and masks as
ENCODED bytes (TFDS encodes numpy images only with TensorFlow; given bytes it stores them as they
are). Unchanged RGB JPEG/PNG files are stored byte for byte; made images (IN-9L crops, generated
Waterbirds) as JPEG q95; masks as PNG. Records keep the reader's order (`disable_shuffling`), so
record i is the reader's example i minus the skipped ones. The builders are never registered
with TFDS (`skip_registration`): reading needs only the files (`bgjax.data.tfds`).

Every record: image, mask (0/1 PNG [H, W, 1]), bbox int32 (x0, y0, x1, y1) end-exclusive, label
(ClassLabel), file_name (the source image's path; "" for generated Waterbirds). Per dataset:

    in9          splits "val" (original) and "val_<variant>" for each released variant found
    in9l         split "train"; + imagenet_label
    cub          splits "train", "test"; + alpha (the soft segmentation, 0..255)
    waterbirds   splits "train", "val", "test"; + habitat (ClassLabel land/water), species

Skipped examples (GrabCut failures and size mismatches of IN-9L, corrupt files with
skip_corrupt) are counted per reason, printed, and saved in the dataset's metadata.json, with
the ClassLabel values of every record (the reader's `info.labels` without parsing records).
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bgjax import variants
from bgjax.data import cub, in9, in9l, waterbirds
from bgjax.data import imagefiles as files
from bgjax.data.tfds import NAMES

log = logging.getLogger(__name__)
_CLASS_FEATURES = ("label", "habitat", "species")


# ----------------------------------------------------------------------------- encoding (workers)


def _encode(source, extras: Callable | None, index: int) -> tuple[str, Any]:
    """("ok", record) | ("corrupt", message) | ("rejected", reason) for example `index`."""
    try:
        example = source[index]
    except files.CorruptImageError as e:
        return "corrupt", str(e)
    except in9l.Rejected as e:
        return "rejected", e.reason
    path = source.image_file(index)
    raw = files.file_bytes_if_rgb(path) if path is not None else None
    record = dict(
        image=raw if raw is not None else files.encode(example["image"], "JPEG"),
        mask=files.encode(example["mask"]),
        bbox=np.asarray(example["bbox"], np.int32),
        label=int(example["label"]),
        file_name=str(path) if path is not None else "",
    )
    if extras is not None:
        record.update(extras(source, index, example))
    return "ok", (record, example["image"].shape[:2])


_WORKER: tuple | None = None


def _init_worker(source, extras) -> None:
    global _WORKER
    _WORKER = (source, extras)


def _encode_in_worker(index: int):
    return _encode(*_WORKER, index)


# ----------------------------------------------------------------------------- builders


def _features(class_names, **extra) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        dict(
            image=tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            mask=tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            bbox=tfds.features.Tensor(shape=(4,), dtype=np.int32),
            label=tfds.features.ClassLabel(names=list(class_names)),
            file_name=tfds.features.Text(),
            **extra,
        )
    )


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of builders defined outside the TFDS package (ours, and tests' fakes)."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 derives this through the `importlib_resources` backport, which it only
        # installs on Python < 3.9 (ModuleNotFoundError on download_and_prepare otherwise).
        return epath.Path(__file__)


class _Builder(LocalBuilder, skip_registration=True):
    """Runs a folder reader per split and writes its examples (see the module docstring).

    Subclasses define `make_sources()` -> {tfds split: source}, `class_names()`,
    `extra_features()` and the picklable `extras(source, index, example)` -> extra fields.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Written by `bgjax prepare`."}
    extras: Callable | None = None

    def __init__(
        self,
        *,
        manual_dir: str | Path,
        options: Mapping[str, Any] | None = None,
        num_workers: int = 0,
        skip_corrupt: bool = False,
        **kwargs,
    ):
        self.manual = files.require_dir(manual_dir, f"{self.name} source files (--manual_dir)")
        self.options = dict(options or {})
        self.num_workers, self.skip_corrupt = num_workers, skip_corrupt
        self.stats: dict[str, dict[str, Any]] = {}
        self.sources = self.make_sources()
        super().__init__(**kwargs)

    def make_sources(self) -> dict[str, Any]:
        raise NotImplementedError

    def class_names(self) -> tuple[str, ...]:
        return next(iter(self.sources.values())).info.class_names

    def extra_features(self) -> dict[str, Any]:
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.name}, written by `bgjax prepare` from {self.manual}",
            features=_features(self.class_names(), **self.extra_features()),
            disable_shuffling=True,  # record i = the reader's i-th kept example
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the sources were built from manual_dir in __init__
        return {split: self._generate_examples(split, src) for split, src in self.sources.items()}

    def _results(self, source):
        extras = type(self).extras
        indices = range(len(source))
        if self.num_workers <= 1:
            yield from (_encode(source, extras, i) for i in indices)
            return
        with concurrent.futures.ProcessPoolExecutor(
            self.num_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(source, extras),
        ) as pool:
            yield from pool.map(_encode_in_worker, indices, chunksize=16)

    def _generate_examples(self, split: str, source):
        written, skipped_corrupt, rejected, sizes = 0, [], Counter(), set()
        class_labels = {key: [] for key in _CLASS_FEATURES if key in self.info.features}
        for index, (status, payload) in enumerate(self._results(source)):
            if status == "corrupt":
                if not self.skip_corrupt:
                    raise files.CorruptImageError(payload)
                skipped_corrupt.append(payload)
                continue
            if status == "rejected":
                rejected[payload] += 1
                continue
            record, size = payload
            sizes.add(tuple(size))
            for key, values in class_labels.items():
                values.append(int(record[key]))
            written += 1
            yield index, record
        self.stats[split] = dict(
            written=written,
            skipped_corrupt=len(skipped_corrupt),
            corrupt_files=skipped_corrupt,
            rejected=dict(rejected),
            **getattr(source, "prepare_notes", {}),
        )
        for what in skipped_corrupt:
            log.warning("%s/%s: skipped %s", self.name, split, what)
        square = [h for h, w in sizes if h == w]
        self.info.metadata[split] = self.stats[split]
        self.info.metadata.setdefault("image_size", {})[split] = (
            square[0] if len(sizes) == 1 and square else None
        )
        # Records are in generation order, so these are the labels of records 0, 1, ...: the
        # reader takes them from here instead of parsing every record (~0.2 ms each).
        self.info.metadata.setdefault("class_labels", {})[split] = class_labels


class In9(_Builder, skip_registration=True):
    """The ImageNet-9 release; `options`: variants (default: all found), box_source."""

    def make_sources(self):
        root = in9.resolve_root(self.manual)
        wanted = self.options.get("variants") or [
            v for v in variants.VARIANTS if (root / v / "val").is_dir()
        ]
        box_source = self.options.get("box_source", "mask")
        return {
            "val" if v == "original" else f"val_{v}": in9.In9Source(root, v, box_source=box_source)
            for v in wanted
        }


class In9l(_Builder, skip_registration=True):
    """IN-9L from ImageNet train; `options`: train_dir, bbox_dir (default <manual>/train and
    <manual>/bbox, or Kaggle's <manual>/ILSVRC/{Data,Annotations}/CLS-LOC/train), synsets
    (default <manual>/LOC_synset_mapping.txt, else timm's list), seed."""

    def make_sources(self):
        options, manual = self.options, self.manual

        def default(*candidates: Path) -> Path:
            return next((c for c in candidates if c.is_dir()), candidates[0])

        kaggle = manual / "ILSVRC"
        source = in9l.In9lCandidates(
            options.get("train_dir") or default(manual / "train", kaggle / "Data/CLS-LOC/train"),
            options.get("bbox_dir")
            or default(manual / "bbox", kaggle / "Annotations/CLS-LOC/train"),
            in9l.find_synsets(options.get("synsets"), manual),
            seed=int(options.get("seed", 0)),
        )
        source.prepare_notes = dict(not_qualifying=source.candidates.rejected)
        return {"train": source}

    def extra_features(self):
        return dict(imagenet_label=tfds.features.Tensor(shape=(), dtype=np.int32))

    @staticmethod
    def extras(source, index, example):
        del example
        candidates = source.candidates
        return dict(
            imagenet_label=np.int32(candidates.imagenet_labels[index]),
            file_name=str(candidates.images[index]),  # the stored image is its 224 crop
        )


class Cub(_Builder, skip_registration=True):
    """CUB-200-2011 folder; `options`: segmentations, mask_from."""

    def make_sources(self):
        meta = cub.read_metadata(self.manual)
        return {
            split: cub.CubSource(
                None,
                split,
                metadata=meta,
                segmentations=self.options.get("segmentations"),
                mask_from=self.options.get("mask_from", "segmentation"),
            )
            for split in ("train", "test")
        }

    def extra_features(self):
        if next(iter(self.sources.values())).segmentations is None:
            return {}
        return dict(alpha=tfds.features.Image(shape=(None, None, 1), encoding_format="png"))

    @staticmethod
    def extras(source, index, example):
        del example
        if source.segmentations is None:
            return {}
        _, segmentation = source.load(index)  # second decode: the example keeps only mask > 0
        return dict(alpha=files.encode(segmentation))


class Waterbirds(_Builder, skip_registration=True):
    """Waterbirds: the release when manual_dir has metadata.csv (options: cub_root for masks),
    else generated with manual_dir as the CUB root (options: places_root, correlation,
    val_fraction, seed, segmentations, whole_word_species)."""

    def make_sources(self):
        config = dict(self.options, label="waterbird")
        if (self.manual / "metadata.csv").is_file():
            config["root"] = self.manual
        else:
            config.setdefault("cub_root", self.manual)
        return {split: waterbirds.make_source(config, split) for split in waterbirds.SPLITS}

    def extra_features(self):
        _, species_names = next(iter(self.sources.values())).species()
        return dict(
            habitat=tfds.features.ClassLabel(names=list(waterbirds.WATERBIRDS_HABITATS)),
            species=tfds.features.ClassLabel(names=list(species_names)),
        )

    @staticmethod
    def extras(source, index, example):
        species, _ = source.species()
        return dict(habitat=int(example["habitat"]), species=int(species[index]))


BUILDERS: dict[str, type[_Builder]] = {
    "in9": In9,
    "in9l": In9l,
    "cub": Cub,
    "waterbirds": Waterbirds,
}


def prepare(
    name: str,
    manual_dir: str | Path,
    data_dir: str | Path,
    *,
    options: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    skip_corrupt: bool = False,
    overwrite: bool = False,
) -> dict[str, dict[str, Any]]:
    """Writes dataset `name` from `manual_dir` into `data_dir`; returns per-split statistics."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; bgjax prepare knows {NAMES}")
    builder = BUILDERS[name](
        manual_dir=manual_dir,
        options=options,
        num_workers=num_workers,
        skip_corrupt=skip_corrupt,
        data_dir=str(data_dir),
        file_format="array_record",
    )
    mode = tfds.download.GenerateMode
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual_dir),
            download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS,
        )
    )
    return builder.stats
