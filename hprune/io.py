"""File I/O with clear errors: validated safetensors reads, atomic writes of files and folders."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from hprune.errors import CheckpointError, OutputExistsError

_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                   "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Validates a .safetensors file without reading its tensors; returns its header.

    Raises CheckpointError naming the problem: missing file, truncated file, header that is not
    JSON, tensor entries whose byte ranges do not match their shape/dtype or the file size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes; not even a header)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupted safetensors file "
                                  f"(header claims {n} bytes, file has {size - 8} after the length)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupted safetensors header (bad entry for {name!r})") from None
        numel = 1
        for d in shape:
            numel *= int(d)
        if dtype in _ST_DTYPE_BYTES and end - start != numel * _ST_DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: corrupted safetensors file ({name!r}: {end - start} bytes for "
                                  f"shape {shape} of {dtype})")
        end_max = max(end_max, end)
    data = size - 8 - n
    if end_max > data:
        raise CheckpointError(f"{path}: truncated safetensors file (tensor data needs {end_max} bytes, "
                              f"file has {data})")
    return header


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Reads all tensors of a validated .safetensors file."""
    check_safetensors(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted {what} ({exc})") from None


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raises OutputExistsError if `path` exists and overwrite is off; returns it as a Path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output path exists: {path} (choose another or pass overwrite)")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder; on success it is renamed to `path` in one step, on any
    failure it is deleted, so `path` is either absent, the old content, or complete."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = _tmp_sibling(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True, mode: str = "w") -> Iterator[Any]:
    """Opens a temporary sibling file for writing; renamed over `path` only when the block succeeds."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> None:
    with atomic_file(path, overwrite=overwrite) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
