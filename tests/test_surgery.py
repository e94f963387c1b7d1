"""Physically pruned layers compute exactly what the dense layers compute with the removed
units masked out, for every supported family, with and without grouped-query attention."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VARIANTS, random_windows, tiny_model

from grail.models.arch import UnsupportedModelError, arch_for, layer_shape
from grail.surgery import prune_attention, prune_mlp
from grail.units import attention_units


def _mask_and_prune(model, kept_heads_per_layer, kept_channels_per_layer):
    """Return (masked dense copy, physically pruned copy) for the same kept units."""
    arch = arch_for(model.config)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    for i, (kept_heads, kept_channels) in enumerate(zip(kept_heads_per_layer, kept_channels_per_layer, strict=True)):
        shape = layer_shape(arch, arch.decoder_layers(model)[i])
        hd = shape.head_dim
        cols = (kept_heads.unsqueeze(1) * hd + torch.arange(hd)).flatten()
        # masked: zero the consumer columns of removed units
        m_layer = arch.decoder_layers(masked)[i]
        o = arch.attention_linears(m_layer)[3]
        keep = torch.zeros(o.in_features, dtype=torch.bool)
        keep[cols] = True
        o.weight.data[:, ~keep] = 0
        down = arch.mlp_linears(m_layer)[2]
        keep = torch.zeros(down.in_features, dtype=torch.bool)
        keep[kept_channels] = True
        down.weight.data[:, ~keep] = 0
        # pruned: slice
        p_layer = arch.decoder_layers(pruned)[i]
        o, down = arch.attention_linears(p_layer)[3], arch.mlp_linears(p_layer)[2]
        prune_attention(arch, p_layer, kept_heads, o.weight.data[:, cols], o.bias)
        prune_mlp(arch, p_layer, kept_channels, down.weight.data[:, kept_channels], down.bias)
    return masked, pruned


@pytest.mark.parametrize(("family", "heads", "kv"), TINY_VARIANTS)
@pytest.mark.parametrize("unit", ["group", "query"])
def test_pruned_model_equals_masked_dense_model(family, heads, kv, unit):
    model = tiny_model(family, heads, kv)
    arch = arch_for(model.config)
    shape = layer_shape(arch, arch.decoder_layers(model)[0])
    g = torch.Generator().manual_seed(7)
    units = attention_units(shape, unit, head_scores=torch.randn(heads, generator=g))
    kept_heads = [units.kept_heads(torch.tensor([0])), units.kept_heads(torch.arange(1, units.count))]
    kept_channels = [torch.randperm(80, generator=g)[:30].sort().values, torch.arange(0, 80, 3)]
    masked, pruned = _mask_and_prune(model, kept_heads, kept_channels)
    ids = random_windows(2, 20)
    torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
    # the pruned weights are really smaller, and the modules' counts are truthful
    attn = arch.attention_of(arch.decoder_layers(pruned)[0])
    q = arch.attention_linears(arch.decoder_layers(pruned)[0])[0]
    assert q.out_features == len(kept_heads[0]) * shape.head_dim
    assert attn.num_key_value_groups * (
        arch.attention_linears(arch.decoder_layers(pruned)[0])[1].out_features // shape.head_dim
    ) == len(kept_heads[0])
    # generation with a key/value cache gives the masked dense model's tokens
    prompt = ids[:1, :5]
    torch.testing.assert_close(
        pruned.generate(prompt, max_new_tokens=4, do_sample=False),
        masked.generate(prompt, max_new_tokens=4, do_sample=False),
    )


def test_uneven_query_heads_per_group_are_refused():
    model = tiny_model("llama", 6, 2)
    arch = arch_for(model.config)
    layer = arch.decoder_layers(model)[0]
    o = arch.attention_linears(layer)[3]
    with pytest.raises(ValueError, match="spread evenly"):
        prune_attention(arch, layer, torch.tensor([0, 1, 3]), o.weight.data[:, :36], None)


def test_unsupported_architecture_lists_the_supported_ones():
    class Config:
        model_type = "gpt2"

    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        arch_for(Config())
