"""GGUF export: the file llama.cpp runs computes what the in-memory (pruned) model computes.

Round trips through ``llama-cpp-python`` on tiny random LLaMA, Mistral and Qwen2 models
(multi-head and grouped-query attention, uniform and per-layer widths, with and without the
affine fit's biases), the metadata llama.cpp reads, the refusals, and the real SmolLM2-135M.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import byte_level_tokenizer, random_windows, tiny_model

import grail
from grail.cli import main
from grail.evaluate.llama_cpp import llama_cpp_model, llama_cpp_perplexity, window_logits
from grail.models.gguf_export import GGUFExportError, plan_gguf, save_gguf

pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra")


@pytest.fixture(scope="module")
def byte_tokenizer():
    return byte_level_tokenizer()


def _pruned(family, heads, kv_heads, method, tokenizer, bias=True, ratio=0.4):
    model = tiny_model(family, heads, kv_heads, layers=3, vocab_size=len(tokenizer))
    if method is not None:
        config = grail.PruneConfig(
            prune_method=method,
            pruning_ratio=ratio,
            compensate=True,
            ridge_lambda=0.01,
            nsamples=8,
            bias_compensation=bias,
        )
        grail.prune_model(model, random_windows(8, 32, vocab=len(tokenizer)), config, progress=False)
    return model


def _logits(model, path, ids):
    ours = model(ids[None]).logits[0].numpy()
    with llama_cpp_model(path, n_ctx=len(ids)) as llm:
        theirs = window_logits(llm, ids)
    return ours, theirs


CASES = [
    # family, query heads, kv heads, method (None: unpruned), affine biases, llama.cpp architecture
    ("llama", 4, 4, None, False, "llama"),
    ("llama", 6, 2, "wanda_sp", False, "llama"),
    ("llama", 6, 2, "wanda_sp", True, "llama"),  # LLaMA's architecture reads o/down biases
    ("llama", 4, 2, "flap", True, "deci"),  # per-layer widths
    ("mistral", 4, 2, "flap", False, "deci"),
    ("mistral", 4, 2, "wanda_sp", False, "llama"),
    ("qwen2", 4, 2, None, False, "qwen2"),
    ("qwen2", 4, 2, "wanda_sp", True, "deci"),  # qwen2's architecture has no o/down bias
    ("qwen2", 6, 3, "flap", True, "deci"),
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c[:5])) for c in CASES])
def test_llama_cpp_runs_the_exported_model_like_the_model(case, byte_tokenizer, tmp_path):
    family, heads, kv_heads, method, bias, arch = case
    model = _pruned(family, heads, kv_heads, method, byte_tokenizer, bias)
    plan = plan_gguf(model)
    assert plan.arch == arch
    has_bias = any(layer.mlp.down_proj.bias is not None for layer in model.model.layers)
    assert has_bias == (bias and method is not None)
    ids = random_windows(1, 48, vocab=len(byte_tokenizer), seed=7)[0]

    path = save_gguf(model, byte_tokenizer, tmp_path / "m32.gguf", "f32")
    ours, theirs = _logits(model, path, ids)
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(ours).max()

    path = save_gguf(model, byte_tokenizer, tmp_path / "m16.gguf", "f16")
    ours, theirs = _logits(model, path, ids)
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95  # near-ties of a random model; SmolLM2 below
    assert np.abs(ours - theirs).max() < 2e-2 * np.abs(ours).max()


def test_metadata_holds_each_layers_widths(byte_tokenizer, tmp_path):
    model = _pruned("llama", 4, 2, "flap", byte_tokenizer)
    path = save_gguf(model, byte_tokenizer, tmp_path / "m.gguf", "f32")
    fields = gguf.GGUFReader(path).fields
    layers = model.model.layers
    widths = {
        "deci.attention.head_count": [layer.self_attn.q_proj.out_features // 12 for layer in layers],
        "deci.attention.head_count_kv": [layer.self_attn.k_proj.out_features // 12 for layer in layers],
        "deci.feed_forward_length": [layer.mlp.down_proj.in_features for layer in layers],
    }
    assert len(set(map(tuple, widths.values()))) > 1 or len(set(widths["deci.feed_forward_length"])) > 1
    for key, expected in widths.items():
        assert list(fields[key].contents()) == expected, key
    assert fields["deci.attention.key_length"].contents() == 12
    assert fields["general.architecture"].contents() == "deci"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(byte_tokenizer) and tokens[0] == "<s>"


def test_q8_0_pads_mlp_widths_with_zero_channels(byte_tokenizer, tmp_path):
    model = _pruned("llama", 4, 2, "flap", byte_tokenizer)
    kept = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert any(k % 32 for k in kept)
    path = save_gguf(model, byte_tokenizer, tmp_path / "q8.gguf", "q8_0")
    written = list(gguf.GGUFReader(path).fields["deci.feed_forward_length"].contents())
    assert written == [-(-k // 32) * 32 for k in kept]
    ids = random_windows(1, 48, vocab=len(byte_tokenizer), seed=7)[0]
    ours, theirs = _logits(model, path, ids)
    assert np.abs(ours - theirs).max() < 5e-2 * np.abs(ours).max()  # 8-bit weights, exact zero channels


def test_unexpressible_models_fail_before_writing(byte_tokenizer, tmp_path):
    model = _pruned("qwen3", 4, 2, "flap", byte_tokenizer)  # q/k norms with per-layer widths
    target = tmp_path / "q3.gguf"
    with pytest.raises(GGUFExportError, match=r"q/k norms.*--save_model"):
        save_gguf(model, byte_tokenizer, target)
    assert list(tmp_path.iterdir()) == []
    uniform = _pruned("qwen3", 4, 2, "wanda_sp", byte_tokenizer, bias=False)
    assert plan_gguf(uniform).arch == "qwen3"
    with pytest.raises(GrailErrorType, match="already exists"):
        target.write_text("")
        save_gguf(uniform, byte_tokenizer, target)


GrailErrorType = grail.GrailError


def test_interrupted_export_leaves_nothing(byte_tokenizer, tmp_path, monkeypatch):
    model = _pruned("llama", 4, 2, "flap", byte_tokenizer)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_gguf(model, byte_tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_export_command_and_speed_of_gguf_files(byte_tokenizer, tmp_path):
    model = _pruned("llama", 4, 2, "flap", byte_tokenizer)
    grail.save_pruned(model, byte_tokenizer, tmp_path / "ckpt")
    dense = tiny_model("llama", 4, 2, layers=3, vocab_size=len(byte_tokenizer))
    grail.save_pruned(dense, byte_tokenizer, tmp_path / "dense")
    for name in ("ckpt", "dense"):
        assert (
            main(["export", str(tmp_path / name), "--gguf", str(tmp_path / f"{name}.gguf"), "--gguf_type", "f32"]) == 0
        )
    assert main(["export", str(tmp_path / "ckpt"), "--gguf", str(tmp_path / "ckpt.gguf")]) == 2  # exists
    ids = random_windows(1, 32, vocab=len(byte_tokenizer), seed=3)[0]
    ours, theirs = _logits(model, tmp_path / "ckpt.gguf", ids)
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(ours).max()
    out = tmp_path / "speed.json"
    args = ["speed", str(tmp_path / "dense.gguf"), str(tmp_path / "ckpt.gguf"), str(tmp_path / "dense")]
    args += ["--prefill", "16", "--prompt", "8", "--decode", "4", "--rounds", "1", "--batch_sizes", "1"]
    assert main([*args, "--device", "cpu", "--output_json", str(out)]) == 0
    figures = json.loads(out.read_text())["models"]
    assert figures[str(tmp_path / "dense.gguf")]["runtime"] == "llama.cpp"
    assert figures[str(tmp_path / "dense.gguf")]["decode_b1_ratio"] == 1.0
    assert figures[str(tmp_path / "dense")]["runtime"] == "transformers"
    assert figures[str(tmp_path / "dense")]["prefill_b1_ratio"] == 1.0  # first model of its runtime
    assert figures[str(tmp_path / "ckpt.gguf")]["prefill_b1"] > 0
    for entry in figures.values():
        assert entry["peak_mib"] >= entry["weights_mib"] > 0


@pytest.mark.usefixtures("smollm2_available")
def test_smollm2_flap_50_with_grail_runs_in_llama_cpp(data_dir, tmp_path):
    """FLAP 50% + GRAIL on the real model (per-layer widths, biases): llama.cpp's perplexity within 1% of ours."""
    model, tokenizer = grail.load_model("smollm2-135m")
    windows, _ = grail.calibration_data(tokenizer, "wikitext2", nsamples=8, seqlen=128, data_dir=data_dir)
    config = grail.PruneConfig(prune_method="flap", pruning_ratio=0.5, compensate=True, ridge_lambda=0.01, nsamples=8)
    grail.prune_model(model, windows, config, progress=False)
    ours = grail.evaluate_perplexity(model, tokenizer, "wikitext2", 128, data_dir, max_windows=4, progress=False)
    from grail.data import evaluation_windows, load_text, tokenize

    text = load_text("wikitext2", "evaluation", data_dir)
    test_windows = evaluation_windows(tokenize(tokenizer, text.text), 128, "wikitext2", 4)
    path = save_gguf(model, tokenizer, tmp_path / "smol.gguf", "f16")
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "deci"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # copied from the source GGUF
    theirs = llama_cpp_perplexity(path, test_windows)
    assert abs(theirs / ours["ppl"] - 1) < 0.01, (theirs, ours["ppl"])
    with llama_cpp_model(path, n_ctx=128) as llm:
        logits = window_logits(llm, test_windows[0])
    with torch.no_grad():
        reference = model(test_windows[:1]).logits[0].numpy()
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.99


def test_main_command_writes_gguf_and_measures_speed(byte_tokenizer, data_dir, tmp_path):
    dense = tiny_model("llama", 6, 2, layers=3, vocab_size=len(byte_tokenizer))
    grail.save_pruned(dense, byte_tokenizer, tmp_path / "dense")
    out, gguf_file = tmp_path / "run.json", tmp_path / "pruned.gguf"
    args = ["--model", str(tmp_path / "dense"), "--prune_method", "flap", "--pruning_ratio", "0.3", "--compensate"]
    args += ["--nsamples", "8", "--seqlen", "64", "--data_dir", str(data_dir), "--device", "cpu", "--quiet"]
    args += ["--save_gguf", str(gguf_file), "--gguf_type", "f32", "--speed", "--output_json", str(out)]
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert set(results["speed"]["models"]) == {"dense", "pruned", "dense.gguf", "pruned.gguf"}
    assert results["speed"]["models"]["dense.gguf"]["decode_b1_ratio"] == 1.0
    assert results["timings"]["export_s"] > 0
    assert gguf.GGUFReader(gguf_file).fields["general.architecture"].contents() == "deci"


def test_peak_memory_counts_what_a_run_allocates():
    from grail.evaluate.speed import _peak_growth, _start_peak

    start = _start_peak(None)
    block = torch.ones(50_000_000)  # 200 MB touched
    growth = _peak_growth(None, start)
    del block
    assert growth is not None and growth >= 190e6
