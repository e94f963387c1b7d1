"""GRAIL: structured pruning of LLaMA-family models with training-free compensation.

Typical use::

    import grail

    model, tokenizer = grail.load_model("smollm2-135m")
    windows, _ = grail.calibration_data(tokenizer, "wikitext2", nsamples=32, seqlen=512)
    config = grail.PruneConfig(prune_method="wanda_sp", pruning_ratio=0.3, compensate=True, ridge_lambda=0.0)
    report = grail.prune_model(model, windows, config)
    print(grail.evaluate_perplexity(model, tokenizer, "wikitext2", seqlen=512, max_windows=16))
    grail.save_pruned(model, tokenizer, "smollm2-pruned")
    grail.save_gguf(model, tokenizer, "smollm2-pruned.gguf")  # for llama.cpp
"""

from __future__ import annotations

from grail.config import PruneConfig, RunConfig
from grail.engine import PruneReport, prune_model
from grail.errors import GrailError
from grail.memory import settle_allocators
from grail.methods.flap import FLAPOptions
from grail.methods.wanda_pp import WandaPPOptions
from grail.models.gguf_export import save_gguf
from grail.models.loading import load_model
from grail.models.saving import save_pruned
from grail.pipeline import calibration_data, evaluate_perplexity, run
from grail.plan import plan_config

__version__ = "0.1.0"

settle_allocators()  # before the first matrix product: see its docstring

__all__ = [
    "FLAPOptions",
    "GrailError",
    "PruneConfig",
    "PruneReport",
    "RunConfig",
    "WandaPPOptions",
    "calibration_data",
    "evaluate_perplexity",
    "load_model",
    "plan_config",
    "prune_model",
    "run",
    "save_gguf",
    "save_pruned",
]
