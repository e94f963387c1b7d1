"""A pruning method is a composition of three parts, each testable without a model:

* a **selector** (pure): a block's statistics in, the units to keep out;
* an **allocator**: how many units each block loses (uniform per layer, growing with depth,
  or planned over the whole model from one scoring pass of the dense model);
* optional **layer transforms**: work on a whole decoder layer before its blocks are
  pruned and after (Wanda++'s regional gradients and regional optimisation).

The engine (:mod:`grail.engine`) drives the parts in the same way for every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from grail.compensate import Moments
from grail.config import MethodOptions, PruneConfig
from grail.models.arch import LayerShape
from grail.stats import InputStats
from grail.units import BlockUnits, attention_units, mlp_units, top_units


@dataclass(frozen=True)
class Block:
    """One prunable block (attention or MLP) of one decoder layer."""

    layer_index: int
    kind: str  # "attn" or "mlp"
    shape: LayerShape
    consumer: nn.Linear  # o_proj or down_proj: its inputs are the block's units
    attention_unit: str  # "group" or "query"
    producer_bias: bool  # q/k/v (or gate/up) carry biases, which removal also saves

    def units(self, column_scores: Tensor | None = None) -> BlockUnits:
        """The block's units; query-head bundles are formed from the column scores."""
        if self.kind == "mlp":
            return mlp_units(self.shape, self.producer_bias)
        head_scores = None
        if column_scores is not None:
            head_scores = column_scores.view(self.shape.num_heads, self.shape.head_dim).sum(dim=1)
        elif self.attention_unit == "query":
            head_scores = torch.zeros(self.shape.num_heads)
        return attention_units(self.shape, self.attention_unit, head_scores, self.producer_bias)


@dataclass(frozen=True)
class Evidence:
    """What a selector may read about a block besides its weights."""

    stats: InputStats | None = None  # statistics of the consumer's inputs (selection windows)
    gradient: Tensor | None = None  # regional gradient of the consumer's weight (Wanda++)


@dataclass(frozen=True)
class Decision:
    """The kept units of a block; ``refit``: the method's own consumer is the least-squares refit on these moments."""

    units: BlockUnits
    kept: Tensor
    refit: Moments | None = None

    @property
    def kept_columns(self) -> Tensor:
        return self.units.kept_columns(self.kept)


class Selector:
    """Decides which units of a block stay; pure: weights and statistics in, decision out."""

    uses_activations: bool = True  # needs calibration statistics
    needs_gram: bool = False  # its statistics must include the Gram matrix
    mean_bias: bool = False  # plain pruning adds the removed units' mean contribution as a bias
    refits: bool = False  # its decisions carry a refit of the consumer (``Decision.refit``)

    def unit_scores(self, block: Block, evidence: Evidence) -> tuple[BlockUnits, Tensor]:
        """The block's units and a score for each (higher: more important)."""
        raise NotImplementedError

    def select(self, block: Block, evidence: Evidence, n_remove: int) -> Decision:
        """Keep the best-scored units."""
        units, scores = self.unit_scores(block, evidence)
        return Decision(units, top_units(scores, units.count - n_remove))


class ColumnScoreSelector(Selector):
    """Scores each consumer input column; a unit's score is the sum over its columns."""

    def column_scores(self, block: Block, evidence: Evidence) -> Tensor:
        raise NotImplementedError

    def unit_scores(self, block: Block, evidence: Evidence) -> tuple[BlockUnits, Tensor]:
        scores = self.column_scores(block, evidence).cpu()
        units = block.units(scores)
        return units, units.unit_scores(scores)


class Allocator:
    """How many units each block of a layer loses."""

    is_global: bool = False  # plans every layer at once from the dense model's scores

    def allocate(
        self, layer_index: int, n_layers: int, attention: BlockUnits, mlp: BlockUnits, layer_params: int
    ) -> tuple[int, int]:
        """Units to remove from the layer's (attention, MLP) blocks."""
        raise NotImplementedError

    def plan(self, scored: list[dict[str, tuple[BlockUnits, Tensor]]], layer_params: list[int]) -> None:
        """Global allocators: every layer's blocks with their units and unit scores, before any pruning."""

    def check(self, attention: list[BlockUnits]) -> None:
        """Refuse, before any calibration, a request the model's attention units (per layer) cannot meet."""


@dataclass
class UniformAllocation(Allocator):
    """Every layer loses ``ratio`` of its parameters (``attention_per_layer``: a fixed number of attention units)."""

    ratio: float
    attention_per_layer: int | None = None

    def allocate(
        self, layer_index: int, n_layers: int, attention: BlockUnits, mlp: BlockUnits, layer_params: int
    ) -> tuple[int, int]:
        return uniform_allocation(self.ratio, attention, mlp, layer_params, self.attention_per_layer)


def aligned_removal(count: int, n_remove: int, multiple: int) -> int:
    """Units to remove so that the kept ones are the multiple of ``multiple`` nearest to ``count - n_remove``.

    At least one multiple is kept, and never more units than there are (a block narrower than
    ``multiple`` is left whole).
    """
    kept = count - n_remove
    aligned = max(multiple, multiple * math.floor(kept / multiple + 0.5))
    return count - min(aligned, count)


@dataclass
class AlignedAllocation(Allocator):
    """Another allocator's counts, with each layer's kept MLP channels rounded to a multiple of ``multiple``.

    Each block moves by at most half a multiple, so the model stays within one aligned unit per
    block of the allocator's parameter budget.
    """

    inner: Allocator
    multiple: int

    @property
    def is_global(self) -> bool:
        return self.inner.is_global

    def plan(self, scored: list[dict[str, tuple[BlockUnits, Tensor]]], layer_params: list[int]) -> None:
        self.inner.plan(scored, layer_params)

    def check(self, attention: list[BlockUnits]) -> None:
        self.inner.check(attention)

    def allocate(
        self, layer_index: int, n_layers: int, attention: BlockUnits, mlp: BlockUnits, layer_params: int
    ) -> tuple[int, int]:
        n_attn, n_mlp = self.inner.allocate(layer_index, n_layers, attention, mlp, layer_params)
        return n_attn, aligned_removal(mlp.count, n_mlp, self.multiple)


class LayerTransform:
    """Work on a whole decoder layer around the pruning of its blocks."""

    float32: bool = False  # run the layer in float32 while the transform works (restored afterwards)

    def begin(self, layer: nn.Module, arch, calib, index: int) -> dict[str, Evidence]:
        """With the dense layer and its calibration inputs; may return evidence for each block kind."""
        return {}

    def finish(self, layer: nn.Module, arch, calib, index: int) -> None:
        """After both blocks are pruned, before deferred compensation and the outputs pass."""


@dataclass
class Method:
    """A pruning method: selector, allocator and layer transforms."""

    name: str
    selector: Selector
    allocator: Allocator
    transforms: tuple[LayerTransform, ...] = ()
    # Compensate after the transforms' finish (on the weights as they left them), not at once.
    defer_compensation: bool = False

    @property
    def uses_activations(self) -> bool:
        return self.selector.uses_activations or bool(self.transforms)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: how to build it from a configuration, and its own options."""

    name: str
    build: Callable[[PruneConfig], Method]
    options: type[MethodOptions] | None = None


def uniform_allocation(
    ratio: float,
    attention: BlockUnits,
    mlp: BlockUnits,
    layer_params: int,
    n_attention: int | None = None,
) -> tuple[int, int]:
    """Units to remove from (attention, MLP) so the layer loses ``ratio`` of its parameters.

    Attention units are coarse (a whole head or group), so attention removes
    ``round(ratio * units)`` of them (or ``n_attention``) and the fine-grained MLP takes
    up the rest of the layer's parameter budget; each block keeps at least one unit.
    """
    n_attn = round(ratio * attention.count) if n_attention is None else n_attention
    n_attn = min(n_attn, attention.count - 1)
    remaining = ratio * layer_params - n_attn * attention.cost
    n_mlp = min(max(round(remaining / mlp.cost), 0), mlp.count - 1)
    return n_attn, n_mlp
