"""Plot what ``bench/bench_targets.py`` measured: WikiText-2 perplexity against pruning ratio, per target.

One panel per method (and calibration size), one line per ``--grail_target``; cells of
several JSON files are merged (a later file's cell replaces an earlier one's).

    python bench/plot_targets.py results/targets/c16x256_ratios.json results/targets/cost16.json \\
        --out docs/targets_c16x256.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLES = {"pruned": "-", "residual": "--", "auto": ":", "dense": "-."}


def merged_cells(paths: list[str]) -> dict[tuple[str, str, float], dict]:
    """``(calibration, method, ratio)`` -> ``{target: WikiText-2 perplexity}``, over all files in order."""
    cells: dict[tuple[str, str, float], dict] = {}
    for path in paths:
        for cell in json.loads(Path(path).read_text())["cells"]:
            key = (cell["calibration"], cell["method"], cell["ratio"])
            cells.setdefault(key, {}).update({t: v["wikitext2"] for t, v in cell["ppl"].items()})
    return cells


def plot(cells: dict[tuple[str, str, float], dict], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install 'grail[plot]'.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(calibration, method) for calibration, method, _ in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (calibration, method) in zip(axes[0], panels, strict=True):
        ratios = sorted(r for c, m, r in cells if (c, m) == (calibration, method))
        for target, style in STYLES.items():
            points = [(r, cells[(calibration, method, r)].get(target)) for r in ratios]
            points = [(r, v) for r, v in points if v is not None]
            if points:
                ax.plot([100 * r for r, _ in points], [v for _, v in points], style, marker="o", label=target)
        ax.set_yscale("log")
        ax.set_xlabel("pruning ratio (%)")
        ax.set_ylabel("WikiText-2 perplexity")
        ax.set_title(f"{method}, {calibration} calibration", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files written by bench_targets.py --out")
    parser.add_argument("--out", default="results/targets/targets.png")
    args = parser.parse_args()
    plot(merged_cells(args.results), Path(args.out))
    print(f"plot in {args.out}")


if __name__ == "__main__":
    main()
