"""Evaluation of (pruned) models."""

from grail.evaluate.perplexity import perplexity

__all__ = ["perplexity"]
