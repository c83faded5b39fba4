"""`bgjax prepare {in9,in9l,cub,waterbirds} --manual_dir SRC --data_dir DST`: TFDS array_record.

Writes the dataset found in the published layout under SRC (see each reader's docstring:
bgjax/data/in9.py, in9l.py, cub.py, waterbirds.py) as a TFDS dataset of the same name in DST,
without TensorFlow; read it back with `config.data = dict(name="tfds", tfds_name=..., data_dir=DST)`
(or name="in9l" for IN-9L / IN-9). Skipped examples are counted and printed.

    bgjax prepare in9 --manual_dir ~/bg_challenge --data_dir ~/tfds
    bgjax prepare in9 --manual_dir ~/bg_challenge --check [--check_n 200]    # no writing:
        regenerated vs released variants (mean |diff|, PSNR, fraction within JPEG tolerance)
    bgjax prepare in9l --manual_dir ~/imagenet --data_dir ~/tfds --num_workers 16
        (~/imagenet/train/<synset>/, ~/imagenet/bbox/<synset>/*.xml, LOC_synset_mapping.txt)
    bgjax prepare cub --manual_dir ~/CUB_200_2011 --data_dir ~/tfds
    bgjax prepare waterbirds --manual_dir ~/waterbird_complete95_forest2water2 --data_dir ~/tfds
    bgjax prepare waterbirds --manual_dir ~/CUB_200_2011 --places_root ~/places --data_dir ~/tfds
"""

from __future__ import annotations

import json

from bgjax import clflags
from bgjax.data import builders

_MANUAL_DIR = clflags.string("manual_dir", None, "folder with the dataset's files")
_DATA_DIR = clflags.string("data_dir", None, "TFDS data dir to write into")
_OVERWRITE = clflags.boolean("overwrite", False, "rewrite a dataset already in data_dir")
_NUM_WORKERS = clflags.integer("num_workers", 0, "encoding processes (0: in this one)")
_SKIP_CORRUPT = clflags.boolean(
    "skip_corrupt", False, "skip (and count) images that do not decode instead of failing"
)
# in9
_CHECK = clflags.boolean("check", False, "in9: print the consistency report, write nothing")
_CHECK_N = clflags.integer("check_n", 100, "in9 --check: originals to compare")
_TOLERANCE = clflags.integer("tolerance", 8, "in9 --check: JPEG tolerance per pixel")
_BOX_SOURCE = clflags.enum(
    "box_source", "mask", ["mask", "only_bg_b"], "in9: box = mask's box or only_bg_b's rectangle"
)
_VARIANTS = clflags.string_list("variants", None, "in9: released variants to write (default all)")
# in9l
_SYNSETS = clflags.string("synsets", None, "in9l: LOC_synset_mapping.txt (1000 lines)")
_TRAIN_DIR = clflags.string("train_dir", None, "in9l: ImageNet train (default SRC/train)")
_BBOX_DIR = clflags.string("bbox_dir", None, "in9l: box XMLs (default SRC/bbox)")
# cub / waterbirds
_SEGMENTATIONS = clflags.string("segmentations", None, "CUB segmentations folder")
_CUB_ROOT = clflags.string("cub_root", None, "waterbirds release: CUB root, for masks")
_PLACES_ROOT = clflags.string("places_root", None, "waterbirds generation: Places folder")
_CORRELATION = clflags.float_("correlation", 0.95, "waterbirds generation: train correlation")
_VAL_FRACTION = clflags.float_("val_fraction", 0.2, "waterbirds generation: val share")
_SEED = clflags.integer("seed", 0, "random choices (waterbirds generation, GrabCut)")


def _options(name: str) -> dict:
    given = dict(
        in9=dict(variants=_VARIANTS.value, box_source=_BOX_SOURCE.value),
        in9l=dict(
            synsets=_SYNSETS.value,
            train_dir=_TRAIN_DIR.value,
            bbox_dir=_BBOX_DIR.value,
            seed=_SEED.value,
        ),
        cub=dict(segmentations=_SEGMENTATIONS.value),
        waterbirds=dict(
            segmentations=_SEGMENTATIONS.value,
            cub_root=_CUB_ROOT.value,
            places_root=_PLACES_ROOT.value,
            correlation=_CORRELATION.value,
            val_fraction=_VAL_FRACTION.value,
            seed=_SEED.value,
        ),
    )[name]
    return {k: v for k, v in given.items() if v is not None}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in builders.NAMES:
        raise ValueError(f"usage: bgjax prepare {{{','.join(builders.NAMES)}}} [flags]")
    name = argv[1]
    if not _MANUAL_DIR.value:
        raise ValueError("--manual_dir (the folder with the dataset's files) is required")
    if _CHECK.value:
        if name != "in9":
            raise ValueError("--check is the IN-9 consistency report: bgjax prepare in9 --check")
        from bgjax.data import in9

        report = in9.consistency_report(
            _MANUAL_DIR.value,
            _CHECK_N.value,
            seed=_SEED.value,
            box_source=_BOX_SOURCE.value,
            tolerance=_TOLERANCE.value,
        )
        print(in9.format_report(report, _TOLERANCE.value))
        return
    if not _DATA_DIR.value:
        raise ValueError("--data_dir (the TFDS data dir to write into) is required")
    stats = builders.prepare(
        name,
        _MANUAL_DIR.value,
        _DATA_DIR.value,
        options=_options(name),
        num_workers=_NUM_WORKERS.value,
        skip_corrupt=_SKIP_CORRUPT.value,
        overwrite=_OVERWRITE.value,
    )
    if not stats:
        print(f"{name} already in {_DATA_DIR.value}; --overwrite to write it again")
    for split, split_stats in stats.items():
        summary = {k: v for k, v in split_stats.items() if k != "corrupt_files"}
        print(f"{name}/{split}: {json.dumps(summary)}")
