"""Inference speed of models in ``transformers``, measured side by side in one process.

Prefill: tokens/s of one forward pass over ``batch x prefill`` tokens. Decode: new tokens/s
of greedy generation with the key/value cache, ``decode`` tokens after a ``prompt``-token
prompt, for each batch size. The models run interleaved, round by round, so a noisy machine
slows them alike; each figure is the median over rounds, and every model also gets its
ratio to the first model (the dense one, by convention).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SpeedSetting:
    prefill: int = 512  # tokens per sequence of the prefill pass
    prompt: int = 128  # prompt tokens before decoding
    decode: int = 128  # new tokens decoded
    batch_sizes: tuple[int, ...] = (1, 8)
    rounds: int = 3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module, ids: torch.Tensor) -> float:
    device = ids.device
    _synchronize(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _synchronize(device)
    return ids.numel() / (time.perf_counter() - start)


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    device = prompt.device
    _synchronize(device)
    start = time.perf_counter()
    model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    _synchronize(device)
    return prompt.shape[0] * new_tokens / (time.perf_counter() - start)


def measure_speed(models: dict[str, nn.Module], setting: SpeedSetting = SpeedSetting(), seed: int = 0) -> dict:
    """``{name: {"prefill_bN": tokens/s, "decode_bN": tokens/s, ..., "<key>_ratio": x}}``, ratios to the first model."""
    first = next(iter(models.values()))
    device = first.get_input_embeddings().weight.device
    vocab = first.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    longest = max(setting.batch_sizes)
    tokens = torch.randint(0, vocab, (longest, max(setting.prefill, setting.prompt)), generator=generator).to(device)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for _ in range(setting.rounds):
        for name, model in models.items():
            for batch in setting.batch_sizes:
                runs = samples[name]
                runs.setdefault(f"prefill_b{batch}", []).append(
                    prefill_tokens_per_s(model, tokens[:batch, : setting.prefill])
                )
                runs.setdefault(f"decode_b{batch}", []).append(
                    decode_tokens_per_s(model, tokens[:batch, : setting.prompt], setting.decode)
                )
    figures = {name: {key: statistics.median(values) for key, values in runs.items()} for name, runs in samples.items()}
    base = dict(next(iter(figures.values())))
    for name, model in models.items():
        entry = figures[name]
        entry.update({f"{key}_ratio": round(entry[key] / base[key], 3) for key in base})
        entry["weights_mib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)
    return figures


def format_speed(figures: dict) -> str:
    """A plain-text table: tokens/s and the ratio to the first model, per model and measurement."""
    keys = [k for k in next(iter(figures.values())) if not k.endswith("_ratio") and k != "weights_mib"]
    width = max(len(name) for name in figures) + 2
    lines = [" " * width + "  weights MiB  " + "  ".join(f"{k:>18s}" for k in keys)]
    for name, entry in figures.items():
        cells = "  ".join(f"{entry[k]:9.1f} ({entry[k + '_ratio']:.2f}x)" for k in keys)
        lines.append(f"{name:{width}s}  {entry['weights_mib']:11.1f}  {cells}")
    return "\n".join(lines)
