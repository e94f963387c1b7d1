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

import torch
from torch import Tensor

from grail.errors import GrailError
from grail.methods.base import BlockContext, Decision, Method, uniform_allocation
from grail.stats import InputStats
from grail.units import BlockUnits, top_units

METRICS = ("IFV", "WIFV", "WIFN")
STRUCTURES = ("UL-UM", "UL-MM", "AL-MM", "AL-AM")


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


class FLAP(Method):
    name = "flap"
    supports_bias_compensation = True

    def __init__(self, config):
        super().__init__(config)
        if config.metrics not in METRICS:
            raise GrailError(f"--metrics must be one of {', '.join(METRICS)}, got {config.metrics!r}.")
        if config.structure not in STRUCTURES:
            raise GrailError(f"--structure must be one of {', '.join(STRUCTURES)}, got {config.structure!r}.")
        if config.remove_heads < 0:
            raise GrailError(f"--remove_heads must be >= 0, got {config.remove_heads}.")
        self.metric = config.metrics
        self.structure = config.structure
        self.global_plan = config.structure.startswith("AL")
        self._plan: dict[tuple[int, str], Decision] = {}
        self._dense_scores: dict[tuple[int, str], Tensor] = {}

    def _scores(self, ctx: BlockContext) -> Tensor:
        key = (ctx.layer_index, ctx.kind)
        if key in self._dense_scores:  # scored during the dense pass (the layer may be released since)
            return self._dense_scores[key]
        return flap_column_scores(self.metric, ctx.consumer.weight, ctx.stats, ctx.kind).cpu()

    def observe(self, ctx: BlockContext) -> None:
        self._dense_scores[(ctx.layer_index, ctx.kind)] = self._scores(ctx)

    def allocate(
        self, layer_index: int, n_layers: int, attention: BlockUnits, mlp: BlockUnits, layer_params: int
    ) -> tuple[int, int]:
        if self.global_plan:
            return tuple(
                self._plan[(layer_index, kind)].units.count - len(self._plan[(layer_index, kind)].kept)
                for kind in ("attn", "mlp")
            )
        ratio = self.config.pruning_ratio
        if self.structure == "UL-MM":
            per_layer = self.config.remove_heads // n_layers
            return uniform_allocation(ratio, attention, mlp, layer_params, n_attention=per_layer)
        return uniform_allocation(ratio, attention, mlp, layer_params)

    def decide(self, ctx: BlockContext) -> Decision:
        if self.global_plan:
            return self._plan[(ctx.layer_index, ctx.kind)]
        scores = self._scores(ctx)
        units = ctx.units(scores)
        return Decision(units, top_units(units.unit_scores(scores), units.count - ctx.n_remove))

    def plan(self, blocks: list[dict[str, BlockContext]], layer_params: list[int]) -> None:
        """Rank the units of all layers by standardised scores and cut at the parameter budget."""
        target = self.config.pruning_ratio * sum(layer_params)
        # Candidates for removal: (score, cost, kind, layer, unit); each block's best unit stays.
        pools: dict[str, list[tuple[float, int, str, int, int]]] = {"attn": [], "mlp": []}
        units_of: dict[tuple[int, str], BlockUnits] = {}
        for layer in blocks:
            for kind, ctx in layer.items():
                z = standardize(self._scores(ctx))
                units = ctx.units(z)
                unit_scores = units.unit_scores(z) / units.columns.shape[1]  # mean of standardised columns
                best = int(unit_scores.argmax())
                units_of[(ctx.layer_index, kind)] = units
                pools[kind] += [
                    (score, units.cost, kind, ctx.layer_index, u)
                    for u, score in enumerate(unit_scores.tolist())
                    if u != best
                ]
        if self.structure == "AL-AM":
            removed = _lowest_within_budget(pools["attn"] + pools["mlp"], target)
        else:  # AL-MM: a fixed number of attention units, MLP channels for the rest of the budget
            if self.config.remove_heads > len(pools["attn"]):
                raise GrailError(
                    f"--remove_heads {self.config.remove_heads} exceeds the {len(pools['attn'])} attention "
                    "units that can go (each layer keeps one)."
                )
            removed = sorted(pools["attn"])[: self.config.remove_heads]
            attn_cost = sum(cost for _, cost, *_ in removed)
            removed += _lowest_within_budget(pools["mlp"], max(target - attn_cost, 0.0))
        gone: dict[tuple[int, str], set[int]] = {key: set() for key in units_of}
        for _, _, kind, layer_index, unit in removed:
            gone[(layer_index, kind)].add(unit)
        for key, units in units_of.items():
            kept = torch.tensor([u for u in range(units.count) if u not in gone[key]], dtype=torch.long)
            self._plan[key] = Decision(units, kept)


def _lowest_within_budget(pool: list[tuple], target: float) -> list[tuple]:
    """The lowest-scored candidates whose total cost (second field) is closest to ``target``."""
    ordered = sorted(pool)
    costs = torch.tensor([float(c[1]) for c in ordered], dtype=torch.float64)
    return ordered[: global_cut(costs, target)]
