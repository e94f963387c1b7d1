"""Wanda++: regional gradients against finite differences through the whole model, the
engine's deferred compensation, and the method end to end on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_windows, tiny_model

from grail import PruneConfig, WandaPPOptions, prune_model
from grail.calibration import capture_layer_inputs, iter_samples
from grail.methods.base import LayerTransform, Method, UniformAllocation
from grail.methods.regional import regional_gradients, regional_optimisation
from grail.methods.wanda import WandaSelector
from grail.models.arch import arch_for


def _layer0_loss(model, ids) -> float:
    """L = ||output of decoder layer 0|| / sqrt(numel), from a forward pass of the whole model."""
    out = model(ids, output_hidden_states=True).hidden_states[1]
    return (out.norm() / out.numel() ** 0.5).item()


def test_regional_gradient_equals_finite_differences_through_the_whole_model():
    model = tiny_model("llama", 4, 2).double()
    windows = random_windows(3, 10)
    arch = arch_for(model.config)
    layer = arch.decoder_layers(model)[0]
    o_proj, down = arch.attention_linears(layer)[3], arch.mlp_linears(layer)[2]
    calib = capture_layer_inputs(model, arch, windows, batch_size=2)
    got = regional_gradients(layer, [o_proj, down], iter_samples(layer, calib, 3))
    eps = 1e-3  # RMSNorm computes in float32 even in a float64 model: keep the step well above its rounding
    for lin, grad in ((o_proj, got[0]), (down, got[1])):
        for i, j in ((0, 0), (5, 7), (11, 3)):
            squares = []
            for n in range(3):
                ids = windows[n : n + 1]
                with torch.no_grad():
                    lin.weight[i, j] += eps
                    up = _layer0_loss(model, ids)
                    lin.weight[i, j] -= 2 * eps
                    down_ = _layer0_loss(model, ids)
                    lin.weight[i, j] += eps
                squares.append(((up - down_) / (2 * eps)) ** 2)
            assert grad[i, j].item() == pytest.approx((sum(squares) / 3) ** 0.5, rel=2e-3, abs=1e-8)


class _Shift(LayerTransform):
    """A layer transform that changes the consumers' kept columns after pruning."""

    shift = 0.01

    def finish(self, layer, arch, calib, index):
        for lin in (arch.attention_linears(layer)[3], arch.mlp_linears(layer)[2]):
            lin.weight.data += self.shift


def test_deferred_compensation_keeps_what_the_method_did_to_the_kept_columns():
    """At lam = 0 (linear fit) B maps kept columns to themselves, so a change D to the kept
    columns before compensation must survive exactly: W' = GRAIL(W) + D."""
    model = tiny_model("llama", 4, 4, layers=1)
    windows = random_windows(8, 24)
    config = PruneConfig(
        prune_method="wanda_sp", pruning_ratio=0.4, nsamples=8, compensate=True, ridge_lambda=0.0, grail_fit="linear"
    )
    now, late = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(now, windows, config, progress=False)
    shifting = Method("wanda_sp", WandaSelector(), UniformAllocation(0.4), (_Shift(),), defer_compensation=True)
    prune_model(late, windows, config, method=shifting, progress=False)
    arch = arch_for(model.config)
    # o_proj only: the MLP's statistics come after the attention, which the deferral changes
    a = arch.attention_linears(arch.decoder_layers(now)[0])[3].weight
    b = arch.attention_linears(arch.decoder_layers(late)[0])[3].weight
    torch.testing.assert_close(b, a + _Shift.shift, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compensate_first", [False, True])
def test_wanda_pp_end_to_end_on_a_tiny_model(compensate_first):
    model = tiny_model("mistral", 6, 2, layers=2)
    windows = random_windows(6, 24)
    config = PruneConfig(
        prune_method="wanda_pp_sp",
        pruning_ratio=0.4,
        nsamples=6,
        compensate=True,
        method_options=WandaPPOptions(compensate_first=compensate_first, ro_iter=2, ro_lr=1e-4),
    )
    report = prune_model(model, windows, config, progress=False)
    assert report.removed_fraction == pytest.approx(0.4, abs=0.03)
    assert all("lambda" in b for b in report.blocks)
    assert torch.isfinite(model(windows).logits).all()


def test_wanda_pp_runs_bfloat16_models_in_float32_layers():
    model = tiny_model("llama", 4, 2).to(torch.bfloat16)
    config = PruneConfig(
        prune_method="wanda_pp_sp", pruning_ratio=0.3, nsamples=4, method_options=WandaPPOptions(ro_iter=1)
    )
    prune_model(model, random_windows(4, 16), config, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_regional_optimisation_moves_the_layer_towards_the_dense_outputs():
    model = tiny_model("llama", 4, 2, layers=1)
    arch = arch_for(model.config)
    layer = arch.decoder_layers(model)[0]
    calib = capture_layer_inputs(model, arch, random_windows(4, 16), batch_size=2)
    samples = [(h, kw) for _, h, kw in iter_samples(layer, calib, 4)]
    with torch.no_grad():
        targets = [layer(h, **kw)[0] if isinstance(layer(h, **kw), tuple) else layer(h, **kw) for h, kw in samples]
        for lin in (arch.attention_linears(layer)[3], arch.mlp_linears(layer)[2]):
            lin.weight.mul_(0.5)  # a damaged layer

    def loss() -> float:
        with torch.no_grad():
            outs = [layer(h, **kw) for h, kw in samples]
            outs = [o[0] if isinstance(o, tuple) else o for o in outs]
            return sum(float(torch.nn.functional.mse_loss(o, t)) for o, t in zip(outs, targets, strict=True)) / 4

    before = loss()
    final = regional_optimisation(layer, samples, targets, rounds=3, lr=1e-3)
    assert final < before and loss() < 0.9 * before


def test_wanda_pp_regional_optimisation_changes_the_pruned_weights():
    """The engine runs the transform: with RO the layer's weights differ from RO's zero rounds."""
    model = tiny_model("llama", 4, 2, layers=1)
    windows = random_windows(4, 16)
    weights = []
    for rounds in (0, 2):
        config = PruneConfig(
            prune_method="wanda_pp_sp",
            pruning_ratio=0.3,
            nsamples=4,
            method_options=WandaPPOptions(ro_iter=rounds, ro_lr=1e-3),
        )
        pruned = copy.deepcopy(model)
        prune_model(pruned, windows, config, progress=False)
        weights.append(arch_for(model.config).decoder_layers(pruned)[0].mlp.up_proj.weight.clone())
    assert weights[0].shape == weights[1].shape
    assert (weights[0] - weights[1]).abs().max() > 1e-4
