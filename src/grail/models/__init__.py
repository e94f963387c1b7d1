"""Loading, describing and saving decoder models."""

from grail.models.arch import ARCHITECTURES, ArchSpec, UnsupportedModelError, arch_for
from grail.models.loading import ModelLoadError, load_model
from grail.models.saving import SaveError, save_pruned

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ModelLoadError",
    "SaveError",
    "UnsupportedModelError",
    "arch_for",
    "load_model",
    "save_pruned",
]
