"""Host memory: make glibc malloc keep freed buffers, so big per-step buffers are reused.

XLA:CPU allocates one block for all temporaries of a step (1.4 GB for ViT-S/16, ~2.5 GB for
ConvNeXt-T at batch 16 and 224 px) and frees it when the step ends. By default glibc serves such a
block with a fresh `mmap` and unmaps it on free, so every step page-faults and zero-fills the whole
block again: 390k / ~650k page faults per step, 12-15% of the step on 2 cores (BENCHMARKS.md).

`keep_freed_memory` (run by `bgjax` and the benchmarks before JAX starts) makes the main heap
serve big blocks too and never hand freed memory back, so the next step reuses the block. The
block must then be allocated on the main thread: JAX's CPU client dispatches asynchronously on a
worker thread by default, and a worker thread's arena cannot hold more than 64 MB (glibc maps
bigger blocks whatever the settings). With synchronous CPU dispatch the step runs on the calling
thread: `BGJAX_KEEP_HEAP=sync` in the environment (for `bgjax` commands), or
`sync_cpu_dispatch()` before JAX starts. That is worth it for big models on the CPU (0 faults per
step, ViT-S step -12%); the demo's small models have small blocks and keep asynchronous dispatch
(measured ~3% faster).
(One shared arena, `M_ARENA_MAX=1`, would also do it, but costs the demo's threaded input
pipeline 10% in lock contention.) The price: the process keeps its peak heap until it exits.
`BGJAX_KEEP_HEAP=0` turns it all off. Not glibc (macOS, musl): a no-op.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def _mallopt(settings: dict[int, int]) -> bool:
    """Apply glibc mallopt settings; False (and nothing changed) where there is no glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    applied = [libc.mallopt(param, value) == 1 for param, value in settings.items()]
    return all(applied)


def keep_freed_memory() -> bool:
    """Big freed blocks stay in the main heap for reuse; `BGJAX_KEEP_HEAP`: 1 (default), 0 (off)
    or sync (also `sync_cpu_dispatch`). Returns whether the heap settings were applied."""
    mode = os.environ.get("BGJAX_KEEP_HEAP", "1")
    if mode not in ("0", "1", "sync"):
        raise ValueError(f"BGJAX_KEEP_HEAP must be 0, 1 or sync, got {mode!r}")
    if mode == "0":
        return False
    if mode == "sync":
        sync_cpu_dispatch()
    # No mmap: big blocks come from the main heap too. Trim threshold -1: freed memory is never
    # returned to the OS (glibc's documented "disable trimming" value).
    return _mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1})


def sync_cpu_dispatch() -> None:
    """Run CPU computations on the calling thread, so their big blocks come from (and go back
    to) the main heap. Takes effect only before JAX creates its CPU client."""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


def keep_freed_image_buffers(worker_index: int = 0, worker_count: int = 0) -> None:
    """Grain worker init: keep freed image buffers instead of returning them.

    In a fresh worker process every ~150 KB image buffer (decode, composite, crop) was mmap'd
    and unmapped again: ~2,000 page faults per 32 x 224 px batch (the main process: ~4) and ~18%
    more CPU per image. Fixed thresholds keep freed buffers in the heap for reuse, while a worker's
    memory still shrinks after a burst (unlike `keep_freed_memory`).
    """
    del worker_index, worker_count
    _mallopt({M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20})  # 32 MB: glibc's max
