"""Ahead-of-time compiles of the Triton kernels for GPUs this machine does not have.

Triton compiles a kernel for any NVIDIA target without a GPU (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`, with the ptxas it ships). The compiled kernel tells what a
launch on that GPU would find out: shared memory (over the device's limit: the launch fails with
OutOfResources) and registers / local-memory stack (a stack frame means spilled registers, slow).
`launch_specs(arch)` lists every configuration the launch heuristics of the W4A16, W4A8 and
AdamW kernels can choose for that GPU, crossed with the kernel variants that change resources;
`check(specs)` compiles them and reports. Run `python -m hprune.kernels.triton_aot --arch 90 80`
(NOT under TRITON_INTERPRET=1, which turns kernels into interpreted functions).

Works with triton 3.6 (the GPU machine) and 3.9 (here): the API differences are guarded below.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

# Shared memory a block may use (opt-in maximum), bytes, by compute capability.
SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}
# Streaming multiprocessors of the GPUs the heuristics are sized for (their split-K depends on it)
SMS = {90: 132, 80: 108, 89: 128, 86: 84}


@dataclass
class LaunchSpec:
    """One compile: a kernel with its signature, constexprs and launch options."""

    kernel: str  # "w4a16", "w4a8", "w4a8_quant", "adamw"
    label: str  # readable: config and variant
    fn: Any = field(repr=False)
    signature: dict[str, str] = field(repr=False)
    constexprs: dict[str, Any] = field(repr=False)
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class Resources:
    kernel: str
    label: str
    arch: int
    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    stack: int  # bytes of local-memory stack frame per thread (> 0: spilled registers)
    seconds: float
    error: str = ""

    @property
    def fits(self) -> bool:
        return not self.error and self.shared <= SHARED_LIMIT[self.arch]

    @property
    def ok(self) -> bool:
        return self.fits and self.stack == 0


# ---- triton API differences (3.6 vs 3.9) -----------------------------------------------------------

def _ast_source(fn, signature: dict[str, str], constexprs: dict[str, Any]):
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    try:  # 3.4+: constexprs keyed by name
        return ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    except (TypeError, KeyError, AttributeError):  # older: keyed by (argument index,)
        return ASTSource(fn=fn, signature=sig,
                         constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})


def _gpu_target(arch: int):
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # very old triton
        from triton.compiler.compiler import GPUTarget  # type: ignore[no-redef]
    return GPUTarget("cuda", arch, 32)


def _cuobjdump() -> Optional[str]:
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path:
            return path
    except Exception:  # noqa: BLE001 - no knobs module / tool entry in this triton
        pass
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _metadata_shared(metadata) -> int:
    return int(metadata["shared"] if isinstance(metadata, dict) else metadata.shared)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one kernel in `cubin`, from cuobjdump's resource usage."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships with triton's NVIDIA backend)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump output: {out[-300:]}")
    return int(m.group(1)), int(m.group(2))


def compile_spec(spec: LaunchSpec, arch: int) -> tuple[Resources, Any]:
    """Compiles `spec` for compute capability `arch`; returns (Resources, the compiled kernel or None)."""
    import triton

    start = time.perf_counter()
    try:
        compiled = triton.compile(_ast_source(spec.fn, spec.signature, spec.constexprs), target=_gpu_target(arch),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        regs, stack = _resource_usage(compiled.asm["cubin"])
        shared = _metadata_shared(compiled.metadata)
    except Exception as exc:  # noqa: BLE001 - a compile failure is a result
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        return Resources(spec.kernel, spec.label, arch, 0, 0, 0, time.perf_counter() - start, msg), None
    return Resources(spec.kernel, spec.label, arch, shared, regs, stack, time.perf_counter() - start), compiled


def check(specs: Iterable[LaunchSpec], arch: int, progress: Optional[Callable[[Resources], None]] = None
          ) -> list[Resources]:
    out = []
    for spec in specs:
        res, _ = compile_spec(spec, arch)
        out.append(res)
        if progress:
            progress(res)
    return out


# ---- what the heuristics can choose -------------------------------------------------------------------

_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# token counts and layer shapes the heuristics are asked about (every M bucket, SD3.5 / FLUX
# shapes, small layers): the distinct configurations they return are the ones to compile
_MS = (1, 2, 4, 8, 16, 17, 32, 33, 64, 65, 128, 129, 256, 1024, 4096, 8192)
_NKS = ((2432, 2432), (9728, 2432), (2432, 9728), (3072, 3072), (12288, 3072), (3072, 12288), (256, 256),
        (1024, 1024), (64, 4096), (8192, 8192))


def _collapse_split(cfg):
    from dataclasses import replace

    return replace(cfg, split_k=min(cfg.split_k, 2))  # 1 or "split" (the epilogue differs, not the loop)


def w4a16_specs(arch: int, full: bool = False) -> list[LaunchSpec]:
    """Every configuration `triton_w4a16.heuristic_config` returns (SD3.5 / FLUX and small shapes,
    every M bucket, each activation dtype, with and without split-K) on a GPU of `arch`, crossed
    with the kernel variants: each format at group 32 and 64 (one scale row per tile, or one per
    group inside it), with a bias and a masked K tail or neither. fp16 is left to bf16 (the same
    code but for the conversions). `full` adds fp16 and group 128 (minutes)."""
    from hprune.kernels import triton_w4a16 as t

    configs: set[tuple] = set()
    for dtype in ("fp16", "bf16", "fp32") if full else ("bf16", "fp32"):
        for m in _MS:
            for n, k in _NKS:
                cfg = _collapse_split(t.heuristic_config(m, n, k, None, _TORCH_DTYPE[dtype], sms=SMS[arch]))
                configs.add((cfg, dtype))
    groups = (32, 64, 128) if full else (32, 64)
    specs = []
    for cfg, dtype in sorted(configs, key=lambda cd: (cd[1], cd[0].short())):
        for fmt in ("int4", "int4_sym", "nf4"):
            for group in groups:
                for even_k, bias in ((False, True), (True, False)):
                    specs.append(w4a16_spec(cfg, dtype, fmt, group, even_k, bias))
    return specs


def w4a16_spec(cfg, dtype: str, fmt: str, group: int, even_k: bool = False, bias: bool = True) -> LaunchSpec:
    """The compile of `_w4a16_kernel` that a launch with `cfg` on these inputs makes."""
    from hprune.kernels import triton_w4a16 as t

    p = _PTR[dtype]
    sig = {"x_ptr": p, "w_ptr": "*u8", "s_ptr": p, "z_ptr": p, "bias_ptr": p, "out_ptr": p, "ws_ptr": "*fp32",
           "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
           "stride_om": "i32"}
    const = dict(GROUP=group, FMT={"int4": 0, "int4_sym": 1, "nf4": 2}[fmt], HAS_BIAS=bias,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 SPLIT_K=cfg.split_k, SPLIT_MODE=cfg.split_mode, GROUP_M=cfg.group_m,
                 USE_DOT=cfg.use_dot, UPCAST=False, FP32_DOT=dtype == "fp32", EVEN_K=even_k)
    label = f"{cfg.short()} {dtype} {fmt} g{group}" + (" even" if even_k else "") + (" bias" if bias else "")
    return LaunchSpec("w4a16", label, t._w4a16_kernel, sig, const, cfg.num_warps, cfg.num_stages)


def w4a8_specs(arch: int, full: bool = False) -> list[LaunchSpec]:
    """W4A8 (FP8 tensor cores: sm_89+ only; none for older targets): every heuristic GEMM config
    per group class (BLOCK_K 64 or 128), both formats; and the activation-quantisation kernel."""
    if arch < 89:
        return []
    from hprune.kernels import triton_w4a8 as t

    specs = []
    seen = set()
    for group in (64, 128, 256):
        for m in _MS:
            for n, k in _NKS:
                cfg = _collapse_split(t.heuristic_config(m, n, k, group, None, sms=SMS[arch]))
                gclass = min(group, 128)
                if (cfg, gclass) in seen:
                    continue
                seen.add((cfg, gclass))
                for dtype in (("fp16", "bf16", "fp32") if full else ("bf16",)):
                    for fmt in (("int4", "int4_sym") if full else ("int4",)):
                        specs.append(_w4a8_spec(cfg, dtype, fmt, gclass))
    for group in (64, 128):
        for dtype in ("bf16", "fp32"):
            gp2 = group
            for gpb in (1, 2048 // gp2):
                sig = {"x_ptr": _PTR[dtype], "xq_ptr": "*fp8e4nv", "a_ptr": "*fp32", "sums_ptr": "*fp32", "K": "i32",
                       "G": "i32", "stride_xm": "i32", "stride_qm": "i32"}
                const = dict(GROUP=group, GROUP_P2=gp2, GPB=gpb, HAS_SUMS=True)
                specs.append(LaunchSpec("w4a8_quant", f"quant {dtype} g{group} gpb{gpb}", t._quant_act_kernel,
                                        sig, const, 4, 3))
    return specs


def _w4a8_spec(cfg, dtype: str, fmt: str, gclass: int) -> LaunchSpec:
    from hprune.kernels import triton_w4a8 as t

    p = _PTR[dtype]
    sig = {"xq_ptr": "*fp8e4nv", "a_ptr": "*fp32", "sums_ptr": "*fp32", "w_ptr": "*u8",
           "s_ptr": p, "z_ptr": p, "bias_ptr": p, "out_ptr": "*fp32" if cfg.split_k > 1 else p,
           "M": "i32", "N": "i32", "K": "i32", "G": "i32", "stride_xm": "i32",
           "stride_wn": "i32", "stride_om": "i32"}
    const = dict(GROUP=gclass, FMT=0 if fmt == "int4" else 1, HAS_BIAS=True,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_G=16,
                 SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m, EVEN_K=False, ZPREC="tf32x3")
    return LaunchSpec("w4a8", f"{cfg.short()} {dtype} {fmt} g{gclass}", t._w4a8_kernel,
                      sig, const, cfg.num_warps, cfg.num_stages)


def adamw_specs(arch: int, full: bool = False) -> list[LaunchSpec]:
    from hprune.kernels import scaled_adamw as sa
    from hprune.kernels._scaled_adamw_triton import scaled_adamw_kernel

    specs = []
    for dtype, p in (("fp32", "fp32"), ("bf16", "bf16")):
        import triton.language as tl

        sig = {"ptrs": "*i64", "numels": "*i64", "chunks": "*i32", "hyper": "*fp32", "n_tensors": "i32",
               "w1": "fp32", "beta2": "fp32", "omb2": "fp32", "eps": "fp32"}
        const = dict(P_DTYPE=getattr(tl, {"fp32": "float32", "bf16": "bfloat16"}[p]), BLOCK=sa.TRITON_BLOCK,
                     ITERS=sa.TRITON_ITERS, SOFT_BF16=False, LERP_SMALL=True)
        specs.append(LaunchSpec("adamw", f"adamw {dtype}", scaled_adamw_kernel, sig, const, sa.TRITON_NUM_WARPS, 3))
    return specs


def candidate_specs(arch: int) -> list[LaunchSpec]:
    """Every configuration the autotuners time (`candidate_configs` of triton_w4a16 / triton_w4a8,
    over the shapes and M buckets above, split-K collapsed) in the variant that needs the most
    registers among the common ones (bf16, int4 with zeros, group 64, bias, a K tail): the list
    must hold only configurations that fit without spills (tests/test_triton_aot.py)."""
    import torch as _torch

    from hprune.kernels import triton_w4a16 as t16

    dev = _torch.device("cpu")
    seen16: set = set()
    specs = []
    for m in _MS:
        for n, k in _NKS:
            for cfg in t16.candidate_configs(m, n, k, dev, sms=SMS[arch]):
                cfg = _collapse_split(cfg)
                if cfg not in seen16:
                    seen16.add(cfg)
                    specs.append(w4a16_spec(cfg, "bf16", "int4", 64, even_k=False, bias=True))
    if arch >= 89:
        from hprune.kernels import triton_w4a8 as t8

        seen8: set = set()
        for m in _MS:
            for n, k in _NKS:
                for cfg in t8.candidate_configs(m, n, k, 128, dev, sms=SMS[arch]):
                    cfg = _collapse_split(cfg)
                    if cfg not in seen8:
                        seen8.add(cfg)
                        specs.append(_w4a8_spec(cfg, "bf16", "int4", 128))
    for sp in specs:
        sp.kernel += "_candidate"
    return specs


def launch_specs(arch: int, full: bool = False) -> list[LaunchSpec]:
    return w4a16_specs(arch, full) + w4a8_specs(arch, full) + adamw_specs(arch, full)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    ap.add_argument("--kernel", action="append", help="only these kernels (w4a16, w4a8, w4a8_quant, adamw)")
    ap.add_argument("--full", action="store_true", help="every variant (slow: minutes)")
    ap.add_argument("--candidates", action="store_true", help="the autotuners' candidates instead of the heuristics'")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: ahead-of-time compiles need the real compiler", file=sys.stderr)
        return 2
    results = []
    for arch in args.arch:
        specs = candidate_specs(arch) if args.candidates else launch_specs(arch, args.full)
        specs = [s for s in specs if not args.kernel or s.kernel in args.kernel]

        def show(r: Resources) -> None:
            flag = "ok" if r.ok else ("SPILL" if r.fits else "NO FIT")
            print(f"sm_{r.arch} {r.kernel:10s} {r.label:40s} shared {r.shared / 1024:6.1f} KB  reg {r.registers:3d}  "
                  f"stack {r.stack:4d}  {r.seconds:4.1f}s  {flag} {r.error}", flush=True)

        results += check(specs, arch, show)
    bad = [r for r in results if not r.ok]
    print(f"{len(results) - len(bad)} of {len(results)} compiles fit without spills")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
