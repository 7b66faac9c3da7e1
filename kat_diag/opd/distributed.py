"""Data parallelism through the launcher users already run (`torchrun`, `accelerate launch`).

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we initialise the
default process group from them (gloo on CPU, nccl on GPU). Each rank rolls out its own share of
the step's prompts; gradients are summed across ranks after backward (the loss is already divided
by the step's global kept-token count), so every rank applies the same update and the replicas stay
identical — DDP semantics without wrapping the model, which the rollout engine needs unwrapped.
"""

from __future__ import annotations

import os

import numpy as np
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


def all_gather_values(values: np.ndarray, device: torch.device) -> np.ndarray:
    """Every rank's 1-D float64 array, concatenated in rank order (the same result on every rank).

    KAT's threshold buffer uses it so all ranks push the same values in the same order and keep
    one threshold per step. Ranks may hold different counts: sizes go first, then padded data.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not is_active():
        return v
    world = dist.get_world_size()
    n = torch.tensor([v.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts) if counts else 0
    if longest == 0:
        return v[:0]
    mine = torch.zeros(longest, dtype=torch.float64, device=device)
    mine[: v.shape[0]] = torch.from_numpy(v).to(device)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts, strict=True)])


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum gradients over ranks, flattened into one buffer (one collective).

    Every rank takes part with every trainable parameter, even one that kept no token this step
    (no backward, so no .grad): it contributes zeros. Skipping the collective on one rank would
    pair it with the other ranks' next collective.
    """
    from kat_diag.opd.fsdp import is_sharded

    if not is_active() or is_sharded(model):  # FSDP reduce-scatters gradients itself
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def barrier() -> None:
    if is_active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
