"""Pruning methods (selectors), by their command-line names."""

from __future__ import annotations

from grail.methods.base import BlockContext, Decision, Method
from grail.methods.flap import FLAP
from grail.methods.magnitude import MagnitudeSP
from grail.methods.slimgpt import SlimGPT
from grail.methods.wanda import WandaSP
from grail.methods.wanda_pp import WandaPP

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (FLAP, MagnitudeSP, SlimGPT, WandaSP, WandaPP)}


def make_method(config) -> Method:
    """The method named by ``config.prune_method``, set up with ``config``."""
    return METHODS[config.prune_method](config)


__all__ = ["METHODS", "BlockContext", "Decision", "Method", "make_method"]
