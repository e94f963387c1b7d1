"""Every option of a run, declared once: a dataclass field with its default, help and checks.

The command line (:mod:`grail.cli`), validation, the results JSON's ``config`` and the
benchmark scripts are all derived from these declarations. Each pruning method declares its
own options the same way, in a :class:`MethodOptions` subclass registered with the method.

This module imports nothing else from the package (only the base error class), so every
other module can read the choices declared here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, ClassVar

from grail.errors import GrailError

# Choices, declared here and read by the modules that implement them.
METHODS = ("flap", "wanda_sp", "slimgpt", "wanda_pp_sp", "mag_sp")
DATASETS = ("wikitext2", "ptb", "c4")
DTYPES = ("float32", "bfloat16", "float16")
FITS = ("affine", "linear", "seed")
PRIORS = ("zero", "pruned")  # what the ridge penalty pulls the reconstruction towards
LAMBDA_SEARCHES = ("local", "full")  # how --ridge_lambda auto walks its grid
GRAIL_TARGETS = ("pruned", "dense", "residual", "auto")  # what a compensated consumer reproduces
ATTENTION_UNITS = ("group", "query")
STATS_DEVICES = ("auto", "device", "host")  # where --stats_device keeps the Gram matrices
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # weight formats of --save_gguf
DATA_DIR_ENV = "GRAIL_DATA_DIR"


class ConfigError(GrailError, ValueError):
    """An option has a value GRAIL cannot use."""


def option(
    default: Any,
    help: str,
    *,
    group: str = "core",
    choices: tuple | None = None,
    minimum: float | None = None,
    below: float | None = None,
    parse: Callable[[str], Any] | None = None,
    flag: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with what the command line and validation need to know about it.

    ``minimum``/``below`` bound numbers (``minimum <= value < below``, NaN rejected);
    ``choices`` apply to each element of a list value; ``parse`` turns the flag's text into
    the value (default: the type of ``default``); ``flag`` renames the flag (a boolean
    whose default is True gets ``--no_<name>`` by default).
    """
    metadata = {
        "help": help,
        "group": group,
        "choices": choices,
        "minimum": minimum,
        "below": below,
        "parse": parse,
        "flag": flag,
        "cli": cli,
    }
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def declared_options(cls: type) -> list[Field]:
    """The fields of ``cls`` declared with :func:`option` (in declaration order)."""
    return [f for f in fields(cls) if "help" in f.metadata]


def flag_name(f: Field) -> str:
    """The command-line flag of an option, without the dashes."""
    if f.metadata["flag"]:
        return f.metadata["flag"]
    return f"no_{f.name}" if f.default is True else f.name


def default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def check_options(obj: Any) -> None:
    """Check every declared option of ``obj`` against its choices and bounds."""
    for f in declared_options(type(obj)):
        value, meta, name = getattr(obj, f.name), f.metadata, f"--{flag_name(f)}"
        if value is None:
            continue
        choices = meta["choices"]
        for item in value if isinstance(value, list) else [value]:
            if choices is not None and item not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {item!r}.")
        if meta["minimum"] is None and meta["below"] is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}.")
        low, high = meta["minimum"], meta["below"]
        if (low is not None and value < low) or (high is not None and value >= high):
            if low is not None and high is not None:
                raise ConfigError(f"{name} must be in [{low:g}, {high:g}), got {value}.")
            bound = f"at least {low:g}" if low is not None else f"below {high:g}"
            raise ConfigError(f"{name} must be {bound}, got {value}.")


def ridge_lambda_value(text: str) -> float | str:
    """``--ridge_lambda``: a number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def dataset_list(text: str) -> list[str]:
    """``--eval_dataset``: comma-separated dataset names."""
    return [v.strip() for v in text.split(",") if v.strip()]


@dataclass(frozen=True)
class MethodOptions:
    """Options of one pruning method; each method declares a subclass with :func:`option` fields."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class PruneConfig:
    """How to prune and compensate. Field names are the command-line flags."""

    prune_method: str = option("flap", "pruning method", choices=METHODS)
    pruning_ratio: float = option(
        0.5, "share of the decoder's linear parameters to remove, in [0, 1)", minimum=0.0, below=1.0
    )
    nsamples: int = option(128, "calibration windows for the method's statistics", minimum=1)
    comp_nsamples: int | None = option(
        None,
        "calibration windows for the Gram matrices (default: --nsamples)",
        group="compensation",
        minimum=1,
        parse=int,
    )
    compensate: bool = option(False, "enable GRAIL compensation", group="compensation")
    ridge_lambda: float | str = option(
        0.001,
        "ridge penalty, relative to the mean diagonal of the kept units' Gram matrix, or 'auto': chosen per consumer "
        "on held-out calibration windows, keeping the uncompensated weights where compensation does not help",
        group="compensation",
        parse=ridge_lambda_value,
    )
    cv_folds: int = option(4, "folds of calibration windows for --ridge_lambda auto", group="compensation", minimum=2)
    lambda_search: str = option(
        "local",
        "how --ridge_lambda auto searches its grid of penalties: local (descend from the previous layer's choice to "
        "the nearest minimum of the held-out error: 3 candidates plus one per step, 3.2-3.6 on average on SmolLM2) "
        "or full (all 9)",
        group="compensation",
        choices=LAMBDA_SEARCHES,
    )
    ridge_prior: str | None = option(
        None,
        "what the ridge penalty pulls the reconstruction towards: zero (the research code's ridge) or plain pruning "
        "(only the removed units' reconstruction is penalised); default: pruned with --ridge_lambda auto, zero with "
        "a fixed lambda",
        group="compensation",
        choices=PRIORS,
        parse=str,
    )
    grail_target: str = option(
        "pruned",
        "what each compensated consumer reproduces: pruned (its own dense weights' output on the pruned model's "
        "activations), dense (the dense model's consumer output at the same tokens), residual (that plus the drift "
        "of the residual stream, so the block also corrects earlier layers), or auto (pruned or residual, chosen per "
        "consumer on held-out windows; needs --ridge_lambda auto); without --compensate, dense and residual retarget "
        "the method's own update (FLAP's bias compensation, SlimGPT's refit)",
        group="compensation",
        choices=GRAIL_TARGETS,
    )
    grail_target_blend: float = option(
        1.0,
        "how far a dense-model target moves each consumer's fit from pruned's: the fit reproduces (1 - B) W h + B t, "
        "t the --grail_target's (dense or residual; auto's residual candidate and yardstick), W h pruned's target; "
        "1 is the target itself, 0 is pruned",
        group="compensation",
        minimum=0.0,
    )
    grail_fit: str = option(
        "affine",
        "affine: fit with an intercept that becomes a bias; linear: no intercept; seed: linear fit plus the method's "
        "mean bias (the research code's convention, for comparison)",
        group="compensation",
        choices=FITS,
    )
    bias_compensation: bool = option(
        True,
        "add no bias to o_proj/down_proj (neither FLAP's mean bias nor the affine fit's intercept)",
        group="compensation",
    )
    attention_unit: str = option(
        "group",
        "attention unit under grouped-query attention: a key/value group, or a bundle of query heads (one per group)",
        choices=ATTENTION_UNITS,
    )
    align: int = option(
        1,
        "round every layer's kept MLP channels to a multiple of N (the tile sizes of the hardware's matrix "
        "kernels, e.g. 64); attention already goes by whole heads",
        minimum=1,
    )
    calib_batch_size: int = option(8, "calibration windows per forward batch", minimum=1)
    stats_device: str = option(
        "auto",
        "where the float64 Gram matrices (and the dense-target cross moments) accumulate: device (the compute "
        "device), host (CPU memory: each batch's product is copied over and the solves bring one matrix at a time "
        "to the device; for GPUs that cannot hold every fold's Gram matrix beside the model), or auto: host when "
        "the run's plan (grail plan) puts the GPU's peak above 95 percent of its memory with them on it, else device. "
        "Same results.",
        group="compensation",
        choices=STATS_DEVICES,
    )
    offload_activations: str | None = option(
        None,
        "keep calibration activations in memory-mapped files in this folder (automatic, in a temporary folder, "
        "when they do not fit in memory)",
        group="evaluation and output",
        parse=str,
    )
    seed: int = option(0, "seed for the calibration windows")
    # The methods' own options (each method's MethodOptions), by method name; a method without
    # an entry runs with its defaults. One MethodOptions, or a list of them, is accepted too.
    method_options: dict[str, MethodOptions] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.method_options, MethodOptions):
            self.method_options = {self.method_options.method: self.method_options}
        elif isinstance(self.method_options, list | tuple):
            self.method_options = {opts.method: opts for opts in self.method_options}
        check_options(self)
        if self.ridge_lambda != "auto" and not isinstance(self.ridge_lambda, int | float):
            raise ConfigError(f"--ridge_lambda must be 'auto' or a number >= 0, got {self.ridge_lambda!r}.")
        if self.ridge_lambda != "auto" and not (self.ridge_lambda >= 0.0 and math.isfinite(self.ridge_lambda)):
            raise ConfigError(f"--ridge_lambda must be 'auto' or a finite number >= 0, got {self.ridge_lambda!r}.")
        if self.compensate and self.ridge_lambda == "auto" and self.gram_nsamples < self.cv_folds:
            raise ConfigError(
                f"--ridge_lambda auto holds out whole calibration windows: --comp_nsamples ({self.gram_nsamples}) "
                f"must be at least --cv_folds ({self.cv_folds})."
            )
        if self.grail_target == "auto" and not self.compensate:
            raise ConfigError("--grail_target auto chooses what GRAIL fits: add --compensate --ridge_lambda auto.")
        if self.grail_target == "auto" and self.ridge_lambda != "auto":
            raise ConfigError(
                "--grail_target auto chooses on held-out calibration windows: use it with --ridge_lambda auto."
            )
        if self.grail_target_blend > 1.0:
            raise ConfigError(
                f"--grail_target_blend is the fraction of the way from pruned's target to --grail_target's, "
                f"between 0 and 1; got {self.grail_target_blend}."
            )
        if self.grail_target_blend != 1.0 and self.grail_target == "pruned":
            raise ConfigError(
                "--grail_target_blend moves the fit towards a dense-model target: add --grail_target residual, "
                "dense or auto."
            )
        for name, opts in self.method_options.items():
            if not isinstance(opts, MethodOptions) or opts.method != name:
                raise ConfigError(f"method_options[{name!r}] must be the options of method {name!r}, got {opts!r}.")

    def options_for(self, options_class: type[MethodOptions]) -> MethodOptions:
        """The options of the method ``options_class`` belongs to (its defaults when not given)."""
        return self.method_options.get(options_class.method) or options_class()

    @property
    def prior(self) -> str:
        """The ridge prior in effect."""
        if self.ridge_prior is not None:
            return self.ridge_prior
        return "pruned" if self.ridge_lambda == "auto" else "zero"

    @property
    def gram_nsamples(self) -> int:
        return self.nsamples if self.comp_nsamples is None else self.comp_nsamples

    @property
    def target_nsamples(self) -> int:
        """Windows the dense-model targets cover: the compensation's, else (a method's own update) the method's."""
        return self.gram_nsamples if self.compensate else self.nsamples

    def windows_needed(self, method_uses_activations: bool = True) -> int:
        """Calibration windows the run needs (0 when nothing reads activations)."""
        n = self.nsamples if method_uses_activations else 0
        if self.compensate:
            n = max(n, self.gram_nsamples)
        return n if self.pruning_ratio > 0 else 0


@dataclass
class RunConfig:
    """A whole run: model, calibration data, pruning, evaluation and outputs."""

    model: str = option("smollm2-135m", "hub id, local folder, .gguf file, GRAIL checkpoint, or 'smollm2-135m'")
    prune: PruneConfig = field(default_factory=PruneConfig)
    dataset: str = option("wikitext2", "calibration dataset", choices=DATASETS)
    seqlen: int = option(2048, "calibration and evaluation window length in tokens", minimum=2)
    data_dir: str | None = option(
        None, f"local dataset folder laid out like shared/data (or ${DATA_DIR_ENV}); default: the Hub", parse=str
    )
    eval: bool = option(
        False, "perplexity on the calibration dataset's evaluation split", group="evaluation and output"
    )
    eval_dataset: list[str] | None = option(
        None,
        "comma-separated datasets to evaluate (implies --eval)",
        group="evaluation and output",
        choices=DATASETS,
        parse=dataset_list,
    )
    eval_samples: int | None = option(
        None, "evaluate on the first N windows only (default: all)", group="evaluation and output", minimum=1, parse=int
    )
    eval_batch_size: int = option(16, "windows per evaluation batch", group="evaluation and output", minimum=1)
    zero_shot: bool = option(
        False,
        "0-shot accuracy on boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge (lm-evaluation-harness)",
        group="evaluation and output",
    )
    zero_shot_limit: int | None = option(
        None, "only the first N examples of each zero-shot task", group="evaluation and output", minimum=1, parse=int
    )
    device: str | None = option(
        None,
        "cpu, cuda, cuda:N, or auto (accelerate spreads the layers over all GPUs); default: cuda when available",
        group="evaluation and output",
        parse=str,
    )
    dtype: str = option(
        "float32",
        "weights and activations; statistics are always float64",
        group="evaluation and output",
        choices=DTYPES,
    )
    save_model: str | None = option(
        None,
        "write the pruned model (safetensors, tokenizer, config) to this new folder",
        group="evaluation and output",
        parse=str,
    )
    save_gguf: str | None = option(
        None,
        "also write the pruned model as a GGUF file for llama.cpp (per-layer widths use llama.cpp's 'deci' "
        "architecture)",
        group="evaluation and output",
        parse=str,
    )
    gguf_type: str = option(
        "f16",
        "weight format of --save_gguf (q8_0 pads MLP widths to multiples of 32 with zero channels; --align 32 "
        "avoids it)",
        group="evaluation and output",
        choices=GGUF_TYPES,
    )
    speed: bool = option(
        False,
        "measure prefill and decode tokens/s of the dense and the pruned model (and of --save_gguf in llama.cpp) "
        "and add them to the results",
        group="evaluation and output",
    )
    output_json: str | None = option(
        None, "write the results to this JSON file", group="evaluation and output", parse=str
    )
    dry_run: bool = option(
        False,
        "print the plan of the run (predicted peak memory per stage and time, as 'grail plan') and exit without "
        "loading any weights",
        group="evaluation and output",
    )
    offload: bool = option(
        False,
        "stream decoder layers from the checkpoint's safetensors one at a time and write the pruned ones straight "
        "into --save_model (automatic when the model does not fit in memory)",
        group="evaluation and output",
    )

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def eval_datasets(self) -> list[str]:
        """Datasets to report perplexity on: --eval_dataset, else the calibration dataset with --eval."""
        if self.eval_dataset:
            return list(self.eval_dataset)
        return [self.dataset] if self.eval else []

    def to_dict(self) -> dict:
        return asdict(self)
