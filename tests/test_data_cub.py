"""CUB-200-2011 folder reader on a fake tree in the published layout (+ the TFDS path's errors)."""

import shutil

import numpy as np
import pytest
from fake_trees import CUB_CLASSES, save, write_cub
from ml_collections import ConfigDict

from bgjax.data import cub, get_source

PER_CLASS = 4


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory):
    return write_cub(tmp_path_factory.mktemp("cub"), per_class=PER_CLASS)


@pytest.fixture
def small_cub(tmp_path):
    return write_cub(tmp_path, classes=CUB_CLASSES[:3], per_class=2)


def test_splits_labels_and_class_names(cub_root):
    config = ConfigDict(dict(name="cub", root=str(cub_root.parent)))  # the folder holding it
    train, test = get_source(config, "train"), get_source(config, "test")
    assert len(train) + len(test) == len(cub.CubSource(cub_root, "all")) == 10 * PER_CLASS
    # the fake marks every other image of a class as train
    np.testing.assert_array_equal(train.info.labels, np.repeat(np.arange(10), PER_CLASS // 2))
    assert train.info.class_names == CUB_CLASSES and train.info.habitats is None
    assert all(p.parent.name.startswith("0") for p in map(train.image_file, range(3)))


def test_example_mask_is_binarised_segmentation_and_box_from_file(cub_root):
    source = cub.CubSource(cub_root, "test")
    image, segmentation = source.load(1)
    assert set(np.unique(segmentation)) == {0, 128, 255}  # soft alpha stays available
    example = source[1]
    np.testing.assert_array_equal(example["mask"], (segmentation > 0).astype(np.uint8))
    np.testing.assert_array_equal(example["image"], image)
    # the fake box is the tight box of the inner (255) region, which the rim surrounds
    inner = np.argwhere(segmentation == 255)
    assert tuple(example["bbox"]) == (
        inner[:, 1].min(),
        inner[:, 0].min(),
        inner[:, 1].max() + 1,
        inner[:, 0].max() + 1,
    )
    assert example["bbox"].dtype == np.int32 and example["label"] == 0


def test_box_masks_without_segmentations(small_cub):
    shutil.rmtree(small_cub.parent / "segmentations")
    with pytest.raises(FileNotFoundError, match="mask_from='bbox'"):
        cub.CubSource(small_cub, "train")
    example = cub.CubSource(small_cub, "train", mask_from="bbox")[0]
    x0, y0, x1, y1 = example["bbox"]
    assert example["mask"].sum() == (x1 - x0) * (y1 - y0) == example["mask"][y0:y1, x0:x1].sum()


@pytest.mark.parametrize("name", cub.METADATA_FILES)
def test_missing_metadata_file_is_named(small_cub, name):
    (small_cub / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        cub.CubSource(small_cub, "train")


def test_missing_image_and_malformed_lines_are_named(small_cub):
    (small_cub / "bounding_boxes.txt").write_text("1 0 0 4\n")
    with pytest.raises(ValueError, match=r"bounding_boxes.txt:1: expected 5 fields"):
        cub.read_metadata(small_cub)
    (small_cub / "bounding_boxes.txt").write_text("1 0 0 4 4\n")
    with pytest.raises(ValueError, match=r"bounding_boxes.txt: no line for image id 2"):
        cub.read_metadata(small_cub)


def test_missing_listed_image(small_cub):
    image = next((small_cub / "images").rglob("*.jpg"))
    image.unlink()
    with pytest.raises(FileNotFoundError, match=image.name):
        cub.CubSource(small_cub, "all")


def test_segmentation_of_another_size_names_both(small_cub):
    source = cub.CubSource(small_cub, "train")
    seg_path = source.meta.segmentation_path(source.segmentations, source.indices[0])
    save(seg_path, np.zeros((5, 7), np.uint8))
    with pytest.raises(ValueError, match=r"(?s)\.png has shape \(5, 7\).*\.jpg has \(16, 16\)"):
        source[0]


def test_corrupt_image_skipped_and_counted(small_cub):
    image = cub.CubSource(small_cub, "test").image_file(1)
    image.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"corrupt image .*{image.name}"):
        cub.CubSource(small_cub, "test")[1]
    skipping = cub.CubSource(small_cub, "test", skip_corrupt=True)
    assert len(skipping) == 2 and skipping.skipped == (str(image),)


def test_unprepared_tfds_caltech_birds_is_a_clear_error(tmp_path):
    config = ConfigDict(dict(name="cub", source="tfds", data_dir=str(tmp_path)))
    with pytest.raises(
        FileNotFoundError, match=r"'caltech_birds2011' is not prepared in .*tfds build"
    ):
        get_source(config, "train")
    (tmp_path / "caltech_birds2011/0.2.0").mkdir(parents=True)
    (tmp_path / "caltech_birds2011/0.2.0/dataset_info.json").write_text("{}")
    with pytest.raises(ValueError, match="no array_record files"):
        get_source(config, "train")
