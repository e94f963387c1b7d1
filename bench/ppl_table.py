"""Perplexity table: methods x ratios, with and without GRAIL, on one model (resumable).

    python bench/ppl_table.py --data_dir ../shared/data --out results/core \\
        --methods mag_sp,wanda_sp --ratios 0.1,0.2,0.3,0.5 --lambdas 0 \\
        --nsamples 32 --seqlen 512 --eval_samples 64

Each (method, ratio) runs without compensation and once per lambda (and fit) with it.
Results land in ``<out>/sweep.json`` and ``<out>/table.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import grail
from grail.sweep import sweep


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="mag_sp,wanda_sp")
    p.add_argument("--ratios", type=_floats, default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--lambdas", default="0", help="comma-separated ridge lambdas for the compensated runs")
    p.add_argument("--fits", default="affine", help="comma-separated --grail_fit values for the compensated runs")
    p.add_argument("--no_plain", action="store_true", help="skip the uncompensated runs")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval_samples", type=int, default=64)
    p.add_argument("--eval_dataset", default="wikitext2")
    p.add_argument("--extra", default="{}", help="JSON of PruneConfig fields shared by every run")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[grail] %(message)s")

    runs = []
    for method in args.methods.split(","):
        for ratio in args.ratios:
            if not args.no_plain:
                runs.append({"prune_method": method, "pruning_ratio": ratio, "compensate": False})
            for lam in args.lambdas.split(","):
                lam_value = lam if lam == "auto" else float(lam)
                for fit in args.fits.split(","):
                    runs.append(
                        {
                            "prune_method": method,
                            "pruning_ratio": ratio,
                            "compensate": True,
                            "ridge_lambda": lam_value,
                            "grail_fit": fit,
                        }
                    )
    base = grail.RunConfig(
        model=args.model,
        prune=grail.PruneConfig(nsamples=args.nsamples, **json.loads(args.extra)),
        seqlen=args.seqlen,
        data_dir=args.data_dir,
        eval_dataset=args.eval_dataset.split(","),
        eval_samples=args.eval_samples,
        eval_batch_size=4,
        device="cpu",
    )
    sweep(base, runs, args.out, progress=False)
    print(Path(args.out, "table.md").read_text())


if __name__ == "__main__":
    main()
