"""Command line: the specification's flags, mapped onto :class:`RunConfig` and :func:`run`."""

from __future__ import annotations

import argparse
import logging
import sys

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
        default="zero",
        choices=("zero", "pruned"),
        help="what the ridge penalty pulls the reconstruction towards: zero (the research code's ridge) or plain "
        "pruning (only the removed units' reconstruction is penalised)",
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
    ev.add_argument("--zero_shot", action="store_true", help="zero-shot task evaluation")
    ev.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
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


def config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.zero_shot:
        raise GrailError("--zero_shot is not available in this version; use --eval for perplexity.")
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
        device=args.device,
        dtype=args.dtype,
        save_model=args.save_model,
        output_json=args.output_json,
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
    t = results["timings"]
    lines.append(f"  prune total {t['prune_total_s']:.1f}s  evaluation {t['evaluation_s']:.1f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[grail] %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.quiet:
        hf_logging.disable_progress_bar()
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
