"""Magnitude-SP: keep the units whose consumer columns have the largest norms (no data needed)."""

from __future__ import annotations

from torch import Tensor

from grail.config import PruneConfig
from grail.methods.base import Block, ColumnScoreSelector, Evidence, Method, MethodSpec, UniformAllocation
from grail.methods.scores import magnitude_scores


class MagnitudeSelector(ColumnScoreSelector):
    uses_activations = False

    def column_scores(self, block: Block, evidence: Evidence) -> Tensor:
        return magnitude_scores(block.consumer.weight)


def build(config: PruneConfig) -> Method:
    return Method("mag_sp", MagnitudeSelector(), UniformAllocation(config.pruning_ratio))


SPEC = MethodSpec("mag_sp", build)
