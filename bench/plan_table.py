"""Predicted peak memory of FLAP 50% + GRAIL on LLaMA-2-7B, LLaMA-3-8B, LLaMA-2-13B and LLaMA-2-70B.

Writes each model's published configuration (widths only) to a folder and runs ``grail plan``
on it: bf16 on one CUDA GPU, 128 windows of 2048 tokens, fixed lambda and ``--ridge_lambda
auto``, in memory and layer-streamed, against a 24 GB and an 80 GB GPU and a 64 GB host.
Prints a Markdown table and writes the plans as JSON.

    python bench/plan_table.py --out results/plan_table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grail.cli import main as grail_main
from grail.plan import GIB

# Published configurations (Hugging Face config.json of each model).
MODELS = {
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "LLaMA-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "LLaMA-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "LLaMA-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
}  # fmt: skip
LAMBDAS = {"fixed": ["--ridge_lambda", "0.001"], "auto": ["--ridge_lambda", "auto"]}
MODES = {
    "in memory": [],  # --stats_device auto: the plan chooses where the statistics go
    "in memory, --stats_device device": ["--stats_device", "device"],
    "streaming": ["--offload", "--save_model", "OUT"],
}
GPUS = {"LLaMA-2-7B": 24, "LLaMA-3-8B": 24, "LLaMA-2-13B": 80, "LLaMA-2-70B": 80}


def write_config(folder: Path, widths: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"} | widths
    (folder / "config.json").write_text(json.dumps(config))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/plan_table"))
    p.add_argument("--host_memory", type=float, default=64 / 1.073741824, help="GiB (default: 64 GB)")
    args = p.parse_args()
    rows = [
        "| model | lambda | mode | GPU | statistics on | predicted peak on the GPU (GiB) | host (GiB) | "
        "limiting stage | fits | forward passes |",
        "|---" * 10 + "|",
    ]
    plans = {}
    for name, widths in MODELS.items():
        folder = args.out / name
        write_config(folder, widths)
        gpu_gb = GPUS[name]
        for lam, lam_flags in LAMBDAS.items():
            for mode, mode_flags in MODES.items():
                out_json = args.out / f"{name}-{lam}-{mode.replace(' ', '_').replace(',', '')}.json"
                flags = [f if f != "OUT" else str(args.out / "pruned") for f in mode_flags]
                argv = ["plan", "--model", str(folder), "--prune_method", "flap", "--pruning_ratio", "0.5",
                        "--compensate", *lam_flags, *flags, "--nsamples", "128", "--seqlen", "2048",
                        "--dtype", "bfloat16", "--device", "cuda", "--device_memory", str(gpu_gb / 1.073741824),
                        "--host_memory", str(args.host_memory), "--output_json", str(out_json), "-q"]  # fmt: skip
                if grail_main(argv):
                    raise SystemExit(f"grail {' '.join(argv)} failed")
                plan = json.loads(out_json.read_text())
                plans[f"{name} {lam} {mode}"] = plan
                rows.append(
                    f"| {name} | {lam} | {mode} | {gpu_gb} GB | {plan['stats_device']} | "
                    f"{plan['peak_device_bytes'] / GIB:.1f} | "
                    f"{plan['peak_host_bytes'] / GIB:.1f} | {plan['limiting_stage']} | "
                    f"{'yes' if plan['fits'] else 'no'} | {plan['time']['total_passes']:g} |"
                )
    (args.out / "plans.json").write_text(json.dumps(plans, indent=2))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
