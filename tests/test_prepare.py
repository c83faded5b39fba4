"""`bgjax prepare`: TFDS array_record datasets written without TensorFlow, read back as sources."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from fake_trees import object_image, write_cub, write_imagenet, write_in9_release, write_places
from ml_collections import ConfigDict

from bgjax import variants
from bgjax.data import builders, cub, get_source, in9, in9l, waterbirds
from bgjax.data.imagefiles import CorruptImageError, encode
from bgjax.data.tfds import TfdsSource

REPO = Path(__file__).resolve().parents[1]


def _same_examples(a, b):
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.info.labels, b.info.labels)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{key} of example {i}")


def test_in9_round_trip_keeps_every_variant_and_file(tmp_path):
    release = write_in9_release(tmp_path / "src", per_class=1)
    stats = builders.prepare("in9", release.parent, tmp_path / "tfds")
    assert set(stats) == {"val"} | {f"val_{v}" for v in variants.VARIANTS[1:]}
    assert all(s["written"] == 9 and s["skipped_corrupt"] == 0 for s in stats.values())
    for variant in ("original", "mixed_rand"):
        config = dict(name="tfds", tfds_name="in9", data_dir=str(tmp_path / "tfds"))
        stored = get_source(ConfigDict(dict(config, variant=variant)), "val")
        assert stored.info.mean == in9.MEAN and stored.info.image_size == 32
        # JPEG files are stored byte for byte: decoded pixels are identical
        _same_examples(stored, in9.In9Source(release, variant))
    # plain TFDS reads it too (no bgjax, no TensorFlow), decoding with its own image decoder
    plain = tfds.data_source("in9", split="val_only_fg", data_dir=str(tmp_path / "tfds"))
    np.testing.assert_array_equal(plain[4]["image"], in9.In9Source(release, "only_fg")[4]["image"])
    with pytest.raises(ValueError, match="no split 'val_nonsense'"):
        TfdsSource("in9", "val", tmp_path / "tfds", variant="nonsense")


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    root = tmp_path_factory.mktemp("birds")
    return dict(cub=write_cub(root / "cub", per_class=4), places=write_places(root / "places"))


def test_cub_round_trip_with_soft_alpha(birds, tmp_path):
    stats = builders.prepare("cub", birds["cub"], tmp_path)
    assert {s: v["written"] for s, v in stats.items()} == {"train": 20, "test": 20}
    stored = TfdsSource("cub", "test", tmp_path)
    _same_examples(stored, cub.CubSource(birds["cub"], "test"))
    record = stored._open("test")[0]
    assert record["alpha"][:4] == b"\x89PNG" and record["image"][:2] == b"\xff\xd8"
    # labels come from metadata.json; without it (other TFDS datasets) from the records
    metadata = stored.folder / "metadata.json"
    saved = json.loads(metadata.read_text())
    assert saved["class_labels"]["test"]["label"] == stored.info.labels.tolist()
    metadata.unlink()
    np.testing.assert_array_equal(
        TfdsSource("cub", "test", tmp_path).info.labels, stored.info.labels
    )
    clone = pickle.loads(pickle.dumps(stored))  # Grain workers get a pickled source
    np.testing.assert_array_equal(clone[3]["image"], stored[3]["image"])


def test_waterbirds_generated_round_trip(birds, tmp_path):
    options = dict(places_root=str(birds["places"]), correlation=0.95, seed=3)
    stats = builders.prepare("waterbirds", birds["cub"], tmp_path, options=options)
    assert sum(s["written"] for s in stats.values()) == 40
    folder = dict(name="waterbirds", cub_root=str(birds["cub"]), **options)
    stored = dict(name="tfds", tfds_name="waterbirds", data_dir=str(tmp_path))
    for split in waterbirds.SPLITS:
        a = get_source(ConfigDict(stored), split)
        b = get_source(ConfigDict(folder), split)
        np.testing.assert_array_equal(a.info.habitats, b.info.habitats)
        np.testing.assert_allclose(a.info.train_group_proportions, b.info.train_group_proportions)
        assert a.info.habitat_names == ("land", "water")
        np.testing.assert_array_equal(a[0]["mask"], b[0]["mask"])
        # composited images are stored as JPEG q95
        assert np.abs(a[0]["image"].astype(int) - b[0]["image"]).mean() < 8
    species = get_source(ConfigDict(dict(stored, label_key="species")), "test")
    assert species.info.num_classes == 10
    np.testing.assert_array_equal(
        species.info.labels,
        get_source(ConfigDict(dict(folder, label="species")), "test").info.labels,
    )


class CaltechBirds2011(builders.LocalBuilder, skip_registration=True):
    """The features of TFDS's caltech_birds2011 (bbox as BBoxFeature), from a fake CUB."""

    VERSION = tfds.core.Version("0.2.0")
    cub_root: Path

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(),
                "image/filename": tfds.features.Text(),
                "label": tfds.features.ClassLabel(num_classes=200),
                "label_name": tfds.features.Text(),
                "bbox": tfds.features.BBoxFeature(),
                "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(cub.CubSource(self.cub_root, "test"))}

    def _generate_examples(self, source):
        for i in range(len(source)):
            image, segmentation = source.load(i)
            (height, width), (x0, y0, x1, y1) = image.shape[:2], source[i]["bbox"]
            box = tfds.features.BBox(y0 / height, x0 / width, y1 / height, x1 / width)
            yield (
                i,
                {
                    "image": source.image_file(i).read_bytes(),
                    "image/filename": source.image_file(i).name,
                    "label": int(source.info.labels[i]),
                    "label_name": source.info.class_names[source.info.labels[i]],
                    "bbox": box,
                    "segmentation_mask": encode(segmentation),
                },
            )


def test_reads_tfds_caltech_birds2011_features(birds, tmp_path):
    CaltechBirds2011.cub_root = birds["cub"]
    CaltechBirds2011(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = ConfigDict(dict(name="cub", source="tfds", data_dir=str(tmp_path)))
    stored = get_source(config, "test")
    assert stored.info.num_classes == 200
    folder = cub.CubSource(birds["cub"], "test")
    by_name = {folder.image_file(i).name: i for i in range(len(folder))}
    records = stored._open("test")  # TFDS shuffled them: match by file name
    order = [by_name[records[i]["image/filename"].decode()] for i in range(len(stored))]
    np.testing.assert_array_equal(stored.info.labels, folder.info.labels[order])
    for i, j in enumerate(order):
        x, y = stored[i], folder[j]
        for key in ("image", "mask", "label", "habitat"):
            np.testing.assert_array_equal(x[key], y[key])
        assert np.abs(x["bbox"] - y["bbox"]).max() <= 1  # normalised floats -> pixels


def test_corrupt_image_fails_prepare_or_is_skipped_and_counted(tmp_path):
    base = write_cub(tmp_path / "cub", per_class=2)
    bad = cub.CubSource(base, "train").image_file(1)
    bad.write_bytes(b"\xff\xd8 broken")
    with pytest.raises(CorruptImageError, match=bad.name):
        builders.prepare("cub", base, tmp_path / "a")
    stats = builders.prepare("cub", base, tmp_path / "b", skip_corrupt=True)
    assert stats["train"]["skipped_corrupt"] == 1 and stats["train"]["written"] == 9
    assert stats["train"]["corrupt_files"][0].startswith(f"corrupt image {bad}: ")
    assert len(TfdsSource("cub", "train", tmp_path / "b")) == 9


def test_grabcut_finds_an_obvious_object():
    pytest.importorskip("cv2")
    image, truth = object_image(np.random.default_rng(0), 64, 64)
    x0, y0, x1, y1 = variants.bbox_from_mask(truth)
    box = np.array([max(x0 - 3, 0), max(y0 - 3, 0), min(x1 + 3, 64), min(y1 + 3, 64)])
    mask = in9l.grabcut_mask(image, box)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9 and mask.dtype == np.uint8


def test_in9l_prepare_runs_grabcut_once_and_reads_back(tmp_path):
    pytest.importorskip("cv2")
    truth = write_imagenet(tmp_path / "imagenet", per_class=1)
    stats = builders.prepare("in9l", tmp_path / "imagenet", tmp_path / "tfds")["train"]
    assert stats["written"] == 9 and stats["rejected"] == {}
    assert stats["not_qualifying"] == {
        "no box annotation": 1,
        "not exactly one box": 1,
        "box covers > 90% of the crop": 1,
    }
    config = ConfigDict(dict(name="in9l", data_dir=str(tmp_path / "tfds")))
    full = get_source(config, "train")
    np.testing.assert_array_equal(full.info.labels, np.arange(9))
    assert full.info.image_size == in9l.CROP and full.info.mean == in9.MEAN
    records = full._open("train")
    for i in range(len(full)):
        path = Path(records[i]["file_name"].decode())
        expected = in9l.CropGeometry(80, 64).crop(truth[path] * 255) > 127
        got = full[i]["mask"].astype(bool)
        assert (got & expected).sum() / (got | expected).sum() > 0.8, path
    subset = get_source(ConfigDict(dict(config, subset="in9", per_class=1)), "train")
    assert len(subset) == 9 and subset.info.name == "in9"
    with pytest.raises(ValueError, match="per_class=2 impossible"):
        get_source(ConfigDict(dict(config, subset="in9", per_class=2)), "train")


def test_in9l_inputs_errors(tmp_path):
    write_imagenet(tmp_path, per_class=1)
    synsets = in9l.find_synsets(None, tmp_path)
    assert len(synsets) == 1000 and synsets[0] == "n09000000"  # the words after it are dropped
    lines = (tmp_path / "LOC_synset_mapping.txt").read_text().splitlines()
    (tmp_path / "short.txt").write_text("\n".join(lines[:999]))
    with pytest.raises(ValueError, match="expected 1000 distinct synsets"):
        in9l.read_synsets(tmp_path / "short.txt")
    missing = tmp_path / "bbox" / synsets[402]  # a musical instrument, IN-9 maps it
    missing.rmdir()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        in9l.scan(tmp_path / "train", tmp_path / "bbox", synsets)


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="bgjax prepare waterbirds --manual_dir"):
        get_source(
            ConfigDict(dict(name="tfds", tfds_name="waterbirds", data_dir=str(tmp_path))), "train"
        )
    with pytest.raises(FileNotFoundError, match="bgjax prepare in9l"):
        get_source(ConfigDict(dict(name="in9l", data_dir=str(tmp_path))), "train")


def test_cli_check_and_prepare(tmp_path):
    release = write_in9_release(tmp_path / "src", per_class=1)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "bgjax.cli", "prepare", "in9", f"--manual_dir={release}"]
    check = subprocess.run(
        [*command, "--check", "--check_n=5", "--box_source=only_bg_b"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    lines = check.stdout.splitlines()
    assert lines[0].split()[:3] == ["variant", "n", "missing"]
    assert [line.split()[:3] for line in lines[1:]] == [
        [name, "5", "0"] for name in in9.DETERMINISTIC_VARIANTS
    ]
    run = subprocess.run(
        [*command, f"--data_dir={tmp_path / 'tfds'}", "--variants=original,only_fg"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert 'in9/val_only_fg: {"written": 9' in run.stdout
    assert len(TfdsSource("in9", "val", tmp_path / "tfds", variant="only_fg")) == 9
