"""What hprune owns on disk: the one place that decides what hprune may delete or replace.

Every folder hprune writes (an output folder, an OUT-checkpoints folder) carries a manifest,
`.hprune-output`, listing each file it wrote with its size and a content digest, and each folder
it made. hprune deletes or replaces a file only when the manifest lists it and the file is
unchanged; anything else present (a user's notes, a file of the same name with other contents, a
manifest copied from elsewhere next to the user's own files) is left where it is and named.

Temporary names are recognisable (`.NAME.tmp-xxxxxxxx`, `.NAME.old-xxxxxxxx` beside an output,
`.step-NNNNNNN.tmp` inside a checkpoint folder): those left behind by a killed run are removed by
the next run that holds the output's lock (`output_lock`), and are never taken for an artifact.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from hprune.errors import OutputError

MANIFEST = ".hprune-output"
MANIFEST_FORMAT = "hprune.manifest/1"
# A file up to this size is hashed whole; a larger one by its size and SAMPLE_BLOCKS evenly spaced
# blocks (first and last included): content-based, yet a 20 GB checkpoint costs ~4 MiB of reads.
FULL_HASH_BYTES = 64 << 20
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 32, 128 << 10
_TMP_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-[0-9a-f]{8}$")
_STEP_TMP = re.compile(r"^\.step-\d+\.tmp$")
# errno values of a write that failed for lack of room or rights: one line, not a traceback
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


# -- digests -------------------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike) -> str:
    """sha256 of the file when it is at most FULL_HASH_BYTES, else "sampled:" + sha256 of its size
    and SAMPLE_BLOCKS blocks of SAMPLE_BLOCK_BYTES spread evenly over it."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            while block := f.read(1 << 22):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        last = size - SAMPLE_BLOCK_BYTES
        for i in range(SAMPLE_BLOCKS):
            f.seek(last * i // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    return "sampled:" + h.hexdigest()


TENSOR_SAMPLE = 4096  # elements per tensor that tensor_digest hashes exactly


def tensor_digest(named: Iterable[tuple[str, Any]]) -> str:
    """A content fingerprint of named tensors (a model's weights, a calibration set), cheap at any
    size: per tensor its name, dtype, shape, TENSOR_SAMPLE elements at evenly spaced positions
    (exact values) and the float64 sum of all its elements (one read of the tensor, no copy kept).
    Another checkpoint, seed or fine-tune changes it; so does a change to any single weight that
    moves the sum. 16 hex digits."""
    import torch

    h = hashlib.sha256()
    for name, t in named:
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel() == 0 or t.device.type == "meta":
            continue
        flat = t.reshape(-1)
        if flat.numel() > TENSOR_SAMPLE:
            idx = torch.linspace(0, flat.numel() - 1, TENSOR_SAMPLE, device=flat.device).long()
            flat = flat[idx]
        total = t.sum(dtype=torch.float64) if (t.is_floating_point() or t.dtype != torch.bool) else t.sum()
        h.update(flat.to(torch.float64).cpu().numpy().tobytes())
        h.update(total.to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "digest": file_digest(path)}


# -- the manifest --------------------------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """{"files": {relative path: {"bytes", "digest"}}, "dirs": [relative path]} of `folder`, or
    None when it has no manifest or one hprune cannot use (unreadable, or the name list that hprune
    0.x wrote, which proves nothing about the files present)."""
    path = Path(folder) / MANIFEST
    if not path.is_file() or path.is_symlink():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        return None
    files, dirs = doc.get("files"), doc.get("dirs", [])
    if not isinstance(files, dict) or not isinstance(dirs, list):
        return None
    if not all(isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("digest"), str)
               for v in files.values()):
        return None
    return {"files": files, "dirs": [d for d in dirs if isinstance(d, str)]}


def _write_manifest(folder: Path, files: dict[str, Any], dirs: list[str]) -> None:
    doc = {"format": MANIFEST_FORMAT, "producer": "hprune", "files": dict(sorted(files.items())),
           "dirs": sorted(set(dirs))}
    tmp = folder / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, folder / MANIFEST)
    finally:
        if tmp.exists():
            tmp.unlink()


def _walk(folder: Path) -> tuple[list[str], list[str]]:
    """(files, dirs) under `folder`, relative POSIX paths, the manifest excluded; links count as files."""
    files, dirs = [], []
    for root, dnames, fnames in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for d in list(dnames):
            if (Path(root) / d).is_symlink():
                dnames.remove(d)
                fnames.append(d)
            else:
                dirs.append((rel / d).as_posix())
        files += [(rel / f).as_posix() for f in fnames if not (rel == Path(".") and f == MANIFEST)]
    return sorted(files), sorted(dirs)


def write_manifest(folder: str | os.PathLike) -> None:
    """Records every file and folder now under `folder` as written by hprune (call it on a folder
    hprune has just filled, before it is renamed into place)."""
    folder = Path(folder)
    files, dirs = _walk(folder)
    _write_manifest(folder, {f: _entry(folder / f) for f in files}, dirs)


def add_to_manifest(folder: str | os.PathLike, paths: list[str] | dict[str, Path], dirs: list[str] = ()) -> None:
    """Adds files and folders (relative to `folder`) to `folder`'s manifest. `paths` is a list of
    files already in place, or {relative path: where the file is now}, to record a folder's files
    before it is renamed into place (a kill in between leaves listed files absent, never unlisted ones)."""
    folder = Path(folder)
    man = read_manifest(folder) or {"files": {}, "dirs": []}
    where = paths if isinstance(paths, dict) else {rel: folder / rel for rel in paths}
    for rel, src in where.items():
        man["files"][rel] = _entry(Path(src))
    _write_manifest(folder, man["files"], man["dirs"] + list(dirs))


def _is_temp(rel: str) -> bool:
    """A temporary name hprune uses inside a folder it owns (left by a killed write)."""
    first, _, _ = rel.partition("/")
    return bool(_TMP_SIBLING.match(first) or _STEP_TMP.match(first))


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """The entries under `folder` that hprune may not delete: with no usable manifest, every entry;
    otherwise each file the manifest does not list, or lists with another size or digest (and each
    folder it did not make). Its own temporary names are not foreign. Empty list: all hprune's."""
    folder = Path(folder)
    files, dirs = _walk(folder)
    man = read_manifest(folder)
    if man is None:
        return sorted(p.name for p in folder.iterdir())
    listed, made = man["files"], set(man["dirs"])
    bad = []
    for rel in files:
        if _is_temp(rel):
            continue
        want = listed.get(rel)
        p = folder / rel
        if want is None or p.is_symlink() or p.stat().st_size != want["bytes"] or file_digest(p) != want["digest"]:
            bad.append(rel)
    bad += [d for d in dirs if d not in made and not _is_temp(d)]
    return sorted(bad)


def remove_owned(folder: str | os.PathLike, under: str | None = None) -> list[str]:
    """Deletes what hprune wrote under `folder` (or under its sub-folder `under`): the files its
    manifest lists and that are unchanged, its temporary names, then the folders it made once they
    are empty; the manifest follows once nothing of hprune's is left. Returns what was left (the
    foreign entries, relative to `folder`); [] when `folder` is gone or was absent."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    man = read_manifest(folder)
    if man is None:
        return foreign_entries(folder)
    foreign = set(foreign_entries(folder))
    prefix = None if under is None else under.rstrip("/") + "/"
    inside = (lambda rel: True) if prefix is None else (lambda rel: rel == under or rel.startswith(prefix))
    files, dirs = _walk(folder)
    for rel in files:
        if inside(rel) and rel not in foreign:
            (folder / rel).unlink(missing_ok=True)
            man["files"].pop(rel, None)
    for d in sorted(dirs, key=lambda d: -d.count("/")):  # deepest first
        if inside(d) and d not in foreign and (d in man["dirs"] or _is_temp(d)):
            with contextlib.suppress(OSError):
                (folder / d).rmdir()  # only once empty: a foreign file inside keeps it
            if not (folder / d).exists() and d in man["dirs"]:
                man["dirs"].remove(d)
    if under is None:
        man["files"] = {k: v for k, v in man["files"].items() if (folder / k).exists()}
    if under is None and not any(p.name != MANIFEST for p in folder.iterdir()):
        (folder / MANIFEST).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()
        return []
    _write_manifest(folder, man["files"], man["dirs"])
    return sorted(r for r in foreign if inside(r))


def claim_folder(folder: str | os.PathLike, what: str) -> Path:
    """Makes `folder` a folder hprune may write into and later remove (`what` names it in errors):
    created with an empty manifest when absent; accepted when it has a manifest (an earlier hprune
    run's); refused with OutputError when it is a file or holds anything without a manifest."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputError(f"{what} {folder} is a file (or a link), not a folder hprune made; move it or choose "
                          f"another --out")
    if folder.is_dir():
        if read_manifest(folder) is not None:
            return folder
        entries = sorted(p.name for p in folder.iterdir())
        if entries:
            raise OutputError(f"{what} {folder} exists and holds {entries[0]!r}, which hprune did not write; "
                              f"hprune will not write into it or remove it: move it or choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_manifest(folder, {}, [])
    except OSError as exc:
        raise OutputError(f"cannot write {what} {folder}: {exc.strerror or exc}") from None
    return folder


# -- temporary names and the output lock -----------------------------------------------------------------
def tmp_sibling(path: Path, tag: str) -> Path:
    """A fresh temporary name next to `path` (tag "tmp" or "old"), recognisable by stale_temps."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def is_temp_path(path: str | os.PathLike) -> bool:
    """True for a temporary name hprune writes beside an output (a kill can leave one behind)."""
    return bool(_TMP_SIBLING.match(Path(path).name))


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Removes the temporaries a killed hprune run left beside `path` (`.NAME.tmp-xxxxxxxx`,
    `.NAME.old-xxxxxxxx`). Call only while holding output_lock(path): then no live run uses them."""
    path = Path(path)
    gone = []
    if not path.parent.is_dir():
        return gone
    for p in path.parent.iterdir():
        m = _TMP_SIBLING.match(p.name)
        if m and m["name"] == path.name:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


_HELD: dict[str, list[Any]] = {}  # lock path -> [fd, depth]: re-entrant within a process


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Holds an exclusive lock on output `path` (a `.NAME.hprune-lock` file beside it, removed on
    release) so that a second run on the same output stops at once with OutputError instead of
    finding out after all its work. Re-entrant within a process. Then removes stale temporaries."""
    import fcntl

    path = Path(os.path.abspath(os.path.expanduser(path)))
    lock = path.parent / f".{path.name}.hprune-lock"
    key = str(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    if not path.parent.is_dir():  # nothing to lock against yet: the folder above is made by the writer
        yield path
        return
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only place: the write itself fails later with a clear message
            yield path
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # a file system without locks (some network mounts): go on unlocked, as before
                with contextlib.suppress(OSError):
                    lock.unlink()
                yield path
                return
            owner = ""
            with contextlib.suppress(OSError, ValueError):
                owner = f" (pid {int(lock.read_text().strip())})"
            raise OutputError(f"another hprune run{owner} is writing {path}; wait for it to finish or choose "
                              f"another output") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and flock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = [fd, 1]
    try:
        clean_stale_temps(path)
        yield path
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def write_error(exc: OSError, what: str | os.PathLike) -> OutputError | None:
    """OutputError for a write that failed for lack of room or rights (disk full, quota, read-only),
    else None (the caller re-raises)."""
    if exc.errno in WRITE_ERRNOS:
        return OutputError(f"cannot write {what}: {exc.strerror or os.strerror(exc.errno)} (nothing was written)")
    return None
