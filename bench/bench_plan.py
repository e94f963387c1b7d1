"""Planner benchmark: predicted against measured peak memory, per stage and in total.

Writes synthetic LLaMA- and Qwen2-shaped checkpoints (random weights, SmolLM2's tokenizer)
and, for each setting, runs the main command in a fresh process with ``--output_json``. The
measured figures are the process's peak resident memory (``ru_maxrss``) and the peak of each
stage the results JSON records (``memory.host_peaks``: loading, calibration, pruning,
compensation, evaluation, saving); the predicted ones come from ``grail plan`` on the same
flags. Prints a table (Markdown) and writes JSON.

    python bench/bench_plan.py --data_dir ../shared/data --out results/plan
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from grail.cli import build_plan_parser, config_from_args
from grail.plan import GIB, model_shape, plan_run, setting_from_config

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # name: (family, hidden, intermediate, layers, heads, kv_heads)
    "llama-shaped": ("llama", 1024, 2816, 4, 16, 4),
    "qwen2-shaped": ("qwen2", 896, 4864, 3, 14, 2),
}
# What each measured section of the results JSON holds, in the plan's stage names.
SECTIONS = {
    "load": ("loading",),
    "calibration": ("calibration capture", "scoring pass (dense model)", "statistics, attention block",
                    "statistics, MLP block"),
    "compensation": ("cross-validation, attention block", "solve, attention block", "cross-validation, MLP block",
                     "solve, MLP block"),
    "pruning": ("selection, attention block", "selection, MLP block", "surgery, attention block", "surgery, MLP block"),
    "evaluation": ("evaluation",),
    "save": ("saving",),
}  # fmt: skip
SETTINGS = {
    # name: flags after --model (calibration, evaluation and output flags are added)
    "wanda_sp fixed": ["--prune_method", "wanda_sp", "--compensate", "--ridge_lambda", "0.001"],
    "flap auto": ["--prune_method", "flap", "--compensate", "--ridge_lambda", "auto"],
    "slimgpt auto": ["--prune_method", "slimgpt", "--compensate", "--ridge_lambda", "auto"],
    "wanda_sp auto residual": ["--prune_method", "wanda_sp", "--compensate", "--ridge_lambda", "auto",
                                 "--grail_target", "residual"],
    "flap fixed streaming": ["--prune_method", "flap", "--compensate", "--offload"],
    "wanda_sp fixed spilled": ["--prune_method", "wanda_sp", "--compensate", "--ridge_lambda", "0.001",
                               "--offload_activations", "{work}/spill"],
    "flap auto 2 processes": ["--prune_method", "flap", "--compensate", "--ridge_lambda", "auto"],
}  # fmt: skip
# Settings run under torchrun with this many CPU processes (the others run in one process).
PROCESSES = {"flap auto 2 processes": 2}


def write_model(folder: Path, family: str, hidden: int, intermediate: int, layers: int, heads: int, kv: int) -> None:
    """A random model of the given shape, saved with SmolLM2's tokenizer (49,152 tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import grail
    from grail.models.loading import resolve_model

    if (folder / "config.json").is_file():
        return
    location, gguf = resolve_model("smollm2-135m")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    grail.save_pruned(model, tokenizer, folder)


def measure(
    model: str, flags: list[str], common: list[str], work: Path, source: Path | None = None, processes: int = 1
) -> dict:
    """Run the main command in a fresh process; its peak resident memory and per-section peaks.

    ``source``: a ``src`` folder of another version of GRAIL to run instead (to measure a change).
    ``processes`` > 1: under torchrun; the figures are then per process (the largest process's
    peak, and the first rank's sections, which its results JSON records).
    """
    out_json = work / "run.json"
    out_json.unlink(missing_ok=True)
    subprocess.run(["rm", "-rf", str(work / "saved"), str(work / "spill")], check=True)
    flags = [f.format(work=work) for f in flags]
    argv = ["--model", model, *flags, *common, "--output_json", str(out_json), "-q"]
    if "--offload" in flags:
        argv += ["--save_model", str(work / "saved")]
    if processes == 1:
        child = [sys.executable, "-c", "import sys, resource; from grail.cli import main; code = main(sys.argv[1:]); "
                 "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)", *argv]  # fmt: skip
    else:  # the largest of the waited-for descendants: the launcher or one of its ranks
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                  "--master_port", "29533", str(ROOT / "main.py"), *argv]  # fmt: skip
        child = [sys.executable, "-c", "import sys, resource, subprocess; code = subprocess.call(sys.argv[1:]); "
                 "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)", *launch]  # fmt: skip
    threads = str(max(1, 2 // processes))
    env = {**os.environ, "OMP_NUM_THREADS": threads} | ({"PYTHONPATH": str(source)} if source else {})
    done = subprocess.run(child, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    maxrss = int(next(line for line in done.stdout.splitlines() if line.startswith("MAXRSS")).split()[1]) * 1024
    results = json.loads(out_json.read_text())
    if "memory" not in results:  # a version that records no sections: the process's own high-water mark
        return {"peak_host_bytes": maxrss, "host_peaks": {}, "argv": argv}
    # Every section restarts the kernel's high-water mark, so the peak is the highest section's.
    memory = results["memory"]
    return {
        "peak_host_bytes": max(maxrss, memory["peak_host_bytes"]),
        "host_peaks": memory["host_peaks"],
        "argv": argv,
        "prune_total_s": results["timings"]["prune_total_s"],
    }


def forward_seconds(folder: Path, n: int, seqlen: int, batch: int) -> float:
    """Seconds of one plain pass of ``n`` random windows through the decoder (the planner's unit of time; the
    output head, which pruning never runs, is left out)."""
    import time

    import torch

    from grail.models.loading import load_model

    model, _ = load_model(str(folder))
    decoder = model.get_decoder()
    windows = torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoder(input_ids=windows[:1, :16], use_cache=False)  # warm-up
        start = time.perf_counter()
        for part in windows.split(batch):
            decoder(input_ids=part, use_cache=False)
    return time.perf_counter() - start


def predict(argv: list[str], processes: int = 1) -> dict:
    args = build_plan_parser().parse_args(argv)
    config = config_from_args(args)
    return plan_run(model_shape(config.model), setting_from_config(config, processes)).as_dict()


def compare(predicted: dict, measured: dict, processes: int = 1) -> dict:
    """Predicted against measured, per process (the plan's stages are per process; its peak sums them)."""
    by_stage = {s["stage"]: s["host_bytes"] for s in predicted["stages"]}
    rows = {"total": (predicted["peak_host_bytes"] // processes, measured["peak_host_bytes"])}
    for section, names in SECTIONS.items():
        if section in measured["host_peaks"]:
            rows[section] = (max(by_stage.get(n, 0) for n in names), measured["host_peaks"][section])
    out = {k: {"predicted": p, "measured": m, "error": round(p / m - 1, 3)} for k, (p, m) in rows.items()}
    if "forward_s" in measured and processes == 1:  # time, in plain forward passes over the calibration windows
        passes = measured["prune_total_s"] / measured["forward_s"]
        out["passes"] = {"predicted": predicted["time"]["total_passes"], "measured": round(passes, 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", type=Path, default=Path("results/plan"))
    p.add_argument(
        "--models", default="llama-shaped,qwen2-shaped", help="synthetic shapes and/or LABEL=FOLDER of saved models"
    )
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    p.add_argument("--calibration", default="32x512", help="windows x tokens")
    p.add_argument("--ratio", default="0.5")
    p.add_argument("--replan", action="store_true", help="predict again for the runs measured in --out (no runs)")
    p.add_argument("--before", type=Path, default=None, help="also measure the src folder of an earlier version")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replan:
        replan(args.out / "plan_validation.json")
        return
    n, seqlen = args.calibration.split("x")
    common = ["--pruning_ratio", args.ratio, "--nsamples", n, "--seqlen", seqlen, "--data_dir", args.data_dir,
              "--eval", "--eval_samples", "4", "--eval_batch_size", "4", "--device", "cpu"]  # fmt: skip
    table, figures = [], {}
    for name in args.models.split(","):
        name, _, path = name.partition("=")  # LABEL=FOLDER for a model on disk
        folder = Path(path or name)
        if name in SHAPES:
            folder = args.out / name
            write_model(folder, *SHAPES[name])
        forward_s = forward_seconds(folder, int(n), int(seqlen), 8)
        for setting in args.settings.split(","):
            processes = PROCESSES.get(setting, 1)
            measured = measure(str(folder), SETTINGS[setting], common, args.out, processes=processes)
            measured |= {"forward_s": forward_s, "processes": processes}
            predicted = predict(measured["argv"], processes)
            rows = compare(predicted, measured, processes)
            figures[f"{name} | {setting}"] = {
                "rows": rows,
                "limiting_stage": predicted["limiting_stage"],
                "measured": measured,
            }
            if args.before:
                earlier = measure(str(folder), SETTINGS[setting], common, args.out, args.before, processes)
                figures[f"{name} | {setting}"]["before"] = earlier
                print(f"| {name} | {setting} | peak before {earlier['peak_host_bytes'] / GIB:.2f} GiB, now "
                      f"{measured['peak_host_bytes'] / GIB:.2f} GiB |", flush=True)  # fmt: skip
            table.append(_row(name, setting, rows, predicted["limiting_stage"]))
            print(table[-1], flush=True)
    (args.out / "plan_validation.json").write_text(json.dumps(figures, indent=2))
    print("\n".join([HEADER, "|---" * 11 + "|", *table]))


def replan(path: Path) -> None:
    """The table again, with the planner as it is now, against the measurements kept in ``path``."""
    figures = json.loads(path.read_text())
    table = []
    for key, entry in figures.items():
        processes = entry["measured"].get("processes", 1)
        predicted = predict(entry["measured"]["argv"], processes)
        rows = compare(predicted, entry["measured"], processes)
        figures[key] |= {"rows": rows, "limiting_stage": predicted["limiting_stage"]}
        table.append(_row(*key.split(" | "), rows, predicted["limiting_stage"]))
    path.write_text(json.dumps(figures, indent=2))
    print("\n".join([HEADER, "|---" * 11 + "|", *table]))


HEADER = (
    "| model | setting | peak predicted / measured GiB | error | calibration | compensation | pruning | "
    "evaluation | load | predicted limiting stage | time in forward passes, predicted / measured |"
)


def _row(name: str, setting: str, rows: dict, limiting: str) -> str:
    def cell(key: str) -> str:
        r = rows.get(key)
        return "-" if r is None else f"{r['predicted'] / GIB:.2f} / {r['measured'] / GIB:.2f}"

    total = rows["total"]
    passes = f"{rows['passes']['predicted']:g} / {rows['passes']['measured']:g}" if "passes" in rows else "-"
    return (
        f"| {name} | {setting} | {cell('total')} | {100 * total['error']:+.1f}% | {cell('calibration')} | "
        f"{cell('compensation')} | {cell('pruning')} | {cell('evaluation')} | {cell('load')} | {limiting} | {passes} |"
    )


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
