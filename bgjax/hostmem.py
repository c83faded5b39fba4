"""Host memory: make glibc malloc keep freed buffers, so big per-step buffers are reused.

XLA:CPU allocates one block for all temporaries of a step (1.4 GB for ViT-S/16, 2.4 GB for
ConvNeXt-T at batch 16 and 224 px) and frees it when the step ends. glibc serves such a block with
a fresh `mmap` (from a worker thread's arena, which cannot grow past 64 MB) and unmaps it on free,
so every step page-faults and zero-fills the whole block again: 390k / 618k page faults per step,
~15% of a ConvNeXt-T step on 2 cores (BENCHMARKS.md). With one arena, no `mmap` and no trimming the
block stays in the heap and the next step reuses it (0 faults per step).

`keep_freed_memory` must run before JAX starts its thread pool (glibc fixes the number of arenas
when the first thread allocates): `bgjax` and the benchmarks call it first thing. The cost is that
the process keeps its peak heap until it exits. `BGJAX_KEEP_HEAP=0` turns it off. Not glibc (macOS,
musl): a no-op.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8


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
    """Training/eval processes: reuse freed step buffers instead of mapping them afresh.

    Returns whether the settings were applied."""
    if os.environ.get("BGJAX_KEEP_HEAP", "1") == "0":
        return False
    # One arena: worker threads allocate from the main heap, which can grow to any size.
    # No mmap: big blocks come from that heap too. Trim threshold -1: freed memory is never
    # returned to the OS (glibc's documented "disable trimming" value).
    return _mallopt({M_ARENA_MAX: 1, M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1})


def keep_freed_image_buffers(worker_index: int = 0, worker_count: int = 0) -> None:
    """Grain worker init: keep freed image buffers instead of returning them.

    In a fresh worker process every ~150 KB image buffer (decode, composite, crop) was mmap'd
    and unmapped again: ~2,000 page faults per 32 x 224 px batch (the main process: ~4) and ~18%
    more CPU per image. Fixed thresholds keep freed buffers in the heap for reuse, while a worker's
    memory still shrinks after a burst (unlike `keep_freed_memory`).
    """
    del worker_index, worker_count
    _mallopt({M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20})  # 32 MB: glibc's max
