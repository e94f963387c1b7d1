"""GRAIL compensation: reconstruct a pruned block's hidden state from the kept units.

Notation (one consumer ``o_proj`` or ``down_proj``): input ``h`` in R^H, weight ``W`` (O x H),
bias ``b``, calibration Gram ``G = sum_n h_n h_n^T``, feature sums ``s = sum_n h_n``, token
count ``N``, kept columns ``P`` (K of them).

* Linear fit:  ``h ~ B h[P]`` with ``B = G[:, P] (G[P, P] + lam' I)^-1``.
* Affine fit:  ``h ~ B h[P] + c``, the same ridge problem with a constant regressor
  appended (the constant is not penalised). Its intercept turns into a bias.

The penalty ``lam' ||B||^2`` pulls ``B`` towards zero, which also shrinks the kept units'
own contribution (``B[P] = G[P, P] (G[P, P] + lam' I)^-1`` is not the identity). With
``prior="pruned"`` the penalty is ``lam' ||B - B0||^2`` instead, ``B0`` being plain pruning
(identity on the kept units, zero on the removed ones): then ``B[P]`` is exactly the
identity, only the removed units' reconstruction ``G[R, P] (G[P, P] + lam' I)^-1`` is
regularised, and ``lam -> inf`` gives plain pruning (with the affine fit: FLAP's mean bias).

The merge into the consumer is ``W' = W B``, ``b' = b + W c``. With ``lam = 0`` the result
is the least-squares fit of the consumer's *output* on the calibration data.
``lam' = lam * mean(diag G[P, P])``, so ``lam`` is relative to the typical feature energy.

The solves work in the consumer's output space: ``W'^T = (G[P, P] + lam' I)^-1 (W G[:, P])^T``
never forms ``B`` (H x K), which saves work when O < H and lets cross-validation reuse
``W G_f[:, P]`` for every fold ``f`` and every ``lam``.

Every function here is pure tensor code in float64 and knows nothing about models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from grail.config import LAMBDA_SEARCHES
from grail.errors import GrailError

log = logging.getLogger(__name__)

# Candidate penalties for --ridge_lambda auto: 0 and the decades 1e-5 ... 100. With the
# pruned prior a large lambda approaches plain pruning, and with small calibration sets the
# choice often lies above 1, so the grid reaches past it.
LAMBDA_GRID = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# Cross-validation scores consumers wider than this on a random sketch of their output rows.
SKETCH_ROWS = 128
# Where the local search of the grid starts when no earlier consumer's choice is at hand: the
# most frequent choices on SmolLM2 lie between 0.01 and 1.
LAMBDA_START = 0.1


class SingularSystemError(GrailError, RuntimeError):
    """The kept units' Gram matrix could not be factored even with jitter."""


JITTERS = (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)  # relative to the mean diagonal
# Products with a consumer's weight and its Gram matrix's columns run a block of at most this
# many float64 elements at a time (32 MiB), so that neither W in float64 (O x H) nor G[:, P]
# (H x K) is ever whole: on LLaMA-2-70B's down_proj each would take 1.75-3.1 GiB.
BLOCK_ELEMENTS = 2**22
# ... and at most this share of the matrix the blocks make up (but not below MIN_BLOCK_ELEMENTS),
# so that on narrower models a block stays small beside the Gram matrix itself.
BLOCK_SHARE = 8
MIN_BLOCK_ELEMENTS = 2**16


def factor_spd(build: Callable[[], Tensor], where: str = "", singular: bool = False) -> tuple[Tensor, float]:
    """The lower Cholesky factor ``L`` of the symmetric positive (semi-)definite float64 ``build()``.

    ``build()`` returns a new matrix at each call, which is factored in place: no second
    K x K matrix is held. A singular matrix is built again with the smallest diagonal jitter
    of :data:`JITTERS` (times its mean diagonal) that makes it factor; the jitter used is
    returned so callers can report it. ``L`` is a column-major view of the built matrix.
    A matrix the caller knows to be ``singular`` starts at the first nonzero jitter: factoring
    it without one fails after nearly a whole factorisation's work (or leaves pivots at
    round-off level, whose solve is noise).
    """
    scale = None
    for jitter in JITTERS[1:] if singular else JITTERS:
        system = build()
        if scale is None:
            scale = system.diagonal().mean().abs().item() or 1.0
        if jitter:
            system.diagonal().add_(jitter * scale)
        # LAPACK factors a column-major matrix in place; the transpose of a row-major symmetric
        # matrix is one, of the same matrix.
        factor, info = system.mT, torch.empty((), dtype=torch.int32, device=system.device)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if int(info) == 0:
            if jitter:
                log.debug("%s: Gram matrix singular, factored with jitter %.0e x mean diagonal", where, jitter)
            return factor, jitter
    raise SingularSystemError(
        f"{where}: could not factor the kept units' Gram matrix even with jitter {JITTERS[-1]:g}; "
        "the calibration activations are degenerate (check the model and --dtype)."
    )


def cholesky_solve_(factor: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``L L^T x = rhs`` in place of ``rhs`` (K x O; column-major, such as ``(O x K).mT``, needs no copy)."""
    torch.linalg.solve_triangular(factor, rhs, upper=False, out=rhs)
    torch.linalg.solve_triangular(factor.mT, rhs, upper=True, out=rhs)
    return rhs


def solve_spd(a: Tensor, rhs: Tensor, where: str = "") -> tuple[Tensor, float]:
    """Solve ``a x = rhs`` for symmetric positive (semi-)definite ``a`` by Cholesky, in float64.

    A singular ``a`` gets the smallest diagonal jitter of :data:`JITTERS` (times its mean
    diagonal) that makes it factor; the jitter used is returned so callers can report it.
    """
    a = a.to(torch.float64)
    factor, jitter = factor_spd(a.clone, where)
    return cholesky_solve_(factor, rhs.to(torch.float64, copy=True)), jitter


def times_float64(weight: Tensor, right: Tensor, out: Tensor | None) -> Tensor:
    """``out = W right`` in float64, with ``W`` converted a block of rows at a time (never whole)."""
    if out is None:
        out = right.new_empty(weight.shape[0], *right.shape[1:])
    for rows in blocks_of(weight.shape[0], weight.shape[1]):
        out[rows] = weight[rows].to(torch.float64) @ right
    return out


def map_columns(
    matrix: Tensor, out: Tensor, fn: Callable[[Tensor], Tensor] | None = None, columns: Tensor | None = None
) -> Tensor:
    """``out[:, j] = fn(M[:, columns[j]])`` (all columns when None), with ``M``'s columns brought to ``out``'s device
    in float64 a block at a time, so that ``M`` in float64 (or on that device) is never whole."""
    if columns is not None:
        columns = columns.to(matrix.device)
    for block in blocks_of(out.shape[1], matrix.shape[0]):
        part = (matrix[:, block] if columns is None else matrix[:, columns[block]]).to(out.device, torch.float64)
        out[:, block] = part if fn is None else fn(part)
    return out


def gather_kept(gram: Tensor, kept: Tensor, out: Tensor) -> Tensor:
    """``out = G[P, P]`` (float64, on ``out``'s device), gathered a block of rows at a time where ``G`` lives."""
    kept = kept.to(gram.device)
    for block in blocks_of(len(kept), gram.shape[0]):
        out[block] = gram[kept[block]][:, kept]
    return out


def block_elements(count: int, size: int) -> int:
    """Elements in one block of a ``count`` x ``size`` matrix: :data:`BLOCK_ELEMENTS`, or 1 / :data:`BLOCK_SHARE`
    of the matrix when that is less (but at least :data:`MIN_BLOCK_ELEMENTS`, and a whole row)."""
    share = max(count * size // BLOCK_SHARE, MIN_BLOCK_ELEMENTS)
    return max(min(BLOCK_ELEMENTS, share), size)


def slices(count: int, step: int) -> list[slice]:
    """``0 .. count`` cut into slices of ``step`` (the last one shorter)."""
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def blocks_of(count: int, size: int) -> list[slice]:
    """Slices of ``count`` rows (or columns) of ``size`` elements each, :func:`block_elements` elements at most."""
    return slices(count, max(1, block_elements(count, size) // max(size, 1)))


@dataclass(frozen=True)
class Moments:
    """Token sums of one slice of the calibration data: ``G``, ``s`` and ``N``."""

    gram: Tensor
    sums: Tensor
    count: int

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.gram - other.gram, self.sums - other.sums, self.count - other.count)


@dataclass(frozen=True)
class TargetMoments:
    """Token sums that define what a consumer's fit reproduces, when it is not ``W h``.

    For a target ``t_n`` (O) at consumer input ``h_n`` (H): ``cross = sum_n t_n h_n^T``
    (O x H), ``sums = sum_n t_n``, ``sq = sum_n |t_n|^2`` and ``sketch_sq = sum_n |S t_n|^2``
    on the cross-validation's output sketch (:func:`output_sketch`; ``sq`` when there is none).
    The default target ``t_n = W h_n`` needs none of them: they are ``W G``, ``W s`` and
    ``tr(W G W^T)``. A fold's moments for cross-validation may hold ``cross`` on the sketch's
    rows only, ``S sum_n t_n h_n^T`` (``sketched``): that is all the held-out scores read.
    """

    cross: Tensor | None  # None where only the sums were kept
    sums: Tensor
    sq: float
    sketch_sq: float
    sketched: bool = False  # ``cross`` is ``S C`` (the sketch's rows), not ``C``


def output_sketch(rows: int, device: torch.device | str = "cpu") -> Tensor | None:
    """The seeded Gaussian sketch ``S`` (``E[S^T S] = I``) that cross-validation scores wide consumers on.

    None for consumers with at most :data:`SKETCH_ROWS` outputs (scored exactly).
    """
    if rows <= SKETCH_ROWS:
        return None
    generator = torch.Generator().manual_seed(0)
    sketch = torch.randn(SKETCH_ROWS, rows, generator=generator, dtype=torch.float64)
    return sketch.to(device) / SKETCH_ROWS**0.5


@dataclass(frozen=True)
class ConsumerFit:
    """A consumer's new weight over the kept columns and the shift of its bias."""

    weight: Tensor  # O x K
    bias_shift: Tensor | None  # O, or None when no bias is added
    jitter: float = 0.0


class KeptGramInPlace:
    """Writes ``G[P, P]`` into ``G``'s own memory, for a solve that is ``G``'s last use.

    The system (``size`` x ``size``) takes the start of ``G``'s memory and a copy of ``G[P, P]``
    the part after it, for the rebuilds after a failed factorisation (which overwrites the whole
    system). The first call gathers ``G[P, P]``: row blocks in increasing order only read rows
    at or after those they write, as ``P`` is increasing and the system is no wider than ``G``.
    """

    def __init__(self, gram: Tensor, kept: Tensor, size: int) -> None:
        k = len(kept)
        self.gram, self.kept, self.filled = gram, kept, False
        self.copy = gram.view(-1)[size * size : size * size + k * k].view(k, k)

    @staticmethod
    def has_room(gram_elements: int, kept_count: int, size: int) -> bool:
        """Whether a ``size`` x ``size`` system and a copy of ``G[P, P]`` fit in a Gram matrix of ``gram_elements``
        (when at least 30% of the units are removed)."""
        return size * size + kept_count**2 <= gram_elements

    @staticmethod
    def fits(gram: Tensor, kept: Tensor, size: int, device: torch.device) -> bool:
        """Whether the system over ``kept`` can be made in ``gram``'s memory, for a solve on ``device``."""
        return (
            gram.device == device
            and gram.dtype == torch.float64
            and gram.is_contiguous()
            and KeptGramInPlace.has_room(gram.numel(), len(kept), size)
            and bool((kept[1:] > kept[:-1]).all())
        )

    def __call__(self, out: Tensor) -> None:
        if self.filled:
            out.copy_(self.copy)
            return
        gather_kept(self.gram, self.kept, out)
        self.copy.copy_(out)  # every read of G is done: the rest of its memory is free
        self.filled = True


@dataclass(frozen=True)
class RidgeSystem:
    """The normal equations of one consumer's fit, for one solve.

    The matrix is ``G[P, P]`` (with the constant feature appended for the affine fit:
    ``[[G[P, P], s[P]], [s[P]^T, N]]``), made anew by :meth:`matrix` from ``fill_gram`` (which
    writes ``G[P, P]`` into the K x K block it is given) and factored in place, so a solve holds
    one K x K matrix; none when ``storage`` is given, whose memory the matrix is made in (the
    Gram matrix itself, with :class:`KeptGramInPlace`). ``rhs`` is the matching ``[W G[:, P], W s]``
    (O x K or O x (K + 1)); when ``owns_rhs`` it is overwritten by the solution.
    """

    fill_gram: Callable[[Tensor], object]
    sums_p: Tensor | None  # s[P], for the affine fit
    count: int
    rhs: Tensor
    kept_count: int
    prior: Tensor | None = None  # W[:, P] (any dtype) when the penalty pulls towards plain pruning
    owns_rhs: bool = False
    storage: Tensor | None = None

    @property
    def size(self) -> int:
        """Unknowns per output row: the kept units, and the constant for the affine fit."""
        return self.kept_count + (self.sums_p is not None)

    def matrix(self) -> Tensor:
        """The unpenalised system matrix, made anew (row-major; it is symmetric)."""
        k, n = self.kept_count, self.size
        if self.storage is not None:
            matrix = self.storage.view(-1)[: n * n].view(n, n)
        else:
            matrix = torch.empty(n, n, dtype=torch.float64, device=self.rhs.device)
        self.fill_gram(matrix[:k, :k])
        if self.sums_p is not None:
            matrix[:k, k] = self.sums_p
            matrix[k, :k] = self.sums_p
            matrix[k, k] = float(self.count)
        return matrix

    def solve(self, lam: float, where: str = "") -> ConsumerFit:
        """The fit with ``lam * mean(diag G[P, P])`` added to the kept units' diagonal (not the bias's)."""
        k, penalty = self.kept_count, None

        def penalised() -> Tensor:
            nonlocal penalty
            matrix = self.matrix()
            if penalty is None:
                penalty = lam * matrix.diagonal()[:k].mean().item()
            if penalty:
                matrix.diagonal()[:k] += penalty
            return matrix

        # A Gram matrix of fewer tokens than unknowns has a rank below its size: unpenalised, it is singular.
        singular = lam == 0 and self.count < self.size
        factor, jitter = factor_spd(penalised, where, singular=singular)
        rhs = self.rhs if self.owns_rhs else self.rhs.clone()
        if penalty and self.prior is not None:
            for block in blocks_of(k, self.prior.shape[0]):
                rhs[:, block] += penalty * self.prior[:, block].to(torch.float64)
        x = cholesky_solve_(factor, rhs.mT).mT  # O x (K or K + 1), in rhs's memory
        return ConsumerFit(x[:, :k], x[:, k] if x.shape[1] > k else None, jitter)


def fit_consumer(
    weight: Tensor,
    moments: Moments,
    kept: Tensor,
    lam: float,
    affine: bool,
    where: str = "",
    prior: str = "zero",
    target: TargetMoments | None = None,
    gram_is_spent: bool = False,
) -> ConsumerFit:
    """GRAIL's compensated consumer: ``W' = W B`` (and ``W c`` as bias shift when affine).

    With ``target`` the fit reproduces that target instead of ``W h``: the right-hand side
    ``W G[:, P]`` becomes ``sum_n t_n h_n[P]^T`` and ``W s`` becomes ``sum_n t_n``.
    Besides ``G`` it holds the right-hand side (overwritten by the solution), one K x K matrix
    (overwritten by its factor) and blocks (:func:`block_elements`). With ``gram_is_spent`` (the
    caller will not read ``G`` again) the K x K matrix is made in ``G``'s memory, which it
    overwrites, where ``G`` is a float64 matrix on the solve's device.
    """
    device, f64 = weight.device, torch.float64
    gram = moments.gram  # left where the statistics live (host memory beside a GPU): blocks of it come over
    kept = kept.to(device)
    sums = moments.sums.to(device, f64)
    k, rows = len(kept), weight.shape[0]
    rhs = torch.empty(rows, k + affine, dtype=f64, device=device)
    if target is None:  # W G[:, P] and W s
        map_columns(
            gram, rhs[:, :k], lambda part: times_float64(weight, part, part.new_empty(rows, part.shape[1])), kept
        )
        if affine:
            times_float64(weight, sums, out=rhs[:, k])
    else:
        map_columns(target.cross, rhs[:, :k], columns=kept)
        if affine:
            rhs[:, k] = target.sums.to(device, f64)

    in_place = gram_is_spent and KeptGramInPlace.fits(gram, kept, k + affine, device)
    system = RidgeSystem(
        KeptGramInPlace(gram, kept, k + affine) if in_place else (lambda out: gather_kept(gram, kept, out)),
        sums[kept] if affine else None,
        moments.count,
        rhs,
        k,
        weight[:, kept] if prior == "pruned" else None,
        owns_rhs=True,
        storage=gram if in_place else None,
    )
    return system.solve(lam, where)


def mean_bias_shift(weight: Tensor, mean: Tensor, kept: Tensor) -> Tensor:
    """FLAP's bias compensation: the removed columns' mean contribution ``W[:, R] mean[R]``."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept.to(weight.device)] = False
    removed_mean = mean.to(weight.device, torch.float64)[removed]
    shift = torch.empty(weight.shape[0], dtype=torch.float64, device=weight.device)
    for rows in blocks_of(weight.shape[0], len(removed_mean)):  # W[:, R] in float64 is never whole
        shift[rows] = weight[rows][:, removed].to(torch.float64) @ removed_mean
    return shift


def target_mean_shift(weight: Tensor, target: TargetMoments, sums: Tensor, count: int, kept: Tensor) -> Tensor:
    """The bias shift that gives the kept columns' output the target's mean: ``(sum_n t_n - W[:, P] s[P]) / N``.

    ``sums`` (``s``) and ``count`` (``N``) are the consumer's inputs over the target's tokens. It
    is the least-squares intercept of ``t_n ~ W[:, P] h_n[P] + d``; for the target ``t_n = W h_n``
    it is FLAP's mean bias ``W[:, R] mean[R]``.
    """
    kept = kept.to(weight.device)
    kept_part = times_float64(weight[:, kept], sums.to(weight.device, torch.float64)[kept], out=None)
    return (target.sums.to(kept_part) - kept_part) / max(count, 1)


def retarget_refit(weight: Tensor, refit: Moments, gram: Tensor, target: TargetMoments) -> TargetMoments:
    """The target moments that make a method's damped refit (SlimGPT's) reproduce ``target``.

    The refit on the damped Gram matrix ``G + diag(d)`` solves ``W'[G + diag(d)]_PP = W [G + diag(d)]_:P``:
    its right-hand side is the target's cross moment ``W G[:, P]`` plus ``W[:, P] diag(d_P)``,
    the damping's pull towards the kept weights. Towards another target ``t`` it keeps that pull
    beside ``sum_n t_n h_n[P]^T``, so that with ``t_n = W h_n`` it is the method's refit again.
    ``gram`` is the undamped ``G`` (the damping is the difference of the diagonals).

    The pull is added into ``target.cross`` in place (an O x H float64 copy saved): the target's
    moments are spent by the refit, as the Gram matrix is by the final solve.
    """
    cross = target.cross
    if target.sketched:
        raise ValueError("a refit needs the whole cross moment, not a fold's sketched one")
    pull = (refit.gram.diagonal().to(torch.float64) - gram.diagonal().to(torch.float64)).to(cross.device)
    for rows in blocks_of(weight.shape[0], weight.shape[1]):
        cross[rows] += weight[rows].to(cross.device, torch.float64) * pull
    return TargetMoments(cross, target.sums, target.sq, target.sketch_sq)


def add_bias(bias: Tensor | None, shift: Tensor | None) -> Tensor | None:
    if shift is None:
        return bias
    return shift if bias is None else bias.to(shift) + shift


def output_error(weight: Tensor, fit: ConsumerFit, kept: Tensor, moments: Moments) -> float:
    """``sum_n ||W h_n + b - (W' h_n[P] + b')||^2`` over the tokens summarised by ``moments``.

    With ``D = W - W' S`` (``S`` selects the kept features) and ``d = b' - b`` the residual is
    ``D h_n - d``, so the error is ``tr(D G D^T) - 2 d^T D s + N |d|^2``: no activations needed.
    """
    gram = moments.gram.to(torch.float64)
    d_mat = weight.to(gram).clone()
    d_mat[:, kept.to(gram.device)] -= fit.weight.to(gram)
    err = (d_mat @ gram * d_mat).sum()
    if fit.bias_shift is not None:
        d = fit.bias_shift.to(gram)
        err = err - 2 * d @ (d_mat @ moments.sums.to(gram)) + moments.count * d.square().sum()
    return float(err)


@dataclass(frozen=True)
class LambdaChoice:
    """Outcome of choosing the ridge penalty on held-out folds."""

    lam: float  # the penalty with the lowest held-out error
    heldout_error: float  # its summed held-out output error
    plain_error: float  # held-out error of the uncompensated consumer
    errors: dict[float, float]  # the held-out error of every candidate scored

    @property
    def compensate(self) -> bool:
        """The guard: compensate only where it beats the uncompensated consumer on held-out data."""
        return self.heldout_error < self.plain_error


class CrossValidation:
    """Held-out output errors of a consumer's fits, from per-fold moments: solves only, no activations.

    For fold ``f`` a fit uses the other folds (``total - fold``) and is scored on ``f`` against
    a target ``t`` (``W h`` for ``"pruned"``, else the fold's :class:`TargetMoments`):
    ``err_f = sum |t|^2 - 2 <W', C_f[:, P]> + <W', W' G_f[P, P]>`` with ``C_f = sum t h^T``,
    plus the bias terms ``-2 d^T (sum t - W' s_f[P]) + N_f |d|^2``. The products with each
    fold are computed once, so each (fold, lambda) costs one K x K factorisation, shared by
    every target the fits are trained towards (their right-hand sides are solved together).

    Every quantity is linear in the output rows, so a consumer with more than
    :data:`SKETCH_ROWS` outputs is scored on ``S W`` and ``S t`` (:func:`output_sketch`): the
    errors are then unbiased estimates (the same sketch for every candidate and for the
    uncompensated consumer), at a fraction of the cost.
    """

    def __init__(
        self,
        weight: Tensor,
        folds: list[Moments],
        kept: Tensor,
        fit: str,
        mean_bias: bool,
        prior: str = "zero",
        targets: dict[str, list[TargetMoments]] | None = None,
        where: str = "",
    ) -> None:
        sketch = output_sketch(weight.shape[0], weight.device)
        if sketch is None:
            w = weight.to(torch.float64)
        else:  # S W, a block of W's columns at a time
            w = torch.empty(sketch.shape[0], weight.shape[1], dtype=torch.float64, device=weight.device)
            map_columns(weight, w, lambda part: sketch @ part)
        kept = kept.to(w.device)
        self.fit, self.prior, self.where = fit, prior, where
        self.folds, self.kept = folds, kept
        self.stats: list[dict] = []
        self.full_gram_pp = None  # the folds' total G[P, P]; each fold's own is gathered when it is used
        for i, fold in enumerate(folds):
            sums = fold.sums.to(w)
            # W G, a block of G's columns at a time (brought over from where the statistics live)
            w_gram = map_columns(fold.gram, torch.empty_like(w), lambda part: w @ part)
            products = {"pruned": (w_gram[:, kept], w @ sums, float((w_gram * w).sum()))}
            del w_gram
            for name, per_fold in (targets or {}).items():
                t = per_fold[i]
                cross = torch.empty(w.shape[0], len(kept), dtype=torch.float64, device=w.device)
                on_sketch = None if sketch is None or t.sketched else (lambda part: sketch @ part)
                map_columns(t.cross, cross, on_sketch, kept)  # S C[:, P]
                t_sums = t.sums.to(w)
                products[name] = (
                    cross,
                    t_sums if sketch is None else sketch @ t_sums,
                    t.sq if sketch is None else t.sketch_sq,
                )
            self.stats.append({"sums_p": sums[kept], "count": fold.count, **products})
            block = self.fold_gram_pp(i)
            self.full_gram_pp = block if self.full_gram_pp is None else self.full_gram_pp.add_(block)
            del block
        self.targets = ("pruned", *(targets or {}))
        small = ("sums_p", "count")
        self.full = {k: sum(f[k] for f in self.stats) for k in small}
        for name in self.targets:
            self.full[name] = tuple(sum(f[name][j] for f in self.stats) for j in (0, 1))
        self.w_kept = w[:, kept]
        # each fold's fit uses the other folds
        self.trains = [
            {k: self.full[k] - f[k] for k in small}
            | {name: tuple(self.full[name][j] - f[name][j] for j in (0, 1)) for name in self.targets}
            for f in self.stats
        ]
        # W[:, R] mean[R] = (W s - W[:, P] s[P]) / N over the training tokens
        self.shifts = [
            (t["pruned"][1] - self.w_kept @ t["sums_p"]) / max(t["count"], 1) if mean_bias else None
            for t in self.trains
        ]
        # Per (fold, lambda): each (fit target, scored target)'s error terms. A fold's fits are
        # scored on every target as soon as they are solved and then dropped, so no more than one
        # fold's fits are alive (keeping them cost candidates x folds x targets O x K floats).
        self._terms: dict[tuple[int, float | None], dict[tuple[str, str], tuple[float, float | None]]] = {}
        self._errors: dict[tuple[float | None, str, str], float] = {}

    def fold_gram_pp(self, i: int) -> Tensor:
        """Fold ``i``'s ``G[P, P]``, gathered where its Gram matrix lives and brought to the solves' device."""
        k = len(self.kept)
        out = torch.empty(k, k, dtype=torch.float64, device=self.kept.device)
        return gather_kept(self.folds[i].gram, self.kept, out)

    def _system(self, i: int, names: tuple[str, ...], fold_gram_pp: Tensor) -> RidgeSystem:
        # The training matrix (total minus fold) is written into the system's own matrix, which
        # its factor then overwrites: besides the total and the fold's G[P, P] it is the one
        # K x K alive. The subtraction costs K^2 against the factorisation's K^3 / 3.
        t = self.trains[i]
        rhs = torch.cat([t[name][0] for name in names]) if len(names) > 1 else t[names[0]][0]
        rhs_sums = torch.cat([t[name][1] for name in names]) if len(names) > 1 else t[names[0]][1]
        affine = self.fit == "affine"
        if affine:
            rhs = torch.cat([rhs, rhs_sums.unsqueeze(1)], dim=1)
        owns_rhs = affine or len(names) > 1  # else rhs is the fold's stored product, used again
        prior = None
        if self.prior == "pruned":
            prior = self.w_kept.repeat(len(names), 1) if len(names) > 1 else self.w_kept

        def fill_gram(out: Tensor) -> None:
            torch.sub(self.full_gram_pp, fold_gram_pp, out=out)

        return RidgeSystem(fill_gram, t["sums_p"] if affine else None, t["count"], rhs, len(self.kept), prior, owns_rhs)

    def candidate(self, i: int, lam: float | None, fold_gram_pp: Tensor) -> dict[str, ConsumerFit]:
        """Fold ``i``'s fits at ``lam`` on the training folds, by target (``None``: the uncompensated consumer);
        ``fold_gram_pp`` is the fold's ``G[P, P]``."""
        if lam is None:
            return dict.fromkeys(self.targets, ConsumerFit(self.w_kept, self.shifts[i]))
        solved = self._system(i, self.targets, fold_gram_pp).solve(lam, self.where)  # one factorisation
        rows = self.w_kept.shape[0]
        fits = {}
        for j, name in enumerate(self.targets):
            part = slice(j * rows, (j + 1) * rows)
            bias = solved.bias_shift[part] if solved.bias_shift is not None else None
            if self.fit == "seed":
                bias = self.shifts[i]
            fits[name] = ConsumerFit(solved.weight[part], bias, solved.jitter)
        return fits

    def score(self, lams: Sequence[float | None]) -> None:
        """Solve and score every candidate of ``lams`` not scored yet, a fold at a time (None: the uncompensated
        consumer), so that each fold's ``G[P, P]`` is gathered once for all of them; the scores are the same."""
        for i in range(len(self.stats)):
            todo = [lam for lam in dict.fromkeys(lams) if (i, lam) not in self._terms]
            if todo:
                gram_pp = self.fold_gram_pp(i)
                for lam in todo:
                    self._fold_terms(i, lam, gram_pp)
                del gram_pp

    def _fold_terms(self, i: int, lam: float | None, gram_pp: Tensor) -> None:
        """Fold ``i``'s held-out error of each target's fit at ``lam`` against each target (weight term, bias term),
        into ``_terms``; ``gram_pp`` is the fold's ``G[P, P]``."""
        f, terms = self.stats[i], {}
        for target, c in self.candidate(i, lam, gram_pp).items():
            new_w = c.weight
            quadratic = float((new_w @ gram_pp * new_w).sum())  # the same whatever it is scored on
            for score_on in self.targets:
                cross, t_sums, sq = f[score_on]
                weight_term = sq - 2 * float((new_w * cross).sum()) + quadratic
                bias_term = None
                if c.bias_shift is not None:
                    d = c.bias_shift
                    bias_term = -2 * float(d @ (t_sums - new_w @ f["sums_p"])) + f["count"] * float(d.square().sum())
                terms[(target, score_on)] = (weight_term, bias_term)
            if lam is None:  # the uncompensated consumer is the same for every target
                terms |= {(other, s): terms[(target, s)] for other in self.targets for s in self.targets}
                break
        self._terms[(i, lam)] = terms

    def heldout_error(self, lam: float | None, target: str = "pruned", score_on: str | None = None) -> float:
        """Summed held-out error of the fit towards ``target`` at ``lam``, against ``score_on`` (default: ``target``)."""
        score_on = score_on or target
        key = (lam, target if lam is not None else "plain", score_on)
        if key in self._errors:
            return self._errors[key]
        self.score([lam])
        err = 0.0
        for i in range(len(self.stats)):
            weight_term, bias_term = self._terms[(i, lam)][(target, score_on)]
            err += weight_term
            if bias_term is not None:
                err += bias_term
        self._errors[key] = err
        return err

    def choose(
        self, target: str = "pruned", grid: tuple[float, ...] = LAMBDA_GRID, search: str = "local", start=None
    ) -> LambdaChoice:
        """The lambda of ``grid`` with the lowest held-out error towards ``target`` (full or local search)."""
        if search not in LAMBDA_SEARCHES:
            raise ValueError(f"search must be one of {LAMBDA_SEARCHES}, got {search!r}")
        score = lambda lam: self.heldout_error(lam, target)  # noqa: E731
        # each batch of candidates is solved a fold at a time, with the uncompensated consumer (the guard's yardstick)
        batch = lambda lams: self.score([*lams, None])  # noqa: E731
        if search == "full":
            batch(grid)
            errors = {lam: score(lam) for lam in grid}
        else:
            errors = grid_descent(score, grid, LAMBDA_START if start is None else start, batch)
        best = min(errors, key=errors.get)
        return LambdaChoice(best, errors[best], self.heldout_error(None, score_on=target), errors)


def choose_lambda(
    weight: Tensor,
    folds: list[Moments],
    kept: Tensor,
    fit: str,
    mean_bias: bool,
    grid: tuple[float, ...] = LAMBDA_GRID,
    where: str = "",
    prior: str = "zero",
    search: str = "local",
    start: float | None = None,
    target: str = "pruned",
    target_folds: list[TargetMoments] | None = None,
) -> LambdaChoice:
    """K-fold cross-validation of the ridge penalty from per-fold moments (:class:`CrossValidation`).

    ``fit`` is one of :data:`grail.config.FITS`; ``mean_bias`` adds FLAP's mean bias (from the
    training folds) to the uncompensated consumer and to the ``seed`` fit. The uncompensated
    consumer is scored the same way, for the guard. ``target`` names what the fits reproduce
    and are scored against: ``"pruned"`` (``W h``), else ``target_folds`` hold its moments.

    ``search="full"`` scores every candidate of ``grid``; ``"local"`` descends the grid from
    ``start`` (an earlier consumer's choice, else :data:`LAMBDA_START`) to the nearest local
    minimum of the held-out error (:func:`grid_descent`), scoring 3 candidates plus one per
    step away from ``start`` (2 at an end of the grid, at most all of them).
    The scores it computes are the same numbers; its choice equals the full search's whenever
    the held-out error has one valley along the grid. ``errors`` holds the scored candidates.
    """
    targets = {target: target_folds} if target != "pruned" else None
    cv = CrossValidation(weight, folds, kept, fit, mean_bias, prior, targets, where)
    return cv.choose(target, grid, search, start)


@dataclass(frozen=True)
class TargetChoice:
    """Outcome of ``--grail_target auto``: each target's own choice, and all of them scored on one yardstick."""

    target: str | None  # the target with the lowest yardstick error; None: the uncompensated consumer wins
    lam: float | None
    choices: dict[str, LambdaChoice]  # each target's held-out choice of lambda (scored on its own target)
    errors: dict[str, float]  # each target's choice scored against the yardstick (plain pruning where guarded)
    plain_error: float  # the uncompensated consumer against the yardstick


def choose_target(
    weight: Tensor,
    folds: list[Moments],
    kept: Tensor,
    fit: str,
    mean_bias: bool,
    target_folds: dict[str, list[TargetMoments]],
    grid: tuple[float, ...] = LAMBDA_GRID,
    where: str = "",
    prior: str = "zero",
    search: str = "local",
    start: float | None = None,
    yardstick: str = "residual",
) -> TargetChoice:
    """Choose the fit target per consumer on held-out folds.

    Each target (``"pruned"`` and those of ``target_folds``) first chooses its lambda and its
    guard on its own target, exactly as with that target alone; then every target's result
    (its fit, or plain pruning where its guard kept it) and plain pruning are scored against
    the ``yardstick`` target on the same held-out folds, and the lowest wins. The single-target
    choice of ``"pruned"`` is among the candidates, so the winner's held-out yardstick error
    is never above it.
    """
    cv = CrossValidation(weight, folds, kept, fit, mean_bias, prior, target_folds, where)
    choices = {name: cv.choose(name, grid, search, start) for name in cv.targets}
    plain = cv.heldout_error(None, score_on=yardstick)
    errors = {name: cv.heldout_error(c.lam, name, yardstick) if c.compensate else plain for name, c in choices.items()}
    best = min(errors, key=errors.get)
    if not errors[best] < plain:
        return TargetChoice(None, None, choices, errors, plain)
    return TargetChoice(best, choices[best].lam, choices, errors, plain)


def grid_descent(
    score: Callable[[float], float],
    grid: Sequence[float],
    start: float,
    prefetch: Callable[[list[float]], object] | None = None,
) -> dict[float, float]:
    """The scores of the grid points a descent from ``start`` visits, in grid order.

    From the grid point nearest ``start`` (on a log scale) it moves to the lower of the two
    neighbours while one is lower, and stops where neither is. Comparisons are of (score,
    position), so equal scores count as lower on the side of the smaller grid value, as
    ``min`` over the full grid breaks ties, and a NaN score counts as infinite. When the
    scores along the grid fall strictly to their minimum and then rise or stay (one valley),
    the stop is the grid's minimum, found with ``3 + distance`` scores (2 + distance at an end
    of the grid) instead of ``len(grid)``; where they have several valleys (or a flat stretch
    on the falling side) it is the bottom of the valley ``start`` lies in. ``prefetch`` is given
    the grid values of each step that are not scored yet, before ``score`` is asked for them
    (all three at the first step, one after), so that they can be computed together.
    """
    smallest = min((v for v in grid if v > 0), default=1.0)
    position = lambda v: math.log10(v) if v > 0 else math.log10(smallest) - 1  # noqa: E731 (0: a decade below)
    nearest = min(range(len(grid)), key=lambda i: abs(position(grid[i]) - position(start)))
    scores: dict[int, float] = {}

    def key(i: int) -> tuple[float, int]:
        if i not in scores:
            scores[i] = score(grid[i])
        return (math.inf if math.isnan(scores[i]) else scores[i], i)

    here = nearest
    while True:
        step = [i for i in (here - 1, here, here + 1) if 0 <= i < len(grid)]
        if prefetch is not None and any(i not in scores for i in step):
            prefetch([grid[i] for i in step if i not in scores])
        lowest = min(step, key=key)
        if lowest == here:
            break
        here = lowest
    return {grid[i]: scores[i] for i in sorted(scores)}
