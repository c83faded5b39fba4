"""The training benchmarks run end to end on their smallest CPU configuration and report sane
numbers. Functional checks only: no timing is asserted (timings live in BENCHMARKS.md)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """A benchmarks/ script as a module (the folder is not a package; the scripts find their
    `common` module on sys.path, as when run directly)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    module_name = f"bgjax_benchmarks_{name}"
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


throughput = _load("train_throughput")
common = sys.modules["common"]  # the copy the scripts imported
scaling = _load("scaling")
TINY = ["--arch", "tiny_vit", "--size", "32"]


def _sane_row(row: dict, batch: int) -> None:
    assert row["img_s"] > 0 and math.isfinite(row["img_s"])
    assert row["cpu_img_s"] > 0
    assert row["step_s"] > 0
    assert math.isfinite(row["loss"]) and 0 < row["loss"] < 20
    assert row["img_s"] == pytest.approx(batch / row["step_s"], rel=1e-6)


# ------------------------------------------------------------------------------ helpers


def test_peak_table_by_device_kind():
    assert throughput.peak_tflops("NVIDIA H100 80GB HBM3") == 989  # SXM
    assert throughput.peak_tflops("NVIDIA H100 PCIe") == 756
    assert throughput.peak_tflops("NVIDIA H100 NVL") == 835
    assert throughput.peak_tflops("NVIDIA B200") == 2250
    assert throughput.peak_tflops("TPU v6 lite") == 918
    assert throughput.peak_tflops("NVIDIA H200") == 989
    assert throughput.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert throughput.peak_tflops("TPU v5 lite") == 197  # v5e, before the "tpu v5" (v5p) entry
    assert throughput.peak_tflops("TPU v5p") == 459
    assert throughput.peak_tflops("TPU v4") == 275
    assert throughput.peak_tflops("cpu") is None


def _forward_gmacs(arch: str, size: int = 224) -> float:
    config = common.train_config(arch, batch=1, size=size, num_classes=1000)
    return throughput.model_flops_per_image(config) / 6e9


def test_forward_macs_from_the_architecture():
    """The kernel-walk count equals the hand formula for ViT-Ti/16 and matches the published
    GMACs (fvcore, as timm lists them) of ViT-B/16 and ConvNeXt-T at 224 px within 1%."""
    n, d, h, depth = 197, 192, 4 * 192, 12  # ViT-Ti/16: tokens, width, MLP width, blocks
    block = n * (d * 3 * d + d * d + 2 * d * h) + 2 * n * n * d
    hand = depth * block + 196 * (16 * 16 * 3) * d + d * 1000
    assert _forward_gmacs("vit_tiny_patch16_224") == pytest.approx(hand / 1e9, rel=1e-9)
    assert _forward_gmacs("vit_base_patch16_224") == pytest.approx(17.58, rel=0.01)
    assert _forward_gmacs("convnext_tiny") == pytest.approx(4.47, rel=0.01)
    # Any image size: ViT-B/16 at 160 px has 101 tokens, about half the work.
    assert 0.45 < _forward_gmacs("vit_base_patch16_224", 160) / 17.58 < 0.55


def test_timings_summary_uses_medians():
    timings = common.Timings()
    for wall, cpu, faults in [(1.0, 2.0, 700_000), (3.0, 1.0, 0), (2.0, 4.0, 5)]:
        timings.add(wall, cpu, faults)
    summary = timings.summary(images_per_call=8, threads=2)
    assert summary["img_s"] == 4.0  # 8 / median wall 2.0
    assert summary["cpu_img_s"] == 8.0  # 8 * 2 threads / median CPU 2.0
    assert summary["page_faults"] == 5  # a first step's faults do not set the figure
    table = common.markdown_table([dict(a=1.5, b=None), dict(a=1234.0)], ["a", "b"])
    assert table.splitlines()[2:] == ["| 1.5 | n/a |", "| 1,234 | n/a |"]


def test_scaling_child_replaces_the_device_count(monkeypatch):
    flags = "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"
    monkeypatch.setenv("XLA_FLAGS", flags)
    env = scaling.child_env(8)
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"
    with pytest.raises(SystemExit):
        scaling.parse_args(["--devices", "1,x"])


def test_unknown_tiny_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="tiny_convnext"):
        common.model_kwargs("tiny_nosuchnet", 32)


def test_benchmark_times_the_trainers_jitted_step(monkeypatch):
    """`build_train_step` compiles `train_step.jit_train_step` itself, so the state is donated."""
    import jax

    from bgjax import parallel, train_step
    from bgjax.data import pipeline

    built = []
    jit_train_step = train_step.jit_train_step
    monkeypatch.setattr(
        train_step, "jit_train_step", lambda *a, **k: built.append(a) or jit_train_step(*a, **k)
    )
    config = common.train_config("tiny_vit", batch=4, size=32)
    mesh = parallel.make_mesh([("data", -1)])
    step = common.build_train_step(config, mesh)
    assert len(built) == 1 and built[0][0] is config and built[0][3] is mesh
    batch = pipeline.to_global(common.host_batches(4, 32, 9, count=1)[0], mesh)
    state, metrics = step.step(step.state, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(step.state["params"]))  # donated
    assert int(state["step"]) == 1 and np.isfinite(float(metrics["loss"]))


# ---------------------------------------------------------------------- end to end


def _timm_reference(tmp_path, arch="tiny_vit") -> Path:
    """timm_amp.py's result for a tiny model on the CPU (bf16 autocast), as a --reference file."""
    pytest.importorskip("torch")
    out = tmp_path / f"timm_{arch}.json"
    argv = ["--arch", arch, "--size", "32", "--batch", "4", "--steps", "2", "--repeats", "2"]
    _load("timm_amp").main([*argv, "--warmup", "1", "--classes", "10", "--json", str(out)])
    return out


def test_train_throughput_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    args = [*TINY, "--batch", "8", "--dtype", "float32", "--steps", "2", "--repeats", "2"]
    argv = [*args, "--warmup", "1", "--devices", "2", "--peak-tflops", "0.5", "--json", str(out)]
    reference = _timm_reference(tmp_path)
    throughput.main([*argv, "--reference", str(reference)])  # a CPU has no peak: one is given
    result = json.loads(out.read_text())
    row, timm = result["rows"]
    _sane_row(row, 8)
    assert row["devices"] == 2 and row["img_s_device"] == pytest.approx(row["img_s"] / 2)
    assert row["flops_step_xla_device"] > 0 and row["xla_tflops_device"] > 0
    _check_mfu(row, 8, devices=2, peak=0.5)
    # timm's row: its own img/s with the same model FLOPs per image and peak, on one device
    assert timm["impl"] == "timm AMP (torch)" and timm["amp"] == "bfloat16"
    assert timm["img_s"] == pytest.approx(4 / timm["step_s"]) and timm["loss"] > 0
    per_image = row["flops_step_model"] / 8
    assert timm["mfu"] == pytest.approx(per_image * timm["img_s"] / 0.5e12)
    assert result["ratio"]["img_s_device"] == pytest.approx(row["img_s_device"] / timm["img_s"])
    printed = capsys.readouterr().out
    assert "| ours (bgjax, jax) | tiny_vit | float32 |" in printed and "0.5 TFLOP/s" in printed
    assert "| timm AMP (torch) | tiny_vit | amp bfloat16 |" in printed
    assert "ratio ours/timm, img/s per device" in printed
    with pytest.raises(SystemExit, match="--devices 64"):
        throughput.main([*args, "--devices", "64"])


def test_reference_of_another_model_is_refused_before_compiling(tmp_path):
    reference = tmp_path / "timm.json"
    reference.write_text(json.dumps(dict(benchmark="timm_amp", rows=[dict(arch="convnext_base")])))
    with pytest.raises(SystemExit, match="arch convnext_base, not tiny_vit"):
        throughput.main([*TINY, "--reference", str(reference)])
    reference.write_text(json.dumps(dict(benchmark="train_vs_timm", rows=[])))
    with pytest.raises(SystemExit, match="not a timm_amp.py result"):
        throughput.main([*TINY, "--reference", str(reference)])


def test_train_vs_timm_tiny_cpu(tmp_path, capsys):
    pytest.importorskip("torch")
    compare = _load("train_vs_timm")
    out = tmp_path / "vs_timm.json"
    compare.main([*TINY, "--batch", "4", "--steps", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    ours, timm = result["rows"]
    assert ours["impl"].startswith("ours") and timm["impl"].startswith("timm")
    for row in (ours, timm):
        _sane_row(row, 4)
    assert result["ratio"]["img_s"] == pytest.approx(ours["img_s"] / timm["img_s"])
    assert result["machine"]["torch"] and result["threads"] >= 1
    assert "ratio ours/timm" in capsys.readouterr().out


def test_gemm_layers_are_the_train_steps_linear_layers():
    gemm = _load("gemm_vs_torch")
    vit = gemm.linear_layers("vit_small_patch16_224", 16, 224)
    assert [(name, m, k, n, c) for name, m, k, n, c in vit] == [
        ("qkv", 3152, 384, 1152, 12),
        ("proj", 3152, 384, 384, 12),
        ("fc1", 3152, 384, 1536, 12),
        ("fc2", 3152, 1536, 384, 12),
    ]
    convnext = gemm.linear_layers("convnext_tiny", 16, 224)
    assert [(m, k, c) for _, m, k, _, c in convnext[::2]] == [
        (50176, 96, 3),
        (12544, 192, 3),
        (3136, 384, 9),
        (784, 768, 3),
    ]
    # 2 x 3 x rows x in x out FLOPs per layer: ConvNeXt-T's MLPs are 4.2 of its 4.5 GMACs/image.
    macs = sum(m * k * n * c for _, m, k, n, c in convnext) / 16
    assert 4.1e9 < macs < 4.3e9
    with pytest.raises(ValueError, match="unknown arch"):
        gemm.linear_layers("resnet50", 16, 224)


def test_gemm_vs_torch_tiny_cpu(tmp_path, capsys):
    pytest.importorskip("torch")
    gemm = _load("gemm_vs_torch")
    out = tmp_path / "gemm.json"
    gemm.main(
        [
            "--arch",
            "vit_small_patch16_224",
            "--batch",
            "1",
            "--size",
            "32",
            "--reps",
            "1",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 4 * 3  # 4 layers x (forward, input_grad, weight_grad)
    for impl in ("xla", "xla_default", "torch"):
        total = sum(r[f"{impl}_s"] * r["count"] for r in result["rows"])
        assert result["per_step_s"][impl] == pytest.approx(total) and total > 0
    assert result["ratio"] == pytest.approx(
        result["per_step_s"]["torch"] / result["per_step_s"]["xla"]
    )
    assert "seconds per train step" in capsys.readouterr().out


@pytest.mark.slow  # two subprocesses, each starting JAX and compiling
def test_scaling_over_two_simulated_devices(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    argv = [*TINY, "--devices", "1,2", "--batch-per-device", "2", "--steps", "1"]
    scaling.main([*argv, "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["devices"] for r in rows] == [1, 2]
    assert [r["batch"] for r in rows] == [2, 4]  # the global batch grows with the devices
    assert rows[0]["speedup"] == 1.0 and rows[0]["efficiency"] == 1.0
    np.testing.assert_allclose(rows[1]["efficiency"], rows[1]["speedup"] / 2)
    assert "simulated CPU devices" in capsys.readouterr().out


def test_mfu_on_one_device(tmp_path):
    out = tmp_path / "throughput.json"
    args = [*TINY, "--batch", "4", "--dtype", "float32", "--steps", "1", "--repeats", "1"]
    throughput.main([*args, "--warmup", "0", "--devices", "1", "--peak-tflops", "0.5",
                     "--json", str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    _check_mfu(row, 4, devices=1, peak=0.5)


def _check_mfu(row: dict, batch: int, *, devices: int, peak: float) -> None:
    """MFU = 6 x forward MACs x images / (step time x peak x devices); XLA's count, one
    device's program, against one device's peak."""
    step_flops = 6 * _forward_macs_tiny_vit() * batch
    assert row["flops_step_model"] == pytest.approx(step_flops)
    assert row["tflops"] == pytest.approx(step_flops / row["step_s"] / 1e12)
    assert row["mfu"] == pytest.approx(step_flops / row["step_s"] / (peak * 1e12 * devices))
    xla_mfu = row["flops_step_xla_device"] / row["step_s"] / (peak * 1e12)
    assert row["xla_mfu_device"] == pytest.approx(xla_mfu)


def _forward_macs_tiny_vit() -> float:
    """The `tiny_vit` of bgjax.config_utils.TINY_MODELS at 32 px by hand: patch 8 -> 16 patches
    + CLS, width 16, MLP 64, one block, 1000 classes."""
    n, d, h = 17, 16, 64
    return n * (d * 3 * d + d * d + 2 * d * h) + 2 * n * n * d + 16 * (8 * 8 * 3) * d + d * 1000


def test_collectives_read_from_hlo_text():
    collectives = _load("collectives")
    mesh_line = "x = f32[8]{0} all-reduce(y), replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}"
    assert collectives.group_size(mesh_line, 8) == 4
    assert collectives.group_size("replica_groups=[2,4]<=[8]", 8) == 4
    assert collectives.group_size("replica_groups={{0,1},{2,3}}", 4) == 2
    hlo = (
        "%body (p: f32[4]) -> f32[4] {\n"
        "  %ar = f32[1000]{0} all-reduce(%p), replica_groups=[1,4]<=[4], to_apply=%add\n}\n\n"
        "ENTRY %main (a: f32[4]) -> f32[4] {\n"
        '  %w = f32[4] while(%a), condition=%cond, body=%body, backend_config={"known_trip_'
        'count":{"n":"3"}}\n'
        "  %ag = bf16[64,32]{1,0} all-gather(%w), replica_groups=[1,4]<=[4], dimensions={0}\n}\n"
    )
    found = collectives.collective_bytes(hlo, 4)
    assert found["all-reduce"]["count"] == found["all-reduce"]["in_loops"] == 3
    assert found["all-reduce"]["bytes"] == pytest.approx(3 * 2 * 3 / 4 * 4000)
    assert found["all-gather"] == dict(count=1, in_loops=0, bytes=3 / 4 * 64 * 32 * 2)


def test_collectives_tiny_data_parallel_step_moves_the_minimum(tmp_path, capsys):
    """One fp32 gradient all-reduce per step on a data mesh, grad_accum 2 included: the
    measured bytes are the ring minimum (plus the few scalar metrics)."""
    collectives = _load("collectives")
    out = tmp_path / "collectives.json"
    argv = [*TINY, "--devices", "4", "--batch", "8", "--grad-accum", "2", "--dtype", "float32"]
    result = collectives.main([*argv, "--json", str(out)])
    (row,) = result["rows"]
    assert row["kind"] == "all-reduce" and row["count_in_loops"] == 0
    assert row["mbytes_per_device"] == pytest.approx(row["min_mbytes_per_device"], rel=0.01)
    assert result["flops_step_xla_device"] > 0 and result["flops_step_model_device"] > 0
    assert "| all-reduce |" in capsys.readouterr().out


def test_depthwise_choices_time_the_configs_model(tmp_path, capsys):
    depthwise = _load("depthwise")
    out = tmp_path / "depthwise.json"
    config = "synthetic.py:arch=convnext,size=tiny"
    argv = ["--config", config, "--override", "batch_size=4", "--steps", "1", "--repeats", "1"]
    result = depthwise.main([*argv, "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert [r["dw_impl"] for r in result["rows"]] == ["grouped", "shifted"]
    assert result["batch"] == 4 and result["image_size"] == 32
    assert all(r["ms_step"] > 0 and r["compile_s"] > 0 for r in result["rows"])
    assert min(r["speedup"] for r in result["rows"]) == 1.0  # relative to the slower choice
    assert depthwise.config_for(depthwise.parse_args(argv), "grouped").model.dw_impl == "grouped"
    assert "| grouped |" in capsys.readouterr().out


@pytest.mark.slow  # two processes: timm's step and ours (compiled)
def test_gpu_check_script_runs_both_sides_and_falls_back_to_smaller_batches(tmp_path):
    """benchmarks/gpu_check.sh, the one prepared call for a lent GPU, run here on a tiny model:
    a batch that fails (0) falls back to the next one, and both results land in OUTDIR."""
    pytest.importorskip("torch")
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # its python3: this one
        GPU_CHECK_WHEELS=str(tmp_path / "no_wheels"),  # .whl/ holds the GPU image's (cp312)
        GPU_CHECK_CASES="tiny_vit 0 4",
        GPU_CHECK_EXTRA="--size 32 --steps 1 --repeats 1 --warmup 0 --classes 10",
    )
    script = BENCHMARKS / "gpu_check.sh"
    done = subprocess.run(["bash", script, tmp_path], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    ours = json.loads((tmp_path / "ours_tiny_vit.json").read_text())
    assert [row["impl"] for row in ours["rows"]] == ["ours (bgjax, jax)", "timm AMP (torch)"]
    assert ours["args"]["batch"] == 4 and ours["rows"][1]["batch"] == 4
    log = (tmp_path / "gpu_check.log").read_text()
    assert "== tiny_vit, batch 0" in log and "ratio ours/timm" in log
