"""Resident memory of this process (Linux ``/proc``): current, peak, and a fresh peak on demand.

The benchmarks and ``grail speed`` measure how much memory a piece of work needs as the
growth of the process's high-water mark while it runs (``reset_peak_rss`` starts a new
one). Where ``/proc`` is not available the functions return None.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path


def _status_bytes(key: str) -> int | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak_rss() -> bool:
    """Start a new high-water mark of resident memory; False where the system cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    return _status_bytes("VmHWM")


def rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


def settle_allocators() -> None:
    """Make MKL (PyTorch's CPU BLAS, where it is built with it) free its matrix products' work buffers when
    they are done instead of keeping them for reuse, unless the user chose otherwise.

    It must be set before the first product. Kept, those buffers stayed resident beside a layer's
    statistics and solves (``bench/bench_streaming.py``); letting them go did not slow a run.
    """
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")


def return_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise, and resident memory only grows)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
STREAMING_MMAP_THRESHOLD = 4 * 2**20


def map_large_allocations(threshold: int = STREAMING_MMAP_THRESHOLD) -> bool:
    """Serve every heap allocation of ``threshold`` bytes or more from a mapping of its own, which goes
    back to the system when it is freed; False where the user set ``MALLOC_MMAP_THRESHOLD_`` or the C
    library is not glibc.

    Below a threshold that grows with the largest block freed (up to 32 MiB) glibc serves allocations
    from its heap, where a streamed layer's step leaves them scattered among live ones, so that
    returning freed memory cannot give their pages back (``bench/bench_streaming.py``). The price is
    fresh page faults for every such allocation, which slowed an in-memory evaluation by a fifth and
    did not show in streamed runs: layer streaming sets it, since memory is what it is for.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
