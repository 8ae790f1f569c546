"""4-bit weight formats, the packed layout the kernels read, and reference (de)quantisation.

Formats (`fmt`)
---------------
    "int4"      asymmetric group-wise INT4 (the default): w = q * s + z,        q in 0..15
    "int4_sym"  symmetric group-wise INT4:                 w = (q - 8) * s,      q in 0..15
    "nf4"       NormalFloat4 codebook (bitsandbytes):      w = NF4[q] * s,       q in 0..15,
                s = absmax of the group, q = the nearest codebook value (bitsandbytes' rule,
                so the codes are the ones bitsandbytes produces for the same block size)

A group is `group_size` consecutive input features (K) of one output row. `group_size` must be a
positive multiple of 32 (32, 64 and 128 are the tested ones). K need not be a multiple of it: the
last group of a row is partial (it holds K mod group_size weights); see "K tails" below.

Packed layout (one layout for every backend)
--------------------------------------------
Weight (N, K) = (out_features, in_features). K is padded to Kp = ceil(K / 32) * 32.

    qweight  uint8  (N, Kp / 2)   row-major. K is cut into chunks of 32 (k = 32c .. 32c+31);
                                  chunk c of row n is the 16 bytes qweight[n, 16c : 16c+16], and
                                  byte 16c + i holds k = 32c + i      in its LOW nibble and
                                                      k = 32c + 16 + i in its HIGH nibble.
    scales   float  (G, N)        G = ceil(K / group_size), group-major: scales[g, n] is the scale
                                  of weights k in [g*group_size, (g+1)*group_size) of row n.
    zeros    float  (G, N)        "int4" only: the additive offset z (a float, not an integer zero
                                  point), same layout as scales.

Why this layout: a 16-byte chunk is one 128-bit load; unpacking it is two masks (low nibbles =
16 consecutive k, high nibbles = the next 16) with no interleaving shuffle, so the Triton kernel
feeds two contiguous K slices to two tensor-core dots, and the CUDA kernel gets the B fragments
of two mma.m16n8k16 steps from one 32-bit shared-memory word. Group-major scales make the
scales of one K tile a contiguous row (vector loads / cp.async).

K tails: the packed row is padded with the code of 0 (int4_sym: 8, nf4: 7; int4: 0, and padded
columns never meet a non-zero activation because the kernels mask x beyond K).

What the kernels multiply by
----------------------------
Scales and zeros are used in the activation dtype T (cast once if they are stored otherwise).
Each weight is computed in fp32 from its code and the T-valued scale/zero, then rounded once to
T; `dequantize(..., dtype=T)` returns exactly that tensor, and the reference matmul is
`x.float() @ dequantize(...).float().T` rounded to T. (int4 / int4_sym products are exact in
fp32, so the CUDA kernel's packed T arithmetic gives the same weights.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hprune.errors import ShapeError

FORMATS = ("int4", "int4_sym", "nf4")
CHUNK = 32  # K values per 16-byte chunk of the packed layout
DEFAULT_GROUP_SIZE = 64
DEFAULT_FORMAT = "int4"

# bitsandbytes' NF4 code (bitsandbytes.functional.get_4bit_type("nf4")), as float32.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
ZERO_CODE = {"int4": 0, "int4_sym": 8, "nf4": 7}
FMT_ID = {"int4": 0, "int4_sym": 1, "nf4": 2}  # the integer the compiled kernels take

# Candidate clipping ratios and least-squares refinements of the "int4" quantiser (see quantize).
_ASYM_CLIP = (1.0, 0.9, 0.8)
_ASYM_REFINE = 2
_SYM_DIVISORS = (7.0, 7.5, 8.0, 8.5, 9.0, 10.0)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ShapeError(f"unknown 4-bit format {fmt!r}; choose one of {FORMATS}")
    return fmt


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0 or group_size % CHUNK:
        raise ShapeError(f"group_size must be a positive multiple of {CHUNK} (e.g. 32, 64, 128), got {group_size!r}")
    return group_size


SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_features: int,
                 group_size: int, fmt: str) -> int:
    """Checks a packed 4-bit weight (layout in the module docstring) for K = `in_features`; returns N.
    Raises ShapeError naming the first problem."""
    check_format(fmt)
    check_group_size(group_size)
    k = in_features
    if qweight.dtype != torch.uint8:
        raise ShapeError(f"qweight must be uint8 (packed 4-bit codes), got {qweight.dtype}")
    if qweight.dim() != 2:
        raise ShapeError(f"qweight must be 2-D (N, ceil(K/32)*16), got shape {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if qweight.shape[1] != packed_cols(k):
        raise ShapeError(f"qweight has {qweight.shape[1]} bytes per row but K={k} input features (x's last "
                         f"dimension, or in_features) need ceil(K/32)*16 = {packed_cols(k)}")
    if not qweight.is_contiguous():
        raise ShapeError("qweight must be contiguous")
    g = num_groups(k, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            continue
        if t.dtype not in SCALE_DTYPES:
            raise ShapeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if tuple(t.shape) != (g, n):
            raise ShapeError(f"{name} has shape {tuple(t.shape)}; expected (ceil(K/group_size), N) = ({g}, {n}) "
                             f"for K={k}, group_size={group_size}")
        if not t.is_contiguous():
            raise ShapeError(f"{name} must be contiguous")
    if fmt == "int4" and zeros is None:
        raise ShapeError('fmt "int4" (asymmetric) needs zeros; use fmt "int4_sym" for symmetric weights')
    if fmt != "int4" and zeros is not None:
        raise ShapeError(f'fmt {fmt!r} takes no zeros (only the asymmetric "int4" does)')
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != qweight.device:
            raise ShapeError(f"{name} is on {t.device} but qweight is on {qweight.device}")
    return n


def padded_k(k: int) -> int:
    """K rounded up to a whole number of 32-wide chunks."""
    return -(-k // CHUNK) * CHUNK


def packed_cols(k: int) -> int:
    """Bytes per packed row for K input features: Kp / 2."""
    return padded_k(k) // 2


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 code values, float32 (16,)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def bytes_per_param(group_size: int, fmt: str, scale_bytes: int = 2) -> float:
    """Storage per weight: half a byte plus the group's scale (and zero for "int4")."""
    per_group = scale_bytes * (2 if fmt == "int4" else 1)
    return 0.5 + per_group / group_size


def packed_nbytes(out_features: int, in_features: int, group_size: int = DEFAULT_GROUP_SIZE,
                  fmt: str = DEFAULT_FORMAT, scale_bytes: int = 2) -> int:
    """Exact bytes of one packed weight (qweight + scales + zeros for "int4"), as W4A16Linear stores it."""
    groups = num_groups(in_features, group_size)
    return out_features * packed_cols(in_features) + groups * out_features * scale_bytes * (2 if fmt == "int4" else 1)


# ---- packing ------------------------------------------------------------------------------------

def pack_int4(codes: torch.Tensor, fmt: str = "int4") -> torch.Tensor:
    """Packs codes uint8 (N, K), values 0..15, into the layout above: uint8 (N, ceil(K/32)*16)."""
    if codes.dim() != 2:
        raise ShapeError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    kp = padded_k(k)
    c = codes.to(torch.uint8)
    if kp != k:
        pad = torch.full((n, kp - k), ZERO_CODE[check_format(fmt)], dtype=torch.uint8, device=c.device)
        c = torch.cat([c, pad], dim=1)
    c = c.reshape(n, kp // CHUNK, 2, CHUNK // 2)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, kp // 2).contiguous()


def unpack_int4(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 (N, Kp/2) -> codes uint8 (N, K)."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ShapeError(f"qweight must be uint8 (N, Kp/2), got {qweight.dtype} {tuple(qweight.shape)}")
    n, kb = qweight.shape
    if kb != packed_cols(k):
        raise ShapeError(f"qweight has {kb} bytes per row; K={k} needs {packed_cols(k)} (ceil(K/32)*16)")
    b = qweight.reshape(n, kb // (CHUNK // 2), 1, CHUNK // 2)
    c = torch.cat([b & 0xF, b >> 4], dim=2)  # (N, chunks, 2, 16): low nibbles first
    return c.reshape(n, kb * 2)[:, :k].contiguous()


# ---- dequantisation (the definition of the weights the kernels use) -----------------------------

def code_values(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 value of each code before scaling: q (int4), q - 8 (int4_sym), NF4[q] (nf4)."""
    if fmt == "int4":
        return codes.float()
    if fmt == "int4_sym":
        return codes.float() - 8.0
    if fmt == "nf4":
        return nf4_code(codes.device)[codes.long()]
    raise ShapeError(f"unknown 4-bit format {fmt!r}; choose one of {FORMATS}")


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_features: int,
               group_size: int, fmt: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight (N, K) the kernels multiply by, in `dtype` (default: the scales' dtype).

    Args:
        qweight: uint8 (N, ceil(K/32)*16), packed codes.
        scales: float (G, N), G = ceil(K / group_size).
        zeros: float (G, N) for fmt "int4", else None.
    Scales and zeros are first cast to `dtype`, each weight is computed in fp32 and rounded once."""
    # (a SymInt under torch.compile / dynamic shapes is an integer too)
    if isinstance(in_features, bool) or not isinstance(in_features, (int, torch.SymInt)) or in_features < 1:
        raise ShapeError(f"in_features must be a positive integer, got {in_features!r}")
    n = check_packed(qweight, scales, zeros, in_features, group_size, fmt)
    dtype = dtype or scales.dtype
    k = in_features
    kb = qweight.shape[1]
    b = qweight.view(n, kb // 16, 1, 16)
    codes = torch.cat([b & 0xF, b >> 4], dim=2).view(n, 2 * kb)  # (N, Kp), k order
    g = num_groups(k, group_size)
    kg = g * group_size
    if kg > codes.shape[1]:  # the last group is partial and longer than the padded row
        codes = torch.nn.functional.pad(codes, (0, kg - codes.shape[1]), value=ZERO_CODE[fmt])
    v = code_values(codes[:, :kg], fmt).view(n, g, group_size)
    # broadcast the (G, N) scales over their groups instead of materialising an (N, K) copy
    w = v.mul_(scales.to(dtype).float().t().unsqueeze(-1))
    if fmt == "int4":
        w = w.add_(zeros.to(dtype).float().t().unsqueeze(-1))
    return w.view(n, kg)[:, :k].to(dtype)


# ---- quantisation -------------------------------------------------------------------------------

@dataclass
class QuantizedWeight:
    """A packed 4-bit weight: qweight uint8 (N, Kp/2), scales (G, N), zeros (G, N) or None."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    in_features: int
    group_size: int
    fmt: str

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.in_features, self.group_size, self.fmt, dtype)

    @property
    def nbytes(self) -> int:
        ts = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float()


def _pick_best(err: torch.Tensor, *cands: torch.Tensor) -> list[torch.Tensor]:
    """Per group, the candidate (leading dim) with the smallest error."""
    c0 = err.shape[0]
    # argmin over a contiguous last dimension (first minimum on ties, as argmin(0))
    idx = err.reshape(c0, -1).t().contiguous().argmin(1).view(1, *err.shape[1:])
    return [c.gather(0, idx.expand(1, *c.shape[1:])).squeeze(0) for c in cands]


class _Buffers:
    """Reusable float32 work buffers for the scale search, so that chunk after chunk reuses the
    same memory (fresh ~100 MB temporaries per chunk made RTN page-fault bound: most of its CPU
    time was the kernel zeroing new pages). `take(i, shape)` returns buffer i viewed as `shape`,
    grown when too small."""

    def __init__(self, device: torch.device):
        self.device, self.bufs = device, [torch.empty(0, device=device) for _ in range(2)]
        self._clips: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def clips(self, refine: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_lo, a_hi) (C, 1, 1, 1): every pair of the clipping ratios, made once."""
        if refine not in self._clips:
            clips = torch.tensor(_ASYM_CLIP if refine else (1.0,), device=self.device)
            self._clips[refine] = (clips.repeat_interleave(len(clips)).view(-1, 1, 1, 1),
                                   clips.repeat(len(clips)).view(-1, 1, 1, 1))
        return self._clips[refine]

    def take(self, i: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        if self.bufs[i].numel() < n:
            self.bufs[i] = torch.empty(n, device=self.device)
        return self.bufs[i][:n].view(shape)


def _asym_full(wg: torch.Tensor, sdtype: torch.dtype, refine: bool, buf: _Buffers):
    """`_quantize_asym` for groups without padding (every entry valid), same arithmetic op for op
    (the valid-mask products are by 1.0, exact, and dropped; s <= 0 divides by +inf instead of
    being masked, giving the same ±0 code), in place in two reused buffers: results are
    bit-identical, the memory traffic is about a third. The returned codes are a view into
    `buf`, valid until its next use."""
    g = wg.shape[-1]
    lo = wg.amin(-1, keepdim=True)
    hi = wg.amax(-1, keepdim=True)
    a_lo, a_hi = buf.clips(refine)
    w = wg.unsqueeze(0)
    s, z = (hi * a_hi - lo * a_lo) / 15.0, lo * a_lo  # (C, R, G, 1)
    shape = (len(a_lo),) + tuple(wg.shape)
    q, t = buf.take(0, shape), buf.take(1, shape)
    steps = _ASYM_REFINE if refine else 0
    if steps:
        wm = w.sum(-1, keepdim=True) / float(g)
        wc = w - wm
    for it in range(steps + 1):
        s_r, z_r = _round_to(s, sdtype), _round_to(z, sdtype)
        torch.sub(w, z_r, out=q).div_(torch.where(s_r > 0, s_r, torch.inf)).round_().clamp_(0, 15)
        if it == steps:
            break
        # least-squares fit w ~ s*q + z of each group
        qm = q.sum(-1, keepdim=True) / float(g)
        qc = torch.sub(q, qm, out=t)
        cov = torch.mul(qc, wc, out=q).sum(-1, keepdim=True)  # q is recomputed next iteration
        var = qc.mul_(qc).sum(-1, keepdim=True)
        s_new = cov / var.clamp_min(1e-30)
        use = (var > 0) & (s_new > 0)
        s = torch.where(use, s_new, s)
        z = torch.where(use, wm - s_new * qm, z)
    err = torch.mul(q, s_r, out=t).add_(z_r).sub_(w).square_().sum(-1, keepdim=True)
    s_b, z_b = _pick_best(err, s_r, z_r)
    # the best candidate's codes, recomputed (the same ops on the same s, z: the same codes) rather
    # than gathered from the C candidates, which is slower
    q_b = torch.sub(wg, z_b, out=t[0]).div_(torch.where(s_b > 0, s_b, torch.inf)).round_().clamp_(0, 15)
    return q_b, s_b, z_b


def _sym_full(wg: torch.Tensor, sdtype: torch.dtype, refine: bool, buf: _Buffers):
    """`_quantize_sym` for groups without padding, op for op in reused buffers (see `_asym_full`)."""
    am = wg.abs().amax(-1, keepdim=True)
    w = wg.unsqueeze(0)
    divs = torch.tensor(_SYM_DIVISORS if refine else (7.0,), device=wg.device).view(-1, 1, 1, 1)
    shape = (len(divs),) + tuple(wg.shape)
    v, t = buf.take(0, shape), buf.take(1, shape)
    s = am / divs
    for it in range(2 if refine else 1):
        s_r = _round_to(s, sdtype)
        torch.div(w, torch.where(s_r > 0, s_r, torch.inf), out=v).round_().clamp_(-8, 7)
        if it == 0 and refine:
            den = torch.mul(v, v, out=t).sum(-1, keepdim=True)
            s_new = torch.mul(v, w, out=t).sum(-1, keepdim=True) / den.clamp_min(1e-30)
            s = torch.where((den > 0) & (s_new > 0), s_new, s)
    err = torch.mul(v, s_r, out=t).sub_(w).square_().sum(-1, keepdim=True)
    (s_b,) = _pick_best(err, s_r)
    v_b = torch.div(wg, torch.where(s_b > 0, s_b, torch.inf), out=t[0]).round_().clamp_(-8, 7)
    return v_b.add_(8), s_b


def _quantize_asym(wg: torch.Tensor, valid: torch.Tensor, sdtype: torch.dtype, refine: bool):
    """wg (R, G, g) fp32 with invalid (padding) entries arbitrary; returns codes, s, z (R, G, 1).

    Min-max start, clipped ranges (every pair of ratios in _ASYM_CLIP for the low and the high
    end), then least-squares refits of (s, z) for the codes they give (a Lloyd-style iteration);
    per group, keeps the candidate with the smallest squared error. All candidates are evaluated
    at once along a leading dimension; errors use s and z rounded to the storage dtype."""
    big = torch.finfo(torch.float32).max
    lo = torch.where(valid, wg, big).amin(-1, keepdim=True)
    hi = torch.where(valid, wg, -big).amax(-1, keepdim=True)
    vf = valid.float()
    cnt = vf.sum(-1, keepdim=True).clamp_min(1.0)
    clips = torch.tensor(_ASYM_CLIP if refine else (1.0,), device=wg.device)
    a_lo = clips.repeat_interleave(len(clips)).view(-1, 1, 1, 1)
    a_hi = clips.repeat(len(clips)).view(-1, 1, 1, 1)
    w = wg.unsqueeze(0)
    s, z = (hi * a_hi - lo * a_lo) / 15.0, lo * a_lo  # (C, R, G, 1)
    steps = _ASYM_REFINE if refine else 0
    for it in range(steps + 1):
        s_r, z_r = _round_to(s, sdtype), _round_to(z, sdtype)
        ok = s_r > 0
        q = torch.where(ok, ((w - z_r) / torch.where(ok, s_r, 1.0)).round().clamp(0, 15), 0.0)
        if it == steps:
            break
        # least-squares fit w ~ s*q + z over the valid entries of each group
        qm = (q * vf).sum(-1, keepdim=True) / cnt
        wm = (w * vf).sum(-1, keepdim=True) / cnt
        var = (((q - qm) ** 2) * vf).sum(-1, keepdim=True)
        cov = ((q - qm) * (w - wm) * vf).sum(-1, keepdim=True)
        s_new = cov / var.clamp_min(1e-30)
        use = (var > 0) & (s_new > 0)
        s = torch.where(use, s_new, s)
        z = torch.where(use, wm - s_new * qm, z)
    err = (((q * s_r + z_r - w) ** 2) * vf).sum(-1, keepdim=True)
    return _pick_best(err, q, s_r, z_r)


def _quantize_sym(wg: torch.Tensor, valid: torch.Tensor, sdtype: torch.dtype, refine: bool):
    """Symmetric: s = absmax / d for a few divisors d (d = 7 never clips; larger d uses the -8
    level and trades clipping for a finer step), then one least-squares refit of s; keeps the
    best per group (all candidates at once along a leading dimension)."""
    am = torch.where(valid, wg.abs(), 0.0).amax(-1, keepdim=True)
    vf = valid.float()
    w = wg.unsqueeze(0)
    divs = torch.tensor(_SYM_DIVISORS if refine else (7.0,), device=wg.device).view(-1, 1, 1, 1)
    s = am / divs
    for it in range(2 if refine else 1):
        s_r = _round_to(s, sdtype)
        ok = s_r > 0
        v = torch.where(ok, (w / torch.where(ok, s_r, 1.0)).round().clamp(-8, 7), 0.0)
        if it == 0 and refine:
            den = (v * v * vf).sum(-1, keepdim=True)
            s_new = (v * w * vf).sum(-1, keepdim=True) / den.clamp_min(1e-30)
            s = torch.where((den > 0) & (s_new > 0), s_new, s)
    err = (((v * s_r - w) ** 2) * vf).sum(-1, keepdim=True)
    v, s_r = _pick_best(err, v, s_r)
    return v + 8, s_r


def _quantize_nf4(wg: torch.Tensor, valid: torch.Tensor, sdtype: torch.dtype):
    """bitsandbytes' rule: s = absmax, q = nearest NF4 value of w / s (ties to the upper code)."""
    am = torch.where(valid, wg.abs(), 0.0).amax(-1, keepdim=True)
    s_r = _round_to(am, sdtype)
    ok = s_r > 0
    u = torch.where(ok, wg / torch.where(ok, s_r, 1.0), 0.0).clamp(-1, 1)
    code = nf4_code(wg.device)
    mids = (code[1:] + code[:-1]) / 2
    q = torch.bucketize(u, mids, right=True).float()
    return q, s_r


def fit_groups(wg: torch.Tensor, valid: torch.Tensor, fmt: str, sdtype: torch.dtype, refine: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scale (and, for "int4", the zero) `quantize` would choose for groups wg (R, G, g) fp32
    whose entries where `valid` (1, G, g) is False are padding. Returns s, z (R, G, 1) float32,
    already rounded to `sdtype` (z is None unless fmt is "int4")."""
    if fmt != "nf4" and bool(valid.all()):
        if fmt == "int4":
            _, s, z = _asym_full(wg, sdtype, refine, _Buffers(wg.device))
            return s, z
        return _sym_full(wg, sdtype, refine, _Buffers(wg.device))[1], None
    if fmt == "int4":
        _, s, z = _quantize_asym(wg, valid, sdtype, refine)
        return s, z
    if fmt == "int4_sym":
        return _quantize_sym(wg, valid, sdtype, refine)[1], None
    return _quantize_nf4(wg, valid, sdtype)[1], None


def encode(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounds w (float32) to the nearest code under scale s (and zero z), broadcasting.
    Returns (codes float32 0..15, their dequantised float32 values). Matches `quantize`'s
    rounding rules (s == 0 gives code 0 / the zero code)."""
    ok = s > 0
    safe = torch.where(ok, s, 1.0)
    if fmt == "int4":
        q = torch.where(ok, ((w - z) / safe).round().clamp(0, 15), 0.0)
        return q, q * s + z
    if fmt == "int4_sym":
        v = torch.where(ok, (w / safe).round().clamp(-8, 7), 0.0)
        return v + 8, v * s
    code = nf4_code(w.device)
    u = torch.where(ok, w / safe, 0.0).clamp(-1, 1)
    q = torch.bucketize(u, (code[1:] + code[:-1]) / 2, right=True)
    return q.float(), code[q] * s


def quantize(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, fmt: str = DEFAULT_FORMAT,
             scale_dtype: torch.dtype | None = None, refine: bool = True, rows_per_chunk: int | None = None
             ) -> QuantizedWeight:
    """Quantises a weight (N, K) (float) to the packed 4-bit layout.

    Args:
        weight: (out_features, in_features), any float dtype, any device (the work is done there
            in fp32, `rows_per_chunk` rows at a time to bound the memory).
        group_size: weights per scale along K (a multiple of 32).
        fmt: "int4" (asymmetric, default), "int4_sym" or "nf4".
        scale_dtype: dtype of scales/zeros; default: the weight's dtype if 16-bit, else float32.
            Codes are chosen for the scales rounded to this dtype.
        refine: search clipping ranges / refit scales to minimise the squared error (int4 and
            int4_sym); False gives plain min-max / absmax-over-7 quantisation.
        rows_per_chunk: rows processed at once (default: ~2^16 weights per chunk on the CPU, so
            the search's candidates (up to 9 of each weight) stay in cache in reused buffers;
            ~2^22 on a GPU).
    """
    check_format(fmt)
    check_group_size(group_size)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ShapeError(f"weight must be a 2-D float tensor (N, K), got {weight.dtype} {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ShapeError("cannot quantise a weight on the meta device (load or initialise it first)")
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    if scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ShapeError(f"scale_dtype must be float16, bfloat16 or float32, got {scale_dtype}")
    n, k = weight.shape
    g = num_groups(k, group_size)
    kg = g * group_size
    valid = (torch.arange(kg, device=weight.device) < k).reshape(1, g, group_size)
    if rows_per_chunk is None:
        # CPU: ~2^16 weights a chunk, so the search's buffers (candidates × chunk) stay in cache and
        # are reused; GPU: big chunks, fewer launches
        per_chunk = (1 << 16) if weight.device.type == "cpu" else (1 << 22)
        rows_per_chunk = max(1, per_chunk // max(1, kg))
    full = kg == k
    buf = _Buffers(weight.device)
    codes = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, g, dtype=torch.float32, device=weight.device)
    zeros = torch.empty(n, g, dtype=torch.float32, device=weight.device) if fmt == "int4" else None
    for r0 in range(0, n, rows_per_chunk):
        w = weight[r0:r0 + rows_per_chunk].float()
        r1 = r0 + w.shape[0]
        if not torch.isfinite(w).all():
            raise ShapeError(f"weight rows {r0}..{r1 - 1} contain inf or NaN")
        if kg != k:
            w = torch.nn.functional.pad(w, (0, kg - k))
        wg = w.reshape(w.shape[0], g, group_size)
        if fmt == "int4":
            q, s, z = _asym_full(wg, scale_dtype, refine, buf) if full else _quantize_asym(wg, valid, scale_dtype, refine)
            zeros[r0:r1] = z.reshape(-1, g)
        elif fmt == "int4_sym":
            q, s = _sym_full(wg, scale_dtype, refine, buf) if full else _quantize_sym(wg, valid, scale_dtype, refine)
        else:
            q, s = _quantize_nf4(wg, valid, scale_dtype)
        codes[r0:r1] = q.reshape(-1, kg)[:, :k]
        scales[r0:r1] = s.reshape(-1, g)
    s_all = scales.t().contiguous().to(scale_dtype)
    z_all = zeros.t().contiguous().to(scale_dtype) if fmt == "int4" else None
    for name, t in (("scales", s_all), ("zeros", z_all)):
        if t is not None and not torch.isfinite(t).all():
            raise ShapeError(f"{name} overflow {scale_dtype}: the weight's range is too large for it; "
                             f"use scale_dtype=torch.float32 or bfloat16")
    return QuantizedWeight(pack_int4(codes, fmt), s_all, z_all, k, group_size, fmt)


def from_bnb_4bit(packed: torch.Tensor, quant_state) -> QuantizedWeight:
    """Imports a bitsandbytes NF4 weight (e.g. `Linear4bit.weight` and its `.quant_state`).

    bitsandbytes blocks run over the flattened (N, K) weight, two codes per byte (first in the
    high nibble), one fp32 absmax per block (double-quantised absmax are dequantised here). The
    blocks must not straddle rows (K % blocksize == 0) and the blocksize must be a multiple of 32;
    the result uses group_size = blocksize and fp32 scales, so `dequantize(torch.float32)` equals
    `bitsandbytes.functional.dequantize_4bit` exactly."""
    qt = getattr(quant_state, "quant_type", None)
    if qt != "nf4":
        raise ShapeError(f"only NF4 bitsandbytes weights can be imported (got quant_type {qt!r}); "
                         f"hprune formats are {FORMATS}")
    shape = tuple(quant_state.shape)
    if len(shape) != 2:
        raise ShapeError(f"expected a 2-D (N, K) bitsandbytes weight, got shape {shape}")
    n, k = shape
    bs = int(quant_state.blocksize)
    if bs % CHUNK or k % bs:
        raise ShapeError(f"bitsandbytes blocksize {bs} must be a multiple of {CHUNK} dividing K={k} "
                         f"(blocks may not straddle rows)")
    absmax = quant_state.absmax
    if getattr(quant_state, "nested", False):
        import bitsandbytes.functional as bf

        absmax = bf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    b = packed.reshape(-1).to(torch.uint8)
    if b.numel() * 2 != n * k:
        raise ShapeError(f"packed data has {b.numel()} bytes; a ({n}, {k}) weight needs {n * k // 2}")
    codes = torch.stack([b >> 4, b & 0xF], dim=1).reshape(n, k)
    scales = absmax.float().reshape(n, k // bs).t().contiguous()
    return QuantizedWeight(pack_int4(codes, "nf4"), scales, None, k, bs, "nf4")


def quantization_error(weight: torch.Tensor, qw: QuantizedWeight) -> float:
    """Relative Frobenius error ||W - deq(W)|| / ||W|| (fp32)."""
    w = weight.float()
    return float((qw.dequantize(torch.float32) - w).norm() / w.norm().clamp_min(1e-30))


__all__ = [
    "FORMATS", "CHUNK", "NF4_CODE", "ZERO_CODE", "FMT_ID", "DEFAULT_GROUP_SIZE", "DEFAULT_FORMAT",
    "QuantizedWeight", "quantize", "dequantize", "pack_int4", "unpack_int4", "code_values",
    "padded_k", "packed_cols", "num_groups", "nf4_code", "bytes_per_param", "check_format",
    "check_group_size", "quantization_error", "from_bnb_4bit",
]
