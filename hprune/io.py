"""File I/O with clear errors: validated safetensors reads, atomic writes of files and folders."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from hprune.errors import CheckpointError, OutputError, OutputExistsError
from hprune.owned import (MANIFEST, foreign_entries, output_lock, read_manifest, remove_owned, tmp_sibling,
                           write_error, write_manifest)

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


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The .safetensors encoding of `tensors`, byte for byte the same for the same tensors and
    metadata: safetensors writes its header's metadata in hash-map order, which differs between
    processes, so the header is re-encoded with sorted keys (the tensor data is untouched)."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    doc = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | dict(sorted(header.items()))
    text = json.dumps(doc, separators=(",", ":"), sort_keys=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` to `path` deterministically (safetensors_bytes)."""
    with open(path, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata))


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Reads all tensors of a validated .safetensors file."""
    check_safetensors(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuses NaN or inf in any floating-point tensor (weights, scales, zeros): a model built from
    them would give non-finite outputs everywhere."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor {name} holds {bad} NaN/inf value(s) of {t.numel()}; the "
                                  f"file is corrupted (or was saved from a diverged model)")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted {what} ({exc})") from None


# Every folder hprune writes carries a manifest of what it wrote (hprune.owned): `overwrite`
# replaces a folder only while it holds nothing but those files, unchanged.
OUTPUT_MARKER = MANIFEST
_tmp_sibling = tmp_sibling


def _hprune_format(path: Path) -> str | None:
    """The "format" an hprune JSON document or safetensors file declares ("hprune.<kind>/<n>"), else None."""
    try:
        if path.suffix == ".safetensors":
            meta = check_safetensors(path).get("__metadata__") or {}
            fmt = meta.get("format") if meta.get("producer", "hprune") == "hprune" else None
        else:
            with open(path, "rb") as f:
                doc = json.loads(f.read(1 << 26).decode("utf-8"))
            fmt = doc.get("format") if isinstance(doc, dict) else None
    except (OSError, ValueError, CheckpointError):
        return None
    return fmt if isinstance(fmt, str) and fmt.startswith("hprune.") else None


def _foreign_entry(folder: Path) -> str | None:
    """None if `folder` is empty or holds only what hprune's manifest lists, unchanged; else why
    not, naming the first entry hprune may not delete (a file it did not write, or one changed since)."""
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return None
    if read_manifest(folder) is None:
        return f"holds {names[0]!r}, which hprune did not write (no {OUTPUT_MARKER} manifest of hprune's files there)"
    bad = foreign_entries(folder)
    return f"holds {bad[0]!r}, which hprune did not write (or which changed since)" if bad else None


def _check_writable(path: Path) -> None:
    """Raises OutputError unless `path` could be created: its nearest existing ancestor is a folder
    hprune can create files in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hprune-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {parent} does not take new files ({exc.strerror or exc})") from None


def check_output(path: str | os.PathLike, overwrite: bool = False, kind: str = "folder") -> Path:
    """Checks, before any work, that `path` can take an output of `kind` ("folder" or "file");
    returns it as an absolute Path. Raises:
      OutputExistsError if it exists and overwrite is off;
      OutputError if it exists but is not an output hprune wrote (a folder holding anything hprune
      did not write, a file that is not an hprune JSON / safetensors document, a file where a folder
      goes or the reverse), if it is the current folder or one above it, or if nothing can be
      created there (under a file, on a read-only or virtual file system)."""
    shown = Path(path)
    path = Path(os.path.abspath(os.path.expanduser(path)))
    cwd = Path.cwd()
    if path == cwd or path in cwd.parents or path == path.parent:
        raise OutputError(f"output path {shown} is the current folder or contains it; name a new folder")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output path exists: {shown} (choose another, or pass --overwrite to replace "
                                    f"an output hprune wrote)")
        if kind == "folder":
            if not path.is_dir() or path.is_symlink():
                raise OutputError(f"--overwrite: {shown} is a file, not a folder hprune wrote; remove it or choose "
                                  f"another output")
            foreign = _foreign_entry(path)
            if foreign is not None:
                raise OutputError(f"--overwrite: {shown} {foreign}; hprune replaces only its own outputs (remove "
                                  f"it or choose another folder)")
        else:
            if not path.is_file():
                raise OutputError(f"--overwrite: {shown} is a folder; this output is a file")
            if _hprune_format(path) is None:
                raise OutputError(f"--overwrite: {shown} is not a file hprune wrote; hprune replaces only its own "
                                  f"outputs (remove it or choose another name)")
    _check_writable(path)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder; on success it is renamed to `path` in one step, on any
    failure it is deleted, so `path` is either absent, the old content, or complete. An existing
    `path` is replaced only with `overwrite` and only if it is an output hprune wrote (check_output);
    the folder gets a manifest of what was written (hprune.owned). Holds the output's lock
    throughout; a write that fails for lack of room or rights is an OutputError."""
    with output_lock(path):
        path = check_output(path, overwrite)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_sibling(path, "tmp")
            tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            yield tmp
            write_manifest(tmp)
            if path.exists():
                check_output(path, overwrite)  # still ours: nothing was added while we worked
                old = _tmp_sibling(path, "old")
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)
                    raise
                left = remove_owned(old)  # only what the manifest lists, unchanged
                if left:
                    import warnings

                    warnings.warn(f"{path}: {len(left)} file(s) hprune did not write appeared while it worked "
                                  f"(e.g. {left[0]}); they are kept in {old}", UserWarning, stacklevel=3)
            else:
                os.replace(tmp, path)
        except OSError as exc:
            err = write_error(exc, path)
            if err is None:
                raise
            raise err from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True, mode: str = "w") -> Iterator[Any]:
    """Opens a temporary sibling file for writing; renamed over `path` only when the block succeeds.
    A write that fails for lack of room or rights (disk full) is an OutputError, with no temporary left."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; this output is a file")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output path exists: {path} (choose another, or pass --overwrite to replace it)")
    tmp = _tmp_sibling(path, "tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, mode)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        err = write_error(exc, path)
        if err is None:
            raise
        raise err from None
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
