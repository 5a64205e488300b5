"""The training loop: progressive phases, AdamW with warm-up, EMA, accumulation, AMP, checkpoints, samples.

Phase k trains the model made of the innermost `levels` levels. Entering a phase builds that model and
loads the previous phase's weights (or `--init-inner-from`) into its inner network, strictly; the outer
layers start from their initialisation and the zero-initialised adapters make the grown model reproduce
the previous one. Every phase starts a fresh optimizer and LR warm-up, so one run with several phases and a
chain of separate runs (`init_inner_from`) follow the same recipe.

Randomness is per sample: the timestep, the per-level noise and the condition-dropout coin of the sample at
data-stream position q come from a generator seeded by (seed, q). A batch therefore trains on the same draws
for any number of processes or accumulation split, and a resumed run continues bit for bit.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mdm.config import MDMConfig, PhaseConfig, load_config, phase_mixed_ratio, save_config, to_dict
from mdm.data.loader import build_dataset, make_loader
from mdm.diffusion.process import MultiLevelDiffusion
from mdm.images import sample_grid, save_png
from mdm.models.conditioning import Conditioning, drop, null_labels
from mdm.models.unet import NestedUNet
from mdm.pipeline import MDMPipeline
from mdm.plots import loss_curve
from mdm.text.encoders import TextEncoder, load_text_encoder
from mdm.train import checkpoint, distributed
from mdm.train.checkpoint import TrainingError
from mdm.train.ema import EMA

log = logging.getLogger(__name__)
SPEED_ONLY = {"num_workers"}  # data keys that a resumed run may change
BAD_SAMPLE_GRACE = 1000  # the bad-sample share is measured over at least this many samples


def phase_config(config: MDMConfig, levels: int, mixed_ratio: list[float] | None = None) -> MDMConfig:
    """The config of the model made of the innermost `levels` levels of `config` (weights and ratios sliced)."""
    all_levels = config.model.unet.levels()
    first = len(all_levels) - levels
    sub = copy.deepcopy(config)
    sub.model.unet = copy.deepcopy(all_levels[first])
    sub.model.image_size = config.model.level_sizes()[first]
    d = sub.diffusion
    if d.level_weights is not None:
        d.level_weights = d.level_weights[first:]
    d.mixed_ratio = phase_mixed_ratio(config, levels, mixed_ratio)
    sub.train.phases = []
    return sub.validate(f"phase with {levels} level(s)")


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
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{what} ({len(keys)}): {keys[:8]}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            if keys
        ]
        raise ValueError(f"{source}: weights do not fit the inner {levels} level(s); " + "; ".join(parts))
    target.load_state_dict(state, strict=True)
    prefix = "inner_unet." * depth
    return [prefix + k for k, _ in target.named_parameters()]


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; a line torn by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _mix(seed: int, position: int) -> int:
    """A 63-bit generator seed for the sample at stream `position` of a run seeded `seed`."""
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


class Trainer:
    """Trains an MDM from a config into a run directory; `fit()` returns the final model directory.

    `dataset` replaces the configured one: items are dicts with 'image' (3, H, W) in [-1, 1] at the model's
    size, 'label' and 'caption'; phases with fewer levels see it average-pooled to their size. A class model
    takes its class names from `dataset.class_names`.
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
        self.cfg = copy.deepcopy(config).validate()
        self.tcfg = self.cfg.train
        self.out = Path(out)
        self.env = distributed.setup(device)
        self.device = self.env.device
        self.progress = progress
        n_levels = len(self.cfg.model.unet.levels())
        self.phases = self.tcfg.phases or [PhaseConfig(levels=n_levels, steps=self.tcfg.steps)]
        self.ends = [sum(p.steps for p in self.phases[: i + 1]) for i in range(len(self.phases))]
        m = self.cfg.model
        if text_encoder is None:
            text_encoder = load_text_encoder(self.cfg.text)
        self.text_encoder = text_encoder.to(self.device) if text_encoder is not None else None
        if m.text_dim > 0:
            if text_encoder is None:
                raise ValueError(
                    f"model.text_dim = {m.text_dim}: training on captions needs a text encoder (set text.encoder)"
                )
            if text_encoder.dim != m.text_dim:
                raise ValueError(f"text encoder width {text_encoder.dim} != model.text_dim {m.text_dim}")
        self.user_dataset = dataset
        probe = dataset if dataset is not None else build_dataset(self.cfg.data, m.image_size, m.text_dim > 0)
        if m.num_classes > 0:
            names = list(getattr(probe, "class_names", []))
            if len(names) != m.num_classes:
                what = "the given" if dataset is not None else f"the {self.cfg.data.dataset}"
                raise ValueError(
                    f"model.num_classes = {m.num_classes} but {what} dataset has {len(names)} classes "
                    f"(its class_names; shapes: len(data.shapes) x len(data.colors))"
                )
            m.class_names = m.class_names or names
        self.bf16 = self.tcfg.mixed_precision == "bf16" or (
            self.tcfg.mixed_precision == "auto" and self.device.type == "cuda"
        )
        self.step = 0
        self.position = 0
        self.phase = -1
        self.nonfinite_total = 0
        self.streak = 0
        self.bad_samples = 0
        self.net: NestedUNet | None = None
        self._resume = checkpoint.resolve(self.out, resume) if resume else None
        if self._resume is None:
            self._source_levels(0)
        self._check_run_dir()
        self._tb = None
        self._window: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        """A resumed run must have the same model, diffusion and data; a fresh run starts from an empty dir."""
        saved = self.out / "config.yaml"
        if self._resume is not None:
            if saved.is_file():
                old = to_dict(load_config(saved))
                new = to_dict(self.cfg)
                diff = [
                    f"{section}.{k}"
                    for section in ("model", "diffusion", "data")
                    for k in new[section]
                    if old[section].get(k) != new[section][k] and k not in SPEED_ONLY
                ]
                if diff:
                    raise TrainingError(f"{saved}: cannot resume with a different config; changed: {diff}")
        elif (self.out / "checkpoints" / checkpoint.LATEST).exists():
            raise TrainingError(f"{self.out} already holds checkpoints: pass --resume latest or choose another --out")
        distributed.barrier()
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, saved)
            if self._resume is None:
                (self.out / "log.jsonl").unlink(missing_ok=True)

    def _phase_at(self, step: int) -> int:
        return next(i for i, end in enumerate(self.ends) if step < end)

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all phases."""
        return self.ends[-1]

    def _lr(self, local: int, steps: int, peak: float | None = None) -> float:
        """Linear warm-up to the peak lr over warmup_steps, then constant or cosine decay to min_lr_ratio x peak."""
        tc = self.tcfg
        peak = tc.lr if peak is None else peak
        if tc.warmup_steps and local < tc.warmup_steps:
            return peak * (local + 1) / tc.warmup_steps
        if tc.lr_schedule == "cosine":
            progress = (local - tc.warmup_steps) / max(1, steps - tc.warmup_steps)
            return peak * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        return peak

    # ------------------------------------------------------------------------------------------------------
    def _source_weights(self, phase: int) -> tuple[dict[str, torch.Tensor], int, str] | None:
        """Weights that seed the inner levels of `phase`: the previous phase's, or `init_inner_from`."""
        if self.net is not None:
            state = self.ema.state_dict() if self.tcfg.grow_from == "ema" else distributed.gathered_state(self.net)
            return state, self.net.num_levels, f"phase {phase - 1}"
        if phase == 0 and self.tcfg.init_inner_from:
            levels = self._source_levels(0)
            return load_file(Path(self.tcfg.init_inner_from) / "model.safetensors"), levels, self.tcfg.init_inner_from
        return None

    def _source_levels(self, phase: int) -> int:
        """Levels of the model whose weights seed `phase` (0 when it starts from scratch)."""
        if phase > 0:
            return self.phases[phase - 1].levels
        if not self.tcfg.init_inner_from:
            return 0
        src = Path(self.tcfg.init_inner_from)
        if not (src / "config.yaml").is_file() or not (src / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{src}: --init-inner-from needs a model directory (config.yaml, model.safetensors)"
            )
        source = load_config(src / "config.yaml")
        keys = ("prediction_type", "schedule", "num_train_timesteps")
        diff = [k for k in keys if getattr(source.diffusion, k) != getattr(self.cfg.diffusion, k)]
        if diff:
            raise ValueError(f"{src}: --init-inner-from model differs in diffusion.{', diffusion.'.join(diff)}")
        return len(source.model.unet.levels())

    def _enter_phase(self, phase: int, grow: bool = True, carried_levels: int | None = None) -> None:
        """Build the phase's model (growing it from the previous weights), optimizer, EMA and data stream.

        `carried_levels` (levels whose weights came from before this phase) is recomputed unless given.
        """
        ph = self.phases[phase]
        sub = phase_config(self.cfg, ph.levels, ph.mixed_ratio)
        source = self._source_weights(phase) if grow else None
        torch.manual_seed(self.tcfg.seed + 7919 * phase)
        net = NestedUNet(sub.model)
        if source is not None:
            load_inner(net, *source)
        if carried_levels is None:
            carried_levels = self._source_levels(phase)
        self.carried_levels = carried_levels
        prefix = "inner_unet." * (ph.levels - carried_levels)
        self.carried = [n for n, _ in net.named_parameters() if carried_levels and n.startswith(prefix)]
        net.to(self.device).train()
        if self.tcfg.compile:
            net.compile()
        blocks = [b for level in net.levels() for b in [*level.down_blocks, *level.up_blocks]]
        self.model = distributed.wrap(net, self.env, self.tcfg.strategy, blocks)
        self.net = net
        tc = self.tcfg
        self.optimizer = torch.optim.AdamW(
            net.parameters(), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay
        )
        self.ema = EMA(net, tc.ema_decay, tc.ema_warmup)
        self.diffusion = MultiLevelDiffusion(sub.diffusion, sub.model.level_sizes())
        self.sub = sub
        self.phase = phase
        self.start = self.ends[phase - 1] if phase else 0
        self.batch = ph.batch_size or tc.batch_size
        need_captions = self.cfg.model.text_dim > 0
        self.dataset = (
            self.user_dataset
            if self.user_dataset is not None
            else build_dataset(self.cfg.data, sub.model.image_size, need_captions)
        )
        loader = make_loader(
            self.dataset,
            self.batch,
            self.cfg.data.seed,
            self.position,
            self.env.rank,
            self.env.world,
            self.cfg.data.num_workers,
        )
        self._batches = iter(loader)
        if self.env.is_main:
            n = sum(p.numel() for p in net.parameters())
            log.info("phase %d: levels %s, %.2fM parameters", phase, sub.model.level_sizes(), n / 1e6)

    # ------------------------------------------------------------------------------------------------------
    def _draws(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Per-sample timestep, per-level noise and condition-dropout flags from generators seeded (seed, q)."""
        d = self.diffusion
        shapes = [(x.shape[1], s, s) for s in d.sizes]
        ts, drops, noise = [], [], [[] for _ in shapes]
        g = torch.Generator(device=self.device)
        for q in positions.tolist():
            g.manual_seed(_mix(self.tcfg.seed, q))
            ts.append(torch.randint(0, d.T, (1,), generator=g, device=self.device))
            drops.append(torch.rand(1, generator=g, device=self.device))
            for level, shape in zip(noise, shapes, strict=True):
                level.append(torch.randn(shape, generator=g, device=self.device))
        dropped = torch.cat(drops) < self.sub.diffusion.cond_drop_prob
        return torch.cat(ts), [torch.stack(n).to(x.dtype) for n in noise], dropped

    def _null(self) -> Conditioning | None:
        m = self.cfg.model
        if m.num_classes > 0:
            return Conditioning(labels=null_labels(1, m.num_classes, self.device))
        if self.text_encoder is not None:
            if not hasattr(self, "_null_text"):
                emb, mask = self.text_encoder.encode([""])
                self._null_text = Conditioning(text=emb.to(self.device), text_mask=mask.to(self.device))
            return self._null_text
        return None

    def _condition(self, batch: dict, dropped: torch.Tensor) -> Conditioning | None:
        """The batch's condition (labels or encoded captions) with dropped rows replaced by the null one."""
        m = self.cfg.model
        if m.num_classes > 0:
            cond = Conditioning(labels=batch["label"].to(self.device))
        elif self.text_encoder is not None:
            with torch.no_grad():
                emb, mask = self.text_encoder.encode(list(batch["caption"]))
            cond = Conditioning(text=emb.to(self.device), text_mask=mask.to(self.device))
        else:
            return None
        return drop(cond, dropped, self._null())

    def _count_bad(self, skipped: int) -> None:
        """Count unusable samples (all ranks); more than data.max_bad_fraction of the samples read (at least
        BAD_SAMPLE_GRACE of them) stops the run."""
        if skipped:
            self.bad_samples += skipped
            if self.env.is_main:
                log.warning("skipped %d unusable sample(s) (%d so far)", skipped, self.bad_samples)
        read = self.position + self.bad_samples
        limit = self.cfg.data.max_bad_fraction
        if self.bad_samples > limit * max(read, BAD_SAMPLE_GRACE):
            raise TrainingError(
                f"{self.bad_samples} of {read} samples read were unusable (more than data.max_bad_fraction = {limit})"
            )

    def _train_step(self) -> None:
        """One optimizer step over grad_accum micro-batches; a non-finite loss or gradient skips it."""
        tc, ph = self.tcfg, self.phases[self.phase]
        local = self.step - self.start
        lr = self._lr(local, ph.steps, ph.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = self.batch * tc.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        level_sum = torch.zeros(self.diffusion.num_levels, device=self.device)
        skipped = 0
        for k in range(tc.grad_accum):
            batch = next(self._batches)
            expected = self.position + self.env.rank * self.batch
            if int(batch["position"][0]) != expected:
                raise RuntimeError(f"data stream out of step: expected position {expected}, got {batch['position'][0]}")
            skipped += batch["skipped"]
            x = batch["image"].to(self.device)
            if x.shape[-1] != self.diffusion.sizes[0]:
                x = F.adaptive_avg_pool2d(x, self.diffusion.sizes[0])
            t, noise, dropped = self._draws(batch["position"], x)
            cond = self._condition(batch, dropped)
            distributed.no_sync(self.model, k == tc.grad_accum - 1)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.diffusion.loss(self.model, x, cond, t=t, noise=noise)
            loss = out.loss.sum() / rows
            loss.backward()
            loss_sum += loss.detach()
            level_sum += torch.stack(
                [
                    m[:r].sum() / (r * tc.grad_accum)
                    for m, r in zip(out.level_mse.detach().float(), out.rows, strict=True)
                ]
            )
            self.position += self.batch * self.env.world
        self._count_bad(int(distributed.all_reduce(torch.tensor([skipped], device=self.device)).item()))
        if local < ph.freeze_inner_steps and self.carried:
            params = dict(self.net.named_parameters())
            for name in self.carried:
                params[name].grad = None
        grads = [p for p in self.net.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        norm = distributed.full_tensor(norm)
        stats = torch.cat([loss_sum[None], level_sum, norm.float()[None].to(self.device)])
        stats = distributed.all_reduce(stats) / self.env.world
        if not bool(torch.isfinite(stats).all()):
            self.nonfinite_total += 1
            self.streak += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.streak >= tc.max_nonfinite:
                raise TrainingError(
                    f"{self.streak} non-finite losses or gradients in a row at step {self.step}; stopping "
                    f"(lower train.lr, check the data, or raise train.max_nonfinite)"
                )
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update()
            self.streak = 0
            w = self._window
            w["loss"] = w.get("loss", 0.0) + float(stats[0])
            w["levels"] = w.get("levels", 0) + stats[1:-1].cpu()
            w["norm"] = w.get("norm", 0.0) + float(stats[-1])
            w["n"] = w.get("n", 0) + 1
        self._window["images"] = self._window.get("images", 0) + rows * self.env.world
        self._window["lr"] = lr
        self.step += 1

    # ------------------------------------------------------------------------------------------------------
    def _log(self) -> dict | None:
        """Write the averages since the last record to log.jsonl (and TensorBoard); returns the record."""
        w, now = self._window, time.perf_counter()
        elapsed = now - w.get("t0", now)
        record = {
            "step": self.step,
            "phase": self.phase,
            "level_sizes": self.sub.model.level_sizes(),
            "lr": w.get("lr", 0.0),
            "images_per_s": w.get("images", 0) / elapsed if elapsed > 0 else 0.0,
            "nonfinite_skipped": self.nonfinite_total,
            "bad_samples": self.bad_samples,
        }
        if w.get("n"):
            record["loss"] = w["loss"] / w["n"]
            record["level_loss"] = (w["levels"] / w["n"]).tolist()
            record["grad_norm"] = w["norm"] / w["n"]
        self._window = {"t0": now}
        if not self.env.is_main:
            return record
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._tb = False
        if self._tb:
            for key in ("loss", "lr", "images_per_s", "grad_norm"):
                if key in record:
                    self._tb.add_scalar(f"train/{key}", record[key], self.step)
        return record

    def _save_checkpoint(self) -> None:
        """Gather everything (collective) and let rank 0 write it atomically."""
        model = distributed.gathered_state(self.net)
        ema = self.ema.state_dict()
        opt = distributed.full_optimizer_state(self.net, self.optimizer)

        def write() -> None:
            state = {
                "phase": self.phase,
                "position": self.position,
                "ema_updates": self.ema.updates,
                "nonfinite_total": self.nonfinite_total,
                "bad_samples": self.bad_samples,
                "streak": self.streak,
                "levels": self.sub.model.level_sizes(),
                "carried_levels": self.carried_levels,
            }
            rng = checkpoint.rng_state(self.device)
            checkpoint.save(self.out, self.step, model, ema, opt, rng, state, self.tcfg.keep_checkpoints)

        distributed.on_main(self.env, write)

    def _restore(self, ck: checkpoint.Checkpoint) -> None:
        """Continue exactly where the checkpoint stopped."""
        s = ck.state
        if s["step"] > self.total_steps or s["phase"] >= len(self.phases):
            raise TrainingError(
                f"{ck.path}: checkpoint is at step {s['step']} (phase {s['phase']}), past the end of the configured "
                f"phases ({self.total_steps} steps)"
            )
        start = self.ends[s["phase"] - 1] if s["phase"] else 0
        if not start <= s["step"] <= self.ends[s["phase"]]:
            raise TrainingError(
                f"{ck.path}: train.phases changed: step {s['step']} was in phase {s['phase']}, which the config now "
                f"runs over steps {start}..{self.ends[s['phase']]}"
            )
        sizes = phase_config(self.cfg, self.phases[s["phase"]].levels).model.level_sizes()
        if sizes != s["levels"]:
            raise TrainingError(f"{ck.path}: checkpoint levels {s['levels']} differ from phase {s['phase']}'s {sizes}")
        self.step, self.position = s["step"], s["position"]
        self.nonfinite_total, self.streak, self.bad_samples = s["nonfinite_total"], s["streak"], s["bad_samples"]
        self._enter_phase(s["phase"], grow=False, carried_levels=s["carried_levels"])
        distributed.load_model_state(self.net, ck.model)
        self.ema.load_state_dict(ck.ema, s["ema_updates"])
        distributed.load_optimizer_state(self.net, self.optimizer, ck.optimizer)
        checkpoint.set_rng_state(ck.rng, self.device)
        if self.env.is_main:
            self._truncate_log()
            log.info("resumed from %s at step %d", ck.path, self.step)

    def _truncate_log(self) -> None:
        """Drop log records written after the checkpoint being resumed (a crash leaves them behind)."""
        path = self.out / "log.jsonl"
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if _logged_step(line) <= self.step]
            tmp = path.with_name(".log.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(path)

    def ema_pipeline(self, state: dict[str, torch.Tensor] | None = None) -> MDMPipeline:
        """A sampling pipeline of the current phase's model with the weights `state` (default: the EMA's)."""
        state = self.ema.state_dict() if state is None else state
        net = NestedUNet(self.sub.model)
        net.load_state_dict(state, strict=True)
        return MDMPipeline(net.to(self.device).eval(), self.sub, text_encoder=self.text_encoder)

    def _samples(self, pipe: MDMPipeline) -> Path:
        """A grid of EMA samples with every level side by side: one cell per class (or caption)."""
        tc, m = self.tcfg, self.cfg.model
        n = tc.sample_count
        pipe.set_progress_bar_config(disable=True)
        kwargs: dict = {}
        if m.num_classes > 0:
            labels = [i % m.num_classes for i in range(n)]
            kwargs["class_labels"] = labels
            titles = [m.class_names[i] for i in labels]
        elif self.text_encoder is not None:
            titles = [self.dataset[i % len(self.dataset)]["caption"] for i in range(n)]
            kwargs["prompt"] = titles
        else:
            kwargs["batch_size"] = n
            titles = [f"sample {i}" for i in range(n)]
        out = pipe(
            **kwargs,
            num_inference_steps=tc.sample_steps,
            guidance_scale=tc.sample_guidance,
            generator=torch.Generator().manual_seed(tc.seed),
            output_type="pt",
        )
        grid = sample_grid(out.levels, titles, ncols=math.ceil(math.sqrt(n)))
        return save_png(grid, self.out / "samples" / f"step_{self.step:07d}.png")

    # ------------------------------------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> Path | None:
        """Train to the end of the last phase (or to step `max_steps`, then checkpoint and stop).

        Returns the final model directory (EMA weights) once every phase is done, else None.
        """
        stop = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        if self._resume is not None:
            self._restore(checkpoint.load(self._resume))
            self._resume = None
            if self.step == self.ends[self.phase] and not self._phase_dir().is_dir():
                self._phase_outputs(phase_end=True, final=self.step == self.total_steps)
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc="train", disable=not (self.env.is_main and self.progress)
        )
        self._window = {"t0": time.perf_counter()}
        tc = self.tcfg
        try:
            while self.step < stop:
                phase = self._phase_at(self.step)
                if phase != self.phase:
                    self._enter_phase(phase)
                self._train_step()
                bar.update(1)
                phase_end = self.step == self.ends[self.phase]
                if self.step % tc.log_every == 0 or phase_end or self.step == stop:
                    record = self._log()
                    if "loss" in record:
                        bar.set_postfix(
                            loss=f"{record['loss']:.4f}",
                            lr=f"{record['lr']:.2e}",
                            img_s=f"{record['images_per_s']:.1f}",
                        )
                if (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) or phase_end or self.step == stop:
                    self._save_checkpoint()
                if (tc.sample_every and self.step % tc.sample_every == 0) or phase_end:
                    self._phase_outputs(phase_end, final=self.step == self.total_steps)
        finally:
            bar.close()
        if self.step < self.total_steps:
            return None
        return self.out / "final"

    def _phase_dir(self) -> Path:
        """Where the current phase's model goes when it ends: `final/` for the last phase."""
        last = self.phase == len(self.phases) - 1
        return self.out / ("final" if last else f"phases/levels_{self.net.num_levels}")

    def _phase_outputs(self, phase_end: bool, final: bool) -> None:
        """Sample grid; at a phase end the phase's model directory; at the end the loss curve.

        Runs under a forked RNG so that sampling never changes the training stream (exact resume).
        """
        state = self.ema.state_dict()

        def write() -> None:
            pipe = self.ema_pipeline(state)
            if self.tcfg.sample_count:
                log.info("samples: %s", self._samples(pipe))
            if phase_end:
                pipe.save_pretrained(self._phase_dir())
            if final:
                loss_curve(self.out / "log.jsonl", self.out / "loss.png")

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            distributed.on_main(self.env, write)
