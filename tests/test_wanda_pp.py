"""Wanda++: regional gradients against finite differences through the whole model, the
engine's deferred compensation, and the method end to end on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_windows, tiny_model

from grail import PruneConfig, prune_model
from grail.calibration import capture_layer_inputs, iter_samples
from grail.methods.wanda import WandaSP
from grail.methods.wanda_pp import regional_gradients
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


class _ShiftingWanda(WandaSP):
    """Wanda-SP whose finish_layer changes the consumers' kept columns, with compensation deferred."""

    defer_compensation = True
    shift = 0.01

    def finish_layer(self, layer, arch, calib, index):
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
    prune_model(late, windows, config, method=_ShiftingWanda(config), progress=False)
    arch = arch_for(model.config)
    # o_proj only: the MLP's statistics come after the attention, which the deferral changes
    a = arch.attention_linears(arch.decoder_layers(now)[0])[3].weight
    b = arch.attention_linears(arch.decoder_layers(late)[0])[3].weight
    torch.testing.assert_close(b, a + _ShiftingWanda.shift, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compensate_first", [False, True])
def test_wanda_pp_end_to_end_on_a_tiny_model(compensate_first):
    model = tiny_model("mistral", 6, 2, layers=2)
    windows = random_windows(6, 24)
    config = PruneConfig(
        prune_method="wanda_pp_sp",
        pruning_ratio=0.4,
        nsamples=6,
        compensate=True,
        compensate_first=compensate_first,
        ro_iter=2,
        ro_lr=1e-4,
    )
    report = prune_model(model, windows, config, progress=False)
    assert report.removed_fraction == pytest.approx(0.4, abs=0.03)
    assert all("lambda" in b for b in report.blocks)
    assert torch.isfinite(model(windows).logits).all()


def test_wanda_pp_runs_bfloat16_models_in_float32_layers():
    model = tiny_model("llama", 4, 2).to(torch.bfloat16)
    config = PruneConfig(prune_method="wanda_pp_sp", pruning_ratio=0.3, nsamples=4, ro_iter=1)
    prune_model(model, random_windows(4, 16), config, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
