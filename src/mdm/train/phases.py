"""Progressive phases: which levels each phase trains, the config of a phase's smaller model, growing it from
the previous phase's weights (strictly), and keeping the carried levels frozen for a while.

Phase k trains the model made of the innermost `levels` levels. Entering a phase builds that model and loads
the previous phase's weights (or `init_inner_from`) into its inner network; the outer layers start from their
initialisation and the zero-initialised adapters make the grown model reproduce the previous one. Every phase
starts a fresh optimizer and LR warm-up, so one run with several phases and a chain of separate runs
(`init_inner_from`) follow the same recipe.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from mdm import distributed, io
from mdm.config import MDMConfig, PhaseConfig, load_config
from mdm.data.loader import make_loader
from mdm.diffusion.process import MultiLevelDiffusion
from mdm.distributed import DistEnv
from mdm.models.unet import NestedUNet
from mdm.train.ema import EMA
from mdm.train.optim import make_optimizer

log = logging.getLogger(__name__)
Weights = tuple[dict[str, torch.Tensor], int, str]  # (state dict, its levels, where it came from)


def plan(cfg: MDMConfig) -> list[PhaseConfig]:
    """The configured phases, or one phase training every level for train.steps."""
    return cfg.train.phases or [PhaseConfig(levels=len(cfg.model.unet.levels()), steps=cfg.train.steps)]


def phase_config(cfg: MDMConfig, levels: int, mixed_ratio: list[float] | None = None) -> MDMConfig:
    """The config of the model made of the innermost `levels` levels of `cfg` (weights and ratios sliced)."""
    first = len(cfg.model.unet.levels()) - levels
    d = cfg.diffusion
    model = dataclasses.replace(
        cfg.model, unet=cfg.model.unet.levels()[first], image_size=cfg.model.level_sizes()[first]
    )
    diffusion = dataclasses.replace(
        d,
        level_weights=None if d.level_weights is None else d.level_weights[first:],
        mixed_ratio=cfg.phase_mixed_ratio(PhaseConfig(levels=levels, mixed_ratio=mixed_ratio)),
    )
    return dataclasses.replace(cfg, model=model, diffusion=diffusion, train=dataclasses.replace(cfg.train, phases=[]))


def load_inner(net: NestedUNet, state: dict[str, torch.Tensor], levels: int, source: str) -> list[str]:
    """Load a `levels`-level model's weights into the innermost `levels` levels of `net`, strictly.

    Returns the loaded parameter names as seen from `net`. A key or shape mismatch raises naming the keys.
    """
    depth = net.num_levels - levels
    if depth < 1:
        raise ValueError(
            f"{source}: a {levels}-level model cannot be the inner network of a {net.num_levels}-level one"
        )
    target = net.levels()[depth]
    io.check_keys(target.state_dict(), state, f"{source}: weights do not fit the inner {levels} level(s)")
    target.load_state_dict(state, strict=True)
    prefix = "inner_unet." * depth
    return [prefix + k for k, _ in target.named_parameters()]


def init_source(cfg: MDMConfig) -> Weights | None:
    """The model directory `train.init_inner_from` as seed weights (checked against the run's diffusion)."""
    if not cfg.train.init_inner_from:
        return None
    src = Path(cfg.train.init_inner_from)
    if not (src / "config.yaml").is_file() or not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src}: --init-inner-from needs a model directory (config.yaml, model.safetensors)")
    source = load_config(src / "config.yaml")
    keys = ("prediction_type", "schedule", "num_train_timesteps")
    diff = [k for k in keys if getattr(source.diffusion, k) != getattr(cfg.diffusion, k)]
    if diff:
        raise ValueError(f"{src}: --init-inner-from model differs in diffusion.{', diffusion.'.join(diff)}")
    state, _ = io.read_safetensors(src / "model.safetensors")
    return state, len(source.model.unet.levels()), str(src)


@dataclass
class Phase:
    """Everything one phase trains with; built by :func:`build_phase`."""

    index: int  # position in the plan
    spec: PhaseConfig  # levels, steps, freezing, batch size, lr, mixed ratio
    start: int  # global step the phase begins at
    config: MDMConfig  # the config of this phase's (smaller) model
    net: NestedUNet  # the network itself
    model: nn.Module  # the network as the forward pass sees it (DDP / FSDP wrapped)
    optimizer: torch.optim.Optimizer
    ema: EMA
    diffusion: MultiLevelDiffusion
    batch_size: int  # per-process micro-batch
    batches: Iterator[dict]  # the resumable data stream
    carried: list[str]  # parameters that came from before this phase
    carried_levels: int  # how many levels they make up

    @property
    def end(self) -> int:
        """The global step after the phase's last one."""
        return self.start + self.spec.steps

    def drop_frozen_grads(self, step: int) -> None:
        """Inside the freeze window, drop the carried parameters' gradients so the step leaves them unchanged."""
        if step - self.start >= self.spec.freeze_inner_steps or not self.carried:
            return
        params = dict(self.net.named_parameters())
        for name in self.carried:
            params[name].grad = None


def build_phase(
    cfg: MDMConfig,
    index: int,
    *,
    env: DistEnv,
    dataset: Dataset,
    position: int,
    seed_weights: Weights | None,
    carried_levels: int,
) -> Phase:
    """Build phase `index`: its model (grown from `seed_weights` when given), optimizer, EMA and data stream."""
    phases = plan(cfg)
    spec, tc = phases[index], cfg.train
    sub = phase_config(cfg, spec.levels, spec.mixed_ratio)
    torch.manual_seed(tc.seed + 7919 * index)
    net = NestedUNet(sub.model)
    if seed_weights is not None:
        load_inner(net, *seed_weights)
    prefix = "inner_unet." * (spec.levels - carried_levels)
    carried = [n for n, _ in net.named_parameters() if carried_levels and n.startswith(prefix)]
    net.to(env.device).train()
    if tc.channels_last:
        net.to(memory_format=torch.channels_last)
    if tc.compile:
        net.compile()
    blocks = [b for level in net.levels() for b in [*level.down_blocks, *level.up_blocks]]
    batch = spec.batch_size or tc.batch_size
    loader = make_loader(dataset, batch, cfg.data.seed, position, env.rank, env.world, cfg.data.num_workers)
    if env.is_main:
        n = sum(p.numel() for p in net.parameters())
        log.info("phase %d: levels %s, %.2fM parameters", index, sub.model.level_sizes(), n / 1e6)
    return Phase(
        index=index,
        spec=spec,
        start=sum(p.steps for p in phases[:index]),
        config=sub,
        net=net,
        model=distributed.wrap(net, env, tc.strategy, blocks),
        optimizer=make_optimizer(net, tc),
        ema=EMA(net, tc.ema_decay, tc.ema_warmup),
        diffusion=MultiLevelDiffusion(sub.diffusion, sub.model.level_sizes()),
        batch_size=batch,
        batches=iter(loader),
        carried=carried,
        carried_levels=carried_levels,
    )
