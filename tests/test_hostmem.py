"""hostmem.keep_freed_memory: big step buffers are reused, not mapped and faulted afresh; only
when JAX will run on the CPU."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from bgjax import hostmem

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# A fresh process with synchronous CPU dispatch either way (the blocks are allocated on the main
# thread, whose heap the settings apply to; see hostmem.py). Each call needs two 64 MB
# temporaries at once (`a` and `a @ w.T @ w`), as a training step needs its activations; page
# faults are counted on the last of several calls.
SCRIPT = textwrap.dedent(
    """
    import resource
    from bgjax import hostmem
    applied = hostmem.keep_freed_memory()  # BGJAX_KEEP_HEAP=sync: heap + synchronous dispatch
    if not applied:
        hostmem.sync_cpu_dispatch()  # the same dispatch, without the heap settings
    import jax, jax.numpy as jnp
    step = jax.jit(lambda x, w: (lambda a: (a * (a @ w.T @ w)).sum(0))(x @ w))
    x = jnp.ones((16384, 256), jnp.float32)
    w = jnp.full((256, 1024), 1e-3, jnp.float32)
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(x, w).block_until_ready()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(applied, faults)
    """
)


def _run(keep_heap: str) -> tuple[bool, int]:
    env = {
        **os.environ,
        "BGJAX_KEEP_HEAP": keep_heap,
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", int(faults)


@glibc_only
def test_keep_freed_memory_stops_per_call_page_faults():
    applied, faults = _run("sync")
    off_applied, off_faults = _run("0")
    assert applied and not off_applied
    # 128 MB = 32,768 pages of 4 KB: without the setting each call maps and faults them afresh.
    assert off_faults > 16_000, off_faults
    assert faults < 1_000, faults


@pytest.fixture
def mallopt_calls(monkeypatch):
    """The mallopt settings `keep_freed_memory` would apply, recorded instead of applied."""
    calls = []
    monkeypatch.setattr(hostmem, "_mallopt", lambda settings: calls.append(settings) or True)
    monkeypatch.setattr(hostmem, "sync_cpu_dispatch", lambda: calls.append("sync"))
    monkeypatch.setattr(hostmem, "_accelerator_plugins", lambda: [])
    return calls


@pytest.mark.parametrize("mode", ["1", "sync"])
def test_keep_freed_memory_does_nothing_off_the_cpu_backend(monkeypatch, mallopt_calls, mode):
    monkeypatch.setenv("BGJAX_KEEP_HEAP", mode)
    for platforms in ("cuda", "tpu", "gpu,cpu", "rocm"):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert not hostmem.cpu_backend()
        assert hostmem.keep_freed_memory() is False
    # No JAX_PLATFORMS: an installed accelerator plugin makes it JAX's default backend.
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(hostmem, "_accelerator_plugins", lambda: ["xla_cuda12"])
    assert hostmem.keep_freed_memory() is False
    assert mallopt_calls == []
    # The CPU backend, named or by default: applied.
    monkeypatch.setattr(hostmem, "_accelerator_plugins", lambda: [])
    assert hostmem.keep_freed_memory() is True
    monkeypatch.setenv("JAX_PLATFORMS", "cpu,cuda")
    assert hostmem.keep_freed_memory() is True
    assert len(mallopt_calls) == (2 if mode == "1" else 4)


def test_accelerator_plugins_are_found_as_jax_finds_them(monkeypatch, tmp_path):
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    before = hostmem._accelerator_plugins()
    (tmp_path / "jax_plugins" / "xla_fake").mkdir(parents=True)  # a namespace-package plugin
    (tmp_path / "jax_plugins" / "xla_fake" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert hostmem._accelerator_plugins() == [*before, "xla_fake"]
    monkeypatch.setenv("TPU_LIBRARY_PATH", "/opt/libtpu.so")
    assert hostmem._accelerator_plugins()[-1] == "tpu"
