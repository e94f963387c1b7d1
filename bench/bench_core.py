"""Core pipeline benchmark: cost of pruning + compensation relative to plain forward passes.

Reports, measured in one process on the same model and calibration windows:

* ``time_ratio``: (calibration capture + statistics passes + selection + solves + surgery)
  divided by the time of two plain forward passes of the same windows through the dense
  model (same batch size, logits included);
* ``peak_rss_ratio``: the process's peak resident memory while pruning (the high-water mark
  is reset just before) divided by the model's size in memory; ``prune_extra_rss_ratio``
  counts only the growth during pruning (the interpreter, libraries and tokenizer excluded).

    python bench/bench_core.py --data_dir ../shared/data --prune_method wanda_sp --pruning_ratio 0.3 --compensate

It takes every flag of the main command (``grail --help``), with a smaller default setting
(Wanda-SP at 30%, 32 windows of 512 tokens, lambda 0, CPU); ``--output_json`` writes the figures.

On a GPU (``--device cuda --dtype bfloat16``) it also reports the peak GPU memory allocated
while pruning, over the model's size:

    python bench/bench_core.py --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --device cuda --dtype bfloat16 \
        --prune_method flap --pruning_ratio 0.3 --compensate --nsamples 128 --seqlen 2048
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import grail
from grail.cli import add_config_options, config_from_args
from grail.memory import reset_peak_rss, rss_bytes
from grail.models.loading import model_bytes, torch_dtype
from grail.timing import Timer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_forward_seconds(model, windows: torch.Tensor, batch_size: int) -> float:
    device = model.get_input_embeddings().weight.device
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            model(input_ids=windows[b : b + batch_size].to(device), use_cache=False)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p)  # every flag of the main command, declared once in grail.config
    # The benchmark's own small default setting.
    p.set_defaults(prune_method="wanda_sp", pruning_ratio=0.3, nsamples=32, seqlen=512, ridge_lambda=0.0, device="cpu")
    run_config = config_from_args(p.parse_args())
    config = run_config.prune
    torch.manual_seed(0)

    device = torch.device(run_config.device)
    model, tokenizer = grail.load_model(run_config.model, dtype=torch_dtype(run_config.dtype), device=device)
    size = model_bytes(model)
    windows, _ = grail.calibration_data(
        tokenizer, run_config.dataset, config.nsamples, run_config.seqlen, data_dir=run_config.data_dir
    )
    batch = config.calib_batch_size
    plain_forward_seconds(model, windows[:batch], batch)  # warm-up
    two_passes = plain_forward_seconds(model, windows, batch) + plain_forward_seconds(model, windows, batch)
    timer = Timer()
    reset_peak_rss()
    rss_before = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    report = grail.prune_model(model, windows, config, timer, progress=False)
    synchronize(device)
    prune_seconds = time.perf_counter() - start
    peak_rss = timer.memory()["peak_host_bytes"]
    figures = {
        "method": config.prune_method,
        "ratio": config.pruning_ratio,
        "compensate": config.compensate,
        "ridge_lambda": config.ridge_lambda,
        "nsamples": config.nsamples,
        "seqlen": run_config.seqlen,
        "threads": torch.get_num_threads(),
        "two_plain_forward_s": round(two_passes, 3),
        "prune_total_s": round(prune_seconds, 3),
        "sections_s": timer.as_dict(),
        "model_passes": round(report.model_passes, 3),
        "time_ratio": round(prune_seconds / two_passes, 3),
        "model_mib": round(size / 2**20, 1),
        "peak_rss_mib": round(peak_rss / 2**20, 1),
        "peak_rss_ratio": round(peak_rss / size, 3),
        "rss_before_prune_mib": round(rss_before / 2**20, 1),
        "prune_extra_rss_ratio": round((peak_rss - rss_before) / size, 3),
        "removed_fraction": round(report.removed_fraction, 4),
        "device": str(device),
        "dtype": run_config.dtype,
    }
    if device.type == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated(device)
        figures["peak_gpu_mib"] = round(peak_gpu / 2**20, 1)
        figures["peak_gpu_ratio"] = round(peak_gpu / size, 3)
    print(json.dumps(figures, indent=2))
    if run_config.output_json:
        with open(run_config.output_json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
