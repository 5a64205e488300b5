import torch
from PIL import Image
from safetensors.torch import save_file

from mdm import MDMPipeline
from mdm.cli import main
from tests.conftest import fixture_dir, load_fixture


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


def test_demo_trains_both_phases_and_writes_the_class_grid(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--per-class", "1", *TINY_DEMO]) == 0
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
