"""Perplexity over non-overlapping windows, as in the pruning literature.

The mean next-token negative log-likelihood over every predicted token of every window,
exponentiated. One function serves models in memory and models streamed from disk: the
windows run through the decoder one layer at a time, taking each layer from a *layer
source*. In memory every layer is resident, so each batch goes through all layers before
the next (no more memory than a forward pass); streamed, every window goes through a layer
before the next layer is read, so each layer is read once. Logits are formed one window at
a time from the final hidden states, so a batch never holds a ``batch x seqlen x vocab``
tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from grail import distributed
from grail.calibration import InMemoryLayers, capture_layer_inputs, run_layer
from grail.models.arch import arch_for


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "",
    layer_source=None,
) -> Tensor:
    """Summed next-token NLL of each window (float64, one value per window).

    ``layer_source`` loads each decoder layer before use (default: the layers are in memory).
    """
    layer_source = layer_source or InMemoryLayers()
    arch = arch_for(model.config)
    layers = arch.decoder_layers(model)
    norm, head = model.get_decoder().norm, model.get_output_embeddings()
    chunk = batch_size if layer_source.resident else max(len(windows), 1)
    totals = []
    with tqdm(total=len(windows), desc=desc or "perplexity", disable=not progress) as bar:
        for start in range(0, len(windows), chunk):
            part = windows[start : start + chunk]
            hidden = capture_layer_inputs(model, arch, part, batch_size)
            try:
                for index, layer in enumerate(layers):
                    layer_source.load(index, layer)
                    run_layer(layer, hidden, update=True)
                    layer_source.release(index, layer, write=False)
                for states, ids in zip(hidden.hidden, part.split(batch_size), strict=True):
                    states = norm(states.to(head.weight.device))
                    for row, target in zip(states, ids.to(states.device), strict=True):
                        logits = head(row[:-1]).float()
                        totals.append(F.cross_entropy(logits, target[1:], reduction="sum").double().cpu())
            finally:
                hidden.release()
            bar.update(len(part))
    return torch.stack(totals)


def perplexity(
    model: nn.Module,
    windows: Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "",
    layer_source=None,
) -> float:
    """``exp(mean NLL)`` over all predicted tokens of all ``windows`` ([n, seqlen]).

    In a data-parallel run each process scores its share of the windows and the sums are
    added up.
    """
    nll = window_nll(model, windows[distributed.shard(len(windows))], batch_size, progress, desc, layer_source)
    total = distributed.all_reduce_sum(nll.sum().reshape(1).to(torch.float64)).item()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
