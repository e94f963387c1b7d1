"""Write a (pruned) model as a GGUF file that llama.cpp loads and runs.

Which llama.cpp architecture the file uses is decided from the model's modules alone:

* every layer the same width, and no bias the family's llama.cpp architecture cannot read:
  the family's own architecture (``llama`` for LLaMA and Mistral, ``qwen2``, ``qwen3``),
  with the keys llama.cpp's converter writes for it;
* otherwise ``deci``, whose loader reads per-layer arrays for ``attention.head_count``,
  ``attention.head_count_kv`` and ``feed_forward_length`` and optional biases on every
  projection (GRAIL's affine fit adds one to ``o_proj`` and ``down_proj``). Its head size
  is written explicitly (``attention.key_length``), since llama.cpp would otherwise derive
  it from the width of layer 0. A layer left with no heads (or no MLP channels) becomes an
  attention-free (MLP-free) layer.

``deci`` and ``llama`` apply rotary embeddings to adjacent pairs of a head's dimensions,
where the Hugging Face modules rotate its two halves, so their q/k rows (and biases) are
permuted per head as llama.cpp's converter does; ``qwen2``/``qwen3`` rotate halves like
Hugging Face. A model that no architecture can express (Qwen3's q/k norms with ragged
widths or added biases, rotary scaling llama.cpp computes differently) is refused before
anything is written, and the file is written beside its target and moved into place at
the end, so nothing half-written is ever left at the path.

The vocabulary is copied from the source GGUF file when the model came from one (with its
pre-tokenizer, special tokens and chat template); otherwise it is built from the Hugging
Face tokenizer with the ``gguf`` package's vocabulary helpers.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from grail.config import GGUF_TYPES
from grail.errors import GrailError
from grail.models.arch import arch_for, layer_shape
from grail.models.saving import SaveError, check_output_file, follow_umask

log = logging.getLogger(__name__)

Q8_BLOCK = 32  # q8_0 quantises rows in blocks of 32 values
SOURCE_GGUF_ATTR = "grail_source_gguf"  # set by load_model on models read from a GGUF file


class GGUFExportError(GrailError, ValueError):
    """The model cannot be written as a GGUF file llama.cpp runs."""


@dataclass(frozen=True)
class GGUFFamily:
    """How llama.cpp's converter writes one Hugging Face family with uniform widths."""

    arch: str
    rotate_halves: bool  # llama.cpp ropes this arch like Hugging Face (NEOX): no q/k permutation
    output_biases: bool  # the arch reads attn_output.bias and ffn_down.bias
    qk_norm: bool = False
    query_width_is_hidden: bool = False  # the arch sizes q_proj's output as the hidden size


FAMILIES = {
    "llama": GGUFFamily("llama", rotate_halves=False, output_biases=True),
    "mistral": GGUFFamily("llama", rotate_halves=False, output_biases=True),
    "qwen2": GGUFFamily("qwen2", rotate_halves=True, output_biases=False, query_width_is_hidden=True),
    "qwen3": GGUFFamily("qwen3", rotate_halves=True, output_biases=False, qk_norm=True),
}
RAGGED_ARCH = "deci"  # per-layer widths and optional biases everywhere; ropes adjacent pairs


@dataclass(frozen=True)
class LayerWidths:
    heads: int
    kv_heads: int
    ff: int  # MLP channels written (after any q8_0 padding)
    ff_kept: int  # MLP channels of the model


@dataclass(frozen=True)
class GGUFPlan:
    """What will be written: the llama.cpp architecture and every layer's widths."""

    arch: str
    permute_qk: bool
    layers: list[LayerWidths]
    head_dim: int
    rope_factors: Tensor | None  # llama.cpp's rope_freqs (frequency divisors), when not all ones

    @property
    def ragged(self) -> bool:
        return self.arch == RAGGED_ARCH


def plan_gguf(model: nn.Module, gguf_type: str = "f16") -> GGUFPlan:
    """Choose the llama.cpp architecture for ``model``, or explain why none can run it."""
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"--gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}.")
    config = model.config
    arch = arch_for(config)
    family = FAMILIES[arch.model_type]
    layers = arch.decoder_layers(model)
    shapes = [layer_shape(arch, layer) for layer in layers]
    head_dim = shapes[0].head_dim
    if any(s.head_dim != head_dim for s in shapes):
        raise GGUFExportError("the layers differ in head size, which no llama.cpp architecture reads.")
    out_bias = any(
        lin.bias is not None
        for layer in layers
        for lin in (arch.attention_linears(layer)[3], arch.mlp_linears(layer)[2])
    )
    mlp_in_bias = any(lin.bias is not None for layer in layers for lin in arch.mlp_linears(layer)[:2])
    uniform = all((s.num_heads, s.num_kv_heads, s.intermediate_size) == _widths(shapes[0]) for s in shapes)
    uniform = uniform and shapes[0].num_heads > 0 and shapes[0].intermediate_size > 0
    if family.query_width_is_hidden:
        uniform = uniform and shapes[0].num_heads * head_dim == shapes[0].hidden_size
    family_fits = uniform and (family.output_biases or not out_bias) and (family.arch == "llama" or not mlp_in_bias)
    if family.qk_norm and not family_fits:
        raise GGUFExportError(
            f"{arch.model_type} has q/k norms, which llama.cpp's architecture for per-layer widths ('deci') cannot "
            "read, and this model has "
            + ("per-layer widths" if not uniform else "biases on o_proj/down_proj")
            + " its own architecture cannot read. Use the safetensors checkpoint (--save_model) instead, "
            "or prune with a uniform method and --grail_fit linear."
        )
    target = family.arch if family_fits else RAGGED_ARCH
    permute = not family.rotate_halves if family_fits else True
    pad_to = Q8_BLOCK if gguf_type == "q8_0" else 1
    widths = [
        LayerWidths(s.num_heads, s.num_kv_heads, _round_up(s.intermediate_size, pad_to), s.intermediate_size)
        for s in shapes
    ]
    padded = sum(w.ff != w.ff_kept for w in widths)
    if padded:
        log.warning(
            "q8_0 quantises rows in blocks of %d: %d layer(s) get zero MLP channels up to the next multiple "
            "(exact, but wasted work); prune with --align %d to avoid it.",
            Q8_BLOCK,
            padded,
            Q8_BLOCK,
        )
    for i, (layer, w) in enumerate(zip(layers, widths, strict=True)):
        o_bias = arch.attention_linears(layer)[3].bias
        down_bias = arch.mlp_linears(layer)[2].bias
        if w.heads == 0 and o_bias is not None and bool(o_bias.any()):
            raise GGUFExportError(
                f"layer {i} has no attention heads left but o_proj has a bias, which llama.cpp drops for an "
                "attention-free layer; use the safetensors checkpoint (--save_model) instead."
            )
        if w.ff == 0 and down_bias is not None and bool(down_bias.any()):
            raise GGUFExportError(
                f"layer {i} has no MLP channels left but down_proj has a bias, which llama.cpp drops for an "
                "MLP-free layer; use the safetensors checkpoint (--save_model) instead."
            )
    return GGUFPlan(target, permute, widths, head_dim, _rope_factors(model, config, head_dim))


def _widths(shape) -> tuple[int, int, int]:
    return shape.num_heads, shape.num_kv_heads, shape.intermediate_size


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return merged


def _rope_factors(model: nn.Module, config, head_dim: int) -> Tensor | None:
    """llama.cpp's ``rope_freqs``: how much the model's rotary frequencies are divided by, if at all.

    LLaMA 3's frequency-dependent scaling and linear scaling are both a fixed divisor per
    frequency, read off the model's own ``inv_freq``; schemes that change the attention
    scale or depend on the sequence length are refused.
    """
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise GGUFExportError(
            f"rotary scaling {rope_type!r} is not exported (llama.cpp computes it at run time from settings this "
            "exporter does not write); use the safetensors checkpoint (--save_model) instead."
        )
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None or getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise GGUFExportError("the model's rotary embedding scales attention, which the exporter cannot express.")
    theta = float(params["rope_theta"])
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = base / rotary.inv_freq.to(torch.float64).cpu()
    if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6, atol=0):
        return None
    return factors.to(torch.float32)


def _rotary_pairs(weight: Tensor, heads: int, head_dim: int) -> Tensor:
    """Reorder each head's rows from halves ``(i, i + d/2)`` to adjacent pairs ``(2i, 2i + 1)``."""
    if heads == 0:
        return weight
    rest = weight.shape[1:]
    return weight.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(weight.shape)


def _tensors(model: nn.Module, plan: GGUFPlan) -> dict[str, Tensor]:
    """GGUF tensor names -> float32 CPU tensors (Hugging Face layout: out x in)."""
    arch = arch_for(model.config)
    inner = model.get_submodule(arch.layers.rsplit(".", 1)[0])
    out: dict[str, Tensor] = {"token_embd.weight": inner.embed_tokens.weight, "output_norm.weight": inner.norm.weight}
    if not getattr(model.config, "tie_word_embeddings", False):
        out["output.weight"] = model.lm_head.weight
    if plan.rope_factors is not None:
        out["rope_freqs.weight"] = plan.rope_factors
    d = plan.head_dim
    for i, (layer, w) in enumerate(zip(arch.decoder_layers(model), plan.layers, strict=True)):
        prefix = f"blk.{i}."
        q, k, v, o = arch.attention_linears(layer)
        gate, up, down = arch.mlp_linears(layer)
        attn = arch.attention_of(layer)
        if w.heads > 0:
            out[prefix + "attn_norm.weight"] = layer.input_layernorm.weight
            for name, lin, heads in (("attn_q", q, w.heads), ("attn_k", k, w.kv_heads), ("attn_v", v, None)):
                for kind in ("weight", "bias"):
                    t = getattr(lin, kind)
                    if t is None:
                        continue
                    if plan.permute_qk and heads is not None:
                        t = _rotary_pairs(t, heads, d)
                    out[f"{prefix}{name}.{kind}"] = t
            out[prefix + "attn_output.weight"] = o.weight
            if o.bias is not None:
                out[prefix + "attn_output.bias"] = o.bias
            for name in ("q_norm", "k_norm"):
                norm = getattr(attn, name, None)
                if norm is not None:
                    out[f"{prefix}attn_{name}.weight"] = norm.weight
        if w.ff > 0:
            pad = w.ff - w.ff_kept
            out[prefix + "ffn_norm.weight"] = layer.post_attention_layernorm.weight
            out[prefix + "ffn_gate.weight"] = _pad_rows(gate.weight, pad)
            out[prefix + "ffn_up.weight"] = _pad_rows(up.weight, pad)
            out[prefix + "ffn_down.weight"] = _pad_rows(down.weight.T, pad).T
            for name, lin in (("ffn_gate", gate), ("ffn_up", up)):
                if lin.bias is not None:
                    out[f"{prefix}{name}.bias"] = _pad_rows(lin.bias, pad)
            if down.bias is not None:
                out[prefix + "ffn_down.bias"] = down.bias
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in out.items()}


def _pad_rows(t: Tensor, pad: int) -> Tensor:
    """Append ``pad`` zero rows: zero MLP channels contribute nothing (SiLU(0) * 0 = 0)."""
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])])


def _encoded(name: str, t: Tensor, gguf_type: str):
    """``(data, raw_dtype)`` for the writer: 1-D tensors stay float32, as llama.cpp's converter keeps them."""
    import gguf

    data = t.numpy()
    if t.dim() == 1 or gguf_type == "f32" or name == "rope_freqs.weight":
        return data.astype(np.float32), None
    if gguf_type == "f16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if gguf_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % Q8_BLOCK:
        return data.astype(np.float16), None  # rows llama.cpp cannot quantise in blocks (the converter does the same)
    return gguf.quants.quantize(data, qtype), qtype


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def check_gguf_target(path: str | os.PathLike, flag: str = "--gguf") -> Path:
    """Fail before any work unless ``path`` is a new, writable ``.gguf`` file path."""

    target = Path(path).expanduser()
    if target.suffix != ".gguf":
        raise SaveError(f"{flag} {str(target)!r}: give a file name ending in .gguf.")
    if target.exists():
        raise SaveError(f"{flag} {str(target)!r} already exists; choose another path or delete it first.")
    return check_output_file(target, flag)


def save_gguf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    gguf_type: str = "f16",
    source_gguf: str | os.PathLike | None = None,
    name: str | None = None,
) -> Path:
    """Write ``model`` (pruned or not) and its vocabulary to the GGUF file ``path``; returns the path.

    ``source_gguf``: a GGUF file to copy the vocabulary from (default: the file the model was
    loaded from, if any; otherwise the vocabulary is built from ``tokenizer``).
    """
    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer announces every file at INFO
    target = check_gguf_target(path, "GGUF path")
    plan = plan_gguf(model, gguf_type)  # refuses unsupported models before anything is written
    source = source_gguf or getattr(model, SOURCE_GGUF_ATTR, None)
    if source is None and tokenizer is None:
        raise GGUFExportError("a GGUF file needs a vocabulary: pass the tokenizer (or source_gguf).")
    config = model.config
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, plan.arch)
        writer.add_name(name or target.stem)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]))
        _write_hparams(writer, config, plan)
        n_vocab = model.get_input_embeddings().weight.shape[0]
        if source is not None:
            _copy_vocab(writer, Path(source), n_vocab)
        else:
            _build_vocab(writer, tokenizer, n_vocab)
        for tensor_name, t in _tensors(model, plan).items():
            data, raw_dtype = _encoded(tensor_name, t, gguf_type)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    except BaseException:  # interrupted runs included: nothing half-written stays behind
        tmp.unlink(missing_ok=True)
        raise
    follow_umask(target)
    log.info("wrote %s (llama.cpp architecture %s, %s)", target, plan.arch, gguf_type)
    return target


def _write_hparams(writer, config, plan: GGUFPlan) -> None:
    layers = plan.layers
    heads = [w.heads for w in layers]
    kv_heads = [w.kv_heads for w in layers]
    ff = [w.ff for w in layers]
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(ff if plan.ragged else ff[0])
    writer.add_head_count(heads if plan.ragged else heads[0])
    writer.add_head_count_kv(kv_heads if plan.ragged else kv_heads[0])
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(float(_rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def _copy_vocab(writer, source: Path, n_vocab: int) -> None:
    """Every ``tokenizer.*`` key of the source GGUF file, as it is there."""
    import gguf

    if not source.is_file():
        raise GGUFExportError(f"source GGUF file {str(source)!r} does not exist.")
    reader = gguf.GGUFReader(source)
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        value = field.contents()
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        if field.name == "tokenizer.ggml.tokens" and len(value) != n_vocab:
            raise GGUFExportError(
                f"the source GGUF's vocabulary has {len(value)} tokens but the model's embedding has {n_vocab} rows."
            )
        writer.add_key_value(field.name, value, main, sub_type=sub)


def _build_vocab(writer, tokenizer, n_vocab: int) -> None:
    """The vocabulary of a Hugging Face tokenizer, with the ``gguf`` package's helpers."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        base = Path(folder)
        vocab = None
        for kind in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab, gguf.vocab.SentencePieceVocab):
            try:
                vocab = kind(base)
                break
            except (FileNotFoundError, TypeError, ImportError):
                continue
        if vocab is None:
            raise GGUFExportError(
                "the tokenizer is neither a byte-level BPE nor a SentencePiece tokenizer that GGUF can describe; "
                "export from a model loaded from a GGUF file, or convert with llama.cpp's converter."
            )
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = {idx for idx in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
        tokens, scores, types = [], [], []
        for idx, (text, score, kind) in enumerate(vocab.all_tokens()):
            tokens.append(text)
            scores.append(score)
            if idx in special:
                kind = gguf.TokenType.CONTROL
            elif idx in added and kind == gguf.TokenType.NORMAL:
                kind = gguf.TokenType.USER_DEFINED
            types.append(kind)
        if len(tokens) > n_vocab:
            raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {n_vocab}.")
        for idx in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer (padding to a round size)
            tokens.append(f"[PAD{idx}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            # llama.cpp picks its pre-tokenizer from a table of known models; 'default' is GPT-2's.
            writer.add_tokenizer_pre("default")
            log.warning(
                "GGUF vocabulary built from the Hugging Face tokenizer with llama.cpp's default (GPT-2) "
                "pre-tokenizer: text may split into tokens differently in llama.cpp (logits of given token ids "
                "are unaffected). Exporting a model loaded from a GGUF file copies its exact settings."
            )
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(base, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab).add_to_gguf(
            writer, quiet=True
        )
