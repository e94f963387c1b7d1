"""Architecture descriptions: which modules produce and consume each prunable unit.

Every supported family follows the LLaMA decoder layout (pre-norm attention and a gated
MLP, each added to the residual stream). What differs between families is only data:
module names, where biases sit, and which configuration switch (if any) lets the stock
``transformers`` modules carry a bias on the block's output projection. The table is keyed
by ``config.model_type``; a model's name is never consulted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from grail.errors import GrailError


class UnsupportedModelError(GrailError, ValueError):
    """The model's architecture is not one GRAIL knows how to prune."""


@dataclass(frozen=True)
class ArchSpec:
    """Names of the modules of one decoder layer, and the bias switches of the family."""

    model_type: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    # The norm in front of the MLP: the MLP block alone is ``x + mlp(mlp_norm(x))``.
    mlp_norm: str = "post_attention_layernorm"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    # Config attribute that gives o_proj (and q/k/v) a bias in the stock modules, if any.
    attention_bias_switch: str | None = None
    # Config attribute that gives down_proj (and gate/up) a bias in the stock modules, if any.
    mlp_bias_switch: str | None = None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention_of(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention)

    def mlp_of(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp)

    def attention_linears(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        attn = self.attention_of(layer)
        return tuple(getattr(attn, n) for n in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))

    def mlp_linears(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        mlp = self.mlp_of(layer)
        return tuple(getattr(mlp, n) for n in (self.gate_proj, self.up_proj, self.down_proj))

    def mlp_block(self, layer: nn.Module, mid: Tensor) -> Tensor:
        """A layer's output from its mid state (the residual stream after attention), computed as the stock layer
        computes it, without running the attention again."""
        return mid + layer.get_submodule(self.mlp)(layer.get_submodule(self.mlp_norm)(mid))

    def consumer_names(self) -> dict[str, str]:
        """Qualified names (inside a decoder layer) of each block's output projection."""
        return {"attn": f"{self.attention}.{self.o_proj}", "mlp": f"{self.mlp}.{self.down_proj}"}


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", attention_bias_switch="attention_bias", mlp_bias_switch="mlp_bias"),
    "mistral": ArchSpec("mistral"),
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3", attention_bias_switch="attention_bias"),
}


def arch_for(config) -> ArchSpec:
    """The architecture description for a model configuration, or a clear error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; GRAIL prunes decoders with the LLaMA "
            f"module layout, model types: {supported}."
        )
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class HeadLayout:
    """Where each attention head lives in a layer's projections.

    Query head ``h`` owns rows ``h * head_dim ... (h + 1) * head_dim - 1`` of ``q_proj`` and
    the same columns of ``o_proj``; key/value head ``g`` owns the same span of rows of
    ``k_proj`` and ``v_proj`` and is read by the ``group_size`` consecutive query heads
    ``g * group_size ... (g + 1) * group_size - 1`` (the stock modules' mapping).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def columns(self, heads: Tensor) -> Tensor:
        """``o_proj`` columns (equally ``q_proj`` rows) of ``heads``: ``[..., k]`` -> ``[..., k * head_dim]``."""
        heads = torch.as_tensor(heads, dtype=torch.long)
        return (heads.unsqueeze(-1) * self.head_dim + torch.arange(self.head_dim, device=heads.device)).flatten(-2)

    def groups(self) -> Tensor:
        """``[num_kv_heads, group_size]``: the query heads that read each key/value head."""
        return torch.arange(self.num_heads).view(self.num_kv_heads, self.group_size)

    def bundles(self, head_scores: Tensor) -> Tensor:
        """``[group_size, num_kv_heads]``: bundle ``j`` holds the ``j``-th least important query head of each group."""
        ranks = torch.argsort(head_scores.reshape(self.num_kv_heads, self.group_size), dim=1, stable=True)
        return (ranks + self.groups()[:, :1]).T.contiguous()

    def kv_heads(self, kept_heads: Tensor) -> Tensor:
        """Key/value heads still read by ``kept_heads``; every kept group must keep as many query heads."""
        groups = torch.as_tensor(kept_heads, dtype=torch.long) // self.group_size
        kv, counts = torch.unique(groups, return_counts=True)
        if counts.numel() and not bool((counts == counts[0]).all()):
            raise ValueError(
                "kept query heads must be spread evenly over their key/value groups for the "
                f"stock attention modules; got {counts.tolist()} heads in groups {kv.tolist()}"
            )
        return kv


@dataclass(frozen=True)
class LayerShape:
    """Widths of one decoder layer, read from its modules (so pruned layers report truly)."""

    hidden_size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads.group_size

    @property
    def heads(self) -> HeadLayout:
        return HeadLayout(self.num_heads, self.num_kv_heads, self.head_dim)


def layer_shape(arch: ArchSpec, layer: nn.Module) -> LayerShape:
    q, k, _, o = arch.attention_linears(layer)
    _, _, down = arch.mlp_linears(layer)
    head_dim = arch.attention_of(layer).head_dim
    return LayerShape(
        hidden_size=o.out_features,
        head_dim=head_dim,
        num_heads=q.out_features // head_dim,
        num_kv_heads=k.out_features // head_dim,
        intermediate_size=down.in_features,
    )


def linear_param_count(arch: ArchSpec, model: nn.Module) -> int:
    """Parameters (weights and biases) of all decoder layers' linear projections."""
    total = 0
    for layer in arch.decoder_layers(model):
        for lin in (*arch.attention_linears(layer), *arch.mlp_linears(layer)):
            total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
    return total
