"""Command line: the specification's flags, mapped onto :class:`RunConfig` and :func:`run`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from grail.config import PruneConfig, RunConfig, available_methods
from grail.data import DATA_DIR_ENV, DATASETS
from grail.errors import GrailError

log = logging.getLogger("grail")


def _dataset_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in DATASETS:
            raise argparse.ArgumentTypeError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return names


def _ridge_lambda(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grail",
        description="Structured pruning of LLaMA-family models with training-free GRAIL compensation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    core = p.add_argument_group("core")
    core.add_argument(
        "--model", default="smollm2-135m", help="hub id, local folder, .gguf file, GRAIL checkpoint, or 'smollm2-135m'"
    )
    core.add_argument(
        "--prune_method", default=PruneConfig.prune_method, help=f"one of {', '.join(available_methods())}"
    )
    core.add_argument(
        "--pruning_ratio", type=float, default=0.5, help="share of the decoder's linear parameters to remove, in [0, 1)"
    )
    core.add_argument("--nsamples", type=int, default=128, help="calibration windows for the method's statistics")
    core.add_argument("--dataset", default="wikitext2", choices=DATASETS, help="calibration dataset")
    core.add_argument("--seqlen", type=int, default=2048, help="calibration and evaluation window length in tokens")
    core.add_argument("--seed", type=int, default=0, help="seed for the calibration windows")
    core.add_argument(
        "--data_dir",
        default=None,
        help=f"local dataset folder laid out like shared/data (or ${DATA_DIR_ENV}); default: the Hub",
    )
    core.add_argument("--calib_batch_size", type=int, default=8, help="calibration windows per forward batch")
    core.add_argument(
        "--attention_unit",
        default="group",
        choices=("group", "query"),
        help="attention unit under grouped-query attention: a key/value group, or a bundle of query heads (one per group)",
    )

    comp = p.add_argument_group("compensation")
    comp.add_argument("--compensate", action="store_true", help="enable GRAIL compensation")
    comp.add_argument(
        "--ridge_lambda",
        type=_ridge_lambda,
        default=0.001,
        help="ridge penalty, relative to the mean diagonal of the kept units' Gram matrix, or 'auto': chosen "
        "per consumer on held-out calibration windows, keeping the uncompensated weights where compensation "
        "does not help",
    )
    comp.add_argument(
        "--ridge_prior",
        default=None,
        choices=("zero", "pruned"),
        help="what the ridge penalty pulls the reconstruction towards: zero (the research code's ridge) or plain "
        "pruning (only the removed units' reconstruction is penalised); default: pruned with --ridge_lambda auto, "
        "zero with a fixed lambda",
    )
    comp.add_argument("--cv_folds", type=int, default=4, help="folds of calibration windows for --ridge_lambda auto")
    comp.add_argument(
        "--comp_nsamples",
        type=int,
        default=None,
        help="calibration windows for the Gram matrices (default: --nsamples)",
    )
    comp.add_argument(
        "--no_bias_compensation",
        action="store_true",
        help="add no bias to o_proj/down_proj (neither FLAP's mean bias nor the affine fit's intercept)",
    )
    comp.add_argument(
        "--grail_fit",
        default="affine",
        choices=("affine", "linear", "seed"),
        help="affine: fit with an intercept that becomes a bias; linear: no intercept; seed: linear fit plus the method's mean bias (the research code's convention, for comparison)",
    )

    flap = p.add_argument_group("FLAP")
    flap.add_argument("--metrics", default="WIFV", choices=("IFV", "WIFV", "WIFN"), help="FLAP importance metric")
    flap.add_argument(
        "--structure", default="AL-AM", choices=("UL-UM", "UL-MM", "AL-MM", "AL-AM"), help="FLAP allocation structure"
    )
    flap.add_argument(
        "--remove_heads", type=int, default=8, help="attention units to remove in total (FLAP UL-MM / AL-MM)"
    )

    wpp = p.add_argument_group("Wanda++")
    wpp.add_argument("--ro_iter", type=int, default=5, help="regional optimisation rounds")
    wpp.add_argument("--ro_lr", type=float, default=3e-7, help="regional optimisation learning rate")
    wpp.add_argument("--compensate_first", action="store_true", help="apply compensation before regional optimisation")
    wpp.add_argument("--alpha", type=float, default=100.0, help="regional gradient score weight")

    ev = p.add_argument_group("evaluation and output")
    ev.add_argument("--eval", action="store_true", help="perplexity on the calibration dataset's evaluation split")
    ev.add_argument(
        "--eval_dataset", type=_dataset_list, default=None, help="comma-separated datasets to evaluate (implies --eval)"
    )
    ev.add_argument(
        "--eval_samples", type=int, default=None, help="evaluate on the first N windows only (default: all)"
    )
    ev.add_argument("--eval_batch_size", type=int, default=16, help="windows per evaluation batch")
    ev.add_argument(
        "--zero_shot",
        action="store_true",
        help="0-shot accuracy on boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge (lm-evaluation-harness)",
    )
    ev.add_argument(
        "--zero_shot_limit", type=int, default=None, help="only the first N examples of each zero-shot task"
    )
    ev.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N, or auto (accelerate spreads the layers over all GPUs); default: cuda when available",
    )
    ev.add_argument(
        "--offload",
        action="store_true",
        help="stream decoder layers from the checkpoint's safetensors one at a time and write the pruned ones straight "
        "into --save_model (automatic when the model does not fit in memory)",
    )
    ev.add_argument(
        "--offload_activations",
        default=None,
        help="keep calibration activations in memory-mapped files in this folder (automatic, in a temporary folder, "
        "when they do not fit in memory)",
    )
    ev.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="weights and activations; statistics are always float64",
    )
    ev.add_argument(
        "--save_model", default=None, help="write the pruned model (safetensors, tokenizer, config) to this new folder"
    )
    ev.add_argument("--output_json", default=None, help="write the results to this JSON file")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
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
    from grail.sweep import grid, sweep

    args = build_sweep_parser().parse_args(argv)
    _set_up_logging(args)
    try:
        variants = {v.strip() for v in args.variants.split(",")}
        if not variants or not variants <= {"plain", "grail"}:
            raise GrailError(f"--variants takes plain and/or grail, got {args.variants!r}.")
        runs = grid(
            args.methods.split(","),
            args.ratios,
            tuple(v == "grail" for v in ("plain", "grail") if v in variants),
            tuple(_ridge_lambda(v) for v in args.lambdas.split(",")),
            tuple(args.fits.split(",")),
        )
        summary = sweep(config_from_args(args), runs, args.out, progress=not args.quiet)
    except (GrailError, argparse.ArgumentTypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((Path(args.out) / "table.md").read_text())
    print(f"{len(summary['results'])} runs; results in {args.out}/sweep.json, plot in {args.out}/ppl.png")
    return 0


def config_from_args(args: argparse.Namespace) -> RunConfig:
    prune = PruneConfig(
        prune_method=args.prune_method,
        pruning_ratio=args.pruning_ratio,
        nsamples=args.nsamples,
        comp_nsamples=args.comp_nsamples,
        compensate=args.compensate,
        ridge_lambda=args.ridge_lambda,
        cv_folds=args.cv_folds,
        ridge_prior=args.ridge_prior,
        grail_fit=args.grail_fit,
        bias_compensation=not args.no_bias_compensation,
        attention_unit=args.attention_unit,
        calib_batch_size=args.calib_batch_size,
        offload_activations=args.offload_activations,
        seed=args.seed,
        metrics=args.metrics,
        structure=args.structure,
        remove_heads=args.remove_heads,
        ro_iter=args.ro_iter,
        ro_lr=args.ro_lr,
        compensate_first=args.compensate_first,
        alpha=args.alpha,
    )
    return RunConfig(
        model=args.model,
        prune=prune,
        dataset=args.dataset,
        seqlen=args.seqlen,
        data_dir=args.data_dir,
        eval=args.eval,
        eval_dataset=args.eval_dataset,
        eval_samples=args.eval_samples,
        eval_batch_size=args.eval_batch_size,
        zero_shot=args.zero_shot,
        zero_shot_limit=args.zero_shot_limit,
        device=args.device,
        dtype=args.dtype,
        save_model=args.save_model,
        output_json=args.output_json,
        offload=args.offload,
    )


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
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sweep":
        return sweep_main(argv[1:])
    args = build_parser().parse_args(argv)
    _set_up_logging(args)
    from grail.pipeline import run

    try:
        results = run(config_from_args(args), progress=not args.quiet)
    except GrailError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
