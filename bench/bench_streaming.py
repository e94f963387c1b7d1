"""Layer streaming benchmark: peak memory of pruning a model larger than one layer, from disk.

Writes a synthetic LLaMA-shaped checkpoint (random weights, one safetensors shard per
layer, never the whole model in memory), then prunes it with compensation in streaming
mode in a fresh process and reports, measured in that process:

* ``peak_over_layer_and_activations``: growth of resident memory during pruning divided by
  the size of one decoder layer plus the calibration activations plus the embeddings and
  output head, which stay in memory (target <= 1.5);
* ``peak_over_layer_activations_statistics``: the same, with the largest Gram matrix added;
* ``peak_over_model``: peak resident memory of the process divided by the model's size;
* ``layer_working_set_over_layer_activations_statistics``: each layer's step measured alone
  (from the second layer on, when every code path has run once): the rise of resident memory
  above what the step starts from, plus the calibration activations (resident throughout),
  divided by one layer + the activations + the largest Gram matrix (the median and the
  largest over the layers; target <= 1.5);
* the time of the run, and with ``--torchrun 2`` the same run with two CPU processes.

    python bench/bench_streaming.py --out /tmp/synthetic --layers 10 --hidden 2048 --intermediate 5632
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from grail.cli import add_config_options, config_from_args
from grail.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from grail.timing import Timer


class LayerTimer(Timer):
    """A :class:`~grail.timing.Timer` that also keeps each streamed layer's peak resident memory and the
    resident memory left once the layer is released."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.layers: list[dict] = []

    @contextlib.contextmanager
    def section(self, name: str):
        with super().section(name):
            yield
        self.current = max(self.current, peak_rss_bytes() or 0)  # the mark was reset when the section began

    def watch(self, streamer_class) -> None:
        """Record at every release of a layer by ``streamer_class`` (``grail.streaming.LayerStreamer``)."""
        release = streamer_class.release

        def recorded(streamer, index, layer, write):
            self.current = max(self.current, peak_rss_bytes() or 0)
            release(streamer, index, layer, write)
            self.layers.append({"peak": self.current, "after": rss_bytes()})
            self.current = 0

        streamer_class.release = recorded


def write_synthetic(
    folder: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int
) -> int:
    """A random LLaMA-shaped checkpoint written layer by layer; returns its size in bytes."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=False,
    )
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    weight_map, total = {}, 0
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
        name = f"layer-{i:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 4 for t in tensors.values())
    rest = {
        "model.embed_tokens.weight": rand(vocab, hidden),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(vocab, hidden),
    }
    save_file(rest, folder / "rest.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, "rest.safetensors"))
    total += sum(t.numel() * 4 for t in rest.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: prune the synthetic model in streaming mode, print figures as JSON."""
    from grail import distributed
    from grail.streaming import LayerStreamer, prune_streaming

    distributed.init_from_environment("cpu")
    with torch.device("meta"):  # load the modeling code now, so its import is not counted below
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig(num_hidden_layers=1))
    torch.manual_seed(0)
    windows = torch.randint(0, args.vocab, (args.nsamples, args.seqlen))
    config = args.prune
    baseline = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    timer = LayerTimer()
    timer.watch(LayerStreamer)
    prune_streaming(args.out, args.result, windows, config, timer=timer, progress=False)
    seconds = time.perf_counter() - start
    peak = max(timer.memory()["peak_host_bytes"], *(layer["peak"] for layer in timer.layers))
    # a step's rise above the memory left by the step before it (the second layer on: code paths warm)
    steps = [now["peak"] - before["after"] for before, now in zip(timer.layers[1:-1], timer.layers[2:], strict=True)]
    if distributed.is_main():
        print(json.dumps({"seconds": seconds, "baseline_rss": baseline, "peak_rss": peak, "layer_steps": steps}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder of the synthetic checkpoint (written if absent)")
    p.add_argument("--result", type=Path, default=None, help="folder of the pruned checkpoint (default: <out>-pruned)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    add_config_options(p)  # the pruning flags of the main command, declared once in grail.config
    # The benchmark's own default setting: compensation at lambda 0, small calibration set.
    p.set_defaults(
        prune_method="wanda_sp",
        pruning_ratio=0.3,
        nsamples=8,
        seqlen=512,
        calib_batch_size=4,
        compensate=True,
        ridge_lambda=0.0,
    )
    p.add_argument("--torchrun", type=int, default=0, help="also time the run with this many CPU processes")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.prune = config_from_args(args).prune
    args.result = args.result or args.out.with_name(args.out.name + "-pruned")
    if args.child:
        child(args)
        return
    if not (args.out / "model.safetensors.index.json").is_file():
        write_synthetic(args.out, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab)
    model_bytes = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    layer_bytes = layer_only_bytes = (args.out / "layer-00000.safetensors").stat().st_size
    layer_bytes += (args.out / "rest.safetensors").stat().st_size  # embeddings and head stay resident
    activation_bytes = args.nsamples * args.seqlen * args.hidden * 4
    gram_bytes = args.intermediate**2 * 8
    argv = list(sys.argv[1:])
    if "--torchrun" in argv:  # the child runs get every option but this one
        i = argv.index("--torchrun")
        del argv[i : i + 2]
    figures = {"model_mib": round(model_bytes / 2**20), "layer_mib": round(layer_bytes / 2**20)}
    runs = [("single", [sys.executable, __file__, *argv, "--child"])]
    if args.torchrun:
        runs.append(
            (
                f"torchrun_{args.torchrun}",
                ["torchrun", "--nproc_per_node", str(args.torchrun), __file__, *argv, "--child"],
            )
        )
    for name, command in runs:
        subprocess.run(["rm", "-rf", str(args.result)], check=True)
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "2" if name == "single" else "1"},
        )
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        growth = measured["peak_rss"] - measured["baseline_rss"]
        figures[name] = {
            "seconds": round(measured["seconds"], 1),
            "peak_rss_mib": round(measured["peak_rss"] / 2**20),
            "growth_mib": round(growth / 2**20),
            "peak_over_layer_and_activations": round(growth / (layer_bytes + activation_bytes), 3),
            "peak_over_layer_activations_statistics": round(growth / (layer_bytes + activation_bytes + gram_bytes), 3),
            "peak_over_model": round(measured["peak_rss"] / model_bytes, 3),
        }
        if measured["layer_steps"]:
            steps = sorted(measured["layer_steps"])
            measure = layer_only_bytes + activation_bytes + gram_bytes
            figures[name] |= {
                "layer_step_rise_mib_median": round(steps[len(steps) // 2] / 2**20),
                "layer_working_set_over_layer_activations_statistics": {
                    "median": round((steps[len(steps) // 2] + activation_bytes) / measure, 3),
                    "largest": round((steps[-1] + activation_bytes) / measure, 3),
                },
            }
    if args.torchrun:
        figures["torchrun_time_ratio"] = round(figures[runs[1][0]]["seconds"] / figures["single"]["seconds"], 3)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
