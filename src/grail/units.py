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

from grail.models.arch import LayerShape

ATTENTION_UNITS = ("group", "query")


@dataclass(frozen=True)
class BlockUnits:
    """The units of one block (attention or MLP) of one layer."""

    kind: str  # "attn" or "mlp"
    columns: Tensor  # [n_units, width] consumer-input columns owned by each unit
    cost: int  # parameters removed with one unit (producer rows + consumer columns)
    heads: Tensor | None = None  # [n_units, heads_per_unit] query heads (attention only)

    @property
    def count(self) -> int:
        return self.columns.shape[0]

    def kept_columns(self, kept_units: Tensor) -> Tensor:
        return self.columns[kept_units].flatten().sort().values

    def kept_heads(self, kept_units: Tensor) -> Tensor:
        assert self.heads is not None, "only attention blocks have heads"
        return self.heads[kept_units].flatten().sort().values

    def unit_scores(self, column_scores: Tensor) -> Tensor:
        """A unit's score is the sum of the scores of the columns it owns."""
        return column_scores[self.columns].sum(dim=1)


def mlp_units(shape: LayerShape, producer_bias: bool = False) -> BlockUnits:
    columns = torch.arange(shape.intermediate_size).unsqueeze(1)
    cost = 3 * shape.hidden_size + (2 if producer_bias else 0)
    return BlockUnits("mlp", columns, cost)


def _head_columns(heads: Tensor, head_dim: int) -> Tensor:
    """[n_units, k] head indices -> [n_units, k * head_dim] column indices."""
    offsets = torch.arange(head_dim)
    return (heads.unsqueeze(-1) * head_dim + offsets).flatten(1)


def attention_units(
    shape: LayerShape,
    unit: str = "group",
    head_scores: Tensor | None = None,
    qkv_bias: bool = False,
) -> BlockUnits:
    """Attention units of a layer; ``head_scores`` are needed to form query bundles."""
    if unit not in ATTENTION_UNITS:
        raise ValueError(f"attention unit must be one of {ATTENTION_UNITS}, got {unit!r}")
    hd, hidden, g, n_kv = shape.head_dim, shape.hidden_size, shape.group_size, shape.num_kv_heads
    q_head_cost = hd * (hidden + int(qkv_bias)) + hd * hidden  # q rows + o columns
    if unit == "group" or g == 1:
        heads = torch.arange(shape.num_heads).view(n_kv, g)
        cost = g * q_head_cost + 2 * hd * (hidden + int(qkv_bias))
    else:
        if head_scores is None:
            raise ValueError("query-head bundles are formed from head scores; none were given")
        # Rank the query heads inside each group, least important first; bundle j takes
        # the j-th ranked head of every group.
        ranks = torch.argsort(head_scores.view(n_kv, g), dim=1, stable=True)
        heads = (ranks + torch.arange(n_kv).unsqueeze(1) * g).T.contiguous()
        cost = n_kv * q_head_cost
    return BlockUnits("attn", _head_columns(heads, hd), cost, heads)


def top_units(scores: Tensor, n_keep: int) -> Tensor:
    """Indices (ascending) of the ``n_keep`` highest scores; ties go to the lower index."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:n_keep].sort().values
