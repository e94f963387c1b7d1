"""Streaming statistics of a linear layer's inputs, accumulated in float64.

Everything the selectors and the compensation need is a sum over calibration tokens, so it
can be accumulated batch by batch, split into folds (for held-out validation) and summed
across processes: the token count, the sum of each input feature, the sum of its squares,
and optionally the Gram matrix ``sum_n h_n h_n^T``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grail.compensate import Moments, TargetMoments, block_elements, blocks_of, output_sketch, slices
from grail.errors import GrailError


def _add_product(total: Tensor, left: Tensor, right: Tensor) -> None:
    """``total += left^T right``. Where ``total`` lives beside the operands, in their dtype, it is added in place
    (no product matrix is made); otherwise a block of rows at a time is made and brought over."""
    if total.device == left.device and total.dtype == left.dtype:
        total.addmm_(left.T, right)
        return
    for rows in blocks_of(total.shape[0], total.shape[1]):
        total[rows].add_((left[:, rows].T @ right).to(total.device))


MIN_CHUNK_TOKENS = 256


def token_chunks(n_tokens: int, width: int) -> list[slice]:
    """Slices of a batch's tokens that statistics of ``width`` features add at a time: the float64 copy of
    one is no larger than a block of their Gram matrix (:func:`~grail.compensate.block_elements`), and it
    holds at least :data:`MIN_CHUNK_TOKENS` tokens (fewer make the products slow)."""
    return slices(n_tokens, max(block_elements(width, width) // max(width, 1), MIN_CHUNK_TOKENS))


def _total(tensors: list[Tensor]) -> Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def _total_in_place(tensors: list[Tensor]) -> Tensor:
    """:func:`_total`, accumulated into the first tensor."""
    for t in tensors[1:]:
        tensors[0].add_(t)
    return tensors[0]


class NonFiniteStatisticsError(GrailError, FloatingPointError):
    """A NaN or Inf reached the calibration statistics."""


class InputStats:
    """Sums over the calibration tokens seen by one linear layer's input.

    ``n_folds > 1`` keeps the token count, feature sums and Gram matrix per fold of
    calibration samples (for choosing the ridge penalty on held-out folds); the totals
    are their sums. ``gram_device`` keeps the Gram matrices elsewhere than ``device`` (host
    memory beside a GPU): each batch's product is computed where the inputs are and added there.
    """

    def __init__(
        self,
        dim: int,
        gram: bool,
        device: torch.device | str = "cpu",
        n_folds: int = 1,
        gram_device: torch.device | str | None = None,
    ):
        self.dim = dim
        gram_device = device if gram_device is None else gram_device
        self.sq_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.fold_counts = [0] * n_folds
        self.fold_sums = [torch.zeros(dim, dtype=torch.float64, device=device) for _ in range(n_folds)]
        self.fold_grams: list[Tensor] | None = None
        if gram:
            self.fold_grams = [torch.zeros(dim, dim, dtype=torch.float64, device=gram_device) for _ in range(n_folds)]

    @property
    def n_folds(self) -> int:
        return len(self.fold_counts)

    def update(self, x: Tensor, fold: int = 0) -> None:
        """Add a batch of inputs ``x`` (any leading shape, last dimension ``dim``) to ``fold``."""
        # Every sum is float64, and so are the Gram products on the CPU: a float32 product of
        # activations is exact in float64, so only the accumulation's round-off remains (1e-16
        # relative instead of 1e-7), which an ill-conditioned Gram matrix would amplify in the
        # solve (and which would make data-parallel runs, whose batches differ, disagree). On
        # CUDA the products stay float32 (TF32 off): consumer GPUs run float64 at 1/32-1/64 speed.
        # The batch's tokens are added a chunk at a time, so that its float64 copy is never whole.
        x = x.reshape(-1, self.dim)
        exact = torch.float32 if x.device.type == "cuda" and x.dtype != torch.float64 else torch.float64
        self.fold_counts[fold] += x.shape[0]
        for tokens in token_chunks(x.shape[0], self.dim):
            xm = x[tokens].to(exact)
            self.fold_sums[fold] += xm.sum(dim=0, dtype=torch.float64)
            self.sq_sum += xm.square().sum(dim=0, dtype=torch.float64)
            if self.fold_grams is not None:
                _add_product(self.fold_grams[fold], xm, xm)

    @property
    def count(self) -> int:
        return sum(self.fold_counts)

    def merge_folds(self) -> None:
        """Add the folds into the first one, in place, once their split is no longer needed.

        The total then costs no matrix of its own (the same sums, in the same order, as :attr:`gram`).
        """
        if self.n_folds == 1:
            return
        self.fold_counts = [self.count]
        self.fold_sums = [_total_in_place(self.fold_sums)]
        if self.fold_grams is not None:
            self.fold_grams = [_total_in_place(self.fold_grams)]

    def drop_gram(self) -> None:
        """Forget the Gram matrices (a solve made its system in their memory): reading them later is an error."""
        self.fold_grams = None

    @property
    def sum(self) -> Tensor:
        return _total(self.fold_sums)

    @property
    def gram(self) -> Tensor:
        if self.fold_grams is None:
            raise RuntimeError("these statistics were collected without a Gram matrix")
        return _total(self.fold_grams)

    def moments(self) -> Moments:
        """Gram matrix, sums and count over all tokens."""
        return Moments(self.gram, self.sum, self.count)

    def fold_moments(self) -> list[Moments]:
        if self.fold_grams is None:
            raise RuntimeError("these statistics were collected without a Gram matrix")
        return [Moments(g, s, n) for g, s, n in zip(self.fold_grams, self.fold_sums, self.fold_counts, strict=True)]

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)

    @property
    def norm(self) -> Tensor:
        """L2 norm of each input feature over all calibration tokens."""
        return self.sq_sum.sqrt()

    @property
    def variance(self) -> Tensor:
        """Unbiased sample variance of each feature (sums in float64, clamped at zero)."""
        n = self.count
        if n < 2:
            return torch.zeros_like(self.sum)
        return ((self.sq_sum - self.sum.square() / n) / (n - 1)).clamp_min(0.0)

    def check_finite(self, where: str) -> None:
        tensors = [*self.fold_sums, self.sq_sum, *(self.fold_grams or [])]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise NonFiniteStatisticsError(
                f"NaN or Inf in the calibration statistics of {where}. The activations overflowed "
                "or the weights are corrupt; try --dtype float32 or bfloat16 instead of float16, "
                "and check the model file."
            )

    def all_reduce(self) -> None:
        """Sum the statistics over the processes of a data-parallel run (no-op in a single process)."""
        from grail import distributed

        if distributed.world_size() == 1:
            return
        counts = torch.tensor(self.fold_counts, dtype=torch.float64, device=self.sq_sum.device)
        for t in (counts, *self.fold_sums, self.sq_sum, *(self.fold_grams or [])):
            distributed.all_reduce_sum(t)
        self.fold_counts = [int(c) for c in counts.tolist()]


class TargetStats:
    """Sums that define a fit target ``t_n`` (O) for a consumer whose input is ``h_n`` (H), per fold.

    ``sum_n t_n h_n^T`` (O x H), ``sum_n t_n``, ``sum_n |t_n|^2`` and ``sum_n |S t_n|^2`` on the
    cross-validation's output sketch, all in float64 (see :class:`grail.compensate.TargetMoments`).

    The cross moment is kept whole once, over all folds (the final fit's right-hand side); each
    fold keeps it only on the sketch's rows, ``S sum_n t_n h_n^T`` (128 x H, the whole of it for
    consumers with no more outputs), which is all that cross-validation reads. For a 28,672-wide
    ``down_proj`` of hidden size 8192 with four folds that is 1.9 GiB of float64 instead of 7.0.
    """

    def __init__(
        self,
        out_dim: int,
        in_dim: int,
        device: torch.device | str = "cpu",
        n_folds: int = 1,
        cross_device: torch.device | str | None = None,
        cross: bool = True,
    ):
        cross_device = device if cross_device is None else cross_device
        self.sketch = output_sketch(out_dim, device)
        # Without ``cross`` only the sums are kept (an intercept-only update needs no more).
        self.cross = torch.zeros(out_dim, in_dim, dtype=torch.float64, device=cross_device) if cross else None
        scored_rows = out_dim if self.sketch is None else self.sketch.shape[0]
        self.fold_scored_cross = [
            torch.zeros(scored_rows, in_dim, dtype=torch.float64, device=cross_device)
            for _ in range(n_folds if cross and n_folds > 1 else 0)
        ]
        self.fold_sums = [torch.zeros(out_dim, dtype=torch.float64, device=device) for _ in range(n_folds)]
        self.fold_sq = torch.zeros(n_folds, dtype=torch.float64, device=device)
        self.fold_sketch_sq = torch.zeros(n_folds, dtype=torch.float64, device=device)

    @property
    def n_folds(self) -> int:
        return len(self.fold_sums)

    def update(self, target: Tensor, inputs: Tensor, fold: int = 0) -> None:
        """Add tokens' targets ``[n, O]`` and the consumer's inputs ``[n, H]`` to ``fold``."""
        target = target.reshape(-1, target.shape[-1])
        inputs = inputs.reshape(-1, inputs.shape[-1])
        for tokens in token_chunks(len(target), max(target.shape[1], inputs.shape[1])):
            t = target[tokens].to(torch.float64)
            self.fold_sums[fold] += t.sum(dim=0)
            self.fold_sq[fold] += t.square().sum()
            if self.cross is None:
                continue
            h = inputs[tokens].to(t)
            _add_product(self.cross, t, h)
            sketched = t if self.sketch is None else t @ self.sketch.T
            self.fold_sketch_sq[fold] += sketched.square().sum()
            if self.fold_scored_cross:
                _add_product(self.fold_scored_cross[fold], sketched, h)

    def merge_folds(self) -> None:
        """Add the folds' sums into the first one, in place, and drop their sketched cross moments
        (see :meth:`InputStats.merge_folds`): cross-validation is done with them."""
        if self.n_folds == 1:
            return
        self.fold_scored_cross = []
        self.fold_sums = [_total_in_place(self.fold_sums)]
        self.fold_sq = self.fold_sq.sum().reshape(1)
        self.fold_sketch_sq = self.fold_sketch_sq.sum().reshape(1)

    def fold_moments(self) -> list[TargetMoments]:
        """Each fold's moments for cross-validation: their cross moment on the sketch's rows."""
        if self.n_folds == 1:
            return [self.moments()]
        return [
            TargetMoments(
                self.fold_scored_cross[i] if self.fold_scored_cross else None,
                self.fold_sums[i],
                float(self.fold_sq[i]),
                float(self.fold_sketch_sq[i]),
                sketched=self.sketch is not None,
            )
            for i in range(self.n_folds)
        ]

    def moments(self) -> TargetMoments:
        """The sums over all folds."""
        return TargetMoments(
            self.cross,
            _total(self.fold_sums),
            float(self.fold_sq.sum()),
            float(self.fold_sketch_sq.sum()),
        )

    def check_finite(self, where: str) -> None:
        tensors = [
            *([] if self.cross is None else [self.cross]),
            *self.fold_scored_cross,
            *self.fold_sums,
            self.fold_sq,
        ]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise NonFiniteStatisticsError(
                f"NaN or Inf in the dense-model targets of {where}. The activations overflowed "
                "or the weights are corrupt; try --dtype float32 or bfloat16 instead of float16."
            )

    def all_reduce(self) -> None:
        """Sum over the processes of a data-parallel run (no-op in a single process)."""
        from grail import distributed

        if distributed.world_size() == 1:
            return
        cross = [] if self.cross is None else [self.cross]
        for t in (*cross, *self.fold_scored_cross, *self.fold_sums, self.fold_sq, self.fold_sketch_sq):
            distributed.all_reduce_sum(t)
