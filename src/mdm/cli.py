"""The `mdm` command: a thin layer over the Python API (`mdm convert`, `mdm sample`, `mdm demo`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from mdm.config import ConfigError, load_preset
from mdm.images import level_strip, save_png

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _convert(args: argparse.Namespace) -> int:
    from mdm.interop import mlmdm

    pipe = mlmdm.load(
        args.checkpoint,
        args.config,
        text_encoder=args.text_encoder,
        text_dim=args.text_dim,
        as_parsed=args.as_parsed,
        dtype=DTYPES[args.dtype],
    )
    out = pipe.save_pretrained(args.out)
    n = sum(p.numel() for p in pipe.unet.parameters())
    print(f"converted {args.checkpoint} ({n / 1e6:.1f}M parameters, levels {pipe.config.model.level_sizes()}) -> {out}")
    return 0


def _read_embeds(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    from safetensors.torch import load_file

    data = load_file(path)
    if "text" not in data:
        raise ValueError(f"{path}: expected tensors 'text' (B, S, D) and optional 'mask' (B, S)")
    return data["text"], data.get("mask")


def write_samples(levels: list[torch.Tensor], out: Path, prefix: str, titles: list[str]) -> list[Path]:
    """One PNG per sample with every level side by side (highest first)."""
    paths = []
    for i, (strip, title) in enumerate(zip(level_strip(levels), titles, strict=True)):
        paths.append(save_png(strip, out / f"{prefix}{i:03d}_{title}.png"))
    return paths


def _sample(args: argparse.Namespace) -> int:
    from mdm.pipeline import MDMPipeline

    pipe = MDMPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    pipe.set_progress_bar_config(disable=args.quiet)
    kwargs: dict = {}
    if args.labels is not None:
        kwargs["class_labels"] = args.labels
        titles = [f"class{label}" for label in args.labels for _ in range(args.num)]
    elif args.prompt_embeds is not None:
        kwargs["prompt_embeds"], kwargs["prompt_mask"] = _read_embeds(args.prompt_embeds)
        if args.negative_embeds is not None:
            kwargs["negative_prompt_embeds"], kwargs["negative_prompt_mask"] = _read_embeds(args.negative_embeds)
        titles = [f"prompt{i}" for i in range(kwargs["prompt_embeds"].shape[0]) for _ in range(args.num)]
    else:
        kwargs["batch_size"] = 1
        titles = [f"sample{i}" for i in range(args.num)]
    out = pipe(
        **kwargs,
        num_images_per_prompt=args.num,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        sampler=args.sampler,
        eta=args.eta,
        thresholding=args.thresholding,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
    )
    paths = write_samples(out.levels, Path(args.out), "", titles)
    print(f"wrote {len(paths)} PNG(s) to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mdm.models.unet import NestedUNet
    from mdm.pipeline import MDMPipeline

    torch.manual_seed(args.seed)
    cfg = load_preset("demo")
    pipe = MDMPipeline(NestedUNet(cfg.model).eval(), cfg)
    model_dir = pipe.save_pretrained(Path(args.out) / "final")
    labels = list(range(cfg.model.num_classes))
    out = pipe(
        class_labels=labels,
        num_inference_steps=args.steps,
        output_type="pt",
        generator=torch.Generator().manual_seed(args.seed),
    )
    paths = write_samples(out.levels, Path(args.out) / "samples", "", [f"class{c}" for c in labels])
    print(f"untrained demo model saved to {model_dir}; {len(paths)} sample PNGs in {paths[0].parent}")
    return 0


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

    s = sub.add_parser("sample", help="sample a model directory; one PNG per sample, all levels side by side")
    s.add_argument("--model", required=True, help="model directory (config.yaml + model.safetensors)")
    s.add_argument("--labels", type=int, nargs="+", default=None, help="class labels (class models)")
    s.add_argument("--prompt-embeds", default=None, help="safetensors with 'text' (B,S,D) and 'mask' (B,S)")
    s.add_argument("--negative-embeds", default=None, help="safetensors with the unconditional text")
    s.add_argument("--num", type=int, default=1, help="images per label / prompt")
    s.add_argument("--steps", type=int, default=50, help="inference steps")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    s.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    s.add_argument("--thresholding", choices=["clip", "dynamic", "dynamic_if", "none"], default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=list(DTYPES), default="float32")
    s.add_argument("--out", default="samples", help="output folder")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_sample)

    d = sub.add_parser("demo", help="build the tiny demo model and write a sample PNG per class")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=25)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit with status 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"mdm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
