"""FLAP: metrics by hand, the parameter budget of every structure, the global plan against a
reference computed from stored dense activations, and the number of calibration passes."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import random_windows, tiny_model

from grail import FLAPOptions, PruneConfig, prune_model
from grail.errors import GrailError
from grail.methods.flap import flap_column_scores, global_cut, standardize
from grail.models.arch import arch_for, layer_shape
from grail.stats import InputStats
from grail.units import attention_units, mlp_units


def _stats(x):
    s = InputStats(x.shape[1], gram=False)
    s.update(x)
    return s


def test_metrics_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # variances 2 and 8, norms sqrt(10) and 4
    w = torch.tensor([[3.0, -1.0], [4.0, 0.0]])  # squared column norms 25 and 1, mean |w| 3.5 and 0.5
    s = _stats(x)
    f64 = torch.float64
    torch.testing.assert_close(flap_column_scores("IFV", w, s, "mlp"), torch.tensor([2.0, 8.0], dtype=f64))
    torch.testing.assert_close(flap_column_scores("WIFV", w, s, "mlp"), torch.tensor([50.0, 8.0], dtype=f64))
    torch.testing.assert_close(flap_column_scores("WIFV", w, s, "attn"), torch.tensor([2500.0, 64.0], dtype=f64))
    torch.testing.assert_close(flap_column_scores("WIFN", w, s, "mlp"), torch.tensor([3.5 * 10**0.5, 2.0], dtype=f64))


def test_standardize_and_global_cut_by_hand():
    z = standardize(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(z, torch.tensor([-1.0, 0.0, 1.0]))
    # removing 0, 1, 2, 3 units of costs 3, 3, 10 removes 0, 3, 6, 16: closest to 7 is two units
    assert global_cut(torch.tensor([3.0, 3.0, 10.0]), 7.0) == 2
    assert global_cut(torch.tensor([3.0, 3.0, 10.0]), 12.0) == 3


def _largest_unit_cost(model, unit):
    arch = arch_for(model.config)
    shape = layer_shape(arch, arch.decoder_layers(model)[0])
    return max(attention_units(shape, unit, torch.zeros(shape.num_heads)).cost, mlp_units(shape).cost)


@pytest.mark.parametrize("unit", ["group", "query"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_adaptive_allocation_hits_the_parameter_budget(unit, ratio):
    model = tiny_model("llama", 6, 2, layers=4)
    config = PruneConfig(
        prune_method="flap",
        method_options=FLAPOptions(structure="AL-AM"),
        pruning_ratio=ratio,
        nsamples=6,
        attention_unit=unit,
    )
    report = prune_model(model, random_windows(6, 24), config, progress=False)
    removed = report.params_before - report.params_after
    assert abs(removed - ratio * report.params_before) <= _largest_unit_cost(tiny_model("llama", 6, 2), unit) / 2 + 1


def test_manual_module_structures_remove_the_requested_heads():
    base = tiny_model("llama", 4, 4, layers=4)
    windows = random_windows(6, 24)
    for structure, remove_heads in (("AL-MM", 5), ("UL-MM", 8)):
        model = copy.deepcopy(base)
        config = PruneConfig(
            prune_method="flap",
            method_options=FLAPOptions(structure=structure, remove_heads=remove_heads),
            pruning_ratio=0.3,
            nsamples=6,
        )
        report = prune_model(model, windows, config, progress=False)
        attn = [b for b in report.blocks if b["block"] == "attn"]
        assert sum(b["units"] - b["kept"] for b in attn) == remove_heads
        if structure == "UL-MM":
            assert all(b["units"] - b["kept"] == 2 for b in attn)
        assert report.removed_fraction == pytest.approx(0.3, abs=0.01)
    with pytest.raises(GrailError, match="exceeds"):
        config = PruneConfig(
            prune_method="flap",
            method_options=FLAPOptions(structure="AL-MM", remove_heads=99),
            pruning_ratio=0.3,
            nsamples=6,
        )
        prune_model(copy.deepcopy(base), windows, config, progress=False)


def _dense_inputs(model, windows):
    """Every consumer's inputs over the windows, from one full forward pass of the dense model."""
    arch = arch_for(model.config)
    store, handles = {}, []
    for i, layer in enumerate(arch.decoder_layers(model)):
        for kind, lin in (("attn", arch.attention_linears(layer)[3]), ("mlp", arch.mlp_linears(layer)[2])):
            handles.append(lin.register_forward_pre_hook(lambda m, a, key=(i, kind): store.setdefault(key, a[0])))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {k: v.reshape(-1, v.shape[-1]).double() for k, v in store.items()}


def test_al_am_plan_matches_a_reference_from_stored_activations():
    model = tiny_model("qwen2", 6, 3, layers=3)
    windows = random_windows(5, 20)
    arch = arch_for(model.config)
    inputs = _dense_inputs(model, windows)
    candidates, total = [], 0
    for i, layer in enumerate(arch.decoder_layers(model)):
        shape = layer_shape(arch, layer)
        total += sum(p.numel() for n, p in layer.named_parameters() if "norm" not in n)
        for kind, lin in (("attn", arch.attention_linears(layer)[3]), ("mlp", arch.mlp_linears(layer)[2])):
            x, w = inputs[(i, kind)], lin.weight.double()
            metric = x.var(0) * w.square().sum(0)  # WIFV
            metric = metric.square() if kind == "attn" else metric
            z = (metric - metric.mean()) / metric.std()
            units = attention_units(shape, "group", qkv_bias=True) if kind == "attn" else mlp_units(shape)
            scores = z[units.columns].mean(1)
            best = int(scores.argmax())
            candidates += [(float(s), units.cost, kind, i, u) for u, s in enumerate(scores) if u != best]
    candidates.sort()
    removed, cut = 0, []
    for c in candidates:  # the cut closest to the budget: stop before the first unit that overshoots more
        if abs(removed + c[1] - 0.35 * total) > abs(removed - 0.35 * total):
            break
        removed += c[1]
        cut.append((c[2], c[3]))
    pruned = copy.deepcopy(model)
    report = prune_model(
        pruned,
        windows,
        PruneConfig(prune_method="flap", pruning_ratio=0.35, nsamples=5, bias_compensation=False),
        progress=False,
    )
    for block in report.blocks:
        assert block["units"] - block["kept"] == cut.count((block["block"], block["layer"]))
    assert report.params_before - report.params_after == removed


def test_calibration_passes_per_structure():
    """Adaptive structures score in one dense pass and need no other without compensation."""
    model = tiny_model("llama", 4, 2, layers=3)
    windows = random_windows(4, 16)
    # One dense scoring pass per layer (adaptive structures); then, unless the adaptive plan
    # without compensation needs nothing more, one statistics pass per pruned block and one
    # outputs pass per layer but the last.
    for structure, compensate in itertools.product(("AL-AM", "UL-UM"), (False, True)):
        config = PruneConfig(
            prune_method="flap",
            method_options=FLAPOptions(structure=structure),
            pruning_ratio=0.5,
            nsamples=4,
            compensate=compensate,
        )
        report = prune_model(copy.deepcopy(model), windows, config, progress=False)
        adaptive = structure == "AL-AM"
        passes = 3 * adaptive + (len(report.blocks) + 2) * (compensate or not adaptive)
        assert report.layer_passes == passes, (structure, compensate)


def test_flap_bias_compensation_adds_biases_and_can_be_turned_off():
    model = tiny_model("llama", 4, 4)
    windows = random_windows(4, 16)
    arch = arch_for(model.config)
    for bias, expected in ((True, True), (False, False)):
        m = copy.deepcopy(model)
        prune_model(
            m,
            windows,
            PruneConfig(prune_method="flap", pruning_ratio=0.4, nsamples=4, bias_compensation=bias),
            progress=False,
        )
        layer = arch.decoder_layers(m)[0]
        assert (arch.mlp_linears(layer)[2].bias is not None) == expected


def _kept_columns(dense, pruned):
    """Columns of a dense consumer that survive, unchanged, in the pruned consumer (plain pruning)."""
    return [int((dense.weight == col.unsqueeze(1)).all(dim=0).nonzero()[0]) for col in pruned.weight.T]


def test_flap_mean_bias_is_the_removed_columns_mean_contribution():
    """Plain FLAP (default structure, no GRAIL): each consumer keeps its columns and gains the bias
    ``W[:, R] mean(h[R])``, the mean over the dense model's calibration inputs (computed here
    from stored activations); once, not twice."""
    model = tiny_model("llama", 4, 4, layers=2)
    windows = random_windows(6, 24)
    inputs = _dense_inputs(model, windows)
    pruned = copy.deepcopy(model)
    prune_model(pruned, windows, PruneConfig(prune_method="flap", pruning_ratio=0.4, nsamples=6), progress=False)
    arch = arch_for(model.config)
    checked = 0
    for i in range(2):
        dense_layer, pruned_layer = arch.decoder_layers(model)[i], arch.decoder_layers(pruned)[i]
        for kind, pick in (
            ("attn", lambda lay: arch.attention_linears(lay)[3]),
            ("mlp", lambda lay: arch.mlp_linears(lay)[2]),
        ):
            dense, after = pick(dense_layer), pick(pruned_layer)
            kept = _kept_columns(dense, after)
            if len(kept) == dense.in_features:
                continue
            removed = [c for c in range(dense.in_features) if c not in kept]
            expected = dense.weight.double()[:, removed] @ inputs[(i, kind)].mean(0)[removed]
            torch.testing.assert_close(after.bias.double(), expected, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked >= 3
