"""Reading prepared TFDS datasets (array_record) as bgjax sources, without TensorFlow.

`TfdsSource(name, split, data_dir)` turns a dataset written by `bgjax prepare`
(`bgjax.data.builders`: in9, in9l, cub, waterbirds) or TFDS's own `caltech_birds2011` (image,
label, bbox as BBoxFeature, segmentation_mask) into a bgjax source. Images and masks are stored
encoded and decoded here with PIL; labels come from the metadata `bgjax prepare` saved, so
building a source decodes no image.

Registered as "tfds"; config keys: tfds_name, data_dir, label_key="label" (e.g. "species" for
Waterbirds' 200-way labels), variant="original" (IN-9: reads split "<split>_<variant>").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from bgjax import variants
from bgjax.data import DatasetInfo, in9
from bgjax.data import imagefiles as files

# The datasets `bgjax prepare` writes (bgjax.data.builders.BUILDERS).
NAMES = ("in9", "in9l", "cub", "waterbirds")
_LABEL_READ_CHUNK = 1024
_IMAGE_FEATURES = ("image", "mask", "alpha", "segmentation_mask")


def find_prepared(name: str, data_dir: str | Path | None) -> Path:
    """The folder of the newest prepared version of `name`, with clear errors when there is none."""
    hint = (
        f"write it with `bgjax prepare {name} --manual_dir SRC --data_dir DIR`"
        if name in NAMES
        else f"prepare it with TFDS in array_record format (`tfds build {name} "
        f"--file_format=array_record`, which needs TensorFlow)"
    )
    if not data_dir:
        raise ValueError(f"data.data_dir must name the TFDS data dir holding {name!r}; {hint}")
    base = Path(data_dir) / name
    infos = sorted(base.glob("*/dataset_info.json")) + sorted(base.glob("*/*/dataset_info.json"))
    if not infos:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {data_dir} "
            f"(no {base}/<version>/dataset_info.json); {hint}"
        )
    folder = infos[-1].parent
    if not any(folder.glob("*.array_record*")):
        raise ValueError(
            f"TFDS dataset {name!r} in {folder} has no array_record files (another file format?); "
            f"random access needs array_record: {hint}"
        )
    return folder


def _is_bbox_feature(feature) -> bool:
    return isinstance(feature, tfds.features.BBoxFeature)


class TfdsSource:
    """A prepared TFDS dataset as a bgjax source (see the module docstring)."""

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | Path | None,
        *,
        label_key: str = "label",
        variant: str | None = None,
    ):
        folder = find_prepared(name, data_dir)
        builder = tfds.builder_from_directory(str(folder))
        features = builder.info.features
        tfds_split = split if variant in (None, "original") else f"{split}_{variant}"
        if tfds_split not in builder.info.splits:
            raise ValueError(
                f"TFDS dataset {name!r} in {folder} has no split {tfds_split!r}; "
                f"it has {sorted(builder.info.splits)}"
            )
        if label_key not in features or not isinstance(
            features[label_key], tfds.features.ClassLabel
        ):
            raise ValueError(f"TFDS dataset {name!r} has no ClassLabel feature {label_key!r}")
        self.name, self.split, self.tfds_split, self.folder = name, split, tfds_split, folder
        self._num_records = {k: v.num_examples for k, v in builder.info.splits.items()}
        self.data_dir, self.label_key = str(data_dir), label_key
        self.mask_key = next(
            (k for k in ("mask", "segmentation_mask", "alpha") if k in features), None
        )
        self.bbox_is_normalised = "bbox" in features and _is_bbox_feature(features["bbox"])
        self.has_habitats = "habitat" in features
        self._indices: np.ndarray | None = None
        self._ds = None
        labels, habitats = self._read_labels(tfds_split)
        habitat_names = None
        proportions = None
        if self.has_habitats:
            habitat_names = tuple(features["habitat"].names)
            if "train" in builder.info.splits:
                train_labels, train_habitats = self._read_labels("train")
                groups = train_labels.astype(np.int64) * len(habitat_names) + train_habitats
                counts = np.bincount(
                    groups, minlength=features[label_key].num_classes * len(habitat_names)
                )
                proportions = counts / max(counts.sum(), 1)
        uniform = _metadata(folder).get("image_size", {}).get(tfds_split)
        stats = in9 if name in ("in9", "in9l") else None
        self.info = DatasetInfo(
            name=name,
            split=split,
            class_names=tuple(features[label_key].names),
            labels=labels,
            habitats=habitats if self.has_habitats else None,
            habitat_names=habitat_names,
            image_size=uniform,
            train_group_proportions=proportions,
            **(dict(mean=stats.MEAN, std=stats.STD) if stats else {}),
        )

    def _open(self, split: str):
        """An array_record data source of `split` whose images stay encoded bytes: they are
        decoded here with PIL (errors name the record), and not at all when reading labels."""
        builder = tfds.builder_from_directory(str(self.folder))
        features = builder.info.features
        decoders = {k: tfds.decode.SkipDecoding() for k in _IMAGE_FEATURES if k in features}
        return builder.as_data_source(split=split, decoders=decoders)

    def _read_labels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Labels (and habitats, -1 if none) of every record, without decoding any image: from
        the metadata `bgjax prepare` saved, else by parsing every record."""
        saved = _metadata(self.folder).get("class_labels", {}).get(split, {})
        num_records = self._num_records[split]
        if len(saved.get(self.label_key, ())) == num_records:
            habitats = saved.get("habitat", [-1] * num_records)
            return np.asarray(saved[self.label_key], np.int32), np.asarray(habitats, np.int32)
        ds = self._open(split)
        labels, habitats = [], []
        for start in range(0, len(ds), _LABEL_READ_CHUNK):
            for record in ds.__getitems__(range(start, min(start + _LABEL_READ_CHUNK, len(ds)))):
                labels.append(record[self.label_key])
                habitats.append(record.get("habitat", -1))
        return np.asarray(labels, np.int32), np.asarray(habitats, np.int32)

    def subset(self, indices: np.ndarray, name: str | None = None) -> TfdsSource:
        """The examples `indices` (into this source) as a new source."""
        indices = np.asarray(indices, np.int64)
        new = copy.copy(self)
        new._indices = indices if self._indices is None else self._indices[indices]
        info = self.info
        new.info = DatasetInfo(
            name=name or info.name,
            split=info.split,
            class_names=info.class_names,
            labels=info.labels[indices],
            habitats=None if info.habitats is None else info.habitats[indices],
            habitat_names=info.habitat_names,
            image_size=info.image_size,
            train_group_proportions=info.train_group_proportions,
            mean=info.mean,
            std=info.std,
        )
        return new

    def __len__(self) -> int:
        return len(self.info.labels)

    def __getstate__(self):  # the array_record readers reopen in each Grain worker
        return {**self.__dict__, "_ds": None}

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if self._ds is None:
            self._ds = self._open(self.tfds_split)
        record_index = index if self._indices is None else int(self._indices[index])
        record = self._ds[record_index]
        what = f"TFDS {self.name}/{self.tfds_split} record {record_index}"
        image = files.decode_rgb(record["image"], f"{what} image")
        height, width = image.shape[:2]
        if self.mask_key is None:
            mask = np.ones((height, width), np.uint8)
        else:
            mask = files.decode_grey(record[self.mask_key], f"{what} {self.mask_key}")
            files.check_same_size(mask, image, f"{what} {self.mask_key}", f"{what} image")
            mask = (mask > 0).astype(np.uint8)
        if "bbox" not in record:
            bbox = np.asarray(variants.bbox_from_mask(mask), np.int32)
        elif self.bbox_is_normalised:  # tfds BBoxFeature: (ymin, xmin, ymax, xmax) in [0, 1]
            ymin, xmin, ymax, xmax = np.asarray(record["bbox"], np.float64).reshape(4)
            box = (xmin * width, ymin * height, xmax * width, ymax * height)
            bbox = files.clip_box(box, height, width)
        else:
            bbox = np.asarray(record["bbox"], np.int32)
        return dict(
            image=image,
            mask=mask,
            bbox=bbox,
            label=np.int32(record[self.label_key]),
            habitat=np.int32(record.get("habitat", -1)),
        )

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.tfds_split!r}, n={len(self)})"


def _metadata(folder: Path) -> dict[str, Any]:
    path = folder / "metadata.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def make_source(config: Any, split: str) -> TfdsSource:
    """Registered as "tfds": `config.tfds_name` from `config.data_dir`."""
    name = config.get("tfds_name")
    if not name:
        raise ValueError("data.tfds_name must name the prepared TFDS dataset (e.g. 'waterbirds')")
    return TfdsSource(
        name,
        split,
        config.get("data_dir"),
        label_key=config.get("label_key", "label"),
        variant=config.get("variant"),
    )
