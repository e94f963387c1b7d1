"""Causal LMs whose decoder layers have different widths after structured pruning.

This file is self-contained (it needs only ``torch`` and ``transformers``): GRAIL copies it
into every checkpoint whose layers differ in width, and the checkpoint's ``config.json``
names it in ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` loads the pruned model with no GRAIL installed.

The widths are stored in the configuration's ``per_layer_config`` (a sparse map from layer
index to the attributes that differ from the global ones: ``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``), the format ``transformers`` 5 reads into
its configuration classes. The global values stay those of the dense model, and the
config sets ``allow_global_per_layer_attribute_access`` so that the families' config
validators (which read ``num_attention_heads`` globally) accept it. The stock modeling
code does not build per-layer widths yet (it would build dense layers and then refuse the
smaller weights); the classes below build the stock model and then rebuild each layer
from its own configuration. Output projections that gained a bias during pruning, in
families whose stock modules cannot hold one, are listed under ``grail_output_bias``.
"""

from __future__ import annotations

from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

OUTPUT_BIAS_KEY = "grail_output_bias"  # {"attn": [layer, ...], "mlp": [layer, ...]}
_OUTPUT_PROJECTIONS = {"attn": ("self_attn", "o_proj"), "mlp": ("mlp", "down_proj")}


def _with_output_bias(linear: nn.Linear) -> nn.Linear:
    if linear.bias is not None:
        return linear
    new = nn.Linear(linear.in_features, linear.out_features, bias=True, device=linear.weight.device)
    return new.to(linear.weight.dtype)


def rebuild_layers(model: nn.Module, config) -> None:
    """Give every decoder layer the widths of its own layer configuration."""
    layers = model.model.layers
    hetero = getattr(config, "is_heterogeneous", False)
    for idx, layer in enumerate(layers):
        if hetero:
            layer_config = config.per_layer_config[idx]
            new_layer = type(layer)(layer_config, idx)
            # Read run-time settings (attention implementation) from the live global config.
            for module in new_layer.modules():
                if hasattr(module, "config") and module is not new_layer:
                    module.config = config
            layers[idx] = layer = new_layer.to(next(layer.parameters()).dtype)
    extra = getattr(config, OUTPUT_BIAS_KEY, None) or {}
    for kind, indices in extra.items():
        parent_name, child_name = _OUTPUT_PROJECTIONS[kind]
        for idx in indices:
            parent = getattr(layers[idx], parent_name)
            setattr(parent, child_name, _with_output_bias(getattr(parent, child_name)))


def _build(self, base, config, *args, **kwargs) -> None:
    # The stock constructor reads the global (dense) widths; build with them, then rebuild.
    previous = getattr(config, "allow_global_per_layer_attribute_access", True)
    config.allow_global_per_layer_attribute_access = True
    try:
        base.__init__(self, config, *args, **kwargs)
    finally:
        config.allow_global_per_layer_attribute_access = previous
    rebuild_layers(self, config)


class GrailLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config, *args, **kwargs):
        _build(self, LlamaForCausalLM, config, *args, **kwargs)


class GrailMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config, *args, **kwargs):
        _build(self, MistralForCausalLM, config, *args, **kwargs)


class GrailQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config, *args, **kwargs):
        _build(self, Qwen2ForCausalLM, config, *args, **kwargs)


class GrailQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config, *args, **kwargs):
        _build(self, Qwen3ForCausalLM, config, *args, **kwargs)


CLASSES = {
    "llama": GrailLlamaForCausalLM,
    "mistral": GrailMistralForCausalLM,
    "qwen2": GrailQwen2ForCausalLM,
    "qwen3": GrailQwen3ForCausalLM,
}
