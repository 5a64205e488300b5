"""The `mdm` command: a thin layer over the Python API (`mdm convert`, `mdm sample`, `mdm demo`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import get_args

import torch

from mdm import io
from mdm.clip_grids import FPS, grid_clip, save_samples, strips
from mdm.config import ConfigError, MDMConfig, list_presets, load_config, load_preset
from mdm.config.schema import GuidedLevels
from mdm.diffusion.samplers import SAMPLERS
from mdm.diffusion.schedule import SPACINGS
from mdm.images import level_strip, sample_grid, save_png, to_pil
from mdm.train.checkpoint import NonFiniteWeightsError, TrainingError
from mdm.videos import save_gif

DTYPES = ("float32", "float64", "bfloat16")  # the dtypes a model may be converted to or sampled in


def _convert(args: argparse.Namespace) -> int:
    from mdm.interop import mlmdm

    pipe = mlmdm.load(
        args.checkpoint,
        args.config,
        text_encoder=args.text_encoder,
        text_dim=args.text_dim,
        as_parsed=args.as_parsed,
        dtype=io.dtype(args.dtype),
    )
    out = pipe.save_pretrained(args.out)
    n = sum(p.numel() for p in pipe.unet.parameters())
    print(f"converted {args.checkpoint} ({n / 1e6:.1f}M parameters, levels {pipe.config.model.level_sizes()}) -> {out}")
    return 0


def _read_embeds(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    data, _ = io.read_safetensors(path)
    if "text" not in data:
        raise ValueError(f"{path}: expected tensors 'text' (B, S, D) and optional 'mask' (B, S)")
    return data["text"], data.get("mask")


def write_samples(levels: list[torch.Tensor], out: Path, prefix: str, titles: list[str]) -> list[Path]:
    """One PNG per sample with every level side by side (highest first)."""
    paths = []
    for i, (strip, title) in enumerate(zip(level_strip(levels), titles, strict=True)):
        paths.append(save_png(strip, out / f"{prefix}{i:03d}_{title}.png"))
    return paths


def write_clips(levels: list[torch.Tensor], out: Path, titles: list[str], slugs: list[str]) -> list[Path]:
    """Per sample clip: an animated GIF with every level side by side (and an MP4 with the extra `video`) and a
    PNG strip of every level's frames (`clip_grids.save_samples`)."""
    paths = []
    for i, (title, slug) in enumerate(zip(titles, slugs, strict=True)):
        paths += save_samples([lv[i : i + 1] for lv in levels], [title], out / f"{i:03d}_{slug}", 1, mp4=True)
    return paths


def write_plain(levels: list[torch.Tensor], out: Path) -> None:
    """Unlabelled files for external tools: the top level in `out/plain/`, every level in `out/level_<size>/`
    (`level_<frames>x<size>/`): PNGs of images, GIFs of clips."""
    for k, level in enumerate(levels):
        video = level.dim() == 5
        name = f"level_{level.shape[2]}x{level.shape[-1]}" if video else f"level_{level.shape[-1]}"
        folders = [out / "plain", out / name] if k == 0 else [out / name]
        for i in range(level.shape[0]):
            for folder in folders:
                if video:
                    save_gif(level[i], folder / f"{i:05d}.gif", FPS)
                else:
                    save_png(to_pil(level[i : i + 1])[0], folder / f"{i:05d}.png")


def _slug(text: str, limit: int = 60) -> str:
    """A file-name-safe short form of a prompt."""
    return "".join(c if c.isalnum() else "-" for c in text[:limit]).strip("-") or "empty"


def _sample(args: argparse.Namespace) -> int:
    import dataclasses

    from mdm.pipeline import MDMPipeline
    from mdm.text.encoders import load_text_encoder

    pipe = MDMPipeline.from_pretrained(args.model, dtype=io.dtype(args.dtype))
    if args.text_encoder is not None:
        text = dataclasses.replace(pipe.config.text, encoder=pipe.config.text.encoder or "t5", path=args.text_encoder)
        pipe.text_encoder = load_text_encoder(text, pipe.device)
    pipe.set_progress_bar_config(disable=args.quiet)
    request: dict = {}
    if args.labels is not None:
        request["class_labels"] = [int(x) if x.lstrip("-").isdigit() else x for x in args.labels]
    elif args.prompt is not None:
        request["prompt"] = args.prompt
        if args.negative_prompt is not None:
            request["negative_prompt"] = args.negative_prompt
    elif args.prompt_embeds is not None:
        request["prompt_embeds"], request["prompt_mask"] = _read_embeds(args.prompt_embeds)
        if args.negative_embeds is not None:
            request["negative_prompt_embeds"], request["negative_prompt_mask"] = _read_embeds(args.negative_embeds)
    out = pipe(
        **request,
        num_images_per_prompt=args.num,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        sampler=args.sampler,
        spacing=args.spacing,
        guidance_interval=args.guidance_interval,
        eta=args.eta,
        guided_levels=args.guided_levels,
        thresholding=args.thresholding,
        level_projection=args.level_projection,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
    )
    slugs = [_slug(t) for t in out.titles]
    if out.videos is not None:
        paths = write_clips(out.levels, Path(args.out), out.titles, slugs)
    else:
        paths = write_samples(out.levels, Path(args.out), "", slugs)
    if args.plain:
        write_plain(out.levels, Path(args.out))
    kinds = ", ".join(sorted({p.suffix[1:].upper() for p in paths}))
    print(f"wrote {len(paths)} file(s) ({kinds}) to {args.out} ({out.nfe} network calls)")
    return 0


def _given_config(args: argparse.Namespace, overrides: list[str]) -> MDMConfig | None:
    """The config of --preset or --config with `overrides`, or None when neither is given."""
    if args.preset and args.config:
        raise ConfigError("give --preset or --config, not both")
    if args.preset:
        return load_preset(args.preset, overrides)
    if args.config:
        return load_config(args.config, overrides)
    return None


def _load_run_config(args: argparse.Namespace) -> MDMConfig:
    """--preset / --config with --set overrides; on --resume without either, the run directory's config."""
    overrides = list(args.set or [])
    if args.init_inner_from:
        overrides.append(f"train.init_inner_from={args.init_inner_from}")
    cfg = _given_config(args, overrides)
    if cfg is not None:
        return cfg
    saved = Path(args.out) / "config.yaml"
    if args.resume and saved.is_file():
        return load_config(saved, overrides)
    if args.resume:
        raise ConfigError(f"no run at {args.out} ({saved} is missing); give --out RUN_DIR, --preset or --config")
    raise ConfigError(f"give --preset NAME (one of {', '.join(list_presets())}) or --config FILE")


def _train(args: argparse.Namespace) -> int:
    from mdm.train.trainer import Trainer

    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ConfigError(f"--max-minutes must be > 0, got {args.max_minutes}")
    cfg = _load_run_config(args)
    trainer = Trainer(cfg, args.out, resume=args.resume, device=args.device, progress=not args.quiet)
    try:
        seconds = None if args.max_minutes is None else 60 * args.max_minutes
        final = trainer.fit(max_steps=args.max_steps, max_seconds=seconds)
    finally:
        from mdm.distributed import cleanup

        cleanup()
    if trainer.env.is_main:
        if final is None:
            print(f"stopped at step {trainer.state.step}; continue with: mdm train --out {args.out} --resume latest")
        else:
            out = Path(args.out)
            print(f"trained model: {final}\nsamples: {out / 'samples'}\nloss curve: {out / 'loss.png'}")
    return 0


def _demo_request(cfg: MDMConfig, per_class: int) -> dict:
    """What the demo samples: every class `per_class` times, or captions of unseen scenes (`per_class` per class),
    or of unseen clips (`per_class` per motion, in motion order)."""
    from mdm.data.moving_shapes import MovingShapesDataset
    from mdm.data.shapes import ShapesDataset

    m, d = cfg.model, cfg.data
    if m.num_classes:
        return {"class_labels": [name for name in m.class_names for _ in range(per_class)]}
    size, n, seed = m.image_size, d.num_samples, d.seed + 1
    if m.is_video():
        clips = MovingShapesDataset(size, m.num_frames, n, d.shapes, d.colors, d.motions, seed)
        return {"prompt": clips.motion_prompts(per_class)}
    return {"prompt": ShapesDataset(size, n, d.shapes, d.colors, seed=seed).prompts(per_class)}


def _demo(args: argparse.Namespace) -> int:
    from mdm.distributed import cleanup
    from mdm.pipeline import MDMPipeline
    from mdm.train.trainer import Trainer

    out = Path(args.out)
    cfg = load_preset(args.preset, list(args.set or []))
    if cfg.data.dataset not in ("shapes", "moving_shapes"):
        raise ConfigError(f"mdm demo: preset {args.preset!r} does not train on the built-in shapes or moving shapes")
    trainer = Trainer(cfg, out, resume="latest" if (out / "checkpoints" / "latest").exists() else None)
    try:
        final = trainer.fit()
    finally:
        cleanup()
    if not trainer.env.is_main:
        return 0
    pipe = MDMPipeline.from_pretrained(final)
    video = pipe.config.model.is_video()
    per_class = args.per_class or (2 if video else 4)
    result = pipe(
        **_demo_request(pipe.config, per_class),
        num_inference_steps=args.steps,
        guidance_scale=pipe.config.train.sample_guidance if args.guidance is None else args.guidance,
        output_type="pt",
        generator=torch.Generator().manual_seed(args.seed),
    )
    stem = out / "demo_samples"
    if video:
        first = [lv[::per_class] for lv in result.levels]  # one clip per motion in the frame strips
        written = [save_gif(grid_clip(result.levels, result.titles, per_class), stem.with_suffix(".gif"), FPS)]
        written.append(save_png(strips(first, result.titles[::per_class]), stem.with_suffix(".png")))
        what = "captions of unseen clips, per motion"
    else:
        written = [save_png(sample_grid(result.levels, result.titles, ncols=2 * per_class), stem.with_suffix(".png"))]
        what = "every class" if pipe.config.model.num_classes else "captions of unseen scenes, per class"
    files = " and ".join(map(str, written))
    print(f"trained demo model: {final}\nsamples ({what}, all levels): {files}\nloss curve: {out / 'loss.png'}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from mdm.data.check import check_data

    report = check_data(
        args.path,
        min_size=args.min_size,
        max_pixels=args.max_pixels,
        progress=not args.quiet,
        num_frames=args.num_frames,
        frame_stride=args.frame_stride,
    )
    print("\n".join(report.lines()))
    return 1 if report.problems else 0


def _data_embed(args: argparse.Namespace) -> int:
    from mdm.data.loader import build_dataset, dataset_captions
    from mdm.text.cache import write_cache
    from mdm.text.encoders import build_encoder

    cfg = _given_config(args, list(args.set or []))
    if cfg is None:
        raise ConfigError("give --preset NAME or --config FILE (the data and text encoder to use)")
    if cfg.text.encoder is None:
        raise ConfigError("text.encoder is unset: the config has no text encoder to precompute")
    out = args.out or cfg.text.cache
    if out is None:
        raise ConfigError("give --out DIR (or set text.cache in the config)")
    dataset = build_dataset(cfg.data, cfg.model.image_size, need_captions=True, num_frames=cfg.model.num_frames)
    captions = dataset_captions(dataset)
    encoder = build_encoder(cfg.text)
    if args.device:
        encoder.to(args.device)
    write_cache(encoder, captions, out, args.batch_size, args.dtype, progress=not args.quiet)
    print(f"cached the features of {len(set(captions)) + 1} caption(s) at {out}; train with --set text.cache={out}")
    return 0


def _data_pack(args: argparse.Namespace) -> int:
    from mdm.data.shards import pack

    shards = pack(args.folder, args.out, args.shard_size)
    print(f"wrote {len(shards)} shard(s) to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mdm.distributed import cleanup, setup
    from mdm.eval.evaluate import evaluate_model

    env = setup(args.device)
    try:
        report = evaluate_model(
            args.model,
            args.num,
            data=args.data,
            reference=args.ref,
            inception=args.inception,
            clip=args.clip,
            oracle=args.oracle,
            batch_size=args.batch_size,
            steps=args.steps,
            guidance=args.guidance,
            sampler=args.sampler,
            spacing=args.spacing,
            level_projection=args.level_projection,
            eta=args.eta,
            guided_levels=args.guided_levels,
            guidance_interval=args.guidance_interval,
            seed=args.seed,
            save_reference=args.save_ref,
            device=env.device,
            progress=not args.quiet,
        )
    finally:
        cleanup()
    if env.is_main:
        print(report.table())
        print(f"results: {report.save(args.out)}")
        if args.save_ref:
            print(f"reference statistics: {args.save_ref}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from mdm.app import serve

    serve(args.model, host=args.host, port=args.port, share=args.share, concurrency=args.concurrency)
    return 0


def _level_projection_flag(parser: argparse.ArgumentParser) -> None:
    """--level-projection / --no-level-projection, default the model's diffusion.level_projection."""
    parser.add_argument(
        "--level-projection",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make every level's x0 agree with the level below while sampling (default: diffusion.level_projection)",
    )


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--eta, --guided-levels and --guidance-interval, default the model's diffusion.eta, .guided_levels and
    .guidance_interval."""
    parser.add_argument("--eta", type=float, default=None, help="DDIM's noise level, >= 0 (default: diffusion.eta)")
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="guide only where the lowest level's logSNR is in [LO, HI], finite numbers (-inf reads as an option), "
        "e.g. -100 5 for no lower bound or -100 100 for every step (default: diffusion.guidance_interval)",
    )
    parser.add_argument(
        "--guided-levels",
        choices=get_args(GuidedLevels),
        default=None,
        help="levels guidance steers (default: diffusion.guided_levels under level projection, else all)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `mdm` command."""
    p = argparse.ArgumentParser(prog="mdm", description="Matryoshka Diffusion Models")
    p.add_argument("-v", "--verbose", action="store_true", help="log notices")
    sub = p.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="import another project's model")
    conv_sub = conv.add_subparsers(dest="source", required=True)
    ml = conv_sub.add_parser("mlmdm", help="Apple ml-mdm vis_model.pth + model YAML -> mdm model directory")
    ml.add_argument("checkpoint", help="vis_model.pth")
    ml.add_argument("--config", required=True, help="the ml-mdm model YAML (e.g. cc12m_256x256.yaml)")
    ml.add_argument("--out", required=True, help="output model directory")
    ml.add_argument("--text-encoder", default=None, help="text encoder dir or hub id recorded in the config")
    ml.add_argument("--text-dim", type=int, default=None, help="text feature width (default: from checkpoint)")
    ml.add_argument(
        "--as-parsed",
        action="store_true",
        help="drop top-level YAML keys as ml-mdm's parser does (mixed_ratio, multi_res_weights)",
    )
    ml.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ml.set_defaults(func=_convert)

    s = sub.add_parser(
        "sample",
        help="sample a model directory; one PNG per sample, all levels side by side (video: GIF, MP4, frame strip)",
    )
    s.add_argument("--model", required=True, help="model directory (config.yaml + model.safetensors)")
    s.add_argument("--labels", nargs="+", default=None, help="class indices or names, e.g. 3 'red circle'")
    s.add_argument("--prompt", nargs="+", default=None, help="text prompt(s), encoded by the model's text encoder")
    s.add_argument("--negative-prompt", default=None, help="the unconditional branch's prompt (default: empty)")
    s.add_argument("--text-encoder", default=None, help="text encoder dir or hub id (default: from config.yaml)")
    s.add_argument("--prompt-embeds", default=None, help="safetensors with 'text' (B,S,D) and 'mask' (B,S)")
    s.add_argument("--negative-embeds", default=None, help="safetensors with the unconditional text")
    s.add_argument("--num", type=int, default=1, help="images per label / prompt")
    s.add_argument("--steps", type=int, default=50, help="inference steps")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    s.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="default: the model's diffusion.sampler")
    s.add_argument("--spacing", choices=list(SPACINGS), default=None, help="default: the model's diffusion.spacing")
    _level_projection_flag(s)
    _sampling_flags(s)
    s.add_argument("--thresholding", choices=["clip", "dynamic", "dynamic_if", "none"], default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=list(DTYPES), default="float32")
    s.add_argument("--out", default="samples", help="output folder")
    s.add_argument("--plain", action="store_true", help="also write unlabelled images: top level, and level_<size>/")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_sample)

    t = sub.add_parser("train", help="train a model (multi-GPU / multi-node: torchrun ... -m mdm train ...)")
    t.add_argument("--preset", default=None, help=f"shipped preset: {', '.join(list_presets())}")
    t.add_argument("--config", default=None, help="config YAML")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-4")
    t.add_argument("--out", default="runs/train", help="run directory")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    t.add_argument(
        "--init-inner-from",
        default=None,
        help="model directory whose weights seed the inner levels (all of them: fine-tune it)",
    )
    t.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) at this step")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this much training")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: this rank's GPU, else CPU)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    data = sub.add_parser("data", help="inspect training data")
    data_sub = data.add_subparsers(dest="action", required=True)
    chk = data_sub.add_parser("check", help="counts, resolutions, captions and every unusable file (exit 1 if any)")
    chk.add_argument(
        "path", help="image folder, tar shards (.tar, directory, glob, {a..b} pattern) or an ml-mdm index/shard .tsv"
    )
    chk.add_argument("--min-size", type=int, default=0, help="report images whose shorter side is below this")
    chk.add_argument("--max-pixels", type=int, default=89_478_485, help="report images larger than this")
    chk.add_argument("--num-frames", type=int, default=None, help="a video folder: the frames each clip must give")
    chk.add_argument("--frame-stride", type=int, default=1, help="a video folder: keep every k-th frame")
    chk.add_argument("--quiet", action="store_true", help="no progress bar")
    chk.set_defaults(func=_data_check)
    pk = data_sub.add_parser("pack", help="write an image folder as WebDataset tar shards (and classes.txt)")
    pk.add_argument("folder", help="image folder (class subfolders, metadata.jsonl or sidecar .txt captions)")
    pk.add_argument("out", help="output directory for shard-NNNNNN.tar")
    pk.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    pk.set_defaults(func=_data_pack)

    em = data_sub.add_parser("embed", help="precompute the text features of every caption (read via text.cache)")
    em.add_argument("--preset", default=None, help="shipped preset naming the data and text encoder")
    em.add_argument("--config", default=None, help="config YAML naming the data and text encoder")
    em.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    em.add_argument("--out", default=None, help="cache directory (default: the config's text.cache)")
    em.add_argument("--batch-size", type=int, default=64, help="captions per encoder call")
    em.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16", help="stored dtype")
    em.add_argument("--device", default=None, help="where the encoder runs (cpu, cuda)")
    em.add_argument("--quiet", action="store_true", help="no progress bar")
    em.set_defaults(func=_data_embed)

    d = sub.add_parser("demo", help="train a tiny demo model on built-in (moving) shapes and write samples")
    d.add_argument(
        "--preset", default="demo", help="demo (class-conditional), demo-text (captions) or demo-video (clips)"
    )
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a demo config value")
    d.add_argument("--steps", type=int, default=25, help="sampling steps")
    d.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default: train.sample_guidance)"
    )
    d.add_argument("--per-class", type=int, default=None, help="samples per class, or per motion (default 4; video 2)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    ev = sub.add_parser(
        "eval", help="FID / KID per level, cross-level consistency, CLIP score, shapes oracle (torchrun: per rank)"
    )
    ev.add_argument("--model", required=True, help="model directory (config.yaml + model.safetensors)")
    against = ev.add_mutually_exclusive_group(required=True)
    against.add_argument(
        "--data",
        help="'shapes' (built-in, at the model's size) or an image folder / tar shards; video models: "
        "'moving_shapes' or a clip folder (per-frame FID / KID and temporal consistency)",
    )
    against.add_argument("--ref", help="reference statistics .npz (mu, sigma) of the top level, from --save-ref")
    ev.add_argument("--num", type=int, required=True, help="samples to generate (and data images to compare with)")
    ev.add_argument("--batch-size", type=int, default=50, help="samples per sampling call, per process")
    ev.add_argument("--steps", type=int, default=50, help="sampling steps")
    ev.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="default: the model's diffusion.sampler")
    ev.add_argument("--spacing", choices=list(SPACINGS), default=None, help="default: the model's diffusion.spacing")
    ev.add_argument("--guidance", type=float, default=None, help="guidance scale (default: train.sample_guidance)")
    _level_projection_flag(ev)
    _sampling_flags(ev)
    ev.add_argument("--seed", type=int, default=0, help="sample i starts from noise seeded by (seed, i)")
    ev.add_argument("--inception", default=None, help="TorchScript Inception .pt (default: $MDM_INCEPTION_PATH)")
    ev.add_argument("--save-ref", default=None, help="write the data's top-level statistics to this .npz")
    ev.add_argument("--clip", default=None, help="local transformers CLIP directory: CLIP score")
    ev.add_argument(
        "--oracle", action="store_true", help="built-in (moving) shapes: oracle class (and motion) accuracy, FD, floor"
    )
    ev.add_argument("--device", default=None, help="cpu, cuda ... (default: this rank's GPU, else CPU)")
    ev.add_argument("--out", default="eval.json", help="results JSON")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_eval)

    sv = sub.add_parser("serve", help="a local web app: generate and inspect every level (needs the demo extra)")
    sv.add_argument("--model", action="append", required=True, help="model directory (repeat to serve several)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--share", action="store_true", help="also open a public share link (off by default)")
    sv.add_argument("--concurrency", type=int, default=1, help="generations run at once; others queue")
    sv.set_defaults(func=_serve)
    return p


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, TrainingError, NonFiniteWeightsError)
"""What bad input raises (ValueError covers ConfigError, DataError, ModelFileError and KeyMismatchError); anything
else is a bug and surfaces with its traceback."""

OUTPUT_DIRS = {"train": "run directory", "sample": "output folder", "pack": "output directory", "demo": "run directory"}


def _check_out(args: argparse.Namespace) -> None:
    """An --out (or pack's OUT) that names an existing file is refused before any work is done."""
    name = getattr(args, "action", None) if args.command == "data" else args.command
    out = getattr(args, "out", None)
    if name in OUTPUT_DIRS and out is not None and Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory (expected a {OUTPUT_DIRS[name]})")


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit with status 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        _check_out(args)
        return args.func(args)
    except USER_ERRORS as e:
        print(f"mdm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
