"""Fitting consumers towards the dense model (``--grail_target``): closed forms against direct
solves on stored activations, the moments the engine records against a direct computation,
and the properties the targets must have on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_windows, tiny_model

from grail.calibration import advance_from_mid, capture_layer_inputs, layer_inputs, layer_output, run_layer, run_paired
from grail.compensate import (
    Moments,
    TargetMoments,
    choose_lambda,
    choose_target,
    fit_consumer,
    mean_bias_shift,
    output_sketch,
    retarget_refit,
    target_mean_shift,
)
from grail.config import ConfigError, PruneConfig
from grail.engine import check_target, prune_model
from grail.methods import make_method
from grail.methods.flap import FLAPOptions
from grail.methods.slimgpt import damped_hessian
from grail.models.arch import arch_for
from grail.policy import CompensationPolicy
from grail.stats import InputStats, TargetStats
from grail.sweep import run_label

KEPT = torch.tensor([0, 2, 3, 5, 8])
REMOVED = torch.tensor([1, 4, 6, 7])


def _activations(n=160, h=9, o=5, seed=0):
    """Pruned-model inputs, dense-model inputs near them, a residual drift, and a consumer weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(h, h, generator=g, dtype=torch.float64)
    pruned = torch.randn(n, h, generator=g, dtype=torch.float64) @ mix + 0.3
    dense = pruned + 0.4 * torch.randn(n, h, generator=g, dtype=torch.float64) @ mix
    drift = 0.5 * torch.randn(n, o, generator=g, dtype=torch.float64) + pruned[:, :o]
    weight = torch.randn(o, h, generator=g, dtype=torch.float64)
    return pruned, dense, drift, weight


def _targets(name, dense, drift, weight, pruned):
    return {"pruned": pruned @ weight.T, "dense": dense @ weight.T, "residual": dense @ weight.T + drift}[name]


def _stats(h, t, folds=1):
    """Gram statistics of ``h`` and target statistics of ``t``, rows split into contiguous folds."""
    gram, target = InputStats(h.shape[1], gram=True, n_folds=folds), TargetStats(t.shape[1], h.shape[1], n_folds=folds)
    for f, (hc, tc) in enumerate(zip(h.chunk(folds), t.chunk(folds), strict=True)):
        gram.update(hc, fold=f)
        target.update(tc, hc, fold=f)
    return gram, target


def _direct_ridge(h, t, weight, lam, affine, prior):
    """``min |Z A^T - T|^2 + lam' |A_P - A0|^2`` by least squares on stored rows (intercept unpenalised)."""
    z = h[:, KEPT]
    k = len(KEPT)
    scale = lam * (z.T @ z).diagonal().mean()
    if affine:
        z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    penalty = torch.zeros(k, z.shape[1], dtype=z.dtype)
    penalty[:, :k] = scale.sqrt() * torch.eye(k, dtype=z.dtype)
    anchor = scale.sqrt() * (weight[:, KEPT].T if prior == "pruned" else torch.zeros(k, t.shape[1], dtype=z.dtype))
    sol = torch.linalg.lstsq(torch.cat([z, penalty]), torch.cat([t, anchor])).solution
    return sol[:k].T, (sol[k] if affine else None)


@pytest.mark.parametrize("prior", ["zero", "pruned"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("name", ["dense", "residual"])
@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_fit_towards_a_target_equals_a_direct_solve(name, affine, prior, lam):
    pruned, dense, drift, weight = _activations()
    t = _targets(name, dense, drift, weight, pruned)
    gram, target = _stats(pruned, t)
    fit = fit_consumer(weight, gram.moments(), KEPT, lam, affine, prior=prior, target=target.moments())
    ref_w, ref_b = _direct_ridge(pruned, t, weight, lam, affine, prior)
    torch.testing.assert_close(fit.weight, ref_w, rtol=1e-8, atol=1e-9)
    if affine:
        torch.testing.assert_close(fit.bias_shift, ref_b, rtol=1e-8, atol=1e-9)


def test_the_pruned_target_written_as_moments_gives_todays_fit():
    pruned, _, _, weight = _activations()
    gram, target = _stats(pruned, pruned @ weight.T)
    today = fit_consumer(weight, gram.moments(), KEPT, 0.01, True)
    as_target = fit_consumer(weight, gram.moments(), KEPT, 0.01, True, target=target.moments())
    torch.testing.assert_close(as_target.weight, today.weight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prior", ["zero", "pruned"])
@pytest.mark.parametrize("fit_name", ["linear", "affine", "seed"])
@pytest.mark.parametrize("name", ["dense", "residual"])
def test_heldout_errors_towards_a_target_equal_direct_computation(name, fit_name, prior):
    pruned, dense, drift, weight = _activations(n=200)
    t = _targets(name, dense, drift, weight, pruned)
    gram, target = _stats(pruned, t, folds=4)
    choice = choose_lambda(
        weight, gram.fold_moments(), KEPT, fit_name, True, prior=prior, search="full", target=name,
        target_folds=target.fold_moments(),
    )  # fmt: skip
    h_chunks, t_chunks = pruned.chunk(4), t.chunk(4)
    for lam in (0.0, 1e-3, 1.0, None):
        direct = 0.0
        for f in range(4):
            train_h = torch.cat([c for i, c in enumerate(h_chunks) if i != f])
            train_t = torch.cat([c for i, c in enumerate(t_chunks) if i != f])
            mean_shift = weight[:, REMOVED] @ train_h.mean(0)[REMOVED]
            if lam is None:
                new_w, shift = weight[:, KEPT], mean_shift
            else:
                new_w, shift = _direct_ridge(train_h, train_t, weight, lam, fit_name == "affine", prior)
                if fit_name == "seed":
                    shift = mean_shift
            pred = h_chunks[f][:, KEPT] @ new_w.T + (0 if shift is None else shift)
            direct += (t_chunks[f] - pred).square().sum().item()
        got = choice.plain_error if lam is None else choice.errors[lam]
        assert got == pytest.approx(direct, rel=1e-8)


def test_target_choice_scores_every_target_on_the_yardstick_and_keeps_pruned_among_them():
    pruned, dense, drift, weight = _activations(n=400, seed=3)
    folds = {}
    for name in ("dense", "residual"):
        gram, folds[name] = _stats(pruned, _targets(name, dense, drift, weight, pruned), folds=4)
    folds = {name: s.fold_moments() for name, s in folds.items()}
    picked = choose_target(weight, gram.fold_moments(), KEPT, "affine", True, folds, prior="pruned", search="full")
    assert set(picked.choices) == {"pruned", "dense", "residual"}
    # each target's own choice is the single-target choice (one solve serves all targets: round-off apart)
    alone = choose_lambda(weight, gram.fold_moments(), KEPT, "affine", True, prior="pruned", search="full")
    assert picked.choices["pruned"].lam == alone.lam
    assert picked.choices["pruned"].errors == pytest.approx(alone.errors, rel=1e-12)
    # the residual target scored on its own yardstick is its own held-out error
    assert picked.errors["residual"] == pytest.approx(picked.choices["residual"].heldout_error, rel=1e-12)
    assert picked.target == min(picked.errors, key=picked.errors.get)
    assert picked.errors[picked.target] <= picked.errors["pruned"]
    # this data's drift is predictable from the kept inputs: absorbing it wins
    assert picked.target == "residual"


def test_sketched_target_errors_are_unbiased_estimates():
    """A consumer wider than the sketch: its held-out errors estimate the exact ones (mean over row subsets)."""
    g = torch.Generator().manual_seed(4)
    pruned = torch.randn(300, 9, generator=g, dtype=torch.float64) @ torch.randn(9, 9, generator=g, dtype=torch.float64)
    weight = torch.randn(600, 9, generator=g, dtype=torch.float64)
    t = (pruned + 0.2 * torch.randn(300, 9, generator=g, dtype=torch.float64)) @ weight.T
    gram, target = _stats(pruned, t, folds=4)
    assert target.sketch is not None and target.sketch.shape == (128, 600)
    assert torch.equal(target.sketch, output_sketch(600))
    sketched = choose_lambda(
        weight, gram.fold_moments(), KEPT, "affine", False, search="full", target="dense",
        target_folds=target.fold_moments(),
    )  # fmt: skip
    exact = 0.0
    for i in range(0, 600, 100):  # 100-row slices are scored exactly
        _, part = _stats(pruned, t[:, i : i + 100], folds=4)
        exact += choose_lambda(
            weight[i : i + 100], gram.fold_moments(), KEPT, "affine", False, search="full", target="dense",
            target_folds=part.fold_moments(),
        ).errors[1e-3]  # fmt: skip
    assert sketched.errors[1e-3] == pytest.approx(exact, rel=0.25)


def test_folds_keep_their_cross_moments_on_the_sketch_only():
    """Four folds of a 600-output consumer hold the whole cross moment once and each fold's on the sketch's
    128 rows; held-out errors equal those from each fold's whole cross moment, sketched when scored."""
    g = torch.Generator().manual_seed(5)
    pruned = torch.randn(300, 9, generator=g, dtype=torch.float64) @ torch.randn(9, 9, generator=g, dtype=torch.float64)
    weight = torch.randn(600, 9, generator=g, dtype=torch.float64)
    t = (pruned + 0.2 * torch.randn(300, 9, generator=g, dtype=torch.float64)) @ weight.T
    gram, target = _stats(pruned, t, folds=4)
    folds = target.fold_moments()
    assert all(f.sketched and f.cross.shape == (128, 9) for f in folds)
    torch.testing.assert_close(target.moments().cross, t.T @ pruned, rtol=1e-12, atol=1e-10)
    whole = [
        TargetMoments(tc.T @ hc, f.sums, f.sq, f.sketch_sq)
        for f, hc, tc in zip(folds, pruned.chunk(4), t.chunk(4), strict=True)
    ]
    for f, w in zip(folds, whole, strict=True):
        torch.testing.assert_close(f.cross, target.sketch @ w.cross, rtol=1e-12, atol=1e-10)
    common = dict(search="full", target="dense")
    fast = choose_lambda(weight, gram.fold_moments(), KEPT, "affine", False, target_folds=folds, **common)
    reference = choose_lambda(weight, gram.fold_moments(), KEPT, "affine", False, target_folds=whole, **common)
    assert fast.lam == reference.lam
    for lam, err in reference.errors.items():
        assert fast.errors[lam] == pytest.approx(err, rel=1e-10)
    assert fast.plain_error == pytest.approx(reference.plain_error, rel=1e-10)
    target.merge_folds()  # cross-validation is done: the sketched ones go, the whole one stays
    assert target.fold_scored_cross == [] and target.moments().cross.shape == (600, 9)


# ---------------------------------------------------------------- in the engine


@pytest.mark.parametrize(("biased", "lam"), [(False, 0.01), (True, 0.01), (True, "auto")])
def test_a_target_blended_to_nothing_is_pruneds_fit(biased, lam):
    """``--grail_target_blend 0``: the fit reproduces the consumer's own output, as ``pruned``'s does (the target
    then comes from each token's output in the model's dtype rather than from ``W G``: equal to round-off), with
    the consumers' biases left out of both sides, and the held-out choice of lambda the same."""
    dense_model = tiny_model("llama", 6, 2, layers=2, **({"attention_bias": True, "mlp_bias": True} if biased else {}))
    if biased:
        torch.manual_seed(1)
        for module in dense_model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.5)
    windows = random_windows(8, 16)
    base = dict(prune_method="wanda_sp", pruning_ratio=0.4, nsamples=8, compensate=True, ridge_lambda=lam)
    models, lambdas = {}, {}
    for name, extra in {"pruned": {}, "blend 0": {"grail_target": "residual", "grail_target_blend": 0.0},
                        "residual": {"grail_target": "residual"}}.items():  # fmt: skip
        models[name] = copy.deepcopy(dense_model)
        report = prune_model(models[name], windows, PruneConfig(**base, **extra), progress=False)
        lambdas[name] = [(b.get("lambda"), b.get("compensated")) for b in report.blocks]
    assert lambdas["blend 0"] == lambdas["pruned"]
    states = {name: m.state_dict() for name, m in models.items()}
    for key, value in states["pruned"].items():
        torch.testing.assert_close(states["blend 0"][key], value, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(states["residual"][k], v, rtol=1e-3, atol=1e-4) for k, v in states["pruned"].items())


def _recorded_updates(monkeypatch):
    """Every call of the compensation policy: (layer, kind, kept columns, target moments by name)."""
    calls = []
    real = CompensationPolicy.update

    def spy(self, weight, bias, kept_columns, selection, gram_stats, mean_bias, where, *args, **kwargs):
        targets = kwargs.get("targets") if "targets" in kwargs else (args[2] if len(args) > 2 else None)
        calls.append((where, kept_columns.clone(), {k: v.moments() for k, v in (targets or {}).items()}))
        return real(self, weight, bias, kept_columns, selection, gram_stats, mean_bias, where, *args, **kwargs)

    monkeypatch.setattr(CompensationPolicy, "update", spy)
    return calls


def _capture(model, windows, modules):
    """Inputs (pre-hook) of the named modules of ``model`` on ``windows``, in float64."""
    got, handles = {}, []
    for name in modules:
        handles.append(
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a, name=name: got.__setitem__(name, a[0].double().reshape(-1, a[0].shape[-1]))
            )
        )
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize("blend", [1.0, 0.25])
@pytest.mark.parametrize("target", ["dense", "residual"])
@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_recorded_target_moments_equal_a_direct_computation(monkeypatch, kind, target, blend):
    """Layer 1, after layer 0 was pruned: the engine's dense/residual moments against stored activations
    (``blend``: a quarter of the way from the consumer's own output to the target)."""
    calls = _recorded_updates(monkeypatch)
    dense_model = tiny_model("llama", 6, 2, layers=2)
    windows = random_windows(8, 16)
    pruned_model = copy.deepcopy(dense_model)
    config = PruneConfig(
        prune_method="wanda_sp", pruning_ratio=0.4, nsamples=8, compensate=True, ridge_lambda="auto",
        grail_target=target, grail_target_blend=blend, calib_batch_size=3,
    )  # fmt: skip
    prune_model(pruned_model, windows, config, progress=False)
    arch = arch_for(dense_model.config)
    # the model as layer 1's block saw it: pruned layer 0, layer 1 dense (attn) or with its pruned attention (mlp)
    seen = copy.deepcopy(pruned_model)
    layer_dense, layer_seen = arch.decoder_layers(dense_model)[1], arch.decoder_layers(seen)[1]
    if kind == "attn":
        seen.model.layers[1] = copy.deepcopy(layer_dense)
    else:
        layer_seen.mlp = copy.deepcopy(layer_dense.mlp)
    consumer = f"model.layers.1.{arch.consumer_names()[kind]}"
    residual_in = "model.layers.1" if kind == "attn" else "model.layers.1.post_attention_layernorm"
    d, p = _capture(dense_model, windows, [consumer, residual_in]), _capture(seen, windows, [consumer, residual_in])
    w0 = dense_model.get_submodule(consumer).weight.double()
    targets = {"dense": d[consumer] @ w0.T}
    targets["residual"] = targets["dense"] + d[residual_in] - p[residual_in]
    _, _, recorded = next(c for c in calls if c[0] == f"layer 1 {arch.consumer_names()[kind]}")
    assert set(recorded) == {target}
    own = p[consumer] @ w0.T  # pruned's target
    t = own + blend * (targets[target] - own)
    torch.testing.assert_close(recorded[target].cross, t.T @ p[consumer], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(recorded[target].sums, t.sum(0), rtol=1e-4, atol=1e-4)
    assert recorded[target].sq == pytest.approx(t.square().sum().item(), rel=1e-5)


def _batch_taps(arch, layer, hidden, kwargs):
    """One batch through ``layer``: its input, the consumers' inputs and outputs, its mid state and its output."""
    got, handles = {}, []

    def at_consumer(kind):
        return lambda m, a, out: got.update({(kind, "in"): a[0], (kind, "out"): out})

    for kind, name in arch.consumer_names().items():
        handles.append(layer.get_submodule(name).register_forward_hook(at_consumer(kind)))
    handles.append(layer.get_submodule(arch.mlp_norm).register_forward_pre_hook(lambda m, a: got.update(mid=a[0])))
    x, kw = layer_inputs(layer, hidden, kwargs)
    with torch.no_grad():
        got["output"] = layer_output(layer(x, **kw))
    got["input"] = x
    for h in handles:
        h.remove()
    return got


def _layer_taps(arch, layer, calib):
    return [_batch_taps(arch, layer, h, kw) for h, kw in zip(calib.hidden, calib.kwargs, strict=True)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("blocks", [("attn", "mlp"), ("attn",), ("mlp",)])
def test_the_dense_stream_runs_each_half_of_the_layer_once_and_ends_at_the_layers_output(family, blocks):
    """run_paired hands on the dense consumer's output (bias removed) and the drift of the block's input, and
    leaves the stream at the mid state (attention) or the output (MLP); advance_from_mid finishes the layer."""
    model = tiny_model(family, 6, 2, layers=2)
    arch = arch_for(model.config)
    dense_layer = arch.decoder_layers(model)[0]
    for name in arch.consumer_names().values():  # a bias on each consumer, which the targets leave out
        consumer = dense_layer.get_submodule(name)
        consumer.bias = torch.nn.Parameter(0.3 * torch.randn(consumer.out_features), requires_grad=False)
    layer = copy.deepcopy(dense_layer)  # the layer being pruned: another attention, another input
    layer.get_submodule(arch.consumer_names()["attn"]).weight.mul_(0.5)
    windows = random_windows(5, 16)
    dense = capture_layer_inputs(model, arch, windows, batch_size=2).first_samples(4)  # as the engine keeps it
    calib = capture_layer_inputs(model, arch, windows, batch_size=2)
    calib.hidden = [h + 0.1 * torch.randn_like(h) for h in calib.hidden]
    want, seen = _layer_taps(arch, dense_layer, dense), _layer_taps(arch, layer, calib)
    limit, at = 4, "input"
    got = []
    for kind in blocks:
        got.clear()
        run_paired(
            arch, kind, layer, dense_layer, calib, dense, limit, lambda *a: got.append(a), dense_at_mid=at == "mid"
        )
        at = "mid" if kind == "attn" else "output"
        assert [int(ids) for ids, *_ in got] == list(range(limit))  # a window at a time, those below the limit
        block_in = "input" if kind == "attn" else "mid"
        bias = dense_layer.get_submodule(arch.consumer_names()[kind]).bias.double()
        windows_of = lambda taps, key: torch.cat([t[key] for t in taps])[:limit].split(1)  # noqa: E731
        for (_, inputs, dense_out, drift), h, out, d_in, p_in in zip(
            got, windows_of(seen, (kind, "in")), windows_of(want, (kind, "out")),
            windows_of(want, block_in), windows_of(seen, block_in), strict=True,
        ):  # fmt: skip
            torch.testing.assert_close(inputs, h, rtol=0, atol=0)
            torch.testing.assert_close(dense_out, out.double() - bias, rtol=0, atol=0)
            torch.testing.assert_close(drift, d_in.double() - p_in.double(), rtol=0, atol=0)
    if at == "mid":
        advance_from_mid(arch, dense_layer, dense)
    elif at == "input":
        run_layer(dense_layer, dense, update=True)
    for hidden, w in zip(dense.hidden, want, strict=True):
        assert torch.equal(hidden, w["output"])  # the stock layer's own output, to the bit


def test_without_earlier_pruning_every_target_gives_the_pruned_fit():
    """Layer 0's attention block sees the dense model's own inputs: dense = residual = pruned."""
    model = tiny_model("llama", 6, 2, layers=2)
    windows = random_windows(8, 16)
    weights = {}
    for target in ("pruned", "dense", "residual"):
        m = copy.deepcopy(model)
        config = PruneConfig(
            prune_method="wanda_sp", pruning_ratio=0.4, nsamples=8, compensate=True, ridge_lambda=0.01,
            grail_target=target, calib_batch_size=3,
        )  # fmt: skip
        prune_model(m, windows, config, progress=False)
        weights[target] = m.model.layers[0].self_attn.o_proj
    for target in ("dense", "residual"):
        torch.testing.assert_close(weights[target].weight, weights["pruned"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights[target].bias, weights["pruned"].bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["wanda_sp", "flap", "slimgpt", "wanda_pp_sp", "mag_sp"])
def test_residual_target_brings_the_final_hidden_state_closer_to_the_dense_model(method):
    model = tiny_model("llama", 6, 2, layers=3)
    windows = random_windows(16, 24)
    with torch.no_grad():
        dense = model(windows, output_hidden_states=True).hidden_states[-1]
    errors = {}
    for target in ("pruned", "residual"):
        m = copy.deepcopy(model)
        config = PruneConfig(
            prune_method=method, pruning_ratio=0.5, nsamples=16, compensate=True, ridge_lambda=0.01,
            grail_target=target, calib_batch_size=5,
        )  # fmt: skip
        prune_model(m, windows, config, progress=False)
        with torch.no_grad():
            errors[target] = (m(windows, output_hidden_states=True).hidden_states[-1] - dense).norm().item()
    assert errors["residual"] < errors["pruned"]


def test_auto_target_reports_its_choice_per_consumer():
    model = tiny_model("qwen2", 6, 3, layers=2)
    config = PruneConfig(
        prune_method="flap", pruning_ratio=0.4, nsamples=8, compensate=True, ridge_lambda="auto",
        grail_target="auto", calib_batch_size=3,
    )  # fmt: skip
    report = prune_model(model, random_windows(8, 16), config, progress=False)
    for row in report.blocks:
        assert row["target"] in ("pruned", "residual", "plain")
        errors = row["target_heldout_errors"]
        assert set(errors) == {"pruned", "residual", "plain"}
        best = min(errors, key=errors.get)
        assert row["target"] == best or errors[row["target"]] == errors[best]
        assert row["compensated"] == (row["target"] != "plain")


def test_target_options_are_checked():
    with pytest.raises(ConfigError, match="add --compensate --ridge_lambda auto"):
        PruneConfig(grail_target="auto", ridge_lambda="auto")
    assert PruneConfig(grail_target="dense").grail_target == "dense"  # a method's own update, where it makes one
    for method, extra in (("wanda_sp", {}), ("mag_sp", {}), ("flap", {"bias_compensation": False})):
        config = PruneConfig(prune_method=method, grail_target="dense", **extra)
        with pytest.raises(ConfigError, match=f"{method} makes none.*add --compensate"):
            check_target(config, make_method(config))
    for method in ("flap", "slimgpt"):
        config = PruneConfig(prune_method=method, grail_target="residual")
        check_target(config, make_method(config))
    # a sweep's plain runs are labelled with the target their own update follows
    assert run_label({"prune_method": "flap", "compensate": False, "grail_target": "dense"}, set()) == (
        "flap (grail_target=dense)"
    )
    assert run_label({"prune_method": "flap", "compensate": False, "grail_target": "pruned"}, set()) == "flap"
    blended = {"prune_method": "flap", "compensate": True, "grail_target": "residual", "grail_target_blend": 0.25}
    assert run_label(blended, {"grail_target"}) == "flap + GRAIL (grail_target=residual, grail_target_blend=0.25)"
    with pytest.raises(ConfigError, match="use it with --ridge_lambda auto"):
        PruneConfig(grail_target="auto", compensate=True, ridge_lambda=0.01)
    assert PruneConfig(grail_target="residual", compensate=True).grail_target == "residual"


# A method's own update (no --compensate) towards a dense-model target.


@pytest.mark.parametrize("name", ["pruned", "dense", "residual"])
def test_the_mean_bias_towards_a_target_is_the_least_squares_intercept(name):
    pruned, dense, drift, weight = _activations()
    t = _targets(name, dense, drift, weight, pruned)
    gram, target = _stats(pruned, t)
    shift = target_mean_shift(weight, target.moments(), gram.sum, gram.count, KEPT)
    # argmin_d sum_n |t_n - W[:, P] h_n[P] - d|^2, on the stored rows
    torch.testing.assert_close(shift, (t - pruned[:, KEPT] @ weight[:, KEPT].T).mean(dim=0), rtol=1e-10, atol=1e-10)
    if name == "pruned":  # FLAP's mean bias
        torch.testing.assert_close(shift, mean_bias_shift(weight, gram.mean, KEPT), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("name", ["pruned", "dense", "residual"])
def test_a_damped_refit_towards_a_target_equals_a_direct_solve(name, affine):
    """SlimGPT's refit on ``G + diag(d)`` towards ``t``: ``min sum |t - W' h[P] - c|^2 + sum_j d_j |W'_j - W_j|^2``."""
    pruned, dense, drift, weight = _activations()
    t = _targets(name, dense, drift, weight, pruned)
    gram, target = _stats(pruned, t)
    refit = Moments(damped_hessian(gram.gram), gram.sum, gram.count)
    fit = fit_consumer(
        weight, refit, KEPT, 0.0, affine, target=retarget_refit(weight, refit, gram.gram, target.moments())
    )
    damping = (refit.gram.diagonal() - gram.gram.diagonal())[KEPT]
    z = pruned[:, KEPT]
    if affine:
        z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    penalty = torch.zeros(len(KEPT), z.shape[1], dtype=z.dtype)
    penalty[:, : len(KEPT)] = torch.diag(damping.sqrt())
    anchor = damping.sqrt().unsqueeze(1) * weight[:, KEPT].T
    sol = torch.linalg.lstsq(torch.cat([z, penalty]), torch.cat([t, anchor])).solution
    torch.testing.assert_close(fit.weight, sol[: len(KEPT)].T, rtol=1e-8, atol=1e-9)
    if affine:
        torch.testing.assert_close(fit.bias_shift, sol[len(KEPT)], rtol=1e-8, atol=1e-9)
    if name == "pruned":  # the method's own refit, as it was
        plain = fit_consumer(weight, refit, KEPT, 0.0, affine)
        torch.testing.assert_close(fit.weight, plain.weight, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method", ["flap", "slimgpt"])
def test_a_methods_own_update_towards_the_dense_model(method):
    """Without --compensate: layer 0's MLP block (the first pruned at this ratio) sees the dense inputs, so every
    target gives the method's own update there; after it the targets differ, and a run is repeatable."""
    model = tiny_model("llama", 6, 2, layers=3)
    windows = random_windows(8, 16)
    layers = {}
    for target in ("pruned", "dense", "residual", "residual"):
        m = copy.deepcopy(model)
        config = PruneConfig(
            prune_method=method, pruning_ratio=0.4, nsamples=8, grail_target=target, calib_batch_size=3
        )
        report = prune_model(m, windows, config, progress=False)
        assert [row.get("target", "pruned") for row in report.blocks] == [target] * len(report.blocks)
        if target in layers:  # a fixed seed gives the same result twice
            assert torch.equal(layers[target][-1].mlp.down_proj.bias, m.model.layers[-1].mlp.down_proj.bias)
        layers[target] = m.model.layers
        assert m.model.layers[0].self_attn.o_proj.in_features == model.model.layers[0].self_attn.o_proj.in_features
        assert m.model.layers[0].mlp.down_proj.in_features < model.model.layers[0].mlp.down_proj.in_features
    first = {name: layer[0].mlp.down_proj for name, layer in layers.items()}
    for target in ("dense", "residual"):
        torch.testing.assert_close(first[target].weight, first["pruned"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(first[target].bias, first["pruned"].bias, rtol=1e-5, atol=1e-6)
    last = {name: layer[-1].mlp.down_proj.bias for name, layer in layers.items()}
    assert not torch.allclose(last["dense"], last["pruned"], rtol=1e-3, atol=1e-4)
    assert not torch.allclose(last["residual"], last["dense"], rtol=1e-3, atol=1e-4)


def test_for_flap_dense_and_residual_coincide_where_every_earlier_block_was_pruned():
    """Each retargeted intercept gives a block's mean output the target's mean, so the residual stream's mean
    drift stays zero while every block is pruned (UL-UM prunes them all)."""
    model = tiny_model("llama", 6, 2, layers=3)
    windows = random_windows(8, 16)
    biases = {}
    for target in ("dense", "residual"):
        m = copy.deepcopy(model)
        config = PruneConfig(
            prune_method="flap", pruning_ratio=0.4, nsamples=8, grail_target=target, calib_batch_size=3,
            method_options={"flap": FLAPOptions(structure="UL-UM")},
        )  # fmt: skip
        report = prune_model(m, windows, config, progress=False)
        assert len(report.blocks) == 6  # every block pruned
        biases[target] = [
            b for layer in m.model.layers for b in (layer.self_attn.o_proj.bias, layer.mlp.down_proj.bias)
        ]
    for dense, residual in zip(biases["dense"], biases["residual"], strict=True):
        torch.testing.assert_close(residual, dense, rtol=1e-5, atol=1e-6)


def test_a_retargeted_flap_bias_is_the_intercept_on_the_pruned_models_own_inputs():
    """FLAP's plan reads the dense model's statistics; its retargeted bias must use the pruned model's inputs:
    ``b0 + mean(W0 h_d) - W[:, P] mean(h_p[P])`` at the last consumer, from activations recorded directly."""
    model = tiny_model("llama", 6, 2, layers=3)
    windows = random_windows(8, 16)
    pruned = copy.deepcopy(model)
    config = PruneConfig(prune_method="flap", pruning_ratio=0.4, nsamples=8, grail_target="dense", calib_batch_size=3)
    prune_model(pruned, windows, config, progress=False)

    def consumer_inputs(m):
        seen = []
        consumer = m.model.layers[-1].mlp.down_proj
        handle = consumer.register_forward_pre_hook(lambda _, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            m(windows)
        handle.remove()
        return consumer, torch.cat(seen).double()

    dense_consumer, h_d = consumer_inputs(model)
    pruned_consumer, h_p = consumer_inputs(pruned)
    assert pruned_consumer.in_features < dense_consumer.in_features
    dense_bias = 0.0 if dense_consumer.bias is None else dense_consumer.bias.double()
    want = dense_bias + h_d.mean(0) @ dense_consumer.weight.double().T - h_p.mean(0) @ pruned_consumer.weight.double().T
    torch.testing.assert_close(pruned_consumer.bias.double(), want, rtol=1e-4, atol=1e-5)
