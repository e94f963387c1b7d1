"""Data-parallel calibration with ``torch.distributed`` (``torchrun --nproc_per_node K grail ...``).

Every process loads the model and draws the same calibration windows; process ``r`` of
``K`` keeps windows ``r, r + K, r + 2K, ...``. Statistics are sums over tokens, so summing
them over processes (all-reduce) gives exactly the single-process statistics; every
process then makes the same decisions and solves, and only process 0 writes anything.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def init_from_environment(device: str) -> None:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(n: int) -> Tensor:
    """Global indices of this process's share of ``n`` samples."""
    return torch.arange(rank(), n, world_size())


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over processes (in place; returned for convenience)."""
    if world_size() == 1:
        return tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:  # nccl reduces CUDA tensors only
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu)
        tensor.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(tensor)
    return tensor


def all_gather_objects(obj) -> list:
    """One object from every process, in rank order."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()
