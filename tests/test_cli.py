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


def test_demo_writes_a_model_and_one_png_per_class(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 12
    pipe = MDMPipeline.from_pretrained(tmp_path / "final")
    assert pipe.config.model.num_classes == 12
    assert "sample PNGs" in capsys.readouterr().out


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "missing")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "2"]) == 0
    assert main(["sample", "--model", str(tmp_path / "d" / "final"), "--labels", "99", "--steps", "2"]) == 2
    assert "class_labels must be in [0, 12)" in capsys.readouterr().err
    assert torch.get_default_dtype() == torch.float32
