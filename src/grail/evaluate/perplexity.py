"""Perplexity over non-overlapping windows, as in the pruning literature.

The mean next-token negative log-likelihood over every predicted token of every window,
exponentiated. Logits are formed one window at a time from the final hidden states, so a
batch of long windows never holds a ``batch x seqlen x vocab`` tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from grail import distributed


@torch.no_grad()
def window_nll(model: nn.Module, windows: Tensor, batch_size: int = 1, progress: bool = True, desc: str = "") -> Tensor:
    """Summed next-token NLL of each window (float64, one value per window)."""
    device = model.get_input_embeddings().weight.device
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    totals = []
    for start in tqdm(range(0, len(windows), batch_size), desc=desc or "perplexity", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        for h, target in zip(hidden, ids, strict=True):
            logits = head(h[:-1]).float()
            totals.append(F.cross_entropy(logits, target[1:], reduction="sum").double().cpu())
    return torch.stack(totals)


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 1, progress: bool = True, desc: str = "") -> float:
    """``exp(mean NLL)`` over all predicted tokens of all ``windows`` ([n, seqlen]).

    In a data-parallel run each process scores its share of the windows and the sums are
    added up.
    """
    nll = window_nll(model, windows[distributed.shard(len(windows))], batch_size, progress, desc)
    total = distributed.all_reduce_sum(nll.sum().reshape(1).to(torch.float64)).item()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
