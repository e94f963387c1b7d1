"""The sweep writes its three files and resumes after an interruption without redoing runs."""

from __future__ import annotations

import dataclasses
import json

import pytest

import grail.pipeline
import grail.sweep
from grail.cli import main


def _args(tiny_checkpoint, data_dir, out):
    return [
        "sweep", "--model", str(tiny_checkpoint), "--methods", "flap,wanda_sp", "--ratios", "0.2,0.4",
        "--nsamples", "4", "--seqlen", "32", "--data_dir", str(data_dir), "--eval_samples", "3",
        "--lambdas", "0", "--device", "cpu", "--out", str(out), "--quiet",
    ]  # fmt: skip


def test_sweep_writes_json_table_and_plot_and_resumes(tiny_checkpoint, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    calls = []
    real = grail.pipeline.prune_model

    def counting(*args, **kwargs):
        if args[2].pruning_ratio > 0:  # the dense model's evaluation goes through the same executor
            calls.append(args[2].prune_method)
        return real(*args, **kwargs)

    monkeypatch.setattr(grail.pipeline, "prune_model", counting)
    assert main(_args(tiny_checkpoint, data_dir, out)) == 0
    assert len(calls) == 8  # 2 methods x 2 ratios x (plain, GRAIL)
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["results"]) == 8 and "wikitext2" in summary["dense"]["ppl"]
    table = (out / "table.md").read_text()
    assert "| wikitext2 | flap + GRAIL |" in table and "| 20% | 40% |" in table
    assert (out / "ppl.png").read_bytes().startswith(b"\x89PNG")
    assert "8 runs" in capsys.readouterr().out

    # an interruption: one run's result and the summary are lost; only that run is redone
    lost = next((out / "runs").glob("compensate=True*wanda_sp*0.4*"))
    lost.unlink()
    (out / "sweep.json").unlink()
    calls.clear()
    assert main(_args(tiny_checkpoint, data_dir, out)) == 0
    assert calls == ["wanda_sp"]
    assert len(json.loads((out / "sweep.json").read_text())["results"]) == 8


def test_sweep_shares_the_dense_scoring_pass(tiny_checkpoint, data_dir, tmp_path):
    """FLAP's adaptive structure scores the dense model once for all ratios of a sweep."""
    assert main(_args(tiny_checkpoint, data_dir, tmp_path / "s")) == 0
    results = json.loads((tmp_path / "s" / "sweep.json").read_text())["results"]
    flap_plain = [r for r in results if r["overrides"]["prune_method"] == "flap" and not r["overrides"]["compensate"]]
    passes = [r["prune"]["model_passes"] for r in flap_plain]
    assert passes == [1.0, 0.0]  # the second ratio reuses the first one's scoring pass


def test_zero_shot_table_has_one_header_cell_per_column():
    from grail.config import PruneConfig

    def result(ratio: float, compensate: bool, acc: float) -> dict:
        prune = PruneConfig(prune_method="flap", pruning_ratio=ratio, compensate=compensate)
        return {
            "config": {"prune": dataclasses.asdict(prune)},
            "ppl": {"wikitext2": 10.0 + ratio},
            "zero_shot": {"mean_acc": acc},
        }

    summary = {
        "model": "tiny",
        "seqlen": 16,
        "calibration_windows": 4,
        "evaluation_windows": {"wikitext2": 2},
        "zero_shot_limit": 5,
        "dense": {"ppl": {"wikitext2": 9.0}, "zero_shot": {"mean_acc": 0.5}},
        "results": [result(r, c, 0.4) for r in (0.2, 0.5) for c in (False, True)],
    }
    runs = [{"pruning_ratio": r, "compensate": c} for r in (0.2, 0.5) for c in (False, True)]
    lines = grail.sweep.markdown_table(summary, runs).splitlines()
    first = lines.index("| Method | 20% | 50% |")
    assert lines[first + 1] == "|---|---|---|"
    assert lines[first + 2] == "| flap | 0.4000 | 0.4000 |"


def test_an_interrupted_sweep_exits_with_one_line_and_resumes(tiny_checkpoint, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    real, calls = grail.pipeline.prune_model, []

    def interrupted_third_run(*args, **kwargs):
        if args[2].pruning_ratio > 0:
            calls.append(args[2].prune_method)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(grail.pipeline, "prune_model", interrupted_third_run)
    assert main(_args(tiny_checkpoint, data_dir, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: interrupted")
    assert len(list((out / "runs").glob("*.json"))) == 1 + 2  # the dense run and the two finished runs
    monkeypatch.setattr(grail.pipeline, "prune_model", real)
    assert main(_args(tiny_checkpoint, data_dir, out)) == 0
    assert len(json.loads((out / "sweep.json").read_text())["results"]) == 8


@pytest.mark.parametrize("flag", [["--save_model", "x"], ["--save_gguf", "x.gguf"], ["--speed"]])
def test_sweep_refuses_per_model_outputs(flag, tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path / "s"), *flag]) == 2
    assert f"grail sweep does not take {flag[0]}" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
