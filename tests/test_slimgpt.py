"""SlimGPT: the structured OBS update against slow references, its schedules by hand, and the
method end to end on tiny models."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import random_windows, tiny_model

from grail import PruneConfig, prune_model
from grail.compensate import Moments, fit_consumer
from grail.methods.slimgpt import (
    block_scores,
    column_scores,
    damped_hessian,
    log_increasing_ratios,
    mlp_group_sizes,
    obs_remove,
    prune_channels,
)


def _problem(h=12, o=5, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64) @ torch.randn(h, h, generator=g, dtype=torch.float64)
    w = torch.randn(o, h, generator=g, dtype=torch.float64)
    return w, damped_hessian(x.T @ x)


def _slow_remove(w, hessian, columns, alive=None):
    """Remove columns one at a time, each time with a fresh inverse of the remaining Hessian."""
    alive = list(range(w.shape[1])) if alive is None else list(alive)
    for c in columns:
        hinv = torch.linalg.inv(hessian[alive][:, alive])
        p = alive.index(c)
        w = w - torch.outer(w[:, p] / hinv[p, p], hinv[p])
        w = torch.cat([w[:, :p], w[:, p + 1 :]], dim=1)
        alive.remove(c)
    return w, alive


def test_group_removal_equals_one_at_a_time_with_fresh_inverses():
    w, hessian = _problem()
    group = torch.tensor([1, 4, 5, 9])
    fast, fast_hinv = obs_remove(w, torch.linalg.inv(hessian), group)
    slow, alive = _slow_remove(w, hessian, group.tolist())
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fast_hinv, torch.linalg.inv(hessian[alive][:, alive]), rtol=1e-9, atol=1e-9)


def test_obs_update_equals_least_squares_refit_of_the_kept_columns():
    w, hessian = _problem(seed=1)
    kept = torch.tensor([0, 2, 3, 6, 7, 8, 10, 11])
    removed = torch.tensor([1, 4, 5, 9])
    obs, _ = obs_remove(w, torch.linalg.inv(hessian), removed)
    refit = fit_consumer(w, Moments(hessian, torch.zeros(12), 1), kept, 0.0, affine=False).weight
    torch.testing.assert_close(obs, refit, rtol=1e-9, atol=1e-9)


def test_scores_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    hinv = torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(column_scores(w, hinv), torch.tensor([10.0 / 2.0, 4.0 / 4.0], dtype=torch.float64))
    # one block of both columns: Cholesky pivots 2 and 4 - 1/2 = 3.5
    got = block_scores(w, hinv, torch.tensor([[0, 1]]))
    torch.testing.assert_close(got, torch.tensor([10.0 / 2.0 + 4.0 / 3.5], dtype=torch.float64))


def test_dynamic_group_sizes_and_log_schedule_by_hand():
    assert mlp_group_sizes(2202)[:3] == [845, 166, 64] and sum(mlp_group_sizes(2202)) == 2202
    assert mlp_group_sizes(5504)[:4] == [1024, 992, 240, 64]
    assert mlp_group_sizes(100) == [64, 36]
    ratios = log_increasing_ratios(0.2, 32)
    assert sum(ratios) / 32 == pytest.approx(0.2)
    assert ratios[0] == pytest.approx(ratios[-1] / 4)
    assert all(a < b for a, b in itertools.pairwise(ratios))
    assert ratios[-1] == pytest.approx(0.25, abs=2e-3)  # SlimGPT's README: 0.0625 -> 0.25 for 20%


def test_channel_selection_matches_a_slow_greedy_reference():
    w, hessian = _problem(h=150, o=6, n=600, seed=2)
    removed = prune_channels(w, torch.linalg.inv(hessian), 90)  # groups of 64 and 26
    alive, cur = list(range(150)), w
    expected = []
    for size in (64, 26):
        hinv = torch.linalg.inv(hessian[alive][:, alive])
        worst = torch.argsort(cur.square().sum(0) / hinv.diagonal(), stable=True)[:size]
        cols = sorted(alive[int(i)] for i in worst)
        cur, alive = _slow_remove(cur, hessian, cols, alive)
        expected += cols
    assert sorted(removed) == sorted(expected)


@pytest.mark.parametrize(
    ("family", "heads", "kv", "unit"), [("llama", 4, 4, "group"), ("llama", 6, 2, "group"), ("qwen2", 6, 3, "query")]
)
def test_slimgpt_end_to_end_on_tiny_models(family, heads, kv, unit):
    model = tiny_model(family, heads, kv, layers=3)
    windows = random_windows(8, 24)
    with torch.no_grad():
        dense = model(windows).logits
    errors = {}
    for compensate in (False, True):
        m = copy.deepcopy(model)
        config = PruneConfig(
            prune_method="slimgpt",
            pruning_ratio=0.4,
            nsamples=8,
            attention_unit=unit,
            compensate=compensate,
            ridge_lambda=0.0,
        )
        report = prune_model(m, windows, config, progress=False)
        assert report.removed_fraction == pytest.approx(0.4, abs=0.05)
        with torch.no_grad():
            errors[compensate] = (m(windows).logits - dense).norm().item()
    # SlimGPT's own update already is a (damped) least-squares refit: GRAIL on top changes little
    assert errors[True] == pytest.approx(errors[False], rel=0.2)


def _slow_head_order(w, hessian, head_dim, n_remove):
    """SlimGPT's head rule with nothing reused: each round, the current weights are the
    least-squares refit of the alive columns, the inverse Hessian is inverted afresh, and every
    remaining head is scored by its grouped-Cholesky score; the lowest goes."""
    n_heads = w.shape[1] // head_dim
    remaining, order = list(range(n_heads)), []
    for _ in range(n_remove):
        alive = [h * head_dim + d for h in remaining for d in range(head_dim)]
        current = fit_consumer(w, Moments(hessian, torch.zeros(w.shape[1]), 1), torch.tensor(alive), 0.0, False).weight
        hinv = torch.linalg.inv(hessian[alive][:, alive])
        scores = []
        for head in remaining:
            pos = [alive.index(head * head_dim + d) for d in range(head_dim)]
            pivots = torch.linalg.cholesky(hinv[pos][:, pos]).diagonal().square()
            scores.append(float((current[:, pos].square().sum(0) / pivots).sum()))
        order.append(remaining.pop(min(range(len(scores)), key=scores.__getitem__)))
    return order


def test_head_loop_matches_a_brute_force_reference():
    from grail.methods.slimgpt import prune_heads
    from grail.models.arch import LayerShape
    from grail.units import attention_units

    shape = LayerShape(hidden_size=8, head_dim=3, num_heads=5, num_kv_heads=5, intermediate_size=4)
    for seed in range(3):
        w, hessian = _problem(h=15, o=8, n=300, seed=seed)
        expected = _slow_head_order(w, hessian, 3, 3)
        assert expected != [0, 1, 2] or seed > 0  # the case discriminates a naive choice
        got = prune_heads(w, torch.linalg.inv(hessian), attention_units(shape, "group"), 3)
        assert got == expected, seed


def _kept_heads(dense_q, pruned_q, head_dim):
    """Query heads whose q_proj rows survive in the pruned layer (rows are copied verbatim)."""
    rows = [int((dense_q.weight == row).all(dim=1).nonzero()[0]) for row in pruned_q.weight]
    return sorted({r // head_dim for r in rows})


@pytest.mark.parametrize("compensate", [False, True])
def test_slimgpt_removes_the_cheapest_heads_and_compensates_when_asked(compensate):
    """Heads 2 and 3 barely reach the output, so SlimGPT removes them (not 'the first heads');
    with GRAIL at lambda 0 the first o_proj is the least-squares fit of the dense output on
    the kept inputs, recomputed here from stored activations."""
    from grail.models.arch import arch_for

    model = tiny_model("llama", 4, 4, layers=1)
    arch = arch_for(model.config)
    layer = arch.decoder_layers(model)[0]
    o = arch.attention_linears(layer)[3]
    with torch.no_grad():
        o.weight[:, 24:] *= 0.01
    windows = random_windows(8, 24)
    inputs = []
    handle = o.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, 48).double()))
    with torch.no_grad():
        model(windows)
    handle.remove()
    x = torch.cat(inputs)
    pruned = copy.deepcopy(model)
    config = PruneConfig(prune_method="slimgpt", pruning_ratio=0.5, nsamples=8, compensate=compensate, ridge_lambda=0.0)
    prune_model(pruned, windows, config, progress=False)
    p_layer = arch.decoder_layers(pruned)[0]
    kept = _kept_heads(arch.attention_linears(layer)[0], arch.attention_linears(p_layer)[0], 12)
    assert kept == [0, 1]
    p_o = arch.attention_linears(p_layer)[3]
    cols = torch.arange(24)
    w = o.weight.double()
    design = torch.cat([x[:, cols], torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    if compensate:  # GRAIL: the unpenalised affine fit on the plain Gram matrix
        beta = torch.linalg.lstsq(design, x @ w.T).solution
    else:  # SlimGPT's own refit: the same normal equations with the damped Hessian in place of the Gram
        hessian = damped_hessian(x.T @ x)
        normal = design.T @ design
        normal[:24, :24] = hessian[:24, :24]
        rhs = torch.cat([hessian[cols] @ w.T, (w @ x.sum(0)).unsqueeze(0)], dim=0)
        beta = torch.linalg.solve(normal, rhs)
    torch.testing.assert_close(p_o.weight.double(), beta[:24].T, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(p_o.bias.double(), beta[24], rtol=1e-3, atol=1e-4)
