"""Wanda-SP: structured Wanda, weight magnitude times input activation norm."""

from __future__ import annotations

from torch import Tensor

from grail.methods.base import BlockContext, ScoreMethod
from grail.methods.scores import wanda_scores


class WandaSP(ScoreMethod):
    name = "wanda_sp"

    def column_scores(self, ctx: BlockContext) -> Tensor:
        return wanda_scores(ctx.consumer.weight, ctx.stats)
