"""`mdm serve`: a local web app that samples MDM pipelines and shows every level of the results, and the denoising
path (the x0 estimate of every level at a few steps) as a grid and an animated GIF.

The generation is plain functions (`validate`, `generate`, `render`, `respond`) over `MDMPipeline`; `build_app` is a
thin gradio page over them and `serve` loads model folders and launches it. Safe by default: it binds 127.0.0.1,
opens no share link unless asked, bounds every input, queues requests, sends no telemetry and takes no files.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mdm.diffusion.process import Pyramid
from mdm.diffusion.samplers import SAMPLERS
from mdm.diffusion.schedule import SPACINGS
from mdm.images import sample_grid, save_png, to_pil
from mdm.pipeline import MDMPipeline

try:
    import gradio as gr
except ImportError as e:  # the `demo` extra
    raise ImportError("the web app needs gradio: pip install -e '.[demo]'") from e

MAX_STEPS = 250  # a cap below T: one request must not hold the queue for long
MAX_IMAGES = 16
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1
PATH_POINTS = 6  # grid points of the denoising path shown
MAX_QUEUE = 32  # waiting requests beyond this are turned away
KEEP_FOLDERS = 16  # newest per-request output folders kept (gradio copies the files it serves)

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """An input outside its bounds; the message is shown in the page."""


@dataclass(frozen=True)
class Request:
    """One generation request as the page sends it; empty sampler / spacing mean the model's defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    class_name: str = ""
    num_images: int = 1
    steps: int = 25
    guidance: float = 3.0
    sampler: str = ""
    spacing: str = ""
    seed: int = 0


@dataclass
class Result:
    """The validated request; the images at every level (float in [-1, 1], highest first), a title per image, the x0
    estimate of every level at a few grid points (`path`: step index -> pyramid), steps run, network calls, seconds."""

    request: Request
    levels: Pyramid
    titles: list[str]
    path: dict[int, Pyramid]
    steps: int
    nfe: int
    seconds: float


@dataclass
class Page:
    """What the page shows for one request: a status line and (when it worked) the outputs."""

    status: str
    ok: bool = False
    gallery: list[tuple[Image.Image, str]] = field(default_factory=list)
    path_grid: Image.Image | None = None
    path_gif: str | None = None
    files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
def model_kind(pipe: MDMPipeline) -> str:
    """'class', 'text' or 'unconditional': what the model is conditioned on."""
    m = pipe.config.model
    return "class" if m.num_classes > 0 else "text" if m.text_dim > 0 else "unconditional"


def class_choices(pipe: MDMPipeline) -> list[str]:
    """The class picker's entries: the model's class names, else the indices as text."""
    m = pipe.config.model
    return list(m.class_names or [str(i) for i in range(m.num_classes)])


def max_steps(pipe: MDMPipeline) -> int:
    """The largest step count a request may ask of this model."""
    return min(MAX_STEPS, pipe.config.diffusion.num_train_timesteps)


def _shown(value: Any) -> str:
    """A value from the page quoted for a message, cut short."""
    return repr(str(value)[:80])


def _whole(value: Any, name: str, lo: int, hi: int) -> int:
    """`value` as an int in lo..hi (floats from the page must be whole)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and value == int(value) and lo <= value <= hi):
        raise RequestError(f"{name} must be a whole number from {lo} to {hi}, got {_shown(value)}")
    return int(value)


def _text(value: Any, name: str, limit: int) -> str:
    """`value` as a string of at most `limit` characters."""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise RequestError(f"the {name} has {len(value)} characters; this model takes at most {limit}")
    return value


def validate(pipe: MDMPipeline, request: Request) -> Request:
    """`request` checked against its bounds and the model (RequestError otherwise), with numbers as ints and the
    model's default sampler and spacing filled in."""
    diffusion, limit = pipe.config.diffusion, pipe.config.text.max_chars
    steps = _whole(request.steps, "steps", 1, max_steps(pipe))
    num_images = _whole(request.num_images, "the number of images", 1, MAX_IMAGES)
    seed = _whole(request.seed, "the seed", 0, MAX_SEED)
    w = request.guidance
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= MAX_GUIDANCE:
        raise RequestError(f"the guidance scale must be from 0 to {MAX_GUIDANCE:g}, got {_shown(w)}")
    sampler, spacing = request.sampler or diffusion.sampler, request.spacing or diffusion.spacing
    for name, value, known in (("sampler", sampler, list(SAMPLERS)), ("spacing", spacing, list(SPACINGS))):
        if value not in known:
            raise RequestError(f"unknown {name} {_shown(value)}; pick one of {', '.join(known)}")
    prompt, negative = _text(request.prompt, "prompt", limit), _text(request.negative_prompt, "negative prompt", limit)
    kind = model_kind(pipe)
    if kind == "text" and not prompt.strip():
        raise RequestError("enter a prompt: this model is text-conditional")
    if kind == "class" and request.class_name not in class_choices(pipe):
        names = class_choices(pipe)
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise RequestError(f"unknown class {_shown(request.class_name)}; this model's classes: {shown}")
    return replace(
        request,
        prompt=prompt,
        negative_prompt=negative,
        num_images=num_images,
        steps=steps,
        guidance=float(w),
        sampler=sampler,
        spacing=spacing,
        seed=seed,
    )


def _condition(pipe: MDMPipeline, request: Request) -> dict[str, Any]:
    """The `Conditioner.build` keywords of a validated request."""
    kind = model_kind(pipe)
    if kind == "class":
        name = request.class_name
        return {"class_labels": [name if pipe.config.model.class_names else int(name)]}
    if kind == "text":
        return {"prompt": [request.prompt], "negative_prompt": request.negative_prompt or None}
    return {}


def path_points(steps: int, count: int = PATH_POINTS) -> list[int]:
    """`count` step indices spread evenly from the first step to the last (every step when there are fewer)."""
    if steps <= count:
        return list(range(steps))
    return sorted({round(k * (steps - 1) / (count - 1)) for k in range(count)})


@torch.no_grad()
def generate(pipe: MDMPipeline, request: Request, on_step: Callable[[int, int], None] | None = None) -> Result:
    """Validate `request` and sample it with `pipe(...)`, keeping the x0 estimate of every level at `path_points`
    (what the sampler itself computed: no extra network calls); `on_step(done, total)` runs per step."""
    req = validate(pipe, request)
    start = time.perf_counter()
    steps = len(pipe.timesteps(req.steps, req.spacing)) - 1
    keep, path = set(path_points(steps)), {}

    def record(i: int, x0: Pyramid) -> None:
        if i in keep:  # a later call at the same point (Heun's own step after its corrector) replaces the first
            path[i] = [lv.float().cpu() for lv in x0]

    out = pipe(
        **_condition(pipe, req),
        num_images_per_prompt=req.num_images,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance,
        sampler=req.sampler,
        spacing=req.spacing,
        generator=torch.Generator().manual_seed(req.seed),
        output_type="pt",
        callback=None if on_step is None else lambda i, _tau, _state: on_step(i + 1, steps),
        x0_callback=record,
    )
    levels = [lv.float().cpu() for lv in out.levels]
    return Result(req, levels, out.titles, path, steps, out.nfe, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------
def _frames(result: Result) -> list[Image.Image]:
    """One labelled grid of every image and level per recorded step (the GIF's frames)."""
    return [
        sample_grid(x0, [f"step {i + 1}/{result.steps} x0: {t}" for t in result.titles], ncols=2)
        for i, x0 in sorted(result.path.items())
    ]


def render(result: Result, folder: Path, status: str = "") -> Page:
    """The page's outputs: a gallery cell per image (every level side by side), the path grid of the first image,
    the path GIF of all, and PNGs of every level (native size) plus the grids, written into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    gallery = [
        (sample_grid([lv[k : k + 1] for lv in result.levels], [title], ncols=1), title)
        for k, title in enumerate(result.titles)
    ]
    steps = sorted(result.path)
    first = [torch.cat([result.path[i][lvl][:1] for i in steps]) for lvl in range(len(result.levels))]
    path_grid = sample_grid(
        first, [f"step {i + 1}/{result.steps} x0 estimate" for i in steps], ncols=min(3, len(steps))
    )
    frames = _frames(result)
    gif = folder / "denoising_path.gif"
    durations = [600] * (len(frames) - 1) + [1500]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    files = []
    for lv in result.levels:
        for k, image in enumerate(to_pil(lv)):
            files.append(save_png(image, folder / f"image{k:02d}_{lv.shape[-1]}px.png"))
    files.append(save_png(sample_grid(result.levels, result.titles), folder / "levels.png"))
    files.append(save_png(path_grid, folder / "denoising_path.png"))
    return Page(status, True, gallery, path_grid, str(gif), [str(f) for f in files])


def respond(
    pipe: MDMPipeline, request: Request, folder: Path, on_step: Callable[[int, int], None] | None = None
) -> Page:
    """Generate and render one request; a bad input or a failure becomes the page's status instead of an error."""
    try:
        result = generate(pipe, request, on_step)
        req = result.request
        status = (
            f"{len(result.titles)} image(s), {result.steps} steps of {req.sampler} ({req.spacing} spacing), "
            f"guidance {req.guidance:g}, seed {req.seed}: {result.nfe} network calls in {result.seconds:.1f} s"
        )
        return render(result, folder, status)
    except RequestError as e:
        return Page(f"**Check the inputs:** {e}")
    except Exception as e:
        logger.exception("generation failed")
        return Page(f"**Generation failed:** {type(e).__name__}: {e}")


class Folders:
    """Per-request output folders under `root`; only the newest `keep` stay (gradio serves its own copies)."""

    def __init__(self, root: Path, keep: int = KEEP_FOLDERS) -> None:
        self.root, self.keep, self._lock = root, keep, threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def new(self) -> Path:
        """A fresh empty folder; the oldest beyond `keep` are removed."""
        with self._lock:
            folders = sorted((p for p in self.root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
            for old in folders[: max(0, len(folders) - self.keep + 1)]:
                shutil.rmtree(old, ignore_errors=True)
            return Path(tempfile.mkdtemp(dir=self.root))


# ----------------------------------------------------------------------------------------------------------
def _describe(name: str, pipe: MDMPipeline) -> str:
    """The model's one-line summary for the page."""
    m, kind = pipe.config.model, model_kind(pipe)
    what = {"class": f"class-conditional ({m.num_classes} classes)", "text": "text-to-image"}.get(kind, kind)
    sizes = ", ".join(f"{s}px" for s in m.level_sizes())
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    return f"**{name}**: {what}; levels {sizes} (highest first); {params:.1f}M parameters"


def _controls(name: str, pipe: MDMPipeline) -> dict[str, dict[str, Any]]:
    """Per input component, the settings that fit the model (its kind, classes, limits and defaults)."""
    cfg, kind = pipe.config, model_kind(pipe)
    classes = class_choices(pipe)
    return {
        "info": {"value": _describe(name, pipe)},
        "prompt": {"visible": kind == "text", "max_length": cfg.text.max_chars},
        "negative": {"visible": kind == "text", "max_length": cfg.text.max_chars},
        "class": {"visible": kind == "class", "choices": classes, "value": classes[0] if classes else None},
        "steps": {"maximum": max_steps(pipe), "value": min(cfg.train.sample_steps, max_steps(pipe))},
        "guidance": {"value": min(cfg.train.sample_guidance, MAX_GUIDANCE), "visible": kind != "unconditional"},
        "sampler": {"value": cfg.diffusion.sampler},
        "spacing": {"value": cfg.diffusion.spacing},
    }


def build_app(pipelines: Mapping[str, MDMPipeline] | Sequence[MDMPipeline], workdir: Path | None = None) -> gr.Blocks:
    """The page: a model picker (several models), inputs that fit the chosen model, and every level of the results
    with the denoising path. Output files go under `workdir` (default: a new temporary folder)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry or version check, whatever gradio is asked
    models = dict(pipelines) if isinstance(pipelines, Mapping) else {f"model {i}": p for i, p in enumerate(pipelines)}
    if not models:
        raise ValueError("build_app needs at least one pipeline")
    folders = Folders(workdir or Path(tempfile.mkdtemp(prefix="mdm-serve-")))
    first = next(iter(models))
    start = _controls(first, models[first])

    def on_model(name: str) -> list[dict[str, Any]]:
        key = name if name in models else first
        return [gr.update(**settings) for settings in _controls(key, models[key]).values()]

    def on_generate(
        name: str,
        prompt: str,
        negative: str,
        class_name: str,
        num_images: float,
        steps: float,
        guidance: float,
        sampler: str,
        spacing: str,
        seed: float,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio's way to ask for a progress bar)
    ) -> tuple[Any, ...]:
        if name not in models:
            page = Page(f"**Check the inputs:** unknown model {_shown(name)}")
        else:
            request = Request(
                prompt or "", negative or "", class_name or "", num_images, steps, guidance, sampler, spacing, seed
            )
            progress(0, desc="sampling")
            page = respond(models[name], request, folders.new(), lambda i, n: progress((i, n), desc="sampling"))
        if not page.ok:
            gr.Warning(page.status.replace("**", ""))
        return page.status, page.gallery or None, page.path_grid, page.path_gif, page.files or None

    with gr.Blocks(title="mdm: Matryoshka Diffusion Models", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(
            "## Matryoshka Diffusion Models\nEvery level of the pyramid is denoised jointly; each result shows all "
            f"levels side by side, highest resolution first. Limits: {MAX_STEPS} steps, {MAX_IMAGES} images."
        )
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(list(models), value=first, label="Model", visible=len(models) > 1, elem_id="model")
                info = gr.Markdown(elem_id="model-info", **start["info"])
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", **start["prompt"])
                negative = gr.Textbox(label="Negative prompt", elem_id="negative", **start["negative"])
                class_name = gr.Dropdown(label="Class", elem_id="class", **start["class"])
                with gr.Row():
                    steps = gr.Slider(1, step=1, label="Steps", elem_id="steps", **start["steps"])
                    num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images", elem_id="images")
                guidance = gr.Slider(
                    0, MAX_GUIDANCE, step=0.1, label="Guidance scale", elem_id="guidance", **start["guidance"]
                )
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLERS), label="Sampler", elem_id="sampler", **start["sampler"])
                    spacing = gr.Dropdown(list(SPACINGS), label="Spacing", elem_id="spacing", **start["spacing"])
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed", scale=3)
                    shuffle = gr.Button("Random", elem_id="random-seed", scale=1)
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    label="Every level (highest first)",
                    columns=2,
                    height=720,
                    object_fit="contain",
                    format="png",
                    buttons=["download", "download_all", "fullscreen"],
                    elem_id="levels",
                )
                with gr.Row():
                    path_grid = gr.Image(
                        label="Denoising path of image 1 (x0 estimate)",
                        type="pil",
                        format="png",
                        height=320,
                        buttons=["download", "fullscreen"],
                        interactive=False,
                        elem_id="path",
                    )
                    path_gif = gr.Image(
                        label="Denoising path of every image (x0 estimate, animated)",
                        type="filepath",
                        height=320,
                        buttons=["download", "fullscreen"],
                        interactive=False,
                        elem_id="path-gif",
                    )
                files = gr.File(label="PNGs", file_count="multiple", height=220, interactive=False, elem_id="files")
        model.change(
            on_model,
            inputs=model,
            outputs=[info, prompt, negative, class_name, steps, guidance, sampler, spacing],
            api_name=False,
        )
        shuffle.click(lambda: random.randint(0, MAX_SEED), outputs=seed, api_name=False)
        go.click(
            on_generate,
            inputs=[model, prompt, negative, class_name, num_images, steps, guidance, sampler, spacing, seed],
            outputs=[status, gallery, path_grid, path_gif, files],
            api_name="generate",
        )
    return app


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    concurrency: int = 1,
    block: bool = True,
) -> str:
    """Queue the app (`concurrency` generations at once, the rest wait) and serve it; returns its local URL once it
    is up (after the server stops when `block`)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the app is reachable from other machines", host)
    app.queue(default_concurrency_limit=concurrency, max_size=MAX_QUEUE, api_open=False)
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        inbrowser=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        max_file_size="1kb",  # the page takes no uploads
        quiet=not block,
    )
    return url


def serve(
    models: list[str], host: str = "127.0.0.1", port: int = 7860, share: bool = False, concurrency: int = 1
) -> None:
    """Load every model folder (or hub id) and serve the app until interrupted."""
    pipelines = {}
    for path in models:
        pipe = MDMPipeline.from_pretrained(path)
        if pipe.config.model.is_video():
            raise ValueError(
                f"{path}: a video model (model.num_frames = {pipe.config.model.num_frames}); mdm serve shows images, "
                f"sample clips with mdm sample (GIF, MP4 and frame strips)"
            )
        _ = pipe.text_encoder  # load it now: fail at start-up, not on the first request
        pipelines[path] = pipe
    with tempfile.TemporaryDirectory(prefix="mdm-serve-") as workdir:
        launch(build_app(pipelines, Path(workdir)), host, port, share, concurrency)
