"""What ``--ridge_lambda auto`` costs against a fixed lambda, and what its local search changes.

Two parts, each reporting ratios measured in one process:

* ``model``: prunes the same model with the same calibration windows at a fixed lambda, with
  ``auto`` and the local search (the default) and with ``auto`` and the full search, for every
  method, ratio and calibration size given. Reports the pruning time of each (calibration, solves,
  surgery) over the fixed-lambda run's, the compensation time alone, the perplexity, and how
  often the local search chose what the full search chose: per consumer of the full run, by
  replaying the descent on that run's held-out errors (same statistics, so only the search
  differs), and per consumer of the two runs (whose statistics drift apart after a first
  different choice). With ``--fold_counts`` the local search also runs with those numbers of
  folds, and each is compared with the 4-fold run consumer by consumer (lambda and guard).
* ``layer``: one consumer of a synthetic decoder layer timed alone (random weights, correlated
  random activations, 4 folds): the whole cross-validation with the full search and with the
  local search started cold (at 0.1, as in a first layer) and warm (at the full search's
  choice, as when the previous layer chose the same); then the final solve at the chosen
  lambda. Each reports its time and the rise of resident memory it causes, in K x K float64
  matrices (the folds' Gram matrices, which every variant holds, are not in it).
* ``linalg``: what one factorisation, one solve and one eigendecomposition of a K x K float64
  system cost on this machine, as ratios to a Cholesky factorisation (does one
  eigendecomposition per fold, serving every lambda, pay here?).

    python bench/bench_lambda.py model --data_dir ../shared/data --methods flap,wanda_sp --ratios 0.3,0.5 \\
        --calibration 16x256,128x256 --out results/lambda_cost/model.json
    python bench/bench_lambda.py model --data_dir ../shared/data --methods flap,wanda_sp --ratios 0.3,0.5 \\
        --calibration 16x256 --fold_counts 2,3 --local_only --out results/lambda_cost/folds.json
    python bench/bench_lambda.py layer --shapes 896x4864,4096x11008 --out results/lambda_cost/layer.json
    python bench/bench_lambda.py linalg --sizes 1075,3900
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import grail
from grail.compensate import LAMBDA_START, choose_lambda, fit_consumer, grid_descent
from grail.engine import previous_lambda
from grail.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from grail.stats import InputStats
from grail.timing import Timer


def replayed_agreement(blocks: list[dict]) -> tuple[int, int]:
    """(consumers where the descent picks the full search's choice, consumers) from a full run's errors."""
    same = total = 0
    for i, row in enumerate(blocks):
        if "heldout_errors" not in row:
            continue
        errors = {float(k): v for k, v in row["heldout_errors"].items()}
        start = previous_lambda(blocks[:i], row["block"])
        local = grid_descent(errors.__getitem__, sorted(errors), LAMBDA_START if start is None else start)
        same += min(local, key=local.get) == row["lambda"]
        total += 1
    return same, total


def same_decisions(blocks: list[dict], reference: list[dict]) -> str:
    """Consumers where a run chose the reference run's lambda and guard decision, as ``same/total``."""
    same = [
        (a["lambda"], a["compensated"]) == (b["lambda"], b["compensated"])
        for a, b in zip(blocks, reference, strict=True)
    ]
    return f"{sum(same)}/{len(same)}"


def model_part(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    fold_counts = [int(f) for f in args.fold_counts.split(",") if f]
    dense, tokenizer = grail.load_model(args.model, dtype=torch.float32, device="cpu")
    cells = []
    for calibration in args.calibration.split(","):
        nsamples, seqlen = (int(v) for v in calibration.split("x"))
        windows, _ = grail.calibration_data(tokenizer, "wikitext2", nsamples, seqlen, data_dir=args.data_dir)
        for method in args.methods.split(","):
            for ratio in (float(r) for r in args.ratios.split(",")):
                variants = {
                    "fixed": {"ridge_lambda": args.fixed_lambda},
                    "auto local": {"ridge_lambda": "auto", "lambda_search": "local"},
                    "auto full": {"ridge_lambda": "auto", "lambda_search": "full"},
                }
                if args.local_only:
                    del variants["auto full"]
                for folds in fold_counts:  # the same search on fewer (or more) held-out folds
                    variants[f"auto local {folds} folds"] = variants["auto local"] | {"cv_folds": folds}
                runs = {}
                for name, options in variants.items():
                    config = grail.PruneConfig(
                        prune_method=method,
                        pruning_ratio=ratio,
                        nsamples=nsamples,
                        compensate=True,
                        calib_batch_size=args.calib_batch_size,
                        **options,
                    )
                    model, timer = copy.deepcopy(dense), Timer()
                    started = time.perf_counter()
                    report = grail.prune_model(model, windows, config, timer=timer, progress=False)
                    elapsed = time.perf_counter() - started
                    ppl = grail.evaluate_perplexity(
                        model,
                        tokenizer,
                        "wikitext2",
                        args.eval_seqlen,
                        args.data_dir,
                        args.eval_samples,
                        progress=False,
                    )["ppl"]
                    runs[name] = {"prune_s": elapsed, "timings": timer.as_dict(), "ppl": ppl, "blocks": report.blocks}
                    del model
                fixed = runs["fixed"]["prune_s"]
                full = runs.get("auto full", runs["auto local"])  # without the full search, the checks are void
                same, total = replayed_agreement(full["blocks"])
                paired = [
                    a["lambda"] == b["lambda"]
                    for a, b in zip(runs["auto local"]["blocks"], full["blocks"], strict=True)
                ]
                evaluated = [len(b["heldout_errors"]) for b in runs["auto local"]["blocks"]]
                cell = {
                    "calibration": calibration,
                    "method": method,
                    "ratio": ratio,
                    "ppl": {name: round(r["ppl"], 3) for name, r in runs.items()},
                    "prune_s": {name: round(r["prune_s"], 2) for name, r in runs.items()},
                    "compensation_s": {
                        name: round(r["timings"].get("compensation", 0.0), 2) for name, r in runs.items()
                    },
                    "calibration_s": {name: round(r["timings"].get("calibration", 0.0), 2) for name, r in runs.items()},
                    "time_over_fixed": {name: round(r["prune_s"] / fixed, 3) for name, r in runs.items()},
                    "local_over_full_ppl": round(runs["auto local"]["ppl"] / full["ppl"] - 1, 5)
                    if "auto full" in runs
                    else None,
                    "replayed_same_choice": f"{same}/{total}" if "auto full" in runs else None,
                    "run_same_choice": f"{sum(paired)}/{len(paired)}" if "auto full" in runs else None,
                    "local_candidates_mean": round(sum(evaluated) / len(evaluated), 2),
                }
                if fold_counts:  # each fold count against the default 4 folds, consumer by consumer
                    cell["folds_same_choice"] = {
                        folds: same_decisions(runs[f"auto local {folds} folds"]["blocks"], runs["auto local"]["blocks"])
                        for folds in fold_counts
                    }
                print(json.dumps(cell), flush=True)
                cells.append(cell | {"full_blocks": full["blocks"]})
    return {"cells": cells}


def synthetic_moments(dim: int, tokens: int, folds: int, seed: int) -> InputStats:
    """Fold statistics of ``tokens`` activations with a decaying spectrum and shared structure (float32 products)."""
    g = torch.Generator().manual_seed(seed)
    rank = min(dim, tokens) // 2
    mixing = torch.randn(rank, dim, generator=g) * torch.logspace(0, -2, rank).unsqueeze(1)
    stats = InputStats(dim, gram=True, n_folds=folds)
    per_fold = tokens // folds
    for f in range(folds):
        for start in range(0, per_fold, 1024):
            n = min(1024, per_fold - start)
            x = torch.randn(n, rank, generator=g) @ mixing + 0.05 * torch.randn(n, dim, generator=g)
            stats.update(x, fold=f)
    return stats


def layer_part(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    results = []
    for shape in args.shapes.split(","):
        hidden, width = (int(v) for v in shape.split("x"))
        stats = synthetic_moments(width, args.tokens, 4, seed=0)
        weight = torch.randn(hidden, width, generator=torch.Generator().manual_seed(1)) / width**0.5
        kept = torch.randperm(width, generator=torch.Generator().manual_seed(2))[: round(width * (1 - args.ratio))]
        kept = kept.sort().values
        folds = stats.fold_moments()
        row = {"hidden": hidden, "mlp": width, "kept": len(kept), "tokens": args.tokens}
        choices = {}
        # cold: the first layer's start; warm: the previous layer chose what this one chooses
        for variant, search in (("full", "full"), ("local cold", "local"), ("local warm", "local")):
            start = choices["full"].lam if variant == "local warm" else None
            before = rss_bytes()
            reset_peak_rss()
            started = time.perf_counter()
            choice = choose_lambda(weight, folds, kept, "affine", False, prior="pruned", search=search, start=start)
            row[f"{variant} s"] = round(time.perf_counter() - started, 2)
            # the rise of resident memory, in units of one kept-units Gram matrix (K x K float64)
            row[f"{variant} extra memory / K^2"] = round((peak_rss_bytes() - before) / (8 * len(kept) ** 2), 2)
            row[f"{variant} candidates"] = len(choice.errors)
            row[f"{variant} same choice"] = choice.lam == choices["full"].lam if choices else True
            choices[variant] = choice
        for variant in ("local cold", "local warm"):
            row[f"{variant} speedup"] = round(row["full s"] / row[f"{variant} s"], 2)
        row["lambda"] = choices["full"].lam
        # the final solve at the chosen lambda, as the engine makes it once the folds are merged
        stats.merge_folds()
        total = stats.moments()
        before = rss_bytes()
        reset_peak_rss()
        started = time.perf_counter()
        fit_consumer(weight, total, kept, choices["full"].lam, affine=True, prior="pruned")
        row["solve s"] = round(time.perf_counter() - started, 2)
        row["solve extra memory / K^2"] = round((peak_rss_bytes() - before) / (8 * len(kept) ** 2), 2)
        print(json.dumps(row), flush=True)
        results.append(row)
    return {"layers": results}


def linalg_part(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)

    def best_of(f, n: int = 3) -> float:
        f()
        times = []
        for _ in range(n):
            started = time.perf_counter()
            f()
            times.append(time.perf_counter() - started)
        return min(times)

    results = []
    for k in (int(v) for v in args.sizes.split(",")):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(k + 200, k, generator=g, dtype=torch.float64)
        a, rhs = x.T @ x, torch.randn(k, 128, generator=g, dtype=torch.float64)
        factor = torch.linalg.cholesky(a)
        cholesky = best_of(lambda: torch.linalg.cholesky(a))  # noqa: B023
        row = {"K": k, "cholesky_s": round(cholesky, 4)}
        timed = {
            "cholesky_solve_128": lambda: torch.cholesky_solve(rhs, factor),  # noqa: B023
            "eigh": lambda: torch.linalg.eigh(a),  # noqa: B023
            "eigvalsh": lambda: torch.linalg.eigvalsh(a),  # noqa: B023
        }
        for name, f in timed.items():
            row[f"{name} / cholesky"] = round(best_of(f, 1 if "eig" in name else 3) / cholesky, 2)
        print(json.dumps(row), flush=True)
        results.append(row)
    return {"linalg": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    m = sub.add_parser("model", help="auto against a fixed lambda on a model")
    m.add_argument("--model", default="smollm2-135m")
    m.add_argument("--data_dir", default=None)
    m.add_argument("--methods", default="flap,wanda_sp")
    m.add_argument("--ratios", default="0.3,0.5")
    m.add_argument("--calibration", default="16x256", help="comma-separated NSAMPLESxSEQLEN")
    m.add_argument("--fixed_lambda", type=float, default=0.001)
    m.add_argument("--local_only", action="store_true", help="leave out the full search")
    m.add_argument("--fold_counts", default="", help="comma-separated --cv_folds to run the local search with too")
    m.add_argument("--calib_batch_size", type=int, default=8)
    m.add_argument("--eval_seqlen", type=int, default=256)
    m.add_argument("--eval_samples", type=int, default=32)
    l = sub.add_parser("layer", help="one synthetic consumer's cross-validation timed alone")  # noqa: E741
    l.add_argument("--shapes", default="896x4864", help="comma-separated HIDDENxMLP")
    l.add_argument("--tokens", type=int, default=4096)
    l.add_argument("--ratio", type=float, default=0.2)
    a = sub.add_parser("linalg", help="factorisation, solve and eigendecomposition times on this machine")
    a.add_argument("--sizes", default="1075,3900", help="comma-separated K")
    for sp in (m, l, a):
        sp.add_argument("--threads", type=int, default=2)
        sp.add_argument("--out", default=None)
    args = p.parse_args()
    part = {"model": model_part, "layer": layer_part, "linalg": linalg_part}[args.part]
    summary = {"setting": vars(args)} | part(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
