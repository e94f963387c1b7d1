"""Wanda++'s layer transforms: regional gradients before a layer is pruned, regional optimisation after.

They are the only parts of a method that run the decoder layer themselves (backward passes
through one layer, and Adam steps on its weights), so they live apart from the pure selector
in :mod:`grail.methods.wanda_pp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from grail import distributed
from grail.calibration import iter_samples, layer_output
from grail.methods.base import Evidence, LayerTransform

RO_SAMPLES = 32  # calibration samples used for the regional optimisation


def regional_gradients(layer: nn.Module, linears: list[nn.Linear], samples) -> list[Tensor]:
    """``sqrt(mean_n (dL_n/dW)^2)`` for each linear weight, ``L_n = ||layer(x_n)|| / sqrt(numel)``.

    ``samples`` yields ``(sample id, hidden, kwargs)``; in a data-parallel run the squares
    and the count are summed over processes.
    """
    squares = [torch.zeros_like(lin.weight, dtype=torch.float64) for lin in linears]
    count = 0
    with torch.enable_grad():
        for lin in linears:
            lin.weight.requires_grad_(True)
        try:
            for _, hidden, kwargs in samples:
                out = layer_output(layer(hidden, **kwargs)).float()
                loss = out.norm() / out.numel() ** 0.5
                grads = torch.autograd.grad(loss, [lin.weight for lin in linears])
                for acc, g in zip(squares, grads, strict=True):
                    acc += g.double().square()
                count += 1
        finally:
            for lin in linears:
                lin.weight.requires_grad_(False)
    for acc in squares:
        distributed.all_reduce_sum(acc)
    total = int(distributed.all_reduce_sum(torch.tensor(float(count), dtype=torch.float64)).item())
    return [(acc / max(total, 1)).sqrt() for acc in squares]


def regional_optimisation(layer: nn.Module, samples: list, targets: list[Tensor], rounds: int, lr: float) -> float:
    """Adam on the layer's linear weights towards the dense outputs; returns the final mean loss."""
    params = [m.weight for m in layer.modules() if isinstance(m, nn.Linear)]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=lr)
    last = 0.0
    try:
        with torch.enable_grad():
            for _ in range(rounds):
                total = 0.0
                for (hidden, kwargs), target in zip(samples, targets, strict=True):
                    optimiser.zero_grad(set_to_none=True)
                    loss = nn.functional.mse_loss(layer_output(layer(hidden, **kwargs)).float(), target.float())
                    loss.backward()
                    optimiser.step()
                    total += loss.item()
                last = total / max(len(targets), 1)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return last


@dataclass
class RegionalGradients(LayerTransform):
    """Before pruning: the regional gradient of ``o_proj`` and ``down_proj`` over the first ``n_samples``."""

    n_samples: int

    def begin(self, layer: nn.Module, arch, calib, index: int) -> dict[str, Evidence]:
        o_proj, down_proj = arch.attention_linears(layer)[3], arch.mlp_linears(layer)[2]
        grads = regional_gradients(layer, [o_proj, down_proj], iter_samples(layer, calib, self.n_samples))
        return {"attn": Evidence(gradient=grads[0]), "mlp": Evidence(gradient=grads[1])}


@dataclass
class RegionalOptimisation(LayerTransform):
    """After pruning: Adam on the layer's linear weights towards the dense layer's outputs.

    The dense outputs of the first ``min(RO_SAMPLES, n_samples)`` samples are recorded in
    :meth:`begin`; every process of a data-parallel run optimises on the same samples in the
    same order, so all stay identical.
    """

    n_samples: int
    rounds: int
    lr: float
    float32 = True  # the optimiser's tiny steps vanish in 16-bit weights

    def __post_init__(self) -> None:
        self._samples: list = []
        self._targets: list[Tensor] = []

    def begin(self, layer: nn.Module, arch, calib, index: int) -> dict[str, Evidence]:
        local = list(iter_samples(layer, calib, min(RO_SAMPLES, self.n_samples)))
        with torch.no_grad():
            mine = [(i, h.cpu(), layer_output(layer(h, **kw)).cpu()) for i, h, kw in local]
        gathered = sorted((item for part in distributed.all_gather_objects(mine) for item in part), key=lambda t: t[0])
        kwargs = local[0][2] if local else next(iter_samples(layer, calib, calib.n_samples + 10**9))[2]
        device = next(layer.parameters()).device
        self._samples = [(h.to(device), kwargs) for _, h, _ in gathered]
        self._targets = [t.to(device) for _, _, t in gathered]
        return {}

    def finish(self, layer: nn.Module, arch, calib, index: int) -> None:
        if self.rounds > 0:
            regional_optimisation(layer, self._samples, self._targets, self.rounds, self.lr)
        self._samples, self._targets = [], []
