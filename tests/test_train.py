"""The trainer: mesh-independence, gradient accumulation, NaN stop, resume after SIGTERM."""

import functools
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bgjax import config_utils, parallel, tasks, train, train_state, train_step
from bgjax import data as data_lib
from bgjax import workdir as workdir_lib
from bgjax.data import pipeline
from bgjax.tasks import classify

REPO = Path(__file__).resolve().parents[1]
TINY = "synthetic.py:arch=vit,size=tiny"  # a packaged config, by name


def _tiny_config(**overrides):
    config = config_utils.load_config(TINY)
    config.progress_bar = False
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def _run_steps(config, mesh, steps=2):
    """Losses of `steps` train steps on `mesh`, and the final params (host copies)."""
    source = data_lib.get_source(config.data, "train")
    setup = train_state.make_setup(config, source.info, mesh)
    batches = iter(
        pipeline.build(
            source,
            batch_size=config.batch_size,
            image_size=config.data.image_size,
            train=True,
            seed=config.seed,
            num_devices=mesh.size,
        )
    )
    step = train_step.jit_train_step(config, setup, source.info, mesh)
    state, losses = setup.init(), []
    for _ in range(steps):
        state, metrics = step(state, pipeline.to_global(next(batches), mesh), None)
        losses.append(float(parallel.fetch(metrics)["loss"]))
    return losses, jax.tree.map(np.asarray, state["params"]), setup


@pytest.fixture(scope="module")
def single_device_run():
    config = _tiny_config()
    mesh = parallel.make_mesh([("data", 1), ("fsdp", 1)], devices=jax.devices()[:1])
    return _run_steps(config, mesh)


@pytest.mark.parametrize(
    "mesh_axes, grad_accum",
    [
        ([("data", 4), ("fsdp", 1)], 1),
        ([("data", 1), ("fsdp", 4)], 1),
        ([("data", 2), ("fsdp", 2)], 2),
    ],
    ids=["data4", "fsdp4", "data2xfsdp2-accum2"],
)
def test_meshes_and_accumulation_match_one_device(single_device_run, mesh_axes, grad_accum):
    ref_losses, ref_params, _ = single_device_run
    # fsdp_min_size 0: the tiny model's tensors are all below the default threshold.
    config = _tiny_config(**{"optimizer.grad_accum": grad_accum, "fsdp_min_size": 0})
    mesh = parallel.make_mesh(mesh_axes)
    losses, params, setup = _run_steps(config, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=2e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params
    )
    if mesh.shape["fsdp"] > 1:  # FSDP really shards something, optimizer state included
        specs = {s.spec for s in jax.tree.leaves(setup.shardings["params"])}
        assert any("fsdp" in str(spec) for spec in specs), specs
        opt_specs = {s.spec for s in jax.tree.leaves(setup.shardings["opt_state"])}
        assert specs - {P()} <= opt_specs


def _tensorboard_tags(directory):
    """Scalar tags in TFRecord event files: [len u64][crc u32][Event proto][crc u32] records."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in directory.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            tags |= {value.tag for value in event.summary.value}
            offset += 12 + length + 4
    return tags


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    config = _tiny_config(**{"total_steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 0})
    train.train(config, str(workdir))
    config = _tiny_config(**{"total_steps": 8, "checkpoint.every_steps": 2, "eval.every_steps": 0})
    config.optimizer.lr = float("nan")  # the first update after the resume poisons the params
    with pytest.raises(FloatingPointError, match="at step 5"):
        train.train(config, str(workdir))
    if importlib.util.find_spec("tensorboardX"):  # TensorBoard events next to metrics.jsonl
        assert {"train/loss", "train/lr"} <= _tensorboard_tags(workdir / "tensorboard")
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4
    restored = workdir_lib.restore(str(workdir))
    model, restored_config, info = restored.model, restored.config, restored.info
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert restored_config.total_steps == 8 and info.num_classes == 4


# Everything random that a resume must restore: mixup/cutmix keys, drop-path streams, the EMA;
# and the data position behind the batches already queued on the devices.
RESUME_FLAGS = [
    "--config.prefetch_to_device=2",
    "--config.total_steps=40",
    "--config.eval.every_steps=0",
    "--config.checkpoint.every_steps=15",
    "--config.optimizer.ema_decay=0.9",
    "--config.loss.mixup_alpha=0.8",
    "--config.loss.cutmix_alpha=1.0",
    "--config.loss.label_smoothing=0.1",
    "--config.model.drop_path_rate=0.2",
]


def _launch(workdir):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cmd = [sys.executable, "-m", "bgjax.train", f"--config={TINY}", f"--workdir={workdir}"]
    return subprocess.Popen(
        [*cmd, *RESUME_FLAGS],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _final_params(workdir):
    weights = []
    for use_ema in (False, True):
        model = workdir_lib.restore(str(workdir), use_ema=use_ema).model
        weights.append(jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))
    return weights


@pytest.mark.slow
def test_sigterm_then_rerun_equals_an_uninterrupted_run(tmp_path):
    straight = _launch(tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stdout.read()

    workdir = tmp_path / "interrupted"
    run = _launch(workdir)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert run.poll() is None and time.time() < deadline, run.stdout.read()
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output
    assert "preempted: saved step" in output
    stopped = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 3 <= stopped < 40, output

    rerun = _launch(workdir)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))  # resumed right after the preemption step
    (params, ema), (expected, expected_ema) = (
        _final_params(workdir),
        _final_params(tmp_path / "straight"),
    )
    jax.tree.map(np.testing.assert_array_equal, params, expected)  # bit-identical
    jax.tree.map(np.testing.assert_array_equal, ema, expected_ema)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, ema, params)))


def test_mix_batch_labels_follow_the_pixels():
    images = np.random.default_rng(0).random((4, 16, 16, 3), np.float32)
    masks = (np.random.default_rng(1).random((4, 16, 16)) > 0.5).astype(np.uint8)
    targets = np.eye(4, dtype=np.float32)
    mix = functools.partial(classify.mix_batch, images=images, masks=masks, targets=targets)
    cutmix = jax.jit(functools.partial(mix, mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.5))
    for seed in range(3):
        mixed, mixed_masks, soft = map(np.asarray, cutmix(jax.random.key(seed)))
        own = np.all(mixed == images, axis=-1)  # pixels the image kept
        np.testing.assert_allclose(soft.diagonal(), own.mean(), atol=1e-6)
        np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
        np.testing.assert_array_equal(mixed_masks[own], masks[own])
    mixup = jax.jit(functools.partial(mix, mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.5))
    mixed, mixed_masks, soft = map(np.asarray, mixup(jax.random.key(0)))
    lam = soft[0, 0]
    np.testing.assert_allclose(mixed[0], lam * images[0] + (1 - lam) * images[3], atol=1e-5)
    np.testing.assert_array_equal(mixed_masks, np.maximum(masks, masks[::-1]))
    same = mix(jax.random.key(0), mixup_alpha=0, cutmix_alpha=0, switch_prob=0)
    assert same[0] is images and same[2] is targets


# Late masking after the last block retrains nothing but the head (the masking paper's code);
# after the second-last block, also the last block and the norms after the mask.
@pytest.mark.parametrize(
    "masking, late_block, trainable_prefixes",
    [
        ("none", -1, {"head"}),
        ("late", -1, {"head"}),
        ("late", -2, {"head", "blocks", "norm", "late_norm"}),
    ],
)
def test_frozen_backbone_trains_and_decays_only_its_subset(masking, late_block, trainable_prefixes):
    config = _tiny_config(
        **{"model.frozen_backbone": True, "model.masking": masking, "model.depth": 2}
    )
    if masking == "late":
        config.model.late_block = late_block
    source = data_lib.get_source(config.data, "train")
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    setup = train_state.make_setup(config, source.info, mesh)
    prefixes = {
        str(path[0].key)
        for path, _ in jax.tree_util.tree_leaves_with_path(setup.abstract["params"])
    }
    assert prefixes == trainable_prefixes
    frozen = {
        str(path[0].key) for path, _ in jax.tree_util.tree_leaves_with_path(setup.abstract["rest"])
    }
    assert {"patch_embed", "cls_token", "pos_embed"} <= frozen
    # Adam moments exist for the trainable subset only.
    n_params = sum(x.size for x in jax.tree.leaves(setup.abstract["params"]))
    n_opt = sum(x.size for x in jax.tree.leaves(setup.abstract["opt_state"]))
    assert n_params * 2 <= n_opt < n_params * 2 + 16


def test_init_from_timm_weights_keeps_a_mismatched_head(tmp_path):
    from bgjax.models import timm_io

    config = _tiny_config()
    source = data_lib.get_source(config.data, "train")
    donor = tasks.make_model(config, num_classes=7, rngs=nnx.Rngs(123))
    timm_io.write_safetensors(donor, tmp_path / "donor.safetensors")
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    setup = train_state.make_setup(config, source.info, mesh)
    fresh = setup.init()
    state = train_state.load_init_weights(fresh, setup, str(tmp_path / "donor.safetensors"), config)
    got = nnx.merge(setup.graphdef, state["params"], state["rest"])
    np.testing.assert_array_equal(
        got.blocks[0].attn.qkv.kernel[...], donor.blocks[0].attn.qkv.kernel[...]
    )
    np.testing.assert_array_equal(got.pos_embed[...], donor.pos_embed[...])
    # 4 synthetic classes: the donor's 7-way head is skipped, the fresh one kept.
    np.testing.assert_array_equal(got.head.kernel[...], fresh["params"]["head"]["kernel"][...])
    kernel = state["params"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding == setup.shardings["params"]["blocks"][0]["mlp"]["fc1"]["kernel"].value


@pytest.mark.slow
def test_segmenter_task_then_its_masks_feed_a_classifier(tmp_path):
    seg = config_utils.load_config("segmenter.py:size=tiny,arch=vit")
    overrides = {"total_steps": 2, "optimizer.warmup_steps": 1, "checkpoint.every_steps": 2}
    for key, value in {**overrides, "eval.every_steps": 2, "progress_bar": False}.items():
        *parents, leaf = key.split(".")
        node = seg
        for name in parents:
            node = node[name]
        node[leaf] = value
    summary = train.train(seg, str(tmp_path / "seg"))
    assert 0.0 <= summary["eval/original/fg_iou"] <= 1.0 and np.isfinite(summary["train/loss"])

    classifier = _tiny_config(
        **{
            **overrides,
            "eval.every_steps": 0,
            "model.masking": "early",
            "mask_source": str(tmp_path / "seg"),
        }
    )
    summary = train.train(classifier, str(tmp_path / "cls"))
    assert summary["step"] == 2 and np.isfinite(summary["train/loss"])
