"""The Grain pipeline: determinism, variants, eval padding, sharding, checkpoints, global arrays."""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from bgjax import variants
from bgjax.data import DatasetInfo, pipeline, synthetic

NUM_CLASSES = 3
AUGMENT = dict(random_resized_crop=dict(scale=(0.35, 1.0)), flip=True, color_jitter=0.2)


class FlatSource:
    """Example i is one flat colour that encodes i, with a centred square foreground.

    A composite's background pixels therefore name the donor exactly (ONLY_BG_T of a flat image
    is flat), and `habitat` = i names the example in a batch.
    """

    def __init__(self, n: int, size: int = 16):
        self.size = size
        labels = (np.arange(n) % NUM_CLASSES).astype(np.int32)
        names = tuple(f"class{c}" for c in range(NUM_CLASSES))
        self.info = DatasetInfo(name="flat", split="test", class_names=names, labels=labels)

    def __len__(self) -> int:
        return len(self.info.labels)

    def __getitem__(self, index: int) -> dict:
        s, q = self.size, self.size // 4
        image = np.empty((s, s, 3), np.uint8)
        image[...] = (1 + index % 250, 1 + index // 250, 7)
        mask = np.zeros((s, s), np.uint8)
        mask[q : s - q, q : s - q] = 1
        return dict(
            image=image,
            mask=mask,
            bbox=np.array([q, q, s - q, s - q], np.int32),
            label=self.info.labels[index],
            habitat=np.int32(index),
        )


def decode_index(pixel: np.ndarray) -> int:
    """Inverse of FlatSource's colour; -1 for a black pixel."""
    r, g = int(pixel[0]), int(pixel[1])
    return -1 if r == 0 else (r - 1) + (g - 1) * 250


def batches(ds, count=None) -> list[dict]:
    it = iter(ds)
    return [b for _, b in zip(range(count), it)] if count else list(it)


def rows(batch_list) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batch_list]) for k in batch_list[0]}


def build(source, **kwargs):
    args = dict(batch_size=8, image_size=16, train=False, seed=0) | kwargs
    return pipeline.build(source, **args)


def test_batch_structure_and_resize():
    source = FlatSource(10, size=24)  # 24 px source, 16 px batches: the pipeline resizes
    b = batches(build(source, train=True, augment=None), 1)[0]
    assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.uint8
    assert b["mask"].shape == (8, 16, 16) and b["mask"].dtype == np.uint8
    assert set(np.unique(b["mask"])) == {0, 1}
    assert b["label"].dtype == np.int32 and b["habitat"].dtype == np.int32
    assert b["valid"].dtype == bool and b["valid"].all()
    np.testing.assert_array_equal(b["label"], source.info.labels[b["habitat"]])


def test_same_seed_same_batches_other_seed_differs():
    source = FlatSource(40)
    kwargs = dict(train=True, variant="mixed_rand", augment=AUGMENT, num_epochs=2)
    a, b = (rows(batches(build(source, seed=3, **kwargs))) for _ in range(2))
    c = rows(batches(build(source, seed=4, **kwargs)))
    assert len(a["label"]) == 80
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["habitat"], c["habitat"])  # order
    assert not np.array_equal(a["image"], c["image"])
    # Two training epochs: each example once per epoch, reshuffled.
    first, second = a["habitat"][:40], a["habitat"][40:]
    assert sorted(first) == sorted(second) == list(range(40))
    assert not np.array_equal(first, second)


def donors(batch_rows) -> np.ndarray:
    return np.array([decode_index(image[0, 0]) for image in batch_rows["image"]])


@pytest.mark.parametrize("variant", ["mixed_same", "mixed_rand", "mixed_next"])
def test_mixed_partners_follow_class_rules(variant):
    source = FlatSource(90)
    labels = source.info.labels
    r = rows(batches(build(source, variant=variant, batch_size=10)))  # 90 rows, no padding
    own, donor = r["habitat"], donors(r)
    centre = np.array([decode_index(image[8, 8]) for image in r["image"]])
    np.testing.assert_array_equal(centre, own)  # the foreground is the example's own
    assert np.all(donor >= 0)
    if variant == "mixed_same":
        np.testing.assert_array_equal(labels[donor], labels[own])
        assert np.all(donor != own)
    elif variant == "mixed_next":
        np.testing.assert_array_equal(labels[donor], (labels[own] + 1) % NUM_CLASSES)
    else:
        counts = np.bincount(labels[donor], minlength=NUM_CLASSES)
        assert counts.min() > 15, counts  # 90 draws over 3 classes, ~30 each
    assert len(set(donor)) > 20  # random members, not one fixed partner per class


def test_training_epochs_draw_fresh_partners():
    source = FlatSource(30)
    r = rows(batches(build(source, variant="mixed_same", train=True, num_epochs=2, batch_size=6)))
    partner = {0: {}, 1: {}}
    for position, (own, donor) in enumerate(zip(r["habitat"], donors(r))):
        partner[position // 30][own] = donor
    changed = np.mean([partner[0][i] != partner[1][i] for i in range(30)])
    assert changed > 0.5


def test_variant_mixture_follows_weights():
    source = FlatSource(400)
    r = rows(batches(build(source, variant={"original": 3.0, "only_fg": 1.0}, batch_size=40)))
    corner = donors(r)
    is_only_fg = corner == -1  # only_fg has a black background
    np.testing.assert_array_equal(corner[~is_only_fg], r["habitat"][~is_only_fg])
    assert abs(is_only_fg.mean() - 0.25) < 0.07  # 3 sigma of 400 draws


def test_eval_pads_last_batch_and_keeps_every_example():
    source = FlatSource(23)
    bl = batches(build(source, batch_size=8))
    assert len(bl) == 3 and all(b["image"].shape[0] == 8 for b in bl)
    r = rows(bl)
    assert r["valid"].sum() == 23 and not r["valid"][-1]
    assert sorted(r["habitat"][r["valid"]]) == list(range(23))
    np.testing.assert_array_equal(r["habitat"][r["valid"]], np.arange(23))  # in order
    assert not r["image"][~r["valid"]].any()


def test_eval_without_padding_shortens_last_batch():
    bl = batches(build(FlatSource(23), batch_size=8, pad_to_batch=False))
    assert [len(b["label"]) for b in bl] == [8, 8, 7]
    assert all(b["valid"].all() for b in bl)


def test_mask_marks_the_foreground_after_composite_and_augment():
    """mixed_same: foreground in the example's colour, background in the donor's. After crop and
    flip the mask must mark the example's colour, bar the resampled edge."""
    source = FlatSource(60, size=32)
    kwargs = dict(variant="mixed_same", train=True, augment=AUGMENT | dict(color_jitter=0.0))
    r = rows(batches(build(source, image_size=24, **kwargs), 4))
    checked = 0
    for image, mask, own in zip(r["image"], r["mask"], r["habitat"]):
        red, fg = image[..., 0].astype(int), mask.astype(bool)
        if fg.all() or not fg.any():
            continue
        own_red, donor_red = 1 + own % 250, np.bincount(red[~fg]).argmax()
        closer_to_own = np.abs(red - own_red) < np.abs(red - donor_red)
        windows = sliding_window_view(np.pad(fg, 1, mode="edge"), (3, 3))
        near_edge = windows.any(axis=(-1, -2)) != windows.all(axis=(-1, -2))
        assert not np.any((closer_to_own != fg) & ~near_edge)
        checked += 1
    assert checked > 20


def test_two_processes_disjoint_complete_equal_batch_counts():
    source = FlatSource(29)
    shares = [
        batches(build(source, batch_size=8, process_index=i, process_count=2)) for i in range(2)
    ]
    assert len(shares[0]) == len(shares[1]) == 4  # 15 and 14 examples -> 4 batches of 4
    assert all(b["label"].shape == (4,) for share in shares for b in share)
    seen = [rows(share)["habitat"][rows(share)["valid"]] for share in shares]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(29))
    # Training: disjoint within the (finite) run, and the same number of batches everywhere.
    train = [
        rows(batches(build(source, train=True, num_epochs=1, process_index=i, process_count=2)))
        for i in range(2)
    ]
    assert len(train[0]["habitat"]) == len(train[1]["habitat"]) == 12  # 14 each, drop remainder
    assert not set(train[0]["habitat"]) & set(train[1]["habitat"])


def test_iterator_checkpoint_round_trip(tmp_path):
    source = FlatSource(50)
    make = lambda: iter(build(source, train=True, variant="mixed_rand", augment=AUGMENT, seed=1))
    it = make()
    for _ in range(3):
        next(it)
    manager = ocp.CheckpointManager(tmp_path, item_names=("data",))
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(2)]
    restored = make()
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    for want, got in zip(expected, [next(restored) for _ in range(2)]):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    manager.close()


def test_device_prefetch_saves_the_position_of_the_last_consumed_batch():
    """Two batches queued on the devices ahead: the iterator's state is still that of the last
    batch handed out, and restoring it continues with the next one."""
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    source = FlatSource(64)
    host = lambda: build(source, train=True, variant="mixed_rand", seed=1, num_devices=4)
    pulled = []  # batches the prefetch thread took from the host iterator
    counted = host().map(lambda batch: pulled.append(1) or batch)
    it = iter(pipeline.on_devices(counted, mesh, keys=("image", "habitat"), prefetch=2))
    consumed = 3
    first = [next(it) for _ in range(consumed)][0]
    deadline = time.monotonic() + 30
    while len(pulled) < consumed + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(pulled) >= consumed + 2  # the queue really ran ahead
    assert set(first) == {"image", "habitat"}
    assert first["image"].sharding.spec == jax.sharding.PartitionSpec(("data",))
    plain = iter(host())
    for _ in range(consumed):
        next(plain)
    assert it.get_state() == plain.get_state()

    resumed = iter(pipeline.on_devices(host(), mesh, keys=("image", "habitat"), prefetch=2))
    resumed.set_state(it.get_state())
    expected = next(plain)
    for batch in (next(it), next(resumed)):
        for key in batch:
            np.testing.assert_array_equal(np.asarray(batch[key]), expected[key])
    it.close()
    resumed.close()
    with pytest.raises(ValueError, match="prefetch_to_device must be >= 0"):
        pipeline.on_devices(host(), mesh, prefetch=-1)


@pytest.mark.parametrize("shape,axes", [((4,), ("data",)), ((2, 2), ("data", "fsdp"))])
def test_global_batch_sharded_over_all_mesh_axes(shape, axes):
    mesh = jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
    local = batches(build(FlatSource(16), num_devices=mesh.size), 1)[0]
    glob = pipeline.to_global(local, mesh)
    assert glob["image"].shape == (8, 16, 16, 3) and glob["valid"].shape == (8,)
    for key, array in glob.items():
        assert len(array.addressable_shards) == 4
        for shard in array.addressable_shards:
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), local[key][shard.index])
    with pytest.raises(ValueError, match=r"6 .*4 devices"):
        pipeline.to_global({k: v[:6] for k, v in local.items()}, mesh)


def test_normalize_on_device():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = jax.jit(lambda x: pipeline.normalize(x, mean, std))(images)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    assert pipeline.normalize(images, mean, std, dtype=np.dtype("bfloat16")).dtype.name == (
        "bfloat16"
    )


def test_bad_arguments_raise_clear_errors():
    source = FlatSource(10)
    with pytest.raises(ValueError, match=r"batch_size 6 .*4 processes"):
        build(source, batch_size=6, process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"batch_size 6 .*4 devices"):
        build(source, batch_size=6, num_devices=4)
    with pytest.raises(ValueError, match="positive"):
        build(source, batch_size=0)
    with pytest.raises(ValueError, match="unknown variant"):
        build(source, variant="mixed_everything")
    with pytest.raises(ValueError, match="weights"):
        build(source, variant={"original": -1.0})
    plain = [source[i] for i in range(4)]  # a list is a source, but has no .info.labels
    with pytest.raises(ValueError, match="info.labels"):
        build(plain, variant="mixed_same")


def test_synthetic_source_through_workers():
    """The real synthetic source, a mixture with mixed_rand, augmentation, two worker processes
    (each computes its slice of the batches)."""
    source = synthetic.make_source(dict(name="synthetic", image_size=32, train_size=40), "train")
    kwargs = dict(
        variant={"original": 1.0, "mixed_rand": 1.0},
        batch_size=8,
        image_size=24,
        train=True,
        seed=0,
        augment=AUGMENT,
        num_epochs=1,
    )
    in_process = rows(batches(pipeline.build(source, **kwargs)))
    workers = rows(batches(pipeline.build(source, worker_count=2, **kwargs)))
    assert in_process["image"].shape == (40, 24, 24, 3)
    for key in in_process:
        np.testing.assert_array_equal(in_process[key], workers[key])
    # One epoch: every example once, so the label multiset is the source's.
    np.testing.assert_array_equal(np.sort(in_process["label"]), np.sort(source.info.labels))


@pytest.fixture(scope="module")
def bench():
    """benchmarks/pipeline.py as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("bgjax_benchmarks_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


SMALLEST_BENCH = ["--n", "16", "--batch", "8", "--size", "32", "--workers", "0"]


def test_pipeline_benchmark_runs_and_reports_every_row(bench, tmp_path):
    """benchmarks/pipeline.py at its smallest: every row timed, ratios against the reference."""
    out = tmp_path / "pipeline.json"
    bench.main([*SMALLEST_BENCH, "--jitter", "0.2", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"ours/arrays", "ours/jpeg", "reference/arrays", "reference/jpeg"}
    for row in results.values():
        assert row["images"] == 16 and row["img_s_core"] > 0
        assert math.isfinite(row["ratio_vs_reference"]) and row["ratio_vs_reference"] > 0


def test_pipeline_benchmark_scaling_covers_each_recipe_and_size(bench, tmp_path):
    """`--scaling`: one row per source size x recipe x worker count, each with the cores an
    accelerator needs at its per-core rate; the larger JPEGs really are that size."""
    out = tmp_path / "scaling.json"
    bench.main([*SMALLEST_BENCH, "--scaling", "--large", "48x40", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    sizes = ("32px", "48x40")
    assert set(results) == {f"{s}/{recipe}/workers=0" for s in sizes for recipe in bench.RECIPES}
    for row in results.values():
        assert row["img_s_core"] > 0 and row["state_us"] > 0
        assert row["cores_per_accelerator"] == pytest.approx(bench.TARGET_IMG_S / row["img_s_core"])
    rendered = synthetic.make_source(dict(name="synthetic", image_size=32, train_size=2), "train")
    large = bench.JpegSource(rendered, 4, shape=(40, 48))
    assert large[3]["image"].shape == (40, 48, 3) and large[3]["mask"].shape == (40, 48)


@pytest.mark.parametrize("variant", ["only_bg_t", "no_fg", "only_fg", "mixed_rand"])
def test_variants_without_the_foreground_have_an_empty_mask(variant):
    r = rows(batches(build(FlatSource(12, size=32), variant=variant, image_size=32), 4))
    has_fg = r["mask"][r["valid"]].reshape(int(r["valid"].sum()), -1).any(axis=1)
    assert len(has_fg) == 12
    assert not has_fg.any() if variant in variants.NO_FOREGROUND else has_fg.all()


def test_load_examples_resizes_as_evaluation_does():
    """Analyses (saliency, adversarial) see what `bgjax eval` scores: the eval resize rule."""
    source = FlatSource(6, size=24)  # foreground: the central half of each side
    crop = pipeline.EvalResize(rule="resize_crop", crop_pct=0.5)  # keeps the central half
    warped = pipeline.load_examples(source, "original", image_size=16, seed=0)
    cropped = pipeline.load_examples(source, "original", image_size=16, seed=0, eval_resize=crop)
    assert warped["mask"].mean() == pytest.approx(0.25) and cropped["mask"].mean() == 1.0
    evaluated = rows(batches(build(source, eval_resize=crop)))
    np.testing.assert_array_equal(cropped["image"], evaluated["image"][evaluated["valid"]])
