"""Data parallelism through the launcher users already run (`torchrun`, `accelerate launch`).

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we initialise the
default process group from them (gloo on CPU, nccl on GPU). Each rank rolls out its own share of
the step's prompts; gradients are summed across ranks after backward (the loss is already divided
by the step's global kept-token count), so every rank applies the same update and the replicas stay
identical — DDP semantics without wrapping the model, which the rollout engine needs unwrapped.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device) -> tuple[int, int]:
    """Initialise the process group when launched with several processes; return (rank, world)."""
    world = env_world_size()
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def local_device(device: torch.device) -> torch.device:
    """On multi-GPU launches, each rank takes its LOCAL_RANK GPU."""
    if device.type == "cuda" and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_active():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def sum_scalars(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over ranks (one collective for all of them)."""
    if not is_active() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist(), strict=True))


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum gradients over ranks, flattened into one buffer per dtype (few collectives)."""
    from kat_diag.fsdp import is_sharded

    if not is_active() or is_sharded(model):  # FSDP reduce-scatters gradients itself
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def barrier() -> None:
    if is_active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
