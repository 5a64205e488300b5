"""Training checkpoints: atomic directories, rotation, a `latest` pointer and exact resume.

A checkpoint `checkpoints/step_NNNNNNN/` holds `model.safetensors` (raw weights), `ema.safetensors`,
`optimizer.pt` (tensors and numbers only; read back with `weights_only=True`), `rng.pt` and `state.json`
(step, phase, data position, counters). It is written to a hidden temporary directory and renamed into
place, then `latest` (a one-line file) is replaced atomically, so a crash at any moment leaves the previous
checkpoint complete and `latest` pointing at it. Weights that are not finite are never written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


class TrainingError(RuntimeError):
    """Training cannot go on: too many non-finite steps in a row, or a run directory that does not match."""


class NonFiniteWeightsError(RuntimeError):
    """Refused to write a checkpoint whose weights contain NaN or infinity."""


@dataclass
class Checkpoint:
    """Everything a resumed run restores."""

    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict
    state: dict


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeightsError(f"not writing a checkpoint: {what} has non-finite values in {bad[:5]}")


def rng_state(device: torch.device) -> dict:
    """The global RNG states a run consumes (CPU, and the CUDA device when training on one)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(
    run_dir: str | Path,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict,
    rng: dict,
    state: dict,
    keep: int,
) -> Path:
    """Write `checkpoints/step_<step>` atomically, point `latest` at it, delete all but the newest `keep`."""
    _check_finite(model, "the model")
    _check_finite(ema, "the EMA model")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".step_*.tmp-*"), *root.glob(".step_*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:07d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model.items()}, tmp / "model.safetensors")
    save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    final = root / name
    if final.exists():
        aside = root / f".{name}.old-{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        _write_atomic_text(root / LATEST, name + "\n")
        shutil.rmtree(aside)
    else:
        os.replace(tmp, final)
        _write_atomic_text(root / LATEST, name + "\n")
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    abandoned = [p for p in steps if p.name > name]
    kept = [p for p in steps if p.name <= name]
    for old in abandoned + kept[:-keep]:
        shutil.rmtree(old)
    return final


def resolve(run_dir: str | Path, which: str = LATEST) -> Path:
    """`latest` (the newest complete checkpoint of `run_dir`) or an explicit checkpoint directory."""
    if which != LATEST:
        path = Path(which)
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint directory (no state.json)")
        return path
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from ({pointer} is missing)")
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save` (no arbitrary unpickling)."""
    path = Path(path)
    return Checkpoint(
        path=path,
        model=load_file(path / "model.safetensors"),
        ema=load_file(path / "ema.safetensors"),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        rng=torch.load(path / "rng.pt", weights_only=True),
        state=json.loads((path / "state.json").read_text()),
    )
