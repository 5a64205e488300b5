"""Per-level evaluation of generated pyramids: FID and KID of each level against the data pooled to that level (or
the top level against saved reference statistics) and cross-level consistency PSNR; a printable table; and
`evaluate_model`, the sampling loop behind `mdm eval` (CLIP score and the shapes oracle included)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mdm import io
from mdm.config import DataConfig, MDMConfig
from mdm.data.check import is_image_folder
from mdm.data.loader import build_dataset
from mdm.data.shapes import ShapesDataset
from mdm.diffusion.process import Pyramid
from mdm.distributed import barrier, rank_world, reduce_to_cpu
from mdm.eval.accumulate import FeatureAccumulator, RunningMean, rank_batches
from mdm.eval.clip_score import load_clip
from mdm.eval.features import INCEPTION_ENV, FeatureExtractor, InceptionFeatures, load_inception
from mdm.eval.frechet import Statistics, frechet_distance
from mdm.eval.kid import kid
from mdm.eval.levels import consistency_mse, level_sizes, pool_levels, psnr
from mdm.eval.oracle import (
    REAL_SEED,
    Classifier,
    OracleEvaluator,
    OracleResult,
    load_or_train_oracle,
    real_dataset,
    render,
)
from mdm.pipeline import MDMPipeline


@dataclass(frozen=True)
class LevelResult:
    """One level's metrics (None where not measured). `psnr`: dB between it and the pooled top level, on [0, 1]."""

    level: int
    size: int
    num_generated: int
    fid: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    psnr: float | None = None


class PyramidEvaluator:
    """Accumulates generated pyramids and data images batch by batch, on every rank; `results()` is collective.

    Without a feature extractor it measures cross-level consistency only (no FID / KID)."""

    def __init__(
        self,
        extractor: FeatureExtractor | None,
        sizes: list[int],
        reference: Statistics | None = None,
        keep_features: bool = True,
    ) -> None:
        self.sizes = list(sizes)
        self.reference = reference
        self.has_features = extractor is not None
        per_level = self.sizes if extractor is not None else []
        self.generated = [FeatureAccumulator(extractor, keep_features) for _ in per_level]
        self.data = [FeatureAccumulator(extractor, keep_features) for _ in per_level]
        self.mse = RunningMean((len(self.sizes) - 1,))
        self.count = 0

    def add_generated(self, pyramid: Pyramid) -> None:
        """One batch of generated pyramids (highest level first, [-1, 1])."""
        if level_sizes(pyramid) != self.sizes:
            raise ValueError(f"expected levels of sizes {self.sizes}, got {level_sizes(pyramid)}")
        if self.has_features:
            for acc, level in zip(self.generated, pyramid, strict=True):
                acc.update(level)
        if len(self.sizes) > 1:
            self.mse.update(consistency_mse(pyramid))
        self.count += pyramid[0].shape[0]

    def add_data(self, images: torch.Tensor) -> None:
        """One batch of data images at the top size, pooled to every level."""
        if self.reference is not None:
            raise ValueError("data images and reference statistics are alternatives: give one")
        if not self.has_features:
            raise ValueError("data images need a feature extractor (this evaluator measures consistency only)")
        for acc, level in zip(self.data, pool_levels(images, self.sizes), strict=True):
            acc.update(level)

    def data_statistics(self) -> list[Statistics]:
        """The data's statistics per level (collective), e.g. to save the top level as a reusable reference."""
        return [acc.statistics() for acc in self.data]

    def results(self, kid_subset_size: int = 1000, kid_subsets: int = 100, seed: int = 0) -> list[LevelResult]:
        """Per-level metrics over all ranks (collective: every rank calls it and gets the same numbers)."""
        has_data = self.has_features and self.data[0].total() > 0
        level_psnr = psnr(self.mse.compute()).tolist() if len(self.sizes) > 1 else []
        total = int(reduce_to_cpu(torch.tensor([self.count])))
        results = []
        for i, size in enumerate(self.sizes):
            fid = kid_mean = kid_std = None
            if self.has_features:
                gen, data = self.generated[i], self.data[i]
                ref = data.statistics() if has_data else (self.reference if i == 0 else None)
                fid = None if ref is None else frechet_distance(gen.statistics(), ref)
                if has_data and gen.keep_features:
                    kid_mean, kid_std = kid(
                        gen.features(), data.features(), kid_subset_size, kid_subsets, seed, device=gen.device
                    )
            results.append(
                LevelResult(
                    level=i,
                    size=size,
                    num_generated=total,
                    fid=fid,
                    kid=kid_mean,
                    kid_std=kid_std,
                    psnr=level_psnr[i - 1] if i else None,
                )
            )
        return results


def format_table(results: list[LevelResult]) -> str:
    """A fixed-width table, one row per level: size, samples, FID, KID x 1e3 (± std), PSNR to the pooled top."""

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = [f"{'level':>5} {'size':>5} {'n':>7} {'FID':>10} {'KIDx1e3':>18} {'PSNR dB':>8}"]
    for r in results:
        kid_text = "-" if r.kid is None else f"{r.kid * 1e3:.3f} ± {(r.kid_std or 0) * 1e3:.3f}"
        rows.append(
            f"{r.level:>5} {r.size:>5} {r.num_generated:>7} {cell(r.fid, '.3f'):>10} {kid_text:>18} "
            f"{cell(r.psnr, '.2f'):>8}"
        )
    return "\n".join(rows)


def sample_latents(indices: Sequence[int], seed: int, sizes: list[int], channels: int) -> Pyramid:
    """Starting noise of samples `indices`, highest level first, each sample from its own generator seeded by
    (seed, index): a sample is the same whatever batch or rank draws it."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    levels: list[list[torch.Tensor]] = [[] for _ in sizes]
    for i in indices:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> 1))
        for level, size in zip(levels, sizes, strict=True):
            level.append(torch.randn(channels, size, size, generator=g))
    return [torch.stack(level) for level in levels]


@dataclass
class EvalReport:
    """What `evaluate_model` measured and how: its settings, per-level metrics, CLIP score, oracle scores, the
    condition of every sample (`labels` or `prompts`, by global index) and notes on what was skipped."""

    settings: dict[str, Any]
    levels: list[LevelResult]
    clip_score: float | None = None
    oracle: OracleResult | None = None
    conditions: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (to a temporary name, then renamed)."""
        return io.write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self) -> str:
        """The per-level table, then the CLIP score, the oracle scores and the notes."""
        lines = [format_table(self.levels)]
        if self.clip_score is not None:
            lines.append(f"CLIP score: {self.clip_score:.3f}")
        if self.oracle is not None:
            o = self.oracle
            acc = "-" if o.accuracy is None else f"{100 * o.accuracy:.2f}%"
            lines.append(
                f"oracle: accuracy {acc}, FD {o.fd:.4f} (real-vs-real floor {o.floor:.4f}), "
                f"accuracy on real images {100 * o.real_accuracy:.2f}%"
            )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _spread(i: int, n: int, length: int) -> int:
    """Dataset index of reference item i of n spread evenly over `length` items (class folders are sorted)."""
    return (i % n) * length // n


def _open_data(spec: str | None, config: MDMConfig, num: int, need_captions: bool) -> Dataset:
    """The reference images / prompt source: 'shapes' (held-out built-in scenes of the model's vocabulary at its
    size), an image folder or tar shards, or (None) the data the model's config names."""
    size, d = config.model.image_size, config.data
    if spec == "shapes" or (spec is None and d.dataset == "shapes"):
        return ShapesDataset(size, num, d.shapes, d.colors, seed=REAL_SEED)
    if spec is None:
        return build_dataset(d, size, need_captions)
    kind = "folder" if is_image_folder(Path(spec)) else "shards"
    return build_dataset(DataConfig(dataset=kind, path=spec), size, need_captions)


def _inception(
    path: str | os.PathLike | None, required: bool, device: torch.device, notes: list[str]
) -> InceptionFeatures | None:
    """The Inception network from `path` or $MDM_INCEPTION_PATH; None (with a note) when neither is set and FID is
    not `required`."""
    if path is None and not os.environ.get(INCEPTION_ENV) and not required:
        notes.append(f"FID / KID skipped: no Inception network (give --inception PATH or set {INCEPTION_ENV})")
        return None
    return load_inception(path, device)


def _conditions(config: MDMConfig, source: Dataset | None, num: int, where: str | None) -> dict[str, list]:
    """Every sample's condition by global index: class labels round-robin, or the prompts of the reference images
    (sample i gets the caption of data image i); empty for an unconditional model."""
    m = config.model
    if m.num_classes:
        return {"labels": [i % m.num_classes for i in range(num)]}
    if not m.text_dim:
        return {}
    captions = source.captions()
    n = min(num, len(captions))
    prompts = [captions[_spread(i, n, len(captions))] for i in range(num)]
    empty = next((i for i, p in enumerate(prompts) if not p), None)
    if empty is not None:
        raise ValueError(f"{where or config.data.path}: sample {empty} has no caption; a text model needs one")
    return {"prompts": prompts}


def _clip_prompts(config: MDMConfig, conditions: dict[str, list]) -> list[str]:
    """The text each sample is scored against: its prompt, or its class name."""
    names = config.model.class_names
    if "labels" in conditions:
        if not names:
            raise ValueError("CLIP score of a class model needs class names as prompts (model.class_names)")
        return [names[c] for c in conditions["labels"]]
    if "prompts" not in conditions:
        raise ValueError("CLIP score needs prompts: this model is unconditional")
    return conditions["prompts"]


def _requested_labels(
    config: MDMConfig, conditions: dict[str, list], source: Dataset | None, real: ShapesDataset
) -> list[int] | None:
    """The shapes label each sample was asked for (class models: its class; text models: its caption's scene);
    None for an unconditional model. Errors when the model's classes are not the oracle's."""
    m = config.model
    if "labels" in conditions:
        if (m.class_names or real.class_names) != real.class_names or m.num_classes != real.num_classes:
            raise ValueError(
                f"the oracle classifies {real.class_names} (config data.shapes x data.colors); the model's "
                f"classes are {m.class_names or m.num_classes}"
            )
        return conditions["labels"]
    if "prompts" in conditions:
        if not isinstance(source, ShapesDataset):
            raise ValueError("the oracle scores a text model on the built-in captions: use --data shapes")
        n = len(conditions["prompts"])
        return [source.scene(_spread(i, min(n, len(source)), len(source))).label for i in range(n)]
    return None


def _oracle(
    oracle: bool | Classifier, config: MDMConfig, cache: str | os.PathLike | None, progress: bool, device: torch.device
) -> Classifier:
    """The given oracle, or the cached one for the model's size and shapes vocabulary (rank 0 trains it if needed)."""
    d, size = config.data, config.model.image_size
    if not isinstance(oracle, bool):
        spec = getattr(oracle, "spec", None)
        if spec is not None and (spec.size, list(spec.shapes), list(spec.colors)) != (size, d.shapes, d.colors):
            raise ValueError(
                f"the oracle was trained on {spec.size}px {list(spec.shapes)} x {list(spec.colors)}; the model makes "
                f"{size}px {d.shapes} x {d.colors} (config data.shapes, data.colors)"
            )
        return oracle
    rank, _ = rank_world()
    if rank == 0:
        found = load_or_train_oracle(size, d.shapes, d.colors, cache_dir=cache, progress=progress, device=device)
    barrier()
    return found if rank == 0 else load_or_train_oracle(size, d.shapes, d.colors, cache_dir=cache, device=device)


def evaluate_model(
    model: MDMPipeline | str | os.PathLike,
    num: int,
    *,
    data: str | None = None,
    reference: str | os.PathLike | None = None,
    inception: str | os.PathLike | None = None,
    clip: str | os.PathLike | None = None,
    oracle: bool | Classifier = False,
    batch_size: int = 50,
    steps: int = 50,
    guidance: float | None = None,
    sampler: str | None = None,
    spacing: str | None = None,
    seed: int = 0,
    save_reference: str | os.PathLike | None = None,
    oracle_cache: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> EvalReport:
    """Generate `num` samples (`sampler` over `steps` steps of `spacing`, default the model's; every rank its share)
    and measure them (collective).

    `data` ('shapes', an image folder or tar shards) gives per-level FID / KID against the data pooled to each level;
    `reference` (.npz statistics) gives the top level's FID. Inception: `inception`, else $MDM_INCEPTION_PATH; it may
    be absent only when there is no `reference` to compare with and another metric (`clip`, `oracle`) is asked for.
    Class models sample labels round-robin over the classes; text models use the data's captions (`data`, else the
    data the model's config names). CLIP prompts: the captions, or a class model's class names. `oracle`: True for
    the cached shapes oracle of the model's size and vocabulary, or an oracle to use. `guidance` defaults to the
    config's `train.sample_guidance`. Sample i starts from noise seeded by (seed, i). With `save_reference`, rank 0
    writes the data's top-level statistics there.
    """
    if num < 2 or batch_size < 1:
        raise ValueError(f"need num >= 2 samples and batch_size >= 1, got num={num}, batch_size={batch_size}")
    if data is not None and reference is not None:
        raise ValueError("give data images or reference statistics (--data or --ref), not both")
    if save_reference is not None and data is None:
        raise ValueError("saving reference statistics (--save-ref) needs data images (--data)")
    pipe = model if isinstance(model, MDMPipeline) else MDMPipeline.from_pretrained(model, device=device or "cpu")
    config, m = pipe.config, pipe.config.model
    sizes = m.level_sizes()
    guidance = config.train.sample_guidance if guidance is None else guidance
    notes: list[str] = []
    use_oracle = not isinstance(oracle, bool) or oracle
    required = reference is not None or save_reference is not None or not (clip is not None or use_oracle)
    wants_fid = data is not None or reference is not None
    extractor = _inception(inception, required, pipe.device, notes) if wants_fid else None
    if extractor is not None and not extractor.is_standard:
        notes.append(f"{extractor.path} is not the standard Inception file: FIDs are not comparable with papers'")
    ref = Statistics.load(reference) if reference is not None else None
    source = _open_data(data, config, num, m.text_dim > 0) if extractor is not None or m.text_dim else None
    n_data = min(num, len(source)) if source is not None else 0
    conditions = _conditions(config, source, num, data)
    clip_prompts = _clip_prompts(config, conditions) if clip is not None else []
    scorer = load_clip(clip, pipe.device) if clip is not None else None
    judge, requested, real = None, None, None
    if use_oracle:
        judge = _oracle(oracle, config, oracle_cache, progress, pipe.device)
        real = real_dataset(m.image_size, config.data.shapes, config.data.colors, num)
        requested = _requested_labels(config, conditions, source, real)

    evaluator = PyramidEvaluator(extractor, sizes, reference=ref, keep_features=ref is None)
    nfe = 0
    scores = RunningMean()
    judged = OracleEvaluator(judge) if judge is not None else None
    shown = pipe.progress
    pipe.set_progress_bar_config(disable=True)
    try:
        for batch in rank_batches(num, batch_size, desc="eval", progress=progress):
            kwargs: dict[str, Any] = {"batch_size": len(batch)}
            if "labels" in conditions:
                kwargs = {"class_labels": conditions["labels"][batch.start : batch.stop]}
            elif "prompts" in conditions:
                kwargs = {"prompt": conditions["prompts"][batch.start : batch.stop]}
            out = pipe(
                **kwargs,
                latents=sample_latents(batch, seed, sizes, m.in_channels),
                num_inference_steps=steps,
                guidance_scale=guidance,
                sampler=sampler,
                spacing=spacing,
                output_type="pt",
            )
            nfe = out.nfe
            evaluator.add_generated(out.levels)
            if extractor is not None and batch.start < n_data and ref is None:
                chosen = range(batch.start, min(batch.stop, n_data))
                evaluator.add_data(torch.stack([source[_spread(i, n_data, len(source))]["image"] for i in chosen]))
            if scorer is not None:
                scores.update(scorer(out.images, clip_prompts[batch.start : batch.stop]))
            if judged is not None:
                wanted = None if requested is None else torch.tensor(requested[batch.start : batch.stop])
                judged.add_generated(out.images, wanted)
                judged.add_real(*render(real, batch), 0)
                judged.add_real(*render(real, range(num + batch.start, num + batch.stop)), 1)
    finally:
        pipe.set_progress_bar_config(disable=not shown)

    levels = evaluator.results()
    if save_reference is not None:
        top = evaluator.data_statistics()[0]
        if rank_world()[0] == 0:
            top.save(save_reference)
    clip_score = float(scores.compute()) if scorer is not None else None
    settings: dict[str, Any] = {
        "model": None if isinstance(model, MDMPipeline) else str(model),
        "num": num,
        "level_sizes": sizes,
        "steps": steps,
        "sampler": sampler or config.diffusion.sampler,
        "spacing": spacing or config.diffusion.spacing,
        "nfe": nfe,
        "guidance": guidance,
        "seed": seed,
        "batch_size": batch_size,
        "world_size": rank_world()[1],
        "data": data,
        "num_data": n_data if extractor is not None and ref is None else 0,
        "reference": None if reference is None else str(reference),
        "reference_n": None if ref is None else ref.n,
        "inception": None if extractor is None else str(extractor.path),
        "inception_sha256": None if extractor is None else extractor.sha256,
        "clip": None if clip is None else str(clip),
        "oracle": None if judge is None else _describe(judge),
    }
    return EvalReport(
        settings=settings,
        levels=levels,
        clip_score=clip_score,
        oracle=judged.results() if judged is not None else None,
        conditions=conditions,
        notes=notes,
    )


def _describe(judge: Classifier) -> dict[str, Any] | str:
    """How the oracle was made (its spec and held-out accuracy), for the report."""
    spec = getattr(judge, "spec", None)
    if spec is None:
        return type(judge).__name__
    return {**asdict(spec), "accuracy": getattr(judge, "accuracy", None)}
