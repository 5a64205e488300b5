"""Bad input of every kind through the CLI: one clear line naming the file or argument, exit 2, no traceback."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mdm import MDMPipeline, NestedUNet
from mdm.cli import main
from mdm.config import PhaseConfig, save_config
from tests.conftest import tiny_config


def class_config():
    cfg = tiny_config(levels=2, text_dim=0, num_classes=4)
    cfg.data.shapes, cfg.data.colors, cfg.data.num_samples = ["circle", "square"], ["red", "blue"], 16
    t = cfg.train
    t.batch_size, t.warmup_steps, t.sample_count, t.checkpoint_every = 2, 1, 0, 1
    t.phases = [PhaseConfig(levels=1, steps=1), PhaseConfig(levels=2, steps=2)]
    return cfg.validate("robustness")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory, a config file and a run stopped at step 2 (checkpoints 1 and 2)."""
    root = tmp_path_factory.mktemp("made")
    cfg = class_config()
    save_config(cfg, root / "cfg.yaml")
    MDMPipeline(NestedUNet(cfg.model).eval(), cfg).save_pretrained(root / "model")
    assert (
        main(["train", "--config", str(root / "cfg.yaml"), "--out", str(root / "run"), "--max-steps", "2", "--quiet"])
        == 0
    )
    return root


def copy_model(made: Path, tmp: Path) -> Path:
    shutil.copytree(made / "model", tmp / "m")
    return tmp / "m"


def copy_run(made: Path, tmp: Path) -> Path:
    shutil.copytree(made / "run", tmp / "r")
    return tmp / "r"


def header_bytes(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


WEIGHTS: dict[str, Callable[[Path], None]] = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "absurd header length": lambda p: p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}"),
    "header past the end": lambda p: p.write_bytes(struct.pack("<Q", 10_000) + b"{}"),
    "header not JSON": lambda p: p.write_bytes(header_bytes(b"not json at all!")),
    "bad offsets": lambda p: p.write_bytes(
        header_bytes(json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}).encode()) + b"\0" * 16
    ),
    "a pickle named .safetensors": lambda p: p.write_bytes(pickle.dumps({"w": [1, 2, 3]})),
}


@pytest.mark.parametrize("breakage", list(WEIGHTS))
def test_broken_model_weights(made: Path, tmp_path: Path, capsys: pytest.CaptureFixture, breakage: str) -> None:
    model = copy_model(made, tmp_path)
    WEIGHTS[breakage](model / "model.safetensors")
    assert main(["sample", "--model", str(model), "--labels", "0", "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{model / 'model.safetensors'}: not a readable safetensors file" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_weights_symlinked_to_another_file_and_wrong_keys(made: Path, tmp_path: Path, capsys) -> None:
    model = copy_model(made, tmp_path)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(made / "cfg.yaml")
    assert main(["sample", "--model", str(model), "--labels", "0", "--out", str(tmp_path / "o")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    (model / "model.safetensors").unlink()
    save_file({"w": torch.zeros(2)}, model / "model.safetensors")
    assert main(["sample", "--model", str(model), "--labels", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "unexpected (1): ['w']" in err and "missing (" in err


CHECKPOINT: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "optimizer truncated": ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:100]), "not a readable checkpoint"),
    "optimizer empty": ("optimizer.pt", lambda p: p.write_bytes(b""), "not a readable checkpoint"),
    "optimizer a list": ("optimizer.pt", lambda p: torch.save([1, 2], p), "expected a mapping"),
    "rng tampered": ("rng.pt", lambda p: p.write_bytes(b"PK\x03\x04garbage"), "not a readable checkpoint"),
    "rng missing": ("rng.pt", lambda p: p.unlink(), "missing"),
    "state.json missing keys": ("state.json", lambda p: p.write_text('{"step": 2}'), "missing bad_samples"),
    "state.json not JSON": ("state.json", lambda p: p.write_text("{"), "not a valid run state"),
    "state.json wrong types": (
        "state.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "position": "x"})),
        "counters must be integers",
    ),
    "ema weights truncated": (
        "ema.safetensors",
        lambda p: p.write_bytes(p.read_bytes()[:50]),
        "not a readable safetensors",
    ),
}


@pytest.mark.parametrize("breakage", list(CHECKPOINT))
def test_broken_latest_checkpoint_says_what_and_how_to_go_on(made: Path, tmp_path: Path, capsys, breakage: str) -> None:
    run = copy_run(made, tmp_path)
    name, breaking, needle = CHECKPOINT[breakage]
    breaking(run / "checkpoints" / "step_0000002" / name)
    assert main(["train", "--out", str(run), "--resume", "latest", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(run / "checkpoints" / "step_0000002") in err
    assert "resume from an older checkpoint" in err and "Traceback" not in err
    older = run / "checkpoints" / "step_0000001"
    assert main(["train", "--out", str(run), "--resume", str(older), "--quiet"]) == 0, "the older one still resumes"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "train.lr=[1, 2"], "not valid YAML"),
        (["--set", "train.lr"], "must look like key.path=value"),
        (["--set", "train.lr=.inf"], "'train.lr' must be finite"),
        (["--set", "train.lr=inf"], "'train.lr' must be float, got 'inf'"),
        (["--set", "diffusion.level_weights=[1, -1]"], "'diffusion.level_weights' must be >= 0"),
        (["--set", "diffusion.logsnr_min=-.inf"], "'diffusion.logsnr_min' must be finite"),
        (["--set", "diffusion.shift_power=.inf"], "'diffusion.shift_power' must be finite"),
        (["--set", "diffusion.mixed_ratio=[1, .inf]"], "'diffusion.mixed_ratio' must be finite"),
        (["--set", "train.sample_guidance=-2"], "'train.sample_guidance' must be >= 0"),
        (["--device", "gpu"], "--device 'gpu': expected cpu, cuda or cuda:N"),
        (["--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),
    ],
)
def test_bad_train_arguments(made: Path, tmp_path: Path, capsys, args: list[str], needle: str) -> None:
    assert main(["train", "--config", str(made / "cfg.yaml"), "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(made: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--config", str(made / "cfg.yaml"), "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "has no CUDA device" in capsys.readouterr().err


def test_scientific_notation_is_a_number(made: Path, tmp_path: Path) -> None:
    from mdm.config import load_config

    cfg = load_config(made / "cfg.yaml", ["train.lr=1e-3", "train.eps=5E-9", "train.weight_decay=-0.0e+0"])
    assert (cfg.train.lr, cfg.train.eps, cfg.train.weight_decay) == (1e-3, 5e-9, 0.0)
    text = re.sub(r"(?m)^  lr: .*$", "  lr: 1e-4", (made / "cfg.yaml").read_text())
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml").train.lr == 1e-4


def test_files_where_folders_belong_and_other_bad_paths(made: Path, tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["train", "--config", str(made / "cfg.yaml"), "--out", str(afile)], "afile: exists and is not a directory"),
        (["sample", "--model", str(made / "model"), "--labels", "0", "--out", str(afile)], "is not a directory"),
        (["data", "pack", str(tmp_path), str(afile)], "is not a directory"),
        (["train", "--config", str(made / "model" / "model.safetensors"), "--out", str(tmp_path / "r")], "not UTF-8"),
        (["sample", "--model", "someone/some-model", "--labels", "0"], "needs the network"),
        (
            ["sample", "--model", str(made / "model"), "--prompt-embeds", str(afile), "--out", str(tmp_path / "o")],
            "afile: not a readable safetensors",
        ),
        (
            [
                "train",
                "--config",
                str(made / "cfg.yaml"),
                "--out",
                str(tmp_path / "r2"),
                "--init-inner-from",
                str(tmp_path),
            ],
            "needs a model directory",
        ),
    ]
    cases += [
        (["data", "check", str(tmp_path), "--min-size", "-1"], "min_size: expected an integer >= 0, got -1"),
        (
            ["data", "pack", str(tmp_path), str(tmp_path / "o"), "--shard-size", "0"],
            "shard_size: expected an integer >= 1",
        ),
        (["sample", "--model", str(made / "model"), "--labels", "0", "--steps", "0"], "num_inference_steps must be in"),
        (["sample", "--model", str(made / "model"), "--labels", "0", "--num", "0"], "must be >= 1"),
        (["sample", "--model", str(made / "model"), "--labels", "0", "--guidance", "-1"], "finite and >= 0"),
        (["sample", "--model", str(made / "model"), "--labels", "0", "--eta", "-0.5"], "eta must be finite and >= 0"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (args, err)
