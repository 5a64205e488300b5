"""Per-level evaluation of generated pyramids: FID and KID of each level against the data pooled to that level (or
the top level against saved reference statistics) and cross-level consistency PSNR; a printable table; and
`evaluate_model`, the sampling loop behind `mdm eval` (CLIP score and the shapes oracle included).

Video models are measured the same way frame by frame: a level's FID / KID is over its frames (folded into the
batch, `eval.video.PerFrame`) against the data's frames taken to that level by the model's pyramid; levels of
several frames also get their temporal consistency (`eval.video.temporal_psnr`) next to the data's, and the built-in
moving shapes the motion oracle (`eval.motion_oracle`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
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
from mdm.data.moving_shapes import MovingShapesDataset
from mdm.data.shapes import ShapesDataset
from mdm.diffusion.process import LevelShape, Pyramid
from mdm.diffusion.samplers import per_sample_noise
from mdm.distributed import barrier, rank_world, reduce_to_cpu
from mdm.eval.accumulate import FeatureAccumulator, RunningMean, rank_batches
from mdm.eval.clip_score import load_clip
from mdm.eval.features import INCEPTION_ENV, FeatureExtractor, InceptionFeatures, load_inception
from mdm.eval.frechet import Statistics, frechet_distance
from mdm.eval.kid import kid
from mdm.eval.levels import consistency_mse, level_shapes, pool_levels, psnr
from mdm.eval.motion_oracle import (
    MotionOracleEvaluator,
    MotionOracleResult,
    load_or_train_motion_oracle,
    motion_oracle_spec,
    real_clips,
    render_clips,
)
from mdm.eval.oracle import (
    REAL_SEED,
    Classifier,
    OracleEvaluator,
    OracleResult,
    load_or_train_oracle,
    oracle_spec,
    real_dataset,
    render,
)
from mdm.eval.video import PerFrame, temporal_psnr
from mdm.pipeline import MDMPipeline


@dataclass(frozen=True)
class LevelResult:
    """One level's metrics (None where not measured). `psnr`: dB between it and the pooled top level, on [0, 1].
    Clips: FID / KID are over frames; `temporal_psnr` is the mean PSNR of consecutive frames of the generated clips
    and `data_temporal_psnr` that of the data's clips at this level."""

    level: int
    size: int
    num_generated: int
    fid: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    psnr: float | None = None
    frames: int = 1
    temporal_psnr: float | None = None
    data_temporal_psnr: float | None = None


class PyramidEvaluator:
    """Accumulates generated pyramids and data images batch by batch, on every rank; `results()` is collective.

    `sizes` are the level sides, or (frames, side) for a video model's clips (N C T H W levels, taken down with
    `temporal_downsample`); clips are featurised frame by frame and their levels of several frames measured for
    temporal consistency. Without a feature extractor it measures consistency only (no FID / KID)."""

    def __init__(
        self,
        extractor: FeatureExtractor | None,
        sizes: list[LevelShape],
        reference: Statistics | None = None,
        keep_features: bool = True,
        temporal_downsample: str = "first",
    ) -> None:
        self.sizes = list(sizes)
        self.shapes = [(1, s) if isinstance(s, int) else tuple(s) for s in self.sizes]
        self.video = not isinstance(self.sizes[0], int)
        self.how = temporal_downsample
        self.reference = reference
        self.has_features = extractor is not None
        per_level = self.sizes if extractor is not None else []
        frames = PerFrame(extractor) if self.video and extractor is not None else extractor
        self.generated = [FeatureAccumulator(frames, keep_features) for _ in per_level]
        self.data = [FeatureAccumulator(frames, keep_features) for _ in per_level]
        self.mse = RunningMean((len(self.sizes) - 1,))
        self.temporal = [(RunningMean(), RunningMean()) for _ in self.sizes]  # (generated, data) per level
        self.count = 0

    def add_generated(self, pyramid: Pyramid) -> None:
        """One batch of generated pyramids (highest level first, [-1, 1])."""
        if level_shapes(pyramid) != self.shapes or (pyramid[0].dim() == 5) != self.video:
            got = [tuple(lv.shape[1:]) for lv in pyramid]
            raise ValueError(f"expected levels of sizes {self.sizes}, got levels of shapes {got}")
        if self.has_features:
            for acc, level in zip(self.generated, pyramid, strict=True):
                acc.update(level)
        if len(self.sizes) > 1:
            self.mse.update(consistency_mse(pyramid, self.how))
        self._add_temporal(pyramid, 0)
        self.count += pyramid[0].shape[0]

    def add_data(self, images: torch.Tensor) -> None:
        """One batch of data images (clips) at the top level, taken to every level by the model's pyramid."""
        if self.reference is not None:
            raise ValueError("data images and reference statistics are alternatives: give one")
        levels = pool_levels(images, self.sizes, self.how)
        if self.has_features:
            for acc, level in zip(self.data, levels, strict=True):
                acc.update(level)
        self._add_temporal(levels, 1)

    def _add_temporal(self, pyramid: Pyramid, which: int) -> None:
        """Temporal PSNR of every level of several frames into the generated (0) or data (1) means."""
        for means, level in zip(self.temporal, pyramid, strict=True):
            if level.dim() == 5 and level.shape[2] > 1:
                means[which].update(temporal_psnr(level))

    def data_statistics(self) -> list[Statistics]:
        """The data's statistics per level (collective), e.g. to save the top level as a reusable reference."""
        return [acc.statistics() for acc in self.data]

    def results(self, kid_subset_size: int = 1000, kid_subsets: int = 100, seed: int = 0) -> list[LevelResult]:
        """Per-level metrics over all ranks (collective: every rank calls it and gets the same numbers)."""
        has_data = self.has_features and self.data[0].total() > 0
        level_psnr = psnr(self.mse.compute()).tolist() if len(self.sizes) > 1 else []
        total = int(reduce_to_cpu(torch.tensor([self.count])))
        temporal = [[_finite(m.compute()) for m in pair] for pair in self.temporal]
        results = []
        for i, (frames, size) in enumerate(self.shapes):
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
                    frames=frames,
                    temporal_psnr=temporal[i][0],
                    data_temporal_psnr=temporal[i][1],
                )
            )
        return results


def _finite(value: torch.Tensor) -> float | None:
    """A mean as a float, None where nothing was measured (NaN)."""
    return None if torch.isnan(value).item() else float(value)


def format_table(results: list[LevelResult]) -> str:
    """A fixed-width table, one row per level: size, samples, FID, KID x 1e3 (± std), PSNR to the pooled top; video
    levels also their frames and the temporal PSNR of generated / data clips."""

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    video = any(r.frames > 1 for r in results)
    head = f"{'level':>5} {'frames':>6} {'size':>5}" if video else f"{'level':>5} {'size':>5}"
    rows = [
        f"{head} {'n':>7} {'FID':>10} {'KIDx1e3':>18} {'PSNR dB':>8}" + (f" {'tPSNR gen/data':>15}" if video else "")
    ]
    for r in results:
        kid_text = "-" if r.kid is None else f"{r.kid * 1e3:.3f} ± {(r.kid_std or 0) * 1e3:.3f}"
        first = f"{r.level:>5} {r.frames:>6} {r.size:>5}" if video else f"{r.level:>5} {r.size:>5}"
        row = f"{first} {r.num_generated:>7} {cell(r.fid, '.3f'):>10} {kid_text:>18} {cell(r.psnr, '.2f'):>8}"
        if video:
            row += f" {cell(r.temporal_psnr, '.2f') + ' / ' + cell(r.data_temporal_psnr, '.2f'):>15}"
        rows.append(row)
    return "\n".join(rows)


def item_generators(indices: Sequence[int], seed: int) -> list[torch.Generator]:
    """One generator per sample of `indices`, seeded by (seed, index): a sample's starting and step noise are the
    same whatever batch or rank draws it."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    states = [np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> 1 for i in indices]
    return [torch.Generator().manual_seed(int(state)) for state in states]


def item_latents(indices: Sequence[int], seed: int, shapes: list[tuple[int, ...]]) -> Pyramid:
    """Starting noise of samples `indices` for levels of one-sample `shapes` (C, H, W) or (C, T, H, W), highest
    level first, from `item_generators`: what `evaluate_model` starts each sample from."""
    return per_sample_noise(item_generators(indices, seed), shapes)


def sample_latents(indices: Sequence[int], seed: int, sizes: list[int], channels: int) -> Pyramid:
    """:func:`item_latents` of square images of `sizes` with `channels` channels."""
    return item_latents(indices, seed, [(channels, size, size) for size in sizes])


@dataclass
class EvalReport:
    """What `evaluate_model` measured and how: its settings, per-level metrics, CLIP score, oracle scores (the shapes
    oracle's, or the motion oracle's for clips), the condition of every sample (`labels` or `prompts`, by global
    index) and notes on what was skipped."""

    settings: dict[str, Any]
    levels: list[LevelResult]
    clip_score: float | None = None
    oracle: OracleResult | MotionOracleResult | None = None
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
            lines.append(_oracle_line(self.oracle))
            lines += _breakdown_lines(self.oracle)
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _oracle_line(o: OracleResult | MotionOracleResult) -> str:
    """The oracle scores in one line, next to the real-versus-real floor and the oracle's accuracy on real data."""
    if isinstance(o, MotionOracleResult):
        return (
            f"motion oracle: class accuracy {_percent(o.class_accuracy)}, motion accuracy "
            f"{_percent(o.motion_accuracy)}, FD {o.fd:.4f} (real-vs-real floor {o.floor:.4f}), on real clips "
            f"{_percent(o.real_class_accuracy)} / {_percent(o.real_motion_accuracy)}"
        )
    return (
        f"oracle: accuracy {_percent(o.accuracy)}, FD {o.fd:.4f} (real-vs-real floor {o.floor:.4f}), "
        f"accuracy on real images {_percent(o.real_accuracy)}"
    )


def _breakdown_lines(o: OracleResult | MotionOracleResult) -> list[str]:
    """The oracle accuracy per requested class (and motion), one line each, when it was measured."""
    kinds = [("class", o.per_class)] + ([("motion", o.per_motion)] if isinstance(o, MotionOracleResult) else [])
    return [f"  per requested {kind}: {b.line()}" for kind, b in kinds if b is not None]


def _spread(i: int, n: int, length: int) -> int:
    """Dataset index of reference item i of n spread evenly over `length` items (class folders are sorted)."""
    return (i % n) * length // n


BUILT_IN = {"shapes": False, "moving_shapes": True}  # the built-in datasets and whether they give clips


def _open_data(spec: str | None, config: MDMConfig, num: int, need_captions: bool) -> Dataset:
    """The reference images or clips and prompt source: 'shapes' / 'moving_shapes' (held-out built-in scenes of the
    model's vocabulary at its shape), an image or clip folder or tar shards, or (None) the data the config names."""
    m, d = config.model, config.data
    name = d.dataset if spec is None else spec
    if name in BUILT_IN and BUILT_IN[name] != m.is_video():
        wanted = "clips: 'moving_shapes' or a clip folder" if m.is_video() else "images: 'shapes' or an image folder"
        raise ValueError(
            f"data {name!r} does not fit this model (model.num_frames = {m.num_frames}): it is measured on {wanted}"
        )
    if name == "shapes":
        return ShapesDataset(m.image_size, num, d.shapes, d.colors, seed=REAL_SEED)
    if name == "moving_shapes":
        return MovingShapesDataset(m.image_size, m.num_frames, num, d.shapes, d.colors, d.motions, seed=REAL_SEED)
    if spec is not None:
        kind = "video_folder" if m.is_video() else "folder" if is_image_folder(Path(spec)) else "shards"
        d = DataConfig(dataset=kind, path=spec)
    return build_dataset(d, m.image_size, need_captions, m.num_frames)


def _pixels(item: dict) -> torch.Tensor:
    """A dataset item's image (3, H, W) or clip (3, T, H, W)."""
    return item["video" if "video" in item else "image"]


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
    config: MDMConfig, conditions: dict[str, list], source: Dataset | None, real: ShapesDataset | MovingShapesDataset
) -> list | None:
    """The label each sample was asked for (class models: its class; text models: its caption's scene, as [class,
    motion] for clips); None for an unconditional model or a class model of clips (it asks for no motion). Errors
    when the model's classes are not the oracle's."""
    m, video = config.model, isinstance(real, MovingShapesDataset)
    if "labels" in conditions:
        if (m.class_names or real.class_names) != real.class_names or m.num_classes != real.num_classes:
            raise ValueError(
                f"the oracle classifies {real.class_names} (config data.shapes x data.colors); the model's "
                f"classes are {m.class_names or m.num_classes}"
            )
        return None if video else conditions["labels"]
    if "prompts" in conditions:
        if not isinstance(source, type(real)):
            builtin = "moving_shapes" if video else "shapes"
            raise ValueError(f"the oracle scores a text model on the built-in captions: use --data {builtin}")
        n = len(conditions["prompts"])
        scenes = [source.scene(_spread(i, min(n, len(source)), len(source))) for i in range(n)]
        return [[c.label, c.motion_label] for c in scenes] if video else [c.label for c in scenes]
    return None


def _oracle(
    given: bool | Classifier, spec: Any, keys: tuple[str, ...], load: Callable[[bool], Classifier]
) -> Classifier:
    """The `given` oracle (its spec checked against the model's `spec` on `keys`), or the cached one `load(show)`
    returns: rank 0 trains it if needed (`show`: its progress bar), the other ranks then read it."""
    if not isinstance(given, bool):
        have = getattr(given, "spec", None)
        if have is not None and _spec_text(have, keys) != _spec_text(spec, keys):
            raise ValueError(
                f"the oracle was trained for {_spec_text(have, keys)}; the model makes {_spec_text(spec, keys)}"
            )
        return given
    rank, _ = rank_world()
    found = load(True) if rank == 0 else None
    barrier()
    return found if rank == 0 else load(False)


def _spec_text(spec: Any, keys: tuple[str, ...]) -> str:
    """An oracle spec's identifying fields as the config names them (model.image_size, data.shapes, ...)."""
    config_key = {"size": "model.image_size", "num_frames": "model.num_frames"}
    values = {k: list(v) if isinstance(v, tuple) else v for k in keys for v in [getattr(spec, k)]}
    return ", ".join(f"{config_key.get(k, 'data.' + k)} = {v}" for k, v in values.items())


@dataclass
class _Judging:
    """An oracle at work: the oracle, its evaluator, what each sample asked for (None: nothing), and the real sets
    A (items [0, num)) and B (the floor, [num, 2 num)) rendered with `render`."""

    oracle: Classifier
    evaluator: OracleEvaluator
    requested: list | None
    real: Dataset
    render: Callable[[Any, range], tuple[torch.Tensor, torch.Tensor]]

    def add(self, generated: torch.Tensor, batch: range, num: int) -> None:
        """Generated samples of global indices `batch` and the real items of both sets at those indices."""
        wanted = None if self.requested is None else torch.tensor(self.requested[batch.start : batch.stop])
        self.evaluator.add_generated(generated, wanted)
        self.evaluator.add_real(*self.render(self.real, batch), 0)
        self.evaluator.add_real(*self.render(self.real, range(num + batch.start, num + batch.stop)), 1)


def _judging(
    given: bool | Classifier,
    config: MDMConfig,
    conditions: dict[str, list],
    source: Dataset | None,
    num: int,
    cache: str | os.PathLike | None,
    progress: bool,
    device: torch.device,
) -> _Judging:
    """The shapes oracle of the model's size and vocabulary, or for clips the motion oracle of its frames too."""
    m, d = config.model, config.data
    if m.is_video():
        spec = motion_oracle_spec(m.image_size, m.num_frames, d.shapes, d.colors, d.motions)
        keys = ("size", "num_frames", "shapes", "colors", "motions")
        judge = _oracle(
            given, spec, keys, lambda show: load_or_train_motion_oracle(spec, cache, progress and show, device)
        )
        real = real_clips(m.image_size, m.num_frames, d.shapes, d.colors, d.motions, num)
        requested = _requested_labels(config, conditions, source, real)
        evaluator = MotionOracleEvaluator(judge, real.class_names, real.motion_names)
        return _Judging(judge, evaluator, requested, real, render_clips)
    spec = oracle_spec(m.image_size, d.shapes, d.colors)

    def load(show: bool) -> Classifier:
        return load_or_train_oracle(
            spec.size, d.shapes, d.colors, cache_dir=cache, progress=progress and show, device=device
        )

    judge = _oracle(given, spec, ("size", "shapes", "colors"), load)
    real = real_dataset(m.image_size, d.shapes, d.colors, num)
    evaluator = OracleEvaluator(judge, label_names=[real.class_names])
    return _Judging(judge, evaluator, _requested_labels(config, conditions, source, real), real, render)


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
    level_projection: bool | None = None,
    eta: float | None = None,
    guided_levels: str | None = None,
    guidance_interval: tuple[float, float] | None = None,
    seed: int = 0,
    save_reference: str | os.PathLike | None = None,
    oracle_cache: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> EvalReport:
    """Generate `num` samples (`sampler` over `steps` steps of `spacing`, with `level_projection`, DDIM's `eta`,
    `guided_levels` and `guidance_interval`, default the model's; every rank its share) and measure them
    (collective).

    `data` ('shapes', an image folder or tar shards; for a video model 'moving_shapes' or a clip folder) gives per-level
    FID / KID against the data pooled to each level (clips: over frames, with the temporal consistency of generated
    and data clips); `reference` (.npz statistics) gives the top level's FID. Inception: `inception`, else
    $MDM_INCEPTION_PATH; it may be absent only when there is no `reference` to compare with and another metric
    (`clip`, `oracle`) is asked for.
    Class models sample labels round-robin over the classes; text models use the data's captions (`data`, else the
    data the model's config names). CLIP prompts: the captions, or a class model's class names (of the top level's
    first frame for clips). `oracle`: True for the cached shapes oracle of the model's size and vocabulary (the
    motion oracle of its clips for a video model), or an oracle to use. `guidance` defaults to the
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
    sizes, video = m.level_sizes(), m.is_video()
    guidance = config.train.sample_guidance if guidance is None else guidance
    notes: list[str] = []
    use_oracle = not isinstance(oracle, bool) or oracle
    required = reference is not None or save_reference is not None or not (clip is not None or use_oracle)
    wants_fid = data is not None or reference is not None
    extractor = _inception(inception, required, pipe.device, notes) if wants_fid else None
    if extractor is not None and not extractor.is_standard:
        notes.append(f"{extractor.path} is not the standard Inception file: FIDs are not comparable with papers'")
    ref = Statistics.load(reference) if reference is not None else None
    with_data = ref is None and (extractor is not None or (video and data is not None))
    source = _open_data(data, config, num, m.text_dim > 0) if with_data or m.text_dim else None
    n_data = min(num, len(source)) if with_data else 0
    conditions = _conditions(config, source, num, data)
    clip_prompts = _clip_prompts(config, conditions) if clip is not None else []
    scorer = load_clip(clip, pipe.device) if clip is not None else None
    judged = None
    if use_oracle:
        judged = _judging(oracle, config, conditions, source, num, oracle_cache, progress, pipe.device)
        if judged.requested is None and conditions:
            notes.append("oracle accuracies not measured: a class model of clips asks for no motion (FD only)")

    shapes = m.level_shapes() if video else sizes
    evaluator = PyramidEvaluator(extractor, shapes, ref, ref is None, config.diffusion.temporal_downsample)
    nfe = 0
    scores = RunningMean()
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
                generator=item_generators(batch, seed),
                num_inference_steps=steps,
                guidance_scale=guidance,
                sampler=sampler,
                spacing=spacing,
                level_projection=level_projection,
                eta=eta,
                guided_levels=guided_levels,
                guidance_interval=guidance_interval,
                output_type="pt",
            )
            nfe = out.nfe
            evaluator.add_generated(out.levels)
            if batch.start < n_data:
                chosen = range(batch.start, min(batch.stop, n_data))
                evaluator.add_data(torch.stack([_pixels(source[_spread(i, n_data, len(source))]) for i in chosen]))
            if scorer is not None:
                first = out.images[:, :, 0] if video else out.images
                scores.update(scorer(first, clip_prompts[batch.start : batch.stop]))
            if judged is not None:
                judged.add(out.images, batch, num)
    finally:
        pipe.set_progress_bar_config(disable=not shown)

    levels = evaluator.results()
    if save_reference is not None:
        top = evaluator.data_statistics()[0]
        if rank_world()[0] == 0:
            top.save(save_reference)
    clip_score = float(scores.compute()) if scorer is not None else None
    chosen = pipe.settle(
        guidance,
        guidance_interval=guidance_interval,
        sampler=sampler,
        spacing=spacing,
        eta=eta,
        level_projection=level_projection,
        guided_levels=guided_levels,
    )
    settings: dict[str, Any] = {
        "model": None if isinstance(model, MDMPipeline) else str(model),
        "num": num,
        "level_sizes": sizes,
        **({"level_shapes": [list(s) for s in shapes]} if video else {}),
        "steps": steps,
        "sampler": chosen.sampler,
        "spacing": chosen.spacing,
        "eta": chosen.eta,
        "level_projection": chosen.level_projection,
        "nfe": nfe,
        "guidance": guidance,
        "guidance_level_scales": chosen.guidance.scales(pipe.diffusion.num_levels),
        "guidance_interval": _json_interval(chosen.guidance.interval),
        "seed": seed,
        "batch_size": batch_size,
        "world_size": rank_world()[1],
        "data": data,
        "num_data": n_data,
        "reference": None if reference is None else str(reference),
        "reference_n": None if ref is None else ref.n,
        "inception": None if extractor is None else str(extractor.path),
        "inception_sha256": None if extractor is None else extractor.sha256,
        "clip": None if clip is None else str(clip),
        "oracle": None if judged is None else _describe(judged.oracle),
    }
    return EvalReport(
        settings=settings,
        levels=levels,
        clip_score=clip_score,
        oracle=judged.evaluator.results() if judged is not None else None,
        conditions=conditions,
        notes=notes,
    )


def _json_interval(interval: tuple[float, float] | None) -> list[float | None] | None:
    """A guidance interval for the JSON report: an open end (+-inf) as null, which strict JSON readers accept."""
    return None if interval is None else [v if math.isfinite(v) else None for v in interval]


def _describe(judge: Classifier) -> dict[str, Any] | str:
    """How the oracle was made (its spec and held-out accuracy), for the report."""
    spec = getattr(judge, "spec", None)
    if spec is None:
        return type(judge).__name__
    return {**asdict(spec), "accuracy": getattr(judge, "accuracy", None)}
