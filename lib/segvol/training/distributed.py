"""Multi-process training (torch DDP): this process's rank, the collective calls the loop needs (``barrier``,
``any_rank`` for stop requests, ``broadcast_int`` for the budget plan) and the launch (``launch``: join a group that
``torchrun`` set up, or spawn one process per GPU, NCCL on CUDA and gloo on CPU). Every helper is a no-op outside a
process group, so the single-process run takes the same code path."""
from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist

DDP_TIMEOUT = datetime.timedelta(hours=2)  # other ranks wait while rank 0 validates


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> Tuple[int, int]:
    if active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if active():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any."""
    if not active():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor)
    return bool(tensor.item() > 0)


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank."""
    if not active() or dist.get_world_size() <= 1:
        return value
    tensor = torch.tensor([float(value)], device=device)
    dist.broadcast(tensor, 0)
    return int(tensor.item())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, backend: str, target: Callable[..., Any], args: tuple) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s] [rank {rank}] %(levelname)s %(name)s: %(message)s")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=DDP_TIMEOUT)
    try:
        target(*args)
    finally:
        dist.destroy_process_group()


def launch(target: Callable[..., Any], args: tuple, world_size: int, backend: Optional[str], device: torch.device,
           in_process: Callable[[], Any]) -> Optional[Any]:
    """Run ``target(*args)`` on every rank: under ``torchrun`` (``WORLD_SIZE`` > 1) in this process after joining its
    group (-> ``in_process()``'s value); with ``world_size`` <= 1 as ``in_process()``; else in ``world_size`` spawned
    processes (-> None: the caller reads rank 0's result from where it wrote it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=DDP_TIMEOUT)
        try:
            return in_process()
        finally:
            dist.destroy_process_group()
    if world_size <= 1:
        return in_process()
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"{world_size} processes requested but only {torch.cuda.device_count()} GPU(s) are visible")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world_size, backend, target, args), nprocs=world_size, join=True)
    return None


__all__ = ["DDP_TIMEOUT", "active", "any_rank", "barrier", "broadcast_int", "launch", "rank_and_world"]
