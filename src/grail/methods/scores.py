"""Per-column importance scores of a consumer's inputs: pure functions of weights and statistics.

``W`` is the consumer weight (O x H); column ``j`` is the ``j``-th input feature, i.e. one
channel of an MLP or one dimension of one attention head. Unit scores are sums of column
scores (see :mod:`grail.units`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from grail.stats import InputStats


def magnitude_scores(weight: Tensor) -> Tensor:
    """Magnitude-SP: the L2 norm of each consumer column, ``||W[:, j]||_2``."""
    return weight.to(torch.float64).norm(dim=0)


def wanda_scores(weight: Tensor, stats: InputStats) -> Tensor:
    """Wanda-SP: ``mean_i |W_ij| * ||X_j||_2``, the Wanda score averaged over output rows."""
    return weight.to(torch.float64).abs().mean(dim=0) * stats.norm.to(weight.device)
