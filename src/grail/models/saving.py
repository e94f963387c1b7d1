"""Save a pruned model as a checkpoint that loads again, with or without GRAIL installed.

* All layers the same width, and no bias the stock modules cannot hold: a plain config
  that stock ``transformers`` (and serving engines) load with no custom code. A bias
  added to ``o_proj``/``down_proj`` uses the family's ``attention_bias``/``mlp_bias``
  switch where it has one; the other projections under that switch get zero biases.
* Otherwise: the widths go into the config's ``per_layer_config``, extra biases are listed
  under ``grail_output_bias``, and ``modeling_grail.py`` is written beside the weights and
  named in ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(dir,
  trust_remote_code=True)`` works, as does :func:`grail.load_model` (no remote code).

The checkpoint is written to a temporary folder first and moved into place at the end,
so a failure never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from grail.errors import GrailError
from grail.models import modeling_grail
from grail.models.arch import ArchSpec, arch_for, layer_shape
from grail.models.modeling_grail import OUTPUT_BIAS_KEY

CHECKSUMS = "grail_checksums.json"  # SHA-256 of each weight file, written with every checkpoint


class SaveError(GrailError, ValueError):
    """The checkpoint folder cannot be written, or a saved one was damaged."""


def check_save_target(out_dir: str | os.PathLike) -> Path:
    """Fail before any work if ``out_dir`` exists and is not empty, or its parent cannot be written."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SaveError(f"{str(out)!r} already exists and is not an empty folder; choose another --save_model path.")
    if not out.parent.exists():
        raise SaveError(f"the parent folder of {str(out)!r} does not exist; create it first.")
    check_writable(out.parent, "--save_model")
    return out


def check_writable(folder: Path, flag: str) -> None:
    """Fail unless a file can be created in ``folder`` (tried for real: permissions, read-only disks)."""
    try:
        handle, name = tempfile.mkstemp(prefix=".grail-write-test-", dir=folder)
    except OSError as err:
        raise SaveError(
            f"{flag}: cannot write in {str(folder)!r} ({err.strerror}); choose a folder you can write."
        ) from None
    os.close(handle)
    os.unlink(name)


def _check_creatable(target: Path, start: Path, flag: str) -> None:
    """The nearest existing folder at or above ``start`` must be a folder this process can write in."""
    ancestor = start
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SaveError(f"{flag} {str(target)!r}: {str(ancestor)!r} is a file, not a folder.")
    check_writable(ancestor, flag)


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail before any work unless ``path`` can be written as a file (its missing parents are created later)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise SaveError(f"{flag} {str(target)!r} is a folder; give a file path.")
    _check_creatable(target, target.parent, flag)
    return target


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """Fail before any work unless ``path`` is (or can be created as) a writable folder."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise SaveError(f"{flag} {str(target)!r} is a file; give a folder.")
    _check_creatable(target, target, flag)
    return target


def check_finite(tensors: dict[str, Tensor]) -> None:
    """Refuse to save NaN or Inf weights (a compensation that blew up must not become a checkpoint)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise SaveError(
            f"{len(bad)} tensor(s) hold NaN or Inf (first: {bad[0]}); nothing was saved. The compensation is "
            "ill-posed for this calibration set: use --ridge_lambda auto, a larger lambda, or more calibration windows."
        )


def _stock_bias(config, switch: str | None) -> bool:
    return bool(switch and getattr(config, switch, False))


def checkpoint_layout(model: nn.Module, arch: ArchSpec, metadata: dict | None = None):
    """``(config, zero_biases, needs_code)`` for saving ``model``, from its modules' shapes alone.

    ``zero_biases`` are the extra tensors a stock bias switch needs (name -> zeros, on the
    CPU); ``needs_code`` says whether the checkpoint needs ``modeling_grail.py``. Weights are
    not read, so the layers may already be released (on the meta device) when streaming.
    """
    config = copy.deepcopy(model.config)
    layers = arch.decoder_layers(model)
    shapes = [layer_shape(arch, layer) for layer in layers]
    names = {id(module): name for name, module in model.named_modules()}
    zero_biases: dict[str, Tensor] = {}
    extra_bias: dict[str, list[int]] = {}
    needs_code = False
    for kind, switch, linears in (
        ("attn", arch.attention_bias_switch, arch.attention_linears),
        ("mlp", arch.mlp_bias_switch, arch.mlp_linears),
    ):
        with_bias = [i for i, layer in enumerate(layers) if linears(layer)[-1].bias is not None]
        if not with_bias or _stock_bias(config, switch):
            continue
        if switch is None:
            extra_bias[kind] = with_bias
            needs_code = True
            continue
        setattr(config, switch, True)
        for layer in layers:
            for lin in linears(layer):
                if lin.bias is None:
                    zero_biases[names[id(lin)] + ".bias"] = torch.zeros(lin.out_features, dtype=lin.weight.dtype)
    config.head_dim = shapes[0].head_dim
    widths = [
        {
            "num_attention_heads": s.num_heads,
            "num_key_value_heads": s.num_kv_heads,
            "intermediate_size": s.intermediate_size,
        }
        for s in shapes
    ]
    if all(w == widths[0] for w in widths) and _plain_config_accepts(config, widths[0]):
        for name, value in widths[0].items():
            setattr(config, name, value)
    else:
        # Global widths stay dense (the validators check them); each layer overrides its own.
        config.allow_global_per_layer_attribute_access = True
        config.per_layer_config = dict(enumerate(widths))
        needs_code = True
    if extra_bias:
        setattr(config, OUTPUT_BIAS_KEY, extra_bias)
    if needs_code:
        cls = modeling_grail.CLASSES[config.model_type]
        config.architectures = [cls.__name__]
        config.auto_map = {"AutoModelForCausalLM": f"modeling_grail.{cls.__name__}"}
    if metadata is not None:
        config.grail = metadata
    return config, zero_biases, needs_code


def _plain_config_accepts(config, widths: dict) -> bool:
    """Whether the family's stock config class accepts these widths as global values.

    LLaMA's validator, for one, insists that ``hidden_size`` be a multiple of the head
    count even when ``head_dim`` is explicit, so 25 heads of 128 in 4096 need the
    per-layer format.
    """
    try:
        type(config).from_dict({**config.to_dict(), **widths})
    except Exception:
        return False
    return True


def save_pruned(model: nn.Module, tokenizer, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` (may be None) to the new folder ``out_dir``; returns it."""
    config, zero_biases, needs_code = checkpoint_layout(model, arch_for(model.config), metadata)
    state = model.state_dict() | {k: v.to(model.device) for k, v in zero_biases.items()}
    check_finite(state)
    live_config = model.config

    def write(tmp: Path) -> None:
        model.config = config
        try:
            model.save_pretrained(tmp, state_dict=state)
        finally:
            model.config = live_config
        finish_checkpoint(tmp, None, tokenizer, needs_code)

    return write_atomically(out_dir, write)


def finish_checkpoint(folder: Path, config, tokenizer, needs_code: bool) -> None:
    """Config (when not written yet), tokenizer, when needed the modeling file, and the weights' checksums."""
    if config is not None:
        config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if needs_code:
        shutil.copy(modeling_grail.__file__, folder / "modeling_grail.py")
    checksums = {f.name: _sha256(f) for f in sorted(folder.glob("*.safetensors"))}
    (folder / CHECKSUMS).write_text(json.dumps({"sha256": checksums}, indent=2))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(folder: str | os.PathLike) -> None:
    """Refuse weight files that differ from the checksums recorded when GRAIL saved them (if it did)."""
    folder = Path(folder)
    record = folder / CHECKSUMS
    if not record.is_file():
        return
    for name, expected in json.loads(record.read_text())["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise SaveError(f"{str(path)!r} is missing from the checkpoint; restore it or save the model again.")
        if _sha256(path) != expected:
            raise SaveError(
                f"{str(path)!r} differs from the checksum recorded when it was saved (damaged or changed); "
                "restore it or save the model again."
            )


def write_atomically(out_dir: str | os.PathLike, write) -> Path:
    """Run ``write(tmp)`` on a temporary folder beside ``out_dir`` and move it into place at the end."""
    out = check_save_target(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:  # interrupted runs (Ctrl-C, SIGTERM) included: nothing is left beside out_dir
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    follow_umask(out)
    return out


def follow_umask(target: Path) -> None:
    """mkstemp, mkdtemp and the safetensors writer make private files; outputs follow the umask like any other.

    ``target`` is a file, or a folder whose whole tree is set.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in (target, *(target.rglob("*") if target.is_dir() else ())):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
