"""The streaming safetensors writer (hprune.io.save_safetensors), the chunked finiteness check and
header-only reading: same bytes as the safetensors library, bounded memory, no data read."""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hprune.errors import CheckpointError
from hprune.io import check_finite, header_tensors, save_safetensors, tensor_pieces

ROOT = Path(__file__).resolve().parents[1]


def oracle_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """What hprune wrote before the streaming writer: the safetensors library's own encoding with
    the header re-encoded with sorted keys (safetensors writes metadata in hash-map order)."""
    from safetensors.torch import save

    raw = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    doc = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | dict(sorted(header.items()))
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def _odd_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 29, generator=g)
    t = {
        "z.f32": torch.randn(5, 7, generator=g),
        "a.bf16": torch.randn(3, 65, generator=g).to(torch.bfloat16),
        "m.f16": torch.randn(11, generator=g).half(),
        "b.f64": torch.randn(2, 3, 4, generator=g).double(),
        "c.i8": torch.randint(-128, 127, (9, 13), generator=g, dtype=torch.int8),
        "d.u8": torch.randint(0, 255, (4, 33), generator=g, dtype=torch.uint8),  # packed 4-bit codes
        "e.i32": torch.randint(-9, 9, (7,), generator=g, dtype=torch.int32),
        "f.i64": torch.arange(6).reshape(2, 3),
        "g.i16": torch.arange(10, dtype=torch.int16),
        "h.bool": torch.rand(17, generator=g) > 0.5,
        "i.f8": torch.randn(19, generator=g).to(torch.float8_e4m3fn),
        "j.f8e5": torch.randn(3, 3, generator=g).to(torch.float8_e5m2),
        "k.scalar": torch.tensor(3.5),
        "l.empty": torch.zeros(0, 4),
        "n.transposed": base.t(),  # non-contiguous
        "o.strided": base[::3, 1::2],  # non-contiguous, not a transpose
        "p.u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
        "q.bf16.T": torch.randn(8, 6, generator=g).to(torch.bfloat16).t(),
        "ü.unicode": torch.ones(2),
    }
    return t


@pytest.mark.parametrize("meta", [None, {}, {"format": "pt", "producer": "hprune", "ä": "ö", "a": "1"}])
def test_same_bytes_as_the_safetensors_library_on_odd_dtypes_and_shapes(tmp_path, meta):
    tensors = _odd_tensors()
    want = oracle_bytes(tensors, meta)
    sha, n = save_safetensors(tensors, tmp_path / "x.safetensors", meta)
    got = (tmp_path / "x.safetensors").read_bytes()
    assert got == want
    assert sha == hashlib.sha256(want).hexdigest() and n == len(want)  # hashed as written


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_same_bytes_as_the_safetensors_library_on_tiny_models(tmp_path, name):
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "tests"))
    from util import fresh

    from hprune.artifacts import save_compressed
    from hprune.quant import quantize_model

    m = fresh(name)
    quantize_model(m, method="rtn")  # packed uint8 codes + bf16/fp32 scales
    save_compressed(m, tmp_path / "art")
    state = {k: v.detach() for k, v in m.state_dict().items()}
    want = oracle_bytes(state, {"format": "pt", "producer": "hprune"})
    assert (tmp_path / "art" / "model.safetensors").read_bytes() == want
    doc = json.loads((tmp_path / "art" / "hprune.json").read_text())
    assert doc["weights"]["sha256"] == hashlib.sha256(want).hexdigest() and doc["weights"]["bytes"] == len(want)


def test_pieces_cover_the_tensor_in_order_within_the_limit():
    g = torch.Generator().manual_seed(1)
    for t in (torch.randn(40, 30, generator=g), torch.randn(40, 30, generator=g).t(),
              torch.randn(3, 50, 7, generator=g)[:, ::2].transpose(1, 2), torch.randn(1, 1, 300, generator=g)[..., ::3],
              torch.randn(1000, generator=g)[::7], torch.tensor(2.0)):
        pieces = list(tensor_pieces(t, limit=64))
        assert all(p.numel() * p.element_size() <= 64 for p in pieces)
        assert torch.equal(torch.cat([p.reshape(-1) for p in pieces]), t.reshape(-1))


def test_the_write_is_atomic(tmp_path, monkeypatch):
    """A failure half-way leaves the old file (or none) and no temporary sibling."""
    import hprune.io

    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.ones(3)}, path)
    old = path.read_bytes()

    def broken(t, limit=hprune.io.CHUNK_BYTES):
        yield t
        raise OSError("disk full")

    monkeypatch.setattr(hprune.io, "tensor_pieces", broken)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"a": torch.zeros(3), "b": torch.zeros(2)}, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def _peak_extra(code: str) -> dict:
    """Runs `code` in a fresh process (after `setup`); it measures the high-water mark of the
    resident memory above what was resident before the measured call (VmHWM reset via clear_refs)."""
    prelude = (
        "import json, os, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "def rss(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key + ':'): return int(line.split()[1]) * 1024\n"
        "def measure(fn):\n"
        "    before = rss('VmRSS')\n"
        "    open('/proc/self/clear_refs', 'w').write('5')\n"
        "    fn()\n"
        "    return rss('VmHWM') - before\n")
    r = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


needs_proc = pytest.mark.skipif(not _can_reset_hwm(), reason="needs /proc/self/clear_refs (Linux)")


@needs_proc
def test_save_compressed_needs_no_second_copy_of_the_weights(tmp_path):
    """save_compressed of a ~300 MB model (SD3 blocks of width 1024, bf16) raises the
    memory high-water mark by far less than one copy of the file: it streams tensor by tensor
    (the former writer built the file in memory, then sliced and joined it: ~3 extra copies)."""
    code = (
        "from hprune.artifacts import save_compressed\n"
        "from hprune.models.registry import build_from_config\n"
        "cfg = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,\n"
        "           num_attention_heads=16, joint_attention_dim=1024, caption_projection_dim=1024,\n"
        "           pooled_projection_dim=512, out_channels=16, pos_embed_max_size=96)\n"
        "m = build_from_config('SD3Transformer2DModel', cfg, seed=0, dtype=torch.bfloat16)\n"
        "sd = m.state_dict()\n"
        "total = sum(t.numel() * t.element_size() for t in sd.values())\n"
        "big = max(t.numel() * t.element_size() for t in sd.values())\n"
        "extra = measure(lambda: save_compressed(m, sys.argv[1]))\n"
        "print(json.dumps({'extra': extra, 'total': total, 'big': big}))\n")
    res = _peak_extra(code.replace("sys.argv[1]", repr(str(tmp_path / "art"))))
    assert res["total"] > 250e6
    # bound: one chunk (64 MB) + allocator slack (measured: < 1 MB); one extra copy would be > 250 MB
    assert res["extra"] < 64e6 + 64e6, res


@needs_proc
def test_check_finite_works_in_bounded_memory_and_finds_a_deep_nan():
    """A 400 MB float32 tensor is checked with far less than its own size of extra memory (the
    former whole-tensor torch.isfinite took ~1.8x its size), and a NaN in its last chunk is still
    found and named."""
    code = (
        "from hprune.io import check_finite\n"
        "from hprune.errors import CheckpointError\n"
        "check_finite({'w': torch.ones(2**22)}, 'f')  # pages torch's kernels in before the measure\n"
        "t = torch.ones(100 * 2**20)\n"
        "extra = measure(lambda: check_finite({'w': t}, 'f'))\n"
        "t[-5] = float('nan'); t[3 * 2**20] = float('inf')\n"
        "try:\n"
        "    check_finite({'ok': torch.ones(3), 'big.weight': t}, 'file.safetensors')\n"
        "    msg = None\n"
        "except CheckpointError as exc:\n"
        "    msg = str(exc)\n"
        "print(json.dumps({'extra': extra, 'msg': msg}))\n")
    res = _peak_extra(code)
    assert res["msg"] and "tensor big.weight holds 2 NaN/inf value(s) of 104857600" in res["msg"]
    assert res["msg"].startswith("file.safetensors: ")
    # measured 0-47 MB on a busy machine (pieces of 2M elements); the whole-tensor check took ~730 MB,
    # its bool mask alone 100 MB
    assert res["extra"] < 100e6, res


def test_check_finite_in_small_chunks_counts_exactly():
    t = torch.randn(1000, 37).t()  # non-contiguous
    t[5, 999] = float("-inf")
    t[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="tensor x holds 2 NaN/inf value"):
        check_finite({"x": t}, "src", chunk_elems=64)
    check_finite({"y": torch.randn(1000, 37).to(torch.bfloat16), "i": torch.zeros(3, dtype=torch.int8)}, "src",
                 chunk_elems=64)


def test_header_tensors_read_shapes_and_dtypes_only(tmp_path):
    tensors = _odd_tensors()
    path = tmp_path / "x.safetensors"
    save_safetensors(tensors, path)
    got = header_tensors(path)
    assert {k: (v.dtype, tuple(v.shape), v.device.type) for k, v in got.items()} == \
           {k: (v.dtype, tuple(v.shape), "meta") for k, v in tensors.items()}


def _garble_data(path: Path) -> None:
    """Overwrites a safetensors file's tensor data with 0xFF bytes (NaN in every float tensor),
    keeping its header valid."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n:] = b"\xff" * (len(raw) - 8 - n)
    path.write_bytes(bytes(raw))


def test_info_counts_from_the_headers_without_reading_a_weight(tmp_path, capsys, monkeypatch):
    """`hprune info` on a diffusers folder, a lone .safetensors file and a (4-bit) artifact whose
    tensor data is all NaN bytes: the same counts as for the intact model, and no tensor data is
    read (the safetensors readers refuse to run; hprune.io reads nothing past the headers)."""
    import builtins
    import shutil

    sys.path.insert(0, str(ROOT / "tests"))
    from util import fresh

    import hprune.artifacts
    import hprune.io
    import safetensors
    import safetensors.torch
    from hprune.artifacts import save_compressed
    from hprune.cli import main
    from hprune.models import model_report
    from hprune.quant import quantize_model

    dense, quant = fresh("tiny-sd3").to(torch.bfloat16), fresh("tiny-flux")
    quantize_model(quant, method="rtn")
    dense.save_pretrained(tmp_path / "folder")
    (tmp_path / "lone").mkdir()
    shutil.copy(tmp_path / "folder" / "config.json", tmp_path / "lone" / "config.json")
    shutil.copy(tmp_path / "folder" / "diffusion_pytorch_model.safetensors", tmp_path / "lone" / "w.safetensors")
    save_compressed(quant, tmp_path / "art")
    cases = [(tmp_path / "folder", tmp_path / "folder" / "diffusion_pytorch_model.safetensors", dense),
             (tmp_path / "lone" / "w.safetensors", tmp_path / "lone" / "w.safetensors", dense),
             (tmp_path / "art", tmp_path / "art" / "model.safetensors", quant)]
    for _, wfile, _ in cases:
        _garble_data(wfile)

    def refuse(*a, **k):
        raise AssertionError("tensor data read")

    read = {"bytes": 0}
    real_open = builtins.open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            read["bytes"] += len(data)
            return data

    def counting_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Counting(f) if str(file).endswith(".safetensors") and "b" in mode else f

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse)
    monkeypatch.setattr(hprune.io, "load_safetensors", refuse)
    monkeypatch.setattr(hprune.artifacts, "_sha256", refuse)
    monkeypatch.setattr(hprune.io, "open", counting_open, raising=False)
    for spec, wfile, model in cases:
        read["bytes"] = 0
        code = main(["info", str(spec), "--json"])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        got, want = json.loads(cap.out), model_report(model)
        for key in ("params", "block_params", "bytes_stored", "bytes_bf16", "bytes_int4", "blocks"):
            assert got[key] == want[key], (spec, key)
        (n,) = struct.unpack("<Q", wfile.read_bytes()[:8])
        assert 0 < read["bytes"] <= 2 * (8 + n), spec  # the header (read once per check), never the data


def test_what_safetensors_cannot_hold_is_refused_in_one_line(tmp_path):
    from hprune.errors import OutputError

    for bad, match in (({"a": [1, 2]}, "expected a dense torch.Tensor"),
                       ({"a": torch.ones(2, 2).to_sparse()}, "expected a dense torch.Tensor"),
                       ({"a": torch.ones(2, dtype=torch.complex128)}, "dtype torch.complex128 is not supported")):
        with pytest.raises(OutputError, match=match):
            save_safetensors(bad, tmp_path / "x.safetensors")
    with pytest.raises(OutputError, match="metadata must map strings to strings"):
        save_safetensors({"a": torch.ones(2)}, tmp_path / "x.safetensors", {"n": 3})
    assert list(tmp_path.iterdir()) == []
