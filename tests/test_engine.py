"""The sequential engine against a slow, obviously correct reference, plus its contracts."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VARIANTS, random_windows, tiny_model
from torch import nn

from grail import PruneConfig, prune_model
from grail.compensate import LAMBDA_GRID, LAMBDA_START, fit_consumer, grid_descent
from grail.errors import GrailError
from grail.methods.base import uniform_allocation
from grail.models.arch import arch_for, layer_shape, linear_param_count
from grail.stats import InputStats, NonFiniteStatisticsError
from grail.units import attention_units, mlp_units, top_units


def _consumer_inputs(model, consumer: nn.Linear, windows) -> torch.Tensor:
    """All inputs of ``consumer`` over the windows, from full forward passes of the whole model."""
    rows = []
    handle = consumer.register_forward_pre_hook(lambda m, args: rows.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(windows)
    handle.remove()
    return torch.cat(rows).double()


def reference_wanda_sp(model, windows, ratio, compensate):
    """Wanda-SP (+ affine least-squares compensation) by masking, one block at a time.

    Every statistic comes from stored activations of full-model forward passes; removed
    units are zeroed in the consumer, which leaves the function equal to physical removal.
    """
    model = copy.deepcopy(model)
    arch = arch_for(model.config)
    for layer in arch.decoder_layers(model):
        shape = layer_shape(arch, layer)
        attn_units, channel_units = attention_units(shape, "group"), mlp_units(shape)
        layer_params = sum(p.numel() for n, p in layer.named_parameters() if "norm" not in n)
        n_remove = dict(
            zip(("attn", "mlp"), uniform_allocation(ratio, attn_units, channel_units, layer_params), strict=True)
        )
        for kind, units, consumer in (
            ("attn", attn_units, arch.attention_linears(layer)[3]),
            ("mlp", channel_units, arch.mlp_linears(layer)[2]),
        ):
            x = _consumer_inputs(model, consumer, windows)
            w = consumer.weight.double()
            column_scores = w.abs().mean(0) * x.norm(dim=0)
            kept = top_units(units.unit_scores(column_scores), units.count - n_remove[kind])
            cols = units.kept_columns(kept)
            new_w, shift = w[:, cols], torch.zeros(w.shape[0], dtype=torch.float64)
            if compensate:
                design = torch.cat([x[:, cols], torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
                sol = torch.linalg.lstsq(design, x @ w.T).solution
                new_w, shift = sol[:-1].T, sol[-1]
            full = torch.zeros_like(w)
            full[:, cols] = new_w
            consumer.weight.data = full.float()
            if compensate:
                consumer.bias = nn.Parameter(shift.float())
    return model


@pytest.mark.parametrize(("family", "heads", "kv"), TINY_VARIANTS)
@pytest.mark.parametrize("compensate", [False, True])
def test_engine_matches_reference(family, heads, kv, compensate):
    model = tiny_model(family, heads, kv)
    windows = random_windows(8, 32)
    reference = reference_wanda_sp(model, windows, 0.4, compensate)
    config = PruneConfig(
        prune_method="wanda_sp",
        pruning_ratio=0.4,
        nsamples=8,
        compensate=compensate,
        ridge_lambda=0.0,
        calib_batch_size=3,
    )
    prune_model(model, windows, config, progress=False)
    ids = random_windows(3, 24, seed=9)
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert (got - want).norm() / want.norm() < 1e-4


def test_removed_fraction_follows_the_ratio():
    model = tiny_model("llama", 6, 2, layers=3)
    arch = arch_for(model.config)
    before = linear_param_count(arch, model)
    for ratio in (0.2, 0.5):
        m = copy.deepcopy(model)
        report = prune_model(
            m,
            random_windows(4, 16),
            PruneConfig(prune_method="wanda_sp", pruning_ratio=ratio, nsamples=4),
            progress=False,
        )
        assert report.params_before == before
        # one MLP channel costs 3 * 48 of a layer's ~ 23k parameters
        assert report.removed_fraction == pytest.approx(ratio, abs=0.01)


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_same_seed_same_result_and_zero_ratio_changes_nothing(method):
    model = tiny_model("mistral", 4, 2)
    windows = random_windows(6, 16)
    config = PruneConfig(prune_method=method, pruning_ratio=0.3, nsamples=6, compensate=True)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(a, windows, config, progress=False)
    prune_model(b, windows, config, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    untouched = copy.deepcopy(model)
    report = prune_model(untouched, windows, PruneConfig(pruning_ratio=0.0), progress=False)
    assert report.removed_fraction == 0.0
    for pa, pb in zip(untouched.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_magnitude_pruning_needs_no_calibration_data():
    model = tiny_model("llama", 4, 4)
    report = prune_model(model, None, PruneConfig(prune_method="mag_sp", pruning_ratio=0.5), progress=False)
    assert report.calibration_windows == 0 and report.layer_passes == 0
    assert report.removed_fraction == pytest.approx(0.5, abs=0.02)


def test_gram_samples_can_differ_from_selection_samples():
    model = tiny_model("qwen2", 6, 3)
    windows = random_windows(10, 16)
    config = PruneConfig(
        prune_method="wanda_sp", pruning_ratio=0.3, nsamples=4, comp_nsamples=10, compensate=True, calib_batch_size=3
    )
    report = prune_model(model, windows, config, progress=False)
    assert report.calibration_windows == 10
    with pytest.raises(GrailError, match="10 calibration windows are needed"):
        prune_model(tiny_model("qwen2", 6, 3), windows[:5], config, progress=False)


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_compensation_brings_the_model_closer_to_the_dense_one(method):
    """lam = 0: the compensated model is closer to the dense model than the plain-pruned one."""
    model = tiny_model("llama", 6, 2, layers=3)
    windows = random_windows(8, 32)
    with torch.no_grad():
        dense = model(windows).logits
    errors = {}
    for compensate in (False, True):
        m = copy.deepcopy(model)
        prune_model(
            m,
            windows,
            PruneConfig(prune_method=method, pruning_ratio=0.4, nsamples=8, compensate=compensate, ridge_lambda=0.0),
            progress=False,
        )
        with torch.no_grad():
            errors[compensate] = (m(windows).logits - dense).norm().item()
    assert errors[True] < errors[False]


def test_nan_activations_stop_with_the_layer_named():
    model = tiny_model("llama", 4, 4)
    arch = arch_for(model.config)
    arch.mlp_linears(arch.decoder_layers(model)[1])[0].weight.data[0, 0] = float("nan")
    with pytest.raises(NonFiniteStatisticsError, match=r"layer 1 mlp\.down_proj"):
        prune_model(model, random_windows(2, 8), PruneConfig(pruning_ratio=0.3, nsamples=2), progress=False)


def test_auto_lambda_records_heldout_errors_that_match_stored_activations():
    """Layer 0's o_proj inputs do not depend on pruning: recompute its cross-validation directly."""
    model = tiny_model("llama", 4, 4)
    windows = random_windows(8, 16)
    arch = arch_for(model.config)
    o_proj = arch.attention_linears(arch.decoder_layers(model)[0])[3]
    samples = []
    handle = o_proj.register_forward_pre_hook(lambda m, a: samples.append(a[0].double()))
    with torch.no_grad():
        model(windows)
    handle.remove()
    x = samples[0]  # [8 samples, 16 tokens, 48]
    w = o_proj.weight.double()
    config = PruneConfig(
        prune_method="wanda_sp", pruning_ratio=0.5, nsamples=8, compensate=True, ridge_lambda="auto", calib_batch_size=3
    )
    report = prune_model(copy.deepcopy(model), windows, config, progress=False)
    block = next(b for b in report.blocks if b["layer"] == 0 and b["block"] == "attn")
    # the same selection as the engine's (wanda scores over all tokens, group units)
    units = attention_units(layer_shape(arch, arch.decoder_layers(model)[0]), "group")
    scores = w.abs().mean(0) * x.reshape(-1, 48).norm(dim=0)
    cols = units.kept_columns(top_units(units.unit_scores(scores), units.count - 2))
    direct = {"fit": 0.0, "plain": 0.0}
    for fold in range(4):
        held = x[fold::4].reshape(-1, 48)  # sample j belongs to fold j % 4
        train = torch.cat([x[j] for j in range(8) if j % 4 != fold])
        s = InputStats(48, gram=True)
        s.update(train)
        fit = fit_consumer(w, s.moments(), cols, block["lambda"], affine=True, prior="pruned")  # auto's default
        direct["fit"] += (held @ w.T - held[:, cols] @ fit.weight.T - fit.bias_shift).square().sum().item()
        direct["plain"] += (held @ w.T - held[:, cols] @ w[:, cols].T).square().sum().item()
    assert block["heldout_error"] == pytest.approx(direct["fit"], rel=1e-6)
    assert block["plain_heldout_error"] == pytest.approx(direct["plain"], rel=1e-6)
    assert block["compensated"] == (direct["fit"] < direct["plain"])


def test_auto_lambda_summary_line():
    model = tiny_model("llama", 4, 2)
    config = PruneConfig(prune_method="wanda_sp", pruning_ratio=0.4, nsamples=8, compensate=True, ridge_lambda="auto")
    report = prune_model(model, random_windows(8, 16), config, progress=False)
    line = report.auto_lambda_summary()
    assert line.startswith("GRAIL auto: compensated ") and " of 4 consumers" in line
    fixed = prune_model(
        tiny_model("llama", 4, 2),
        random_windows(8, 16),
        PruneConfig(pruning_ratio=0.4, nsamples=8, compensate=True),
        progress=False,
    )
    assert fixed.auto_lambda_summary() is None
    # every compensated consumer reports its solve time, with auto's cross-validation and at a fixed lambda
    for blocks in (report.blocks, fixed.blocks):
        assert blocks and all(b["solve_s"] > 0 for b in blocks)


@pytest.mark.parametrize("method", ["wanda_sp", "wanda_pp_sp"])  # wanda_pp_sp: compensation after the transforms
def test_local_lambda_search_starts_from_the_previous_layer_and_matches_the_full_search(method):
    model = tiny_model("llama", 4, 4)
    windows = random_windows(8, 16)
    runs = {}
    for search in ("full", "local"):
        config = PruneConfig(
            prune_method=method,
            pruning_ratio=0.4,
            nsamples=8,
            compensate=True,
            ridge_lambda="auto",
            lambda_search=search,
        )
        m = copy.deepcopy(model)
        runs[search] = (prune_model(m, windows, config, progress=False).blocks, m)
    full, local = runs["full"][0], runs["local"][0]
    assert all(len(b["heldout_errors"]) == 9 for b in full)
    for i, block in enumerate(local):
        earlier = [b["lambda"] for b in local[:i] if b["block"] == block["block"]]
        start = earlier[-1] if earlier else LAMBDA_START  # the same kind's choice in the layer before
        # exactly the candidates a descent from the previous layer's choice visits, with the full search's scores
        full_errors = {float(lam): err for lam, err in full[i]["heldout_errors"].items()}
        visited = grid_descent(full_errors.__getitem__, LAMBDA_GRID, start)
        assert [float(lam) for lam in block["heldout_errors"]] == list(visited)
        assert len(visited) < 9
        for lam, err in block["heldout_errors"].items():
            assert err == full[i]["heldout_errors"][lam]
        assert block["lambda"] == full[i]["lambda"]  # these curves have one valley
    for a, b in zip(runs["full"][1].state_dict().values(), runs["local"][1].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_aligned_removal_by_hand():
    from grail.methods.base import aligned_removal

    assert aligned_removal(80, 30, 16) == 32  # 50 kept -> 48
    assert aligned_removal(80, 10, 16) == 16  # 70 kept -> 64
    assert aligned_removal(80, 79, 16) == 64  # at least one multiple stays
    assert aligned_removal(8, 3, 16) == 0  # narrower than the multiple: left whole
    assert aligned_removal(80, 30, 1) == 30


@pytest.mark.parametrize("method", ["flap", "wanda_sp", "slimgpt"])
def test_align_keeps_multiples_within_one_aligned_unit_per_block(method):
    """--align 16: every kept MLP width is a multiple of 16, and the model loses what the
    unaligned run loses to within half an aligned unit per block (MLP channels of 3 x 48 parameters)."""
    model = tiny_model("llama", 4, 2, layers=3)
    windows = random_windows(6, 24)
    removed = {}
    for align in (1, 16):
        pruned = copy.deepcopy(model)
        config = PruneConfig(prune_method=method, pruning_ratio=0.4, nsamples=6, align=align)
        report = prune_model(pruned, windows, config, progress=False)
        widths = [layer.mlp.down_proj.in_features for layer in arch_for(model.config).decoder_layers(pruned)]
        if align > 1:
            assert all(w % align == 0 for w in widths), widths
        removed[align] = report.params_before - report.params_after
    assert abs(removed[16] - removed[1]) <= 3 * (16 / 2) * (3 * 48)
