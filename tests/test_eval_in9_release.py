"""`bgjax eval` on the IN-9 release: released vs regenerated variants, per-example records,
the normalisation of imported models, and a trained run scored on another dataset.

The release tree is written here with flat images, so a one-pixel "model" (`CodeReader` of
tests/test_evaluate.py) predicts a hand-set class per file: the released variant files code
other predictions than regenerating them from original/ + fg_mask would give, so each test can
tell which was scored.
"""

import dataclasses
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
from fake_trees import save, write_cub, write_waterbirds_release
from test_evaluate import CENTRE, CodeReader, encode, train_tiny_run

from bgjax import data as data_lib
from bgjax import evaluate, variants
from bgjax.data import in9

SIZE = 16
KS = (1, 10)  # file numbers: "_1" < "_10" for originals, but "_10_bg" < "_1_bg" for mixed files
NUM = len(in9.CLASS_DIRS)


def released_code(variant: str, label: int, k: int) -> int:
    """The class a released file of `variant` codes (the original codes its label)."""
    wrong, nxt = (label + 2) % NUM, (label + 1) % NUM
    return {
        "mixed_rand": label if k == KS[0] else nxt,  # 50%
        "mixed_next": nxt if k == KS[0] else label,  # 50%, half called by the bg's class
        "only_bg_t": wrong,  # 0%
    }.get(variant, label)


def flat(code: int) -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[..., 0] = encode(code)
    return image


def write_release(root, with_masks=True):
    base = root / "bg_challenge"
    for label, class_dir in enumerate(in9.CLASS_DIRS):
        for j, k in enumerate(KS):
            stem = f"n{label:08d}_{k}"
            save(base / "original/val" / class_dir / f"{stem}.JPEG", flat(label))
            if with_masks:
                mask = np.zeros((SIZE, SIZE), np.uint8)
                mask[4:12, 4:12] = 1
                (base / "fg_mask/val" / class_dir).mkdir(parents=True, exist_ok=True)
                np.save(base / "fg_mask/val" / class_dir / f"{stem}.npy", mask)
            for name in in9.DETERMINISTIC_VARIANTS:
                path = base / name / "val" / class_dir / f"{stem}.JPEG"
                save(path, flat(released_code(name, label, k)))
            backgrounds = dict(
                mixed_same=f"n{label:08d}_{KS[1 - j]}",
                mixed_next=f"n{(label + 1) % NUM:08d}_{k}",
                mixed_rand=f"n{(label + 1) % NUM:08d}_{k}",  # the release's mixed_next-style names
            )
            for name, bg in backgrounds.items():
                path = base / name / "val" / class_dir / f"fg_{stem}_bg_{bg}.JPEG"
                save(path, flat(released_code(name, label, k)))
    return base


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("in9"))


def score(monkeypatch, tmp_path, root, names=variants.VARIANTS, **kwargs):
    from bgjax import models

    def from_timm(name, weights, img_size=None):  # reads the centre in IN-9 normalisation
        return CodeReader(range(NUM), NUM, CENTRE, 0, in9.MEAN, in9.STD)

    monkeypatch.setattr(models, "from_timm", from_timm)
    overrides = {"data.root": str(root), "data.image_size": str(SIZE), **kwargs.pop("data", {})}
    weights = tmp_path / "w.safetensors"  # read only for its checksum: from_timm is replaced
    safetensors.numpy.save_file({"unused": np.zeros(1, np.float32)}, weights)
    return evaluate.evaluate_pretrained(
        "convnext_tiny", weights, "in9", out_dir=tmp_path / "out", variant_names=names,
        overrides=overrides, batch_size=8, normalization="in9", **kwargs,
    )  # fmt: skip


def test_released_variants_are_scored_by_default(release, monkeypatch, tmp_path):
    r = score(monkeypatch, tmp_path, release)
    acc = {k: v["accuracy"] for k, v in r["variants"].items()}
    assert acc == dict.fromkeys(variants.VARIANTS, 1.0) | dict(
        mixed_rand=0.5, mixed_next=0.5, only_bg_t=0.0
    )
    assert r["bg_gap"] == 0.5  # released MIXED_SAME (100%) - MIXED_RAND (50%)
    assert set(r["variant_sources"].values()) == {"released"}
    assert r["normalization"] == {"mean": list(in9.MEAN), "std": list(in9.STD),
                                  "from": "--normalization=in9"}  # fmt: skip
    assert r["image_size"] == SIZE and r["eval_resize"]["rule"] == "warp"
    # mixed_next's background is the next class: called by it for the k=1 half.
    assert r["background_class_share"]["mixed_next"] == {"share": 0.5, "count": 18}
    # The release's mixed_rand names do not say the background: nothing to count.
    assert r["background_class_share"]["mixed_rand"] == {"share": None, "count": 0}
    # Buckets: fg (mixed_rand) right for k=1; bg (only_bg_t) never right.
    assert r["buckets"]["fg_correct_bg_wrong"]["count"] == 9
    assert r["buckets"]["fg_wrong_bg_wrong"]["count"] == 9

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["records_file"] == "records.parquet" and "records" not in saved
    rows = pq.read_table(tmp_path / "out" / "records.parquet").to_pylist()
    assert len(rows) == 18 * len(variants.VARIANTS)
    originals = [row for row in rows if row["variant"] == "original"]
    for name in variants.VARIANTS:  # row i of every variant is original i's foreground
        mine = [row for row in rows if row["variant"] == name]
        fg = [in9.split_mixed_name(row["file"].rsplit("/", 1)[1].split(".")[0])[0] for row in mine]
        assert fg == [o["file"].rsplit("/", 1)[1].split(".")[0] for o in originals], name
        # One-hot logits: softmax gives e / (e + 8) to the predicted class, 1 / (e + 8) else.
        for row in mine:
            expected = (np.e if row["pred"] == row["label"] else 1.0) / (np.e + NUM - 1)
            assert row["prob_label"] == pytest.approx(expected, rel=1e-5)
    nxt = [row for row in rows if row["variant"] == "mixed_next"]
    assert all(row["bg_label"] == (row["label"] + 1) % NUM for row in nxt)
    assert all(f"/original/val/{in9.CLASS_DIRS[row['bg_label']]}/" in row["bg_file"] for row in nxt)
    assert "variant images: original: released" in (tmp_path / "out" / "results.md").read_text()


def test_regenerating_is_an_explicit_choice(release, monkeypatch, tmp_path):
    names = ("original", "mixed_same", "mixed_rand", "mixed_next", "only_bg_t")
    data = {"data.variants_from": "regenerated"}
    r = score(monkeypatch, tmp_path, release, names, data=data)
    acc = {k: v["accuracy"] for k, v in r["variants"].items()}
    # Regenerated from the flat originals, every variant keeps the label's code at the centre.
    assert acc == dict.fromkeys(names, 1.0) and r["bg_gap"] == 0.0
    regenerated = dict.fromkeys(names[1:], "regenerated")
    assert r["variant_sources"] == dict(original="released") | regenerated
    # Regenerated mixed rows name their donor: mixed_next's comes from the next class.
    rows = pq.read_table(tmp_path / "out" / "records.parquet").to_pylist()
    nxt = [row for row in rows if row["variant"] == "mixed_next"]
    assert all(row["bg_label"] == (row["label"] + 1) % NUM and row["bg_file"] for row in nxt)
    assert r["background_class_share"]["mixed_next"] == {"share": 0.0, "count": 18}


def test_a_release_without_masks_scores_its_released_files(monkeypatch, tmp_path):
    root = write_release(tmp_path / "nomask", with_masks=False)
    assert not (root / "fg_mask").exists()
    r = score(monkeypatch, tmp_path, root)
    assert r["variants"]["mixed_rand"]["accuracy"] == 0.5 and r["bg_gap"] == 0.5
    with pytest.raises(ValueError, match="no foreground masks.*fg_mask"):
        score(monkeypatch, tmp_path, root, data={"data.variants_from": "regenerated"})


def test_released_variants_must_hold_the_same_foregrounds(monkeypatch, tmp_path):
    root = write_release(tmp_path / "short")
    shutil.rmtree(root / "only_bg_t/val" / in9.CLASS_DIRS[0])
    (root / "only_bg_t/val" / in9.CLASS_DIRS[0]).mkdir()
    save(root / "only_bg_t/val" / in9.CLASS_DIRS[0] / "n00000000_1.JPEG", flat(0))
    with pytest.raises(ValueError, match="'only_bg_t' .*17.*different foregrounds"):
        score(monkeypatch, tmp_path, root, ("original", "only_bg_t"))


def test_pretrained_normalisation_comes_from_flags_metadata_or_the_imagenet_default(tmp_path):
    from safetensors.numpy import save_file

    norm = evaluate.pretrained_normalization
    plain, tagged = tmp_path / "plain.safetensors", tmp_path / "tagged.safetensors"
    save_file({"w": np.zeros(1, np.float32)}, str(plain))
    meta = {"mean": json.dumps(list(in9.MEAN)), "std": json.dumps(list(in9.STD))}
    save_file({"w": np.zeros(1, np.float32)}, str(tagged), metadata=meta)
    assert norm(tagged, 9)[:2] == (in9.MEAN, in9.STD) and "metadata" in norm(tagged, 9)[2]
    assert norm(plain, 1000)[:2] == (data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD)
    assert norm(tagged, 9, normalization="imagenet")[0] == data_lib.IMAGENET_MEAN  # flag first
    assert norm(plain, 9, mean=(0.5,) * 3, std=(0.25,) * 3)[:2] == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="9-class model .*no mean/std metadata.*in9"):
        norm(plain, 9)
    with pytest.raises(ValueError, match="--normalization 'in1k'"):
        norm(plain, 9, normalization="in1k")
    with pytest.raises(ValueError, match="--mean and --std go together"):
        norm(plain, 9, mean=(0.5,) * 3)


def test_label_spaces_cub_and_waterbirds(tmp_path):
    """A CUB run scores Waterbirds with species labels; the bird/landbird labels are refused."""
    from ml_collections import ConfigDict

    from bgjax.tasks import classify

    cub = write_cub(tmp_path / "cub")
    (tmp_path / "wb").mkdir()
    wb = write_waterbirds_release(tmp_path / "wb", cub)
    source = lambda **c: data_lib.get_source(ConfigDict(c), "test")
    cub_info = source(name="cub", root=str(cub)).info
    species = source(name="waterbirds", root=str(wb), cub_root=str(cub), label="species").info
    classify.check_label_space(cub_info, species)
    classify.check_label_space(species, cub_info)  # a species-labelled Waterbirds run -> CUB
    birds = source(name="waterbirds", root=str(wb), cub_root=str(cub)).info
    refused = "'cub' .*cannot be scored on 'waterbirds' .2 classes.*label=species"
    with pytest.raises(ValueError, match=refused):
        classify.check_label_space(cub_info, birds)
    renamed = dataclasses.replace(species, class_names=("x", *species.class_names[1:]))
    with pytest.raises(ValueError, match="class names differ .1 of 10, e.g. 0: 'Black"):
        classify.check_label_space(cub_info, renamed)
    classify.check_label_space(cub_info, renamed, by_index=True)

    # Scored by species, the groups stay waterbird/landbird x habitat.
    assert species.group_names() == birds.group_names() and len(birds.group_names()) == 4
    np.testing.assert_array_equal(species.train_group_proportions, birds.train_group_proportions)
    n = species.labels.size
    pred = np.where(np.arange(n) % 2 == 0, species.labels, -1)  # every other image right
    original = dict(pred=pred, label=species.labels, habitat=species.habitats)
    groups = classify.summarize({"original": original}, species)["groups"]
    for g, name in enumerate(birds.group_names()):
        rows = np.flatnonzero(birds.labels * 2 + birds.habitats == g)
        want = None if rows.size == 0 else float(np.mean(rows % 2 == 0))
        assert groups[name] == {"accuracy": want, "count": rows.size}, name


# ------------------------------------------------------------------------------ a trained run


@pytest.fixture(scope="module")
def nine_class_run(tmp_path_factory):
    """A 1-step tiny ConvNeXt trained on 9-class synthetic data (class names: shapes)."""
    overrides = {"data.num_classes": 9, "optimizer.warmup_steps": 0}
    return train_tiny_run(
        tmp_path_factory.mktemp("run9"), "synthetic.py:size=tiny", overrides, total_steps=1
    )


@pytest.mark.slow
def test_a_trained_run_is_scored_on_the_in9_release(nine_class_run, release, tmp_path):
    overrides = {"data.root": str(release)}  # not a key of the synthetic config
    kwargs = dict(dataset="in9", overrides=overrides, batch_size=8, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="class names differ.*--label_map=by_index"):
        evaluate.evaluate_checkpoint(nine_class_run, **kwargs)
    names = ("original", "mixed_same", "mixed_rand")
    r = evaluate.evaluate_checkpoint(nine_class_run, variant_names=names, by_index=True, **kwargs)
    assert r["dataset"] == "in9" and r["trained_on"] == "synthetic" and r["split"] == "val"
    assert r["label_mapping"] == "by_index" and r["variant_sources"]["mixed_rand"] == "released"
    assert all(v["count"] == 18 for v in r["variants"].values())
    # The model keeps its training normalisation and size; model keys stay frozen.
    assert r["normalization"]["from"] == "training dataset" and r["image_size"] == 32
    with pytest.raises(ValueError, match="model keys cannot be overridden"):
        frozen = dict(kwargs, overrides={"model.masking": "early"})
        evaluate.evaluate_checkpoint(nine_class_run, **frozen)
