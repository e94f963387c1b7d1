"""Wanda-SP: structured Wanda, weight magnitude times input activation norm."""

from __future__ import annotations

from torch import Tensor

from grail.config import PruneConfig
from grail.methods.base import Block, ColumnScoreSelector, Evidence, Method, MethodSpec, UniformAllocation
from grail.methods.scores import wanda_scores


class WandaSelector(ColumnScoreSelector):
    def column_scores(self, block: Block, evidence: Evidence) -> Tensor:
        return wanda_scores(block.consumer.weight, evidence.stats)


def build(config: PruneConfig) -> Method:
    return Method("wanda_sp", WandaSelector(), UniformAllocation(config.pruning_ratio))


SPEC = MethodSpec("wanda_sp", build)
