"""The sequential layer loop: prune and compensate one decoder layer at a time.

The calibration windows enter the model once; a pre-hook on the first decoder layer keeps
its inputs (and the keyword arguments the layer needs: rotary embeddings, masks) and stops
the forward pass. Then, for each layer in order:

1. attention block: run the layer on all calibration batches, collect statistics of
   ``o_proj``'s input with a pre-hook that stops the pass right there, let the method pick
   the kept heads, fold the compensation into ``o_proj``, remove the heads;
2. MLP block: the same for ``down_proj``, now with the pruned attention in front of it, so
   the MLP's statistics are those it will see at inference;
3. run the pruned layer once more; its outputs are the next layer's inputs.

A block that loses no unit is left alone and costs no pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from torch import Tensor, nn
from tqdm.auto import tqdm

from grail import distributed
from grail.calibration import Calibration, capture_layer_inputs, run_layer
from grail.compensate import add_bias, choose_lambda, fit_consumer, mean_bias_shift
from grail.config import PruneConfig
from grail.errors import GrailError
from grail.methods import BlockContext, Decision, Method, make_method
from grail.models.arch import ArchSpec, arch_for, layer_shape, linear_param_count
from grail.stats import InputStats
from grail.surgery import prune_attention, prune_mlp, set_consumer
from grail.timing import Timer

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What pruning did: parameter counts, per-block decisions, timings, calibration passes."""

    method: str
    pruning_ratio: float
    params_before: int
    params_after: int
    blocks: list[dict] = field(default_factory=list)
    layer_passes: int = 0  # forward passes of one decoder layer over the calibration set, summed
    n_layers: int = 0
    calibration_windows: int = 0

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def model_passes(self) -> float:
        """Calibration passes through the whole model (layer passes / layers)."""
        return self.layer_passes / self.n_layers if self.n_layers else 0.0

    def auto_lambda_summary(self) -> str | None:
        """One line on --ridge_lambda auto's decisions, or None when it was not used."""
        chosen = [b for b in self.blocks if "compensated" in b]
        if not chosen:
            return None
        used = sorted(b["lambda"] for b in chosen if b["compensated"])
        span = f"lambda {used[0]:g} to {used[-1]:g}" if used else "no lambda used"
        return f"GRAIL auto: compensated {len(used)} of {len(chosen)} consumers ({span}); the rest kept plain pruning"

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "pruning_ratio": self.pruning_ratio,
            "calibration_windows": self.calibration_windows,
            "model_passes": round(self.model_passes, 3),
            "blocks": self.blocks,
        }


def _consumer_update(
    weight: Tensor,
    bias: Tensor | None,
    kept_columns: Tensor,
    decision: Decision,
    selection: InputStats | None,
    gram_stats: InputStats | None,
    config: PruneConfig,
    mean_bias: bool,
    where: str,
) -> tuple[Tensor, Tensor | None, dict]:
    """The consumer's new weight over the kept columns, its bias, and notes for the report."""
    kept_columns = kept_columns.to(weight.device)
    mean_shift = mean_bias_shift(weight, selection.mean, kept_columns) if mean_bias else None
    if decision.weight is not None:  # the method's own update (SlimGPT) is the uncompensated consumer
        plain_weight, plain_shift = decision.weight, decision.bias_shift
    else:
        plain_weight, plain_shift = weight[:, kept_columns], mean_shift
    if not config.compensate:
        return plain_weight, add_bias(bias, plain_shift), {}
    affine = config.grail_fit == "affine" and config.bias_compensation
    notes: dict = {}
    lam = config.ridge_lambda
    if lam == "auto":
        fit_name = "affine" if affine else ("seed" if config.grail_fit == "seed" else "linear")
        choice = choose_lambda(
            weight, gram_stats.fold_moments(), kept_columns, fit_name, mean_bias, where=where, prior=config.prior
        )
        notes = {
            "lambda": choice.lam,
            "heldout_error": choice.heldout_error,
            "plain_heldout_error": choice.plain_error,
            "compensated": choice.compensate,
        }
        if not choice.compensate:  # the guard: keep the uncompensated consumer
            return plain_weight, add_bias(bias, plain_shift), notes
        lam = choice.lam
    fit = fit_consumer(weight, gram_stats.moments(), kept_columns, lam, affine, where, config.prior)
    if fit.jitter:
        log.info("%s: kept units' Gram matrix singular; solved with jitter %.0e x its mean diagonal", where, fit.jitter)
    shift = fit.bias_shift
    if config.grail_fit == "seed":
        shift = add_bias(shift, mean_shift)  # the research code's convention: mean bias on top
    notes.update({"lambda": lam, "jitter": fit.jitter})
    return fit.weight, add_bias(bias, shift), notes


def block_contexts(arch: ArchSpec, index: int, layer: nn.Module, config: PruneConfig) -> dict[str, BlockContext]:
    """The attention and MLP blocks of a layer, before any decision."""
    shape = layer_shape(arch, layer)
    q, _, _, o = arch.attention_linears(layer)
    gate, _, down = arch.mlp_linears(layer)
    return {
        "attn": BlockContext(index, "attn", shape, o, None, 0, config.attention_unit, q.bias is not None),
        "mlp": BlockContext(index, "mlp", shape, down, None, 0, config.attention_unit, gate.bias is not None),
    }


def _linear_params(arch: ArchSpec, layer: nn.Module) -> int:
    linears = (*arch.attention_linears(layer), *arch.mlp_linears(layer))
    return sum(lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0) for lin in linears)


class InMemoryLayers:
    """Decoder layers that are already where they compute: nothing to load or release."""

    def load(self, index: int, layer: nn.Module) -> None:
        pass

    def release(self, index: int, layer: nn.Module, write: bool) -> None:
        pass


def dense_statistics(
    arch: ArchSpec,
    layers: nn.ModuleList,
    calib: Calibration,
    n_samples: int,
    source,
    observe=None,
    progress: bool = True,
) -> dict[tuple[int, str], InputStats]:
    """One pass through the dense model: every consumer's input statistics, no pruning.

    The activations of ``calib`` are advanced through all layers; pass a :meth:`head`
    view to keep the first layer's inputs for a later pass. ``observe(index, stats)`` is
    called while each layer is still loaded.
    """
    stats = {}
    for index, layer in enumerate(tqdm(layers, desc="scoring pass", disable=not progress)):
        source.load(index, layer)
        o, down = arch.attention_linears(layer)[3], arch.mlp_linears(layer)[2]
        layer_stats = {
            "attn": InputStats(o.in_features, gram=False, device=o.weight.device),
            "mlp": InputStats(down.in_features, gram=False, device=down.weight.device),
        }
        taps = [(o, [(layer_stats["attn"], n_samples)]), (down, [(layer_stats["mlp"], n_samples)])]
        run_layer(layer, calib, taps, update=True)
        for kind, s in layer_stats.items():
            s.all_reduce()
            s.check_finite(f"layer {index} {arch.consumer_names()[kind]}")
            stats[(index, kind)] = s
        if observe is not None:
            observe(index, layer_stats)
        source.release(index, layer, write=False)
    return stats


def prune_model(
    model: nn.Module,
    windows: Tensor | None,
    config: PruneConfig,
    timer: Timer | None = None,
    method: Method | None = None,
    progress: bool = True,
    shared: dict | None = None,
    source=None,
) -> PruneReport:
    """Prune (and, with ``config.compensate``, compensate) ``model`` in place.

    ``windows`` are calibration token windows (``[n, seqlen]`` LongTensor); the first
    ``config.nsamples`` feed the method's statistics and the first ``config.gram_nsamples``
    the compensation's Gram matrices. Methods that read no activations need none.

    ``shared`` is a dictionary kept by the caller across runs on copies of the *same dense
    model* with the *same windows* (a sweep): the first layer's inputs and the dense
    scoring pass are computed once and reused from it.

    ``source`` loads each decoder layer before it is processed and releases it after
    (:class:`grail.streaming.LayerStreamer` streams them from disk); by default the layers
    are in memory already.
    """
    timer = timer or Timer()
    source = source or InMemoryLayers()
    arch = arch_for(model.config)
    method = method or make_method(config)
    layers = arch.decoder_layers(model)
    before = linear_param_count(arch, model)
    report = PruneReport(method.name, config.pruning_ratio, before, before, n_layers=len(layers))
    needed = config.windows_needed(method.uses_activations)
    if config.pruning_ratio == 0:
        return report
    calib = None
    if needed:
        if windows is None or windows.shape[0] < needed:
            have = 0 if windows is None else windows.shape[0]
            raise GrailError(
                f"{needed} calibration windows are needed (--nsamples / --comp_nsamples) but {have} were given."
            )
        ids = distributed.shard(needed)  # all windows in one process; a share of them under torchrun
        with timer.section("calibration"):
            calib = _shared(
                shared,
                ("first layer inputs", needed, config.calib_batch_size),
                lambda: capture_layer_inputs(
                    model, arch, windows[ids], config.calib_batch_size, ids, config.offload_activations
                ),
            ).head(needed)
        report.calibration_windows = needed

    planned = None
    if method.global_plan:
        planned = _plan(arch, layers, calib, config, method, timer, report, progress, shared, source)
        if not config.compensate:
            calib = None  # the plan and the scoring pass's means are all that pruning needs

    step = _LayerStep(arch, calib, config, method, timer, report)
    desc = f"{method.name} + GRAIL" if config.compensate else method.name
    for index, layer in enumerate(tqdm(layers, desc=desc, disable=not progress)):
        source.load(index, layer)
        contexts = planned[index] if planned is not None else block_contexts(arch, index, layer, config)
        step(layer, index, len(layers), contexts)
        if calib is not None and index + 1 < len(layers):
            with timer.section("calibration"):
                run_layer(layer, calib, update=True)
            report.layer_passes += 1
        source.release(index, layer, write=True)
    report.params_after = linear_param_count(arch, model)
    return report


def _shared(shared: dict | None, key: tuple, compute):
    """``compute()``, or its earlier result under ``key`` in the caller's ``shared`` dictionary."""
    if shared is None:
        return compute()
    if key not in shared:
        shared[key] = compute()
    return shared[key]


def _plan(
    arch, layers, calib, config, method, timer, report, progress, shared, source
) -> list[dict[str, BlockContext]]:
    """Score every layer of the dense model in one pass and let the method plan globally."""
    planned = [block_contexts(arch, i, layer, config) for i, layer in enumerate(layers)]

    def observe(index: int, layer_stats: dict) -> None:  # while the layer's weights are loaded
        for kind, stats in layer_stats.items():
            planned[index][kind].stats = stats
            method.observe(planned[index][kind])

    if method.uses_activations:
        key = ("dense statistics", config.nsamples, config.calib_batch_size)
        fresh = shared is None or key not in shared
        with timer.section("calibration"):
            dense = _shared(
                shared,
                key,
                lambda: dense_statistics(
                    arch, layers, calib.head(config.nsamples), config.nsamples, source, observe, progress
                ),
            )
        report.layer_passes += len(layers) if fresh else 0
        for (index, kind), stats in dense.items():
            planned[index][kind].stats = stats
    with timer.section("pruning"):
        method.plan(planned, [_linear_params(arch, layer) for layer in layers])
    return planned


@dataclass
class _Deferred:
    """A consumer whose compensation waits until the method has finished with the layer."""

    ctx: BlockContext
    dense_weight: Tensor  # O x H, before pruning
    kept_columns: Tensor
    decision: Decision
    selection: InputStats | None
    gram_stats: InputStats
    row: dict  # its line in the report, completed when compensated


@dataclass
class _LayerStep:
    """Prunes one decoder layer: allocation, then each block's statistics, decision, update, surgery."""

    arch: ArchSpec
    calib: Calibration | None
    config: PruneConfig
    method: Method
    timer: Timer
    report: PruneReport

    def __call__(self, layer: nn.Module, index: int, n_layers: int, contexts: dict[str, BlockContext]) -> None:
        arch, method = self.arch, self.method
        n_attn, n_mlp = method.allocate(
            index, n_layers, contexts["attn"].units(), contexts["mlp"].units(), _linear_params(arch, layer)
        )
        contexts["attn"].n_remove, contexts["mlp"].n_remove = n_attn, n_mlp
        dtype = next(layer.parameters()).dtype
        if method.float32_layers:
            layer.float()
        if self.calib is not None:
            with self.timer.section("pruning"):
                method.begin_layer(layer, arch, self.calib, index)
        deferred = [self._block(layer, ctx) for ctx in contexts.values() if ctx.n_remove > 0]
        if self.calib is not None:
            with self.timer.section("pruning"):
                method.finish_layer(layer, arch, self.calib, index)
        for item in deferred:
            if item is not None:
                self._compensate_late(item)
        layer.to(dtype)

    def _block(self, layer: nn.Module, ctx: BlockContext) -> _Deferred | None:
        config, timer = self.config, self.timer
        mean_bias = config.bias_compensation and self.method.supports_bias_compensation
        where = f"layer {ctx.layer_index} {self.arch.consumer_names()[ctx.kind]}"
        selection, gram_stats = ctx.stats, None
        if self.calib is not None:
            wants_selection = selection is None and (self.method.uses_activations or mean_bias)
            with timer.section("calibration"):
                collected, gram_stats = _block_stats(
                    layer, ctx.consumer, self.calib, config, wants_selection, self.method.needs_gram
                )
            self.report.layer_passes += 1
            for stats in {id(s): s for s in (collected, gram_stats) if s is not None}.values():
                stats.all_reduce()  # data-parallel runs: sum over processes
                stats.check_finite(where)
            if selection is None:
                selection = ctx.stats = collected
        with timer.section("pruning"):
            decision = self.method.decide(ctx)
            kept_columns = decision.units.kept_columns(decision.kept)
        dense_weight = ctx.consumer.weight.data.clone()
        late = config.compensate and self.method.defer_compensation
        with timer.section("compensation" if config.compensate and not late else "pruning"):
            new_weight, new_bias, notes = _consumer_update(
                ctx.consumer.weight.data,
                None if ctx.consumer.bias is None else ctx.consumer.bias.data,
                kept_columns,
                decision,
                selection,
                gram_stats,
                replace(config, compensate=False) if late else config,
                mean_bias,
                where,
            )
        with timer.section("pruning"):
            if ctx.kind == "attn":
                prune_attention(self.arch, layer, decision.units.kept_heads(decision.kept), new_weight, new_bias)
            else:
                prune_mlp(self.arch, layer, kept_columns, new_weight, new_bias)
        row = {"layer": ctx.layer_index, "block": ctx.kind, "units": decision.units.count, "kept": len(decision.kept)}
        self.report.blocks.append(row | notes)
        if late:
            return _Deferred(ctx, dense_weight, kept_columns, decision, selection, gram_stats, self.report.blocks[-1])
        return None

    def _compensate_late(self, item: _Deferred) -> None:
        """Compensate a consumer as the method left it: its kept columns now, its removed ones as they were."""
        consumer = item.ctx.consumer
        current = item.dense_weight.clone()
        current[:, item.kept_columns.to(current.device)] = consumer.weight.data
        mean_bias = self.config.bias_compensation and self.method.supports_bias_compensation
        with self.timer.section("compensation"):
            weight, bias, notes = _consumer_update(
                current,
                None if consumer.bias is None else consumer.bias.data,
                item.kept_columns,
                replace(item.decision, weight=None, bias_shift=None),
                item.selection,
                item.gram_stats,
                self.config,
                mean_bias,
                f"layer {item.ctx.layer_index} {self.arch.consumer_names()[item.ctx.kind]}",
            )
        set_consumer(consumer, weight, bias)
        item.row.update(notes)


def _block_stats(
    layer: nn.Module,
    consumer: nn.Linear,
    calib: Calibration,
    config: PruneConfig,
    wants_selection: bool,
    selection_gram: bool,
) -> tuple[InputStats | None, InputStats | None]:
    """Statistics of a consumer's inputs, collected in one pass that stops at the consumer.

    Returns (selection statistics over ``nsamples`` windows, with a Gram matrix when
    ``selection_gram``, or None unless ``wants_selection``; Gram statistics over
    ``comp_nsamples`` windows, or None without compensation). When both cover the same
    windows they are one object.
    """
    device, dim = consumer.weight.device, consumer.in_features
    wants_gram = config.compensate
    folds = config.cv_folds if config.ridge_lambda == "auto" else 1
    if wants_gram and (not wants_selection or config.gram_nsamples == config.nsamples):
        shared = InputStats(dim, gram=True, device=device, n_folds=folds)
        run_layer(layer, calib, [(consumer, [(shared, config.gram_nsamples)])], stop_at=consumer)
        return (shared if wants_selection else None), shared
    selection = InputStats(dim, gram=selection_gram, device=device) if wants_selection else None
    gram_stats = InputStats(dim, gram=True, device=device, n_folds=folds) if wants_gram else None
    targets = [(selection, config.nsamples)] if selection is not None else []
    if gram_stats is not None:
        targets.append((gram_stats, config.gram_nsamples))
    if targets:
        run_layer(layer, calib, [(consumer, targets)], stop_at=consumer)
    return selection, gram_stats
