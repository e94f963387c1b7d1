"""The whole job: load, calibrate, prune, compensate, evaluate, save, report."""

from __future__ import annotations

import json
import logging
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import Tensor, nn

from grail import data
from grail.config import RunConfig
from grail.engine import prune_model
from grail.evaluate.perplexity import perplexity
from grail.methods import make_method
from grail.models.arch import arch_for, linear_param_count
from grail.models.loading import DTYPES, load_model
from grail.models.saving import check_save_target, save_pruned
from grail.timing import Timer

log = logging.getLogger("grail")


def calibration_data(
    tokenizer,
    dataset: str = "wikitext2",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> tuple[Tensor, str]:
    """``nsamples`` random calibration windows of ``seqlen`` tokens, and where they came from."""
    source = data.load_text(dataset, "calibration", data.resolve_data_dir(data_dir), seed)
    return _calibration_windows(tokenizer, source, nsamples, seqlen, seed), source.description


def _calibration_windows(tokenizer, source: data.TextSource, nsamples: int, seqlen: int, seed: int) -> Tensor:
    if source.description.startswith("offline"):
        log.info("offline data: calibrating on %s (no train split offline)", source.description)
    return data.calibration_windows(data.tokenize(tokenizer, source.text), nsamples, seqlen, seed)


def evaluate_perplexity(
    model: nn.Module,
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    data_dir: str | Path | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity on a dataset's evaluation split: ``{"ppl", "windows", "seqlen", "source"}``."""
    source = data.load_text(dataset, "evaluation", data.resolve_data_dir(data_dir))
    return _perplexity_on(model, tokenizer, dataset, source, seqlen, max_windows, batch_size, progress)


def _perplexity_on(model, tokenizer, dataset, source, seqlen, max_windows, batch_size, progress) -> dict:
    windows = data.evaluation_windows(data.tokenize(tokenizer, source.text), seqlen, dataset, max_windows)
    ppl = perplexity(model, windows, batch_size, progress, desc=f"{dataset} perplexity")
    log.info(
        "%s perplexity %.4f on %d windows of %d tokens (%s)", dataset, ppl, len(windows), seqlen, source.description
    )
    return {"ppl": ppl, "windows": len(windows), "seqlen": seqlen, "source": source.description}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("grail", "torch", "transformers", "accelerate", "safetensors", "datasets", "lm_eval"):
        try:
            found[package] = version(package.replace("_", "-"))
        except PackageNotFoundError:
            continue
    return found


def run(config: RunConfig, progress: bool = True) -> dict:
    """Run the job described by ``config`` and return (and optionally write) its results."""
    timer = Timer()
    started = time.perf_counter()
    prune_cfg = config.prune
    # Everything that can be checked without the model is checked (and read) first.
    if config.save_model:
        check_save_target(config.save_model)
    root = data.resolve_data_dir(config.data_dir)
    if config.zero_shot:
        from grail.evaluate.zero_shot import require_lm_eval

        require_lm_eval()
    method = make_method(prune_cfg)
    needed = prune_cfg.windows_needed(method.uses_activations)
    calib_text = data.load_text(config.dataset, "calibration", root, prune_cfg.seed) if needed else None
    eval_texts = {name: data.load_text(name, "evaluation", root) for name in config.eval_datasets}
    device = config.device or default_device()
    with timer.section("load"):
        model, tokenizer = load_model(config.model, dtype=DTYPES[config.dtype], device=device)
    arch = arch_for(model.config)
    windows = None
    if needed:
        with timer.section("calibration"):
            windows = _calibration_windows(tokenizer, calib_text, needed, config.seqlen, prune_cfg.seed)
    report = prune_model(model, windows, prune_cfg, timer, method, progress)
    if report.auto_lambda_summary():
        log.info(report.auto_lambda_summary())
    if prune_cfg.pruning_ratio > 0:
        log.info(
            "%s removed %.2f%% of the decoder's linear parameters (%d -> %d)",
            method.name,
            100 * report.removed_fraction,
            report.params_before,
            report.params_after,
        )
    evaluations = {}
    with timer.section("evaluation"):
        for name, source in eval_texts.items():
            evaluations[name] = _perplexity_on(
                model, tokenizer, name, source, config.seqlen, config.eval_samples, config.eval_batch_size, progress
            )
    zero_shot_result = None
    if config.zero_shot:
        from grail.evaluate.zero_shot import zero_shot

        with timer.section("zero_shot"):
            zero_shot_result = zero_shot(
                model, tokenizer, batch_size=config.eval_batch_size, limit=config.zero_shot_limit, data_dir=root
            )
    if config.save_model:
        with timer.section("save"):
            metadata = {"config": config.to_dict(), "removed_fraction": report.removed_fraction}
            save_pruned(model, tokenizer, config.save_model, metadata)
        log.info("saved the pruned model to %s", config.save_model)
    seconds = timer.as_dict()
    timings = {f"{k}_s": v for k, v in seconds.items()}
    for key in ("calibration_s", "pruning_s", "compensation_s", "evaluation_s"):
        timings.setdefault(key, 0.0)
    timings["prune_total_s"] = round(timings["calibration_s"] + timings["pruning_s"] + timings["compensation_s"], 4)
    timings["wall_s"] = round(time.perf_counter() - started, 4)
    results = {
        "ppl": {name: e["ppl"] for name, e in evaluations.items()},
        "evaluation": evaluations,
        "params": {
            "before": report.params_before,
            "after": linear_param_count(arch, model),
            "removed_fraction": report.removed_fraction,
        },
        "timings": timings,
        "calibration": {
            "source": calib_text.description if calib_text else None,
            "windows": needed,
            "seqlen": config.seqlen,
        },
        "prune": report.as_dict(),
        "config": config.to_dict(),
        "device": str(device),
        "versions": library_versions(),
    }
    if zero_shot_result is not None:
        results["zero_shot"] = zero_shot_result
    if config.output_json:
        path = Path(config.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        log.info("results written to %s", path)
    return results
