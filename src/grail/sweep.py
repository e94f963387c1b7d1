"""Many pruning runs on one model: methods x ratios x variants, resumable, with a table.

The model is loaded once and copied for each run; calibration and evaluation windows are
tokenised once and shared. Each finished run is written to ``<out>/runs/<key>.json`` as
soon as it ends, so an interrupted sweep resumes where it stopped. At the end
``<out>/sweep.json`` holds every result and ``<out>/table.md`` a perplexity table shaped
like the paper's (rows: dataset and method, columns: pruning ratio).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from pathlib import Path

from grail import data
from grail.config import PruneConfig, RunConfig
from grail.engine import prune_model
from grail.evaluate.perplexity import perplexity
from grail.methods import METHODS
from grail.models.arch import arch_for, linear_param_count
from grail.models.loading import DTYPES, load_model
from grail.pipeline import default_device, library_versions
from grail.timing import Timer

log = logging.getLogger("grail")


def run_key(overrides: dict) -> str:
    """A stable file name for a run's overrides."""
    return "_".join(f"{k}={overrides[k]}" for k in sorted(overrides)).replace("/", "-")


def run_label(prune: PruneConfig, varied: set[str]) -> str:
    """Row label: the method, '+ GRAIL' when compensating, and any other varied setting."""
    label = prune.prune_method + (" + GRAIL" if prune.compensate else "")
    extras = [f"{k}={getattr(prune, k)}" for k in sorted(varied - {"prune_method", "pruning_ratio", "compensate"})]
    if prune.compensate is False:
        extras = [e for e in extras if not e.startswith(("ridge_lambda", "grail_fit", "comp_nsamples"))]
    return label + (f" ({', '.join(extras)})" if extras else "")


def _write_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def sweep(base: RunConfig, runs: list[dict], out_dir: str | Path, progress: bool = True) -> list[dict]:
    """Run every ``runs`` entry (PruneConfig overrides) on ``base``; returns all results."""
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    configs = [replace(base.prune, **overrides) for overrides in runs]  # validates every run up front
    root = data.resolve_data_dir(base.data_dir)
    datasets = base.eval_datasets or [base.dataset]
    model, tokenizer = load_model(base.model, DTYPES[base.dtype], base.device or default_device())
    arch = arch_for(model.config)
    needed = max(c.windows_needed(METHODS[c.prune_method].uses_activations) for c in configs)
    windows = None
    if needed:
        source = data.load_text(base.dataset, "calibration", root, base.prune.seed)
        windows = data.calibration_windows(data.tokenize(tokenizer, source.text), needed, base.seqlen, base.prune.seed)
    eval_windows = {}
    for name in datasets:
        source = data.load_text(name, "evaluation", root)
        eval_windows[name] = data.evaluation_windows(
            data.tokenize(tokenizer, source.text), base.seqlen, name, base.eval_samples
        )
    results = []
    for overrides, prune in zip(runs, configs, strict=True):
        path = out / "runs" / f"{run_key(overrides)}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            log.info("sweep: %s already done", path.name)
            continue
        log.info("sweep: running %s", run_key(overrides))
        pruned = copy.deepcopy(model)
        timer = Timer()
        report = prune_model(pruned, windows, prune, timer, progress=progress)
        ppl = {
            name: perplexity(pruned, w, base.eval_batch_size, progress, desc=name) for name, w in eval_windows.items()
        }
        seconds = timer.as_dict()
        result = {
            "overrides": overrides,
            "ppl": ppl,
            "params": {
                "before": report.params_before,
                "after": linear_param_count(arch, pruned),
                "removed_fraction": report.removed_fraction,
            },
            "timings": {f"{k}_s": v for k, v in seconds.items()} | {"prune_total_s": round(sum(seconds.values()), 4)},
            "prune": report.as_dict(),
            "config": replace(base, prune=prune).to_dict(),
            "evaluation_windows": {name: len(w) for name, w in eval_windows.items()},
        }
        _write_atomic(path, result)
        results.append(result)
        del pruned
    dense_ppl = _dense_ppl(model, eval_windows, base, out, progress)
    summary = {
        "model": base.model,
        "seqlen": base.seqlen,
        "calibration_windows": needed,
        "evaluation_windows": {name: len(w) for name, w in eval_windows.items()},
        "dense_ppl": dense_ppl,
        "results": results,
        "versions": library_versions(),
    }
    _write_atomic(out / "sweep.json", summary)
    (out / "table.md").write_text(markdown_table(summary, runs))
    return results


def _dense_ppl(model, eval_windows, base: RunConfig, out: Path, progress: bool) -> dict:
    path = out / "runs" / "dense.json"
    if path.exists():
        return json.loads(path.read_text())
    dense = {
        name: perplexity(model, w, base.eval_batch_size, progress, desc=f"dense {name}")
        for name, w in eval_windows.items()
    }
    _write_atomic(path, dense)
    return dense


def markdown_table(summary: dict, runs: list[dict]) -> str:
    """Perplexity table: one row per dataset and method variant, one column per ratio."""
    varied = {k for r in runs for k in r if len({str(x.get(k)) for x in runs}) > 1}
    rows: dict[tuple[str, str], dict[float, float]] = {}
    ratios: set[float] = set()
    for result in summary["results"]:
        prune = PruneConfig(**result["config"]["prune"])
        ratios.add(prune.pruning_ratio)
        for name, value in result["ppl"].items():
            rows.setdefault((name, run_label(prune, varied)), {})[prune.pruning_ratio] = value
    columns = sorted(ratios)
    windows = ", ".join(f"{n}: {w} windows" for n, w in summary["evaluation_windows"].items())
    lines = [
        f"Perplexity of {summary['model']} (sequence length {summary['seqlen']}; {windows}; "
        f"{summary['calibration_windows']} calibration windows). Dense: "
        + ", ".join(f"{n} {v:.2f}" for n, v in summary["dense_ppl"].items())
        + ".",
        "",
        "| Dataset | Method | " + " | ".join(f"{100 * r:g}%" for r in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for (name, label), values in sorted(rows.items()):
        cells = [f"{values[r]:.2f}" if r in values else "" for r in columns]
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
