"""Wanda++ adapted to structured units (Yang et al., ACL Findings 2025, arXiv 2503.04992).

Per decoder layer, before it is pruned:

* regional gradients: for every calibration sample, the loss ``L = ||f_layer(X)||_2 / sqrt(numel)``
  of the layer's output is backpropagated through that one layer only (never the whole
  model), and ``G_ij = sqrt(mean over samples of (dL/dW_ij)^2)`` for ``o_proj`` and ``down_proj``;
* the dense layer's outputs on a small subset of the samples (the targets of the regional
  optimisation).

Score of consumer weight ``(i, j)``: ``S_ij = (alpha |G_ij| + sqrt(x_j)) |W_ij|`` with ``x_j`` the
mean over samples of the token sum of ``h_j^2`` (``--alpha``, 100 by default); a column's score
is its mean over rows, a unit's the sum over its columns, and every layer loses the ratio
(uniform, as Wanda-SP).

After both blocks are pruned, regional optimisation (RO): ``--ro_iter`` rounds over the
subset, one sample per step, Adam at ``--ro_lr`` on every linear weight of the pruned
layer, minimising the mean squared error to the dense outputs. GRAIL compensation runs
after RO on the weights as RO left them (or before RO with ``--compensate_first``).

The score is a pure function here; the layer transforms are in :mod:`grail.methods.regional`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grail.config import MethodOptions, PruneConfig, option
from grail.methods.base import Block, ColumnScoreSelector, Evidence, Method, MethodSpec, UniformAllocation
from grail.methods.regional import RegionalGradients, RegionalOptimisation


@dataclass(frozen=True)
class WandaPPOptions(MethodOptions):
    method = "wanda_pp_sp"

    ro_iter: int = option(5, "regional optimisation rounds", minimum=0)
    ro_lr: float = option(3e-7, "regional optimisation learning rate", minimum=0.0)
    compensate_first: bool = option(False, "apply compensation before regional optimisation")
    alpha: float = option(100.0, "regional gradient score weight", minimum=0.0)


def wanda_pp_column_scores(weight: Tensor, gradient: Tensor, sq_sum: Tensor, n_samples: int, alpha: float) -> Tensor:
    """``mean_i (alpha |G_ij| + sqrt(x_j)) |W_ij|`` with ``x_j`` the per-sample mean of the token sum of ``h_j^2``."""
    w = weight.to(torch.float64)
    per_sample_energy = sq_sum.to(w.device) / n_samples
    return ((alpha * gradient.to(w.device).abs() + per_sample_energy.sqrt()) * w.abs()).mean(dim=0)


@dataclass
class WandaPPSelector(ColumnScoreSelector):
    n_samples: int
    alpha: float

    def column_scores(self, block: Block, evidence: Evidence) -> Tensor:
        return wanda_pp_column_scores(
            block.consumer.weight, evidence.gradient, evidence.stats.sq_sum, self.n_samples, self.alpha
        )


def build(config: PruneConfig) -> Method:
    opts = config.options_for(WandaPPOptions)
    return Method(
        "wanda_pp_sp",
        WandaPPSelector(config.nsamples, opts.alpha),
        UniformAllocation(config.pruning_ratio),
        (RegionalGradients(config.nsamples), RegionalOptimisation(config.nsamples, opts.ro_iter, opts.ro_lr)),
        defer_compensation=config.compensate and not opts.compensate_first,
    )


SPEC = MethodSpec("wanda_pp_sp", build, WandaPPOptions)
