"""Calibration activations and passes of one decoder layer over them.

The calibration windows enter the model once; a pre-hook on the first decoder layer keeps
its inputs (and the keyword arguments the layer needs: rotary embeddings, masks) and stops
the forward pass. :func:`run_layer` then runs one layer over the kept activations, with
hooks that accumulate input statistics of chosen linear layers, optionally stopping at one
of them, optionally replacing the activations by the layer's outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from grail.models.arch import ArchSpec
from grail.stats import InputStats

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


@dataclass
class Calibration:
    """Calibration activations entering the current layer, batch by batch.

    ``ids`` hold the global index of every sample of every batch, in increasing order: a
    process of a data-parallel run holds only its share of the samples, and statistics
    that use "the first N samples" or "fold = sample index mod K" must agree across
    processes. With ``spill_dir`` the activations are memory-mapped files there.
    """

    hidden: list[Tensor]
    kwargs: list[dict]
    ids: list[Tensor]
    spill_dir: Path | None = None

    @property
    def n_samples(self) -> int:
        return sum(len(i) for i in self.ids)

    def first_samples(self, n_samples: int) -> Calibration:
        """The batches holding samples below ``n_samples``, as separate lists (in-memory tensors are shared)."""
        keep = [b for b, ids in enumerate(self.ids) if int(ids[0]) < n_samples]
        hidden = [self.hidden[b] for b in keep]
        spill_dir = self.spill_dir
        if spill_dir is not None:  # file-backed tensors are updated in place: copy them, into a folder of their own
            spill_dir = Path(tempfile.mkdtemp(dir=self.spill_dir))
            hidden = [_spill(h, spill_dir) for h in hidden]
        return Calibration(hidden, [self.kwargs[b] for b in keep], [self.ids[b] for b in keep], spill_dir)

    def release(self) -> None:
        """Drop the activations: their memory is freed once nothing else holds them, spilled files are deleted."""
        self.hidden, self.kwargs, self.ids = [], [], []
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


class InMemoryLayers:
    """A layer source whose decoder layers are already where they compute: nothing to load or release.

    A layer source loads decoder layer ``index`` before it is used and releases it after
    (:class:`grail.streaming.LayerStreamer` reads them from disk and writes pruned ones out).
    """

    resident = True  # every layer stays loaded, so a batch may go through all layers at once

    def load(self, index: int, layer: nn.Module) -> None:
        pass

    def release(self, index: int, layer: nn.Module, write: bool) -> None:
        pass


def _spill(tensor: Tensor, folder: Path) -> Tensor:
    """A copy of ``tensor`` backed by a memory-mapped file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=folder, suffix=".bin")
    with os.fdopen(handle, "wb") as f:
        f.truncate(tensor.numel() * tensor.element_size())
    path = Path(name)
    mapped = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)
    mapped.copy_(tensor)
    return mapped


def available_ram() -> int:
    """Bytes of memory available to this process now (0 when the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _storage_for(device: torch.device, n_bytes: int) -> str:
    """Where calibration activations of ``n_bytes`` live: the compute device, RAM, or disk."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if n_bytes < 0.25 * free:
            return "device"
    ram = available_ram()
    return "ram" if ram == 0 or n_bytes < 0.5 * ram else "disk"


def capture_layer_inputs(
    model: nn.Module,
    arch: ArchSpec,
    windows: Tensor,
    batch_size: int,
    ids: Tensor | None = None,
    spill_dir: Path | None = None,
) -> Calibration:
    """Run the calibration windows up to the first decoder layer and keep what it receives.

    ``ids`` are the windows' global sample indices (default ``0..n-1``). Activations stay on
    the compute device when they fit, else in RAM, else in memory-mapped files under
    ``spill_dir`` (a temporary folder when not given).
    """
    device = model.get_input_embeddings().weight.device
    ids = torch.arange(windows.shape[0]) if ids is None else ids
    dtype = model.get_input_embeddings().weight.dtype
    n_bytes = windows.numel() * model.config.hidden_size * torch.finfo(dtype).bits // 8
    where = _storage_for(device, n_bytes) if spill_dir is None else "disk"
    if where == "disk":  # a folder of this capture's own (in the given folder, or the system's temporary one)
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
        spill_dir = Path(tempfile.mkdtemp(prefix="grail-activations-", dir=spill_dir))
        log.info("calibration activations (%.1f GiB) spill to memory-mapped files in %s", n_bytes / 2**30, spill_dir)
    captured: list[tuple[Tensor, dict]] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if where == "disk":
            hidden = _spill(hidden.cpu(), spill_dir)
        captured.append((hidden if where == "device" else hidden.cpu(), kwargs))
        raise _StopForward

    handle = arch.decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    starts = range(0, windows.shape[0], batch_size)
    try:
        with torch.no_grad():
            for start in starts:
                with contextlib.suppress(_StopForward):
                    model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    batch_ids = [ids[start : start + batch_size] for start in starts]
    return Calibration(
        [h for h, _ in captured], [kw for _, kw in captured], batch_ids, spill_dir if where == "disk" else None
    )


def layer_output(out) -> Tensor:
    """A decoder layer's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, tuple) else out


def layer_inputs(layer: nn.Module, hidden: Tensor, kwargs: dict) -> tuple[Tensor, dict]:
    """Activations and keyword arguments on the layer's device, floats in its dtype."""
    param = next(layer.parameters())
    device, dtype = param.device, param.dtype

    def cast(value):
        if isinstance(value, Tensor):
            return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
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
    """``(sample id, hidden [1, T, d], kwargs)`` for each held sample with a global index below ``n_samples``."""
    for hidden, kwargs, ids in zip(calib.hidden, calib.kwargs, calib.ids, strict=True):
        for j in range(hidden.shape[0]):
            if int(ids[j]) >= n_samples:
                return
            yield (int(ids[j]), *layer_inputs(layer, hidden[j : j + 1], _sample_kwargs(kwargs, j, hidden.shape[0])))


Taps = list[tuple[nn.Linear, list[tuple[InputStats, int]]]]


def fold_rows(ids: Tensor, limit: int, n_folds: int) -> list[tuple[int, Tensor | None]]:
    """``(fold, rows)`` of a batch's samples with global index below ``limit`` (``ids`` increase).

    ``rows`` index the first ``k`` samples of the batch (None: all ``k`` of them, in one fold);
    sample ``i`` belongs to fold ``i % n_folds``.
    """
    k = int((ids < limit).sum())
    if k == 0:
        return []
    if n_folds == 1:
        return [(0, None)]
    folds = ids[:k] % n_folds
    present = folds.unique().tolist()
    if len(present) == 1:  # no copy of the rows (one window at a time is always one fold)
        return [(present[0], None)]
    return [(fold, (folds == fold).nonzero().squeeze(1)) for fold in present]


def _run_to(layer: nn.Module, hidden: Tensor, kwargs: dict, consumer: str, added: str | None, finish: bool):
    """``(layer input, consumer input, output of module added or None, layer output or None)`` of one batch.

    The pass stops at the consumer unless ``finish``.
    """
    got: dict = {}

    def at_consumer(module, args):
        got["input"] = args[0]
        if not finish:
            raise _StopForward

    def at_added(module, args, out):
        got["added"] = out

    handles = [layer.get_submodule(consumer).register_forward_pre_hook(at_consumer)]
    if added is not None:
        handles.append(layer.get_submodule(added).register_forward_hook(at_added))
    out = None
    try:
        x, kw = layer_inputs(layer, hidden, kwargs)
        with torch.no_grad(), contextlib.suppress(_StopForward):
            out = layer_output(layer(x, **kw))
    finally:
        for handle in handles:
            handle.remove()
    return x, got["input"], got.get("added"), out


def _accumulate(x: Tensor, ids: Tensor, targets: list[tuple[InputStats, int]]) -> None:
    """Add a batch's inputs ``x`` to each ``(stats, limit)`` target: samples below ``limit``, by fold."""
    for stats, limit in targets:
        k = int((ids < limit).sum())
        for fold, rows in fold_rows(ids, limit, stats.n_folds):
            stats.update(x[:k] if rows is None else x[:k][rows.to(x.device)], fold=fold)


def _store(calib: Calibration, b: int, out: Tensor) -> None:
    """Replace batch ``b`` of the activations by a layer's outputs (written through to a spilled file)."""
    hidden = calib.hidden[b]
    out = out.to(device=hidden.device, dtype=hidden.dtype)
    if calib.spill_dir is not None:
        hidden.copy_(out)
    else:
        calib.hidden[b] = out


def _dense_block(arch: ArchSpec, kind: str, layer: nn.Module, hidden: Tensor, kwargs: dict, at_mid: bool):
    """One batch through the ``kind`` block of a dense layer: ``(block input, consumer input, consumer output,
    block output)``.

    A block's input is the residual stream its output is added to: the layer's input for the attention block,
    the layer's *mid* state (input plus attention output) for the MLP block. With ``at_mid``, ``hidden`` is that
    mid state already, and only the MLP half of the layer runs. The attention block's pass ends at its consumer.
    """
    consumer = layer.get_submodule(arch.consumer_names()[kind])
    attention_out = layer.get_submodule(arch.consumer_names()["attn"])
    got: dict = {}

    def at_consumer(module, args, out):
        got["input"], got["output"] = args[0], out
        if kind == "attn":
            raise _StopForward

    def at_attention_out(module, args, out):
        got["attention"] = out

    handles = [consumer.register_forward_hook(at_consumer)]
    if kind == "mlp" and not at_mid:
        handles.append(attention_out.register_forward_hook(at_attention_out))
    try:
        with torch.no_grad():
            if at_mid:
                mid, _ = layer_inputs(layer, hidden, {})
                out = arch.mlp_block(layer, mid)
                return mid, got["input"], got["output"], out
            x, kw = layer_inputs(layer, hidden, kwargs)
            if kind == "attn":
                with contextlib.suppress(_StopForward):
                    layer(x, **kw)
                return x, got["input"], got["output"], x + got["output"]  # the layer's own sum
            out = layer_output(layer(x, **kw))
            return x + got["attention"], got["input"], got["output"], out
    finally:
        for handle in handles:
            handle.remove()


def run_paired(
    arch: ArchSpec,
    kind: str,
    layer: nn.Module,
    dense_layer: nn.Module,
    calib: Calibration,
    dense: Calibration,
    limit: int,
    on_window,
    taps: list[tuple[InputStats, int]] = (),
    dense_at_mid: bool = False,
) -> None:
    """Run a layer being pruned and its dense copy side by side through the ``kind`` block, batch by batch.

    ``dense`` holds the dense model's activations entering this layer (or, with ``dense_at_mid``,
    the mid state an attention block's pass left), for the samples of the first batches of
    ``calib``. For every window below ``limit``, ``on_window(ids, inputs, dense_out,
    drift)`` receives the consumer's input in the layer, the dense consumer's output without
    its bias (float64), and the drift of the block's input, the residual stream the block is
    added to (dense minus pruned, float64). The dense block's output then replaces the dense
    stream's activations: after the attention block the stream holds the layer's mid state,
    after the MLP block the layer's output, so each half of the dense layer runs once.

    ``taps`` (``(stats, limit)`` pairs) accumulate the consumer's input in the layer as
    :func:`run_layer`'s taps do, over every batch they need, in the same pass.
    """
    names = arch.consumer_names()
    consumer, added = names[kind], (names["attn"] if kind == "mlp" else None)
    bias = dense_layer.get_submodule(consumer).bias
    needed = max([limit, *(lim for _, lim in taps)])
    if any(int(ids[0]) >= needed for ids in dense.ids):
        raise ValueError("the dense stream holds samples the pass would not reach: it would fall out of step")
    for b, ids in enumerate(calib.ids):
        if int(ids[0]) >= needed:
            break
        x, h, o, _ = _run_to(layer, calib.hidden[b], calib.kwargs[b], consumer, added, finish=False)
        _accumulate(h, ids, list(taps))
        if b >= len(dense.hidden):
            continue
        if not torch.equal(ids, dense.ids[b]):
            raise RuntimeError("the dense and pruned calibration streams hold different samples")
        block_in, _, dense_out, block_out = _dense_block(
            arch, kind, dense_layer, dense.hidden[b], dense.kwargs[b], dense_at_mid
        )
        pruned_in = x if o is None else x + o  # the pruned layer's own sum
        # A window at a time: in float64 the targets of a whole batch would be several batch x O matrices.
        for w in range(int((ids < limit).sum())):
            out = dense_out[w : w + 1].to(torch.float64)
            if bias is not None:
                out -= bias.to(out)
            drift = block_in[w : w + 1].to(torch.float64) - pruned_in[w : w + 1].to(torch.float64)
            on_window(ids[w : w + 1], h[w : w + 1], out, drift)
        _store(dense, b, block_out)


def advance_from_mid(arch: ArchSpec, dense_layer: nn.Module, dense: Calibration) -> None:
    """Move a dense stream holding a layer's mid state on to the layer's output (the MLP half only)."""
    with torch.no_grad():
        for b, hidden in enumerate(dense.hidden):
            mid, _ = layer_inputs(dense_layer, hidden, {})
            _store(dense, b, arch.mlp_block(dense_layer, mid))


def run_layer(
    layer: nn.Module,
    calib: Calibration,
    taps: Taps = (),
    stop_at: nn.Linear | None = None,
    update: bool = False,
) -> None:
    """Run ``layer`` over the calibration batches, on the layer's own device.

    ``taps`` accumulate statistics of a linear layer's input; each ``(stats, limit)``
    target sees the samples whose global index is below ``limit``. With ``stop_at`` the
    pass ends at that linear layer's input (nothing after it is computed, and batches no
    target needs are skipped); with ``update`` the layer's outputs replace the calibration
    activations.
    """
    current: dict = {}

    def make_hook(targets):
        def hook(module, args):
            _accumulate(args[0], current["ids"], targets)
            if module is stop_at:
                raise _StopForward

        return hook

    needed = None
    if stop_at is not None and not update:
        needed = max((limit for _, targets in taps for _, limit in targets), default=0)
    handles = [linear.register_forward_pre_hook(make_hook(targets)) for linear, targets in taps]
    try:
        with torch.no_grad():
            for b, (hidden, kwargs) in enumerate(zip(calib.hidden, calib.kwargs, strict=True)):
                current["ids"] = calib.ids[b]
                if needed is not None and int(calib.ids[b][0]) >= needed:
                    break
                x, kw = layer_inputs(layer, hidden, kwargs)
                try:
                    out = layer_output(layer(x, **kw))
                except _StopForward:
                    continue
                if update:
                    _store(calib, b, out)
    finally:
        for handle in handles:
            handle.remove()
