"""Pruning methods (selectors), by their command-line names."""

from __future__ import annotations

from grail.methods.base import BlockContext, Decision, Method
from grail.methods.magnitude import MagnitudeSP
from grail.methods.wanda import WandaSP

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (MagnitudeSP, WandaSP)}

__all__ = ["METHODS", "BlockContext", "Decision", "Method"]
