import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from mdm import MDMPipeline
from mdm.cli import main
from mdm.config import save_config
from mdm.data.shapes import ShapesDataset
from mdm.images import to_uint8
from mdm.text.cache import EmbeddingCache
from mdm.text.encoders import TransformersEncoder
from tests.conftest import fixture_dir, load_fixture, sample_prompts_and_embeddings, tiny_config


def test_convert_then_sample_with_prompt_embeddings(tmp_path, capsys):
    d = fixture_dir("nested")
    assert (
        main(
            [
                "convert",
                "mlmdm",
                str(d / "vis_model.pth"),
                "--config",
                str(d / "config.yaml"),
                "--out",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    assert "levels [64, 16]" in capsys.readouterr().out
    pipe = MDMPipeline.from_pretrained(tmp_path / "model")
    assert pipe.provenance["source"] == "vis_model.pth" and len(pipe.provenance["sha256"]) == 64
    ref = load_fixture("nested/sampler.pt")
    save_file(
        {"text": ref["text_cond"].contiguous(), "mask": ref["mask_cond"].contiguous()},
        str(tmp_path / "p.safetensors"),
    )
    save_file(
        {"text": ref["text_uncond"][:1].contiguous(), "mask": ref["mask_uncond"][:1].contiguous()},
        str(tmp_path / "n.safetensors"),
    )
    assert (
        main(
            [
                "sample",
                "--model",
                str(tmp_path / "model"),
                "--prompt-embeds",
                str(tmp_path / "p.safetensors"),
                "--negative-embeds",
                str(tmp_path / "n.safetensors"),
                "--steps",
                "3",
                "--quiet",
                "--out",
                str(tmp_path / "png"),
            ]
        )
        == 0
    )
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == ["000_prompt0.png", "001_prompt1.png"]
    img = Image.open(pngs[0])
    assert img.size == (64 + 64, 64 + 12), "both levels side by side under a label row"


TINY_DEMO = [
    "--set",
    "train.phases=[{levels: 1, steps: 2}, {levels: 2, steps: 2, mixed_ratio: [1, 1]}]",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.sample_count=2",
    "--set",
    "train.sample_steps=2",
]


def test_demo_trains_both_phases_and_writes_the_class_grid(tmp_path, capsys, monkeypatch):
    scales, call = [], MDMPipeline.__call__

    def spy(pipe: MDMPipeline, **kw):
        scales.append(kw["guidance_scale"])
        return call(pipe, **kw)

    monkeypatch.setattr(MDMPipeline, "__call__", spy)
    guidance = ["--set", "train.sample_guidance=4.5"]
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--per-class", "1", *TINY_DEMO, *guidance]) == 0
    assert scales[-1] == 4.5, "the demo grid samples at the preset's train.sample_guidance unless --guidance is given"
    out = capsys.readouterr().out
    assert "trained demo model" in out and str(tmp_path / "demo_samples.png") in out
    grid = Image.open(tmp_path / "demo_samples.png")
    assert grid.width > 2 * 128 and grid.height > 6 * 128, "12 classes, two per row, both levels at >= 128 px"
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "phases/levels_1/model.safetensors").is_file()
    pipe = MDMPipeline.from_pretrained(tmp_path / "final")
    assert pipe.config.model.num_classes == 12 and pipe.config.model.level_sizes() == [32, 16]
    assert pipe.config.model.class_names[0] == "red circle"


def test_train_stop_resume_then_sample_by_class_name(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", "--preset", "demo", "--out", run, "--quiet", *TINY_DEMO]
    assert main([*args, "--max-minutes", "0"]) == 2
    assert "--max-minutes must be > 0" in capsys.readouterr().err
    assert main([*args, "--max-steps", "3"]) == 0
    assert "stopped at step 3" in capsys.readouterr().out
    assert main(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", "--out", run, "--resume", "latest", "--quiet"]) == 0
    assert str(tmp_path / "run" / "final") in capsys.readouterr().out
    samples = tmp_path / "png"
    cmd = ["sample", "--model", f"{run}/final", "--labels", "green square", "0", "--steps", "2", "--quiet"]
    assert main([*cmd, "--out", str(samples)]) == 0
    assert sorted(p.name for p in samples.glob("*.png")) == ["000_green-square.png", "001_0.png"]
    plain = tmp_path / "plain_out"
    fast = ["--sampler", "dpmpp_2m", "--spacing", "trailing", "--plain", "--seed", "3", "--out", str(plain)]
    assert main([*cmd, *fast]) == 0
    assert "(2 network calls)" in capsys.readouterr().out
    top = sorted((plain / "plain").glob("*.png"))
    assert [p.name for p in top] == ["00000.png", "00001.png"]
    assert [Image.open(p).size for p in sorted((plain / "level_16").glob("*.png"))] == [(16, 16)] * 2
    pipe = MDMPipeline.from_pretrained(f"{run}/final")
    pipe.set_progress_bar_config(disable=True)
    request = dict(
        class_labels=["green square", 0],
        num_inference_steps=2,
        sampler="dpmpp_2m",
        spacing="trailing",
        guidance_scale=7.5,
        output_type="np",
    )
    out = pipe(**request, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(Image.open(top[1])), out.images[1]), "plain PNGs are the pipeline's pixels"
    assert np.array_equal(np.asarray(Image.open(plain / "level_16" / "00000.png")), out.levels[1][0])
    assert pipe.config.diffusion.level_projection, "the demo preset samples with level projection"
    unprojected = tmp_path / "unprojected"
    assert main([*cmd, *fast[:-1], str(unprojected), "--no-level-projection"]) == 0
    apart = pipe(**request, generator=torch.Generator().manual_seed(3), level_projection=False)
    assert np.array_equal(np.asarray(Image.open(unprojected / "plain" / "00001.png")), apart.images[1])
    assert not np.array_equal(apart.images, out.images), "--no-level-projection reaches the sampler"
    still = tmp_path / "still"
    assert main([*cmd, "--plain", "--seed", "3", "--sampler", "ddim", "--eta", "0", "--out", str(still)]) == 0
    ddim = dict(request, sampler="ddim", spacing=None)
    quiet = pipe(**ddim, eta=0.0, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(Image.open(still / "plain" / "00001.png")), quiet.images[1])
    noisy = pipe(**ddim, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert not np.array_equal(quiet.images, noisy.images), "--eta 0 reaches the sampler"
    every = tmp_path / "every"
    assert main([*cmd, "--plain", "--seed", "3", "--guided-levels", "all", "--out", str(every)]) == 0
    preset = dict(request, sampler=None, spacing=None)
    guided = pipe(**preset, guided_levels="all", generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(Image.open(every / "plain" / "00001.png")), guided.images[1])
    lowest = pipe(**preset, generator=torch.Generator().manual_seed(3))
    assert pipe.settle(7.5).sampler == "renoise", "the preset's sampler"
    assert not np.array_equal(guided.images, lowest.images), "--guided-levels reaches the sampler"
    never = tmp_path / "never"
    assert main([*cmd, "--plain", "--seed", "3", "--guidance-interval", "50", "60", "--out", str(never)]) == 0
    unguided = pipe(**preset, guidance_interval=(50.0, 60.0), generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(Image.open(never / "plain" / "00001.png")), unguided.images[1])
    assert not np.array_equal(unguided.images, lowest.images), "--guidance-interval reaches the sampler"


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "missing")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "t")]) == 2
    assert "give --preset NAME" in capsys.readouterr().err
    assert main(["train", "--preset", "nope", "--out", str(tmp_path / "t")]) == 2
    assert "unknown preset 'nope'; available: cc12m-1024" in capsys.readouterr().err
    assert main(["train", "--preset", "demo", "--set", "train.lr=-1", "--out", str(tmp_path / "t")]) == 2
    assert "'train.lr' must be positive" in capsys.readouterr().err
    assert main(["train", "--preset", "demo", "--out", str(tmp_path / "t"), "--resume", "latest"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "2", "--per-class", "1", *TINY_DEMO]) == 0
    assert main(["sample", "--model", str(tmp_path / "d" / "final"), "--labels", "99", "--steps", "2"]) == 2
    assert "class_labels must be in [0, 12)" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "d" / "final"), "--labels", "pink star", "--steps", "2"]) == 2
    assert "unknown class name 'pink star'" in capsys.readouterr().err
    assert torch.get_default_dtype() == torch.float32


def test_convert_with_a_text_encoder_then_sample_prompts(tmp_path, capsys, tiny_t5):
    d = fixture_dir("nested")
    model = tmp_path / "model"
    args = ["convert", "mlmdm", str(d / "vis_model.pth"), "--config", str(d / "config.yaml"), "--out", str(model)]
    assert main([*args, "--text-encoder", str(tiny_t5)]) == 0
    pipe = MDMPipeline.from_pretrained(model)
    assert pipe.config.text.encoder == "t5" and pipe.config.text.path == str(tiny_t5.resolve())
    prompts = ["a red circle", "blue square"]
    cmd = ["sample", "--model", str(model), "--prompt", *prompts, "--steps", "2", "--quiet", "--out"]
    assert main([*cmd, str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == ["000_a-red-circle.png", "001_blue-square.png"]
    pipe.set_progress_bar_config(disable=True)
    out, ref = sample_prompts_and_embeddings(pipe, prompts, pipe.text_encoder, num_inference_steps=2)
    assert torch.equal(out, ref)
    positional = pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(positional.images, out), "MDMPipeline.from_pretrained(DIR)(prompt) works as in diffusers"
    png = Image.open(tmp_path / "png" / "000_a-red-circle.png")
    assert np.array_equal(np.asarray(png)[12:, :64], to_uint8(out[:1])[0]), "the CLI wrote the same first sample"


def test_train_reads_precomputed_text_features_without_the_encoder(tmp_path, capsys, tiny_t5, monkeypatch):
    cfg = tiny_config(levels=2, text_dim=48)
    cfg.text.encoder, cfg.text.path, cfg.text.cache = "t5", str(tiny_t5), str(tmp_path / "cache")
    cfg.data.num_samples = 16
    t = cfg.train
    t.batch_size, t.steps, t.warmup_steps, t.sample_count, t.sample_steps = 4, 2, 1, 2, 2
    save_config(cfg.validate(), tmp_path / "cfg.yaml")
    assert main(["data", "embed", "--config", str(tmp_path / "cfg.yaml"), "--quiet"]) == 0
    assert "cached the features of" in capsys.readouterr().out
    captions = set(ShapesDataset(16, 16).captions())
    assert len(EmbeddingCache(tmp_path / "cache")) == len(captions) + 1

    def unavailable(*args, **kwargs):
        raise AssertionError("the T5 encoder was loaded although every caption is cached")

    monkeypatch.setattr(TransformersEncoder, "__init__", unavailable)
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run/final/model.safetensors").is_file()
    assert (tmp_path / "run/samples/step_0000002.png").is_file(), "sample prompts are dataset captions: cached"


def test_demo_text_trains_and_writes_captioned_samples(tmp_path, capsys):
    cmd = ["demo", "--preset", "demo-text", "--out", str(tmp_path), "--steps", "2", "--per-class", "1"]
    assert main([*cmd, *TINY_DEMO]) == 0
    assert "captions of unseen scenes" in capsys.readouterr().out
    grid = Image.open(tmp_path / "demo_samples.png")
    assert grid.width > 2 * 128 and grid.height > 6 * 128, "12 captions, two per row, both levels at >= 128 px"
    pipe = MDMPipeline.from_pretrained(tmp_path / "final")
    assert pipe.config.text.encoder == "bytes" and pipe.config.text.word_buckets == 2048
    assert pipe.config.model.text_dim == pipe.text_encoder.dim == 256 * 12 + 2048 + 64
    assert len(pipe.unet.levels()[-1].lm_head) == 2, "the byte transformer blocks are part of the trained network"
