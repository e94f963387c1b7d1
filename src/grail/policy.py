"""The compensation policy: a block's decision and statistics in, the consumer's new weights out.

One place decides what a consumer (``o_proj`` or ``down_proj``) becomes once some of its
input units are gone:

* *plain pruning*: the kept columns as they are, plus the method's mean bias where the method
  and ``--bias_compensation`` allow it; or the method's own update (SlimGPT's refit);
* *GRAIL*: the ridge fit of :mod:`grail.compensate` with the configured fit, lambda, prior and
  target; with ``--ridge_lambda auto`` the lambda is chosen on held-out folds and the guard
  keeps plain pruning where compensation does not help; with ``--grail_target auto`` the
  target is chosen there too.

The engine calls it for every pruned block, and again after a method's layer transforms
when compensation waits for them (Wanda++'s regional optimisation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from torch import Tensor

from grail.compensate import (
    Moments,
    add_bias,
    choose_lambda,
    choose_target,
    fit_consumer,
    mean_bias_shift,
    retarget_refit,
    target_mean_shift,
)
from grail.config import PruneConfig
from grail.methods.base import Method
from grail.stats import InputStats, TargetStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumerUpdate:
    """A consumer's new weight (O x K, over the kept columns), its bias, and notes for the report."""

    weight: Tensor
    bias: Tensor | None
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CompensationPolicy:
    """How consumers are updated after pruning; built from a :class:`PruneConfig`."""

    compensate: bool = False
    ridge_lambda: float | str = 0.001
    prior: str = "zero"
    fit: str = "affine"
    bias_compensation: bool = True
    cv_folds: int = 4
    lambda_search: str = "local"
    target: str = "pruned"

    @classmethod
    def from_config(cls, config: PruneConfig) -> CompensationPolicy:
        return cls(
            config.compensate,
            config.ridge_lambda,
            config.prior,
            config.grail_fit,
            config.bias_compensation,
            config.cv_folds,
            config.lambda_search,
            config.grail_target,
        )

    @property
    def folds(self) -> int:
        """Folds the Gram statistics are kept in (several only for the held-out choice of lambda)."""
        return self.cv_folds if self.compensate and self.ridge_lambda == "auto" else 1

    @property
    def dense_targets(self) -> tuple[str, ...]:
        """Targets whose moments come from the dense model's activations (none for ``pruned``).

        Without compensation they retarget the method's own update (:meth:`plain`).

        ``auto`` chooses between ``pruned`` and ``residual`` only: offered ``dense`` too, its
        per-block yardstick chose it for most consumers, and ``dense`` is the worst target for the
        whole model (SmolLM2, 16 x 256 windows: Wanda-SP 50% 337 against 280 without it, 70%
        1755 against 560, FLAP 50% 388 against 260; see the README)."""
        if self.target == "pruned":
            return ()
        return ("residual",) if self.target == "auto" else (self.target,)

    @property
    def affine(self) -> bool:
        """Whether the fit has an intercept (which becomes a bias)."""
        return self.fit == "affine" and self.bias_compensation

    def makes_own_update(self, method: Method) -> bool:
        """Whether plain pruning with ``method`` changes the consumer beyond dropping columns (what a
        dense-model target retargets without compensation)."""
        return method.selector.refits or (self.bias_compensation and method.selector.mean_bias)

    def plain(
        self,
        weight: Tensor,
        bias: Tensor | None,
        kept_columns: Tensor,
        selection: InputStats | None,
        mean_bias: bool,
        refit: Moments | None = None,
        target: TargetStats | None = None,
        target_inputs: InputStats | None = None,
    ) -> ConsumerUpdate:
        """Plain pruning: the kept columns (and the mean bias), or the least-squares refit on ``refit``.

        ``refit`` is a method's own update (SlimGPT's Optimal Brain Surgeon steps end at the
        unpenalised least-squares refit of the kept columns on its damped Hessian).

        With ``target`` (a dense-model target's moments) the method's own update reproduces it
        instead of the consumer's output on the pruned model's activations: the mean bias becomes
        :func:`target_mean_shift` (``target_inputs``: the pruned model's consumer inputs over the
        target's tokens), the refit :func:`retarget_refit`.
        """
        kept_columns = kept_columns.to(weight.device)
        if refit is not None:
            moments = None
            if target is not None:  # one fold's sums; the refit adds its damping into the cross moment in place
                target.merge_folds()
                moments = retarget_refit(weight, refit, selection.gram, target.moments())
            fit = fit_consumer(weight, refit, kept_columns, 0.0, affine=self.bias_compensation, target=moments)
            return ConsumerUpdate(fit.weight, add_bias(bias, fit.bias_shift))
        shift = None
        if mean_bias and target is not None:
            shift = target_mean_shift(weight, target.moments(), target_inputs.sum, target_inputs.count, kept_columns)
        elif mean_bias:
            shift = mean_bias_shift(weight, selection.mean, kept_columns)
        return ConsumerUpdate(weight[:, kept_columns], add_bias(bias, shift))

    def _held_out_choice(
        self,
        weight: Tensor,
        kept_columns: Tensor,
        gram_stats: InputStats,
        targets: dict[str, TargetStats],
        mean_bias: bool,
        where: str,
        start_lambda: float | None,
    ) -> tuple[str | None, float, dict]:
        """``--ridge_lambda auto`` (and ``--grail_target auto``): (target, or None where the guard keeps
        plain pruning; lambda; the report's notes)."""
        fit_name = "affine" if self.affine else ("seed" if self.fit == "seed" else "linear")
        folds = gram_stats.fold_moments()
        target_folds = {name: stats.fold_moments() for name, stats in targets.items()}
        common = {"where": where, "prior": self.prior, "search": self.lambda_search, "start": start_lambda}
        if self.target == "auto":
            picked = choose_target(weight, folds, kept_columns, fit_name, mean_bias, target_folds, **common)
            target = picked.target
            choice = picked.choices[target or "pruned"]
            extra = {
                "target": target or "plain",
                "target_heldout_errors": picked.errors | {"plain": picked.plain_error},
                "target_lambdas": {name: c.lam for name, c in picked.choices.items()},
            }
        else:
            choice = choose_lambda(
                weight, folds, kept_columns, fit_name, mean_bias, target=self.target,
                target_folds=target_folds.get(self.target), **common,
            )  # fmt: skip
            target = self.target if choice.compensate else None
            extra = {"target": self.target} if self.target != "pruned" else {}
        notes = {
            "lambda": choice.lam,
            "heldout_error": choice.heldout_error,
            "plain_heldout_error": choice.plain_error,
            "compensated": target is not None,
            "heldout_errors": {f"{lam:g}": err for lam, err in choice.errors.items()},
        }
        return target, choice.lam, notes | extra

    def update(
        self,
        weight: Tensor,
        bias: Tensor | None,
        kept_columns: Tensor,
        selection: InputStats | None,
        gram_stats: InputStats | None,
        mean_bias: bool,
        where: str,
        refit: Moments | None = None,
        start_lambda: float | None = None,
        targets: dict[str, TargetStats] | None = None,
        target_inputs: InputStats | None = None,
    ) -> ConsumerUpdate:
        """The consumer after pruning: compensated when the policy says so, else plain pruning.

        ``start_lambda`` is where the local search of ``--ridge_lambda auto`` starts (the same
        consumer's choice in the previous layer: neighbouring layers choose alike).
        ``targets`` hold the moments of :attr:`dense_targets`, by name; without compensation they
        retarget the method's own update (:meth:`plain`, with ``target_inputs``).
        """
        if not self.compensate:
            own_target = (targets or {}).get(self.target)
            plain = self.plain(weight, bias, kept_columns, selection, mean_bias, refit, own_target, target_inputs)
            return replace(plain, notes={"target": self.target}) if own_target is not None else plain
        started = time.perf_counter()
        kept_columns = kept_columns.to(weight.device)
        notes: dict = {}
        lam, target = self.ridge_lambda, self.target
        if lam == "auto":
            target, lam, notes = self._held_out_choice(
                weight, kept_columns, gram_stats, targets or {}, mean_bias, where, start_lambda
            )
            for stats in (gram_stats, *(targets or {}).values()):
                stats.merge_folds()  # the folds are done with: their total needs no matrix of its own
            if target is None:  # the guard: keep the uncompensated consumer
                plain = self.plain(weight, bias, kept_columns, selection, mean_bias, refit)
                notes["solve_s"] = round(time.perf_counter() - started, 4)
                return ConsumerUpdate(plain.weight, plain.bias, notes)
        elif target != "pruned":
            notes["target"] = target
        target_moments = targets[target].moments() if target != "pruned" else None
        # This solve is the Gram matrix's last use: its system is made in the Gram matrix's memory.
        fit = fit_consumer(
            weight,
            gram_stats.moments(),
            kept_columns,
            lam,
            self.affine,
            where,
            self.prior,
            target_moments,
            gram_is_spent=True,
        )
        gram_stats.drop_gram()
        if fit.jitter:
            log.info(
                "%s: kept units' Gram matrix singular; solved with jitter %.0e x its mean diagonal", where, fit.jitter
            )
        shift = fit.bias_shift
        if self.fit == "seed" and mean_bias:  # the research code's convention: mean bias on top
            shift = add_bias(shift, mean_bias_shift(weight, selection.mean, kept_columns))
        notes.update({"lambda": lam, "jitter": fit.jitter, "solve_s": round(time.perf_counter() - started, 4)})
        return ConsumerUpdate(fit.weight, add_bias(bias, shift), notes)
