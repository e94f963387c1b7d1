"""Named wall-clock sections, summed over a run, with the peak memory each section reached."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from grail.memory import peak_rss_bytes, reset_peak_rss


class Timer:
    """Accumulates seconds per named section; CUDA work is synchronised at section ends.

    Each section also records the highest resident memory of the process while it ran
    (``host_peaks``, from Linux's high-water mark, which every section entry resets) and, on
    CUDA, the highest memory allocated on the device (``device_peaks``): the measured
    counterpart of :mod:`grail.plan`'s stages.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.host_peaks: dict[str, int] = {}
        self.device_peaks: dict[str, int] = {}

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        tracked = reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
                _raise(self.device_peaks, name, torch.cuda.max_memory_allocated())
            self.seconds[name] += time.perf_counter() - start
            if tracked:
                _raise(self.host_peaks, name, peak_rss_bytes())

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}

    def memory(self) -> dict:
        """Peak bytes per section on the host (and the CUDA device), and the highest of them.

        Every section restarts the kernel's high-water mark, so the process's own peak is the
        highest section's, or the mark since the last section began if that is higher.
        """
        highest = max([*self.host_peaks.values(), peak_rss_bytes() or 0])
        out: dict = {"host_peaks": dict(self.host_peaks), "peak_host_bytes": highest}
        if self.device_peaks:
            out |= {"device_peaks": dict(self.device_peaks), "peak_device_bytes": max(self.device_peaks.values())}
        return out


def _raise(peaks: dict[str, int], name: str, value: int | None) -> None:
    if value is not None:
        peaks[name] = max(peaks.get(name, 0), value)
