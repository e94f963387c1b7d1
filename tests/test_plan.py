"""The planner: shapes from configs, the plan's verdicts and suggestions, and its predictions against measured peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from grail.config import PruneConfig
from grail.plan import GIB, ModelShape, Setting, plan_run

LLAMA_2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip


def _config_folder(folder: Path, **widths) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"} | widths))
    return folder


@pytest.mark.parametrize("family, tied", [("llama", False), ("qwen2", True), ("mistral", False)])
def test_shape_counts_every_parameter(family, tied):
    config = AutoConfig.for_model(
        family, vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    shape = ModelShape.from_config(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert shape.layers * shape.layer_params(0.5) < shape.layers * shape.layer_params()


def _setting(**prune) -> Setting:
    base = dict(prune_method="flap", pruning_ratio=0.5, nsamples=128, compensate=True)
    return Setting(PruneConfig(**(base | prune)), seqlen=2048, dtype="bfloat16", device="cuda")


def test_plan_orders_settings_by_what_they_hold():
    shape = ModelShape.from_config(AutoConfig.for_model("llama", **LLAMA_2_70B))
    fixed = plan_run(shape, _setting(ridge_lambda=0.001))
    auto = plan_run(shape, _setting(ridge_lambda="auto"))
    two_folds = plan_run(shape, _setting(ridge_lambda="auto", cv_folds=2))
    residual = plan_run(shape, _setting(ridge_lambda="auto", grail_target="residual"))
    assert fixed.peak_device_bytes < two_folds.peak_device_bytes < auto.peak_device_bytes
    assert residual.peak_device_bytes > auto.peak_device_bytes
    streamed = plan_run(shape, replace(_setting(ridge_lambda="auto"), mode="streaming"))
    assert streamed.peak_device_bytes < auto.peak_device_bytes / 2
    # the 70B model's weights alone (about 129 GiB in bf16) are what the in-memory run must hold
    assert auto.peak_device_bytes > shape.params() * 2


def test_plan_says_what_makes_a_run_fit():
    shape = ModelShape.from_config(AutoConfig.for_model("llama", **LLAMA_2_70B))
    plan = plan_run(shape, _setting(ridge_lambda="auto"), device_memory=74.5, host_memory=59.6)
    assert plan.fits is False
    assert plan.limiting_stage
    assert any("--offload" in s for s in plan.suggestions)
    # the suggested setting fits by the same model
    streamed_setting = replace(_setting(ridge_lambda="auto"), mode="streaming")
    streamed = plan_run(shape, streamed_setting, device_memory=74.5, host_memory=59.6)
    assert streamed.fits is True
    assert plan_run(shape, _setting(), device_memory=None, host_memory=None).fits is None


def test_a_target_keeps_its_whole_cross_moment_once_and_each_folds_on_the_sketch():
    shape = ModelShape.from_config(AutoConfig.for_model("llama", **LLAMA_2_70B))
    plan = plan_run(shape, _setting(ridge_lambda="auto", grail_target="residual", stats_device="device"))
    stages = {s["stage"]: s["device"] for s in plan.stages}
    statistics, solve = stages["statistics, MLP block"], stages["solve, MLP block"]
    assert statistics["target cross moments (1, whole)"] == 8192 * 28672 * 8
    assert statistics["target cross moments (1 x 4 folds, sketched)"] == 4 * 128 * 28672 * 8
    assert solve["target cross moments (1, whole)"] == 8192 * 28672 * 8
    assert not any(name.endswith("sketched)") for name in solve)  # dropped with the folds


@pytest.mark.parametrize(("target", "blend", "copies"), [("dense", 1.0, 2), ("residual", 1.0, 3), ("residual", 0.1, 4)])
def test_a_windows_targets_are_planned_in_float64(target, blend, copies):
    """The dense output and the drift, the residual target, a blend's own output and result, a window at a time."""
    shape = ModelShape.from_config(AutoConfig.for_model("llama", **LLAMA_2_70B))
    plan = plan_run(shape, _setting(ridge_lambda="auto", grail_target=target, grail_target_blend=blend))
    stages = {s["stage"]: s["device"] for s in plan.stages}
    assert stages["statistics, MLP block"]["dense-model targets of a window (float64)"] == copies * 2048 * 8192 * 8
    assert "dense-model targets of a window (float64)" not in stages["solve, MLP block"]  # gone with the pass


@pytest.mark.parametrize("target", ["pruned", "residual"])
def test_slimgpt_without_compensation_plans_its_own_refit(target):
    shape = ModelShape.from_config(AutoConfig.for_model("llama", **LLAMA_2_70B))
    plan = plan_run(shape, _setting(prune_method="slimgpt", compensate=False, grail_target=target))
    stages = {s["stage"]: s for s in plan.stages}
    refit = stages["refit, MLP block"]["device"]
    kept = 28672 // 2
    assert refit["system, overwritten by its factor"] == (kept + 1) ** 2 * 8
    assert refit["right-hand side, overwritten by the solution"] == 8192 * (kept + 1) * 8
    assert "SlimGPT's damped Hessian, kept for its refit" in refit
    assert any(name.startswith("target cross moments") for name in refit) == (target != "pruned")
    assert "solve, MLP block" not in stages
    # the refit's factorisation and solve are in the time, as GRAIL's one solve at a fixed lambda is
    compensated = plan_run(shape, _setting(prune_method="slimgpt", ridge_lambda=0.001))
    assert plan.time["solve_passes"] == compensated.time["solve_passes"]


LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)  # fmt: skip


def test_stats_device_auto_takes_the_host_only_when_the_device_cannot_hold_them():
    shape = ModelShape.from_config(AutoConfig.for_model("llama", **LLAMA_3_8B))
    gpu_24gb = 24e9 / GIB
    planned = {
        where: plan_run(shape, _setting(ridge_lambda="auto", stats_device=where), device_memory=gpu_24gb)
        for where in ("device", "host", "auto")
    }
    assert planned["device"].fits is False and planned["host"].fits is True
    assert planned["auto"].stats_device == "host" and planned["auto"].fits is True
    assert planned["auto"].peak_device_bytes == planned["host"].peak_device_bytes
    assert any("--stats_device auto chooses host" in note for note in planned["auto"].notes)
    on_a_big_gpu = plan_run(shape, _setting(ridge_lambda="auto"), device_memory=80e9 / GIB)
    assert on_a_big_gpu.stats_device == "device"
    assert (
        on_a_big_gpu.peak_device_bytes
        == plan_run(
            shape, _setting(ridge_lambda="auto", stats_device="device"), device_memory=80e9 / GIB
        ).peak_device_bytes
    )
    # the margin: a device just large enough for the plan's peak is not chosen (where the activations live
    # also depends on the device's memory, so the peak is that of a device that holds them)
    peak = on_a_big_gpu.peak_device_bytes
    assert plan_run(shape, _setting(ridge_lambda="auto"), device_memory=peak / GIB).stats_device == "host"
    assert plan_run(shape, _setting(ridge_lambda="auto"), device_memory=peak / 0.949 / GIB).stats_device == "device"
    # where the statistics do not set the peak (here a wide evaluation batch does), the host would not lower it,
    # and they stay on the device even when nothing fits
    evaluating = replace(_setting(), eval_windows=160, eval_batch_size=64)
    sets_it = {
        w: plan_run(shape, replace(evaluating, prune=replace(evaluating.prune, stats_device=w)), device_memory=20.0)
        for w in ("device", "host")
    }
    assert sets_it["device"].limiting_stage == "evaluation" and sets_it["device"].fits is False
    assert sets_it["device"].peak_device_bytes == sets_it["host"].peak_device_bytes
    assert plan_run(shape, evaluating, device_memory=20.0).stats_device == "device"
    # nothing to choose: no solves, the CPU, or an unknown device memory
    assert plan_run(shape, _setting(compensate=False), device_memory=1.0).stats_device == "device"
    assert plan_run(shape, replace(_setting(), device="cpu"), device_memory=1.0).stats_device == "device"
    assert plan_run(shape, _setting(ridge_lambda="auto")).stats_device == "device"


def test_stats_device_auto_keeps_every_fix_in_the_suggestions():
    shape = ModelShape.from_config(AutoConfig.for_model("llama", **LLAMA_2_70B))
    plan = plan_run(shape, _setting(ridge_lambda="auto"), device_memory=74.5, host_memory=16)
    assert plan.fits is False and plan.stats_device == "host"
    # streamed, auto puts the statistics back on the GPU, and that alone fits
    streamed = next(s for s in plan.suggestions if s.startswith("--offload"))
    assert "device 36.5 GiB" in streamed


def test_a_run_makes_stats_device_auto_definite_from_its_plan(monkeypatch):
    from types import SimpleNamespace

    import torch
    from conftest import random_windows, tiny_model

    import grail.distributed
    import grail.plan
    from grail.engine import definite_stats_device, prune_model

    model = tiny_model("llama", 6, 2, layers=2)
    windows = random_windows(8, 16)
    config = PruneConfig(prune_method="wanda_sp", pruning_ratio=0.3, nsamples=8, compensate=True, ridge_lambda="auto")
    assert config.stats_device == "auto"
    report = prune_model(tiny_model("llama", 6, 2, layers=2), windows, config, progress=False)
    assert report.stats_device == "device" and report.as_dict()["stats_device"] == "device"  # the CPU: one memory

    # a model on a GPU (faked: only the planning reads where it is)
    gpu_weight = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    monkeypatch.setattr(model, "get_input_embeddings", lambda: SimpleNamespace(weight=gpu_weight))
    planned, choose = [], grail.plan.choose_stats_device
    monkeypatch.setattr(
        grail.plan, "choose_stats_device", lambda shape, s: planned.append((shape, s)) or choose(shape, s)
    )

    def chosen_with(memory: int, config=config) -> str:
        monkeypatch.setattr(grail.plan, "device_memory_of_run", lambda device, model_bytes: memory)
        return definite_stats_device(config, model, windows, streaming=False).stats_device

    assert chosen_with(100 * GIB) == "device"
    shape, setting = planned[-1]
    assert (setting.seqlen, setting.dtype, setting.device, setting.mode, setting.processes) == (
        16,
        "bfloat16",
        "cuda",
        "memory",
        1,
    )
    assert setting.device_memory == 100 * GIB and shape == ModelShape.from_config(model.config)
    # between the two plans' peaks: the host, which fits; below both it still lowers the peak
    peaks = {
        where: plan_run(shape, replace(setting, prune=replace(config, stats_device=where))).peak_device_bytes
        for where in ("device", "host")
    }
    assert peaks["host"] < peaks["device"]
    assert chosen_with(int(peaks["device"] / 0.949)) == "device"
    assert chosen_with(int(peaks["device"] / 0.95) - 2**20) == "host"
    assert chosen_with(peaks["host"] // 2) == "host"
    # every rank takes the host where one needs it
    monkeypatch.setattr(grail.distributed, "all_gather_objects", lambda obj: ["device", "host"])
    assert chosen_with(100 * GIB) == "host"
    given = replace(config, stats_device="device")
    assert definite_stats_device(given, model, windows, streaming=False) is given


def test_grail_plan_from_a_config_alone(tmp_path, capsys):
    from grail.cli import main

    folder = _config_folder(tmp_path / "llama-2-70b", **LLAMA_2_70B)  # no weights at all
    out = tmp_path / "plan.json"
    argv = ["plan", "--model", str(folder), "--compensate", "--ridge_lambda", "auto", "--dtype", "bfloat16",
            "--device", "cuda", "--device_memory", "74.5", "--host_memory", "59.6", "--output_json", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "--offload" in text
    plan = json.loads(out.read_text())
    for key in ("peak_host_bytes", "peak_device_bytes", "limiting_stage", "fits", "stages", "time", "suggestions"):
        assert key in plan
    assert plan["fits"] is False
    stages = [s["stage"] for s in plan["stages"]]
    assert stages[0] == "loading" and "solve, MLP block" in stages
    assert plan["time"]["total_passes"] > plan["time"]["forward_passes"] > 1

    import grail

    config = grail.RunConfig(model=str(folder), dtype="bfloat16", device="cuda",
                             prune=PruneConfig(compensate=True, ridge_lambda="auto"))  # fmt: skip
    assert grail.plan_config(config, 74.5, 59.6).as_dict() == plan  # the Python API gives the same plan

    assert main(["plan", "--model", str(folder), "--processes", "0"]) == 2
    assert main(["plan", "--model", str(folder), "--host_memory", "-1"]) == 2
    assert main(["plan", "--model", str(tmp_path / "missing")]) == 2


def test_dry_run_prints_the_plan_and_reads_no_weights(tmp_path, capsys):
    from grail.cli import main

    folder = _config_folder(tmp_path / "config-only", **LLAMA_2_70B)
    out = tmp_path / "plan.json"
    assert main(["--model", str(folder), "--device", "cpu", "--dry_run", "--output_json", str(out)]) == 0
    assert "peak: host" in capsys.readouterr().out
    assert json.loads(out.read_text())["mode"] == "memory"


def test_out_of_memory_names_the_plan_and_what_would_fit(tmp_path, capsys, monkeypatch):
    import torch

    from grail.cli import main

    folder = _config_folder(tmp_path / "config-only", **LLAMA_2_70B)

    def run_out_of_memory(config, progress=True):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.12 GiB")

    monkeypatch.setattr("grail.pipeline.run", run_out_of_memory)
    argv = ["--model", str(folder), "--device", "cpu", "--compensate", "--ridge_lambda", "auto", "-q"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (CUDA out of memory. Tried to allocate 6.12 GiB)")
    assert "grail plan" in err and "--offload" in err and "Traceback" not in err
    # any other error is not dressed up as one
    monkeypatch.setattr("grail.pipeline.run", lambda config, progress=True: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        main(argv)


# ---- predictions against measurements, in fresh processes ---------------------------------------

MEASURED_SETTINGS = {
    "in memory, fixed lambda": ["--prune_method", "wanda_sp", "--compensate", "--ridge_lambda", "0.001"],
    "streaming, auto lambda": ["--prune_method", "flap", "--compensate", "--ridge_lambda", "auto", "--offload"],
}


@pytest.fixture(scope="module")
def synthetic_model(smollm2_available, tmp_path_factory) -> Path:
    """A random LLaMA-shaped model big enough that its statistics, not the Python runtime, set the peak."""
    import torch
    from transformers import AutoTokenizer

    import grail
    from grail.models.loading import resolve_model

    location, gguf = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
        num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("synthetic") / "model"
    grail.save_pruned(AutoModelForCausalLM.from_config(config).eval(), tokenizer, folder)
    return folder


@pytest.mark.parametrize("setting", list(MEASURED_SETTINGS))
def test_predicted_peak_within_15_percent_of_measured(setting, synthetic_model, data_dir, tmp_path):
    from grail.cli import build_plan_parser, config_from_args
    from grail.plan import model_shape, setting_from_config

    out = tmp_path / "run.json"
    argv = ["--model", str(synthetic_model), *MEASURED_SETTINGS[setting], "--pruning_ratio", "0.5",
            "--nsamples", "16", "--seqlen", "256", "--calib_batch_size", "8", "--data_dir", str(data_dir),
            "--eval", "--eval_samples", "2", "--eval_batch_size", "2", "--device", "cpu"]  # fmt: skip
    if "--offload" in argv:
        argv += ["--save_model", str(tmp_path / "pruned")]
    child = "import sys; from grail.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run(
        [sys.executable, "-c", child, *argv, "--output_json", str(out), "-q"],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    measured = json.loads(out.read_text())["memory"]["peak_host_bytes"]
    config = config_from_args(build_plan_parser().parse_args(argv))
    predicted = plan_run(model_shape(config.model), setting_from_config(config)).peak_host_bytes
    assert abs(predicted / measured - 1) <= 0.15, (predicted / GIB, measured / GIB)


# ---- the memory cuts change no result ---------------------------------------------------------


def test_merging_folds_gives_the_same_totals_in_place():
    import torch

    from grail.stats import InputStats, TargetStats

    g = torch.Generator().manual_seed(0)
    stats, target = InputStats(6, gram=True, n_folds=4), TargetStats(3, 6, n_folds=4)
    for fold in range(4):
        x = torch.randn(20, 6, generator=g)
        stats.update(x, fold)
        target.update(x[:, :3] * 2.0, x, fold)
    before, target_before = stats.moments(), target.moments()
    first = stats.fold_grams[0]
    stats.merge_folds()
    target.merge_folds()
    after, target_after = stats.moments(), target.moments()
    assert stats.n_folds == 1 and stats.fold_grams[0] is first  # no new matrix
    assert torch.equal(after.gram, before.gram) and torch.equal(after.sums, before.sums)
    assert after.count == before.count
    assert torch.equal(target_after.cross, target_before.cross) and target_after.sq == target_before.sq


@pytest.mark.parametrize("lam", ["auto", 0.01])
def test_statistics_on_the_host_give_the_same_model(lam):
    import torch
    from conftest import random_windows, tiny_model

    from grail.engine import prune_model

    weights = {}
    for where in ("device", "host"):
        model = tiny_model("llama", 6, 2, layers=2)
        config = PruneConfig(prune_method="wanda_sp", pruning_ratio=0.3, nsamples=8, compensate=True,
                             ridge_lambda=lam, stats_device=where, grail_target="residual" if lam == "auto" else "pruned")  # fmt: skip
        prune_model(model, random_windows(8, 16), config, progress=False)
        weights[where] = model.state_dict()
    assert all(torch.equal(weights["device"][k], weights["host"][k]) for k in weights["device"])


def test_cross_validation_keeps_no_fits():
    import torch

    from grail.compensate import CrossValidation
    from grail.stats import InputStats

    g = torch.Generator().manual_seed(1)
    stats = InputStats(8, gram=True, n_folds=4)
    for fold in range(4):
        stats.update(torch.randn(30, 8, generator=g), fold)
    cv = CrossValidation(torch.randn(5, 8, generator=g), stats.fold_moments(), torch.arange(5), "affine", False)
    choice = cv.choose(search="full")
    assert choice.lam in choice.errors
    # what it keeps per candidate are floats, not O x K weights
    assert all(
        isinstance(x, float) or x is None for terms in cv._terms.values() for pair in terms.values() for x in pair
    )


SOLVE_MEMORY = """
import sys, torch
import grail.compensate
from grail.compensate import choose_lambda, fit_consumer
from grail.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from grail.stats import InputStats

torch.set_num_threads(1)
grail.compensate.BLOCK_ELEMENTS = 2**17  # 1 MiB blocks: the terms measured are the K x K ones
g = torch.Generator().manual_seed(0)
width, kept_count = 1400, 1200
stats = InputStats(width, gram=True, n_folds=4)
mixing = torch.randn(width, width, generator=g) / width**0.5
for fold in range(4):
    stats.update(torch.randn(400, width, generator=g) @ mixing, fold)
weight = torch.randn(300, width, generator=g)
kept = torch.arange(kept_count)
# the same calls on a small problem first, so that the libraries' code and workspaces are resident already
small = InputStats(200, gram=True, n_folds=4)
for fold in range(4):
    small.update(torch.randn(100, 200, generator=g), fold)
choose_lambda(weight[:, :200], small.fold_moments(), kept[:150], "affine", False, prior="pruned", start=0.01)
fit_consumer(weight[:, :200], small.moments(), kept[:150], 0.01, affine=True, prior="pruned")
extra = {}
for name in ("cross-validation", "solve"):
    if name == "solve":
        stats.merge_folds()
    before = rss_bytes()
    reset_peak_rss()
    if name == "solve":
        fit_consumer(weight, stats.moments(), kept, 0.01, affine=True, prior="pruned")
    else:
        choose_lambda(weight, stats.fold_moments(), kept, "affine", False, prior="pruned", search="local", start=0.01)
    extra[name] = (peak_rss_bytes() - before) / (8 * kept_count**2)
print(extra["cross-validation"], extra["solve"])
"""


SPENT_SOLVE_MEMORY = """
import sys, torch
from grail.compensate import Moments, fit_consumer
from grail.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from grail.stats import InputStats

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
width = 2800
stats = InputStats(width, gram=True)
stats.update(torch.randn(1600, width, generator=g) @ (torch.randn(width, width, generator=g) / width**0.5))
weight = torch.randn(300, width, generator=g)
half = torch.arange(0, width, 2)  # 50% removed: the system and a copy of G[P, P] fit in G's memory
fit_consumer(weight[:, :200], Moments(stats.gram[:200, :200].clone(), stats.sum[:200], 1600), half[:100], 0.01, True)
extra = []
for spent in (False, True):
    moments = Moments(stats.gram.clone(), stats.sum, stats.count)
    before = rss_bytes()
    reset_peak_rss()
    fit_consumer(weight, moments, half, 0.01, affine=True, prior="pruned", gram_is_spent=spent)
    extra.append((peak_rss_bytes() - before) / (8 * len(half) ** 2))
    del moments
print(*extra)
"""


def test_solves_hold_one_factor_at_a_time():
    """Measured in a fresh process, in K x K float64 matrices: the final solve holds its system (overwritten by
    its factor) and the right-hand side; cross-validation the training system, the folds' total G[P, P] and one
    fold's, and the folds' sketched products (1.3 at this small K). Before, with each fold's G[P, P], the factor
    beside its system and W in float64 all kept, they measured 9.4 and 4.6. A solve that spends the Gram matrix
    makes its system there: the right-hand side is all it adds."""
    from grail.memory import reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("this system cannot reset the peak resident memory")
    # every allocation over 1 MiB mapped on its own and returned when freed, so that the resident set
    # follows what is alive (the C library's heap would keep freed K x K matrices)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run([sys.executable, "-c", SOLVE_MEMORY], capture_output=True, text=True, env=env, check=True)
    cross_validation, solve = (float(v) for v in done.stdout.split())
    assert solve < 2.0, solve
    assert cross_validation < 6.0, cross_validation
    # made in the spent Gram matrix's memory: one K x K matrix less (measured 1.6-1.7 against 0.7-0.8; what
    # stays is the right-hand side, the prior and the blocks)
    done = subprocess.run(
        [sys.executable, "-c", SPENT_SOLVE_MEMORY], capture_output=True, text=True, env=env, check=True
    )
    fresh, spent = (float(v) for v in done.stdout.split())
    assert fresh - spent > 0.7 and spent < 1.0, (fresh, spent)
