"""The training loop, top to bottom: resume or start, then phase by phase, step by step, with logs,
checkpoints and sample grids at their intervals.

The run's counters are one small record (`RunState`) that is exactly what a checkpoint stores; a phase's
model, optimizer, EMA and data stream are one `Phase` built by `train.phases.build_phase`; one optimizer step
is `train.step.train_step`; the log is `train.log.TrainLog`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mdm import distributed
from mdm.clip_grids import save_samples
from mdm.conditions import Conditioner
from mdm.config import MDMConfig, load_config, save_config, to_dict
from mdm.data.loader import build_dataset
from mdm.images import sample_grid, save_png
from mdm.models.unet import NestedUNet
from mdm.pipeline import MDMPipeline
from mdm.plots import loss_curve
from mdm.text.base import TextEncoder
from mdm.text.encoders import load_text_encoder
from mdm.train import checkpoint, phases
from mdm.train.checkpoint import RunState, TrainingError
from mdm.train.log import TrainLog
from mdm.train.optim import learning_rate
from mdm.train.phases import Phase, Weights
from mdm.train.step import train_step, use_bf16

log = logging.getLogger(__name__)
# Keys a resumed run may change: how fast it reads its data and how it samples, not what it learns
RESUMABLE = {
    "data": {"num_workers"},
    "diffusion": {
        "sampler",
        "spacing",
        "eta",
        "level_projection",
        "guided_levels",
        "guidance_interval",
        "thresholding",
    },
}


class Trainer:
    """Trains an MDM from a (validated) config into a run directory; `fit()` returns the final model directory.

    A phase reads the configured data at `phases.data_shape` and sees it through the model's own pyramid
    (`phases.phase_input`). `dataset` replaces the configured one: items are dicts with 'image' (3, H, W) or, for
    a video model, 'video' (3, T, H, W) in [-1, 1] at the model's shape, 'label' and 'caption'; phases with fewer
    levels see them through the pyramid. A class model takes its class names from the dataset (`class_names`)
    unless the config names them.
    """

    def __init__(
        self,
        config: MDMConfig,
        out: str | Path,
        resume: str | None = None,
        device: str | None = None,
        text_encoder: TextEncoder | None = None,
        dataset: Dataset | None = None,
        progress: bool = True,
    ) -> None:
        self.out, self.progress = Path(out), progress
        self.env = distributed.setup(device)
        self.plan = phases.plan(config)
        self.ends = [sum(p.steps for p in self.plan[: i + 1]) for i in range(len(self.plan))]
        self.user_dataset = dataset
        self._datasets: dict[tuple[int, int], Dataset] = {}
        self.cfg = config  # what `dataset` reads (data, model, text width) is the same in the run config made next
        first = self.dataset(phases.data_shape(config, self.plan[0].levels))  # data that cannot be read fails here
        self.cfg = self._with_class_names(config, first)
        encoder = text_encoder if text_encoder is not None else load_text_encoder(self.cfg.text)
        self.text_encoder = self._checked_encoder(encoder)
        self.conditioner = Conditioner(self.cfg.model, lambda: self.text_encoder, self.env.device)
        tc = self.cfg.train
        self.bf16 = use_bf16(tc.mixed_precision, self.env.device)
        self.state = RunState()
        self.phase: Phase | None = None
        self.log = TrainLog(self.out, self.env.is_main)
        self._resume = checkpoint.resolve(self.out, resume) if resume else None
        self._seed = phases.init_source(self.cfg) if self._resume is None else None
        self._prepare_run_dir()

    # ------------------------------------------------------------------------------------------------------
    def dataset(self, shape: tuple[int, int]) -> Dataset:
        """The training data at (frames, side) `shape` (built once per shape; a user dataset is used as given)."""
        if self.user_dataset is not None:
            return self.user_dataset
        if shape not in self._datasets:
            frames, side = shape
            self._datasets[shape] = build_dataset(self.cfg.data, side, self.cfg.model.text_dim > 0, frames)
        return self._datasets[shape]

    def _with_class_names(self, config: MDMConfig, data: Dataset) -> MDMConfig:
        """The run's config: a class model gets the class names of `data` (checked against num_classes)."""
        m = config.model
        if m.num_classes == 0:
            return config
        names = list(getattr(data, "class_names", []))
        if len(names) != m.num_classes:
            what = "the given" if self.user_dataset is not None else f"the {config.data.dataset}"
            raise ValueError(
                f"model.num_classes = {m.num_classes} but {what} dataset has {len(names)} classes "
                f"(its class_names; shapes: len(data.shapes) x len(data.colors))"
            )
        return dataclasses.replace(config, model=dataclasses.replace(m, class_names=m.class_names or names))

    def _checked_encoder(self, encoder: TextEncoder | None) -> TextEncoder | None:
        """The text encoder on the training device, checked against the model's text width."""
        m = self.cfg.model
        if m.text_dim > 0 and encoder is None:
            raise ValueError(
                f"model.text_dim = {m.text_dim}: training on captions needs a text encoder (set text.encoder)"
            )
        if encoder is not None and encoder.dim != m.text_dim:
            raise ValueError(f"text encoder width {encoder.dim} != model.text_dim {m.text_dim}")
        return encoder.to(self.env.device) if encoder is not None else None

    def _prepare_run_dir(self) -> None:
        """A resumed run must have the same model, diffusion and data but for the RESUMABLE keys; a fresh run starts
        from an empty dir."""
        saved = self.out / "config.yaml"
        if self._resume is not None and saved.is_file():
            old, new = to_dict(load_config(saved)), to_dict(self.cfg)
            changed = [
                f"{section}.{k}"
                for section in ("model", "diffusion", "data")
                for k in new[section]
                if old[section].get(k) != new[section][k] and k not in RESUMABLE.get(section, ())
            ]
            if changed:
                raise TrainingError(f"{saved}: cannot resume with a different config; changed: {changed}")
        elif self._resume is None and (self.out / "checkpoints" / checkpoint.LATEST).exists():
            raise TrainingError(f"{self.out} already holds checkpoints: pass --resume latest or choose another --out")
        distributed.barrier()
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, saved)
            if self._resume is None:
                self.log.remove()

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all phases."""
        return self.ends[-1]

    # ------------------------------------------------------------------------------------------------------
    def enter_phase(self, index: int, seed_weights: Weights | None, carried_levels: int) -> Phase:
        """Build phase `index` at the current data position and make it the current one."""
        self.phase = phases.build_phase(
            self.cfg,
            index,
            env=self.env,
            dataset=self.dataset(phases.data_shape(self.cfg, self.plan[index].levels)),
            position=self.state.position,
            seed_weights=seed_weights,
            carried_levels=carried_levels,
        )
        self.state.phase, self.state.levels = index, phases.level_record(self.cfg, self.plan[index].levels)
        self.state.carried_levels = carried_levels
        return self.phase

    def grow(self, index: int) -> Phase:
        """Enter phase `index`, its inner levels (all of them in a refine phase) seeded by the previous phase (or
        `init_inner_from`)."""
        if self.phase is not None:
            prev = self.phase
            grow_ema = self.cfg.train.grow_from == "ema"
            state = prev.ema.state_dict() if grow_ema else distributed.gathered_state(prev.net)
            seed: Weights | None = (state, prev.net.num_levels, f"phase {prev.index}")
        else:
            seed = self._seed
        return self.enter_phase(index, seed, seed[1] if seed is not None else 0)

    def save_checkpoint(self) -> None:
        """Gather everything (collective) and let rank 0 write it atomically."""
        ph = self.phase
        model, ema = distributed.gathered_state(ph.net), ph.ema.state_dict()
        optimizer = distributed.full_optimizer_state(ph.net, ph.optimizer)
        self.state.ema_updates = ph.ema.updates
        rng = checkpoint.rng_state(self.env.device)
        keep = self.cfg.train.keep_checkpoints
        distributed.on_main(self.env, lambda: checkpoint.save(self.out, model, ema, optimizer, rng, self.state, keep))

    def restore(self, ck: checkpoint.Checkpoint) -> None:
        """Continue exactly where the checkpoint stopped."""
        s = ck.state
        if s.step > self.total_steps or s.phase >= len(self.plan):
            raise TrainingError(
                f"{ck.path}: checkpoint is at step {s.step} (phase {s.phase}), past the end of the configured "
                f"phases ({self.total_steps} steps)"
            )
        start = self.ends[s.phase - 1] if s.phase else 0
        if not start <= s.step <= self.ends[s.phase]:
            raise TrainingError(
                f"{ck.path}: train.phases changed: step {s.step} was in phase {s.phase}, which the config now "
                f"runs over steps {start}..{self.ends[s.phase]}"
            )
        levels = phases.level_record(self.cfg, self.plan[s.phase].levels)
        if levels != s.levels:
            raise TrainingError(f"{ck.path}: checkpoint levels {s.levels} differ from phase {s.phase}'s {levels}")
        self.state = dataclasses.replace(s)
        ph = self.enter_phase(s.phase, None, s.carried_levels)
        distributed.load_model_state(ph.net, ck.model)
        ph.ema.load_state_dict(ck.ema, s.ema_updates)
        distributed.load_optimizer_state(ph.net, ph.optimizer, ck.optimizer)
        checkpoint.set_rng_state(ck.rng, self.env.device)
        if self.env.is_main:
            self.log.truncate(s.step)
            log.info("resumed from %s at step %d", ck.path, s.step)
            later = checkpoint.newer(ck.path)
            if later:
                log.warning(
                    "resuming from %s: the newer %s will be replaced at the next save",
                    ck.path.name,
                    [p.name for p in later],
                )

    # ------------------------------------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None, max_seconds: float | None = None) -> Path | None:
        """Train to the end of the last phase (or to step `max_steps`, or for `max_seconds` of this call's wall
        clock, then checkpoint and stop).

        Returns the final model directory (EMA weights) once every phase is done, else None.
        """
        tc, state = self.cfg.train, self.state
        stop = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        deadline = None if max_seconds is None else time.monotonic() + max_seconds

        # Resume: weights, optimizer, RNG, data position; redo a phase's outputs a crash interrupted
        if self._resume is not None:
            self.restore(checkpoint.load(self._resume))
            self._resume, state = None, self.state
            if state.step == self.phase.end and not self.phase_dir().is_dir():
                self.phase_outputs(phase_end=True, final=state.step == self.total_steps)

        bar = tqdm(
            total=self.total_steps, initial=state.step, desc="train", disable=not (self.env.is_main and self.progress)
        )
        self.log.reset()
        try:
            while state.step < stop:
                # Enter the phase this step belongs to, growing the model from the previous one
                index = next(i for i, end in enumerate(self.ends) if state.step < end)
                if self.phase is None or index != self.phase.index:
                    self.grow(index)
                ph = self.phase

                # One optimizer step
                lr = learning_rate(tc, state.step - ph.start, ph.spec.steps, ph.spec.lr)
                stats = train_step(ph, state, self.env, self.conditioner, lr, self.bf16)
                self.log.add(stats, ph.batch_size * tc.grad_accum * self.env.world, lr)
                bar.update(1)
                if deadline is not None and self._any_rank(time.monotonic() >= deadline):
                    stop = state.step  # out of time: log and checkpoint this step, then return

                # Log, checkpoint and sample at their intervals (and always at phase ends)
                phase_end = state.step == ph.end
                if state.step % tc.log_every == 0 or phase_end or state.step == stop:
                    record = self.log.write(
                        state.step, ph.index, state.levels, state.nonfinite_total, state.bad_samples
                    )
                    if "loss" in record:
                        bar.set_postfix(
                            loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}"
                        )
                if (tc.checkpoint_every and state.step % tc.checkpoint_every == 0) or phase_end or state.step == stop:
                    self.save_checkpoint()
                if (tc.sample_every and state.step % tc.sample_every == 0) or phase_end:
                    self.phase_outputs(phase_end, final=state.step == self.total_steps)
        finally:
            bar.close()
        return self.out / "final" if state.step == self.total_steps else None

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` holds on any rank, so that every rank stops at the same step."""
        return bool(distributed.reduce_to_cpu(torch.tensor([float(flag)]), "max").item())

    # ------------------------------------------------------------------------------------------------------
    def ema_pipeline(self, state: dict[str, torch.Tensor] | None = None) -> MDMPipeline:
        """A sampling pipeline of the current phase's model with the weights `state` (default: the EMA's)."""
        ph = self.phase
        net = NestedUNet(ph.config.model)
        net.load_state_dict(ph.ema.state_dict() if state is None else state, strict=True)
        return MDMPipeline(net.to(self.env.device).eval(), ph.config, text_encoder=self.text_encoder)

    def phase_dir(self) -> Path:
        """Where the current phase's model goes when it ends: `final/` for the last phase, `phases/levels_N/` for the
        last N-level one (the model the next phase grows from), `phases/levels_N_phase_K/` before a refine phase."""
        i, n = self.phase.index, self.phase.net.num_levels
        if i == len(self.plan) - 1:
            return self.out / "final"
        return self.out / "phases" / (f"levels_{n}_phase_{i}" if self.plan[i + 1].levels == n else f"levels_{n}")

    def _samples(self, pipe: MDMPipeline) -> Path:
        """A grid of EMA samples with every level side by side: one cell per class (or caption); for a video phase
        an animated GIF of it and a PNG of every sample's frames (`clip_grids.save_samples`)."""
        tc, m, n = self.cfg.train, self.cfg.model, self.cfg.train.sample_count
        pipe.set_progress_bar_config(disable=True)
        if m.num_classes > 0:
            request: dict = {"class_labels": [m.class_names[i % m.num_classes] for i in range(n)]}
        elif m.text_dim > 0:
            data = self.dataset(phases.data_shape(self.cfg, self.phase.spec.levels))
            request = {"prompt": [data[i % len(data)]["caption"] for i in range(n)]}
        else:
            request = {"batch_size": n}
        out = pipe(
            **request,
            num_inference_steps=tc.sample_steps,
            guidance_scale=tc.sample_guidance,
            generator=torch.Generator().manual_seed(tc.seed),
            output_type="pt",
        )
        stem, ncols = self.out / "samples" / f"step_{self.state.step:07d}", math.ceil(math.sqrt(n))
        if out.videos is not None:
            return save_samples(out.levels, out.titles, stem, ncols)[0]
        return save_png(sample_grid(out.levels, out.titles, ncols), stem.with_suffix(".png"))

    def phase_outputs(self, phase_end: bool, final: bool) -> None:
        """Sample grid; at a phase end the phase's model directory; at the end the loss curve.

        Runs under a forked RNG so that sampling never changes the training stream (exact resume).
        """
        weights = self.phase.ema.state_dict()

        def write() -> None:
            pipe = self.ema_pipeline(weights)
            if self.cfg.train.sample_count:
                log.info("samples: %s", self._samples(pipe))
            if phase_end:
                pipe.save_pretrained(self.phase_dir())
            if final:
                loss_curve(self.log.path, self.out / "loss.png")

        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            distributed.on_main(self.env, write)
