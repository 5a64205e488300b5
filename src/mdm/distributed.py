"""Process-group set-up under `torchrun`, rank helpers and collectives, DDP / FSDP2 wrapping and full (gathered)
state dicts; training and evaluation both use it.

One process per device. Without `WORLD_SIZE` in the environment (or with 1) everything here is a no-op, so
single-process training runs the same code. Backends: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files."""
        return self.rank == 0


def setup(device: str | None = None) -> DistEnv:
    """Join the `torchrun` process group if there is one and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this machine has no CUDA device (use --device cpu)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
        )
    return DistEnv(rank, world, local_rank, dev)


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device under nccl, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_to_cpu(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) over ranks, returned on the CPU."""
    return all_reduce(t.to(_comm_device()), op).cpu()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (counts may differ) concatenated in rank order, on the CPU; `x` itself when alone."""
    _, world = rank_world()
    if world == 1:
        return x
    device = _comm_device()
    count = torch.tensor([x.shape[0]], device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]), device=device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).cpu()


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a small tensor over ranks; returns it unchanged when alone."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return values


def on_main(env: DistEnv, fn: Callable[[], object]) -> None:
    """Run `fn` on rank 0 while the others wait; a failure there is raised on every rank instead of hanging."""
    error: BaseException | None = None
    if env.is_main:
        try:
            fn()
        except BaseException as e:
            error = e
    failed = all_reduce(torch.tensor([float(error is not None)], device=env.device), op="max")
    if error is not None:
        raise error
    if bool(failed):
        raise RuntimeError("rank 0 failed while writing outputs; see its log")


def wrap(net: nn.Module, env: DistEnv, strategy: str, blocks: list[nn.Module]) -> nn.Module:
    """DDP, or FSDP2 with every module in `blocks` sharded on its own (then the root); identity alone."""
    if env.world == 1:
        return net
    if strategy == "fsdp":
        for block in blocks:
            fully_shard(block)
        return fully_shard(net)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)


def no_sync(model: nn.Module, sync: bool) -> None:
    """Turn gradient synchronisation of the next backward on or off (accumulation micro-batches)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = sync


def gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of the state dict on every rank (collective under FSDP: every rank calls it)."""
    return {k: full_tensor(v).detach().cpu().clone() for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a plain, DDP or FSDP model (strict)."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, unsharded on CPU (collective under FSDP)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`full_optimizer_state`. Parameters without state (frozen when it was saved: AdamW keeps
    none for them) start fresh, as they would have; state for parameters the model lacks is refused."""
    names = {n for n, _ in model.named_parameters()}
    unexpected = sorted(set(state.get("state", {})) - names)
    if unexpected:
        raise ValueError(f"optimizer state names parameters the model lacks: {unexpected[:8]}")
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
    for name, param in model.named_parameters():  # the loader initialises absent states: undo that
        if name not in state.get("state", {}):
            optimizer.state.pop(param, None)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter or its FSDP shard as the whole tensor (collective for sharded tensors)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
