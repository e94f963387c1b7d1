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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from grail import distributed
from grail.calibration import iter_samples, layer_output
from grail.methods.base import BlockContext, ScoreMethod

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


class WandaPP(ScoreMethod):
    name = "wanda_pp_sp"
    float32_layers = True  # the optimiser's tiny steps vanish in 16-bit weights

    def __init__(self, config):
        super().__init__(config)
        self.defer_compensation = config.compensate and not config.compensate_first
        self._gradients: dict[str, Tensor] = {}
        self._ro_samples: list = []
        self._targets: list[Tensor] = []
        self.ro_losses: list[float] = []

    def begin_layer(self, layer: nn.Module, arch, calib, index: int) -> None:
        o_proj, down_proj = arch.attention_linears(layer)[3], arch.mlp_linears(layer)[2]
        grads = regional_gradients(layer, [o_proj, down_proj], iter_samples(layer, calib, self.config.nsamples))
        self._gradients = {"attn": grads[0], "mlp": grads[1]}
        local = list(iter_samples(layer, calib, min(RO_SAMPLES, self.config.nsamples)))
        with torch.no_grad():
            mine = [(i, h.cpu(), layer_output(layer(h, **kw)).cpu()) for i, h, kw in local]
        # Every process optimises on the same samples, in the same order, so all stay identical.
        gathered = sorted((item for part in distributed.all_gather_objects(mine) for item in part), key=lambda t: t[0])
        kwargs = local[0][2] if local else next(iter_samples(layer, calib, calib.n_samples + 10**9))[2]
        device = next(layer.parameters()).device
        self._ro_samples = [(h.to(device), kwargs) for _, h, _ in gathered]
        self._targets = [t.to(device) for _, _, t in gathered]

    def column_scores(self, ctx: BlockContext) -> Tensor:
        w = ctx.consumer.weight.to(torch.float64)
        per_sample_energy = ctx.stats.sq_sum.to(w.device) / self.config.nsamples
        grad = self._gradients[ctx.kind].to(w.device)
        return ((self.config.alpha * grad.abs() + per_sample_energy.sqrt()) * w.abs()).mean(dim=0)

    def finish_layer(self, layer: nn.Module, arch, calib, index: int) -> None:
        if self.config.ro_iter > 0:
            self.ro_losses.append(
                regional_optimisation(layer, self._ro_samples, self._targets, self.config.ro_iter, self.config.ro_lr)
            )
        self._gradients, self._ro_samples, self._targets = {}, [], []
