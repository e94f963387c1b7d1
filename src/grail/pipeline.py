"""The whole job: load, calibrate, prune, compensate, evaluate, save, report.

:func:`run` (the command line and ``grail.run``) and :func:`grail.sweep.sweep` build their
runs from the same parts: :func:`read_texts` reads every input before the model is loaded,
:func:`make_workload` turns the texts into token windows once, :func:`prune_and_evaluate`
prunes a model and evaluates it, and :func:`results` writes the one results schema.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import Tensor, nn

from grail import data, distributed
from grail.calibration import available_ram
from grail.config import RunConfig
from grail.engine import PruneReport, check_target, prune_model
from grail.errors import GrailError
from grail.evaluate.perplexity import perplexity
from grail.evaluate.speed import SpeedSetting, format_speed, measure_speed
from grail.methods import Method, make_method
from grail.models.gguf_export import SOURCE_GGUF_ATTR, check_gguf_target, save_gguf
from grail.models.loading import load_model, resolve_model, torch_dtype
from grail.models.saving import check_output_file, check_output_folder, check_save_target, save_pruned
from grail.streaming import checkpoint_bytes, prune_streaming, streamed_model
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
    text = data.load_text(dataset, "calibration", data.resolve_data_dir(data_dir), seed)
    return _calibration_windows(tokenizer, text, nsamples, seqlen, seed), text.description


def _calibration_windows(tokenizer, text: data.TextSource, nsamples: int, seqlen: int, seed: int) -> Tensor:
    if text.description.startswith("offline"):
        log.info("offline data: calibrating on %s (no train split offline)", text.description)
    return data.calibration_windows(data.tokenize(tokenizer, text.text), nsamples, seqlen, seed)


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
    text = data.load_text(dataset, "evaluation", data.resolve_data_dir(data_dir))
    windows = EvaluationSet(
        data.evaluation_windows(data.tokenize(tokenizer, text.text), seqlen, dataset, max_windows), text.description
    )
    return _evaluate(model, dataset, windows, batch_size, progress)


@dataclass(frozen=True)
class EvaluationSet:
    windows: Tensor  # [n, seqlen]
    source: str  # where the text came from


@dataclass(frozen=True)
class Texts:
    """Everything a run reads from the data folder, read (and so checked) before the model is loaded."""

    calibration: data.TextSource | None
    evaluation: dict[str, data.TextSource]


@dataclass(frozen=True)
class Workload:
    """The token windows of a run: calibration windows and each evaluation set."""

    calibration: Tensor | None
    calibration_source: str | None
    evaluation: dict[str, EvaluationSet]


def read_texts(config: RunConfig, windows_needed: int) -> Texts:
    root = data.resolve_data_dir(config.data_dir)
    calibration = data.load_text(config.dataset, "calibration", root, config.prune.seed) if windows_needed else None
    return Texts(calibration, {name: data.load_text(name, "evaluation", root) for name in config.eval_datasets})


def make_workload(tokenizer, config: RunConfig, texts: Texts, windows_needed: int, timer: Timer) -> Workload:
    calibration = None
    if windows_needed:
        with timer.section("calibration"):
            calibration = _calibration_windows(
                tokenizer, texts.calibration, windows_needed, config.seqlen, config.prune.seed
            )
    evaluation = {
        name: EvaluationSet(
            data.evaluation_windows(data.tokenize(tokenizer, text.text), config.seqlen, name, config.eval_samples),
            text.description,
        )
        for name, text in texts.evaluation.items()
    }
    return Workload(calibration, texts.calibration.description if texts.calibration else None, evaluation)


def _evaluate(model, name: str, evaluation: EvaluationSet, batch_size: int, progress: bool, layer_source=None) -> dict:
    windows = evaluation.windows
    ppl = perplexity(model, windows, batch_size, progress, f"{name} perplexity", layer_source)
    log.info(
        "%s perplexity %.4f on %d windows of %d tokens (%s)",
        name,
        ppl,
        len(windows),
        windows.shape[1],
        evaluation.source,
    )
    return {"ppl": ppl, "windows": len(windows), "seqlen": windows.shape[1], "source": evaluation.source}


def evaluate_all(
    model: nn.Module, workload: Workload, config: RunConfig, timer: Timer, progress: bool, layer_source=None
) -> dict[str, dict]:
    """Perplexity on every evaluation set of the workload."""
    with timer.section("evaluation"):
        return {
            name: _evaluate(model, name, evaluation, config.eval_batch_size, progress, layer_source)
            for name, evaluation in workload.evaluation.items()
        }


def zero_shot_if_asked(model: nn.Module, tokenizer, config: RunConfig, timer: Timer) -> dict | None:
    """Zero-shot accuracy when ``config.zero_shot`` (process 0 only)."""
    if not config.zero_shot or not distributed.is_main():
        return None
    from grail.evaluate.zero_shot import zero_shot

    with timer.section("zero_shot"):
        return zero_shot(
            model,
            tokenizer,
            batch_size=config.eval_batch_size,
            limit=config.zero_shot_limit,
            data_dir=data.resolve_data_dir(config.data_dir),
        )


def prune_and_evaluate(
    model: nn.Module,
    tokenizer,
    config: RunConfig,
    workload: Workload,
    timer: Timer,
    method: Method | None = None,
    progress: bool = True,
    cache: dict | None = None,
) -> tuple[PruneReport, dict[str, dict], dict | None]:
    """Prune a model in memory and evaluate it: (report, perplexities, zero-shot or None)."""
    report = prune_model(model, workload.calibration, config.prune, timer, method, progress, cache)
    _log_report(report, config)
    evaluations = evaluate_all(model, workload, config, timer, progress)
    return report, evaluations, zero_shot_if_asked(model, tokenizer, config, timer)


def _log_report(report: PruneReport, config: RunConfig) -> None:
    if report.auto_lambda_summary():
        log.info(report.auto_lambda_summary())
    if report.underdetermined:
        log.warning(
            "%d compensated consumers had fewer calibration tokens than kept inputs at a fixed --ridge_lambda %g: "
            "their fits are underdetermined and may hurt; use --ridge_lambda auto or more calibration windows",
            report.underdetermined,
            config.prune.ridge_lambda,
        )
    ratio = config.prune.pruning_ratio
    if ratio > 0:
        log.info(
            "%s removed %.2f%% of the decoder's linear parameters (%d -> %d)",
            report.method,
            100 * report.removed_fraction,
            report.params_before,
            report.params_after,
        )
        if report.removed_fraction < ratio - 0.01:
            log.warning(
                "asked for %.1f%% but only %.1f%% could be removed: every block keeps at least one unit",
                100 * ratio,
                100 * report.removed_fraction,
            )


def results(
    config: RunConfig,
    report: PruneReport,
    evaluations: dict[str, dict],
    zero_shot: dict | None,
    timer: Timer,
    started: float,
    workload: Workload,
    device: str,
    streamed: bool = False,
) -> dict:
    """The results of one run, in the one schema of the command line, the API and the sweep."""
    timings = {f"{k}_s": v for k, v in timer.as_dict().items()}
    for key in ("calibration_s", "pruning_s", "compensation_s", "evaluation_s"):
        timings.setdefault(key, 0.0)
    timings["prune_total_s"] = round(timings["calibration_s"] + timings["pruning_s"] + timings["compensation_s"], 4)
    timings["wall_s"] = round(time.perf_counter() - started, 4)
    out = {
        "ppl": {name: e["ppl"] for name, e in evaluations.items()},
        "evaluation": evaluations,
        "params": {
            "before": report.params_before,
            "after": report.params_after,
            "removed_fraction": report.removed_fraction,
        },
        "timings": timings,
        "memory": timer.memory(),
        "calibration": {
            "source": workload.calibration_source,
            "windows": report.calibration_windows,
            "seqlen": config.seqlen,
        },
        "prune": report.as_dict(),
        "config": config.to_dict(),
        "device": str(device),
        "streamed": streamed,
        "processes": distributed.world_size(),
        "versions": library_versions(),
    }
    if zero_shot is not None:
        out["zero_shot"] = zero_shot
    return out


def strict_json(payload):
    """``payload`` with every NaN or infinite float replaced by None (strict JSON has no such literals)."""
    if isinstance(payload, float) and not math.isfinite(payload):
        return None
    if isinstance(payload, dict):
        return {k: strict_json(v) for k, v in payload.items()}
    if isinstance(payload, list | tuple):
        return [strict_json(v) for v in payload]
    return payload


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as strict JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    try:
        json.dumps(payload, allow_nan=False)
    except ValueError:
        log.warning("%s: NaN or Inf values (an overflowing perplexity, for one) are written as null", path)
    clean = strict_json(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean, indent=2, allow_nan=False))
    tmp.replace(path)


def check_before_work(config: RunConfig) -> None:
    """Everything that can be checked without the model: outputs writable, zero-shot ready."""
    if config.save_model:
        check_save_target(config.save_model)
    if config.save_gguf:
        check_gguf_target(config.save_gguf, "--save_gguf")
    if config.output_json:
        check_output_file(config.output_json, "--output_json")
    if config.prune.offload_activations:
        check_output_folder(config.prune.offload_activations, "--offload_activations")
    if config.zero_shot:
        from grail.evaluate.zero_shot import check_local_tasks, require_lm_eval

        require_lm_eval()
        root = data.resolve_data_dir(config.data_dir)
        if root is not None:
            check_local_tasks(root)


def check_model_limits(model_config, config: RunConfig) -> None:
    """What depends on the model, checked right after it is loaded and before any calibration."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context and config.seqlen > context:
        raise GrailError(
            f"--seqlen {config.seqlen} exceeds the model's context length ({context} positions); "
            f"use --seqlen {context} or less."
        )


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


def measure_run_speed(model: nn.Module, config: RunConfig, device: str, dtype: torch.dtype) -> dict:
    """Inference speed of the dense and the pruned model side by side (and of both as GGUF in llama.cpp)."""
    dense, _ = load_model(config.model, dtype=dtype, device=device)
    models: dict = {"dense": dense, "pruned": model}
    setting = SpeedSetting()
    with tempfile.TemporaryDirectory() as folder:
        if config.save_gguf:
            dense_gguf = Path(folder) / "dense.gguf"
            save_gguf(dense, None, dense_gguf, config.gguf_type, source_gguf=_vocab_source(dense, config))
            models |= {"dense.gguf": str(dense_gguf), "pruned.gguf": config.save_gguf}
        log.info("measuring inference speed: %s", ", ".join(models))
        figures = measure_speed(models, setting)
    log.info("inference speed:\n%s", format_speed(figures))
    return {"setting": asdict(setting), "models": figures}


def _vocab_source(dense: nn.Module, config: RunConfig) -> str:
    """The pruned model's exported file: it holds the same vocabulary as the dense model's."""
    return getattr(dense, SOURCE_GGUF_ATTR, None) or config.save_gguf


def run(config: RunConfig, progress: bool = True) -> dict:
    """Run the job described by ``config`` and return (and optionally write) its results.

    Under ``torchrun`` every process runs this with the same configuration; calibration
    and evaluation windows are shared out, statistics summed, and only process 0 writes.
    """
    timer = Timer()
    started = time.perf_counter()
    device = config.device or default_device()
    check_device(device, config.dtype)
    distributed.init_from_environment(device)
    # Everything that can be checked without the model is checked (and read) first.
    check_before_work(config)
    method = make_method(config.prune)
    check_target(config.prune, method)
    needed = config.prune.windows_needed(method.uses_activations)
    texts = read_texts(config, needed)
    too_big, size, available = _does_not_fit(config.model, device)
    streaming = config.offload or too_big
    if streaming and not config.save_model:
        reason = (
            f"the model ({size / 2**30:.1f} GiB) does not fit in the memory available ({available / 2**30:.1f} GiB)"
            if too_big
            else "--offload writes the pruned layers straight into the output checkpoint"
        )
        raise GrailError(f"{reason}; pass --save_model DIR to prune it layer by layer from disk.")
    if streaming and (config.save_gguf or config.speed):
        flag = "--save_gguf" if config.save_gguf else "--speed"
        raise GrailError(
            f"{flag} needs the whole pruned model in memory, which layer streaming avoids; drop {flag} and run "
            f"'grail export {config.save_model} --gguf FILE' or 'grail speed' on the saved checkpoint afterwards."
        )
    dtype = torch_dtype(config.dtype)
    metadata = {"config": config.to_dict()}
    speed = None
    if streaming:
        if too_big:
            log.info("the model does not fit in memory: pruning it layer by layer from disk")
        folder = _streaming_folder(config.model)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        from transformers import AutoConfig

        check_model_limits(AutoConfig.from_pretrained(folder), config)
        workload = make_workload(tokenizer, config, texts, needed, timer)
        report = prune_streaming(
            folder,
            config.save_model,
            workload.calibration,
            config.prune,
            tokenizer,
            device,
            dtype,
            metadata,
            timer,
            progress,
        )
        _log_report(report, config)
        distributed.barrier()
        pruned, layers = streamed_model(config.save_model, device, dtype)
        evaluations = evaluate_all(pruned, workload, config, timer, progress, layers)
        zero_shot = None
        if config.zero_shot:
            model, tokenizer = load_model(config.save_model, dtype=dtype, device=device)
            zero_shot = zero_shot_if_asked(model, tokenizer, config, timer)
    else:
        with timer.section("load"):
            model, tokenizer = load_model(config.model, dtype=dtype, device=device)
        check_model_limits(model.config, config)
        workload = make_workload(tokenizer, config, texts, needed, timer)
        report, evaluations, zero_shot = prune_and_evaluate(model, tokenizer, config, workload, timer, method, progress)
        if config.save_model and distributed.is_main():
            with timer.section("save"):
                save_pruned(
                    model, tokenizer, config.save_model, metadata | {"removed_fraction": report.removed_fraction}
                )
            log.info("saved the pruned model to %s", config.save_model)
        if config.save_gguf and distributed.is_main():
            with timer.section("export"):
                save_gguf(model, tokenizer, config.save_gguf, config.gguf_type)
            log.info("wrote the pruned model for llama.cpp to %s", config.save_gguf)
        speed = measure_run_speed(model, config, device, dtype) if config.speed and distributed.is_main() else None
    out = results(config, report, evaluations, zero_shot, timer, started, workload, device, streaming)
    if speed is not None:
        out["speed"] = speed
    if config.output_json and distributed.is_main():
        write_json(config.output_json, out)
        log.info("results written to %s", config.output_json)
    return out
