"""Check a lambda sweep against the targets of ``--ridge_lambda auto``.

For every method and ratio of a ``grail sweep`` result with plain, fixed-lambda and auto
runs: is auto's perplexity at most plain pruning's, and within 2% of the best fixed lambda's?
Also reports auto's pruning time over the fixed-lambda runs' mean.

    python bench/lambda_check.py results/lambda_16/sweep.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean


def cells(results: list[dict], dataset: str) -> dict[tuple[str, float], dict[str, dict]]:
    """(method, ratio) -> {variant: run}, variant 'plain', 'auto' or the fixed lambda as text."""
    table: dict[tuple[str, float], dict[str, dict]] = defaultdict(dict)
    for run in results:
        o = run["overrides"]
        variant = str(o.get("ridge_lambda", "plain")) if o.get("compensate") else "plain"
        if o.get("grail_fit", "affine") != "affine" or dataset not in run["ppl"]:
            continue
        table[(o["prune_method"], o["pruning_ratio"])][variant] = run
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="a sweep.json, or a sweep's runs/ folder while it is still running")
    p.add_argument("--dataset", default="wikitext2")
    args = p.parse_args()
    path = Path(args.sweep)
    if path.is_dir():
        results = [json.loads(f.read_text()) for f in sorted(path.glob("*.json")) if f.name != "dense.json"]
    else:
        results = json.loads(path.read_text())["results"]
    print(
        "| Method | Ratio | plain | best fixed (lambda) | auto | auto <= plain | auto within 2% of best fixed | auto time / fixed |"
    )
    print("|---|---|---|---|---|:-:|:-:|---|")
    failures = 0
    for (method, ratio), runs in sorted(cells(results, args.dataset).items()):
        if "plain" not in runs or "auto" not in runs:
            continue
        ppl = {v: r["ppl"][args.dataset] for v, r in runs.items()}
        fixed = {v: x for v, x in ppl.items() if v not in ("plain", "auto")}
        best = min(fixed, key=fixed.get)
        not_worse = ppl["auto"] <= ppl["plain"]
        close = ppl["auto"] <= 1.02 * fixed[best]
        failures += (not not_worse) + (not close)
        fixed_time = mean(runs[v]["timings"]["prune_total_s"] for v in fixed)
        ratio_time = runs["auto"]["timings"]["prune_total_s"] / fixed_time
        print(
            f"| {method} | {ratio:.0%} | {ppl['plain']:.2f} | {fixed[best]:.2f} ({best}) | {ppl['auto']:.2f} "
            f"| {'yes' if not_worse else 'NO'} | {'yes' if close else 'NO'} | {ratio_time:.2f} |"
        )
    print(f"\n{failures} target(s) missed")


if __name__ == "__main__":
    main()
