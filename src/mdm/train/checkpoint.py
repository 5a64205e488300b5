"""Training checkpoints: atomic directories, rotation, a `latest` pointer and exact resume.

A checkpoint `checkpoints/step_NNNNNNN/` holds `model.safetensors` (raw weights), `ema.safetensors`,
`optimizer.pt` (tensors and numbers only; read back with `weights_only=True`), `rng.pt` and `state.json`
(step, phase, data position, counters). It is written to a hidden temporary directory and renamed into
place, then `latest` (a one-line file) is replaced atomically, so a crash at any moment leaves the previous
checkpoint complete and `latest` pointing at it. Weights that are not finite are never written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from mdm import io
from mdm.io import ModelFileError

LATEST = "latest"


class TrainingError(RuntimeError):
    """Training cannot go on: too many non-finite steps in a row, or a run directory that does not match."""


class NonFiniteWeightsError(RuntimeError):
    """Refused to write a checkpoint whose weights contain NaN or infinity."""


@dataclass
class RunState:
    """The run's counters: exactly what `state.json` stores, with the weights, optimizer and RNG beside it."""

    step: int = 0  # optimizer steps taken (over all phases)
    phase: int = 0  # index of the phase the step is in
    position: int = 0  # data-stream position of the next sample
    ema_updates: int = 0  # EMA updates in this phase (its warm-up)
    nonfinite_total: int = 0  # steps skipped for a non-finite loss or gradient
    streak: int = 0  # ... of them in a row, up to now
    bad_samples: int = 0  # unusable samples skipped
    levels: list = field(default_factory=list)  # the phase's levels: sides, or [frames, side] (phases.level_record)
    carried_levels: int = 0  # levels whose weights came from before this phase

    @classmethod
    def from_json(cls, text: str, source: Path) -> RunState:
        """Parse `state.json`; anything missing or mistyped names the file."""
        try:
            data = json.loads(text)
            names = {f.name for f in dataclasses.fields(cls)}
            missing = sorted(names - set(data))
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            state = cls(**{k: data[k] for k in names})
            if not all(isinstance(getattr(state, k), int) for k in names - {"levels"}):
                raise ValueError("counters must be integers")
            return state
        except (ValueError, TypeError, AttributeError) as e:
            raise ModelFileError(f"{source}: not a valid run state ({e})") from None


@dataclass
class Checkpoint:
    """Everything a resumed run restores."""

    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict
    state: RunState


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
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict,
    rng: dict,
    state: RunState,
    keep: int,
) -> Path:
    """Write `checkpoints/step_<step>` atomically, point `latest` at it, delete all but the newest `keep`."""
    _check_finite(model, "the model")
    _check_finite(ema, "the EMA model")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{state.step:07d}"
    with io.atomic_dir(root / name) as tmp:
        save_file({k: v.contiguous() for k, v in model.items()}, tmp / "model.safetensors")
        save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1))
    io.write_text(root / LATEST, name + "\n")
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    abandoned = [p for p in steps if p.name > name]
    kept = [p for p in steps if p.name <= name]
    for old in abandoned + kept[:-keep]:
        shutil.rmtree(old)
    return root / name


def newer(path: Path) -> list[Path]:
    """Checkpoints of the same run newer than `path` (resuming from `path` replaces them at its next save)."""
    return sorted(p for p in path.parent.glob("step_*") if p.is_dir() and p.name > path.name)


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


def _torch_file(path: Path) -> dict:
    """A checkpoint's optimizer or RNG file: plain tensors and containers only (no arbitrary unpickling)."""
    try:
        data = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing") from None
    except Exception as e:  # torch.load raises many types for a truncated, tampered or foreign file
        raise ModelFileError(f"{path}: not a readable checkpoint file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save`; a broken file is a ModelFileError naming it."""
    path = Path(path)
    try:
        return Checkpoint(
            path=path,
            model=io.read_safetensors(path / "model.safetensors")[0],
            ema=io.read_safetensors(path / "ema.safetensors")[0],
            optimizer=_torch_file(path / "optimizer.pt"),
            rng=_torch_file(path / "rng.pt"),
            state=RunState.from_json((path / "state.json").read_text(), path / "state.json"),
        )
    except ModelFileError as e:
        raise ModelFileError(f"{e}; resume from an older checkpoint with --resume {path.parent}/step_NNNNNNN") from None
