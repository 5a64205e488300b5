"""`kill -9` of a real `mdm train` process at chosen points, then `--resume latest`: the final weights equal an
uninterrupted run's bit for bit, and nothing temporary is left behind.

The killed process is `python -c SCRIPT`: it wraps one library function so that its n-th call sends SIGKILL to its
own process (inside a checkpoint write, inside a freeze window, while entering a phase, inside save_pretrained),
then runs the CLI. Every process runs with one thread, so float sums are ordered the same in all of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mdm.config import PhaseConfig, save_config
from tests.conftest import tiny_config

KILLER = """
import os, signal, sys
import {module} as target
from mdm.cli import main
real, calls = target.{name}, [0]
def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {nth} and ({when}):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
target.{name} = killing
sys.exit(main(sys.argv[1:]))
"""

POINTS = {
    "inside a checkpoint write": ("torch", "save", 5, "True"),
    "inside a freeze window": ("mdm.train.trainer", "train_step", 5, "True"),
    "while entering a phase": ("mdm.train.phases", "build_phase", 2, "True"),
    "inside save_pretrained": ("mdm.pipeline", "save_file", 1, "'.levels_1.' in str(args[1])"),
    "inside the final save_pretrained": ("mdm.pipeline", "save_file", 2, "'.final.' in str(args[1])"),
}


def run(args: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", script or "import sys; from mdm.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A config (16/8 px, phases of 3 and 4 steps, the inner level frozen for 2) and its uninterrupted weights."""
    root = tmp_path_factory.mktemp("crash")
    cfg = tiny_config(levels=2, text_dim=0, num_classes=4)
    cfg.data.shapes, cfg.data.colors, cfg.data.num_samples = ["circle", "square"], ["red", "blue"], 32
    t = cfg.train
    t.batch_size, t.warmup_steps, t.sample_count, t.checkpoint_every, t.keep_checkpoints = 2, 1, 0, 1, 2
    t.phases = [PhaseConfig(levels=1, steps=3), PhaseConfig(levels=2, steps=4, freeze_inner_steps=2)]
    save_config(cfg.validate("crash"), root / "cfg.yaml")
    done = run(["train", "--config", str(root / "cfg.yaml"), "--out", str(root / "ref"), "--quiet"])
    assert done.returncode == 0, done.stderr
    return root, load_file(root / "ref" / "final" / "model.safetensors")


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_run_resumes_bitwise_and_leaves_nothing(setup: tuple[Path, dict], tmp_path: Path, point: str) -> None:
    root, reference = setup
    module, name, nth, when = POINTS[point]
    out = tmp_path / "run"
    args = ["train", "--config", str(root / "cfg.yaml"), "--out", str(out), "--quiet"]
    killed = run(args, KILLER.format(module=module, name=name, nth=nth, when=when))
    assert killed.returncode == -9, f"the process was not killed at {point}: {killed.stderr[-500:]}"
    resumed = run(["train", "--out", str(out), "--resume", "latest", "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    final = load_file(out / "final" / "model.safetensors")
    assert final.keys() == reference.keys()
    assert all(final[k].equal(reference[k]) for k in final), f"resumed after a kill {point}: weights differ"
    leftovers = [p for p in out.rglob(".*") if "-" in p.name]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    assert (out / "phases" / "levels_1" / "model.safetensors").is_file()
