"""ImageNet-9 release reader on a fake `bg_challenge/` tree in the published layout."""

import pickle
import shutil

import numpy as np
import pytest
from fake_trees import write_in9_release
from ml_collections import ConfigDict

from bgjax import variants
from bgjax.data import get_source, in9
from bgjax.data.imagefiles import CorruptImageError

PER_CLASS = 2


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_in9_release(tmp_path_factory.mktemp("in9"), per_class=PER_CLASS)


@pytest.fixture
def small_release(tmp_path):
    """A fresh one-per-class tree the bad-input tests may break."""
    return write_in9_release(tmp_path, per_class=1)


@pytest.mark.parametrize("variant", variants.VARIANTS)
def test_every_released_variant_reads_with_labels_and_masks(release, variant):
    source = get_source(
        ConfigDict(dict(name="in9", root=str(release.parent), variant=variant)), "val"
    )
    assert len(source) == 9 * PER_CLASS
    np.testing.assert_array_equal(source.info.labels, np.repeat(np.arange(9), PER_CLASS))
    assert source.info.class_names[2] == "wheeled vehicle"
    assert source.info.image_size == 32 and source.info.mean == in9.MEAN
    example = source[3]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert example["mask"].dtype == np.uint8 and set(np.unique(example["mask"])) == {0, 1}
    assert tuple(example["bbox"]) == variants.bbox_from_mask(example["mask"])
    assert example["label"] == 1 and example["habitat"] == -1


def test_mixed_files_take_the_mask_of_their_foreground_original(release):
    mixed = in9.In9Source(release, "mixed_rand")
    original = in9.In9Source(release, "original")
    for i in range(len(mixed)):
        fg_stem, bg_stem = in9.split_mixed_name(mixed.image_file(i).stem)
        assert bg_stem is not None and fg_stem == original.image_file(i).stem
        np.testing.assert_array_equal(mixed[i]["mask"], original[i]["mask"])
    # mixed_rand names follow mixed_next's pattern (the release's defect): no bg identity
    assert mixed.bg_stems == [None] * len(mixed)
    following = in9.In9Source(release, "mixed_next")
    assert following.bg_stems[0] == original.image_file(PER_CLASS).stem  # class 1's first


def test_sources_pickle_for_grain_workers(release):
    source = in9.In9Source(release, "only_fg")
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone[5]["image"], source[5]["image"])


def test_imagenet_mapping_matches_the_reference_ranges():
    table = in9.imagenet_to_in9()
    assert (table >= 0).sum() == 370
    assert table[151] == table[268] == 0 and table[171] == table[172] == -1
    assert table[0] == table[397] == 8 and table[880] == 2 and table[889] == 6
    assert np.bincount(table[table >= 0]).tolist()[2] == 42  # wheeled vehicle: 42 indices


def test_consistency_report_scores_regenerated_variants(release):
    mask_box = in9.consistency_report(release, n=50)
    bg_b_box = in9.consistency_report(release, n=50, box_source="only_bg_b")
    for report in (mask_box, bg_b_box):
        assert set(report) == set(in9.DETERMINISTIC_VARIANTS)
        assert all(r["n"] == 9 * PER_CLASS and r["missing"] == 0 for r in report.values())
        for name in ("no_fg", "only_fg"):  # same mask: only JPEG noise differs
            assert report[name]["psnr"] > 28 and report[name]["mean_abs_diff"] < 5
    # The fake release blacked out a box 2 px larger than the mask's: recovering it helps.
    for name in ("only_bg_b", "only_bg_t"):
        assert bg_b_box[name]["psnr"] > mask_box[name]["psnr"] + 5
        assert bg_b_box[name]["psnr"] > 30
    assert "only_bg_t" in in9.format_report(mask_box)


def test_only_val_split(release):
    with pytest.raises(ValueError, match="only the split 'val'"):
        get_source(ConfigDict(dict(name="in9", root=str(release))), "train")


def test_missing_class_folder_is_named(small_release):
    shutil.rmtree(small_release / "only_fg/val/04_carnivore")
    with pytest.raises(FileNotFoundError, match="only_fg/val/04_carnivore"):
        in9.In9Source(small_release, "only_fg")
    shutil.rmtree(small_release / "mixed_same")
    with pytest.raises(FileNotFoundError, match="mixed_same/val"):
        in9.In9Source(small_release, "mixed_same")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        in9.In9Source(small_release / "nowhere")


def test_missing_mask_is_named(small_release):
    mask = next((small_release / "fg_mask/val/06_musical instrument").glob("*.npy"))
    mask.unlink()
    with pytest.raises(FileNotFoundError, match=mask.name):
        in9.In9Source(small_release, "mixed_same")


def test_corrupt_image_is_named_or_skipped_and_counted(small_release):
    bad = next((small_release / "original/val/02_wheeled vehicle").glob("*.JPEG"))
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    source = in9.In9Source(small_release)
    with pytest.raises(CorruptImageError, match="wheeled vehicle"):
        source[2]
    skipping = in9.In9Source(small_release, skip_corrupt=True)
    assert len(skipping) == 8 and skipping.skipped == (str(bad),)
    assert 2 not in skipping.info.labels


def test_mask_of_another_size_names_both_files(small_release):
    mask = next((small_release / "fg_mask/val/00_dog").glob("*.npy"))
    np.save(mask, np.ones((30, 32), np.uint8))
    with pytest.raises(ValueError, match=r"(?s)\.npy.*\(30, 32\).*\.JPEG.*\(32, 32\)"):
        in9.In9Source(small_release)[0]


def test_pipeline_regenerates_variants_from_original_and_mask(release):
    from bgjax.data import pipeline

    source = in9.In9Source(release)
    batches = pipeline.build(
        source, variant="only_fg", batch_size=4, image_size=32, train=False, seed=0
    )
    batch = next(iter(batches))
    expected = variants.composite("only_fg", source[0]["image"], source[0]["mask"])
    np.testing.assert_array_equal(batch["image"][0], expected)
    np.testing.assert_array_equal(batch["label"], source.info.labels[:4])
