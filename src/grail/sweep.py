"""Many pruning runs on one model: methods x ratios x variants, resumable, with a table and a plot.

The model is loaded once and copied for each run. Calibration and evaluation windows are
tokenised once; the first decoder layer's calibration inputs, and FLAP's scoring pass over
the dense model, are computed once and shared by every run that can use them. Each
finished run is written to ``<out>/runs/<key>.json`` as soon as it ends, so an interrupted
sweep resumes where it stopped. At the end:

* ``<out>/sweep.json``: every result, the dense model's, and the settings;
* ``<out>/table.md``: perplexity shaped like the paper's table (rows: dataset and method,
  columns: pruning ratio), plus zero-shot mean accuracy when it was measured;
* ``<out>/ppl.png``: perplexity against pruning ratio, one colour per method, dashed
  without compensation and solid with it, log scale.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from grail.calibration import Calibration
from grail.config import RunConfig
from grail.engine import check_target
from grail.errors import GrailError
from grail.methods import make_method
from grail.models.loading import load_model, torch_dtype
from grail.pipeline import (
    check_before_work,
    check_model_limits,
    default_device,
    library_versions,
    make_workload,
    prune_and_evaluate,
    read_texts,
    results,
    write_json,
)
from grail.timing import Timer

log = logging.getLogger("grail")


def run_key(overrides: dict) -> str:
    """A stable file name for a run's overrides."""
    return "_".join(f"{k}={overrides[k]}" for k in sorted(overrides)).replace("/", "-")


def grid(
    methods: list[str],
    ratios: list[float],
    compensate: tuple[bool, ...] = (False, True),
    lambdas: tuple[float | str, ...] = (0.0,),
    fits: tuple[str, ...] = ("affine",),
) -> list[dict]:
    """Run overrides for every method and ratio: without compensation, and once per lambda and fit with it."""
    runs = []
    for method in methods:
        for ratio in ratios:
            if False in compensate:
                runs.append({"prune_method": method, "pruning_ratio": ratio, "compensate": False})
            if True in compensate:
                runs += [
                    {
                        "prune_method": method,
                        "pruning_ratio": ratio,
                        "compensate": True,
                        "ridge_lambda": lam,
                        "grail_fit": fit,
                    }
                    for lam in lambdas
                    for fit in fits
                ]
    return runs


def run_label(prune: dict, varied: set[str]) -> str:
    """Row label: the method, '+ GRAIL' when compensating, and any other varied setting (``prune``: a results JSON's)."""
    label = prune["prune_method"] + (" + GRAIL" if prune["compensate"] else "")
    extras = [f"{k}={prune[k]}" for k in sorted(varied - {"prune_method", "pruning_ratio", "compensate"})]
    if not prune["compensate"]:
        extras = [e for e in extras if not e.startswith(("ridge_lambda", "grail_fit", "comp_nsamples", "ridge_prior"))]
    target = prune.get("grail_target", "pruned")
    if target != "pruned" and "grail_target" not in varied:  # a plain run's own update is retargeted too
        extras.append(f"grail_target={target}")
    blend = prune.get("grail_target_blend", 1.0)
    if blend != 1.0 and "grail_target_blend" not in varied:
        extras.append(f"grail_target_blend={blend}")
    return label + (f" ({', '.join(extras)})" if extras else "")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise GrailError("the sweep's plot needs matplotlib: pip install 'grail[plot]'.") from None


def sweep(base: RunConfig, runs: list[dict], out_dir: str | Path, progress: bool = True) -> dict:
    """Run every ``runs`` entry (PruneConfig overrides) on ``base``; returns the summary.

    Every run's results have the schema of :func:`grail.run`'s, plus its ``overrides``.
    """
    _require_matplotlib()
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if not base.eval_datasets:
        base = replace(base, eval=True)  # a sweep always reports perplexity on the calibration dataset
    configs = [replace(base, prune=replace(base.prune, **overrides)) for overrides in runs]  # validates every run
    check_before_work(base)
    methods = [make_method(c.prune) for c in configs]
    for config, method in zip(configs, methods, strict=True):
        check_target(config.prune, method)  # before any run, not when its turn comes
    needed = max(c.prune.windows_needed(m.uses_activations) for c, m in zip(configs, methods, strict=True))
    texts = read_texts(base, needed)
    device = base.device or default_device()
    model, tokenizer = load_model(base.model, torch_dtype(base.dtype), device)
    check_model_limits(model.config, base)
    workload = make_workload(tokenizer, base, texts, needed, Timer())

    def execute(config: RunConfig, model) -> dict:
        timer, started = Timer(), time.perf_counter()
        report, evaluations, zero_shot = prune_and_evaluate(
            model, tokenizer, config, workload, timer, progress=progress, cache=cache
        )
        return results(config, report, evaluations, zero_shot, timer, started, workload, device)

    cache: dict = {}  # first-layer inputs and dense scoring passes, reused across runs
    dense_path = out / "runs" / "dense.json"
    if not dense_path.exists():
        write_json(dense_path, execute(replace(base, prune=replace(base.prune, pruning_ratio=0.0)), model))
    dense = json.loads(dense_path.read_text())
    results_ = []
    try:
        for number, (overrides, config) in enumerate(zip(runs, configs, strict=True), start=1):
            path = out / "runs" / f"{run_key(overrides)}.json"
            if path.exists():
                results_.append(json.loads(path.read_text()))
                log.info("sweep run %d/%d: %s (done before)", number, len(runs), run_key(overrides))
                continue
            log.info("sweep run %d/%d: %s", number, len(runs), run_key(overrides))
            result = {"overrides": overrides, **execute(config, copy.deepcopy(model))}
            write_json(path, result)
            results_.append(result)
    finally:  # the first-layer activations the runs shared, when they spilled to disk
        for value in cache.values():
            if isinstance(value, Calibration):
                value.release()
    summary = {
        "model": base.model,
        "seqlen": base.seqlen,
        "calibration_windows": needed,
        "evaluation_windows": {name: len(e.windows) for name, e in workload.evaluation.items()},
        "zero_shot_limit": base.zero_shot_limit if base.zero_shot else None,
        "dense": dense,
        "results": results_,
        "versions": library_versions(),
    }
    write_json(out / "sweep.json", summary)
    (out / "table.md").write_text(markdown_table(summary, runs))
    plot(summary, runs, out / "ppl.png")
    return summary


def _rows(summary: dict, runs: list[dict]) -> dict[tuple[str, str], dict[float, dict]]:
    """(dataset, label) -> ratio -> result, for every dataset evaluated."""
    keys = {k for r in runs for k in r}
    varied = {k for k in keys if len({str(r[k]) for r in runs if k in r}) > 1}
    rows: dict[tuple[str, str], dict[float, dict]] = {}
    for result in summary["results"]:
        prune = result["config"]["prune"]
        for name in result["ppl"]:
            rows.setdefault((name, run_label(prune, varied)), {})[prune["pruning_ratio"]] = result
    return rows


def markdown_table(summary: dict, runs: list[dict]) -> str:
    """Perplexity (and zero-shot mean accuracy) per dataset and method variant, one column per ratio."""
    rows = _rows(summary, runs)
    columns = sorted({ratio for values in rows.values() for ratio in values})
    windows = ", ".join(f"{n}: {w} windows" for n, w in summary["evaluation_windows"].items())
    dense = summary["dense"]
    head = "| Dataset | Method | " + " | ".join(f"{100 * r:g}%" for r in columns) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    lines = [
        f"Perplexity of {summary['model']} (sequence length {summary['seqlen']}; {windows}; "
        f"{summary['calibration_windows']} calibration windows). Dense: "
        + ", ".join(f"{n} {v:.2f}" for n, v in dense["ppl"].items())
        + ".",
        "",
        head,
        rule,
    ]
    for (name, label), values in sorted(rows.items()):
        cells = [f"{values[r]['ppl'][name]:.2f}" if r in values else "" for r in columns]
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    if "zero_shot" in dense:
        lines += [
            "",
            f"Zero-shot mean accuracy (acc over 6 tasks; first {summary['zero_shot_limit']} examples per task). "
            f"Dense: {dense['zero_shot']['mean_acc']:.4f}.",
            "",
            head.replace("| Dataset | ", "| "),
            rule[4:],
        ]
        labels = sorted({label for (_, label) in rows})
        for label in labels:
            values = next(v for (n, lab), v in rows.items() if lab == label)
            cells = [f"{values[r]['zero_shot']['mean_acc']:.4f}" if r in values else "" for r in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, runs: list[dict], path: Path) -> None:
    """Perplexity against pruning ratio: a colour per method, dashed plain, solid compensated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(summary, runs)
    datasets = sorted({name for name, _ in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    methods = sorted({r["config"]["prune"]["prune_method"] for r in summary["results"]})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    markers = {}  # variants of one method get different markers
    for ax, name in zip(axes[0], datasets, strict=True):
        for (dataset, label), values in sorted(rows.items()):
            if dataset != name:
                continue
            ratios = sorted(values)
            prune = values[ratios[0]]["config"]["prune"]
            ax.plot(
                [100 * r for r in ratios],
                [values[r]["ppl"][name] for r in ratios],
                linestyle="-" if prune["compensate"] else "--",
                color=colours[prune["prune_method"]],
                marker=markers.setdefault(
                    label, "os^vDP*X"[sum(1 for k in markers if k.split()[0] == label.split()[0]) % 8]
                ),
                label=label,
            )
        ax.axhline(summary["dense"]["ppl"][name], color="grey", linewidth=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("pruning ratio (%)")
        ax.set_ylabel(f"{name} perplexity")
        ax.set_title(f"{summary['model']}: {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
