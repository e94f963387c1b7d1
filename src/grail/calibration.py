"""Calibration activations and passes of one decoder layer over them.

The calibration windows enter the model once; a pre-hook on the first decoder layer keeps
its inputs (and the keyword arguments the layer needs: rotary embeddings, masks) and stops
the forward pass. :func:`run_layer` then runs one layer over the kept activations, with
hooks that accumulate input statistics of chosen linear layers, optionally stopping at one
of them, optionally replacing the activations by the layer's outputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from grail.models.arch import ArchSpec
from grail.stats import InputStats


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


@dataclass
class Calibration:
    """Calibration activations entering the current layer, batch by batch."""

    hidden: list[Tensor]
    kwargs: list[dict]
    starts: list[int]  # index of each batch's first calibration sample
    device: torch.device  # where the layer computes

    @property
    def n_samples(self) -> int:
        return self.starts[-1] + self.hidden[-1].shape[0] if self.hidden else 0

    def head(self, n_samples: int) -> Calibration:
        """The batches holding the first ``n_samples`` samples, as a separate list (same tensors)."""
        k = sum(1 for start in self.starts if start < n_samples)
        return Calibration(self.hidden[:k], self.kwargs[:k], self.starts[:k], self.device)


def _fits_on_device(device: torch.device, n_bytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return n_bytes < 0.25 * free


def capture_layer_inputs(model: nn.Module, arch: ArchSpec, windows: Tensor, batch_size: int) -> Calibration:
    """Run the calibration windows up to the first decoder layer and keep what it receives."""
    first = arch.decoder_layers(model)[0]
    device = next(first.parameters()).device
    hidden_size = model.config.hidden_size
    dtype = next(first.parameters()).dtype
    n_bytes = windows.numel() * hidden_size * torch.finfo(dtype).bits // 8
    storage = device if _fits_on_device(device, n_bytes) else torch.device("cpu")
    captured: list[tuple[Tensor, dict]] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.to(storage), kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    starts = list(range(0, windows.shape[0], batch_size))
    try:
        with torch.no_grad():
            for start in starts:
                with contextlib.suppress(_StopForward):
                    model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return Calibration([h for h, _ in captured], [kw for _, kw in captured], starts, device)


def layer_output(out) -> Tensor:
    """A decoder layer's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, tuple) else out


def layer_inputs(layer: nn.Module, hidden: Tensor, kwargs: dict, device: torch.device) -> tuple[Tensor, dict]:
    """Activations and keyword arguments on the layer's device and in its floating dtype."""
    dtype = next(layer.parameters()).dtype

    def cast(value):
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value

    return hidden.to(device=device, dtype=dtype), {k: cast(v) for k, v in kwargs.items()}


def _sample_kwargs(kwargs: dict, j: int, batch: int) -> dict:
    """The keyword arguments for sample ``j`` of a batch (tensors with a batch axis are sliced)."""

    def pick(value):
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
            return value[j : j + 1]
        if isinstance(value, tuple):
            return tuple(pick(v) for v in value)
        return value

    return {k: pick(v) for k, v in kwargs.items()}


def iter_samples(layer: nn.Module, calib: Calibration, n_samples: int):
    """``(hidden [1, T, d], kwargs)`` for each of the first ``n_samples`` calibration samples."""
    for hidden, kwargs, start in zip(calib.hidden, calib.kwargs, calib.starts, strict=True):
        for j in range(hidden.shape[0]):
            if start + j >= n_samples:
                return
            yield layer_inputs(layer, hidden[j : j + 1], _sample_kwargs(kwargs, j, hidden.shape[0]), calib.device)


Taps = list[tuple[nn.Linear, list[tuple[InputStats, int]]]]


def run_layer(
    layer: nn.Module,
    calib: Calibration,
    taps: Taps = (),
    stop_at: nn.Linear | None = None,
    update: bool = False,
) -> None:
    """Run ``layer`` over the calibration batches.

    ``taps`` accumulate statistics of a linear layer's input; each ``(stats, limit)``
    target sees the first ``limit`` calibration samples. With ``stop_at`` the pass ends at
    that linear layer's input (nothing after it is computed, and batches no target needs
    are skipped); with ``update`` the layer's outputs replace the calibration activations.
    """
    current = {"start": 0}

    def make_hook(linear, targets):
        def hook(module, args):
            x = args[0]
            start = current["start"]
            for stats, limit in targets:
                k = min(x.shape[0], limit - start)
                if k <= 0:
                    continue
                if stats.n_folds == 1:
                    stats.update(x[:k])
                    continue
                folds = (start + torch.arange(k, device=x.device)) % stats.n_folds  # sample j -> fold j % K
                for fold in folds.unique().tolist():
                    stats.update(x[:k][folds == fold], fold=fold)
            if module is stop_at:
                raise _StopForward

        return hook

    needed = calib.n_samples
    if stop_at is not None and not update:
        needed = max((limit for _, targets in taps for _, limit in targets), default=0)
    handles = [linear.register_forward_pre_hook(make_hook(linear, targets)) for linear, targets in taps]
    try:
        with torch.no_grad():
            for b, (hidden, kwargs) in enumerate(zip(calib.hidden, calib.kwargs, strict=True)):
                if calib.starts[b] >= needed:
                    break
                current["start"] = calib.starts[b]
                x, kw = layer_inputs(layer, hidden, kwargs, calib.device)
                try:
                    out = layer_output(layer(x, **kw))
                except _StopForward:
                    continue
                if update:
                    calib.hidden[b] = out.to(device=hidden.device, dtype=hidden.dtype)
    finally:
        for handle in handles:
            handle.remove()
