"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024).

Importance of consumer input column ``j`` (metric ``--metrics``):

* ``IFV``:  the sample variance of ``h_j`` over calibration tokens (its *fluctuation*);
* ``WIFV``: ``IFV_j * ||W[:, j]||^2`` (default);
* ``WIFN``: ``mean_i |W_ij| * ||h_j||_2``.

As in the original, the attention metric is squared before it is aggregated.

Allocation (``--structure``):

* ``UL-UM``: every layer loses the ratio (uniform across modules); unit score = sum of its columns' metrics;
* ``UL-MM``: every layer loses ``--remove_heads // layers`` attention units, and MLP channels make up
  the layer's parameter budget;
* ``AL-MM``: ``--remove_heads`` attention units in the whole model, chosen globally, and MLP channels
  chosen globally to reach the model's parameter budget;
* ``AL-AM`` (default): attention units and MLP channels of all layers ranked together and cut where
  the removed *parameters* reach the ratio.

The adaptive structures standardise each layer's and module's column metrics
(``(x - mean) / std``) and score a unit by the mean of its standardised columns. Every unit
costs what removing it really saves, computed from the model's shapes (the original's
constant 512/3 channels per head holds only for multi-head attention with ``head_dim``
128). Bias compensation adds ``W[:, removed] mean(h[removed])`` to the consumer's bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grail.config import MethodOptions, PruneConfig, option
from grail.errors import GrailError
from grail.methods.base import (
    Allocator,
    Block,
    BlockUnits,
    ColumnScoreSelector,
    Evidence,
    Method,
    MethodSpec,
    UniformAllocation,
)
from grail.stats import InputStats

METRICS = ("IFV", "WIFV", "WIFN")
STRUCTURES = ("UL-UM", "UL-MM", "AL-MM", "AL-AM")


@dataclass(frozen=True)
class FLAPOptions(MethodOptions):
    method = "flap"

    metrics: str = option("WIFV", "FLAP importance metric", choices=METRICS)
    structure: str = option("AL-AM", "FLAP allocation structure", choices=STRUCTURES)
    remove_heads: int = option(8, "attention units to remove in total (FLAP UL-MM / AL-MM)", minimum=0)


def flap_column_scores(metric: str, weight: Tensor, stats: InputStats, kind: str) -> Tensor:
    """FLAP's importance of each consumer input column (squared for attention, as in FLAP)."""
    w = weight.to(torch.float64)
    if metric == "IFV":
        scores = stats.variance.to(w.device)
    elif metric == "WIFV":
        scores = stats.variance.to(w.device) * w.square().sum(dim=0)
    elif metric == "WIFN":
        scores = w.abs().mean(dim=0) * stats.norm.to(w.device)
    else:
        raise ValueError(f"unknown FLAP metric {metric!r}; choose one of {', '.join(METRICS)}")
    return scores.square() if kind == "attn" else scores


def standardize(x: Tensor) -> Tensor:
    """``(x - mean) / std`` with the unbiased standard deviation (constant input -> zeros)."""
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


def global_cut(costs: Tensor, target: float) -> int:
    """How many of the (ascending-score) units to remove so the removed cost is closest to ``target``."""
    removed = torch.cat([costs.new_zeros(1), costs.cumsum(0)])
    return int((removed - target).abs().argmin())


@dataclass
class FLAPSelector(ColumnScoreSelector):
    """FLAP's metric; ``standardized``: a unit scores the mean of its standardised columns (adaptive structures)."""

    metric: str = "WIFV"
    standardized: bool = False
    mean_bias = True

    def column_scores(self, block: Block, evidence: Evidence) -> Tensor:
        return flap_column_scores(self.metric, block.consumer.weight, evidence.stats, block.kind)

    def unit_scores(self, block: Block, evidence: Evidence) -> tuple[BlockUnits, Tensor]:
        if not self.standardized:
            return super().unit_scores(block, evidence)
        z = standardize(self.column_scores(block, evidence).cpu())
        units = block.units(z)
        return units, units.unit_scores(z) / units.columns.shape[1]


@dataclass
class GlobalAllocation(Allocator):
    """FLAP's adaptive structures: the units of all layers ranked together by their scores.

    ``AL-AM``: cut where the removed parameters reach ``ratio`` of the decoder's; ``AL-MM``:
    the ``remove_heads`` lowest attention units, and MLP channels for the rest of the budget.
    Each block keeps its best unit.
    """

    ratio: float
    attention_budget: int | None = None  # AL-MM: attention units to remove in the whole model
    is_global = True

    def __post_init__(self) -> None:
        self._counts: dict[tuple[int, str], int] = {}

    def plan(self, scored: list[dict[str, tuple[BlockUnits, Tensor]]], layer_params: list[int]) -> None:
        target = self.ratio * sum(layer_params)
        # Candidates: (score, -unit, cost, kind, layer); ties go first to the higher unit index,
        # as in top_units, so the per-block selection picks exactly the planned units.
        pools: dict[str, list[tuple]] = {"attn": [], "mlp": []}
        for layer_index, blocks in enumerate(scored):
            for kind, (units, scores) in blocks.items():
                best = int(scores.argmax())
                pools[kind] += [
                    (score, -u, units.cost, kind, layer_index) for u, score in enumerate(scores.tolist()) if u != best
                ]
        if self.attention_budget is None:
            removed = _lowest_within_budget(pools["attn"] + pools["mlp"], target)
        else:
            removed = sorted(pools["attn"])[: self.attention_budget]
            attn_cost = sum(cost for _, _, cost, *_ in removed)
            removed += _lowest_within_budget(pools["mlp"], max(target - attn_cost, 0.0))
        self._counts = {(layer, kind): 0 for layer, blocks in enumerate(scored) for kind in blocks}
        for *_, kind, layer_index in removed:
            self._counts[(layer_index, kind)] += 1

    def check(self, attention: list[BlockUnits]) -> None:
        removable = sum(units.count - 1 for units in attention)
        if self.attention_budget is not None and self.attention_budget > removable:
            raise GrailError(
                f"--remove_heads {self.attention_budget} exceeds the {removable} attention units that can go "
                f"(each of the {len(attention)} layers keeps one); use --remove_heads {removable} or less."
            )

    def allocate(
        self, layer_index: int, n_layers: int, attention: BlockUnits, mlp: BlockUnits, layer_params: int
    ) -> tuple[int, int]:
        return self._counts[(layer_index, "attn")], self._counts[(layer_index, "mlp")]


def _lowest_within_budget(pool: list[tuple], target: float) -> list[tuple]:
    """The lowest-scored candidates whose total cost (third field) is closest to ``target``."""
    ordered = sorted(pool)
    costs = torch.tensor([float(c[2]) for c in ordered], dtype=torch.float64)
    return ordered[: global_cut(costs, target)]


def build(config: PruneConfig) -> Method:
    opts = config.options_for(FLAPOptions)
    adaptive = opts.structure.startswith("AL")
    selector = FLAPSelector(opts.metrics, standardized=adaptive)
    if opts.structure == "AL-AM":
        allocator: Allocator = GlobalAllocation(config.pruning_ratio)
    elif opts.structure == "AL-MM":
        allocator = GlobalAllocation(config.pruning_ratio, attention_budget=opts.remove_heads)
    elif opts.structure == "UL-MM":
        # Every layer loses --remove_heads // layers attention units; known once the layers are counted.
        allocator = _PerLayerHeads(config.pruning_ratio, opts.remove_heads)
    else:
        allocator = UniformAllocation(config.pruning_ratio)
    return Method("flap", selector, allocator)


@dataclass
class _PerLayerHeads(Allocator):
    """UL-MM: ``remove_heads // layers`` attention units per layer, MLP channels for the rest of the budget."""

    ratio: float
    remove_heads: int

    def check(self, attention: list[BlockUnits]) -> None:
        per_layer, fewest = self.remove_heads // len(attention), min(units.count for units in attention)
        if per_layer > fewest - 1:
            raise GrailError(
                f"--remove_heads {self.remove_heads} asks {per_layer} attention units of each of the "
                f"{len(attention)} layers, but a layer has {fewest} and keeps one; use --remove_heads "
                f"{(fewest - 1) * len(attention)} or less."
            )

    def allocate(
        self, layer_index: int, n_layers: int, attention: BlockUnits, mlp: BlockUnits, layer_params: int
    ) -> tuple[int, int]:
        per_layer = UniformAllocation(self.ratio, self.remove_heads // n_layers)
        return per_layer.allocate(layer_index, n_layers, attention, mlp, layer_params)


SPEC = MethodSpec("flap", build, FLAPOptions)
