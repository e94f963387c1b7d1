"""Prunable units of a block and what removing each one costs.

A *unit* is the smallest thing structured pruning removes at once:

* MLP block: one intermediate channel (a row of ``gate_proj`` and ``up_proj`` and the
  matching column of ``down_proj``).
* Attention block, ``unit="group"`` (the default): one key/value group, i.e. a key/value
  head together with all query heads that read it. With multi-head attention this is
  simply one head.
* Attention block, ``unit="query"`` (grouped-query attention only): a *bundle* of query
  heads, one from every key/value group, so that every group keeps the same number of
  query heads and the stock attention modules still run. Bundle ``j`` holds the ``j``-th
  least important query head of each group, so bundles depend on the head scores.

Units are described by the consumer-input columns they own (the columns of ``o_proj`` or
``down_proj``) and, for attention, by their query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grail.config import ATTENTION_UNITS
from grail.models.arch import HeadLayout, LayerShape


@dataclass(frozen=True)
class BlockUnits:
    """The units of one block (attention or MLP) of one layer."""

    columns: Tensor  # [n_units, width] consumer-input columns owned by each unit
    cost: int  # parameters removed with one unit (producer rows + consumer columns)
    heads: Tensor | None = None  # [n_units, heads_per_unit] query heads (attention only)

    @property
    def count(self) -> int:
        return self.columns.shape[0]

    def kept_columns(self, kept_units: Tensor) -> Tensor:
        """Consumer-input columns of the kept units, ascending."""
        return self.columns[kept_units].flatten().sort().values

    def kept_heads(self, kept_units: Tensor) -> Tensor:
        """Query heads of the kept units, ascending (attention only)."""
        if self.heads is None:
            raise ValueError("only attention blocks have heads")
        return self.heads[kept_units].flatten().sort().values

    def unit_scores(self, column_scores: Tensor) -> Tensor:
        """A unit's score is the sum of the scores of the columns it owns."""
        return column_scores[self.columns].sum(dim=1)


def mlp_units(shape: LayerShape, producer_bias: bool = False) -> BlockUnits:
    columns = torch.arange(shape.intermediate_size).unsqueeze(1)
    cost = 3 * shape.hidden_size + (2 if producer_bias else 0)
    return BlockUnits(columns, cost)


def query_head_cost(shape: LayerShape, qkv_bias: bool = False) -> int:
    """Parameters one query head owns: its q rows (and bias) and its o columns."""
    return shape.head_dim * (shape.hidden_size + int(qkv_bias)) + shape.head_dim * shape.hidden_size


def head_units(layout: HeadLayout, heads: Tensor, cost: int) -> BlockUnits:
    """Attention units made of the query heads in each row of ``heads`` (``[n_units, k]``)."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return BlockUnits(layout.columns(heads), cost, heads)


def attention_units(
    shape: LayerShape,
    unit: str = "group",
    head_scores: Tensor | None = None,
    qkv_bias: bool = False,
) -> BlockUnits:
    """Attention units of a layer; ``head_scores`` are needed to form query bundles."""
    if unit not in ATTENTION_UNITS:
        raise ValueError(f"attention unit must be one of {ATTENTION_UNITS}, got {unit!r}")
    layout = shape.heads
    if unit == "group" or layout.group_size == 1:
        kv_cost = 2 * shape.head_dim * (shape.hidden_size + int(qkv_bias))
        return head_units(layout, layout.groups(), layout.group_size * query_head_cost(shape, qkv_bias) + kv_cost)
    if head_scores is None:
        raise ValueError("query-head bundles are formed from head scores; none were given")
    return head_units(layout, layout.bundles(head_scores), layout.num_kv_heads * query_head_cost(shape, qkv_bias))


def top_units(scores: Tensor, n_keep: int) -> Tensor:
    """Indices (ascending) of the ``n_keep`` highest scores; ties go to the lower index."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:n_keep].sort().values
