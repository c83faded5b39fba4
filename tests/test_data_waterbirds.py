"""Waterbirds: generated on the fly from fake CUB + Places trees, and the released layout."""

import csv
import shutil

import numpy as np
import pytest
from fake_trees import write_cub, write_places, write_waterbirds_release
from ml_collections import ConfigDict

from bgjax.data import cub, get_source, places, waterbirds

PER_CLASS = 40  # 400 fake birds, 200 in CUB's train split: enough to see 0.95 vs 0.05


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb")
    cub_base = write_cub(root / "cub", per_class=PER_CLASS)
    places_root = write_places(root / "places", per_category=3)
    release = root / "release"
    release.mkdir()
    write_waterbirds_release(release, cub_base)
    return dict(cub=cub_base, places=places_root, release=release)


def generated(trees, split, **overrides):
    config = dict(name="waterbirds", cub_root=str(trees["cub"]), places_root=str(trees["places"]))
    return get_source(ConfigDict({**config, **overrides}), split)


def test_waterbird_species_follow_the_standard_substring_rule():
    assert waterbirds.is_waterbird("001.Black_footed_Albatross")
    assert waterbirds.is_waterbird("Pacific_Loon") and not waterbirds.is_waterbird("Common_Loon")
    assert not waterbirds.is_waterbird("Blue_Jay")
    # the standard list's quirk: "tern" is a substring of "eastern"
    assert waterbirds.is_waterbird("Eastern_Towhee")
    assert not waterbirds.is_waterbird("Eastern_Towhee", whole_word=True)
    assert waterbirds.is_waterbird("Common_Tern", whole_word=True)


def test_generated_splits_and_group_proportions_at_095(trees):
    train, val, test = (generated(trees, s) for s in waterbirds.SPLITS)
    cub_train = len(cub.CubSource(trees["cub"], "train"))
    assert len(val) == round(0.2 * cub_train) and len(train) + len(val) == cub_train
    assert len(test) == len(cub.CubSource(trees["cub"], "test"))  # CUB's test images

    def water_fraction(source, label):
        return source.info.habitats[source.info.labels == label].mean()

    assert water_fraction(train, 1) == pytest.approx(0.95, abs=0.02)
    assert water_fraction(train, 0) == pytest.approx(0.05, abs=0.02)
    for source in (val, test):
        for label in (0, 1):
            assert water_fraction(source, label) == pytest.approx(0.5, abs=0.05)
    groups = np.bincount(train.info.labels * 2 + train.info.habitats, minlength=4)
    np.testing.assert_allclose(test.info.train_group_proportions, groups / groups.sum())
    assert train.info.group_names() == (
        "landbird/land",
        "landbird/water",
        "waterbird/land",
        "waterbird/water",
    )


def test_generation_is_seeded(trees):
    a, b = generated(trees, "train"), generated(trees, "train")
    other = generated(trees, "train", seed=1)
    np.testing.assert_array_equal(a.rows, b.rows)
    assert a.backgrounds == b.backgrounds
    assert not np.array_equal(a.rows, other.rows) or a.backgrounds != other.backgrounds


def test_generated_example_is_the_bird_alpha_composited_on_its_place(trees):
    source = generated(trees, "test", jpeg_quality=0)  # lossless: the bird's pixels stay exact
    birds = cub.CubSource(trees["cub"], "all")
    for i in (0, 7):
        example = source[i]
        bird, segmentation = birds.load(source.rows[i])
        inside = segmentation == 255
        np.testing.assert_array_equal(example["image"][inside], bird[inside])
        assert np.abs(example["image"][~inside].astype(int) - bird[~inside]).mean() > 20
        np.testing.assert_array_equal(example["mask"], (segmentation > 0).astype(np.uint8))
        assert example["habitat"] == source.info.habitats[i]
        category = source.backgrounds[i].parent.name
        assert category in (
            ("ocean", "natural") if example["habitat"] else ("bamboo_forest", "broadleaf")
        )


def test_species_labels_option(trees):
    source = generated(trees, "train", label="species")
    # Scored by species, the groups stay Waterbirds' four (waterbird/landbird x habitat).
    assert source.info.num_classes == 10 and source.info.train_group_proportions.shape == (4,)
    assert source.info.group_names() == ("landbird/land", "landbird/water", "waterbird/land",
                                         "waterbird/water")  # fmt: skip
    species = cub.CubSource(trees["cub"], "all").info.labels[source.rows]
    np.testing.assert_array_equal(source.info.labels, species)


def test_release_reader_with_and_without_cub_masks(trees):
    rows = list(csv.DictReader(open(trees["release"] / "metadata.csv")))
    plain = get_source(ConfigDict(dict(name="waterbirds", root=str(trees["release"]))), "val")
    expected = [r for r in rows if r["split"] == "1"]
    assert len(plain) == len(expected) and not plain.has_masks
    np.testing.assert_array_equal(plain.info.labels, [int(r["y"]) for r in expected])
    np.testing.assert_array_equal(plain.info.habitats, [int(r["place"]) for r in expected])
    example = plain[0]
    height, width = example["image"].shape[:2]
    assert example["mask"].all() and tuple(example["bbox"]) == (0, 0, width, height)
    masked = waterbirds.WaterbirdsRelease(trees["release"], "val", cub_root=trees["cub"])
    assert masked.has_masks
    birds = cub.CubSource(trees["cub"], "all")
    position = birds.meta.relpaths.index(expected[0]["img_filename"])
    np.testing.assert_array_equal(masked[0]["mask"], birds[position]["mask"])
    species = waterbirds.WaterbirdsRelease(trees["release"], "val", label="species")
    assert species.info.class_names[:2] == ("Black_footed_Albatross", "Herring_Gull")


def test_release_errors_name_the_fault(trees, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(trees["release"], release)
    text = (release / "metadata.csv").read_text()
    (release / "metadata.csv").write_text(text.replace("place_filename", "place_file"))
    with pytest.raises(ValueError, match="missing columns \\['place_filename'\\]"):
        waterbirds.WaterbirdsRelease(release, "train")
    (release / "metadata.csv").write_text(text.replace("001.Black", "999.Black", 1))
    with pytest.raises(ValueError, match="img_filename not in CUB"):
        waterbirds.WaterbirdsRelease(release, "train", cub_root=trees["cub"])
    (release / "metadata.csv").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        waterbirds.WaterbirdsRelease(release, "train")
    with pytest.raises(ValueError, match="cub_root and data.places_root"):
        get_source(ConfigDict(dict(name="waterbirds", cub_root=str(trees["cub"]))), "train")
    with pytest.raises(ValueError, match="unknown Waterbirds split"):
        generated(trees, "valid")


def test_places_layouts_and_missing_category(trees, tmp_path):
    pool = places.PlacesBackgrounds(trees["places"])  # "ocean" sits at o/ocean
    assert [len(p) for p in pool.pools] == [6, 6]
    with pytest.raises(FileNotFoundError, match="category 'x/y'"):
        places.PlacesBackgrounds(trees["places"], [["bamboo_forest"], ["lake/natural", "x/y"]])
    shutil.copytree(trees["places"], tmp_path / "p")
    shutil.rmtree(tmp_path / "p/bamboo_forest")
    with pytest.raises(FileNotFoundError, match="'bamboo_forest'"):
        places.PlacesBackgrounds(tmp_path / "p")


# ------------------------------------------------------------ runs that need the missing masks


def _run_config(trees, **model):
    """A tiny Waterbirds config on the release without cub_root (no masks)."""
    from bgjax import config_utils

    config = config_utils.base_config()
    config_utils.set_tiny(config, "vit")
    config.data = ConfigDict(dict(name="waterbirds", root=str(trees["release"]), image_size=32))
    config.model.update(model)
    return config


@pytest.mark.parametrize(
    "change, fault",
    [
        (dict(masking="early"), "model.masking='early' with mask_source='gt'"),
        (dict(masking="late"), "model.masking='late'"),
        (dict(train_variant="mixed_rand"), "the variants mixed_rand"),
        (dict(train_variant={"original": 0.5, "only_fg": 0.5}), "the variants only_fg"),
        (dict(task="segment"), "task='segment'"),
    ],
)
def test_train_refuses_runs_needing_masks_up_front(trees, tmp_path, change, fault):
    from bgjax import train

    config = _run_config(trees)
    with config.ignore_type():  # train_variant may become a dict
        for key, value in change.items():
            node = config.model if key == "masking" else config
            node[key] = value
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as error:
        train.train(config, str(workdir))
    message = str(error.value)
    assert message.startswith("bgjax train: dataset 'waterbirds' (train split) has no foreground")
    assert fault in message and "data.cub_root" in message
    assert not workdir.exists()  # refused up front: nothing written


def test_require_masks_accepts_what_needs_no_dataset_masks(trees):
    from bgjax import tasks

    plain = get_source(ConfigDict(dict(name="waterbirds", root=str(trees["release"]))), "val")
    config = _run_config(trees, masking="early")
    with pytest.raises(ValueError, match="cub_root.*; or, for masking, .*segmenter workdir"):
        tasks.require_masks(plain, ["original"], config, command="bgjax eval")
    tasks.require_masks(plain, ["original"], _run_config(trees), command="bgjax eval")  # plain
    config.mask_source = str(trees["release"])  # any segmenter workdir: masks are predicted
    tasks.require_masks(plain, ["original"], config, command="bgjax eval")
    with pytest.raises(ValueError, match="variants no_fg, mixed_same .only 'original'"):
        tasks.require_masks(plain, ["original", "no_fg", "mixed_same"], config, command="x")
    masked = waterbirds.WaterbirdsRelease(trees["release"], "val", cub_root=trees["cub"])
    tasks.require_masks(
        masked, ["original", "no_fg"], _run_config(trees, masking="late"), command="x"
    )


def test_eval_refuses_before_restoring(trees, tmp_path):
    """`bgjax eval` checks the data before reading any checkpoint (the workdir has none)."""
    from bgjax import evaluate

    config = _run_config(trees, masking="attn")
    (tmp_path / "config.json").write_text(config.to_json())
    with pytest.raises(ValueError, match=r"bgjax eval: dataset 'waterbirds' \(test split\)"):
        evaluate.evaluate_checkpoint(tmp_path, variant_names=("original",))
    with pytest.raises(ValueError, match="the variants only_bg_t"):
        evaluate.evaluate_pretrained(
            "vit_tiny_patch16_224", tmp_path / "none.safetensors", "waterbirds",
            out_dir=tmp_path / "out", variant_names=("original", "only_bg_t"),
            overrides={"data.root": str(trees["release"])},
        )  # fmt: skip


def test_aggregate_refuses_before_restoring(trees, tmp_path, monkeypatch):
    """Sweeps and the demo evaluate through `aggregate.evaluate_run`: the same check, first."""
    from bgjax import aggregate

    (tmp_path / "config.json").write_text(_run_config(trees, masking="early").to_json())
    monkeypatch.setattr(aggregate.workdir_lib, "restore", lambda *a, **k: pytest.fail("restored"))
    spec = aggregate.EvalSpec("iid", "test", ("original",))
    with pytest.raises(ValueError, match=r"evaluation 'iid' of .*: dataset 'waterbirds' \(test"):
        aggregate.evaluate_run(tmp_path, [spec], step=1)
