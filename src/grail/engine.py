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

A block that loses no unit is left alone and costs no pass. The engine knows no method by
name: it drives each method's selector, allocator and layer transforms
(:mod:`grail.methods.base`) and hands every consumer update to the
:class:`~grail.policy.CompensationPolicy`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from grail import distributed
from grail.calibration import (
    Calibration,
    InMemoryLayers,
    advance_from_mid,
    capture_layer_inputs,
    fold_rows,
    run_layer,
    run_paired,
)
from grail.config import ConfigError, PruneConfig
from grail.errors import GrailError
from grail.memory import return_freed_memory
from grail.methods import Block, Decision, Evidence, Method, make_method
from grail.models.arch import ArchSpec, arch_for, layer_shape, linear_param_count
from grail.policy import CompensationPolicy
from grail.stats import InputStats, TargetStats
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
    underdetermined: int = 0  # compensated consumers with fewer calibration tokens than kept inputs (fixed lambda)
    n_layers: int = 0
    calibration_windows: int = 0
    stats_device: str | None = None  # where the statistics accumulated (--stats_device, made definite)

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
            "stats_device": self.stats_device,
            "blocks": self.blocks,
        }


def previous_lambda(blocks: list[dict], kind: str) -> float | None:
    """The lambda of the latest report row of this kind of block that has one (where the local search starts)."""
    for row in reversed(blocks):
        if row["block"] == kind and "lambda" in row:
            return row["lambda"]
    return None


def layer_blocks(arch: ArchSpec, index: int, layer: nn.Module, attention_unit: str) -> dict[str, Block]:
    """The attention and MLP blocks of a decoder layer."""
    shape = layer_shape(arch, layer)
    q, _, _, o = arch.attention_linears(layer)
    gate, _, down = arch.mlp_linears(layer)
    return {
        "attn": Block(index, "attn", shape, o, attention_unit, q.bias is not None),
        "mlp": Block(index, "mlp", shape, down, attention_unit, gate.bias is not None),
    }


def _linear_params(arch: ArchSpec, layer: nn.Module) -> int:
    linears = (*arch.attention_linears(layer), *arch.mlp_linears(layer))
    return sum(lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0) for lin in linears)


def dense_statistics(
    arch: ArchSpec,
    layers: nn.ModuleList,
    calib: Calibration,
    n_samples: int,
    layer_source,
    observe=None,
    progress: bool = True,
) -> dict[tuple[int, str], InputStats]:
    """One pass through the dense model: every consumer's input statistics, no pruning.

    The activations of ``calib`` are advanced through all layers; pass a
    :meth:`~grail.calibration.Calibration.first_samples` copy to keep the first layer's
    inputs for a later pass. ``observe(index, stats)`` is called while each layer is loaded.
    """
    stats = {}
    for index, layer in enumerate(tqdm(layers, desc="scoring pass", disable=not progress)):
        layer_source.load(index, layer)
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
        layer_source.release(index, layer, write=False)
    return stats


def prune_model(
    model: nn.Module,
    windows: Tensor | None,
    config: PruneConfig,
    timer: Timer | None = None,
    method: Method | None = None,
    progress: bool = True,
    cache: dict | None = None,
    layer_source=None,
) -> PruneReport:
    """Prune (and, with ``config.compensate``, compensate) ``model`` in place.

    ``windows`` are calibration token windows (``[n, seqlen]`` LongTensor); the first
    ``config.nsamples`` feed the method's statistics and the first ``config.gram_nsamples``
    the compensation's Gram matrices. Methods that read no activations need none.

    ``cache`` is a dictionary kept by the caller across runs on copies of the *same dense
    model* with the *same windows* (a sweep): the first layer's inputs and the dense
    scoring pass are computed once and reused from it.

    ``layer_source`` loads each decoder layer before it is processed and releases it after
    (:class:`grail.streaming.LayerStreamer` streams them from disk); by default the layers
    are in memory already.
    """
    timer = timer or Timer()
    layer_source = layer_source or InMemoryLayers()
    arch = arch_for(model.config)
    method = method or make_method(config)
    check_target(config, method)
    layers = arch.decoder_layers(model)
    before = linear_param_count(arch, model)
    report = PruneReport(method.name, config.pruning_ratio, before, before, n_layers=len(layers))
    needed = config.windows_needed(method.uses_activations)
    if config.pruning_ratio == 0:
        return report
    config = definite_stats_device(config, model, windows, streaming=not getattr(layer_source, "resident", False))
    report.stats_device = config.stats_device
    # Limits that depend on the model's shapes, before any calibration (meta layers have shapes too).
    method.allocator.check(
        [layer_blocks(arch, i, layer, config.attention_unit)["attn"].units() for i, layer in enumerate(layers)]
    )
    calib = dense_stream = None
    if needed:
        if windows is None or windows.shape[0] < needed:
            have = 0 if windows is None else windows.shape[0]
            raise GrailError(
                f"{needed} calibration windows are needed (--nsamples / --comp_nsamples) but {have} were given."
            )
        ids = distributed.shard(needed)  # all windows in one process; a share of them under torchrun
        with timer.section("calibration"):
            captured = _cached(
                cache,
                ("first layer inputs", needed, config.calib_batch_size),
                lambda: capture_layer_inputs(
                    model, arch, windows[ids], config.calib_batch_size, ids, config.offload_activations
                ),
            )
            calib = captured.first_samples(needed)
            if CompensationPolicy.from_config(config).dense_targets:  # the dense model's stream, beside the pruned one
                dense_stream = captured.first_samples(config.target_nsamples)
        report.calibration_windows = needed
        # Without a cache nothing else needs the captured inputs: keep a handle only on spilled
        # files (to delete them), so in-memory activations can be freed as soon as pruning is done with them.
        spilled = captured if cache is None and captured.spill_dir is not None else None
        del captured
    try:
        _prune_layers(
            model, arch, layers, calib, dense_stream, config, method, timer, report, progress, cache, layer_source
        )
    finally:  # spilled activations are deleted, whether pruning ended or was interrupted
        if dense_stream is not None:
            dense_stream.release()
        if calib is not None:
            calib.release()
            if spilled is not None:
                spilled.release()
        return_freed_memory()  # the statistics and activations are gone: evaluation starts from the model's size
    report.params_after = linear_param_count(arch, model)
    return report


def _prune_layers(
    model, arch, layers, calib, dense_stream, config, method, timer, report, progress, cache, layer_source
) -> None:
    """The layer loop of :func:`prune_model`: plan (global allocators), then prune each layer in order."""

    policy = CompensationPolicy.from_config(config)
    dense: dict[tuple[int, str], InputStats] = {}
    if method.allocator.is_global:
        dense = _plan(arch, layers, calib, config, method, timer, report, progress, cache, layer_source)
        # dense-model targets need the pruned model's stream too
        if calib is not None and not config.compensate and not method.transforms and not policy.dense_targets:
            calib.release()  # the plan and the scoring pass's statistics are all that pruning needs
            calib = None

    step = _LayerStep(arch, calib, config, policy, method, timer, report, dense_stream)
    desc = f"{method.name} + GRAIL" if config.compensate else method.name
    for index, layer in enumerate(tqdm(layers, desc=desc, disable=not progress)):
        layer_source.load(index, layer)
        step(layer, index, len(layers), {kind: dense.get((index, kind)) for kind in ("attn", "mlp")})
        if calib is not None and index + 1 < len(layers):
            return_freed_memory()  # the layer's statistics and solves: the output pass starts from what is alive
            with timer.section("calibration"):
                run_layer(layer, calib, update=True)
            report.layer_passes += 1
        layer_source.release(index, layer, write=True)


def _cached(cache: dict | None, key: tuple, compute):
    """``compute()``, or its earlier result under ``key`` in the caller's ``cache``."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _plan(
    arch, layers, calib, config, method, timer, report, progress, cache, layer_source
) -> dict[tuple[int, str], InputStats]:
    """Score every block of the dense model in one pass and let the allocator plan globally.

    Returns the dense statistics, which are also the selection statistics of every block
    (the plan was made on them).
    """
    selector = method.selector
    scored: list[dict] = [{} for _ in layers]

    def score(index: int, layer: nn.Module, layer_stats: dict) -> None:  # while the layer's weights are loaded
        for kind, block in layer_blocks(arch, index, layer, config.attention_unit).items():
            scored[index][kind] = selector.unit_scores(block, Evidence(layer_stats.get(kind)))

    dense: dict[tuple[int, str], InputStats] = {}
    if selector.uses_activations:
        key = ("dense statistics", config.nsamples, config.calib_batch_size)
        fresh = cache is None or key not in cache

        def scoring_pass() -> dict:
            scratch = calib.first_samples(config.nsamples)  # advanced through every layer, then dropped
            try:
                observe = lambda i, s: score(i, layers[i], s)  # noqa: E731
                return dense_statistics(arch, layers, scratch, config.nsamples, layer_source, observe, progress)
            finally:
                scratch.release()

        with timer.section("calibration"):
            dense = _cached(cache, key, scoring_pass)
            return_freed_memory()  # the scoring pass's activations are gone; the layer loop starts lean
        report.layer_passes += len(layers) if fresh else 0
    with timer.section("pruning"):
        if not all(scored):  # statistics from the cache (layers in memory), or a selector that reads none
            for index, layer in enumerate(layers):
                layer_source.load(index, layer)
                score(index, layer, {kind: dense.get((index, kind)) for kind in ("attn", "mlp")})
                layer_source.release(index, layer, write=False)
        method.allocator.plan(scored, [_linear_params(arch, layer) for layer in layers])
    return dense


@dataclass
class _Deferred:
    """A consumer whose compensation waits until the method's layer transforms are done."""

    block: Block
    dense_weight: Tensor  # O x H, before pruning
    kept_columns: Tensor
    selection: InputStats | None
    gram_stats: InputStats
    targets: dict[str, TargetStats]
    row: dict  # its line in the report, completed when compensated


@dataclass
class _LayerStep:
    """Prunes one decoder layer: allocation, layer transforms, then each block's statistics, decision, update, surgery."""

    arch: ArchSpec
    calib: Calibration | None
    config: PruneConfig
    policy: CompensationPolicy
    method: Method
    timer: Timer
    report: PruneReport
    dense_stream: Calibration | None = None  # the dense model's activations (for targets other than "pruned")
    dense_layer: nn.Module | None = None  # the current layer as it was before pruning, while it is pruned
    dense_at: str = "input"  # where the dense stream stands in the current layer: "input", "mid" or "output"

    def __call__(self, layer: nn.Module, index: int, n_layers: int, dense: dict[str, InputStats | None]) -> None:
        method = self.method
        if self.dense_stream is not None:
            self.dense_layer = copy.deepcopy(layer)  # one layer, not a second model
            self.dense_at = "input"
        blocks = layer_blocks(self.arch, index, layer, self.config.attention_unit)
        n_remove = method.allocator.allocate(
            index, n_layers, blocks["attn"].units(), blocks["mlp"].units(), _linear_params(self.arch, layer)
        )
        dtype = next(layer.parameters()).dtype
        if any(t.float32 for t in method.transforms):
            layer.float()
        evidence: dict[str, Evidence] = {}
        if self.calib is not None:
            for transform in method.transforms:
                with self.timer.section("pruning"):
                    evidence |= transform.begin(layer, self.arch, self.calib, index)
        deferred = [
            self._block(layer, block, n, dense[kind], evidence.get(kind))
            for (kind, block), n in zip(blocks.items(), n_remove, strict=True)
            if n > 0
        ]
        if self.calib is not None:
            for transform in method.transforms:
                with self.timer.section("pruning"):
                    transform.finish(layer, self.arch, self.calib, index)
        for item in deferred:
            if item is not None:
                self._compensate_late(item)
        layer.to(dtype)
        if self.dense_layer is not None:
            if index + 1 < n_layers and self.dense_at != "output":  # no MLP pass moved the dense stream on
                with self.timer.section("calibration"):
                    if self.dense_at == "mid":
                        advance_from_mid(self.arch, self.dense_layer, self.dense_stream)
                    else:
                        run_layer(self.dense_layer, self.dense_stream, update=True)
                self.report.layer_passes += 1
            self.dense_layer = None

    def _where(self, block: Block) -> str:
        return f"layer {block.layer_index} {self.arch.consumer_names()[block.kind]}"

    def _mean_bias(self) -> bool:
        return self.policy.bias_compensation and self.method.selector.mean_bias

    def _block(
        self,
        layer: nn.Module,
        block: Block,
        n_remove: int,
        selection: InputStats | None,
        extra: Evidence | None,
    ) -> _Deferred | None:
        policy, timer, method = self.policy, self.timer, self.method
        where, mean_bias = self._where(block), self._mean_bias()
        gram_stats, targets, target_inputs = None, {}, None
        # What the block or layer before this one freed goes back to the system, so that this
        # block's pass does not stack on the allocator's leftovers (the heap rarely fits a new pass
        # into them) and the heap does not grow layer by layer.
        return_freed_memory()
        if self.calib is not None:
            wants_selection = selection is None and (method.uses_activations or mean_bias)
            collected, gram_stats, taps = _block_taps(
                block.consumer, self.config, policy, wants_selection, method.selector.needs_gram
            )
            if policy.dense_targets and not policy.compensate:  # the method's own update, retargeted
                target_inputs = collected  # the selection statistics cover the targets' windows
                if target_inputs is None:  # the selection came from the dense model (a global plan)
                    consumer = block.consumer  # the pruned model's inputs are summed beside the targets
                    target_inputs = InputStats(consumer.in_features, gram=False, device=consumer.weight.device)
                    taps.append((target_inputs, self.config.target_nsamples))
            if policy.dense_targets:  # one pass beside the dense layer collects the taps too
                targets = self._targets(layer, block, taps)
            elif taps:
                with timer.section("calibration"):
                    run_layer(layer, self.calib, [(block.consumer, taps)], stop_at=block.consumer)
            self.report.layer_passes += 1
            for stats in {id(s): s for s in (collected, gram_stats, target_inputs) if s is not None}.values():
                stats.all_reduce()  # data-parallel runs: sum over processes
                stats.check_finite(where)
            if selection is None:
                selection = collected
            return_freed_memory()  # the pass's intermediates: the solves start from what is alive
        with timer.section("pruning"):
            gradient = extra.gradient if extra is not None else None
            decision: Decision = method.selector.select(block, Evidence(selection, gradient), n_remove)
            kept_columns = decision.kept_columns
        consumer = block.consumer
        late = policy.compensate and method.defer_compensation
        dense_weight = consumer.weight.data.clone() if late else None
        bias = None if consumer.bias is None else consumer.bias.data
        with timer.section("compensation" if policy.compensate and not late else "pruning"):
            if late:  # plain pruning now; compensation once the transforms are done
                update = policy.plain(consumer.weight.data, bias, kept_columns, selection, mean_bias, decision.refit)
            else:
                update = policy.update(
                    consumer.weight.data,
                    bias,
                    kept_columns,
                    selection,
                    gram_stats,
                    mean_bias,
                    where,
                    decision.refit,
                    previous_lambda(self.report.blocks, block.kind),
                    targets,
                    target_inputs,
                )
        with timer.section("pruning"):
            if block.kind == "attn":
                prune_attention(self.arch, layer, decision.units.kept_heads(decision.kept), update.weight, update.bias)
            else:
                prune_mlp(self.arch, layer, kept_columns, update.weight, update.bias)
        if policy.compensate and policy.ridge_lambda != "auto" and gram_stats.count < len(kept_columns):
            self.report.underdetermined += 1
        row = {
            "layer": block.layer_index,
            "block": block.kind,
            "units": decision.units.count,
            "kept": len(decision.kept),
        }
        self.report.blocks.append(row | update.notes)
        if late:
            return _Deferred(block, dense_weight, kept_columns, selection, gram_stats, targets, self.report.blocks[-1])
        return None

    def _targets(self, layer: nn.Module, block: Block, taps: list[tuple[InputStats, int]]) -> dict[str, TargetStats]:
        """Moments of the dense-model targets of a block's consumer, from the pruned and dense layers side by side.

        ``dense``: the dense consumer's output ``W0 h_d`` (bias excluded: it stays the bias
        the fit shifts); ``residual``: that plus the drift of the block's residual input.
        The same pass fills ``taps`` (the consumer's input statistics) and moves the dense
        stream on past the block.
        """
        names = self.policy.dense_targets
        consumer = block.consumer
        device = consumer.weight.device
        cross_device = statistics_device(self.config, device)
        # A retargeted mean bias (no compensation, no refit) needs the targets' sums only.
        cross = self.policy.compensate or self.method.selector.refits
        stats = {
            name: TargetStats(
                consumer.out_features, consumer.in_features, device, self.policy.folds, cross_device, cross
            )
            for name in names
        }

        blend = self.config.grail_target_blend

        def on_window(ids: Tensor, inputs: Tensor, dense_out: Tensor, drift: Tensor) -> None:
            values = {"dense": dense_out.to(device)}
            if "residual" in names:
                values["residual"] = values["dense"] + drift.to(device)
            if blend != 1.0:  # part of the way from the consumer's own output (pruned's target) to each target
                own = nn.functional.linear(inputs.to(device), consumer.weight).to(torch.float64)
                values = {name: torch.lerp(own, values[name], blend) for name in names}
            [(fold, _)] = fold_rows(ids, self.config.target_nsamples, self.policy.folds)  # one window, one fold
            for name in names:
                stats[name].update(values[name], inputs, fold)

        with self.timer.section("calibration"):
            run_paired(
                self.arch,
                block.kind,
                layer,
                self.dense_layer,
                self.calib,
                self.dense_stream,
                self.config.target_nsamples,
                on_window,
                taps,
                dense_at_mid=self.dense_at == "mid",
            )
        self.dense_at = "mid" if block.kind == "attn" else "output"
        self.report.layer_passes += 1  # the dense copy's pass (the pruned layer's is counted by the caller)
        for s in stats.values():
            s.all_reduce()
            s.check_finite(self._where(block))
        return stats

    def _compensate_late(self, item: _Deferred) -> None:
        """Compensate a consumer as the transforms left it: its kept columns now, its removed ones as they were."""
        consumer = item.block.consumer
        current = item.dense_weight.clone()
        current[:, item.kept_columns.to(current.device)] = consumer.weight.data
        with self.timer.section("compensation"):
            update = self.policy.update(
                current,
                None if consumer.bias is None else consumer.bias.data,
                item.kept_columns,
                item.selection,
                item.gram_stats,
                self._mean_bias(),
                self._where(item.block),
                start_lambda=previous_lambda(self.report.blocks, item.block.kind),
                targets=item.targets,
            )
        set_consumer(consumer, update.weight, update.bias)
        item.row.update(update.notes)


def check_target(config: PruneConfig, method: Method) -> None:
    """A dense-model target without compensation retargets the method's own update: the method must make one."""
    policy = CompensationPolicy.from_config(config)
    if policy.dense_targets and not policy.compensate and not policy.makes_own_update(method):
        without = " with --no_bias_compensation" if method.selector.mean_bias else ""
        raise ConfigError(
            f"--grail_target {config.grail_target} without --compensate retargets the method's own update of the "
            f"consumers (FLAP's bias compensation, SlimGPT's refit), and {method.name} makes none{without}: "
            "add --compensate."
        )
    if config.grail_target_blend != 1.0 and method.defer_compensation:
        # The blend starts from the consumer's output as the layer pass sees it, before the transforms change
        # its kept columns; a fit made after them would be pulled back towards the weights they replaced.
        raise ConfigError(
            f"--grail_target_blend blends from the consumer's weights before {method.name}'s regional "
            "optimisation, and its compensation runs after it: add --compensate_first, or leave the blend at 1."
        )


def _block_taps(
    consumer: nn.Linear,
    config: PruneConfig,
    policy: CompensationPolicy,
    wants_selection: bool,
    selection_gram: bool,
) -> tuple[InputStats | None, InputStats | None, list[tuple[InputStats, int]]]:
    """The statistics of a consumer's inputs a block needs, and the taps that fill them in one pass.

    Returns (selection statistics over ``nsamples`` windows, with a Gram matrix when
    ``selection_gram``, or None unless ``wants_selection``; Gram statistics over
    ``comp_nsamples`` windows, or None without compensation; the ``(stats, windows)`` taps).
    When both cover the same windows they are one object.
    """
    device, dim = consumer.weight.device, consumer.in_features
    wants_gram = policy.compensate
    grams = statistics_device(config, device)
    if wants_gram and (not wants_selection or config.gram_nsamples == config.nsamples):
        both = InputStats(dim, gram=True, device=device, n_folds=policy.folds, gram_device=grams)
        return (both if wants_selection else None), both, [(both, config.gram_nsamples)]
    selection = InputStats(dim, gram=selection_gram, device=device) if wants_selection else None
    gram_stats = (
        InputStats(dim, gram=True, device=device, n_folds=policy.folds, gram_device=grams) if wants_gram else None
    )
    taps = [(selection, config.nsamples)] if selection is not None else []
    if gram_stats is not None:
        taps.append((gram_stats, config.gram_nsamples))
    return selection, gram_stats, taps


def definite_stats_device(
    config: PruneConfig, model: nn.Module, windows: Tensor | None, streaming: bool
) -> PruneConfig:
    """``config`` with ``--stats_device auto`` made ``device`` or ``host`` for this run from its plan
    (:func:`grail.plan.choose_stats_device`, against the memory the GPU has now)."""
    if config.stats_device != "auto":
        return config
    weight = model.get_input_embeddings().weight
    chosen = "device"
    if weight.device.type == "cuda" and config.compensate and windows is not None:
        from grail.models.loading import model_bytes
        from grail.plan import ModelShape, Setting, choose_stats_device, device_memory_of_run

        setting = Setting(
            prune=config,
            seqlen=windows.shape[1],
            dtype=str(weight.dtype).removeprefix("torch."),
            device="cuda",
            mode="streaming" if streaming else "memory",
            spill=config.offload_activations is not None,
            processes=distributed.world_size(),
            device_memory=device_memory_of_run(weight.device, model_bytes(model, weight.device)),
        )
        chosen, why = choose_stats_device(ModelShape.from_config(model.config), setting)
        if "host" in distributed.all_gather_objects(chosen) and chosen != "host":  # every rank alike
            chosen, why = "host", "another process needs it"
        log.info("--stats_device auto: the statistics accumulate on the %s (%s)", chosen, why)
    return replace(config, stats_device=chosen)


def statistics_device(config: PruneConfig, compute: torch.device) -> torch.device:
    """Where a consumer's Gram matrices and cross moments accumulate (``--stats_device``)."""
    return torch.device("cpu") if config.stats_device == "host" else compute
