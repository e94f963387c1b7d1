"""What ``--align`` costs in perplexity and buys in speed, measured in one process.

Prunes the same model with the same calibration windows once per ``--aligns`` value, then
measures, interleaved round by round so that a noisy machine affects every model alike:

* perplexity on the evaluation windows;
* prefill: tokens/s of one forward pass over 1 x ``--prefill`` tokens;
* decode: tokens/s of ``--decode`` greedy new tokens after a ``--prompt``-token prompt (batch 1,
  key/value cache), in ``transformers`` on the run's device;

and reports each model's figures and its ratios to the dense model (the median over rounds).
Every flag of the main command is accepted (``grail --help``); the defaults are the small setting:

    python bench/bench_align.py --data_dir ../shared/data --prune_method flap --pruning_ratio 0.3 --compensate \\
        --ridge_lambda auto --aligns 1,64
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace

import torch

import grail
from grail.cli import add_config_options, config_from_args
from grail.evaluate.speed import SpeedSetting, measure_speed
from grail.models.arch import arch_for
from grail.models.loading import torch_dtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p)
    p.set_defaults(prune_method="flap", pruning_ratio=0.3, nsamples=16, seqlen=256, compensate=True, device="cpu")
    p.set_defaults(eval_samples=32)
    p.add_argument("--aligns", default="1,64", help="comma-separated --align values to compare")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=128)
    args = p.parse_args()
    run = config_from_args(args)
    torch.manual_seed(0)
    dense, tokenizer = grail.load_model(run.model, dtype=torch_dtype(run.dtype), device=run.device)
    windows, _ = grail.calibration_data(tokenizer, run.dataset, run.prune.nsamples, run.seqlen, data_dir=run.data_dir)
    models = {"dense": dense}
    for align in (int(a) for a in args.aligns.split(",")):
        pruned = copy.deepcopy(dense)
        grail.prune_model(pruned, windows, replace(run.prune, align=align), progress=False)
        models[f"align {align}"] = pruned
    figures: dict[str, dict] = {}
    for name, model in models.items():
        layers = arch_for(model.config).decoder_layers(model)
        figures[name] = {
            "ppl": grail.evaluate_perplexity(
                model, tokenizer, run.dataset, run.seqlen, run.data_dir, run.eval_samples, progress=False
            )["ppl"],
            "params": sum(p.numel() for p in model.parameters()),
            "mlp_widths": sorted({layer.mlp.down_proj.in_features for layer in layers}),
        }
    setting = SpeedSetting(args.prefill, args.prompt, args.decode, (1,), args.rounds)
    for name, speed in measure_speed(models, setting).items():
        figures[name] |= {
            "prefill_tokens_per_s": speed["prefill_b1"],
            "decode_tokens_per_s": speed["decode_b1"],
            "prefill_ratio": speed["prefill_b1_ratio"],
            "decode_ratio": speed["decode_b1_ratio"],
            "params_ratio": round(figures[name]["params"] / figures["dense"]["params"], 4),
        }
    summary = {"setting": {k: v for k, v in vars(args).items() if k != "method_options"}, "models": figures}
    print(json.dumps(summary, indent=2, default=str))
    if run.output_json:
        with open(run.output_json, "w") as f:
            json.dump(summary, f, indent=2, default=str)


if __name__ == "__main__":
    main()
