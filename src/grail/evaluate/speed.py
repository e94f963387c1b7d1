"""Inference speed of models in ``transformers`` and of GGUF files in llama.cpp, side by side in one process.

Prefill: tokens/s of one forward pass over ``batch x prefill`` tokens. Decode: new tokens/s
of greedy generation with the key/value cache, ``decode`` tokens after a ``prompt``-token
prompt, for each batch size (llama.cpp: batch 1 only). The models run interleaved, round by
round, so a noisy machine slows them alike; each figure is the median over rounds, and every
model also gets its ratio to the first model of the same runtime (the dense one, by
convention). Memory: ``weights_mib``, and ``peak_mib``, the weights plus the most that the
process's resident memory rose while the model ran (on CUDA: the rise of the device's peak
allocation).
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from grail.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from grail.models.loading import model_bytes


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


def _is_gguf(model) -> bool:
    return isinstance(model, str | os.PathLike) and str(model).endswith(".gguf")


def measure_speed(models: dict, setting: SpeedSetting = SpeedSetting(), seed: int = 0) -> dict:
    """``{name: {"runtime", "prefill_bN": tokens/s, "decode_bN": tokens/s, "<key>_ratio": x, "peak_mib", ...}}``.

    ``models`` maps names to ``transformers`` models or to paths of GGUF files (run in
    llama.cpp, batch 1). Ratios are to the first model of the same runtime.
    """
    from grail.evaluate import llama_cpp

    modules = [m for m in models.values() if not _is_gguf(m)]
    device = modules[0].get_input_embeddings().weight.device if modules else torch.device("cpu")
    vocab = min(_vocab_size(m) for m in models.values())
    generator = torch.Generator().manual_seed(seed)
    longest = max(setting.batch_sizes)
    tokens = torch.randint(0, vocab, (longest, max(setting.prefill, setting.prompt)), generator=generator).to(device)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    working: dict[str, float] = dict.fromkeys(models, 0.0)
    n_ctx = max(setting.prefill, setting.prompt + setting.decode)
    with ExitStack() as stack:
        runners = {
            name: stack.enter_context(llama_cpp.llama_cpp_model(m, n_ctx=n_ctx, serving=True))
            for name, m in models.items()
            if _is_gguf(m)
        }
        for _ in range(setting.rounds):
            for name, model in models.items():
                gpu = device.type == "cuda" and name not in runners
                start = _start_peak(device if gpu else None)
                _run_once(model, runners.get(name), samples[name], tokens, setting)
                growth = _peak_growth(device if gpu else None, start)
                if growth is not None:
                    working[name] = max(working[name], growth / 2**20)
    figures = {name: {key: statistics.median(values) for key, values in runs.items()} for name, runs in samples.items()}
    bases: dict[str, dict] = {}
    for name, model in models.items():
        runtime = "llama.cpp" if _is_gguf(model) else "transformers"
        entry = figures[name]
        base = bases.setdefault(runtime, dict(entry))
        entry.update({f"{key}_ratio": round(entry[key] / base[key], 3) for key in base})
        entry["runtime"] = runtime
        entry["weights_mib"] = round(_weights_bytes(model) / 2**20, 1)
        entry["peak_mib"] = round(entry["weights_mib"] + working[name], 1)
    return figures


def _run_once(model, runner, runs: dict[str, list[float]], tokens: torch.Tensor, setting: SpeedSetting) -> None:
    """One round of a model's measurements: llama.cpp at batch 1 when ``runner`` is given, else each batch size."""
    from grail.evaluate import llama_cpp

    if runner is not None:
        ids = tokens[0].cpu()
        runs.setdefault("prefill_b1", []).append(llama_cpp.prefill_tokens_per_s(runner, ids[: setting.prefill]))
        runs.setdefault("decode_b1", []).append(
            llama_cpp.decode_tokens_per_s(runner, ids[: setting.prompt], setting.decode)
        )
        return
    for batch in setting.batch_sizes:
        runs.setdefault(f"prefill_b{batch}", []).append(prefill_tokens_per_s(model, tokens[:batch, : setting.prefill]))
        runs.setdefault(f"decode_b{batch}", []).append(
            decode_tokens_per_s(model, tokens[:batch, : setting.prompt], setting.decode)
        )


def _start_peak(cuda_device: torch.device | None) -> int | None:
    """Start a new memory high-water mark: the CUDA device's allocations, else the process's resident memory."""
    if cuda_device is not None:
        torch.cuda.reset_peak_memory_stats(cuda_device)
        return torch.cuda.memory_allocated(cuda_device)
    return rss_bytes() if reset_peak_rss() else None


def _peak_growth(cuda_device: torch.device | None, start: int | None) -> int | None:
    """How far the high-water mark rose above ``start`` (None where it cannot be measured)."""
    if start is None:
        return None
    peak = torch.cuda.max_memory_allocated(cuda_device) if cuda_device is not None else peak_rss_bytes()
    return None if peak is None else max(peak - start, 0)


def _vocab_size(model) -> int:
    if _is_gguf(model):
        import gguf

        reader = gguf.GGUFReader(model)
        return len(reader.fields["tokenizer.ggml.tokens"].data)
    return model.get_input_embeddings().weight.shape[0]


def _weights_bytes(model) -> int:
    if _is_gguf(model):
        return Path(model).stat().st_size
    return model_bytes(model)


def format_speed(figures: dict) -> str:
    """A plain-text table: tokens/s and the ratio to the first model, per model and measurement."""
    keys = []
    for entry in figures.values():
        keys += [k for k in entry if k.startswith(("prefill", "decode")) and not k.endswith("_ratio") and k not in keys]
    width = max(len(name) for name in figures) + 2
    lines = [" " * width + "  runtime       weights MiB  peak MiB  " + "  ".join(f"{k:>18s}" for k in keys)]
    for name, entry in figures.items():
        cells = "  ".join(
            f"{entry[k]:9.1f} ({entry[k + '_ratio']:.2f}x)" if k in entry else f"{'-':>18s}" for k in keys
        )
        lines.append(
            f"{name:{width}s}  {entry['runtime']:12s}  {entry['weights_mib']:11.1f}  {entry['peak_mib']:8.1f}  {cells}"
        )
    return "\n".join(lines)
