"""What a pruning method decides for one block, and the allocation shared by uniform methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from grail.config import PruneConfig
from grail.models.arch import LayerShape
from grail.stats import InputStats
from grail.units import BlockUnits, attention_units, mlp_units, top_units


@dataclass
class BlockContext:
    """Everything a method may look at to prune one block of one layer."""

    layer_index: int
    kind: str  # "attn" or "mlp"
    shape: LayerShape
    consumer: nn.Linear
    stats: InputStats | None  # statistics of the consumer's inputs (selection samples)
    n_remove: int  # units to remove under the layer's allocation
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


@dataclass
class Decision:
    """Kept units of a block, and optionally the method's own new consumer (weight O x K, bias shift)."""

    units: BlockUnits
    kept: Tensor
    weight: Tensor | None = None
    bias_shift: Tensor | None = None


class Method:
    """A structured pruning method (a *selector*): decides which units of a block stay.

    The engine asks, for each layer in order, how many units each block loses
    (:meth:`allocate`) and then which ones (:meth:`decide`). Methods that allocate
    across layers set ``global_plan``: the engine then hands :meth:`plan` every block
    with statistics from one pass over the dense model before any layer is pruned.
    """

    name: str = ""
    uses_activations: bool = True  # needs calibration statistics to select units
    needs_gram: bool = False  # its selection statistics must include the Gram matrix
    supports_bias_compensation: bool = False  # FLAP-style mean bias on the consumer
    global_plan: bool = False
    float32_layers: bool = False  # process each layer in float32 (restored afterwards)
    defer_compensation: bool = False  # compensate only after finish_layer

    def __init__(self, config: PruneConfig):
        self.config = config

    def allocate(
        self, layer_index: int, n_layers: int, attention: BlockUnits, mlp: BlockUnits, layer_params: int
    ) -> tuple[int, int]:
        """Units to remove from the layer's (attention, MLP) blocks."""
        return uniform_allocation(self.config.pruning_ratio, attention, mlp, layer_params)

    def observe(self, ctx: BlockContext) -> None:
        """Called during the dense scoring pass (``global_plan`` methods), while the layer is loaded."""

    def plan(self, blocks: list[dict[str, BlockContext]], layer_params: list[int]) -> None:
        """Decide every layer's allocation at once (``global_plan`` methods only)."""
        raise NotImplementedError

    def decide(self, ctx: BlockContext) -> Decision:
        raise NotImplementedError

    def begin_layer(self, layer: nn.Module, arch, calib, index: int) -> None:
        """Called with the dense layer and its calibration inputs, before any block is pruned."""

    def finish_layer(self, layer: nn.Module, arch, calib, index: int) -> None:
        """Called after both blocks are pruned, before deferred compensation and the outputs pass."""


class ScoreMethod(Method):
    """Methods that score each consumer column and keep the best units, uniformly per layer."""

    def column_scores(self, ctx: BlockContext) -> Tensor:
        raise NotImplementedError

    def decide(self, ctx: BlockContext) -> Decision:
        scores = self.column_scores(ctx).cpu()
        units = ctx.units(scores)
        kept = top_units(units.unit_scores(scores), units.count - ctx.n_remove)
        return Decision(units, kept)


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
