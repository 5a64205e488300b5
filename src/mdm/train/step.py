"""One optimizer step: the per-sample random draws, the loss over accumulated micro-batches, freezing,
clipping, and skipping a step whose loss or gradient is not finite.

Randomness is per sample: the timestep, the per-level noise and the condition-dropout coin of the sample at
data-stream position q come from a generator seeded by (seed, q). A batch therefore trains on the same draws
for any number of processes or accumulation split, and a resumed run continues bit for bit.
"""

from __future__ import annotations

import logging

import torch

from mdm import distributed
from mdm.conditions import Conditioner
from mdm.distributed import DistEnv
from mdm.models.conditioning import Conditioning, drop
from mdm.train.checkpoint import RunState, TrainingError
from mdm.train.phases import Phase

log = logging.getLogger(__name__)
BAD_SAMPLE_GRACE = 1000  # the bad-sample share is measured over at least this many samples


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with AVX-512 BF16 or AMX.
    Elsewhere CPU bf16 is emulated: a demo-video step ran 6.8x slower than in fp32 on an AVX2-only EPYC (README)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def use_bf16(mode: str, device: torch.device) -> bool:
    """Whether `train.mixed_precision` = `mode` trains under bf16 autocast on `device`: 'bf16' always (with a warning
    where bf16 is emulated), 'auto' where the hardware has it, 'fp32' never."""
    native = native_bf16(device)
    if mode == "bf16" and not native:
        log.warning(
            "train.mixed_precision=bf16 on %s without native bf16: emulated, many times slower than fp32 "
            "(train.mixed_precision=auto picks bf16 only where the hardware has it)",
            device,
        )
    return mode == "bf16" or (mode == "auto" and native)


def _mix(seed: int, position: int) -> int:
    """A 63-bit generator seed for the sample at stream `position` of a run seeded `seed`."""
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def draws(
    phase: Phase, seed: int, positions: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Per-sample timestep (uniform over the phase's range, or over the whole schedule for a 1 - timesteps_share of
    the samples), per-level noise and condition-dropout flags from generators seeded (seed, q)."""
    d, device, share = phase.diffusion, x.device, phase.spec.timesteps_share
    lo, hi = phase.spec.timesteps or (0, d.T)
    shapes = d.item_shapes(x.shape[1])
    ts, coins, noise = [], [], [[] for _ in shapes]
    g = torch.Generator(device=device)
    for q in positions.tolist():
        g.manual_seed(_mix(seed, q))
        t = torch.randint(lo, hi, (1,), generator=g, device=device)
        if share < 1:  # both drawn and picked on the device: no host sync per sample
            coin, anywhere = (
                torch.rand(1, generator=g, device=device),
                torch.randint(0, d.T, (1,), generator=g, device=device),
            )
            t = torch.where(coin < share, t, anywhere)
        ts.append(t)
        coins.append(torch.rand(1, generator=g, device=device))
        for level, shape in zip(noise, shapes, strict=True):
            level.append(torch.randn(shape, generator=g, device=device))
    dropped = torch.cat(coins) < phase.config.diffusion.cond_drop_prob
    return torch.cat(ts), [torch.stack(n).to(x.dtype) for n in noise], dropped


def _condition(conditioner: Conditioner, batch: dict, dropped: torch.Tensor) -> Conditioning | None:
    """The batch's condition with the dropped rows replaced by the unconditional one (what guidance feeds)."""
    cond = conditioner.data(batch)
    return None if cond is None else drop(cond, dropped, conditioner.null(1))


def _micro_batch(
    phase: Phase, state: RunState, env: DistEnv, conditioner: Conditioner, seed: int, rows: int, bf16: bool, last: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward of one micro-batch; returns its loss share, per-level losses and skipped samples."""
    batch = next(phase.batches)
    expected = state.position + env.rank * phase.batch_size
    if int(batch["position"][0]) != expected:
        raise RuntimeError(f"data stream out of step: expected position {expected}, got {batch['position'][0]}")
    x = phase.input(batch["video" if "video" in batch else "image"].to(env.device))
    t, noise, dropped = draws(phase, seed, batch["position"], x)
    cond = _condition(conditioner, batch, dropped)
    distributed.no_sync(phase.model, last)
    with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = phase.diffusion.loss(phase.model, x, cond, t=t, noise=noise)
    loss = out.loss.sum() / rows
    loss.backward()
    accum = rows // phase.batch_size
    levels = torch.stack(
        [m[:r].sum() / (r * accum) for m, r in zip(out.level_mse.detach().float(), out.rows, strict=True)]
    )
    state.position += phase.batch_size * env.world
    return loss.detach(), levels, batch["skipped"]


def count_bad(state: RunState, skipped: int, max_fraction: float, is_main: bool) -> None:
    """Count unusable samples (all ranks); more than `max_fraction` of those read (over BAD_SAMPLE_GRACE) stops."""
    if skipped:
        state.bad_samples += skipped
        if is_main:
            log.warning("skipped %d unusable sample(s) (%d so far)", skipped, state.bad_samples)
    read = state.position + state.bad_samples
    if state.bad_samples > max_fraction * max(read, BAD_SAMPLE_GRACE):
        raise TrainingError(
            f"{state.bad_samples} of {read} samples read were unusable "
            f"(more than data.max_bad_fraction = {max_fraction})"
        )


def train_step(
    phase: Phase, state: RunState, env: DistEnv, conditioner: Conditioner, lr: float, bf16: bool
) -> torch.Tensor | None:
    """One optimizer step over grad_accum micro-batches. Returns [loss, per-level losses, grad norm] averaged
    over ranks, or None when the step was skipped for a non-finite loss or gradient."""
    cfg = phase.config
    tc = cfg.train
    for group in phase.optimizer.param_groups:
        group["lr"] = lr
    rows = phase.batch_size * tc.grad_accum
    loss = torch.zeros((), device=env.device)
    levels = torch.zeros(phase.diffusion.num_levels, device=env.device)
    skipped = 0
    for k in range(tc.grad_accum):
        part, level_part, bad = _micro_batch(
            phase, state, env, conditioner, tc.seed, rows, bf16, k == tc.grad_accum - 1
        )
        loss, levels, skipped = loss + part, levels + level_part, skipped + bad
    count_bad(
        state,
        int(distributed.all_reduce(torch.tensor([skipped], device=env.device)).item()),
        cfg.data.max_bad_fraction,
        env.is_main,
    )
    phase.drop_frozen_grads(state.step)
    grads = [p for p in phase.net.parameters() if p.grad is not None]
    norm = distributed.full_tensor(
        torch.nn.utils.clip_grad_norm_(grads, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    )
    stats = distributed.all_reduce(torch.cat([loss[None], levels, norm.float()[None].to(env.device)])) / env.world
    state.step += 1
    if not bool(torch.isfinite(stats).all()):
        phase.optimizer.zero_grad(set_to_none=True)
        state.nonfinite_total += 1
        state.streak += 1
        if state.streak >= tc.max_nonfinite:
            raise TrainingError(
                f"{state.streak} non-finite losses or gradients in a row at step {state.step - 1}; stopping "
                f"(lower train.lr, check the data, or raise train.max_nonfinite)"
            )
        return None
    phase.optimizer.step()
    phase.optimizer.zero_grad(set_to_none=True)
    phase.ema.update()
    state.streak = 0
    return stats
