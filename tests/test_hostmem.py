"""hostmem.keep_freed_memory: big step buffers are reused, not mapped and faulted afresh."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
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


def test_keep_freed_memory_stops_per_call_page_faults():
    applied, faults = _run("sync")
    off_applied, off_faults = _run("0")
    assert applied and not off_applied
    # 128 MB = 32,768 pages of 4 KB: without the setting each call maps and faults them afresh.
    assert off_faults > 16_000, off_faults
    assert faults < 1_000, faults
