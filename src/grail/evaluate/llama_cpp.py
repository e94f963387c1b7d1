"""Run GGUF files in llama.cpp (through ``llama-cpp-python``): logits and perplexity.

Used to check that an exported file computes what the in-memory model computes, and to
measure it where it will be deployed. The key/value cache is kept in float32 so that the
comparison measures the weights' format, not the cache's.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from grail.errors import GrailError

F32_CACHE = 0  # ggml's type id of float32, for the key/value cache


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise GrailError(
            "running GGUF files needs llama-cpp-python: pip install llama-cpp-python (it builds llama.cpp from "
            "source, about 15 minutes on 2 cores the first time)."
        ) from None
    return llama_cpp


@contextlib.contextmanager
def llama_cpp_model(path: str | os.PathLike, n_ctx: int, serving: bool = False) -> Iterator:
    """A ``llama_cpp.Llama`` over ``path``, closed on exit.

    By default it keeps logits for every position and a float32 cache (to compare with the
    in-memory model); ``serving=True`` sets it up as for deployment instead: logits of the
    last position only and llama.cpp's default cache.
    """
    llama_cpp = require_llama_cpp()
    exact = {} if serving else {"logits_all": True, "type_k": F32_CACHE, "type_v": F32_CACHE}
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        n_threads=torch.get_num_threads(),
        verbose=False,
        **exact,
    )
    try:
        yield llm
    finally:
        llm.close()


def window_logits(llm, ids: Tensor) -> np.ndarray:
    """Logits (``[len(ids), vocab]``, float32) of one window of token ids, from an empty cache."""
    llm.reset()
    llm.eval([int(t) for t in ids])
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_perplexity(path: str | os.PathLike, windows: Tensor) -> float:
    """Perplexity of the GGUF file on ``windows`` (``[n, seqlen]``), every next token of each window scored."""
    nll, count = 0.0, 0
    with llama_cpp_model(path, n_ctx=windows.shape[1]) as llm:
        for ids in windows:
            logits = torch.from_numpy(window_logits(llm, ids)).double()
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
            count += len(ids) - 1
    return math.exp(nll / count)


def prefill_tokens_per_s(llm, ids: Tensor) -> float:
    """Tokens/s of one prompt evaluation from an empty cache (batch 1)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval([int(t) for t in ids])
    return len(ids) / (time.perf_counter() - start)


def decode_tokens_per_s(llm, prompt: Tensor, new_tokens: int) -> float:
    """New tokens/s of greedy decoding, one token per step with the cache, after ``prompt``."""
    llm.reset()
    llm.eval([int(t) for t in prompt])
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return new_tokens / (time.perf_counter() - start)
