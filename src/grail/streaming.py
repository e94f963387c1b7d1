"""Prune and evaluate models larger than memory, one decoder layer at a time.

The model is built on the meta device (no memory). The embeddings, final norm and output
head are read from the checkpoint; each decoder layer is read from its safetensors shard
(memory-mapped) onto the compute device just before it is processed and, once pruned,
written straight into the output checkpoint and freed. Peak memory is one layer plus the
calibration activations plus that layer's statistics, whatever the model's size; the
activations themselves spill to memory-mapped files when they do not fit in memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from grail.errors import GrailError
from grail.memory import map_large_allocations, return_freed_memory
from grail.models.arch import ArchSpec, arch_for
from grail.models.modeling_grail import CLASSES
from grail.models.saving import check_finite, checkpoint_layout, finish_checkpoint, verify_checksums

log = logging.getLogger(__name__)


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file or an index of shards), read lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        verify_checksums(self.folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), self.folder / "model.safetensors")
        else:
            raise GrailError(
                f"{str(self.folder)!r} has no safetensors weights; layer streaming (--offload) reads a folder saved "
                "by save_pretrained or --save_model."
            )

    def tensors(self, names: list[str]) -> dict[str, Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        return out

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self.files if n.startswith(prefix)]


class ShardWriter:
    """Writes a checkpoint shard by shard, then its index."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def write(self, file_name: str, tensors: dict[str, Tensor]) -> None:
        check_finite(tensors)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, self.folder / file_name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, file_name))
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class LayerStreamer:
    """A layer source: loads decoder layers from a checkpoint onto the device, and releases them (written or not)."""

    resident = False  # one layer in memory at a time

    def __init__(self, reader: CheckpointReader, arch: ArchSpec, device, dtype: torch.dtype, writer=None):
        self.reader, self.arch, self.device, self.dtype, self.writer = reader, arch, torch.device(device), dtype, writer
        map_large_allocations()  # so that a released layer's memory goes back to the system

    def _prefix(self, index: int) -> str:
        return f"{self.arch.layers}.{index}."

    def load(self, index: int, layer: nn.Module) -> None:
        prefix = self._prefix(index)
        tensors = self.reader.tensors(self.reader.names_with_prefix(prefix))
        state = {k[len(prefix) :]: v.to(device=self.device, dtype=self.dtype) for k, v in tensors.items()}
        layer.load_state_dict(state, strict=True, assign=True)
        layer.requires_grad_(False)

    def release(self, index: int, layer: nn.Module, write: bool) -> None:
        if write and self.writer is not None:
            prefix = self._prefix(index)
            self.writer.write(f"layer-{index:05d}.safetensors", {prefix + k: v for k, v in layer.state_dict().items()})
        layer.to("meta")
        return_freed_memory()  # else memory creeps up layer by layer


def meta_model(folder: str | Path, device, dtype: torch.dtype) -> nn.Module:
    """The model of ``folder`` with its decoder layers on the meta device and the rest loaded on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    arch = arch_for(config)
    with torch.device("meta"):
        if getattr(config, "is_heterogeneous", False) or getattr(config, "grail_output_bias", None):
            model = CLASSES[config.model_type](config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    reader = CheckpointReader(folder)
    rest = [n for n in reader.files if not n.startswith(arch.layers + ".")]
    state = {k: v.to(device=device, dtype=dtype) for k, v in reader.tensors(rest).items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    decoder = model.get_decoder()
    if hasattr(decoder, "rotary_emb"):  # its buffers are computed, not stored: rebuild them on the device
        with torch.device(device):
            decoder.rotary_emb = type(decoder.rotary_emb)(config=config)
    for name, param in model.named_parameters():
        if param.is_meta and not name.startswith(arch.layers + "."):
            raise GrailError(f"the checkpoint in {folder} has no tensor for {name}.")
    model.eval()
    model.requires_grad_(False)
    return model


def save_streamed(model: nn.Module, arch: ArchSpec, writer: ShardWriter, tokenizer, metadata: dict | None) -> None:
    """Everything of the checkpoint but the decoder layers (already written): the rest, config, index."""
    config, zero_biases, needs_code = checkpoint_layout(model, arch, metadata)
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(arch.layers + ".")}
    if getattr(model.config, "tie_word_embeddings", False):
        rest = {k: v for k, v in rest.items() if k != _output_weight_name(model)}
    writer.write("rest.safetensors", rest | zero_biases)
    writer.write_index()
    finish_checkpoint(writer.folder, config, tokenizer, needs_code)


def _output_weight_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head) + ".weight"


def prune_streaming(
    folder: str | Path,
    out_dir: str | Path,
    windows: Tensor | None,
    config,
    tokenizer=None,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    metadata: dict | None = None,
    timer=None,
    progress: bool = True,
):
    """Prune the checkpoint in ``folder`` layer by layer into the new checkpoint ``out_dir``.

    Only the layer being processed is in memory. Returns the :class:`~grail.engine.PruneReport`.
    In a data-parallel run every process prunes, and process 0 writes.
    """
    from grail import distributed
    from grail.engine import prune_model
    from grail.models.saving import check_save_target, write_atomically

    check_save_target(out_dir)
    model = meta_model(folder, device, dtype)
    arch = arch_for(model.config)
    reader = CheckpointReader(folder)
    report = {}

    def prune_into(tmp: Path | None) -> None:
        writer = ShardWriter(tmp) if tmp is not None else None
        streamer = LayerStreamer(reader, arch, device, dtype, writer)
        report["value"] = prune_model(model, windows, config, timer, progress=progress, layer_source=streamer)
        if config.pruning_ratio == 0:  # nothing was loaded: copy the layers as they are
            for index, layer in enumerate(arch.decoder_layers(model)):
                streamer.load(index, layer)
                streamer.release(index, layer, write=True)
        if writer is not None:
            save_streamed(model, arch, writer, tokenizer, metadata)

    if distributed.is_main():
        write_atomically(out_dir, prune_into)
    else:
        prune_into(None)
    return report["value"]


def streamed_model(folder: str | Path, device, dtype: torch.dtype) -> tuple[nn.Module, LayerStreamer]:
    """The checkpoint in ``folder`` with its decoder layers left on disk, and the layer source that reads them."""
    model = meta_model(folder, device, dtype)
    return model, LayerStreamer(CheckpointReader(folder), arch_for(model.config), device, dtype)


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of a checkpoint's safetensors files."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
