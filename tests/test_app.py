"""The web app (`mdm serve`): its generation functions, input bounds and failures, concurrent requests, and the page
itself driven from a real headless Chromium (skipped with a reason without chromium, chromedriver or selenium)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the web app needs the demo extra (gradio)")

from mdm import MDMPipeline
from mdm import app as webapp
from mdm.app import MAX_IMAGES, MAX_SEED, MAX_STEPS, Folders, Request, RequestError, generate, respond
from mdm.images import to_pil
from mdm.models.unet import NestedUNet
from mdm.text.encoders import ByteEncoder
from tests.conftest import randomize_, tiny_config

# gradio's own use of pandas in its queue
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword is deprecated)")
CLASSES = ["red", "green", "blue"]
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1100",
]


@pytest.fixture(scope="module")
def class_pipe(one_thread: None) -> MDMPipeline:
    """A random 2-level (16px, 8px) class model with named classes."""
    cfg = tiny_config(levels=2, text_dim=0, num_classes=len(CLASSES))
    cfg.model.class_names = CLASSES
    pipe = MDMPipeline(randomize_(NestedUNet(cfg.model)).eval(), cfg.validate())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text_pipe(one_thread: None) -> MDMPipeline:
    """A random 2-level text model on the built-in byte encoder (no download)."""
    cfg = tiny_config(levels=2, text_dim=ByteEncoder(16).dim)
    cfg.text.encoder, cfg.text.max_length = "bytes", 16
    pipe = MDMPipeline(randomize_(NestedUNet(cfg.model), seed=1).eval(), cfg.validate())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_generate_matches_the_pipeline_and_keeps_the_x0_path(class_pipe: MDMPipeline, sampler: str) -> None:
    steps = 7
    result = generate(class_pipe, Request(class_name="blue", num_images=2, steps=steps, sampler=sampler, seed=3))
    ref = class_pipe(
        class_labels=["blue"],
        num_images_per_prompt=2,
        num_inference_steps=steps,
        guidance_scale=3.0,
        sampler=sampler,
        generator=_seed(3),
        output_type="pt",
    )
    assert all(torch.equal(a, b) for a, b in zip(result.levels, ref.levels, strict=True)), "the same images as pipe()"
    assert result.nfe == ref.nfe and result.titles == ["blue", "blue"] and result.steps == steps
    assert sorted(result.path) == webapp.path_points(steps) == [0, 1, 2, 4, 5, 6]
    for x0 in result.path.values():
        assert [tuple(lv.shape) for lv in x0] == [(2, 3, 16, 16), (2, 3, 8, 8)]
        assert all(lv.abs().max() <= 1 for lv in x0), "x0 estimates are thresholded like the sampler's"
    torch.testing.assert_close(result.path[steps - 1][1], result.levels[1], msg="the last step returns its x0")


def test_text_requests_use_the_prompt_and_the_negative_prompt(text_pipe: MDMPipeline) -> None:
    request = Request(prompt="a red circle", negative_prompt="blue", num_images=1, steps=2, seed=5)
    result = generate(text_pipe, request)
    ref = text_pipe(
        prompt=["a red circle"],
        negative_prompt="blue",
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=_seed(5),
        output_type="pt",
    )
    assert torch.equal(result.levels[0], ref.images) and result.titles == ["a red circle"]


def test_respond_renders_every_level_the_path_and_the_pngs(class_pipe: MDMPipeline, tmp_path: Path) -> None:
    page = respond(class_pipe, Request(class_name="green", num_images=2, steps=3), tmp_path)
    assert page.ok and "2 image(s), 3 steps of ddim" in page.status, page.status
    assert [caption for _, caption in page.gallery] == ["green", "green"]
    names = sorted(Path(f).name for f in page.files)
    assert names == sorted(
        [f"image{k:02d}_{s}px.png" for k in range(2) for s in (16, 8)] + ["levels.png", "denoising_path.png"]
    )
    for f in page.files:
        if "px" in Path(f).name:
            size = int(Path(f).stem.split("_")[1][:-2])
            assert Image.open(f).size == (size, size)
    with Image.open(page.path_gif) as gif:
        assert gif.n_frames == 3, "one frame per recorded step (all of them, with 3 steps)"


@pytest.mark.parametrize(
    ("which", "changes", "message"),
    [
        ("class", {"steps": MAX_STEPS + 1}, f"steps must be a whole number from 1 to {MAX_STEPS}"),
        ("class", {"steps": 0}, "steps must be"),
        ("class", {"steps": 2.5}, "steps must be"),
        ("class", {"num_images": MAX_IMAGES + 1}, "number of images must be"),
        ("class", {"seed": -1}, "seed must be"),
        ("class", {"seed": MAX_SEED + 1}, "seed must be"),
        ("class", {"guidance": float("nan")}, "guidance scale must be"),
        ("class", {"guidance": 21.0}, "guidance scale must be"),
        ("class", {"sampler": "magic"}, "unknown sampler 'magic'"),
        ("class", {"spacing": "magic"}, "unknown spacing 'magic'"),
        ("class", {"class_name": "purple"}, "unknown class 'purple'; this model's classes: red, green, blue"),
        ("text", {"prompt": "   "}, "enter a prompt: this model is text-conditional"),
        ("text", {"prompt": "x" * 513}, "the prompt has 513 characters; this model takes at most 512"),
        ("text", {"negative_prompt": "x" * 513}, "the negative prompt has 513 characters"),
    ],
)
def test_out_of_bounds_inputs_are_refused_with_a_message(
    request: pytest.FixtureRequest, tmp_path: Path, which: str, changes: dict[str, Any], message: str
) -> None:
    pipe = request.getfixturevalue(f"{which}_pipe")
    base = Request(class_name="red", steps=2) if which == "class" else Request(prompt="a red circle", steps=2)
    bad = Request(**{**base.__dict__, **changes})
    with pytest.raises(RequestError, match=message.replace("(", r"\(")):
        generate(pipe, bad)
    page = respond(pipe, bad, tmp_path)
    assert not page.ok and page.status.startswith("**Check the inputs:**") and message in page.status


def test_a_failed_generation_is_reported_and_the_next_one_works(class_pipe: MDMPipeline, tmp_path: Path) -> None:
    class Broken(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: object) -> None:
            raise RuntimeError("simulated out of memory")

    unet = class_pipe.unet
    class_pipe.unet = Broken(unet)
    try:
        page = respond(class_pipe, Request(class_name="red", steps=2), tmp_path)
    finally:
        class_pipe.unet = unet
    assert not page.ok and page.status == "**Generation failed:** RuntimeError: simulated out of memory"
    assert respond(class_pipe, Request(class_name="red", steps=2), tmp_path).ok


def test_two_concurrent_requests_both_complete(class_pipe: MDMPipeline, tmp_path: Path) -> None:
    both_running = threading.Barrier(2, timeout=30)
    requests = [Request(class_name="red", num_images=2, steps=3, seed=s) for s in (1, 2)]
    pages: dict[int, Any] = {}

    def work(k: int) -> None:
        on_step = lambda done, total: both_running.wait() if done == 1 else None  # noqa: E731
        pages[k] = respond(class_pipe, requests[k], tmp_path / str(k), on_step)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(pages[k].ok for k in range(2)), [p.status for p in pages.values()]
    for k, req in enumerate(requests):
        alone = to_pil(generate(class_pipe, req).levels[1])[1]
        got = Image.open(tmp_path / str(k) / "image01_8px.png")
        assert np.array_equal(np.asarray(got), np.asarray(alone)), "concurrent requests do not disturb each other"


def test_output_folders_keep_only_the_newest(tmp_path: Path) -> None:
    folders = Folders(tmp_path / "out", keep=2)
    made = [folders.new() for _ in range(4)]
    assert made[-1].is_dir() and len(list((tmp_path / "out").iterdir())) == 2


def test_serve_loads_the_folders_and_binds_localhost(
    class_pipe: MDMPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class_pipe.save_pretrained(tmp_path / "model")
    seen: dict[str, Any] = {}

    def fake_launch(app: Any, host: str, port: int, share: bool, concurrency: int) -> str:
        seen.update(app=app, host=host, port=port, share=share, concurrency=concurrency)
        return ""

    real_launch = webapp.launch
    monkeypatch.setattr(webapp, "launch", fake_launch)
    webapp.serve([str(tmp_path / "model")])
    assert (seen["host"], seen["port"], seen["share"], seen["concurrency"]) == ("127.0.0.1", 7860, False, 1)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        real_launch(seen["app"], concurrency=0, block=False)


# ----------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver; without them (or selenium) a skip saying what is missing, a failure in CI."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "selenium (dev extra)"
    else:
        missing = (
            None if chromium and driver else "chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    if missing is not None:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"the browser test needs {missing}")
    return chromium, driver


@pytest.fixture(scope="module")
def server(class_pipe: MDMPipeline, text_pipe: MDMPipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app of both tiny models served on a free local port, two generations at a time; yields its URL."""
    app = webapp.build_app({"class": class_pipe, "text": text_pipe}, tmp_path_factory.mktemp("app"))
    url = webapp.launch(app, port=_free_port(), concurrency=2, block=False)
    yield url
    app.close()


@pytest.fixture(scope="module")
def browser(server: str) -> Iterator[Any]:
    """Headless Chromium with a fresh profile, logging every network request."""
    chromium, driver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="mdm-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _fetch(url: str) -> Image.Image:
    """An image the page links to, from the local server."""
    assert url.startswith("http://127.0.0.1:"), url
    with urllib.request.urlopen(url, timeout=10) as r:
        return Image.open(io.BytesIO(r.read()))


def test_the_page_generates_and_shows_every_level_in_a_real_browser(
    browser: Any, server: str, text_pipe: MDMPipeline, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    find = browser.find_element

    def pick(elem_id: str, value: str) -> None:
        find(By.CSS_SELECTOR, f"#{elem_id} input").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'li[role="option"][aria-label="{value}"]'))[0].click()

    def type_number(elem_id: str, value: int) -> None:
        box = find(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)

    def status_text() -> str:  # the Markdown alone, not the progress bar drawn over it while sampling
        return find(By.CSS_SELECTOR, '#status [data-testid="markdown"]').text

    def generate_and_wait(expect: str) -> str:
        before = status_text()
        find(By.ID, "generate").click()
        wait.until(lambda d: status_text() not in ("", before))
        status = status_text()
        assert expect in status, status
        return status

    browser.get(server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#class input"))
    assert "class-conditional (3 classes); levels 16px, 8px" in find(By.ID, "model-info").text
    pick("class", "blue")
    type_number("steps", 3)
    type_number("images", 2)
    status = generate_and_wait("2 image(s), 3 steps of ddim")
    assert "network calls" in status

    # every level of every image: the gallery cells load, and each level's PNG is the right size and not blank
    cells = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#levels img"))
    assert len(cells) == 2
    wait.until(
        lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", c) for c in cells)
    )
    shot = np.asarray(Image.open(io.BytesIO(find(By.ID, "levels").screenshot_as_png)).convert("L"), dtype=float)
    assert shot.std() > 10, "the gallery shows images, not an empty box"
    hrefs = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#files a")]
    hrefs = {href.rsplit("/", 1)[-1]: href for href in hrefs}
    for k in range(2):
        for size in (16, 8):
            image = _fetch(hrefs[f"image{k:02d}_{size}px.png"])
            assert image.size == (size, size)
            assert np.asarray(image, dtype=float).std() > 5, f"level {size}px of image {k} is blank"
    path_src = find(By.CSS_SELECTOR, "#path img").get_attribute("src")
    gif_src = find(By.CSS_SELECTOR, "#path-gif img").get_attribute("src")
    assert _fetch(path_src).width > 0 and _fetch(gif_src).n_frames == 3, "the x0 path: a grid and a 3-frame GIF"

    # the random-seed button, then the text model: its inputs replace the class picker, and bounds show in the page
    find(By.ID, "random-seed").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#seed input").get_attribute("value") not in ("", "0"))
    pick("model", "text")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#class input"), "a text model has no class picker"
    assert "Check the inputs: enter a prompt" in generate_and_wait("enter a prompt")
    find(By.CSS_SELECTOR, "#prompt textarea").send_keys("a red circle")
    assert "steps of ddim" in generate_and_wait("2 image(s)"), "the server keeps serving after a refused request"
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#levels img")) == 2)

    screenshot = Path(os.environ.get("MDM_APP_SCREENSHOT") or tmp_path / "app.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshot))

    # the page fetched nothing but the local server (no fonts, themes or telemetry from the internet)
    requests = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
    remote = {u for u in urls if u.split(":", 1)[0] in ("http", "https", "ws", "wss") and not u.startswith(server)}
    assert not remote, sorted(remote)


def test_the_queue_runs_two_requests_through_the_server(server: str) -> None:
    def submit(seed: int) -> str:
        body = json.dumps({"data": ["class", "", "", "red", 1, 2, 3.0, "ddim", "mlmdm", seed]}).encode()
        post = urllib.request.Request(f"{server}gradio_api/call/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=10) as r:
            return json.load(r)["event_id"]

    events = [submit(seed) for seed in (1, 2)]  # both queued before either is read
    for seed, event in zip((1, 2), events, strict=True):
        with urllib.request.urlopen(f"{server}gradio_api/call/generate/{event}", timeout=60) as r:
            stream = r.read().decode()
        assert "event: complete" in stream, stream[:500]
        status = json.loads(stream.split("data: ", 1)[1].splitlines()[0])[0]
        assert status.startswith("1 image(s), 2 steps of ddim") and f"seed {seed}:" in status, status
