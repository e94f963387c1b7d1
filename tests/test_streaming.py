"""Layer streaming gives the in-memory result, and data-parallel runs give the single-process one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_windows, skip_or_fail, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

import grail
from grail.cli import main
from grail.evaluate.perplexity import perplexity
from grail.memory import map_large_allocations
from grail.streaming import prune_streaming, streamed_model

ROOT = Path(__file__).resolve().parents[1]


def _sharded_checkpoint(folder: Path, family="llama", heads=6, kv=2) -> Path:
    model = tiny_model(family, heads, kv, layers=3)
    model.save_pretrained(folder, max_shard_size="60KB")  # several shards
    tiny_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def _tensors(folder: Path) -> dict:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize(
    "config",
    [
        {"prune_method": "flap", "compensate": True, "ridge_lambda": "auto"},
        {"prune_method": "wanda_sp", "compensate": True, "ridge_lambda": 0.0},
        {"prune_method": "slimgpt"},
        {"prune_method": "flap", "method_options": grail.FLAPOptions(structure="UL-UM"), "attention_unit": "query"},
        {"prune_method": "wanda_sp", "compensate": True, "ridge_lambda": "auto", "grail_target": "auto"},
        {"prune_method": "wanda_pp_sp", "compensate": True, "ridge_lambda": 0.01, "grail_target": "residual"},
    ],
)
def test_streaming_equals_in_memory(tmp_path, config):
    source = _sharded_checkpoint(tmp_path / "dense")
    windows = random_windows(8, 24)
    prune = grail.PruneConfig(pruning_ratio=0.4, nsamples=8, calib_batch_size=3, **config)
    model, tokenizer = grail.load_model(str(source))
    grail.prune_model(model, windows, prune, progress=False)
    grail.save_pruned(model, tokenizer, tmp_path / "memory")
    prune_streaming(source, tmp_path / "streamed", windows, prune, tokenizer, progress=False)
    memory, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert set(streamed) == set(memory)
    for name, tensor in memory.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    eval_windows = random_windows(4, 20, seed=5)
    reloaded, _ = grail.load_model(str(tmp_path / "streamed"))
    in_memory_ppl = perplexity(model, eval_windows, progress=False)
    assert perplexity(reloaded, eval_windows, progress=False) == pytest.approx(in_memory_ppl, rel=1e-5)
    streamed_pruned, layers = streamed_model(tmp_path / "streamed", "cpu", torch.float32)
    assert perplexity(streamed_pruned, eval_windows, 2, progress=False, layer_source=layers) == pytest.approx(
        in_memory_ppl, rel=1e-5
    )


@pytest.mark.parametrize("target", ["pruned", "residual"])
def test_activations_spilled_to_disk_give_the_same_result_and_are_deleted(tmp_path, monkeypatch, target):
    import grail.calibration

    spilled = []
    real_spill = grail.calibration._spill
    monkeypatch.setattr(grail.calibration, "_spill", lambda t, folder: spilled.append(folder) or real_spill(t, folder))
    windows = random_windows(6, 16)
    results = []
    for spill in (None, str(tmp_path / "acts")):
        model = tiny_model("qwen2", 6, 3)
        config = grail.PruneConfig(
            prune_method="wanda_sp",
            pruning_ratio=0.3,
            nsamples=6,
            compensate=True,
            offload_activations=spill,
            grail_target=target,
        )
        grail.prune_model(model, windows, config, progress=False)
        assert bool(spilled) == (spill is not None)
        results.append(model.state_dict())
    assert (tmp_path / "acts").is_dir() and not any((tmp_path / "acts").iterdir())  # the spilled files are gone
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, msg=name)


def test_layer_streaming_gives_large_allocations_back_to_the_system(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(grail.streaming, "map_large_allocations", lambda: calls.append(True))
    folder = _sharded_checkpoint(tmp_path / "model")
    streamed_model(folder, "cpu", torch.float32)
    assert calls  # the streamer asks for it, whichever way it is built
    monkeypatch.undo()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert map_large_allocations() is False  # the user's own setting stands
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    if Path("/proc/self/maps").is_file() and "libc.so.6" in Path("/proc/self/maps").read_text():
        assert map_large_allocations() is True


def test_offload_from_the_command_line(tmp_path, data_dir):
    source = _sharded_checkpoint(tmp_path / "dense")
    out, results_file = tmp_path / "pruned", tmp_path / "r.json"
    args = [
        "--model", str(source), "--offload", "--save_model", str(out), "--prune_method", "flap", "--pruning_ratio", "0.3",
        "--nsamples", "4", "--seqlen", "32", "--data_dir", str(data_dir), "--eval", "--eval_samples", "3",
        "--compensate", "--device", "cpu", "--output_json", str(results_file), "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads(results_file.read_text())
    assert results["streamed"] and results["params"]["removed_fraction"] == pytest.approx(0.3, abs=0.05)
    model, tokenizer = grail.load_model(str(out))
    again = grail.evaluate_perplexity(model, tokenizer, "wikitext2", 32, data_dir, max_windows=3, progress=False)
    assert again["ppl"] == pytest.approx(results["ppl"]["wikitext2"], rel=1e-5)
    # streaming writes into the output checkpoint: without --save_model it is refused
    assert main(["--model", str(source), "--offload", "--device", "cpu", "--pruning_ratio", "0.2"]) == 2


@pytest.mark.parametrize("target", ["pruned", "auto"])
def test_torchrun_with_two_processes_saves_the_single_process_checkpoint(tmp_path, data_dir, target):
    if shutil.which("torchrun") is None:
        skip_or_fail("torchrun not on PATH (it comes with torch)")
    source = _sharded_checkpoint(tmp_path / "dense")
    common = [
        "--model", str(source), "--prune_method", "wanda_sp", "--pruning_ratio", "0.4", "--nsamples", "6",
        "--seqlen", "32", "--data_dir", str(data_dir), "--compensate", "--ridge_lambda", "auto", "--device", "cpu",
        "--calib_batch_size", "2", "--quiet", "--eval", "--eval_samples", "4", "--grail_target", target,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    single = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *common, "--save_model", str(tmp_path / "one"), "--output_json", str(tmp_path / "one.json")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run(
        [
            "torchrun", "--nproc_per_node", "2", "--master_port", "29517", str(ROOT / "main.py"), *common,
            "--save_model", str(tmp_path / "two"), "--output_json", str(tmp_path / "two.json"),
        ],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert set(one) == set(two)
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert r2["processes"] == 2
    assert r2["ppl"]["wikitext2"] == pytest.approx(r1["ppl"]["wikitext2"], rel=1e-5)


def test_torchrun_at_lambda_zero_agrees_with_one_process(tmp_path, data_dir):
    """Two ranks see other batches, so their statistics differ by round-off, which a solve at
    lambda 0 amplifies: the saved weights must still agree to 1e-4 of each tensor's largest
    entry (measured 4e-6; 5.5e-3 when each batch's Gram product was float32)."""
    if shutil.which("torchrun") is None:
        skip_or_fail("torchrun not on PATH (it comes with torch)")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    common = [
        str(ROOT / "main.py"), "--model", str(tmp_path / "dense"), "--prune_method", "wanda_sp", "--pruning_ratio",
        "0.4", "--nsamples", "8", "--seqlen", "128", "--data_dir", str(data_dir), "--compensate", "--ridge_lambda",
        "0", "--device", "cpu", "--calib_batch_size", "2", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for name, launcher in (
        ("one", [sys.executable]),
        ("two", ["torchrun", "--nproc_per_node", "2", "--master_port", "29519"]),
    ):
        done = subprocess.run(
            [*launcher, *common, "--save_model", str(tmp_path / name)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    for name, tensor in one.items():
        assert (two[name] - tensor).abs().max() <= 1e-4 * tensor.abs().max(), name
