"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the student and, optionally, the teacher.

Why it exists: DDP keeps a full student, its gradients and fp32 AdamW state on every device; a 4B
student alone is ~64 GB that way (`kat-diag plan`). FSDP shards weights, gradients and optimizer
state N ways. OPD differs from supervised training in one way that matters here: the rollout
decodes token by token, and each rank generates a different number of tokens. Per-layer
all-gathers in every decode step would be slow, and — since ranks do not run the same number of
forwards — would deadlock. So:

* `gathered(model)` unshards every FSDP unit once before a rollout (or an evaluation) and keeps
  the parameters gathered for all forwards inside it (no collective per decoded token); on exit
  they are resharded, so the update runs sharded (one layer gathered at a time);
* gradients are reduce-scattered as a SUM (divide factor 1): the OPD loss is already divided by the
  step's global kept-token count, exactly as the DDP path sums gradients;
* every rank must run the same number of backward passes: `pad_micro_batches` gives the global
  count and `dummy_backward` runs a zero-loss pass on a rank with fewer kept rollouts;
* checkpoints gather the full state dicts on all ranks (`full_state`), then rank 0 writes them
  with `save_pretrained`; resume loads full weights before sharding and the full optimizer state
  after (`load_optimizer_state`).

Works under `torchrun` and `accelerate launch` (both set the env the process group needs); with a
single process the model is left as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of an HF causal LM (model.model.layers), one FSDP unit each."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"FSDP: cannot find the decoder layers of {type(model).__name__} (expected .model.layers)")
    return list(layers)


def shard(model: torch.nn.Module, device: torch.device, trainable: bool = True) -> torch.nn.Module:
    """Apply fully_shard per decoder layer and at the root (embeddings, final norm, tied LM head)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in _layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    if trainable:
        for m in _fsdp_modules(model):  # these setters are per FSDP unit, not recursive
            m.set_gradient_divide_factor(1.0)  # sum over ranks, as DDP's all_reduce_grads does
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM / AVG)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """All parameters gathered once for the whole block; resharded at its end. No-op unless sharded."""
    mods = _fsdp_modules(model) if is_sharded(model) else []
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def pad_micro_batches(n_local: int, device: torch.device, model: torch.nn.Module) -> int:
    """The number of micro-batches every rank runs: the global max under FSDP, else the local count."""
    if not is_sharded(model):
        return n_local
    t = torch.tensor([n_local], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def dummy_backward(model: torch.nn.Module, device: torch.device) -> None:
    """A zero-loss forward/backward, so this rank joins the FSDP collectives of a micro-batch it lacks."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    (model(input_ids=ids).logits.sum() * 0.0).backward()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """clip_grad_norm_ returning a float (a DTensor total norm is made full first)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """Full (unsharded, CPU) model and optimizer state dicts, gathered on every rank (a collective:
    call on all ranks). (None, None) when the model is not sharded."""
    if not is_sharded(model):
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state dict saved by a run (full under FSDP, plain otherwise)."""
    if not is_sharded(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
