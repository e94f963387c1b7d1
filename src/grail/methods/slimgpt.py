"""SlimGPT: structured Optimal Brain Surgeon for LLMs (Ling et al., NeurIPS 2024, arXiv 2412.18110).

For a consumer with weight ``W`` (O x H) and the damped Hessian of its inputs
``H = G + 0.01 mean(diag G) I`` (``G = sum_n h_n h_n^T``):

* removing a set ``g`` of columns costs ``tr(W_g ([H^-1]_gg)^-1 W_g^T)`` and is followed by the
  update ``W <- W - W_g ([H^-1]_gg)^-1 [H^-1]_g,:`` (the removed columns become zero), and
  ``H^-1`` of the remaining columns is ``H^-1 - [H^-1]_:,g ([H^-1]_gg)^-1 [H^-1]_g,:``;
* attention heads ("grouped Cholesky"): a head's score is ``sum_c ||W[:, c]||^2 / L_cc^2`` with
  ``L`` the Cholesky factor of the head's diagonal block of ``H^-1``; the lowest head goes,
  the weights are updated, and the rest are scored again, one head per round;
* MLP channels ("dynamic group size"): score ``||W[:, c]||^2 / [H^-1]_cc``; the lowest channels
  go in groups that start large and shrink (``b0 = (T - 512) // 2``, then ``b <- (b - 512) // 2``,
  each group clamped to [64, 1024]), re-scoring between groups;
* the pruning ratio grows with depth, ``r_i = r_0 + (r_last - r_0) log(i + 1) / log(n)``
  with ``r_0 = r_last / 4``, scaled so that the layers' mean is the target ratio.

Removing columns one at a time with these updates ends exactly where a least-squares refit
of the kept columns with ``H`` ends (tested), so the final weights are that refit; with
bias compensation the refit has an intercept that becomes the consumer's bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from grail.compensate import Moments, solve_spd
from grail.config import PruneConfig
from grail.methods.base import (
    Allocator,
    Block,
    Decision,
    Evidence,
    Method,
    MethodSpec,
    Selector,
    uniform_allocation,
)
from grail.models.arch import HeadLayout
from grail.units import BlockUnits, head_units

DAMPING = 0.01  # share of the mean diagonal added to the Hessian


def damped_hessian(gram: Tensor, damping: float = DAMPING) -> Tensor:
    """``G + damping * mean(diag G) I``; features that never fired get a unit diagonal."""
    h = gram.to(torch.float64).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(damping * h.diagonal().mean())
    return h


def obs_remove(weight: Tensor, hinv: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Remove columns ``group`` (positions in the current column set) with the OBS update.

    Returns the remaining columns' updated weight and the inverse Hessian of the remaining
    columns (a Schur-complement downdate, no new inversion).
    """
    keep = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    keep[group] = False
    coef, _ = solve_spd(hinv[group][:, group], hinv[group])  # ([H^-1]_gg)^-1 [H^-1]_g,:
    new_weight = weight - weight[:, group] @ coef
    new_hinv = hinv - hinv[:, group] @ coef
    return new_weight[:, keep], new_hinv[keep][:, keep]


def column_scores(weight: Tensor, hinv: Tensor) -> Tensor:
    """OBS cost of removing each column alone: ``||W[:, c]||^2 / [H^-1]_cc``."""
    return weight.square().sum(dim=0) / hinv.diagonal()


def block_scores(weight: Tensor, hinv: Tensor, blocks: Tensor) -> Tensor:
    """SlimGPT's grouped-Cholesky score of each block of columns (``blocks``: [n, width] positions)."""
    sub = hinv[blocks.unsqueeze(-1), blocks.unsqueeze(-2)]  # [n, width, width]
    pivots = torch.linalg.cholesky(sub).diagonal(dim1=-2, dim2=-1).square()
    return (weight.square().sum(dim=0)[blocks] / pivots).sum(dim=1)


def mlp_group_sizes(total: int) -> list[int]:
    """SlimGPT's dynamic group sizes for removing ``total`` channels."""
    sizes, b = [], (total - 512) // 2
    while sum(sizes) < total:
        sizes.append(min(total - sum(sizes), max(b, 64), 1024))
        b = (b - 512) // 2
    return sizes


def log_increasing_ratios(target: float, n_layers: int) -> list[float]:
    """Per-layer ratios ``r_0 + (r_last - r_0) log(i + 1) / log(n)``, ``r_0 = r_last / 4``, mean ``target``."""
    if n_layers == 1:
        return [target]
    shape = [math.log(i + 1) / math.log(n_layers) for i in range(n_layers)]
    r_last = target / (0.25 + 0.75 * sum(shape) / n_layers)
    return [min(r_last / 4 + 0.75 * r_last * s, 0.99) for s in shape]


def _positions(columns: Tensor, alive: list[int]) -> Tensor:
    """Positions of original ``columns`` inside the current (alive) column list."""
    where = {c: i for i, c in enumerate(alive)}
    return torch.tensor([[where[int(c)] for c in row] for row in columns], dtype=torch.long)


def prune_heads(weight: Tensor, hinv: Tensor, units: BlockUnits, n_remove: int) -> list[int]:
    """Remove ``n_remove`` attention units one per round; returns the removed unit indices in order."""
    alive = list(range(weight.shape[1]))
    remaining = list(range(units.count))
    removed = []
    for _ in range(n_remove):
        blocks = _positions(units.columns[remaining], alive)
        scores = block_scores(weight, hinv, blocks.to(weight.device))
        unit = remaining[int(scores.argmin())]
        group = _positions(units.columns[unit : unit + 1], alive)[0].to(weight.device)
        weight, hinv = obs_remove(weight, hinv, group)
        gone = set(units.columns[unit].tolist())
        alive = [c for c in alive if c not in gone]
        remaining.remove(unit)
        removed.append(unit)
    return removed


def prune_query_heads(weight: Tensor, hinv: Tensor, layout: HeadLayout, n_rounds: int) -> list[list[int]]:
    """Query-bundle mode: each round removes the lowest-scored remaining head of every key/value group."""
    alive_heads = layout.groups().tolist()
    alive = list(range(weight.shape[1]))
    rounds = []
    for _ in range(n_rounds):
        heads = [h for group in alive_heads for h in group]
        columns = layout.columns(torch.tensor(heads).unsqueeze(1))
        scores = dict(
            zip(heads, block_scores(weight, hinv, _positions(columns, alive).to(weight.device)).tolist(), strict=True)
        )
        bundle = [min(group, key=scores.get) for group in alive_heads]
        cols = layout.columns(torch.tensor([bundle]))
        weight, hinv = obs_remove(weight, hinv, _positions(cols, alive)[0].to(weight.device))
        gone = set(cols[0].tolist())
        alive = [c for c in alive if c not in gone]
        for group, head in zip(alive_heads, bundle, strict=True):
            group.remove(head)
        rounds.append(bundle)
    return rounds


def prune_channels(weight: Tensor, hinv: Tensor, n_remove: int) -> list[int]:
    """Remove ``n_remove`` channels in SlimGPT's shrinking groups; returns the removed channels."""
    alive = list(range(weight.shape[1]))
    removed = []
    for size in mlp_group_sizes(n_remove) if n_remove else []:
        order = torch.argsort(column_scores(weight, hinv), stable=True)[:size]
        weight, hinv = obs_remove(weight, hinv, order.sort().values)
        gone = {alive[int(i)] for i in order}
        removed += sorted(gone)
        alive = [c for c in alive if c not in gone]
    return removed


class SlimGPTSelector(Selector):
    """Structured OBS on the damped Hessian; the method's consumer is the refit its updates end at."""

    needs_gram = True
    mean_bias = True  # the refit gets an intercept
    refits = True

    def select(self, block: Block, evidence: Evidence, n_remove: int) -> Decision:
        stats = evidence.stats
        weight = block.consumer.weight.to(torch.float64)
        hessian = damped_hessian(stats.gram.to(weight.device))
        hinv, _ = solve_spd(hessian, torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device))
        if block.kind == "mlp":
            units = block.units()
            removed = prune_channels(weight, hinv, n_remove)
        elif block.attention_unit == "query" and block.shape.group_size > 1:
            rounds = prune_query_heads(weight, hinv, block.shape.heads, n_remove)
            units = _bundles(block, rounds)
            removed = list(range(len(rounds)))
        else:
            units = block.units()
            removed = prune_heads(weight, hinv, units, n_remove)
        gone = set(removed)
        kept = torch.tensor([u for u in range(units.count) if u not in gone], dtype=torch.long)
        # The updates above compose to the least-squares refit of the kept columns with H.
        return Decision(units, kept, refit=Moments(hessian, stats.sum.to(hessian), stats.count))


@dataclass
class LogIncreasingAllocation(Allocator):
    """SlimGPT's schedule: layer ``i`` loses :func:`log_increasing_ratios` ``[i]`` of its parameters."""

    ratio: float

    def allocate(
        self, layer_index: int, n_layers: int, attention: BlockUnits, mlp: BlockUnits, layer_params: int
    ) -> tuple[int, int]:
        return uniform_allocation(
            log_increasing_ratios(self.ratio, n_layers)[layer_index], attention, mlp, layer_params
        )


def _bundles(block: Block, rounds: list[list[int]]) -> BlockUnits:
    """Query bundles in removal order (removed rounds first, then the kept heads of each group)."""
    layout = block.shape.heads
    removed = {h for bundle in rounds for h in bundle}
    kept = [[h for h in group if h not in removed] for group in layout.groups().tolist()]
    heads = [*rounds, *([group[j] for group in kept] for j in range(layout.group_size - len(rounds)))]
    cost = block.units(torch.zeros(layout.num_heads * layout.head_dim)).cost
    return head_units(layout, torch.tensor(heads, dtype=torch.long), cost)


def build(config: PruneConfig) -> Method:
    return Method("slimgpt", SlimGPTSelector(), LogIncreasingAllocation(config.pruning_ratio))


SPEC = MethodSpec("slimgpt", build)
