"""What fitting towards the dense model (``--grail_target``) gains and costs, in one process.

For every calibration size, method and ratio given, prunes the same model with the same
calibration windows once per target (``pruned``, today's fit; ``dense``; ``residual``; and
``auto``, the per-consumer choice), all with ``--ridge_lambda auto``, and reports for each:
WikiText-2 perplexity (and the other datasets given for the ratios given), the pruning time
as a ratio to the ``pruned`` run, the growth of resident memory while pruning (freed heap
memory is handed back to the system first, and the high-water mark restarted) as a ratio to
the ``pruned`` run's, and which target ``auto`` chose how often. With ``--zero_shot_ratios`` the best target's
0-shot mean accuracy is measured beside ``pruned``'s. With ``--own_update`` there is no
GRAIL: the targets retarget the method's own update of the consumers (FLAP's bias
compensation, SlimGPT's refit; ``--targets pruned,dense,residual``). ``--target_blend B`` runs every
target but ``pruned`` with ``--grail_target_blend B``.

    python bench/bench_targets.py --data_dir ../shared/data --methods flap,wanda_sp --ratios 0.5 \\
        --calibration 16x256,64x256 --out results/targets/smollm2.json
    python bench/bench_targets.py --data_dir ../shared/data --methods flap,slimgpt --ratios 0.2,0.5 \\
        --calibration 16x256,64x256 --targets pruned,dense,residual --own_update --out results/targets/own.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import time
from pathlib import Path

import torch

import grail
from grail.data import resolve_data_dir
from grail.engine import check_target
from grail.evaluate.zero_shot import zero_shot
from grail.memory import peak_rss_bytes, reset_peak_rss, return_freed_memory, rss_bytes
from grail.methods import make_method
from grail.timing import Timer

TARGETS = ("pruned", "dense", "residual", "auto")


def prune_once(dense, windows, config: grail.PruneConfig) -> tuple:
    """(pruned model, report, seconds, timer, growth of resident memory in bytes or None)."""
    model, timer = copy.deepcopy(dense), Timer()
    return_freed_memory()
    before = rss_bytes() if reset_peak_rss() else None
    started = time.perf_counter()
    report = grail.prune_model(model, windows, config, timer=timer, progress=False)
    elapsed = time.perf_counter() - started
    # the run restarts the high-water mark in every section and keeps each section's peak
    peak = max([*timer.host_peaks.values(), peak_rss_bytes() or 0])
    growth = peak - before if before is not None and peak is not None else None
    return model, report, elapsed, timer, growth


def run_config(args: argparse.Namespace, method: str, ratio: float, nsamples: int, target: str) -> grail.PruneConfig:
    return grail.PruneConfig(
        prune_method=method,
        pruning_ratio=ratio,
        nsamples=nsamples,
        compensate=not args.own_update,
        ridge_lambda=0.001 if args.own_update else "auto",
        grail_target=target,
        grail_target_blend=1.0 if target == "pruned" else args.target_blend,
        calib_batch_size=args.calib_batch_size,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--methods", default="flap,wanda_sp")
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--calibration", default="16x256", help="comma-separated NxSEQLEN calibration sizes")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--eval_seqlen", type=int, default=256)
    parser.add_argument("--eval_samples", type=int, default=64)
    parser.add_argument("--more_datasets", default="ptb,c4", help="also evaluated for --more_ratios")
    parser.add_argument("--more_ratios", default="0.5")
    parser.add_argument(
        "--zero_shot_ratios", default="", help="ratios whose pruned and best target get 0-shot accuracy"
    )
    parser.add_argument("--zero_shot_limit", type=int, default=200)
    parser.add_argument("--calib_batch_size", type=int, default=8)
    parser.add_argument(
        "--own_update", action="store_true", help="no GRAIL: the targets retarget the method's own update"
    )
    parser.add_argument(
        "--target_blend", type=float, default=1.0, help="--grail_target_blend of every target but pruned"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for method in args.methods.split(","):  # every run's settings are checked before the first one
        for target in args.targets.split(","):
            config = run_config(args, method, 0.5, 16, target)
            check_target(config, make_method(config))
    dense, tokenizer = grail.load_model(args.model, dtype=torch.float32, device="cpu")
    more_ratios = {float(r) for r in args.more_ratios.split(",") if r}
    zero_shot_ratios = {float(r) for r in args.zero_shot_ratios.split(",") if r}
    cells = []
    for calibration in args.calibration.split(","):
        nsamples, seqlen = (int(v) for v in calibration.split("x"))
        windows, _ = grail.calibration_data(tokenizer, "wikitext2", nsamples, seqlen, data_dir=args.data_dir)
        for method in args.methods.split(","):
            for ratio in (float(r) for r in args.ratios.split(",")):
                datasets = ["wikitext2", *(args.more_datasets.split(",") if ratio in more_ratios else [])]
                runs, models = {}, {}
                for target in args.targets.split(","):
                    config = run_config(args, method, ratio, nsamples, target)
                    model, report, elapsed, timer, growth = prune_once(dense, windows, config)
                    ppl = {
                        name: grail.evaluate_perplexity(
                            model, tokenizer, name, args.eval_seqlen, args.data_dir, args.eval_samples, progress=False
                        )["ppl"]
                        for name in datasets
                    }
                    chosen = collections.Counter(b.get("target", target) for b in report.blocks)
                    runs[target] = {
                        "ppl": ppl,
                        "prune_s": elapsed,
                        "memory_growth": growth,
                        "timings": timer.as_dict(),
                        "chosen": dict(chosen),
                    }
                    models[target] = model
                    line = {"calibration": calibration, "method": method, "ratio": ratio, "blend": args.target_blend}
                    line[target] = ppl
                    mib = growth and round(growth / 2**20, 1)
                    print(
                        json.dumps(line | {"prune_s": round(elapsed, 1), "growth_mib": mib, "chosen": dict(chosen)}),
                        flush=True,
                    )
                base = runs.get("pruned")  # the ratios need the default target among those run
                cell = {
                    "blend": args.target_blend,
                    "calibration": calibration,
                    "method": method,
                    "ratio": ratio,
                    "ppl": {t: {d: round(v, 3) for d, v in r["ppl"].items()} for t, r in runs.items()},
                    "ppl_over_pruned": base
                    and {t: round(r["ppl"]["wikitext2"] / base["ppl"]["wikitext2"], 4) for t, r in runs.items()},
                    "time_over_pruned": base and {t: round(r["prune_s"] / base["prune_s"], 3) for t, r in runs.items()},
                    "prune_s": {t: round(r["prune_s"], 1) for t, r in runs.items()},
                    "memory_growth_mib": {
                        t: r["memory_growth"] and round(r["memory_growth"] / 2**20, 1) for t, r in runs.items()
                    },
                    "memory_over_pruned": base
                    and base["memory_growth"]
                    and {
                        t: r["memory_growth"] and round(r["memory_growth"] / base["memory_growth"], 3)
                        for t, r in runs.items()
                    },
                    "calibration_s": {t: round(r["timings"].get("calibration", 0.0), 1) for t, r in runs.items()},
                    "compensation_s": {t: round(r["timings"].get("compensation", 0.0), 1) for t, r in runs.items()},
                    "auto_chose": runs.get("auto", {}).get("chosen"),
                    # the yardstick of the extra memory: one copy of the calibration activations
                    "activations_copy_mib": round(
                        nsamples * seqlen * dense.config.hidden_size * dense.dtype.itemsize / 2**20, 1
                    ),
                }
                if ratio in zero_shot_ratios:
                    best = min(runs, key=lambda t: runs[t]["ppl"]["wikitext2"])
                    cell["zero_shot"] = {}
                    for target in dict.fromkeys(t for t in ("pruned", best) if t in models):
                        scores = zero_shot(
                            models[target],
                            tokenizer,
                            limit=args.zero_shot_limit,
                            data_dir=resolve_data_dir(args.data_dir),
                        )
                        cell["zero_shot"][target] = {k: scores[k] for k in ("mean_acc", "mean_acc_norm")}
                print(json.dumps(cell), flush=True)
                cells.append(cell)
                del models
                if args.out:  # after every cell, so that a stopped run keeps what it measured
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps({"cells": cells}, indent=1))


if __name__ == "__main__":
    main()
