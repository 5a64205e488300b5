"""Exponential moving average of the weights: theta_ema <- d theta_ema + (1 - d) theta after each update.

With warm-up the decay at update n is min(d, (1 + n) / (10 + n)), so early averages are not dominated by the
random initialisation. The shadow tensors mirror the (possibly FSDP-sharded) parameters one to one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mdm import io
from mdm.distributed import full_tensor


class EMA:
    """Shadow copies of `net`'s parameters, updated in place; `state_dict()` gathers them whole."""

    def __init__(self, net: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay, self.warmup = decay, warmup
        self.names = [name for name, _ in net.named_parameters()]
        self.params = [p for _, p in net.named_parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        """The decay used by the next update."""
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """theta_ema <- lerp(theta_ema, theta, 1 - decay)."""
        weight = 1.0 - self.current_decay()
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach(), weight)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors on CPU keyed like the network's state dict (collective under FSDP)."""
        return {n: full_tensor(s).detach().cpu().clone() for n, s in zip(self.names, self.shadow, strict=True)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore shadows from whole tensors (each rank keeps its own shard under FSDP)."""
        io.check_keys(dict(zip(self.names, self.shadow, strict=True)), state, "EMA state", shapes=False)
        for name, s in zip(self.names, self.shadow, strict=True):
            value = state[name]
            if isinstance(s, DTensor):
                value = distribute_tensor(value.to(s.device_mesh.device_type), s.device_mesh, s.placements)
            s.copy_(value)
        self.updates = updates
