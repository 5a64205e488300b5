"""Read tensors out of a `torch.save` zip archive without executing anything it pickled.

ml-mdm checkpoints pickle their trainer arguments as objects of modules that do not exist. A restricted
unpickler resolves only torch's tensor-rebuild helpers, storage types and OrderedDict; every other global
becomes an inert placeholder that ignores its arguments and state, so no foreign code is ever imported or run.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """The file is not a readable torch zip archive, or holds no tensors we can use."""


class Placeholder:
    """Stands in for any pickled global outside the allowlist; accepts and discards everything."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> Placeholder:
        return Placeholder()


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _rebuild_tensor(
    storage: torch.UntypedStorage | torch.TypedStorage, offset: int, size: tuple, stride: tuple, *_: object
) -> torch.Tensor:
    """A tensor view over a storage (the `_rebuild_tensor_v2` contract; grad and hooks are ignored)."""
    t = torch.empty(0, dtype=storage.dtype)
    t.set_(storage, offset, size, stride)
    return t


def _rebuild_parameter(data: torch.Tensor, *_: object) -> torch.Tensor:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, byteorder: str) -> None:
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: dict[str, torch.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        return Placeholder

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid[:5]
        if not isinstance(dtype, torch.dtype):
            raise UnsafeCheckpointError(f"unsupported storage type {dtype!r} in checkpoint")
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise UnsafeCheckpointError(f"storage {key} missing from the archive") from None
            flat = (
                torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if raw else torch.empty(0, dtype=dtype)
            )
            if self.byteorder == "big" and flat.element_size() > 1:
                flat = torch.from_numpy(flat.numpy().byteswap())
            if flat.numel() != numel:
                raise UnsafeCheckpointError(f"storage {key}: {flat.numel()} values, header says {numel}")
            self.storages[key] = flat.untyped_storage()
        storage = self.storages[key]
        return torch.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def restricted_load(path: str | Path) -> Any:
    """Unpickle a torch zip checkpoint with tensors intact and every foreign object replaced by a Placeholder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(
            f"{path}: not a torch zip archive (legacy pickle checkpoints are refused: they can run code)"
        )
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise UnsafeCheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkls)}")
        prefix = pkls[0][: -len("/data.pkl")] if "/" in pkls[0] else ""
        order_name = f"{prefix}/byteorder"
        byteorder = archive.read(order_name).decode() if order_name in archive.namelist() else "little"
        with archive.open(pkls[0]) as f:
            try:
                return _RestrictedUnpickler(f, archive, prefix, byteorder).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
                raise UnsafeCheckpointError(f"{path}: cannot read the pickled data: {e}") from None


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a checkpoint (`state_dict` of an ml-mdm file, or a plain tensor dict) plus plain metadata.

    Tries torch's own weights-only loader first; falls back to the restricted unpickler.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        obj = restricted_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd, meta = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    elif isinstance(obj, dict):
        sd, meta = obj, {}
    else:
        raise UnsafeCheckpointError(f"{path}: expected a dict of tensors or a dict with 'state_dict'")
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UnsafeCheckpointError(f"{path}: no tensors found")
    plain = {k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))}
    return tensors, plain
