"""Configuration dataclasses, validated on construction and saved with every result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from grail.compensate import FITS, PRIORS
from grail.data import DATASETS
from grail.errors import GrailError
from grail.units import ATTENTION_UNITS

# Methods of the specification; grail.methods.METHODS holds the ones this version implements.
SPEC_METHODS = ("flap", "wanda_sp", "slimgpt", "wanda_pp_sp", "mag_sp")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(GrailError, ValueError):
    """An option has a value GRAIL cannot use."""


def available_methods() -> list[str]:
    from grail.methods import METHODS  # the registry imports this module

    return sorted(METHODS)


def check_method(name: str) -> None:
    available = available_methods()
    if name in available:
        return
    if name in SPEC_METHODS:
        raise ConfigError(
            f"pruning method {name!r} is not available in this version; choose one of {', '.join(available)}."
        )
    raise ConfigError(f"unknown pruning method {name!r}; choose one of {', '.join(available)}.")


@dataclass
class PruneConfig:
    """How to prune and compensate. Field names follow the command-line flags."""

    prune_method: str = "flap"
    pruning_ratio: float = 0.5
    nsamples: int = 128  # calibration windows for the selector's statistics
    comp_nsamples: int | None = None  # windows for the Gram matrices; None: same as nsamples
    compensate: bool = False
    ridge_lambda: float | str = 0.001  # relative to the mean diagonal of the kept Gram; or "auto"
    cv_folds: int = 4  # folds of calibration samples for ridge_lambda="auto"
    # What the penalty pulls the reconstruction towards: "zero" (the research code's ridge) or
    # "pruned" (plain pruning); None: "pruned" with ridge_lambda="auto", else "zero".
    ridge_prior: str | None = None
    grail_fit: str = "affine"  # "affine" (with intercept), "linear", or "seed" (linear + mean bias)
    bias_compensation: bool = True  # allow biases on o_proj/down_proj (FLAP's, or the affine intercept)
    attention_unit: str = "group"  # "group" (key/value group) or "query" (bundles of query heads)
    calib_batch_size: int = 8
    # Folder for memory-mapped calibration activations (forces spilling; by default they
    # spill to a temporary folder only when they do not fit in memory).
    offload_activations: str | None = None
    seed: int = 0
    # FLAP
    metrics: str = "WIFV"
    structure: str = "AL-AM"
    remove_heads: int = 8
    # Wanda++
    ro_iter: int = 5
    ro_lr: float = 3e-7
    compensate_first: bool = False
    alpha: float = 100.0

    def __post_init__(self) -> None:
        check_method(self.prune_method)
        if not 0.0 <= self.pruning_ratio < 1.0:
            raise ConfigError(f"--pruning_ratio must be in [0, 1), got {self.pruning_ratio}.")
        if self.nsamples < 1:
            raise ConfigError(f"--nsamples must be at least 1, got {self.nsamples}.")
        if self.comp_nsamples is not None and self.comp_nsamples < 1:
            raise ConfigError(f"--comp_nsamples must be at least 1, got {self.comp_nsamples}.")
        if self.ridge_lambda != "auto" and not (
            isinstance(self.ridge_lambda, int | float) and self.ridge_lambda >= 0.0  # also rejects NaN
        ):
            raise ConfigError(f"--ridge_lambda must be 'auto' or a number >= 0, got {self.ridge_lambda!r}.")
        if self.cv_folds < 2:
            raise ConfigError(f"--cv_folds must be at least 2, got {self.cv_folds}.")
        if self.compensate and self.ridge_lambda == "auto" and self.gram_nsamples < self.cv_folds:
            raise ConfigError(
                f"--ridge_lambda auto holds out whole calibration windows: --comp_nsamples ({self.gram_nsamples}) "
                f"must be at least --cv_folds ({self.cv_folds})."
            )
        if self.ridge_prior is not None and self.ridge_prior not in PRIORS:
            raise ConfigError(f"--ridge_prior must be one of {', '.join(PRIORS)}, got {self.ridge_prior!r}.")
        if self.grail_fit not in FITS:
            raise ConfigError(f"--grail_fit must be one of {', '.join(FITS)}, got {self.grail_fit!r}.")
        if self.attention_unit not in ATTENTION_UNITS:
            raise ConfigError(
                f"--attention_unit must be one of {', '.join(ATTENTION_UNITS)}, got {self.attention_unit!r}."
            )
        if self.calib_batch_size < 1:
            raise ConfigError(f"--calib_batch_size must be at least 1, got {self.calib_batch_size}.")

    @property
    def prior(self) -> str:
        """The ridge prior in effect."""
        if self.ridge_prior is not None:
            return self.ridge_prior
        return "pruned" if self.ridge_lambda == "auto" else "zero"

    @property
    def gram_nsamples(self) -> int:
        return self.nsamples if self.comp_nsamples is None else self.comp_nsamples

    def windows_needed(self, method_uses_activations: bool = True) -> int:
        """Calibration windows the run needs (0 when nothing reads activations)."""
        n = self.nsamples if method_uses_activations else 0
        if self.compensate:
            n = max(n, self.gram_nsamples)
        return n if self.pruning_ratio > 0 else 0


@dataclass
class RunConfig:
    """A whole run: model, calibration data, pruning, evaluation and outputs."""

    model: str = "smollm2-135m"
    prune: PruneConfig = field(default_factory=PruneConfig)
    dataset: str = "wikitext2"
    seqlen: int = 2048
    data_dir: str | None = None
    eval: bool = False
    eval_dataset: list[str] | None = None
    eval_samples: int | None = None
    eval_batch_size: int = 16
    zero_shot: bool = False
    zero_shot_limit: int | None = None
    device: str | None = None
    dtype: str = "float32"
    save_model: str | None = None
    output_json: str | None = None
    offload: bool = False  # stream decoder layers from disk (automatic when the model does not fit)

    def __post_init__(self) -> None:
        for name in [self.dataset, *(self.eval_dataset or [])]:
            if name not in DATASETS:
                raise ConfigError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}.")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be at least 2, got {self.seqlen}.")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ConfigError(f"--eval_samples must be at least 1, got {self.eval_samples}.")
        if self.zero_shot_limit is not None and self.zero_shot_limit < 1:
            raise ConfigError(f"--zero_shot_limit must be at least 1, got {self.zero_shot_limit}.")
        if self.eval_batch_size < 1:
            raise ConfigError(f"--eval_batch_size must be at least 1, got {self.eval_batch_size}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")

    @property
    def eval_datasets(self) -> list[str]:
        """Datasets to report perplexity on: --eval_dataset, else the calibration dataset with --eval."""
        if self.eval_dataset:
            return list(self.eval_dataset)
        return [self.dataset] if self.eval else []

    def to_dict(self) -> dict:
        return asdict(self)
