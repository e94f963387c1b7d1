"""Command line: flags derived from the option declarations of :mod:`grail.config` and the methods."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from dataclasses import Field
from pathlib import Path

from grail.config import (
    PruneConfig,
    RunConfig,
    declared_options,
    default_of,
    flag_name,
    ridge_lambda_value,
)
from grail.errors import GrailError, OutOfMemory
from grail.methods import METHODS

log = logging.getLogger("grail")


def _add_option(group: argparse._ArgumentGroup, f: Field, method: str | None = None) -> None:
    meta, default = f.metadata, default_of(f)
    text = meta["help"]
    if meta["choices"]:
        text += f" (one of {', '.join(map(str, meta['choices']))})"
    if method:
        text += f"; {method} only"
    if isinstance(default, bool):
        action = "store_false" if default else "store_true"
        group.add_argument(f"--{flag_name(f)}", dest=f.name, action=action, default=default, help=text)
        return
    # Choices and bounds are checked by the dataclasses, so every bad value gets the same one-line error.
    parse = meta["parse"] or type(default)
    group.add_argument(f"--{flag_name(f)}", dest=f.name, type=parse, default=default, help=text)


def add_config_options(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """Add a flag for every declared option (or those named in ``only``): the run's, pruning's, every method's."""
    groups = {name: parser.add_argument_group(name) for name in ("core", "compensation", "evaluation and output")}

    def group(name: str) -> argparse._ArgumentGroup:
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        return groups[name]

    for cls in (RunConfig, PruneConfig):
        for f in declared_options(cls):
            if only is None or f.name in only:
                _add_option(group(f.metadata["group"]), f)
    if only is not None:
        return
    for name, method in sorted(METHODS.items()):
        if method.options is not None:
            for f in declared_options(method.options):
                _add_option(group(f"{name} options"), f, name)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` the parsed flags describe (validated on construction)."""

    def values(cls: type) -> dict:
        return {f.name: getattr(args, f.name) for f in declared_options(cls)}

    method_options = {
        name: method.options(**values(method.options)) for name, method in METHODS.items() if method.options
    }
    prune = PruneConfig(**values(PruneConfig), method_options=method_options)
    return RunConfig(**values(RunConfig), prune=prune)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grail",
        description="Structured pruning of LLaMA-family models with training-free GRAIL compensation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def build_sweep_parser() -> argparse.ArgumentParser:
    """``grail sweep``: the run flags, plus the grid and the output folder."""
    p = build_parser()
    p.prog = "grail sweep"
    p.description = (
        "Run methods x ratios, without and with compensation, on one model; write sweep.json, table.md and "
        "ppl.png to --out. Finished runs are kept, so an interrupted sweep resumes."
    )
    g = p.add_argument_group("sweep")
    g.add_argument("--out", required=True, help="output folder (created; reused to resume)")
    g.add_argument("--methods", default="flap,wanda_sp", help="comma-separated pruning methods")
    g.add_argument("--ratios", type=_floats, default=[0.1, 0.2, 0.3, 0.5], help="comma-separated pruning ratios")
    g.add_argument("--variants", default="plain,grail", help="plain (no compensation), grail (compensation), or both")
    g.add_argument("--lambdas", default="0", help="comma-separated ridge lambdas (numbers or auto) for the GRAIL runs")
    g.add_argument("--fits", default="affine", help="comma-separated --grail_fit values for the GRAIL runs")
    return p


def sweep_main(argv: list[str]) -> int:
    args = build_sweep_parser().parse_args(argv)
    _set_up_logging(args)
    return _guarded(lambda: _sweep(args))


def _sweep(args: argparse.Namespace) -> int:
    from grail.sweep import grid, sweep

    for flag, given in (("--save_model", args.save_model), ("--save_gguf", args.save_gguf), ("--speed", args.speed)):
        if given:
            raise GrailError(
                f"grail sweep does not take {flag} (it would apply to every run); run the main command with {flag} "
                "for the setting you want to keep."
            )
    variants = {v.strip() for v in args.variants.split(",")}
    if not variants or not variants <= {"plain", "grail"}:
        raise GrailError(f"--variants takes plain and/or grail, got {args.variants!r}.")
    try:
        lambdas = tuple(ridge_lambda_value(v) for v in args.lambdas.split(","))
    except argparse.ArgumentTypeError:
        raise GrailError(f"--lambdas takes comma-separated numbers or auto, got {args.lambdas!r}.") from None
    runs = grid(
        args.methods.split(","),
        args.ratios,
        tuple(v == "grail" for v in ("plain", "grail") if v in variants),
        lambdas,
        tuple(args.fits.split(",")),
    )
    summary = sweep(config_from_args(args), runs, args.out, progress=not args.quiet)
    print((Path(args.out) / "table.md").read_text())
    print(f"{len(summary['results'])} runs; results in {args.out}/sweep.json, plot in {args.out}/ppl.png")
    return 0


def _summary(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"method {cfg['prune']['prune_method']}  ratio {cfg['prune']['pruning_ratio']}  "
        f"compensate {cfg['prune']['compensate']}  removed {100 * results['params']['removed_fraction']:.2f}% "
        f"of decoder linear parameters"
    ]
    for name, e in results["evaluation"].items():
        lines.append(f"  {name:10s} perplexity {e['ppl']:.4f}  ({e['windows']} windows x {e['seqlen']} tokens)")
    if "zero_shot" in results:
        from grail.evaluate.zero_shot import format_table

        lines.append(format_table(results["zero_shot"]))
    t = results["timings"]
    lines.append(f"  prune total {t['prune_total_s']:.1f}s  evaluation {t['evaluation_s']:.1f}s")
    return "\n".join(lines)


def _set_up_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="[grail] %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.quiet:
        # Libraries draw bars of their own (transformers' GGUF conversion, for one) without a
        # switch, and tqdm reads TQDM_DISABLE only when imported: default every bar to off.
        import tqdm

        tqdm.std.tqdm.__init__ = functools.partialmethod(tqdm.std.tqdm.__init__, disable=True)
        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that partial outputs are cleaned up on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def _guarded(job) -> int:
    """Run ``job()`` with one-line errors: 2 for bad input, 3 for out of memory, 130 for Ctrl-C, 143 for SIGTERM."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return job()
    except OutOfMemory as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except GrailError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); partial outputs were removed", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated (SIGTERM); partial outputs were removed", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_speed_parser() -> argparse.ArgumentParser:
    """``grail speed``: inference speed of saved models, side by side."""
    p = argparse.ArgumentParser(
        prog="grail speed",
        description="Prefill and decode tokens/s of each model (checkpoints in transformers, .gguf files in "
        "llama.cpp), interleaved in one process, with ratios to the first model of the same runtime (give the "
        "dense one first).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "models", nargs="+", help="saved checkpoints, hub ids or 'smollm2-135m' (transformers); .gguf files (llama.cpp)"
    )
    add_config_options(p, only={"device", "dtype", "output_json"})
    g = p.add_argument_group("speed")
    g.add_argument("--prefill", type=int, default=512, help="tokens per sequence of the prefill pass")
    g.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    g.add_argument("--decode", type=int, default=128, help="new tokens decoded (greedy, key/value cache)")
    g.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes")
    g.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _speed(args: argparse.Namespace) -> int:
    from grail.evaluate.speed import SpeedSetting, format_speed, measure_speed
    from grail.models.loading import load_model, torch_dtype
    from grail.models.saving import check_output_file
    from grail.pipeline import check_device, default_device, write_json

    run = RunConfig(device=args.device, dtype=args.dtype, output_json=args.output_json)  # validates them
    device = run.device or default_device()
    check_device(device, run.dtype)
    if run.output_json:
        check_output_file(run.output_json, "--output_json")
    try:
        batches = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise GrailError(f"--batch_sizes takes comma-separated integers, got {args.batch_sizes!r}.") from None
    numbers = {"--prefill": args.prefill, "--prompt": args.prompt, "--decode": args.decode, "--rounds": args.rounds}
    for flag, value in {**numbers, "--batch_sizes": min(batches)}.items():
        if value < 1:
            raise GrailError(f"{flag} must be at least 1, got {value}.")
    models = {}
    for name in args.models:
        if name in models:
            raise GrailError(f"{name!r} is given twice; give each model once.")
        if name.endswith(".gguf"):
            if not Path(name).is_file():
                raise GrailError(f"GGUF file {name!r} does not exist; check the path.")
            models[name] = name
        else:
            models[name] = load_model(name, torch_dtype(args.dtype), device)[0]
    setting = SpeedSetting(args.prefill, args.prompt, args.decode, batches, args.rounds)
    figures = measure_speed(models, setting)
    print(format_speed(figures))
    if args.output_json:
        write_json(
            args.output_json, {"setting": vars(setting), "device": device, "dtype": args.dtype, "models": figures}
        )
    return 0


def build_export_parser() -> argparse.ArgumentParser:
    """``grail export``: a saved checkpoint (or any loadable model) as a GGUF file for llama.cpp."""
    p = argparse.ArgumentParser(
        prog="grail export",
        description="Write a model (a GRAIL checkpoint, a folder, a .gguf file, a hub id or 'smollm2-135m') as a "
        "GGUF file that llama.cpp runs; per-layer widths use llama.cpp's 'deci' architecture.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="the model to export")
    p.add_argument("--gguf", required=True, help="the GGUF file to write (must not exist)")
    add_config_options(p, only={"gguf_type"})
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _export(args: argparse.Namespace) -> int:
    from grail.models.gguf_export import check_gguf_target, save_gguf
    from grail.models.loading import load_model

    RunConfig(gguf_type=args.gguf_type)  # validates it
    target = check_gguf_target(args.gguf)
    model, tokenizer = load_model(args.model)
    save_gguf(model, tokenizer, target, args.gguf_type)
    print(f"wrote {target}")
    return 0


def build_plan_parser() -> argparse.ArgumentParser:
    """``grail plan``: the run's flags, plus the memory to plan for."""
    p = build_parser()
    p.prog = "grail plan"
    p.description = (
        "Predict the peak memory of each stage of a run (device and host) and its time in plain forward passes, "
        "from the model's configuration alone (no weights are read); say whether it fits the memory given and "
        "which settings would make it fit."
    )
    g = p.add_argument_group("plan")
    g.add_argument("--device_memory", type=float, default=None, help="GiB of memory on the compute device (CUDA)")
    g.add_argument("--host_memory", type=float, default=None, help="GiB of host memory")
    g.add_argument("--processes", type=int, default=1, help="torchrun processes (ranks) of a data-parallel run")
    return p


def _plan(args: argparse.Namespace, device_memory: float | None, host_memory: float | None) -> int:
    from grail.pipeline import write_json
    from grail.plan import format_plan, plan_config

    config = config_from_args(args)
    processes = getattr(args, "processes", 1)
    if processes < 1:
        raise GrailError(f"--processes must be at least 1, got {processes}.")
    for flag, value in (("--device_memory", device_memory), ("--host_memory", host_memory)):
        if value is not None and not value > 0:
            raise GrailError(f"{flag} must be a positive number of GiB, got {value}.")
    plan = plan_config(config, device_memory, host_memory, processes)
    print(format_plan(plan))
    if config.output_json:
        write_json(config.output_json, plan.as_dict())
    return 0


def _memory(device: str | None, whole_device: bool = False) -> tuple[str, float | None, float | None]:
    """The compute device (None and auto resolved), GiB on it (available now, or in all with ``whole_device``;
    None off CUDA) and GiB available on the host now."""
    import torch

    from grail.calibration import available_ram

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = None
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        gpu = (total if whole_device else free) / 2**30
    return device, gpu, available_ram() / 2**30 or None


def _out_of_memory(err: BaseException) -> bool:
    """CUDA's out-of-memory errors, or a CPU allocation that failed (not the kernel's OOM killer: that ends the
    process)."""
    import torch

    text = str(err)
    return (
        isinstance(err, (torch.OutOfMemoryError, MemoryError))
        or "out of memory" in text.lower()
        or "CUBLAS_STATUS_ALLOC_FAILED" in text
        or "can't allocate memory" in text
    )


def _out_of_memory_error(config, err: BaseException) -> OutOfMemory:
    import gc
    import traceback

    import torch

    from grail.plan import out_of_memory_advice

    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    traceback.clear_frames(err.__traceback__)  # the run's tensors go, so the memory available is measured right
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # the whole device: the run held what it could of it
    device, gpu, host = _memory(config.device, whole_device=True)
    on_device = device.startswith("cuda") and ("CUDA" in first_line or "CUBLAS" in first_line)
    try:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        advice = out_of_memory_advice(config, device, on_device, gpu, host, processes)
    except Exception as plan_err:  # the advice must not hide the error itself
        advice = f"no plan could be made ({plan_err})"
    return OutOfMemory(f"out of memory ({first_line}); {advice}. Partial outputs were removed.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plan":
        args = build_plan_parser().parse_args(argv[1:])
        _set_up_logging(args)
        return _guarded(lambda: _plan(args, args.device_memory, args.host_memory))
    if argv and argv[0] == "export":
        args = build_export_parser().parse_args(argv[1:])
        _set_up_logging(args)
        return _guarded(lambda: _export(args))
    if argv and argv[0] == "sweep":
        return sweep_main(argv[1:])
    if argv and argv[0] == "speed":
        args = build_speed_parser().parse_args(argv[1:])
        _set_up_logging(args)
        return _guarded(lambda: _speed(args))
    args = build_parser().parse_args(argv)
    _set_up_logging(args)
    if args.dry_run:
        return _guarded(lambda: _plan(args, *_memory(args.device)[1:]))

    def job() -> int:
        from grail.pipeline import run

        config = config_from_args(args)
        try:
            results = run(config, progress=not args.quiet)
        except (RuntimeError, MemoryError) as err:
            if not _out_of_memory(err):
                raise
            raise _out_of_memory_error(config, err) from None
        print(_summary(results))
        return 0

    return _guarded(job)


if __name__ == "__main__":
    sys.exit(main())
