"""Progressive phases: which levels each phase trains, the config of a phase's smaller model, growing it from
the previous phase's weights (strictly), and keeping the carried levels frozen for a while.

Phase k trains the model made of the innermost `levels` levels. Entering a phase builds that model and loads
the previous phase's weights (or `init_inner_from`) into its inner network; the outer layers start from their
initialisation and the zero-initialised adapters make the grown model reproduce the previous one. A phase at the
previous one's levels loads them all and refines that model (on a part of the schedule: `PhaseConfig.timesteps`).
Every phase starts a fresh optimizer and LR warm-up, so one run with several phases and a chain of separate runs
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
from mdm.diffusion.process import MultiLevelDiffusion, build_pyramid
from mdm.distributed import DistEnv
from mdm.models.unet import NestedUNet
from mdm.train.ema import EMA
from mdm.train.log import level_label
from mdm.train.optim import make_optimizer

log = logging.getLogger(__name__)
Weights = tuple[dict[str, torch.Tensor], int, str]  # (state dict, its levels, where it came from)


def plan(cfg: MDMConfig) -> list[PhaseConfig]:
    """The configured phases, or one phase training every level for train.steps."""
    return cfg.train.phases or [PhaseConfig(levels=len(cfg.model.unet.levels()), steps=cfg.train.steps)]


def phase_config(cfg: MDMConfig, levels: int, spec: PhaseConfig | None = None) -> MDMConfig:
    """The config of the model made of the innermost `levels` levels of `cfg` (weights and ratios sliced; a video
    model's inner levels keep their own frames, so its innermost level alone is an image model), with the mixed
    ratio of the phase `spec` where it sets one."""
    first = len(cfg.model.unet.levels()) - levels
    d, spec = cfg.diffusion, spec or PhaseConfig(levels=levels)
    diffusion = dataclasses.replace(
        d,
        level_weights=None if d.level_weights is None else d.level_weights[first:],
        mixed_ratio=cfg.phase_mixed_ratio(spec),
    )
    train = dataclasses.replace(cfg.train, phases=[])
    return dataclasses.replace(cfg, model=cfg.model.inner_model(levels), diffusion=diffusion, train=train)


def level_record(cfg: MDMConfig, levels: int) -> list:
    """How checkpoints and logs name the levels of the phase training the innermost `levels`: their sides for an
    image model, [frames, side] for every level of a video model (its image phase included)."""
    shapes = cfg.model.level_shapes()[-levels:]
    return [[f, s] for f, s in shapes] if cfg.model.is_video() else [s for _, s in shapes]


def data_shape(cfg: MDMConfig, levels: int) -> tuple[int, int]:
    """The (frames, side) the phase training the innermost `levels` levels reads its data at: its top level, or in a
    video model the highest level above it of the same side. Sides come from data read at each size, as images
    always have; frames from the model's own sub-sampling (`phase_input`), so a level sees the frames it sees
    nested (an image phase of a video model: its one-frame level's)."""
    shapes = cfg.model.level_shapes()
    k = len(shapes) - levels
    while k > 0 and shapes[k - 1][1] == shapes[k][1]:
        k -= 1
    return shapes[k]


def phase_input(x: torch.Tensor, shapes: list[tuple[int, int]], how: str) -> torch.Tensor:
    """A data batch given at one of the (frames, side) `shapes` (a model's levels, highest first; usually the
    top), taken down to the last one by the model's own pyramid (`build_pyramid`, `how` = temporal_downsample).

    So every phase trains its levels on exactly what they see nested in the full model: an image phase of a video
    model gets the frames its one-frame level would. Images (N C H W) count as one frame; a one-frame result is
    N C H W."""
    have = (x.shape[2] if x.dim() == 5 else 1, x.shape[-1])
    if x.dim() not in (4, 5) or have not in shapes:
        kind = "clips (C, T, H, W)" if shapes[0][0] > 1 else "images (C, H, W) or one-frame clips"
        want = ", ".join(f"{f} x {s}px" for f, s in shapes)
        raise ValueError(
            f"training data of shape {tuple(x.shape[1:])} fits no level of the model: it takes {kind} of "
            f"frames x side {want} (model.num_frames x model.image_size = {shapes[0][0]} x {shapes[0][1]}px; "
            f"data.dataset moving_shapes or video_folder give clips)"
        )
    level = build_pyramid(x, shapes[shapes.index(have) :], how)[-1]
    return level[:, :, 0] if level.dim() == 5 and shapes[-1][0] == 1 else level


def load_inner(net: NestedUNet, state: dict[str, torch.Tensor], levels: int, source: str) -> list[str]:
    """Load a `levels`-level model's weights into the innermost `levels` levels of `net`, strictly.

    Returns the loaded parameter names as seen from `net` (all of them when `levels` is all of `net`'s). A key or
    shape mismatch raises naming the keys.
    """
    depth = net.num_levels - levels
    if depth < 0:
        raise ValueError(f"{source}: a {levels}-level model cannot seed the levels of a {net.num_levels}-level one")
    target = net.levels()[depth]
    io.check_keys(target.state_dict(), state, f"{source}: weights do not fit the inner {levels} level(s)")
    target.load_state_dict(state, strict=True)
    prefix = "inner_unet." * depth
    return [prefix + k for k, _ in target.named_parameters()]


def init_source(cfg: MDMConfig) -> Weights | None:
    """The model directory `train.init_inner_from` as seed weights, checked against the run's diffusion and
    levels: a trained image model seeds the innermost one-frame level of a video model."""
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
    shapes, n = source.model.level_shapes(), len(source.model.unet.levels())
    if shapes != cfg.model.level_shapes()[-n:]:
        raise ValueError(
            f"{src}: --init-inner-from model has levels (frames, side) {shapes}, not the innermost {n} of this "
            f"model's {cfg.model.level_shapes()} (model.num_frames, model.image_size and the level tree)"
        )
    first = plan(cfg)[0]
    if n > first.levels:
        raise ValueError(f"{src}: --init-inner-from model has {n} levels, more than the first phase's {first.levels}")
    if n == first.levels and first.freeze_inner_steps:
        raise ValueError(
            f"{src}: --init-inner-from model has all {n} level(s) of train.phases[0], which refines it: its "
            f"freeze_inner_steps must be 0"
        )
    state, _ = io.read_safetensors(src / "model.safetensors")
    return state, n, str(src)


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
    frozen: list[str]  # what the freeze window holds: the carried levels and the adapter feeding them
    carried_levels: int  # how many levels they make up
    data_shapes: list[tuple[int, int]]  # the full model's levels down to this phase's top (see `phase_input`)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """This phase's top level of a data batch read at `data_shape` or, a given dataset, at the model's shape."""
        return phase_input(x, self.data_shapes, self.config.diffusion.temporal_downsample)

    @property
    def end(self) -> int:
        """The global step after the phase's last one."""
        return self.start + self.spec.steps

    def drop_frozen_grads(self, step: int) -> None:
        """Inside the freeze window, drop the frozen parameters' gradients so the step leaves them unchanged."""
        if step - self.start >= self.spec.freeze_inner_steps or not self.frozen:
            return
        params = dict(self.net.named_parameters())
        for name in self.frozen:
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
    sub = phase_config(cfg, spec.levels, spec)
    torch.manual_seed(tc.seed + 7919 * index)
    net = NestedUNet(sub.model)
    if seed_weights is not None:
        load_inner(net, *seed_weights)
    frozen: list[str] = []
    if 0 < carried_levels < spec.levels:  # a grown model: the level around the carried ones may hold them fixed
        grown = net.levels()[spec.levels - carried_levels - 1]
        held = {id(p) for p in grown.inner_parameters()}
        frozen = [n for n, p in net.named_parameters() if id(p) in held]
        if spec.freeze_inner_steps == spec.steps:  # frozen all phase: skip their backward altogether
            grown.fix_inner()
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
        levels = "/".join(map(level_label, level_record(cfg, spec.levels)))
        log.info("phase %d: levels %s, %.2fM parameters", index, levels, n / 1e6)
    return Phase(
        index=index,
        spec=spec,
        start=sum(p.steps for p in phases[:index]),
        config=sub,
        net=net,
        model=distributed.wrap(net, env, tc.strategy, blocks),
        optimizer=make_optimizer(net, tc),
        ema=EMA(net, tc.ema_decay, tc.ema_warmup),
        diffusion=MultiLevelDiffusion(  # the phase's loss space trains it; its saved config keeps the run's
            dataclasses.replace(sub.diffusion, loss_target=spec.loss_target or sub.diffusion.loss_target),
            sub.model.level_shapes(),
        ),
        batch_size=batch,
        batches=iter(loader),
        frozen=frozen,
        carried_levels=carried_levels,
        data_shapes=cfg.model.level_shapes()[: len(cfg.model.unet.levels()) - spec.levels + 1],
    )
