"""Packed layout, (de)quantisation and quantisation error of the 4-bit formats."""
import pytest
import torch

from hprune.errors import ShapeError
from hprune import formats as F


@pytest.mark.parametrize("k", [1, 31, 32, 33, 64, 200])
def test_pack_unpack_round_trip(k):
    codes = torch.randint(0, 16, (7, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    packed = F.pack_int4(codes)
    assert packed.shape == (7, F.packed_cols(k)) and packed.dtype == torch.uint8
    assert torch.equal(F.unpack_int4(packed, k), codes)


def test_documented_byte_layout():
    """Byte 16c + i of a row holds k = 32c + i (low nibble) and k = 32c + 16 + i (high nibble)."""
    k = 70
    codes = (torch.arange(k) % 16).to(torch.uint8).reshape(1, k)
    packed = F.pack_int4(codes, fmt="int4_sym")
    for c in range(3):
        for i in range(16):
            b = int(packed[0, 16 * c + i])
            lo, hi = 32 * c + i, 32 * c + 16 + i
            assert b & 0xF == (lo % 16 if lo < k else F.ZERO_CODE["int4_sym"])
            assert b >> 4 == (hi % 16 if hi < k else F.ZERO_CODE["int4_sym"])


def test_dequantize_definition():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    qw = F.pack_int4(codes)
    s = torch.tensor([[0.5, 0.25, 2.0], [1.0, 0.125, 4.0]])  # (G=2, N=3), group 32
    z = torch.tensor([[-1.0, 0.5, 0.0], [2.0, -3.0, 1.0]])
    sg = s.t().repeat_interleave(32, 1)
    zg = z.t().repeat_interleave(32, 1)
    q = codes.float()
    torch.testing.assert_close(F.dequantize(qw, s, None, 64, 32, "int4_sym", torch.float32), (q - 8) * sg)
    torch.testing.assert_close(F.dequantize(qw, s, z, 64, 32, "int4", torch.float32), q * sg + zg)
    code = torch.tensor(F.NF4_CODE)
    torch.testing.assert_close(F.dequantize(qw, s, None, 64, 32, "nf4", torch.float32), code[codes.long()] * sg)
    # scales are used in the requested dtype: bf16-rounded scale, one rounding of the product
    s16 = torch.tensor([[1.0 + 2 ** -7] * 3, [3.0] * 3])
    out = F.dequantize(qw, s16, None, 64, 32, "int4_sym", torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ((q - 8) * s16.to(torch.bfloat16).float().t().repeat_interleave(32, 1))
                               .to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", F.FORMATS)
def test_exactly_representable_weights_round_trip(fmt):
    """A weight built from codes and scales that the plain quantiser recovers comes back exactly."""
    gen = torch.Generator().manual_seed(1)
    n, k, g = 16, 96, 32
    s = (torch.rand(n, k // g, generator=gen) + 0.5).repeat_interleave(g, 1)
    if fmt == "int4_sym":
        v = torch.randint(-7, 8, (n, k), generator=gen).float()
        v[:, ::g] = 7.0  # absmax / 7 = s
    elif fmt == "int4":
        v = torch.randint(0, 16, (n, k), generator=gen).float()
        v[:, ::g], v[:, 1::g] = 0.0, 15.0  # min = 0, max = 15 s
    else:
        v = torch.tensor(F.NF4_CODE)[torch.randint(0, 16, (n, k), generator=gen)]
        v[:, ::g] = 1.0  # absmax = s
    w = v * s
    qw = F.quantize(w, g, fmt, scale_dtype=torch.float32, refine=False)
    torch.testing.assert_close(qw.dequantize(torch.float32), w, rtol=1e-6, atol=1e-6)


# Gaussian weights: expected relative weight error of 4-bit group-wise formats (measured ~0.07-0.10)
BOUNDS = {("int4", 32): 0.075, ("int4", 64): 0.087, ("int4", 128): 0.097,
          ("int4_sym", 32): 0.092, ("int4_sym", 64): 0.10, ("int4_sym", 128): 0.107,
          ("nf4", 32): 0.092, ("nf4", 64): 0.097, ("nf4", 128): 0.10}


@pytest.mark.parametrize("fmt,group", list(BOUNDS))
def test_quantization_error_bounds(fmt, group):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    q = F.quantize(w, group, fmt)
    err = F.quantization_error(w, q)
    assert 0.03 < err < BOUNDS[fmt, group], f"{fmt} g{group}: relative error {err:.4f}"
    codes = F.unpack_int4(q.qweight, 1024)
    assert int(codes.max()) <= 15 and q.scales.shape == (1024 // group, 256)


def test_refinement_lowers_the_error():
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(2))
    for fmt in ("int4", "int4_sym"):
        plain = F.quantization_error(w, F.quantize(w, 64, fmt, refine=False))
        tuned = F.quantization_error(w, F.quantize(w, 64, fmt, refine=True))
        assert tuned < 0.95 * plain, f"{fmt}: refined {tuned:.4f} vs plain {plain:.4f}"


def test_nf4_codes_match_bitsandbytes():
    import bitsandbytes.functional as bf

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    q = F.quantize(w, 64, "nf4", scale_dtype=torch.float32)
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    b = packed.reshape(-1)
    bnb_codes = torch.stack([b >> 4, b & 0xF], 1).reshape(64, 256)  # bitsandbytes: first value high
    assert torch.equal(F.unpack_int4(q.qweight, 256), bnb_codes)
    assert torch.equal(q.scales, state.absmax.reshape(64, 4).t())
    assert torch.equal(q.dequantize(torch.float32), bf.dequantize_4bit(packed, state))
    assert torch.tensor(F.NF4_CODE).equal(bf.get_4bit_type("nf4", device="cpu").float())


def test_partial_last_group_uses_only_its_weights():
    w = torch.zeros(2, 70)
    w[:, :64] = 100.0  # a large first group must not leak into the 6-weight second group
    w[:, 64:] = torch.linspace(-0.3, 0.6, 6)
    q = F.quantize(w, 64, "nf4", scale_dtype=torch.float32)
    assert q.scales.shape == (2, 2)
    torch.testing.assert_close(q.scales[1], torch.tensor([0.6, 0.6]))
    assert F.quantization_error(w[:, 64:], F.quantize(w[:, 64:], 64, "int4")) < 0.05


def test_zero_and_constant_weights():
    for fmt in F.FORMATS:
        for w in (torch.zeros(4, 64), torch.full((4, 64), 0.3)):
            q = F.quantize(w, 32, fmt)
            d = q.dequantize(torch.float32)
            assert torch.isfinite(d).all()
            torch.testing.assert_close(d, w, rtol=0.02, atol=1e-6)


def test_bad_arguments():
    w = torch.randn(8, 64)
    with pytest.raises(ShapeError, match="multiple of 32"):
        F.quantize(w, 48)
    with pytest.raises(ShapeError, match="unknown 4-bit format"):
        F.quantize(w, 32, "int8")
    with pytest.raises(ShapeError, match="2-D"):
        F.quantize(w[0], 32)
    with pytest.raises(ShapeError, match="inf or NaN"):
        F.quantize(torch.full((2, 64), float("inf")), 32)
    with pytest.raises(ShapeError, match="meta"):
        F.quantize(torch.empty(2, 64, device="meta"), 32)
    with pytest.raises(ShapeError, match="overflow"):
        F.quantize(torch.full((2, 64), 1e6), 32, scale_dtype=torch.float16)
    with pytest.raises(ShapeError, match="bytes per row"):
        F.unpack_int4(torch.zeros(2, 16, dtype=torch.uint8), 64)


@pytest.mark.parametrize("case,match", [
    ("qweight_dtype", "qweight must be uint8"),
    ("qweight_1d", "qweight must be 2-D"),
    ("in_features", "bytes per row"),
    ("in_features_zero", "in_features must be a positive integer"),
    ("group", "multiple of 32"),
    ("scales_shape", r"scales has shape \(2, 8\); expected .* = \(1, 8\)"),
    ("scales_int", "scales must be float16"),
    ("zeros_missing", "needs zeros"),
    ("zeros_for_sym", "takes no zeros"),
    ("fmt", "unknown 4-bit format"),
])
def test_dequantize_names_bad_input(case, match):
    q = F.quantize(torch.randn(8, 64), 64, "int4")
    args = dict(qweight=q.qweight, scales=q.scales, zeros=q.zeros, in_features=64, group_size=64, fmt="int4")
    args.update({
        "qweight_dtype": dict(qweight=q.qweight.to(torch.int32)),
        "qweight_1d": dict(qweight=q.qweight.flatten()),
        "in_features": dict(in_features=96),
        "in_features_zero": dict(in_features=0),
        "group": dict(group_size=48),
        "scales_shape": dict(scales=q.scales.repeat(2, 1)),
        "scales_int": dict(scales=q.scales.to(torch.int32)),
        "zeros_missing": dict(zeros=None),
        "zeros_for_sym": dict(fmt="int4_sym"),
        "fmt": dict(fmt="int3"),
    }[case])
    with pytest.raises(ShapeError, match=match):
        F.dequantize(**args)
    assert F.dequantize(q.qweight, q.scales, q.zeros, 64, 64, "int4").shape == (8, 64)


def test_bytes_per_param():
    assert F.bytes_per_param(64, "int4") == 0.5625
    assert F.bytes_per_param(128, "int4_sym") == 0.515625
    assert F.bytes_per_param(64, "nf4", scale_bytes=4) == 0.5625


@pytest.mark.parametrize("double_quant", [False, True])
def test_import_bitsandbytes_nf4_exactly(double_quant):
    import bitsandbytes as bnb

    from hprune.quant import W4A16Linear

    lin = torch.nn.Linear(128, 48)
    l4 = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.float32, compress_statistics=double_quant,
                           quant_type="nf4", device="cpu")
    l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=double_quant, blocksize=64)
    l4.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    l4 = l4.to("cpu")
    q = W4A16Linear.from_bnb(l4)
    assert q.fmt == "nf4" and q.group_size == 64
    bnb_w = bnb.functional.dequantize_4bit(l4.weight.data, l4.weight.quant_state)
    assert torch.equal(q.dequantize(torch.float32), bnb_w)
    x = torch.randn(5, 128)
    torch.testing.assert_close(q(x), l4(x), rtol=1e-5, atol=1e-5)


def test_import_refuses_fp4_and_straddling_blocks():
    import bitsandbytes.functional as bf

    w = torch.randn(8, 96)
    packed, st = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    with pytest.raises(ShapeError, match="straddle"):
        F.from_bnb_4bit(packed, st)
    packed, st = bf.quantize_4bit(torch.randn(8, 128), blocksize=64, quant_type="fp4")
    with pytest.raises(ShapeError, match="NF4"):
        F.from_bnb_4bit(packed, st)
