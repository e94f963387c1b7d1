"""Deployment benchmark: pruned models in transformers and as GGUF files in llama.cpp, against dense.

Prunes one model with the same calibration windows for every method x ratio x ``--align`` of
the grid (each from a fresh copy of the dense model), then reports for each:

* WikiText-2 perplexity (in-memory model) and llama.cpp's perplexity of its f16 GGUF file
  on the first 4 evaluation windows (the file computes what the model computes);
* parameters and GGUF file sizes (f16 and q8_0);
* prefill (1 x ``--prefill`` tokens) and decode (``--decode`` greedy tokens after a
  ``--prompt``-token prompt, batch 1) tokens/s in transformers and in llama.cpp (f16 and
  q8_0), all models interleaved round by round in one process, as ratios to the dense model
  of the same runtime and format; and the bytes ratio (dense parameters / pruned
  parameters), the physical reference for decode at batch 1.

Every flag of the main command is accepted (``grail --help``):

    python bench/bench_deploy.py --data_dir ../shared/data --compensate --ridge_lambda auto \\
        --methods flap,wanda_sp --ratios 0.2,0.3,0.5 --aligns 1,64 --out results/deploy
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

import grail
from grail.cli import add_config_options, config_from_args
from grail.data import evaluation_windows, load_text, resolve_data_dir, tokenize
from grail.evaluate.llama_cpp import llama_cpp_perplexity
from grail.evaluate.speed import SpeedSetting, measure_speed
from grail.models.loading import torch_dtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p)
    p.set_defaults(nsamples=16, seqlen=256, compensate=True, device="cpu", eval_samples=32)
    p.add_argument("--methods", default="flap,wanda_sp")
    p.add_argument("--ratios", default="0.2,0.3,0.5")
    p.add_argument("--aligns", default="1,64")
    p.add_argument("--types", default="f16,q8_0", help="GGUF formats run in llama.cpp")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--out", default="results/deploy", help="folder for the GGUF files and deploy.json")
    args = p.parse_args()
    run = config_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")
    torch.manual_seed(0)
    dense, tokenizer = grail.load_model(run.model, dtype=torch_dtype(run.dtype), device=run.device)
    windows, _ = grail.calibration_data(tokenizer, run.dataset, run.prune.nsamples, run.seqlen, data_dir=run.data_dir)
    text = load_text(run.dataset, "evaluation", resolve_data_dir(run.data_dir))
    check_windows = evaluation_windows(tokenize(tokenizer, text.text), run.seqlen, run.dataset, 4)
    models = {"dense": dense}
    for method in args.methods.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            for align in (int(a) for a in args.aligns.split(",")):
                pruned = copy.deepcopy(dense)
                config = replace(run.prune, prune_method=method, pruning_ratio=ratio, align=align)
                grail.prune_model(pruned, windows, config, progress=False)
                models[f"{method} {ratio:.0%} align {align}"] = pruned
    figures: dict[str, dict] = {}
    speed_models: dict = {}
    for name, model in models.items():
        stem = name.replace(" ", "_").replace("%", "")
        files = {t: grail.save_gguf(model, tokenizer, out / f"{stem}.{t}.gguf", t) for t in types}
        ppl = grail.evaluate_perplexity(
            model, tokenizer, run.dataset, run.seqlen, run.data_dir, run.eval_samples, progress=False
        )["ppl"]
        ours4 = grail.evaluate_perplexity(model, tokenizer, run.dataset, run.seqlen, run.data_dir, 4, progress=False)
        figures[name] = {
            "ppl": ppl,
            "ppl_4_windows": ours4["ppl"],
            "llama_cpp_ppl_4_windows": llama_cpp_perplexity(files[types[0]], check_windows),
            "params": sum(p.numel() for p in model.parameters()),
            "file_mib": {t: round(f.stat().st_size / 2**20, 1) for t, f in files.items()},
        }
        figures[name]["bytes_ratio"] = round(figures["dense"]["params"] / figures[name]["params"], 3)
        speed_models[name] = model
        for t, f in files.items():
            speed_models[f"{name} [{t}]"] = str(f)
    # One speed run per runtime/format, so every ratio is against the dense model of the same kind.
    setting = SpeedSetting(args.prefill, args.prompt, args.decode, (1,), args.rounds)
    kinds = {"transformers": [n for n in speed_models if not n.endswith("]")]}
    kinds |= {t: [n for n in speed_models if n.endswith(f"[{t}]")] for t in types}
    for kind, names in kinds.items():
        for name, speed in measure_speed({n: speed_models[n] for n in names}, setting).items():
            base = name.rsplit(" [", 1)[0]
            figures[base][kind] = {k: v for k, v in speed.items() if k.startswith(("prefill", "decode"))}
    summary = {"setting": {k: v for k, v in vars(args).items() if k != "method_options"}, "models": figures}
    (out / "deploy.json").write_text(json.dumps(summary, indent=2, default=str))
    print(table(figures, types))


def table(figures: dict, types: list[str]) -> str:
    head = "| Model | ppl | llama.cpp ppl / ours (4 windows) | params | bytes ratio | f16 MiB | transformers prefill | transformers decode |"
    head += "".join(f" llama.cpp {t} prefill | llama.cpp {t} decode |" for t in types)
    lines = [head, "|" + "---|" * (8 + 2 * len(types))]
    for name, f in figures.items():
        cells = [
            name,
            f"{f['ppl']:.2f}",
            f"{f['llama_cpp_ppl_4_windows'] / f['ppl_4_windows']:.4f}",
            f"{f['params'] / 1e6:.1f}M",
            f"{f['bytes_ratio']:.2f}",
            f"{f['file_mib'][types[0]]:.0f}",
        ]
        for kind in ("transformers", *types):
            s = f[kind]
            cells += [f"{s['prefill_b1_ratio']:.2f}x", f"{s['decode_b1_ratio']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
