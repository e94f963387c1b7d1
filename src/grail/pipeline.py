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

from grail import data, distributed
from grail.calibration import available_ram
from grail.config import RunConfig
from grail.engine import prune_model
from grail.errors import GrailError
from grail.evaluate.perplexity import perplexity
from grail.methods import make_method
from grail.models.loading import DTYPES, load_model, resolve_model
from grail.models.saving import check_save_target, save_pruned
from grail.streaming import checkpoint_bytes, prune_streaming, streamed_perplexity
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


def check_device(device: str, dtype: str) -> None:
    """A clear error for a device or dtype this machine cannot use."""
    if device == "auto":
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GrailError(f"--device {device}: CUDA is not available here; use --device cpu.")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise GrailError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise GrailError(f"--dtype bfloat16 is not supported by {torch.cuda.get_device_name(index)}; use float16.")
    elif device.startswith("mps"):
        raise GrailError("--device mps cannot hold the float64 statistics GRAIL needs; use --device cpu.")
    elif device != "cpu":
        raise GrailError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}.")


def _streaming_folder(model: str) -> Path:
    """A local folder of safetensors for ``model`` (a hub id is downloaded), for layer streaming."""
    location, gguf = resolve_model(model)
    if gguf:
        raise GrailError(
            "layer streaming (--offload) reads safetensors checkpoints, not GGUF files; save the model first "
            "(--pruning_ratio 0 --save_model DIR) and stream that folder."
        )
    if Path(location).is_dir():
        return Path(location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(location, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as err:
        raise GrailError(f"could not download {model!r} for layer streaming: {err}") from None


def _does_not_fit(model: str, device: str) -> tuple[bool, int, int]:
    """(whether a safetensors checkpoint is too big for memory, its bytes, the bytes available)."""
    location, gguf = resolve_model(model)
    if gguf or not Path(location).is_dir():
        return False, 0, 0
    size = checkpoint_bytes(location)
    available = torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda") else available_ram()
    return bool(available) and size > 0.8 * available, size, available


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("grail", "torch", "transformers", "accelerate", "safetensors", "datasets", "lm_eval"):
        try:
            found[package] = version(package.replace("_", "-"))
        except PackageNotFoundError:
            continue
    return found


def run(config: RunConfig, progress: bool = True) -> dict:
    """Run the job described by ``config`` and return (and optionally write) its results.

    Under ``torchrun`` every process runs this with the same configuration; calibration
    and evaluation windows are shared out, statistics summed, and only process 0 writes.
    """
    timer = Timer()
    started = time.perf_counter()
    prune_cfg = config.prune
    device = config.device or default_device()
    check_device(device, config.dtype)
    distributed.init_from_environment(device)
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
    too_big, size, available = _does_not_fit(config.model, device)
    streaming = config.offload or too_big
    if streaming and not config.save_model:
        reason = (
            f"the model ({size / 2**30:.1f} GiB) does not fit in the memory available ({available / 2**30:.1f} GiB)"
            if too_big
            else "--offload writes the pruned layers straight into the output checkpoint"
        )
        raise GrailError(f"{reason}; pass --save_model DIR to prune it layer by layer from disk.")
    dtype = DTYPES[config.dtype]
    metadata = {"config": config.to_dict()}
    evaluations, zero_shot_result = {}, None
    if streaming:
        if too_big:
            log.info("the model does not fit in memory: pruning it layer by layer from disk")
        folder = _streaming_folder(config.model)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        windows = _windows(tokenizer, calib_text, needed, config, timer)
        report = prune_streaming(
            folder, config.save_model, windows, prune_cfg, tokenizer, device, dtype, metadata, timer, progress
        )
        distributed.barrier()
        with timer.section("evaluation"):
            for name, source in eval_texts.items():
                windows = data.evaluation_windows(
                    data.tokenize(tokenizer, source.text), config.seqlen, name, config.eval_samples
                )
                ppl = streamed_perplexity(config.save_model, windows, config.eval_batch_size, device, dtype)
                evaluations[name] = {
                    "ppl": ppl,
                    "windows": len(windows),
                    "seqlen": config.seqlen,
                    "source": source.description,
                }
                log.info(
                    "%s perplexity %.4f on %d windows of %d tokens (layer by layer)",
                    name,
                    ppl,
                    len(windows),
                    config.seqlen,
                )
        model = None
        if config.zero_shot:
            model, tokenizer = load_model(config.save_model, dtype=dtype, device=device)
    else:
        with timer.section("load"):
            model, tokenizer = load_model(config.model, dtype=dtype, device=device)
        windows = _windows(tokenizer, calib_text, needed, config, timer)
        report = prune_model(model, windows, prune_cfg, timer, method, progress)
        with timer.section("evaluation"):
            for name, source in eval_texts.items():
                evaluations[name] = _perplexity_on(
                    model, tokenizer, name, source, config.seqlen, config.eval_samples, config.eval_batch_size, progress
                )
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
    if config.zero_shot and distributed.is_main():
        from grail.evaluate.zero_shot import zero_shot

        with timer.section("zero_shot"):
            zero_shot_result = zero_shot(
                model, tokenizer, batch_size=config.eval_batch_size, limit=config.zero_shot_limit, data_dir=root
            )
    if config.save_model and not streaming and distributed.is_main():
        with timer.section("save"):
            save_pruned(model, tokenizer, config.save_model, metadata | {"removed_fraction": report.removed_fraction})
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
            "after": report.params_after,
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
        "streamed": streaming,
        "processes": distributed.world_size(),
        "versions": library_versions(),
    }
    if zero_shot_result is not None:
        results["zero_shot"] = zero_shot_result
    if config.output_json and distributed.is_main():
        path = Path(config.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        log.info("results written to %s", path)
    return results


def _windows(tokenizer, calib_text, needed: int, config: RunConfig, timer: Timer) -> Tensor | None:
    if not needed:
        return None
    with timer.section("calibration"):
        return _calibration_windows(tokenizer, calib_text, needed, config.seqlen, config.prune.seed)
