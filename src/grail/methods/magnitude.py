"""Magnitude-SP: keep the units whose consumer columns have the largest norms (no data needed)."""

from __future__ import annotations

from torch import Tensor

from grail.methods.base import BlockContext, ScoreMethod
from grail.methods.scores import magnitude_scores


class MagnitudeSP(ScoreMethod):
    name = "mag_sp"
    uses_activations = False

    def column_scores(self, ctx: BlockContext) -> Tensor:
        return magnitude_scores(ctx.consumer.weight)
