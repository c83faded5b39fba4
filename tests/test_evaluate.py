"""`bgjax eval` on models whose every prediction is known.

The "models" read one pixel: `CodeReader` decodes the value of channel `channel` at `pixel` into a
code k (pixel value 20 + 20k) and outputs the one-hot logits of `table[k]`. `CodedSource` draws
a foreground square whose channel 0 encodes a hand-set prediction code, on a background whose
channel 0 encodes the habitat and channel 1 the label; so reading the centre gives the
hand-set predictions for every variant that keeps the foreground, and reading the corner gives
the background's label.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from absl import flags
from flax import nnx

from bgjax import config_utils, evaluate, metrics, parallel, tasks, variants
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib
from bgjax.data import DatasetInfo, pipeline
from bgjax.tasks import classify

REPO = Path(__file__).resolve().parents[1]

SIZE, BATCH = 16, 8
CENTRE, CORNER = (8, 8), (0, 0)
# 22 examples: not a multiple of the batch (8) nor of the device count (4).
LABEL = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2])
HABITAT = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
CODE = np.array([0, 0, 0, 0, 5, 0, 1, 1, 1, 1, 1, 0, 1, 4, 2, 2, 2, 0, 2, 0, 3, 2])
# Hand count of CODE == LABEL: class 0 rows 0-7 -> 0,1,2,3,5 (5); class 1 rows 8-14 -> 8,9,10,
# 12 (4); class 2 rows 15-21 -> 15,16,18,21 (4). 13 of 22.
ORIGINAL_CORRECT = 13
PROPORTIONS = np.arange(1, 19, dtype=np.float64) / np.arange(1, 19).sum()


def encode(code):
    return np.uint8(20 + 20 * code)


class CodedSource:
    def __init__(self):
        self.info = DatasetInfo(
            name="coded",
            split="test",
            class_names=tuple(f"c{i}" for i in range(9)),
            labels=LABEL.astype(np.int32),
            habitats=HABITAT.astype(np.int32),
            habitat_names=("h0", "h1"),
            image_size=SIZE,
            train_group_proportions=PROPORTIONS,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
        )

    def __len__(self):
        return LABEL.size

    def __getitem__(self, i):
        image = np.zeros((SIZE, SIZE, 3), np.uint8)
        image[..., 0] = encode(HABITAT[i])
        image[..., 1] = encode(LABEL[i])
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[4:12, 4:12] = 1
        image[4:12, 4:12, 0] = encode(CODE[i])
        image[4:12, 4:12, 1] = 0
        return dict(
            image=image,
            mask=mask,
            bbox=np.array([4, 4, 12, 12], np.int32),
            label=np.int32(LABEL[i]),
            habitat=np.int32(HABITAT[i]),
        )


class CodeReader(nnx.Module):
    def __init__(self, table, num_classes, pixel, channel, mean=(0.0,) * 3, std=(1.0,) * 3):
        self.table = tuple(int(t) for t in table)
        self.num_classes = num_classes
        self.pixel, self.channel = pixel, channel
        self.mean, self.std = mean[channel], std[channel]  # to undo the normalisation
        self.masking = "none"

    def __call__(self, x, mask=None, *, train=False):
        value = (x[:, self.pixel[0], self.pixel[1], self.channel] * self.std + self.mean) * 255.0
        code = jnp.clip(jnp.round((value - 20.0) / 20.0), 0, len(self.table) - 1).astype(int)
        return jax.nn.one_hot(jnp.asarray(self.table)[code], self.num_classes)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 4
    return parallel.make_mesh([("data", -1)])


def evaluator(model, mesh):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ev = classify.Evaluator(
        graphdef, mesh, num_classes=model.num_classes, mean=(0, 0, 0), std=(1, 1, 1),
        masked=False,
    )  # fmt: skip
    return ev, params, rest


def score(model, mesh, names=variants.VARIANTS):
    ev, params, rest = evaluator(model, mesh)
    return ev(params, rest, CodedSource(), names, batch_size=BATCH, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def centre_results(mesh):
    return score(CodeReader(range(9), 9, CENTRE, 0), mesh)


def test_foreground_reader_variant_accuracies_are_exact(centre_results):
    r = centre_results
    n = LABEL.size
    keeps_fg = ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next")
    for name in keeps_fg:
        assert r["variants"][name] == {"accuracy": ORIGINAL_CORRECT / n, "count": n}, name
    # only_bg_t: the box is tiled with background, whose channel 0 is the habitat code: right
    # where habitat == label, rows 0-4 (c0/h0) and 8-11 (c1/h1).
    assert r["variants"]["only_bg_t"] == {"accuracy": 9 / n, "count": n}
    # only_bg_b / no_fg: the centre is black -> code 0 -> class 0: right for the 8 class-0 rows.
    for name in ("only_bg_b", "no_fg"):
        assert r["variants"][name] == {"accuracy": 8 / n, "count": n}, name
    assert r["bg_gap"] == 0.0
    assert r["num_examples"] == n and r["imagenet_to_in9"] is False


def test_foreground_reader_groups_and_buckets_are_exact(centre_results):
    groups = centre_results["groups"]
    assert len(groups) == 18
    # (label, habitat): rows -> correct
    assert groups["c0/h0"] == {"accuracy": 4 / 5, "count": 5}  # rows 0-4: 0,1,2,3
    assert groups["c0/h1"] == {"accuracy": 1 / 3, "count": 3}  # rows 5-7: 5
    assert groups["c1/h1"] == {"accuracy": 3 / 4, "count": 4}  # rows 8-11: 8,9,10
    assert groups["c1/h0"] == {"accuracy": 1 / 3, "count": 3}  # rows 12-14: 12
    assert groups["c2/h0"] == {"accuracy": 2 / 2, "count": 2}  # rows 15-16
    assert groups["c2/h1"] == {"accuracy": 2 / 5, "count": 5}  # rows 17-21: 18, 21
    assert groups["c5/h0"] == {"accuracy": None, "count": 0}
    assert centre_results["worst_group_accuracy"] == 1 / 3
    # groups c0/h0, c0/h1, c1/h0, c1/h1, c2/h0, c2/h1 carry proportions 1..6 (of 171)
    accs = [4 / 5, 1 / 3, 1 / 3, 3 / 4, 1.0, 2 / 5]
    expected = sum(w * a for w, a in zip(range(1, 7), accs)) / sum(range(1, 7))
    assert centre_results["average_accuracy"] == pytest.approx(expected, abs=1e-12)
    # Buckets: fg correct (mixed_rand) = original correct = rows 0-3,5,8-10,12,15,16,18,21;
    # bg correct (only_bg_t) = rows 0-4, 8-11. Both: 0-3, 8-10 (7); fg only: 5,12,15,16,18,21
    # (6); bg only: 4, 11 (2); neither: the other 7.
    assert centre_results["buckets"] == {
        "fg_correct_bg_correct": {"count": 7, "fraction": 7 / 22, "original_accuracy": 1.0},
        "fg_correct_bg_wrong": {"count": 6, "fraction": 6 / 22, "original_accuracy": 1.0},
        "fg_wrong_bg_correct": {"count": 2, "fraction": 2 / 22, "original_accuracy": 0.0},
        "fg_wrong_bg_wrong": {"count": 7, "fraction": 7 / 22, "original_accuracy": 0.0},
    }


def test_predictions_keep_every_example_in_index_order(mesh):
    model = CodeReader(range(9), 9, CENTRE, 0)
    ev, params, rest = evaluator(model, mesh)
    for name in ("original", "mixed_rand"):
        p = ev.predict(params, rest, CodedSource(), name, batch_size=BATCH, image_size=SIZE, seed=0)
        np.testing.assert_array_equal(p["pred"], CODE)
        np.testing.assert_array_equal(p["label"], LABEL)
        np.testing.assert_array_equal(p["habitat"], HABITAT)


def test_background_reader_bg_gap(mesh):
    names = ("original", "mixed_same", "mixed_rand", "mixed_next")
    r = score(CodeReader(range(9), 9, CORNER, 1), mesh, names)
    assert r["variants"]["original"]["accuracy"] == 1.0
    assert r["variants"]["mixed_same"]["accuracy"] == 1.0  # same-class donor: same label code
    assert r["variants"]["mixed_next"]["accuracy"] == 0.0  # donor of the next class
    # mixed_rand: the donor class is random; recount it on the host from the composites.
    rand = pipeline.load_examples(CodedSource(), "mixed_rand", image_size=SIZE, seed=0)
    donor_label = (rand["image"][:, 0, 0, 1].astype(int) - 20) // 20
    expected = float(np.mean(donor_label == LABEL))
    assert 0 < expected < 1
    assert r["variants"]["mixed_rand"]["accuracy"] == expected
    assert r["bg_gap"] == 1.0 - expected


def test_imagenet_model_is_scored_through_the_in9_mapping(mesh):
    # codes -> ImageNet classes: 0 dog(151), 1 bird(7), 2 unmapped(171), 3 fish(0),
    # 4 unmapped(999), 5 wheeled vehicle(407)
    table = (151, 7, 171, 0, 999, 407)
    r = score(CodeReader(table, 1000, CENTRE, 0), mesh, ("original",))
    mapped = metrics.IMAGENET_TO_IN9[np.array(table)[CODE]]
    # Hand count: class 0 right where CODE==0 (rows 0-3, 5: 5); class 1 where CODE==1 (rows
    # 8,9,10,12: 4); class 2 = "wheeled vehicle" needs code 5: none (rows 15,16,18,21 are
    # code 2 = unmapped). 9 of 22.
    assert int((mapped == LABEL).sum()) == 9
    assert r["variants"]["original"] == {"accuracy": 9 / 22, "count": 22}
    assert r["imagenet_to_in9"] is True
    with pytest.raises(ValueError, match="1000-class"):
        score(CodeReader(range(5), 5, CENTRE, 0), mesh, ("original",))


def test_pretrained_model_uses_imagenet_normalisation_and_the_mapping(monkeypatch, tmp_path):
    from bgjax import models

    loaded = {}

    def from_timm(name, weights, img_size=None):
        loaded.update(name=name, weights=weights, img_size=img_size)
        mean, std = data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD
        return CodeReader((151, 7, 171, 0, 999, 407), 1000, CENTRE, 0, mean, std)

    monkeypatch.setattr(models, "from_timm", from_timm)
    monkeypatch.setattr(data_lib, "get_source", lambda config, split: CodedSource())
    weights = tmp_path / "w.safetensors"  # read only for its checksum: from_timm is replaced
    safetensors.numpy.save_file({"unused": np.zeros(1, np.float32)}, weights)
    r = evaluate.evaluate_pretrained(
        "convnext_tiny", weights, "coded", out_dir=tmp_path / "out", variant_names=("original",),
        overrides={"data.image_size": "16"}, batch_size=8,
    )  # fmt: skip
    # The evaluation size: a ViT's position embedding is resampled to it on load.
    assert loaded == {"name": "convnext_tiny", "weights": str(weights), "img_size": 16}
    assert r["variants"]["original"] == {"accuracy": 9 / 22, "count": 22}  # as the test above
    assert r["pretrained"] == "convnext_tiny" and r["split"] == "test"
    assert r["init_weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert r["normalization"]["mean"] == list(data_lib.IMAGENET_MEAN)
    assert r["normalization"]["from"] == "ImageNet default (1000-class model)"
    assert json.loads((tmp_path / "out" / "results.json").read_text())["imagenet_to_in9"]


def test_example_index_matches_the_multi_process_layout():
    source, procs, batch = CodedSource(), 2, BATCH
    per_process = [
        list(
            pipeline.build(
                source, batch_size=batch, image_size=SIZE, train=False, seed=0,
                process_index=p, process_count=procs,
            )
        )
        for p in range(procs)
    ]  # fmt: skip
    num_batches = len(per_process[0])
    rows = [per_process[p][k] for k in range(num_batches) for p in range(procs)]
    label = np.concatenate([r["label"] for r in rows])
    valid = np.concatenate([r["valid"] for r in rows])
    index = classify.example_index(num_batches, batch, procs)
    assert valid.sum() == LABEL.size
    np.testing.assert_array_equal(label[valid], LABEL[index[valid]])
    np.testing.assert_array_equal(np.sort(index[valid]), np.arange(LABEL.size))


def test_results_files(centre_results, tmp_path):
    results = dict(centre_results, step=7, dataset="coded", split="test", model="m")
    paths = tasks.write_results(results, tmp_path / "out")
    with open(paths["json"]) as f:
        loaded = json.load(f)
    assert loaded["variants"]["original"]["count"] == 22
    assert set(loaded["variants"]) == set(variants.VARIANTS)
    text = open(paths["md"]).read()
    assert "BG-gap" in text and "| c0/h1 | 33.33 | 3 |" in text and "fg_wrong_bg_correct" in text
    assert (tmp_path / "out" / "variants.png").stat().st_size > 1000


# ------------------------------------------------------------------------------ errors


def _fake_steps(workdir, steps, unfinished=()):
    for step in (*steps, *unfinished):
        d = workdir / "checkpoints" / str(step)
        d.mkdir(parents=True)
        if step not in unfinished:
            (d / "commit_success.txt").write_text("ok")


def test_steps_are_listed_and_checked(tmp_path):
    _fake_steps(tmp_path, (10, 2, 30), unfinished=(40,))
    assert workdir_lib.steps(tmp_path) == [2, 10, 30]
    assert workdir_lib.resolve_steps(tmp_path) == [30]
    assert workdir_lib.resolve_steps(tmp_path, all_steps=True) == [2, 10, 30]
    with pytest.raises(ValueError, match="step 5 does not exist.*available steps: 2, 10, 30"):
        workdir_lib.resolve_steps(tmp_path, 5)
    with pytest.raises(FileNotFoundError, match="checkpoints does not exist"):
        workdir_lib.resolve_steps(tmp_path / "nope")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        workdir_lib.steps(tmp_path / "empty")


def test_missing_workdir_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints does not exist"):
        workdir_lib.restore(tmp_path / "missing")
    _fake_steps(tmp_path, (1,))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        workdir_lib.restore(tmp_path)


def test_variants_are_checked():
    assert variants.parse("all") == variants.VARIANTS
    assert variants.parse("mixed_rand, original") == ("mixed_rand", "original")
    with pytest.raises(ValueError, match="unknown variant.*mixd_rand.*valid: all, original"):
        variants.parse("original,mixd_rand")


def test_config_overrides():
    config = ml_collections.ConfigDict(dict(seed=0, data=dict(name="synthetic", image_size=32)))
    out = config_utils.apply_overrides(config, {"data.image_size": "64", "data.name": "in9"})
    assert out.data.image_size == 64 and out.data.name == "in9" and config.data.image_size == 32
    with pytest.raises(ValueError, match="unknown config key 'data.imagesize'.*image_size"):
        config_utils.apply_overrides(config, {"data.imagesize": "64"})
    with pytest.raises(ValueError, match="model keys cannot be overridden"):
        config_utils.apply_overrides(config, {"model.masking": "early"}, frozen=("model",))
    with pytest.raises(ValueError, match="--config.data.image_size"):
        config_utils.apply_overrides(config, {"data.image_size": "big"})
    new = config_utils.apply_overrides(config, {"data.root": "/x"}, allow_new=True)
    assert new.data.root == "/x"


def test_override_flags_are_collected():
    fv = flags.FlagValues()
    argv = ["prog", "--config.data.image_size=64", "--config.seed", "3"]
    config_utils.define_override_flags(argv, fv)
    fv(argv)
    assert config_utils.override_flag_values(fv) == {"data.image_size": "64", "seed": "3"}


def test_evaluation_and_analyses_do_not_import_the_trainer():
    """`bgjax eval` and the analyses restore models through the flag-free `bgjax.workdir`."""
    code = (
        "import sys; from absl import flags; import bgjax.workdir; "
        "assert 'config' not in flags.FLAGS and 'workdir' not in flags.FLAGS; "
        "import bgjax.evaluate, bgjax.analysis.adversarial, bgjax.analysis.compare, "
        "bgjax.analysis.saliency; assert 'bgjax.train' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------ end to end


def train_tiny_run(workdir, config_name: str, overrides=None, **updates):
    """A real run of `config_name` (+ dotted `overrides`, top-level `updates`) in `workdir`,
    checkpointed every step, without periodic evaluation."""
    from bgjax import train

    config = config_utils.apply_overrides(config_utils.load_config(config_name), overrides or {})
    config.update(progress_bar=False, **updates)
    config.checkpoint.every_steps = 1
    config.eval.every_steps = 0
    train.train(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A real 2-step ViT run (FSDP over 2 x 2 devices), checkpoints at steps 1 and 2."""
    return train_tiny_run(
        tmp_path_factory.mktemp("run"), "synthetic.py:arch=vit,size=tiny", total_steps=2,
        mesh=[("data", 2), ("fsdp", 2)],
    )  # fmt: skip


@pytest.mark.slow
def test_eval_adversarial_saliency_compare_on_a_trained_workdir(trained_workdir):
    from bgjax.analysis import adversarial, compare, saliency

    workdir = trained_workdir
    assert workdir_lib.steps(workdir) == [1, 2]
    # 22 validation images, batch 8 over 4 devices: the last batch is padded.
    overrides = {"data.val_size": "22"}
    results = evaluate.evaluate_checkpoint(workdir, split="val", overrides=overrides, batch_size=8)
    saved = json.loads((workdir / "eval" / "step_2" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["step"] == 2 and saved["model"] == "vit_tiny_patch16_224"
    assert set(saved["variants"]) == set(variants.VARIANTS)
    assert all(v["count"] == 22 and 0 <= v["accuracy"] <= 1 for v in saved["variants"].values())
    accs = {k: v["accuracy"] for k, v in saved["variants"].items()}
    assert saved["bg_gap"] == accs["mixed_same"] - accs["mixed_rand"]
    assert len(saved["groups"]) == 16 and sum(g["count"] for g in saved["groups"].values()) == 22
    assert saved["buckets"] is not None and saved["mask_source"] == "gt"
    assert (workdir / "eval" / "step_2" / "variants.png").exists()

    report = adversarial.analyze(
        workdir, 1, max_backgrounds=6, max_foregrounds=10, split="val", batch_size=8,
        overrides=overrides,
    )  # fmt: skip
    assert report["num_foregrounds"] == 10 and report["max_backgrounds"] == 6
    assert report["forward_passes"] <= 60
    assert json.loads((workdir / "eval" / "step_1" / "adversarial.json").read_text())["step"] == 1

    report = saliency.analyze(workdir, n=6, split="val", batch_size=4, overrides=overrides)
    assert report["num_images"] == 6 and set(report["methods"]) == set(saliency.METHODS)
    assert (workdir / "eval" / "step_2" / "saliency.png").exists()

    text = compare.compare([workdir], workdir / "cmp")
    assert "vit_tiny_patch16_224 · none · train original" in text


@pytest.mark.slow
def test_eval_command_line(trained_workdir):
    def bgjax(*args):
        cmd = [sys.executable, "-m", "bgjax.cli", "eval", "--workdir", str(trained_workdir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)

    done = bgjax("--step", "7")
    assert done.returncode == 2
    assert "step 7 does not exist" in done.stderr and "available steps: 1, 2" in done.stderr
    done = bgjax("--config.data.val_sise=3")
    assert done.returncode == 2 and "unknown config key 'data.val_sise'" in done.stderr
    out = trained_workdir / "cli"
    done = bgjax("--all_steps", "--split", "val", "--variants", "original,mixed_rand",
                 "--config.data.val_size=10", "--batch_size", "4", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for step in (1, 2):
        saved = json.loads((out / f"step_{step}" / "results.json").read_text())
        assert saved["variants"]["original"]["count"] == 10 and saved["step"] == step
