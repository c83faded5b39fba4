"""The accelerator code path, checked on the program it compiles to, without an accelerator:
the train step lowered / compiled on 4 simulated CPU devices (tests/conftest.py) with the
kernel choice forced to the accelerator one (model.kernels="xla")."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bgjax import config_utils, parallel, train_state, train_step
from bgjax.data import DatasetInfo
from bgjax.models import cpu_kernels, stacking, vit

NUM_CLASSES = 5  # a width no other layer of the tiny models has: it marks the head's dots
BATCH = 8


def _config(arch="vit", **model):
    c = config_utils.base_config()
    config_utils.set_tiny(c, arch)
    c.model.kernels = "xla"
    c.model.update(model)
    c.optimizer.clip_norm = 0.0
    return c


def _info():
    names = tuple(f"class_{i}" for i in range(NUM_CLASSES))
    return DatasetInfo("synthetic", "train", names, np.zeros((0,), np.int32))


def _host_batch(seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        image=rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8),
        mask=(rng.random((BATCH, 32, 32)) < 0.5).astype(np.uint8),
        label=rng.integers(0, NUM_CLASSES, (BATCH,), dtype=np.int32),
        habitat=np.full((BATCH,), -1, np.int32),
        valid=np.ones((BATCH,), bool),
    )


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _step(config, mesh):
    setup = train_state.make_setup(config, _info(), mesh)
    return setup, train_step.jit_train_step(config, setup, _info(), mesh)


def _operand_types(stablehlo: str, op: str) -> list[list[str]]:
    """Operand tensor types of every `stablehlo.<op>` in lowered text, e.g. [["8x17x16xbf16",
    "16x48xbf16"], ...]."""
    found = []
    for line in stablehlo.splitlines():
        if re.search(rf"stablehlo\.{op}[ (]", line):
            operands = line.rsplit(" : (", 1)[1].split(") -> ")[0]
            found.append(re.findall(r"tensor<([^>]*)>", operands))
    return found


# ------------------------------------------------------------------------- compute dtype


def test_auto_dtype_and_attention_resolve_by_backend(monkeypatch):
    assert config_utils.base_config().model.dtype == "auto"
    assert cpu_kernels.resolve_dtype("auto") == jnp.float32  # this is the CPU backend
    assert cpu_kernels.resolve_attention("auto", jnp.bfloat16) is None  # no cuDNN here
    with pytest.raises(ValueError, match="model.dtype"):
        cpu_kernels.resolve_dtype("fp8")
    with pytest.raises(ValueError, match="bfloat16/float16"):
        cpu_kernels.resolve_attention("cudnn", jnp.float32)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(cpu_kernels, "_has_cudnn", lambda: True)
    assert cpu_kernels.resolve_dtype("auto") == jnp.bfloat16
    assert cpu_kernels.resolve_dtype("float32") == jnp.float32  # overridable
    assert cpu_kernels.resolve_attention("auto", jnp.bfloat16) == "cudnn"
    assert cpu_kernels.resolve_attention("auto", jnp.float32) is None
    assert cpu_kernels.resolve_attention("xla", jnp.bfloat16) == "xla"


@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_bf16_step_multiplies_in_bf16_and_keeps_fp32_state(arch):
    """What "auto" picks on a GPU: every matmul and convolution of the lowered train step
    (forward and backward) takes bf16 operands but the head's (fp32 by design); the
    parameters and the optimizer state stay fp32."""
    mesh = parallel.make_mesh([("data", -1)])
    setup, step = _step(_config(arch, dtype="bfloat16"), mesh)
    text = step.lower(setup.abstract, _abstract(_host_batch()), None).as_text()
    dots, convs = _operand_types(text, "dot_general"), _operand_types(text, "convolution")
    assert len(convs) >= 2 and all(t.endswith("bf16") for c in convs for t in c), convs
    fp32_dots = [d for d in dots if not all(t.endswith("bf16") for t in d)]
    assert len(dots) - len(fp32_dots) + len(convs) >= 8
    # The head's (forward, input and weight gradient): one operand has the class count.
    is_head = [any(str(NUM_CLASSES) in t.split("x") for t in d) for d in fp32_dots]
    assert len(fp32_dots) == 3 and all(is_head), fp32_dots
    state = [setup.abstract["params"], setup.abstract["opt_state"]]
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
    assert train_step.compute_summary(setup).startswith("compute bfloat16, params float32")


# ------------------------------------------------------------------------------ attention


def test_padding_tokens_change_no_real_token():
    """cuDNN's path pads the masked sequence to a multiple of 8; the padding is never a key,
    so every real token's block output is what it is unpadded (checked with XLA attention)."""
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 17, 16)).astype(np.float32)
    key_mask = rng.random((2, 17)) < 0.6
    key_mask[:, 0] = True

    @jax.jit  # one compile instead of one per op
    def outputs(tokens, key_mask):
        ops = cpu_kernels.ops("xla")
        block = vit.Block(16, 2, 32, gated_mlp=False, init_values=None, drop_path=0.0,
                          ops=ops, dtype=jnp.float32, rngs=nnx.Rngs(0))  # fmt: skip
        padded, padded_mask = vit._pad_tokens(tokens, key_mask, vit.CUDNN_SEQ_MULTIPLE)
        return block(padded, padded_mask), padded_mask, block(tokens, key_mask)

    padded_out, padded_mask, out = outputs(tokens, key_mask)
    assert padded_out.shape == (2, 24, 16) and not padded_mask[:, 17:].any()
    np.testing.assert_allclose(padded_out[:, :17], out, atol=1e-5)


def test_cudnn_fused_attention_in_the_step_lowered_for_cuda(monkeypatch):
    """JAX lowers for a platform it does not have (`lowering_platforms=("cuda",)`) once its
    cuDNN version probe is answered: the attn-masked ViT step then calls cuDNN's fused
    attention, forward and backward, on 24 tokens (17 padded to a multiple of 8; cuDNN refuses
    to train with a mask on an odd length). One device: on several, the call sits inside a
    custom-partitioning op that is expanded when compiling for the GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    config = _config("vit", dtype="bfloat16", masking="attn", attention="cudnn")
    mesh = parallel.make_mesh([("data", 1)], devices=jax.devices()[:1])
    setup, step = _step(config, mesh)
    assert "attention cudnn" in train_step.compute_summary(setup)
    lowered = step.trace(setup.abstract, _abstract(_host_batch()), None).lower(
        lowering_platforms=("cuda",)
    )
    calls = re.findall(r"custom_call @__cudnn\$(fmha\w+)\(.*: \((tensor<[^>]*>)", lowered.as_text())
    assert {name for name, _ in calls} == {"fmhaScaleBiasSoftmax", "fmhaScaleBiasSoftmaxBackward"}
    assert all(query == "tensor<8x24x2x8xbf16>" for _, query in calls), calls


def test_attention_key_is_refused_for_models_without_attention():
    from bgjax import tasks

    with pytest.raises(ValueError, match="no attention layers"):
        tasks.make_model(_config("convnext", attention="cudnn"), NUM_CLASSES)


# ------------------------------------------------------------------ gradient accumulation


def _hlo_computations(hlo: str) -> dict[str, str]:
    """Compiled HLO text -> {computation name: its body text}."""
    parts = re.split(r"\n(?=(?:ENTRY )?%[\w.\-]+ )", hlo)
    named = {}
    for part in parts:
        match = re.match(r"(?:ENTRY )?%([\w.\-]+) ", part)
        if match:
            named[match[1]] = part
    return named


def _reachable(computations: dict[str, str], root: str) -> set[str]:
    """`root` and every computation it calls, transitively."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        todo += re.findall(
            r"(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.\-]+)",
            computations[name],
        )
    return seen


def test_loop_body_collectives_helper_finds_a_psum_in_a_loop():
    """The HLO walk the next test relies on does see an all-reduce inside a while body."""

    def summed(x):
        return jax.lax.fori_loop(0, 2, lambda i, y: y + jax.lax.psum(y, "d"), x)

    mesh = parallel.make_mesh([("d", -1)])
    fn = jax.shard_map(summed, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    hlo = jax.jit(fn).lower(jnp.ones(8)).compile().as_text()
    assert _loop_body_collectives(hlo) == ["all-reduce"]


def _loop_body_collectives(hlo: str) -> list[str]:
    computations = _hlo_computations(hlo)
    bodies = re.findall(r"\bwhile\(.*?body=%([\w.\-]+)", hlo)
    assert bodies, "no while loop in the compiled step"
    inside = set().union(*(_reachable(computations, body) for body in bodies))
    text = "\n".join(computations[name] for name in inside)
    return re.findall(r"\b(all-reduce|reduce-scatter|all-gather)(?:-start)?\(", text)


@pytest.mark.slow  # compiles a train step
def test_accumulation_reduces_gradients_once_after_the_loop():
    """grad_accum=2 on a 4-device data mesh: no collective inside the micro-batch loop, one
    all-reduce after it. (That it equals one big batch, FSDP included, is
    tests/test_train.py::test_meshes_and_accumulation_match_one_device.)"""
    config = _config("vit", dtype="float32")
    config.optimizer.grad_accum = 2
    setup, step = _step(config, parallel.make_mesh([("data", -1), ("fsdp", 1)]))
    hlo = step.lower(setup.abstract, _abstract(_host_batch()), None).compile().as_text()
    assert _loop_body_collectives(hlo) == []
    assert re.search(r"\ball-reduce(?:-start)?\(", hlo)  # the one reduction, after the loop


def test_accumulation_with_drop_path_draws_per_device_masks():
    """With drop-path, each device folds its index into the RNG streams (else all devices
    would drop the same rows); the streams' keys come back unchanged, their counts advanced."""
    config = _config("vit", dtype="float32", drop_path_rate=0.5, depth=2)
    config.optimizer.grad_accum = 2
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    setup, step = _step(config, mesh)
    text = step.lower(setup.abstract, _abstract(_host_batch()), None).as_text()
    assert "partition_id" in text or "axis_index" in text or "replica_id" in text


def test_masks_go_to_the_devices_only_when_the_step_reads_them():
    assert "mask" not in train_step.step_batch_keys(_config("vit"))
    assert "mask" in train_step.step_batch_keys(_config("vit", masking="late"))
    segment = _config("convnext")
    segment.task = "segment"  # the masks are its targets
    assert "mask" in train_step.step_batch_keys(segment)


# -------------------------------------------------------------------------------------- FSDP


@pytest.mark.slow  # compiles a train step
@pytest.mark.parametrize(
    "arch, model",
    [
        ("vit", dict(embed_dim=32)),
        ("vit", dict(embed_dim=32, depth=2, scan_blocks=True)),
        ("resnet", dict(channels=(8, 16, 32, 64))),
    ],
    ids=["vit", "vit_scanned", "resnet"],
)
def test_fsdp_shards_large_tensors_and_gathers_weights_not_activations(arch, model):
    """On a 4-way fsdp mesh: tensors under `fsdp_min_size` elements (biases, norms, small
    kernels) stay replicated; with the activations pinned to the batch axes at block
    boundaries, every all-gather of the step is a weight's (none gathers activations)."""
    config = _config(arch, dtype="bfloat16", **model)
    config.fsdp_min_size = 1024  # the tiny model's scale of "large"
    mesh = parallel.make_mesh([("data", 1), ("fsdp", 4)])
    setup, step = _step(config, mesh)
    shapes, sharded = {}, set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(setup.abstract["params"]):
        size, spec = np.prod(leaf.shape), leaf.sharding.spec
        assert size >= config.fsdp_min_size or spec == P(), (path, leaf.shape, spec)
        shapes[jax.tree_util.keystr(path)] = leaf.shape
        if spec != P():
            # Stacked blocks (scan_blocks): the scan gathers one block's slice at a time.
            stacked = stacking.stacked_axes(parallel._path_key(path))
            assert stacked == 0 or spec[0] is None, (path, spec)  # never shard the block axis
            sharded.add(tuple(leaf.shape[stacked:]))
    assert len(sharded) >= 3 and len(sharded) < len(shapes)
    hlo = step.lower(setup.abstract, _abstract(_host_batch()), None).compile().as_text()
    gathered = {
        tuple(int(d) for d in dims.split(","))
        for dims in re.findall(r"= \w+\[([\d,]+)\]\{[\d,]*\} all-gather(?:-start)?\(", hlo)
    }
    assert gathered and gathered <= sharded, (gathered, sharded)
