"""Pruning methods by their command-line names: each a selector, an allocator and layer transforms."""

from __future__ import annotations

from grail.config import METHODS as METHOD_NAMES
from grail.config import PruneConfig
from grail.methods import flap, magnitude, slimgpt, wanda, wanda_pp
from grail.methods.base import AlignedAllocation, Block, Decision, Evidence, Method, MethodSpec

METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (m.SPEC for m in (flap, magnitude, slimgpt, wanda, wanda_pp))
}
assert set(METHODS) == set(METHOD_NAMES), "every method named in grail.config is registered here"


def make_method(config: PruneConfig) -> Method:
    """The method named by ``config.prune_method``, set up with ``config`` (``--align``: its allocation aligned)."""
    method = METHODS[config.prune_method].build(config)
    if config.align > 1:
        method.allocator = AlignedAllocation(method.allocator, config.align)
    return method


__all__ = ["METHODS", "Block", "Decision", "Evidence", "Method", "MethodSpec", "make_method"]
