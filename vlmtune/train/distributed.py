"""Process-group set-up that works with and without a launcher, and a clean exit.

One process without torchrun gets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR and a free MASTER_PORT set here. CPU uses
gloo, CUDA uses NCCL. Every collective has a timeout (``launch.collective_timeout_s``) so that a dead rank ends the
job with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(timeout_s: int = 1800, device: str | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (env defaults for a single process)."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                   verbose=False)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev, backend=backend)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few host floats over ranks (one collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def cleanup() -> None:
    """Barrier, then destroy the process group (gloo runs can abort at exit otherwise).

    Destroyed through DeepSpeed, which also drops the groups it cached (data-parallel, sequence-parallel, ...): a
    second ``train()`` in the same process would otherwise reach for the groups of the first.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            import deepspeed.comm

            if deepspeed.comm.is_initialized():
                deepspeed.comm.destroy_process_group()
            else:
                dist.destroy_process_group()
