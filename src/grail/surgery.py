"""Physically remove attention heads and MLP channels from a decoder layer.

Weights are sliced, not masked, so the pruned layer is smaller and faster. The stock
``transformers`` attention infers the number of heads from ``q_proj``'s output and maps
query heads to key/value heads with ``num_key_value_groups`` consecutive copies; keeping
the same number of query heads in every kept key/value group, in their original order,
keeps that mapping right.
"""

from __future__ import annotations

from torch import Tensor, nn

from grail.models.arch import ArchSpec, layer_shape


def _set_weight(linear: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is None:
        linear.bias = None
    else:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def keep_rows(linear: nn.Linear, rows: Tensor) -> None:
    rows = rows.to(linear.weight.device)
    bias = linear.bias[rows] if linear.bias is not None else None
    _set_weight(linear, linear.weight.data[rows], bias)


def set_consumer(linear: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    """Install a consumer's new weight (over the kept inputs only) and bias."""
    dtype, device = linear.weight.dtype, linear.weight.device
    bias = bias.to(device=device, dtype=dtype) if bias is not None else None
    _set_weight(linear, weight.to(device=device, dtype=dtype), bias)


def prune_attention(
    arch: ArchSpec,
    layer: nn.Module,
    kept_heads: Tensor,
    o_weight: Tensor,
    o_bias: Tensor | None,
) -> None:
    """Keep only ``kept_heads`` (query-head indices) and install o_proj's new weights."""
    attn = arch.attention_of(layer)
    q, k, v, o = arch.attention_linears(layer)
    layout = layer_shape(arch, layer).heads
    kept_heads = kept_heads.sort().values
    kept_kv = layout.kv_heads(kept_heads)
    keep_rows(q, layout.columns(kept_heads))
    keep_rows(k, layout.columns(kept_kv))
    keep_rows(v, layout.columns(kept_kv))
    set_consumer(o, o_weight, o_bias)
    n_heads, n_kv = len(kept_heads), len(kept_kv)
    attn.num_key_value_groups = n_heads // n_kv
    # Some families keep these counts on the module too; keep them truthful.
    for name, value in (("num_heads", n_heads), ("num_key_value_heads", n_kv)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def prune_mlp(
    arch: ArchSpec,
    layer: nn.Module,
    kept_channels: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
) -> None:
    """Keep only ``kept_channels`` and install down_proj's new weights."""
    gate, up, down = arch.mlp_linears(layer)
    kept_channels = kept_channels.sort().values
    keep_rows(gate, kept_channels)
    keep_rows(up, kept_channels)
    set_consumer(down, down_weight, down_bias)
    mlp = arch.mlp_of(layer)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(kept_channels)
