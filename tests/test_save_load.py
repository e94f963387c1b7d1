"""Saved checkpoints load again (stock transformers, remote code, and GRAIL's loader) and give
the same logits as the in-memory pruned model; failed saves leave nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_windows, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import grail
from grail.models.arch import arch_for
from grail.models.saving import SaveError
from grail.surgery import prune_attention


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _pruned(family, heads, kv, compensate, ratio=0.4):
    model = tiny_model(family, heads, kv)
    config = grail.PruneConfig(
        prune_method="wanda_sp", pruning_ratio=ratio, nsamples=6, compensate=compensate, ridge_lambda=0.0
    )
    grail.prune_model(model, random_windows(6, 24), config, progress=False)
    return model


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def _check_all_loaders(folder, model, stock: bool):
    ids = random_windows(2, 16, seed=3)
    want = _logits(model, ids)
    loaded, tokenizer = grail.load_model(str(folder))
    assert tokenizer is not None
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-5, atol=1e-5)
    remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    torch.testing.assert_close(_logits(remote, ids), want, rtol=1e-5, atol=1e-5)
    if stock:
        plain = AutoModelForCausalLM.from_pretrained(folder)
        torch.testing.assert_close(_logits(plain, ids), want, rtol=1e-5, atol=1e-5)


def test_uniform_widths_without_bias_save_a_plain_config(tmp_path):
    model = _pruned("llama", 6, 2, compensate=False)
    out = grail.save_pruned(model, tiny_tokenizer(), tmp_path / "ck")
    cfg = _config(out)
    assert "auto_map" not in cfg and "per_layer_config" not in cfg
    # ratio 0.4 of two key/value groups of three query heads: one group goes
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (3, 1)
    assert not (out / "modeling_grail.py").exists()
    _check_all_loaders(out, model, stock=True)


def test_llama_bias_uses_the_stock_switches(tmp_path):
    model = _pruned("llama", 4, 4, compensate=True)
    out = grail.save_pruned(model, tiny_tokenizer(), tmp_path / "ck")
    cfg = _config(out)
    assert cfg["attention_bias"] and cfg["mlp_bias"] and "auto_map" not in cfg
    _check_all_loaders(out, model, stock=True)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_bias_without_a_stock_switch_uses_remote_code(tmp_path, family):
    model = _pruned(family, 6, 3, compensate=True)
    out = grail.save_pruned(model, tiny_tokenizer(), tmp_path / "ck")
    cfg = _config(out)
    assert cfg["grail_output_bias"] == {"attn": [0, 1], "mlp": [0, 1]}
    assert "auto_map" in cfg and (out / "modeling_grail.py").exists()
    _check_all_loaders(out, model, stock=False)


def test_different_widths_per_layer_use_per_layer_config(tmp_path):
    model = tiny_model("qwen3", 4, 2)
    arch = arch_for(model.config)
    layer = arch.decoder_layers(model)[1]
    o = arch.attention_linears(layer)[3]
    prune_attention(arch, layer, torch.tensor([2, 3]), o.weight.data[:, 24:], None)
    out = grail.save_pruned(model, tiny_tokenizer(), tmp_path / "ck", metadata={"note": "test"})
    cfg = _config(out)
    assert cfg["per_layer_config"] == {"1": {"num_attention_heads": 2, "num_key_value_heads": 1}}
    assert cfg["grail"] == {"note": "test"}
    _check_all_loaders(out, model, stock=False)


def test_head_counts_the_stock_validator_rejects_use_per_layer_config(tmp_path):
    # 5 heads of 12 in a hidden size of 48: LLaMA's config validator wants 48 % heads == 0.
    model = tiny_model("llama", 6, 6)
    arch = arch_for(model.config)
    for layer in arch.decoder_layers(model):
        o = arch.attention_linears(layer)[3]
        prune_attention(arch, layer, torch.arange(5), o.weight.data[:, :60], None)
    out = grail.save_pruned(model, tiny_tokenizer(), tmp_path / "ck")
    assert set(_config(out)["per_layer_config"]) == {"0", "1"}
    _check_all_loaders(out, model, stock=False)


def test_existing_target_is_refused_and_failed_saves_leave_nothing(tmp_path):
    model = tiny_model()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("keep me")
    with pytest.raises(SaveError, match="already exists"):
        grail.save_pruned(model, None, busy)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        grail.save_pruned(model, BrokenTokenizer(), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def _llama_with_biases(folder):
    """A uniform-width pruned LLaMA whose compensation biases use the stock switches."""
    model = _pruned("llama", 4, 4, compensate=True)
    grail.save_pruned(model, tiny_tokenizer(), folder)
    assert _config(folder)["attention_bias"] or _config(folder)["mlp_bias"]
    return folder


def _rewrite_tensors(folder, change):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    (folder / "grail_checksums.json").unlink()  # as if written by another tool: the tensors alone must tell


@pytest.mark.parametrize(
    "damage", ["missing tensor", "wrong shape", "truncated file", "flipped byte", "bias switch off", "not GGUF"]
)
def test_damaged_checkpoints_are_refused(tmp_path, damage):
    """grail never runs a model with freshly initialised or silently dropped weights."""
    folder = _llama_with_biases(tmp_path / "ckpt")
    target = str(folder)
    if damage == "missing tensor":
        _rewrite_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    elif damage == "wrong shape":
        _rewrite_tensors(folder, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 48)}))
    elif damage == "truncated file":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":  # loads fine: only the recorded checksum tells
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-7] ^= 0x10
        (folder / "model.safetensors").write_bytes(bytes(data))
    elif damage == "bias switch off":  # config.json is not covered by the checksums
        config = _config(folder)
        config["attention_bias"] = config["mlp_bias"] = False
        (folder / "config.json").write_text(json.dumps(config))
    else:
        target = str(tmp_path / "model.gguf")
        (tmp_path / "model.gguf").write_text("this is not a GGUF file\n")
    with pytest.raises(grail.GrailError) as err:
        grail.load_model(target)
    assert "\n" not in str(err.value)
    assert any(word in str(err.value) for word in ("does not match its config", "damaged", "differs from the checksum"))


def test_non_finite_weights_are_never_saved(tmp_path):
    model = _pruned("llama", 4, 4, compensate=False)
    with torch.no_grad():
        arch_for(model.config).decoder_layers(model)[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(SaveError, match="NaN or Inf"):
        grail.save_pruned(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_saved_checkpoints_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        folder = grail.save_pruned(_pruned("llama", 4, 4, compensate=False), None, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044 for f in folder.iterdir())
