"""The pure mathematics: statistics, scores, units, allocation, and the compensation solve,
checked against hand-computed cases and slow, obviously correct references."""

from __future__ import annotations

import itertools

import pytest
import torch

from grail.compensate import (
    LAMBDA_GRID,
    ConsumerFit,
    CrossValidation,
    cholesky_solve_,
    choose_lambda,
    factor_spd,
    fit_consumer,
    grid_descent,
    mean_bias_shift,
    output_error,
    solve_spd,
)
from grail.methods.base import uniform_allocation
from grail.methods.scores import magnitude_scores, wanda_scores
from grail.models.arch import LayerShape
from grail.stats import InputStats, NonFiniteStatisticsError
from grail.units import attention_units, mlp_units, top_units


@pytest.fixture(autouse=True)
def _float64():
    """The references here are exact; compute them in float64 (restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _stats(x: torch.Tensor, gram: bool = True) -> InputStats:
    s = InputStats(x.shape[-1], gram=gram)
    s.update(x)
    return s


def _data(n=400, h=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(h, h, generator=g)
    return torch.randn(n, h, generator=g) @ mix + torch.randn(h, generator=g)  # correlated, non-zero mean


# ---------------------------------------------------------------- statistics


def test_stats_match_direct_computation():
    x = _data()
    s = InputStats(x.shape[1], gram=True, n_folds=3)
    for i, chunk in enumerate(x.split(50)):
        s.update(chunk, fold=i % 3)
    assert s.count == len(x)
    torch.testing.assert_close(s.mean, x.mean(0))
    torch.testing.assert_close(s.variance, x.var(0, unbiased=True))
    torch.testing.assert_close(s.norm, x.norm(dim=0))
    torch.testing.assert_close(s.gram, x.T @ x)
    assert sum(s.fold_counts) == len(x)


def test_gram_and_cross_moments_accumulate_in_token_chunks(monkeypatch):
    """A batch's tokens are added a few at a time (no float64 copy of the whole batch): the same sums."""
    import grail.stats
    from grail.stats import TargetStats, token_chunks

    x, t = _data(), _data(seed=31)[:, :4]
    whole, whole_target = InputStats(x.shape[1], gram=True), TargetStats(4, x.shape[1])
    monkeypatch.setattr("grail.compensate.BLOCK_ELEMENTS", 7 * x.shape[1])
    monkeypatch.setattr("grail.stats.MIN_CHUNK_TOKENS", 1)
    assert [c.stop - c.start for c in token_chunks(50, x.shape[1])] == [7] * 7 + [1]
    chunked, chunked_target = InputStats(x.shape[1], gram=True), TargetStats(4, x.shape[1])
    added = []
    add_product = grail.stats._add_product
    monkeypatch.setattr(
        "grail.stats._add_product", lambda total, a, b: added.append(len(a)) or add_product(total, a, b)
    )
    for batch, target in zip(x.split(50), t.split(50), strict=True):
        chunked.update(batch)
        chunked_target.update(target, batch)
    assert max(added) == 7 and sum(added) == 2 * len(x)  # every token once, 7 at a time, Gram and cross moment
    monkeypatch.undo()
    for batch, target in zip(x.split(50), t.split(50), strict=True):
        whole.update(batch)
        whole_target.update(target, batch)
    for a, b in ((chunked.gram, whole.gram), (chunked.sum, whole.sum), (chunked.sq_sum, whole.sq_sum)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    chunked_m, whole_m = chunked_target.moments(), whole_target.moments()
    torch.testing.assert_close(chunked_m.cross, whole_m.cross, rtol=1e-14, atol=0)
    torch.testing.assert_close(chunked_m.sums, whole_m.sums, rtol=1e-14, atol=0)
    assert chunked_m.sq == pytest.approx(whole_m.sq, rel=1e-14)
    torch.testing.assert_close(chunked.gram, x.T @ x)


def test_products_for_another_dtype_or_device_are_added_in_row_blocks(monkeypatch):
    """Where the Gram matrix is of another dtype than the batch (float32 products on CUDA) the product is made a
    few rows at a time; in the batch's own dtype it is added in place. Both give the same sums."""
    from grail.stats import _add_product

    x = _data().float()
    in_place, blocked = torch.zeros(10, 10, dtype=torch.float32), torch.zeros(10, 10, dtype=torch.float64)
    monkeypatch.setattr("grail.compensate.BLOCK_ELEMENTS", 2 * x.shape[1])  # two rows at a time
    calls = []
    monkeypatch.setattr(torch.Tensor, "add_", lambda self, other: calls.append(len(self)) or self.copy_(self + other))
    _add_product(in_place, x, x)
    assert calls == []  # in place
    _add_product(blocked, x, x)
    assert calls == [2] * 5
    torch.testing.assert_close(blocked, in_place.double(), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(blocked, x.double().T @ x.double(), rtol=1e-6, atol=1e-3)


def test_variance_is_not_the_aliased_running_update():
    # A large mean next to a small spread: the correct sample variance is exactly 1.
    x = torch.tensor([[1000.0], [1001.0], [1002.0]])
    assert _stats(x, gram=False).variance.item() == pytest.approx(1.0, abs=1e-9)


def test_nan_in_statistics_names_the_layer():
    s = _stats(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(NonFiniteStatisticsError, match=r"layer 3 mlp\.down_proj"):
        s.check_finite("layer 3 mlp.down_proj")


# ---------------------------------------------------------------- scores


def test_magnitude_and_wanda_scores_by_hand():
    w = torch.tensor([[3.0, -1.0], [4.0, 0.0]])
    torch.testing.assert_close(magnitude_scores(w), torch.tensor([5.0, 1.0]))
    x = torch.tensor([[1.0, 2.0], [0.0, 2.0]])  # column norms 1 and sqrt(8)
    # mean_i |W_ij| = (3.5, 0.5); times ||X_j||
    torch.testing.assert_close(wanda_scores(w, _stats(x, gram=False)), torch.tensor([3.5, 0.5 * 8**0.5]))


# ---------------------------------------------------------------- units and allocation

SHAPE = LayerShape(hidden_size=10, head_dim=2, num_heads=6, num_kv_heads=2, intermediate_size=7)


def test_group_units_own_their_query_heads_and_columns():
    units = attention_units(SHAPE, "group")
    assert units.heads.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert units.columns[1].tolist() == [6, 7, 8, 9, 10, 11]
    # 3 query heads (q rows + o columns) + one k and one v head: (3*2*10)*2 + 2*2*10
    assert units.cost == 160


def test_query_bundles_take_one_head_per_group_least_important_first():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.0, 9.0, 2.0])  # group 0: heads 0,1,2; group 1: 3,4,5
    units = attention_units(SHAPE, "query", head_scores=scores)
    assert units.heads.tolist() == [[1, 3], [2, 5], [0, 4]]
    assert units.cost == 2 * (2 * 10) * 2  # two query heads: q rows + o columns
    torch.testing.assert_close(
        units.unit_scores(torch.arange(12.0)), torch.tensor([2 + 3 + 6 + 7, 4 + 5 + 10 + 11, 0 + 1 + 8 + 9.0])
    )


def test_multi_head_units_are_heads_in_both_modes():
    mha = LayerShape(10, 2, 4, 4, 7)
    for mode in ("group", "query"):
        assert attention_units(mha, mode, head_scores=torch.zeros(4)).heads.tolist() == [[0], [1], [2], [3]]


def test_top_units_breaks_ties_by_index():
    assert top_units(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2).tolist() == [1, 2]
    assert top_units(torch.tensor([2.0, 2.0, 2.0]), 2).tolist() == [0, 1]


def test_uniform_allocation_meets_the_layer_budget():
    attn, mlp = attention_units(SHAPE, "group"), mlp_units(SHAPE)
    layer_params = 2 * attn.cost + 7 * mlp.cost  # 320 + 210 = 530
    # ratio 0.5: round(0.5 * 2) = 1 group (160); MLP takes round((265 - 160) / 30) = 4 channels
    assert uniform_allocation(0.5, attn, mlp, layer_params) == (1, 4)
    # every block keeps one unit, whatever the ratio
    assert uniform_allocation(0.99, attn, mlp, layer_params) == (1, 6)
    # a fixed attention count (FLAP UL-MM): the MLP alone makes up the difference
    assert uniform_allocation(0.5, attn, mlp, layer_params, n_attention=0) == (0, 6)


# ---------------------------------------------------------------- compensation


def _fit(x, w, kept, lam, affine):
    return fit_consumer(w, _stats(x).moments(), kept, lam, affine)


def _lstsq_reference(x, w, kept, affine):
    """Least-squares fit of the consumer output from the kept inputs, on stored activations."""
    design = x[:, kept]
    if affine:
        design = torch.cat([design, torch.ones(len(x), 1)], dim=1)
    sol = torch.linalg.lstsq(design, x @ w.T).solution
    return (sol[: len(kept)].T, sol[len(kept)] if affine else None)


@pytest.mark.parametrize("affine", [False, True])
def test_lambda_zero_equals_least_squares_on_stored_activations(affine):
    x, w = _data(), torch.randn(6, 10, generator=torch.Generator().manual_seed(5))
    kept = torch.tensor([0, 2, 3, 7, 8])
    fit = _fit(x, w, kept, 0.0, affine)
    ref_w, ref_b = _lstsq_reference(x, w, kept, affine)
    torch.testing.assert_close(fit.weight, ref_w, rtol=1e-8, atol=1e-8)
    if affine:
        torch.testing.assert_close(fit.bias_shift, ref_b, rtol=1e-8, atol=1e-8)
    else:
        assert fit.bias_shift is None


def test_ridge_equals_augmented_least_squares():
    x = _data()
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(8))
    kept = torch.tensor([1, 4, 5, 9])
    lam = 0.3
    gram = x.T @ x
    penalty = lam * gram[kept][:, kept].diagonal().mean()
    # B = argmin ||X - X_P B^T||^2 + penalty ||B||^2, solved as one stacked least-squares problem
    design = torch.cat([x[:, kept], penalty.sqrt() * torch.eye(len(kept))])
    target = torch.cat([x, torch.zeros(len(kept), x.shape[1])])
    b_ref = torch.linalg.lstsq(design, target).solution.T
    torch.testing.assert_close(_fit(x, w, kept, lam, False).weight, w @ b_ref, rtol=1e-8, atol=1e-8)


def test_exact_reconstruction_when_removed_units_are_combinations_of_kept():
    g = torch.Generator().manual_seed(2)
    kept_part = torch.randn(300, 6, generator=g)
    removed_part = kept_part @ torch.randn(6, 3, generator=g) + 0.7  # affine in the kept units
    x = torch.cat([kept_part, removed_part], dim=1)
    w = torch.randn(5, 9, generator=g)
    kept = torch.arange(6)
    fit = _fit(x, w, kept, 0.0, True)
    dense, pruned = x @ w.T, x[:, kept] @ fit.weight.T + fit.bias_shift
    assert (pruned - dense).norm() / dense.norm() < 1e-4


@pytest.mark.parametrize("seed", range(5))
def test_lambda_zero_compensation_is_never_worse_than_plain_pruning(seed):
    x = _data(n=200, h=12, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(7, 12, generator=g)
    kept = torch.randperm(12, generator=g)[:6].sort().values
    moments = _stats(x).moments()
    plain = output_error(w, ConsumerFit(w[:, kept], None), kept, moments)
    for affine in (False, True):
        assert output_error(w, _fit(x, w, kept, 0.0, affine), kept, moments) <= plain * (1 + 1e-12)


def test_output_error_formula_equals_direct_sum():
    x = _data(n=50, h=8)
    g = torch.Generator().manual_seed(3)
    w, new_w, shift = torch.randn(4, 8, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    kept = torch.tensor([0, 1, 3, 4, 6])
    direct = ((x @ w.T) - (x[:, kept] @ new_w.T + shift)).square().sum()
    got = output_error(w, ConsumerFit(new_w, shift), kept, _stats(x).moments())
    assert got == pytest.approx(direct.item(), rel=1e-10)


def test_singular_gram_gets_jitter_and_still_reconstructs():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(100, 4, generator=g)
    x = torch.cat([base, base[:, :1]], dim=1)  # kept columns 0 and 4 are identical
    w = torch.randn(3, 5, generator=g)
    fit = _fit(x, w, torch.arange(5), 0.0, False)
    assert fit.jitter > 0
    assert ((x @ fit.weight.T) - x @ w.T).norm() / (x @ w.T).norm() < 1e-4


def test_factor_in_place_equals_cholesky_and_rebuilds_a_singular_matrix():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(40, 12, generator=g)
    a = x.T @ x
    a = (a + a.T) / 2
    built = []

    def build():
        built.append(a.clone())
        return built[-1]

    factor, jitter = factor_spd(build)
    assert jitter == 0.0 and len(built) == 1
    assert factor.data_ptr() == built[0].data_ptr()  # in place: no second matrix
    torch.testing.assert_close(factor, torch.linalg.cholesky(a), rtol=0, atol=0)
    rhs = torch.randn(12, 5, generator=g)
    torch.testing.assert_close(cholesky_solve_(factor, rhs.clone()), torch.linalg.solve(a, rhs), rtol=1e-9, atol=1e-9)
    # singular: the first attempt overwrote its matrix, so the jittered one is built afresh
    singular = torch.cat([x[:, :6], x[:, :6]], dim=1)
    built.clear()
    a = singular.T @ singular
    factor, jitter = factor_spd(build)
    assert jitter > 0 and len(built) > 1
    rebuilt = a.clone()
    rebuilt.diagonal().add_(jitter * a.diagonal().mean())
    torch.testing.assert_close(factor @ factor.T, rebuilt, rtol=1e-10, atol=1e-10)
    # known to be singular: no attempt without jitter, the same factor
    attempts = len(built)
    built.clear()
    known, known_jitter = factor_spd(build, singular=True)
    assert known_jitter == jitter and len(built) == attempts - 1
    torch.testing.assert_close(known, factor, rtol=0, atol=0)


@pytest.mark.parametrize("affine", [False, True])
def test_a_fit_from_fewer_tokens_than_unknowns_starts_with_jitter(monkeypatch, affine):
    """Unpenalised, the Gram matrix of fewer tokens than kept units (plus the constant) is singular: its solve
    starts at the first jitter; with a penalty, or with as many tokens as unknowns, it starts at none."""
    import grail.compensate as compensate

    calls = []
    real = compensate.factor_spd
    monkeypatch.setattr(compensate, "factor_spd", lambda *a, **k: calls.append(k["singular"]) or real(*a, **k))
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(22))
    kept = torch.arange(8)
    tokens = 8 + affine  # the system's size
    few = _stats(_data(n=tokens - 1, h=10, seed=23)).moments()
    assert fit_consumer(w, few, kept, 0.0, affine).jitter > 0
    fit_consumer(w, few, kept, 1e-3, affine)
    fit_consumer(w, _stats(_data(n=tokens, h=10, seed=23)).moments(), kept, 0.0, affine)
    assert calls == [True, False, False]


@pytest.mark.parametrize("prior", ["zero", "pruned"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("singular", [True, False])  # singular: made again with jitter
def test_solve_in_the_spent_gram_matrix_gives_the_same_fit(affine, prior, singular):
    """With the Gram matrix spent, the system is made (and after a failed factorisation made again) in the Gram
    matrix's own memory: the same fit, bit for bit; where the system and its copy do not fit there, G is kept."""
    x = _data(n=100, h=20, seed=41)
    if singular:
        x[:, 2] = x[:, 0]  # two kept units alike
    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(42))
    for kept, in_place in ((torch.tensor([0, 2, 3, 7, 8, 11, 12, 15, 16, 19]), True), (torch.arange(17), False)):
        reference = fit_consumer(w, _stats(x).moments(), kept, 0.0, affine, prior=prior)
        spent = _stats(x).moments()
        gram = spent.gram.clone()
        fit = fit_consumer(w, spent, kept, 0.0, affine, prior=prior, gram_is_spent=True)
        assert fit.jitter == reference.jitter and (fit.jitter > 0) == singular
        assert torch.equal(fit.weight, reference.weight)
        assert fit.bias_shift is None or torch.equal(fit.bias_shift, reference.bias_shift)
        assert torch.equal(spent.gram, gram) != in_place  # overwritten only where the solve was made in it


def test_the_gram_matrix_is_dropped_once_its_solve_is_made_in_it():
    """Reading a Gram matrix whose memory held a solve is an error, not silently wrong numbers."""
    from grail.config import PruneConfig
    from grail.policy import CompensationPolicy

    x = _data(n=200, h=20, seed=43)
    stats = _stats(x)
    policy = CompensationPolicy.from_config(PruneConfig(compensate=True, ridge_lambda=0.01))
    kept = torch.arange(0, 20, 2)
    update = policy.update(torch.randn(6, 20), None, kept, stats, stats, False, "layer 0 down_proj")
    assert update.weight.shape == (6, 10)
    with pytest.raises(RuntimeError, match="without a Gram matrix"):
        stats.moments()


@pytest.mark.parametrize("target", [False, True])
@pytest.mark.parametrize("prior", ["zero", "pruned"])
@pytest.mark.parametrize("affine", [False, True])
def test_blockwise_products_equal_whole_ones(monkeypatch, affine, prior, target):
    """W G[:, P], G[P, P], the prior and the sketched weights taken a few elements at a time give the same fits
    and held-out errors as in one piece."""
    from grail.compensate import TargetMoments

    x = _data(n=160, h=11, seed=22)
    w = torch.randn(140, 11, generator=torch.Generator().manual_seed(23))  # over SKETCH_ROWS: cross-validation sketches
    kept = torch.tensor([0, 1, 3, 4, 7, 9, 10])
    t = x @ torch.randn(11, 140, generator=torch.Generator().manual_seed(24))
    moments = TargetMoments(t.T @ x, t.sum(0), float(t.square().sum()), float(t.square().sum())) if target else None
    folds = _fold_stats(x, 4).fold_moments()

    def run():
        fit = fit_consumer(w, _stats(x).moments(), kept, 0.01, affine, prior=prior, target=moments)
        choice = choose_lambda(w, folds, kept, "affine" if affine else "linear", False, prior=prior, search="full")
        return fit, choice

    whole_fit, whole_choice = run()
    monkeypatch.setattr("grail.compensate.BLOCK_ELEMENTS", 23)  # blocks of 1-2 columns or rows
    fit, choice = run()
    torch.testing.assert_close(fit.weight, whole_fit.weight, rtol=1e-10, atol=1e-12)
    if affine:
        torch.testing.assert_close(fit.bias_shift, whole_fit.bias_shift, rtol=1e-10, atol=1e-12)
    assert choice.lam == whole_choice.lam
    for lam, err in whole_choice.errors.items():
        assert choice.errors[lam] == pytest.approx(err, rel=1e-10)


def test_solve_spd_reports_no_jitter_for_regular_systems():
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    x, jitter = solve_spd(a, torch.tensor([[1.0], [2.0]]))
    assert jitter == 0.0
    torch.testing.assert_close(a @ x, torch.tensor([[1.0], [2.0]]))


def test_mean_bias_shift_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    mean = torch.tensor([10.0, 20.0, 30.0])
    # removed column 1: W[:, 1] * 20
    torch.testing.assert_close(mean_bias_shift(w, mean, torch.tensor([0, 2])), torch.tensor([40.0, -20.0]))


def test_affine_fit_on_constant_removed_units_is_exactly_flaps_bias():
    g = torch.Generator().manual_seed(6)
    kept_part = torch.randn(200, 5, generator=g)
    constants = torch.tensor([2.0, -1.5, 0.25])
    x = torch.cat([kept_part, constants.expand(200, 3)], dim=1)
    w = torch.randn(4, 8, generator=g)
    kept = torch.arange(5)
    fit = _fit(x, w, kept, 0.0, True)
    torch.testing.assert_close(fit.weight, w[:, kept])
    torch.testing.assert_close(fit.bias_shift, mean_bias_shift(w, _stats(x).mean, kept))
    torch.testing.assert_close(fit.bias_shift, w[:, 5:] @ constants)


# ---------------------------------------------------------------- choosing lambda on held-out folds


def _fold_stats(x, n_folds):
    """Per-fold statistics; rows are assigned to folds in contiguous blocks (whole samples)."""
    s = InputStats(x.shape[1], gram=True, n_folds=n_folds)
    for f, chunk in enumerate(x.chunk(n_folds)):
        s.update(chunk, fold=f)
    return s


@pytest.mark.parametrize("prior", ["zero", "pruned"])
@pytest.mark.parametrize("fit_name", ["linear", "affine", "seed"])
def test_heldout_errors_from_grams_equal_direct_computation(fit_name, prior):
    x = _data(n=120, h=9, seed=11)
    w = torch.randn(5, 9, generator=torch.Generator().manual_seed(12))
    kept = torch.tensor([0, 2, 3, 5, 8])
    removed = torch.tensor([1, 4, 6, 7])
    chunks = x.chunk(4)
    folds = _fold_stats(x, 4).fold_moments()
    choice = choose_lambda(w, folds, kept, fit_name, mean_bias=True, prior=prior, search="full")
    for lam in (0.0, 1e-3, 1.0, None):
        direct = 0.0
        for f in range(4):
            train = torch.cat([c for i, c in enumerate(chunks) if i != f])
            held = chunks[f]
            mean_shift = w[:, removed] @ train.mean(0)[removed]
            if lam is None:
                new_w, shift = w[:, kept], mean_shift
            else:
                fit = fit_consumer(w, _stats(train).moments(), kept, lam, fit_name == "affine", prior=prior)
                new_w, shift = fit.weight, fit.bias_shift
                if fit_name == "seed":
                    shift = mean_shift
            pred = held[:, kept] @ new_w.T + (0 if shift is None else shift)
            direct += (held @ w.T - pred).square().sum().item()
        got = choice.plain_error if lam is None else choice.errors[lam]
        assert got == pytest.approx(direct, rel=1e-8)


def test_guard_keeps_plain_pruning_where_compensation_cannot_help():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(400, 10, generator=g)  # independent, zero-mean units: nothing to reconstruct from
    w = torch.randn(6, 10, generator=g)
    choice = choose_lambda(w, _fold_stats(x, 4).fold_moments(), torch.arange(5), "affine", mean_bias=False)
    assert not choice.compensate


def test_auto_lambda_reconstructs_linear_combinations_exactly():
    g = torch.Generator().manual_seed(14)
    kept_part = torch.randn(400, 6, generator=g)
    x = torch.cat([kept_part, kept_part @ torch.randn(6, 4, generator=g)], dim=1)
    w = torch.randn(5, 10, generator=g)
    choice = choose_lambda(w, _fold_stats(x, 4).fold_moments(), torch.arange(6), "linear", mean_bias=False)
    assert choice.compensate and choice.lam <= 1e-6
    assert choice.heldout_error < 1e-8 * choice.plain_error


def test_ridge_towards_plain_pruning_penalises_only_the_removed_units():
    x = _data(n=300, h=10, seed=15)
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(16))
    kept, removed = torch.tensor([0, 1, 3, 6, 7, 9]), torch.tensor([2, 4, 5, 8])
    gram = x.T @ x
    g_pp = gram[kept][:, kept]
    lam = 0.05
    penalty = lam * g_pp.diagonal().mean()
    # W' = W_P + W_R G[R, P] (G[P, P] + penalty I)^-1
    expected = w[:, kept] + w[:, removed] @ gram[removed][:, kept] @ torch.linalg.inv(g_pp + penalty * torch.eye(6))
    fit = fit_consumer(w, _stats(x).moments(), kept, lam, affine=False, prior="pruned")
    torch.testing.assert_close(fit.weight, expected, rtol=1e-8, atol=1e-8)
    # an enormous penalty gives plain pruning, and with the affine fit FLAP's mean bias
    huge = fit_consumer(w, _stats(x).moments(), kept, 1e9, affine=True, prior="pruned")
    torch.testing.assert_close(huge.weight, w[:, kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(huge.bias_shift, mean_bias_shift(w, x.mean(0), kept), rtol=1e-5, atol=1e-5)


def test_sketched_cross_validation_estimates_the_exact_errors():
    """Wide consumers are scored on a random sketch of their outputs: close to the exact errors."""
    x = _data(n=400, h=12, seed=17)
    w = torch.randn(600, 12, generator=torch.Generator().manual_seed(18))  # wider than SKETCH_ROWS
    kept = torch.tensor([0, 1, 2, 4, 6, 7, 9, 11])
    folds = _fold_stats(x, 4).fold_moments()
    sketched = choose_lambda(w, folds, kept, "affine", mean_bias=False, search="full")
    exact = sum(
        choose_lambda(w[i : i + 100], folds, kept, "affine", mean_bias=False, search="full").errors[1e-3]
        for i in range(0, 600, 100)
    )
    assert sketched.errors[1e-3] == pytest.approx(exact, rel=0.3)


def _one_valley(values: list[float]) -> bool:
    """Falls to its (first) minimum, then rises or stays: one valley, equal values counting as rising."""
    low = values.index(min(values))
    steps = list(itertools.pairwise(values))
    return all(a > b for a, b in steps[:low]) and all(a <= b for a, b in steps[low:])


@pytest.mark.parametrize("seed", range(20))
def test_grid_descent_finds_the_minimum_of_one_valley_from_every_start(seed):
    g = torch.Generator().manual_seed(seed)
    grid = LAMBDA_GRID
    bottom = int(torch.randint(len(grid), (1,), generator=g))
    steps = torch.rand(len(grid), generator=g).tolist()
    values = [sum(steps[i:bottom]) if i < bottom else sum(steps[bottom + 1 : i + 1]) for i in range(len(grid))]
    assert _one_valley(values)
    for start in grid:
        calls: list[float] = []

        def score(lam: float, calls: list[float] = calls) -> float:
            calls.append(lam)
            return values[grid.index(lam)]

        batches: list[list[float]] = []
        scored = grid_descent(score, grid, start, prefetch=batches.append)
        assert min(scored, key=scored.get) == grid[bottom]
        assert len(calls) == len(set(calls)) == len(scored)  # each candidate scored once
        # every candidate is announced once, before it is scored: the first step's together, then one per step
        assert sorted(lam for batch in batches for lam in batch) == sorted(scored)
        assert [len(b) for b in batches[1:]] == [1] * (len(batches) - 1)
        assert len(batches[0]) == (2 if start in (grid[0], grid[-1]) else 3)
        assert len(scored) <= 3 + abs(grid.index(start) - bottom)
        assert list(scored) == sorted(scored)


def test_cross_validation_scores_a_batch_of_candidates_a_fold_at_a_time(monkeypatch):
    """A batch gathers each fold's G[P, P] once for all its candidates, and scores them as one at a time does."""
    x = _data(n=200, h=10, seed=19)
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(20))
    kept = torch.tensor([0, 2, 3, 5, 7, 9])
    folds = _fold_stats(x, 4).fold_moments()
    one_at_a_time = CrossValidation(w, folds, kept, "affine", True, "pruned")
    expected = {lam: one_at_a_time.heldout_error(lam) for lam in (None, 1e-3, 1e-2, 1e-1)}
    batched = CrossValidation(w, folds, kept, "affine", True, "pruned")
    gathered = []
    gather = batched.fold_gram_pp
    monkeypatch.setattr(batched, "fold_gram_pp", lambda i: gathered.append(i) or gather(i))
    batched.score([1e-3, None, 1e-2, 1e-1, 1e-2])
    assert gathered == [0, 1, 2, 3]
    assert {lam: batched.heldout_error(lam) for lam in expected} == expected  # bit-identical
    assert gathered == [0, 1, 2, 3]  # nothing solved again
    batched.score([1e-3, 1.0])
    assert gathered == [0, 1, 2, 3] * 2


def test_grid_descent_hand_cases():
    grid = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
    descend = lambda values, start: grid_descent(dict(zip(grid, values, strict=True)).__getitem__, grid, start)  # noqa: E731
    # two valleys: the descent stays in the one it starts in
    assert descend([1, 5, 9, 4, 6], 1e-1) == {1e-2: 9, 1e-1: 4, 1.0: 6}
    assert min(descend([1, 5, 9, 4, 6], 1e-3).items(), key=lambda kv: kv[1]) == (0.0, 1)
    # ties go to the smaller lambda, as with the full grid
    scored = descend([3, 2, 2, 2, 5], 1e-1)
    assert min(scored, key=scored.get) == 1e-3
    # a start off the grid begins at the nearest point on the log scale; 0 lies below the smallest value
    assert set(descend([5, 4, 3, 2, 1], 0.3)) == {1e-2, 1e-1, 1.0}
    assert set(descend([1, 2, 3, 4, 5], 0.0)) == {0.0, 1e-3}


def _ill_conditioned(n, h, seed):
    x = _data(n=n, h=h, seed=seed)
    return x * torch.logspace(0, -6, h)  # feature scales over six decades


def _singular(n, h, seed):
    x = _data(n=n, h=h, seed=seed)
    x[:, 1] = 2 * x[:, 0] - x[:, 2]  # a kept unit is a combination of two others
    return x


@pytest.mark.parametrize("make", [_data, _ill_conditioned, _singular])
@pytest.mark.parametrize("prior", ["zero", "pruned"])
@pytest.mark.parametrize("fit_name", ["linear", "affine"])
def test_local_search_scores_like_the_full_search_and_chooses_alike(make, prior, fit_name):
    kept = torch.tensor([0, 1, 2, 3, 5, 8])
    one_valley = 0
    for seed in range(8):
        x = make(n=48, h=10, seed=seed)  # few tokens per fold: the penalty matters
        w = torch.randn(7, 10, generator=torch.Generator().manual_seed(100 + seed))
        folds = _fold_stats(x, 4).fold_moments()
        full = choose_lambda(w, folds, kept, fit_name, mean_bias=False, prior=prior, search="full")
        values = [full.errors[lam] for lam in LAMBDA_GRID]
        for start in (None, 0.0, 1e-3, 100.0):
            local = choose_lambda(w, folds, kept, fit_name, mean_bias=False, prior=prior, search="local", start=start)
            for lam, err in local.errors.items():
                assert err == full.errors[lam]  # the same computation, candidate by candidate
            assert local.plain_error == full.plain_error
            if _one_valley(values):
                assert local.lam == full.lam
                assert local.compensate == full.compensate
        one_valley += _one_valley(values)
    # the choice was compared, not only the scores (the ill-conditioned Grams with the pruned
    # prior give two valleys in most seeds: 0 and about 0.1)
    assert one_valley >= 2


def _bad_values(f):
    """Values a declared option must refuse, from its declaration."""
    meta = f.metadata
    if meta["choices"]:
        yield "not-a-choice"
    if meta["minimum"] is not None:
        yield meta["minimum"] - 1
    if meta["below"] is not None:
        yield meta["below"]
    if meta["minimum"] is not None or meta["below"] is not None:
        yield float("nan")
        yield float("inf")
        yield "12"


# Options whose every value of their type is acceptable at construction (paths and the device are
# checked when the run starts, before any work; see tests/bad_inputs.json).
UNCONSTRAINED = {
    "model", "data_dir", "device", "save_model", "output_json", "offload_activations", "seed", "compensate",
    "bias_compensation", "eval", "zero_shot", "offload", "compensate_first", "ridge_lambda", "save_gguf", "speed",
    "dry_run",
}  # fmt: skip


def test_every_declared_option_is_validated_at_construction():
    from grail import FLAPOptions, PruneConfig, RunConfig, WandaPPOptions
    from grail.config import ConfigError, declared_options, flag_name

    checked = set()
    for cls in (PruneConfig, RunConfig, FLAPOptions, WandaPPOptions):
        for f in declared_options(cls):
            values = list(_bad_values(f))
            if not values:
                assert f.name in UNCONSTRAINED, f"{f.name} declares no check"
                continue
            for value in values:
                with pytest.raises(ConfigError, match=f"--{flag_name(f)} "):
                    cls(**{f.name: value if f.name != "eval_dataset" else [value]})
            checked.add(f.name)
    assert len(checked) >= 15
    for value in (-1.0, float("nan"), float("inf"), "often"):
        with pytest.raises(ConfigError, match="--ridge_lambda "):
            PruneConfig(ridge_lambda=value)


def test_ill_conditioned_statistics_do_not_depend_on_how_tokens_are_batched():
    """Data-parallel ranks and different batch sizes see the tokens in other groups: the
    compensated weights must agree (relative to their largest entry) to 1e-6, on a Gram
    matrix with condition number about 1e8 at lambda = 0."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -4, 32, dtype=torch.float64)
    x = (torch.randn(2048, 32, generator=g, dtype=torch.float64) * scales) @ torch.linalg.qr(
        torch.randn(32, 32, generator=g, dtype=torch.float64)
    )[0]
    x = (x + 0.5).float()  # float32 activations, as a model produces them
    w = torch.randn(16, 32, generator=g)
    kept = torch.arange(0, 32, 2)
    one, parts = InputStats(32, gram=True), InputStats(32, gram=True)
    one.update(x)
    for chunk in (x[1500:], x[:700], x[700:1500]):  # other groups, other order
        parts.update(chunk)
    assert torch.linalg.cond(one.gram).item() > 1e7
    a = fit_consumer(w, one.moments(), kept, 0.0, affine=True)
    b = fit_consumer(w, parts.moments(), kept, 0.0, affine=True)
    assert (a.weight - b.weight).abs().max() <= 1e-6 * a.weight.abs().max()
    assert (a.bias_shift - b.bias_shift).abs().max() <= 1e-6 * a.bias_shift.abs().max()
