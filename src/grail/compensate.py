"""GRAIL compensation: reconstruct a pruned block's hidden state from the kept units.

Notation (one consumer ``o_proj`` or ``down_proj``): input ``h`` in R^H, weight ``W`` (O x H),
bias ``b``, calibration Gram ``G = sum_n h_n h_n^T``, feature sums ``s = sum_n h_n``, token
count ``N``, kept columns ``P`` (K of them).

* Linear fit:  ``h ~ B h[P]`` with ``B = G[:, P] (G[P, P] + lam' I)^-1``.
* Affine fit:  ``h ~ B h[P] + c``, the same ridge problem with a constant regressor
  appended (the constant is not penalised). Its intercept turns into a bias.

and the merge into the consumer is ``W' = W B``, ``b' = b + W c``. With ``lam = 0`` the
result is the least-squares fit of the consumer's *output* on the calibration data.
``lam' = lam * mean(diag G[P, P])``, so ``lam`` is relative to the typical feature energy.

Every function here is pure tensor code in float64 and knows nothing about models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from grail.errors import GrailError

log = logging.getLogger(__name__)

FITS = ("affine", "linear", "seed")


class SingularSystemError(GrailError, RuntimeError):
    """The kept units' Gram matrix could not be factored even with jitter."""


def solve_spd(a: Tensor, rhs: Tensor, where: str = "") -> tuple[Tensor, float]:
    """Solve ``a x = rhs`` for symmetric positive (semi-)definite ``a`` by Cholesky, in float64.

    A singular ``a`` gets the smallest diagonal jitter (1e-12, 1e-11, ... times its mean
    diagonal) that makes it factor; the jitter used is returned so callers can report it.
    """
    a = a.to(torch.float64)
    rhs = rhs.to(torch.float64)
    scale = a.diagonal().mean().abs().item() or 1.0
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    jitter = 0.0
    for exponent in range(-12, 0):
        chol, info = torch.linalg.cholesky_ex(a + jitter * scale * eye)
        if int(info) == 0:
            if jitter:
                log.info("%s: Gram matrix singular, factored with jitter %.0e x mean diagonal", where, jitter)
            return torch.cholesky_solve(rhs, chol), jitter
        jitter = 10.0**exponent
    raise SingularSystemError(f"{where}: could not factor the kept units' Gram matrix even with jitter 0.1")


@dataclass(frozen=True)
class Reconstruction:
    """``h ~ B h[P] + c``: ``B`` is H x K, ``c`` (affine fits only) has length H."""

    B: Tensor
    c: Tensor | None
    jitter: float


def reconstruction_map(
    gram: Tensor,
    kept: Tensor,
    lam: float,
    sums: Tensor | None = None,
    count: int | None = None,
    where: str = "",
) -> Reconstruction:
    """Ridge map from the kept features to all features; affine when ``sums``/``count`` are given."""
    gram = gram.to(torch.float64)
    kept = kept.to(gram.device)
    g_pp = gram[kept][:, kept]
    penalty = lam * g_pp.diagonal().mean()
    k = len(kept)
    if sums is None:
        a = g_pp + penalty * torch.eye(k, dtype=gram.dtype, device=gram.device)
        x, jitter = solve_spd(a, gram[kept], where)  # K x H
        return Reconstruction(x.T, None, jitter)
    sums = sums.to(gram)
    s_p = sums[kept]
    a = torch.empty(k + 1, k + 1, dtype=gram.dtype, device=gram.device)
    a[:k, :k] = g_pp
    a[:k, k] = s_p
    a[k, :k] = s_p
    a[k, k] = float(count)
    a[:k, :k] += penalty * torch.eye(k, dtype=gram.dtype, device=gram.device)
    rhs = torch.cat([gram[kept], sums.unsqueeze(0)], dim=0)  # (K+1) x H
    x, jitter = solve_spd(a, rhs, where)
    return Reconstruction(x[:k].T, x[k], jitter)


def merge(weight: Tensor, bias: Tensor | None, rec: Reconstruction) -> tuple[Tensor, Tensor | None]:
    """Fold a reconstruction into the consumer: ``W' = W B``, ``b' = b + W c``."""
    w64 = weight.to(torch.float64)
    new_weight = w64 @ rec.B.to(w64)
    new_bias = None if bias is None else bias.to(torch.float64)
    if rec.c is not None:
        shift = w64 @ rec.c.to(w64)
        new_bias = shift if new_bias is None else new_bias + shift
    return new_weight, new_bias


def mean_bias_shift(weight: Tensor, mean: Tensor, kept: Tensor) -> Tensor:
    """FLAP's bias compensation: the removed columns' mean contribution ``W[:, R] mean[R]``."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept.to(weight.device)] = False
    return weight.to(torch.float64)[:, removed] @ mean.to(weight.device, torch.float64)[removed]


def add_bias(bias: Tensor | None, shift: Tensor) -> Tensor:
    return shift if bias is None else bias.to(shift) + shift


def output_error(
    weight: Tensor,
    new_weight: Tensor,
    bias_shift: Tensor | None,
    kept: Tensor,
    gram: Tensor,
    sums: Tensor,
    count: int,
) -> float:
    """``sum_n ||W h_n + b - (W' h_n[P] + b')||^2`` over the tokens that gave ``gram``, ``sums``.

    With ``D = W - W' S`` (``S`` selects the kept features) and ``d = b' - b`` the residual is
    ``D h_n - d``, so the error is ``tr(D G D^T) - 2 d^T D s + N |d|^2``: no activations needed.
    """
    gram = gram.to(torch.float64)
    d_mat = weight.to(gram).clone()
    d_mat[:, kept.to(gram.device)] -= new_weight.to(gram)
    err = (d_mat @ gram * d_mat).sum()
    if bias_shift is not None:
        d = bias_shift.to(gram)
        err = err - 2 * d @ (d_mat @ sums.to(gram)) + count * d.square().sum()
    return float(err)
