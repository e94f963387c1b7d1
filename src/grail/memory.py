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
