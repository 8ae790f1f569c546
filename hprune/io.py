"""File I/O with clear errors: validated safetensors reads, atomic writes of files and folders."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
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


# torch dtype -> safetensors dtype name, in safetensors' layout order: the data section holds the
# tensors by dtype, last of this list first, then by name (the order of safetensors' Dtype enum,
# which its own writer sorts by; tests/test_io.py checks the bytes against the library's).
_ST_LAYOUT = [(torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
              (torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e4m3fnuz, "F8_E4M3FNUZ"),
              (torch.float8_e5m2fnuz, "F8_E5M2FNUZ"), (torch.int16, "I16"), (torch.uint16, "U16"),
              (torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.uint32, "U32"),
              (torch.float32, "F32"), (torch.complex64, "C64"), (torch.float64, "F64"), (torch.int64, "I64"),
              (torch.uint64, "U64")]
_ST_NAME = {dt: name for dt, name in _ST_LAYOUT}
_ST_RANK = {dt: i for i, (dt, _) in enumerate(_ST_LAYOUT)}
_ST_TORCH = {name: dt for dt, name in _ST_LAYOUT}
# Tensors are copied (from a GPU, or to make them contiguous) and checked this many bytes at a time.
CHUNK_BYTES = 64 << 20


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, list[tuple[str, torch.Tensor]]]:
    """The head of the .safetensors encoding of `tensors` (the 8-byte length and the JSON header),
    computed from names, shapes and dtypes alone, and the tensors in the order their bytes follow.

    The bytes are those safetensors writes, except that the header's keys are sorted (safetensors
    writes its metadata in hash-map order, which differs between processes), so the same tensors
    and metadata always give the same file."""
    entries: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise OutputError(f"cannot write {name!r} to safetensors: expected a dense torch.Tensor, got "
                             f"{type(t).__name__}{'' if not isinstance(t, torch.Tensor) else ' ' + str(t.layout)}")
        if t.dtype not in _ST_NAME:
            raise OutputError(f"cannot write {name!r} to safetensors: dtype {t.dtype} is not supported")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise OutputError(f"safetensors metadata must map strings to strings, got {key!r}: {value!r}")
    order = sorted(tensors, key=lambda k: (-_ST_RANK[tensors[k].dtype], k))
    offset = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    doc = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}) | dict(sorted(entries.items()))
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text, [(name, tensors[name]) for name in order]


def tensor_pieces(t: torch.Tensor, limit: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """Views of `t` covering its elements in row-major order, each at most `limit` bytes (or one
    element): slices of a contiguous tensor, blocks of rows (recursively) of another. Whoever
    copies or checks them one at a time needs at most `limit` extra bytes."""
    if t.numel() == 0:
        return
    if t.dim() == 0:
        yield t.reshape(1)
    elif t.numel() * t.element_size() <= limit:
        yield t
    elif t.is_contiguous():
        flat = t.reshape(-1)  # a view
        step = max(1, limit // t.element_size())
        for s in range(0, flat.numel(), step):
            yield flat[s:s + step]
    elif t.shape[0] == 1:
        yield from tensor_pieces(t[0], limit)
    else:
        rows = max(1, limit // (t[0].numel() * t.element_size()))
        for s in range(0, t.shape[0], rows):
            yield from tensor_pieces(t[s:s + rows], limit)


def write_safetensors(f: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                      ) -> tuple[str, int]:
    """Writes the .safetensors encoding of `tensors` (see safetensors_header) to the binary file
    `f`: the header, then each tensor's bytes straight from its memory (a piece of a GPU or
    non-contiguous tensor is copied CHUNK_BYTES at a time), hashing as it goes. Needs no copy
    of the file in memory. Returns (sha256 hex digest, bytes written)."""
    if sys.byteorder != "little":
        raise OutputError("hprune writes safetensors on little-endian machines only")
    head, order = safetensors_header(tensors, metadata)
    h = hashlib.sha256(head)
    f.write(head)
    size = len(head)
    for _, t in order:
        size += write_tensor_bytes(f, t, h)
    return h.hexdigest(), size


def write_tensor_bytes(f: Any, t: torch.Tensor, h: Any = None) -> int:
    """Writes the row-major bytes of `t` (any device, any strides) to the binary file `f` straight
    from its memory, a piece of a GPU or non-contiguous tensor copied CHUNK_BYTES at a time;
    updates the hash `h` if given. Returns the bytes written (numel * element size)."""
    size = 0
    with torch.no_grad():
        for piece in tensor_pieces(t.detach()):
            if piece.device.type != "cpu" or not piece.is_contiguous():
                piece = piece.to("cpu").contiguous()  # at most CHUNK_BYTES
            buf = memoryview(piece.reshape(-1).view(torch.uint8).numpy())
            if h is not None:
                h.update(buf)
            f.write(buf)
            size += buf.nbytes
    return size


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None, overwrite: bool = True) -> tuple[str, int]:
    """Writes `tensors` to `path` deterministically (write_safetensors), atomically: a temporary
    file beside it, synced, then renamed over it. Returns (sha256 hex digest, bytes)."""
    with atomic_file(path, overwrite=overwrite, mode="wb") as f:
        return write_safetensors(f, tensors, metadata)


def header_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a validated .safetensors file as meta-device tensors of their stored shapes
    and dtypes: what can be known (parameter counts, bytes) without reading any tensor data."""
    header = check_safetensors(path)
    out: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _ST_TORCH:
            raise CheckpointError(f"{path}: tensor {name} has dtype {entry['dtype']}, which hprune does not read")
        out[name] = torch.empty([int(d) for d in entry["shape"]], dtype=_ST_TORCH[entry["dtype"]], device="meta")
    return out


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Reads all tensors of a validated .safetensors file."""
    check_safetensors(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None


def check_finite(state: dict[str, torch.Tensor], source: str, chunk_elems: int = 1 << 21,
                 consequence: str = "the file is corrupted (or was saved from a diverged model)") -> None:
    """Refuses NaN or inf in any floating-point tensor (weights, scales, zeros): a model built from
    them would give non-finite outputs everywhere. Checks each tensor `chunk_elems` elements at a
    time: torch.isfinite makes temporaries of several bytes per element (a whole-tensor check
    needed ~2.5x a bf16 tensor); pieces of 2M elements keep them to a few MB, reused from one
    piece to the next."""
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        bad = 0
        with torch.no_grad():
            for piece in tensor_pieces(t, chunk_elems * t.element_size()):
                ok = torch.isfinite(piece)
                if not bool(ok.all()):
                    bad += piece.numel() - int(ok.sum())
        if bad:
            raise CheckpointError(f"{source}: tensor {name} holds {bad} NaN/inf value(s) of {t.numel()}; "
                                  f"{consequence}")


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
            tmp = tmp_sibling(path, "tmp")
            tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            yield tmp
            write_manifest(tmp)
            if path.exists():
                check_output(path, overwrite)  # still ours: nothing was added while we worked
                old = tmp_sibling(path, "old")
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
    tmp = tmp_sibling(path, "tmp")
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
