"""Pruning methods (selectors), by their command-line names."""

from __future__ import annotations

from grail.methods.base import BlockContext, Decision, Method
from grail.methods.flap import FLAP
from grail.methods.magnitude import MagnitudeSP
from grail.methods.wanda import WandaSP

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (FLAP, MagnitudeSP, WandaSP)}


def make_method(config) -> Method:
    """The method named by ``config.prune_method``, set up with ``config``."""
    return METHODS[config.prune_method](config)


__all__ = ["METHODS", "BlockContext", "Decision", "Method", "make_method"]
