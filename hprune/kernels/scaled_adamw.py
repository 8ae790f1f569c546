"""Fused multi-tensor AdamW with a learning rate per tensor: `torch.ops.hprune.scaled_adamw_`.

One call updates many tensors in place, each with its own effective learning rate `lrs[i]` and
its own step count `steps[i]` (Sensitivity-Guided Distillation gives every block its own scale,
so `lrs[i] = lr * s_i`). The math is exactly `torch.optim.AdamW` (decoupled weight decay, bias
correction with the tensor's step count), applied per tensor:

    p    <- p * (1 - lr_i * wd)
    m    <- lerp(m, g, 1 - beta1)                    (exp_avg)
    v    <- v * beta2 + (1 - beta2) * g * g          (exp_avg_sq)
    p    <- p - lr_i / (1 - beta1^t_i) * m / (sqrt(v) / sqrt(1 - beta2^t_i) + eps)

Parameters are float32 or bfloat16 (all of one dtype per call); grads have the parameter's dtype;
exp_avg / exp_avg_sq are always float32. For bfloat16 parameters the update is computed in
float32 from the bf16 value and rounded back to bf16 (round to nearest even) once per step; the
fp32 moments are never rounded. (torch's AdamW on bf16 parameters keeps bf16 moments instead.)

The op only sees the tensors it must update: callers leave frozen tensors (scale 0) out, which
is what makes them free. Backends (pick or force one through `hprune.kernels.dispatch`):

    cuda       hprune._C (csrc/cuda/scaled_adamw.cu): one launch, per-tensor metadata in device
               memory, blocks find their tensor by binary search over chunk prefix sums
    triton     one launch over a chunk table (tensor index, chunk index) cached per layout; the
               per-tensor scalars come from a small device table so changing scales never
               rebuilds anything
    cpp        hprune._C (csrc/cpu/scaled_adamw.cpp): one fused pass, chunks of all tensors
               spread over threads with at::parallel_for
    reference  plain PyTorch, tensor by tensor, written as torch.optim.AdamW's single-tensor path:
               the oracle of the tests

All kernels share `hyper_table`: the per-tensor scalars (step size, sqrt of the second bias
correction, decay factor) computed in float64 on the device from `lrs` and `steps`, so a step
never synchronises with the host and scale or learning-rate changes cost nothing.
"""
import collections
import threading
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hprune.errors import OptimizerConfigError, ShapeError
from hprune.kernels import dispatch

OP = "scaled_adamw_"
PARAM_DTYPES = (torch.float32, torch.bfloat16)

# Triton launch shape: each program updates CHUNK = BLOCK * ITERS elements of one tensor.
TRITON_BLOCK = 1024
TRITON_ITERS = 8
TRITON_NUM_WARPS = 4


# ---- shared helpers ------------------------------------------------------------------------------

def hyper_table(lrs: Tensor, steps: Tensor, beta1: float, beta2: float, weight_decay: float,
                device: torch.device) -> Tensor:
    """Per-tensor scalars every kernel reads, float32 [3, n] on `device`.

    Rows: step_size = lr_i / (1 - beta1^t_i), bc2_sqrt = sqrt(1 - beta2^t_i),
    decay = 1 - lr_i * weight_decay. Computed in float64 (1 - 0.999^t loses ~5 digits in
    float32 at t = 1) with device ops only, so it is graph-capturable and never syncs."""
    t = steps.to(device=device, dtype=torch.float64)
    lr = lrs.to(device=device, dtype=torch.float64)
    step_size = lr / (1.0 - torch.pow(beta1, t))
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, t))
    decay = 1.0 - lr * weight_decay
    return torch.stack([step_size, bc2_sqrt, decay]).to(torch.float32).contiguous()


def check_lists(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                exp_avg_sqs: Sequence[Tensor], lrs: Tensor, steps: Tensor, beta1: float,
                beta2: float, eps: float, weight_decay: float) -> None:
    """The O(1) checks: list lengths, lrs / steps shapes, hyperparameters."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ShapeError(f"scaled_adamw_: mismatched list lengths: {n} params, {len(grads)} grads, "
                         f"{len(exp_avgs)} exp_avgs, {len(exp_avg_sqs)} exp_avg_sqs")
    for name, t in (("lrs", lrs), ("steps", steps)):
        if t.dim() != 1 or t.numel() != n:
            raise ShapeError(f"scaled_adamw_: {name} must be 1-D with one entry per tensor ({n}), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise ShapeError(f"scaled_adamw_: {name} must be real numbers, got {t.dtype}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise OptimizerConfigError(f"scaled_adamw_: betas must lie in [0, 1), got ({beta1}, {beta2})")
    if not eps >= 0.0 or not weight_decay >= 0.0:
        raise OptimizerConfigError(f"scaled_adamw_: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")


def check_inputs(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], lrs: Tensor, steps: Tensor, beta1: float,
                 beta2: float, eps: float, weight_decay: float) -> None:
    """Raises ShapeError / OptimizerConfigError (both ValueErrors) naming the first problem with the
    op's arguments: the list-level checks, then dtype, shape, device and layout of every tensor."""
    check_lists(params, grads, exp_avgs, exp_avg_sqs, lrs, steps, beta1, beta2, eps, weight_decay)
    if not params:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in PARAM_DTYPES:
        raise _tensor_error(0, f"unsupported parameter dtype {dtype}; supported: float32, bfloat16")
    f32 = torch.float32
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        shape = p.shape
        if p.dtype != dtype or g.dtype != dtype or m.dtype != f32 or v.dtype != f32:
            if p.dtype != dtype:
                raise _tensor_error(i, f"params must share one dtype; params[0] is {dtype}, params[{i}] is "
                                       f"{p.dtype} (call once per dtype)")
            if g.dtype != dtype:
                raise _tensor_error(i, f"grads[{i}] is {g.dtype}, its parameter is {dtype}")
            raise _tensor_error(i, f"exp_avgs[{i}] / exp_avg_sqs[{i}] must be float32, got {m.dtype} / {v.dtype}")
        if g.shape != shape or m.shape != shape or v.shape != shape:
            raise _tensor_error(i, f"tensor {i}: param {tuple(shape)}, grad {tuple(g.shape)}, exp_avg "
                                   f"{tuple(m.shape)}, exp_avg_sq {tuple(v.shape)} must match")
        if p.device != device or g.device != device or m.device != device or v.device != device:
            raise _tensor_error(i, f"tensor {i} is not on {device} (param {p.device}, grad {g.device}, "
                                   f"exp_avg {m.device}, exp_avg_sq {v.device})")
        if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            raise _tensor_error(i, f"tensor {i} (shape {tuple(shape)}): param, grad and states must be "
                                   f"contiguous")


def _tensor_error(i: int, msg: str) -> ShapeError:
    err = ShapeError(f"scaled_adamw_: {msg}")
    err.index = i  # type: ignore[attr-defined]  - lets callers name the parameter
    return err


# ---- the op ---------------------------------------------------------------------------------------

# Defined with the low-level Library API rather than torch.library.custom_op: custom_op's Python
# autograd and ADInplaceOrView wrappers walk every tensor of every list on each call (~20 us per
# parameter measured here), more than the kernel itself for small tensors. The op is mutating
# with no autograd formula (an optimizer step runs under no_grad); version counters of the
# mutated tensors are bumped in one C++ call, as torch's own foreach/fused optimizers do.
SCHEMA = ("scaled_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
          "Tensor lrs, Tensor steps, float beta1, float beta2, float eps, float weight_decay, "
          "str? backend=None) -> ()")
_lib = torch.library.Library("hprune", "FRAGMENT")
_lib.define(SCHEMA)


def scaled_adamw_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                  exp_avg_sqs: List[Tensor], lrs: Tensor, steps: Tensor, beta1: float, beta2: float,
                  eps: float, weight_decay: float, backend: Optional[str] = None) -> None:
    """One AdamW step over n tensors, in place, tensor i with learning rate lrs[i] at step steps[i].

    (This is the implementation behind `torch.ops.hprune.scaled_adamw_`; call the op.)
    params:      n tensors, all float32 or all bfloat16, contiguous, any shapes, one device
    grads:       n tensors, shape and dtype of their parameter
    exp_avgs:    n float32 tensors, shape of their parameter (first moment, updated in place)
    exp_avg_sqs: n float32 tensors, shape of their parameter (second moment, updated in place)
    lrs:         [n] effective learning rate per tensor (lr * scale), any real dtype and device
    steps:       [n] step number being taken per tensor (>= 1; the caller increments it first)
    backend:     force "cuda" / "triton" / "cpp" / "reference" (see hprune.kernels.dispatch)
    Raises ShapeError / OptimizerConfigError (ValueErrors) naming the offending tensor.
    """
    check_lists(params, grads, exp_avgs, exp_avg_sqs, lrs, steps, beta1, beta2, eps, weight_decay)
    if not params:
        return
    impl = dispatch.select(OP, params[0].device, backend, dtype=params[0].dtype, spec=(float(beta1),))
    if impl.name in ("cuda", "cpp"):
        # the C++ binding checks every tensor itself (TORCH_CHECK): validate in Python only to
        # turn a failure into a precise ShapeError, keeping the per-tensor loop off the fast path
        try:
            impl.fn(params, grads, exp_avgs, exp_avg_sqs, lrs, steps, beta1, beta2, eps, weight_decay)
        except RuntimeError:
            check_inputs(params, grads, exp_avgs, exp_avg_sqs, lrs, steps, beta1, beta2, eps, weight_decay)
            raise
    else:
        check_inputs(params, grads, exp_avgs, exp_avg_sqs, lrs, steps, beta1, beta2, eps, weight_decay)
        impl.fn(params, grads, exp_avgs, exp_avg_sqs, lrs, steps, beta1, beta2, eps, weight_decay)
    torch._C._increment_version(params)
    torch._C._increment_version(exp_avgs)
    torch._C._increment_version(exp_avg_sqs)


_lib.impl("scaled_adamw_", scaled_adamw_, "CompositeExplicitAutograd")


@torch.library.register_fake("hprune::scaled_adamw_", lib=_lib)
def _scaled_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, lrs, steps, beta1, beta2, eps,
                       weight_decay, backend=None) -> None:
    return None


# ---- reference ------------------------------------------------------------------------------------

@dispatch.register(OP, "reference")
def scaled_adamw_reference(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                           exp_avg_sqs: Sequence[Tensor], lrs: Tensor, steps: Tensor, beta1: float,
                           beta2: float, eps: float, weight_decay: float) -> None:
    """Tensor by tensor, the same operations in the same order as torch.optim.AdamW's
    single-tensor path (float64 Python scalars for the bias corrections), on fp32 copies of
    bf16 parameters. Reads lrs / steps on the host: a sync, fine for an oracle."""
    for p, g, m, v, lr, t in zip(params, grads, exp_avgs, exp_avg_sqs, lrs.tolist(), steps.tolist()):
        if p.numel() == 0:
            continue
        p32 = p if p.dtype == torch.float32 else p.float()
        g32 = g if g.dtype == torch.float32 else g.float()
        if weight_decay != 0:
            p32.mul_(1 - lr * weight_decay)
        m.lerp_(g32, 1 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        step_size = lr / (1 - beta1 ** t)
        bc2_sqrt = (1 - beta2 ** t) ** 0.5
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p32.addcdiv_(m, denom, value=-step_size)
        if p32 is not p:
            p.copy_(p32)  # round to nearest even, once


# ---- self-test (run by the dispatch point on each backend's first call; see dispatch) ------------

# spec = (beta1,): the one argument the launch configuration depends on (both kernels pick their
# first-moment lerp formula by |1 - beta1| < 0.5, as torch does); sizes and alignment are covered
# by every problem (a single element, a tail, several chunks plus a tail, one misaligned view).
SELFTEST_SPECS = ((0.9,), (0.3,))


def _lerp_config(spec: tuple, dtype: torch.dtype, info: dispatch.DeviceInfo) -> str:
    return "lerp-small-weight" if abs(1.0 - spec[0]) < 0.5 else "lerp-large-weight"


def _spec_of(args: tuple) -> tuple:
    return (float(args[6]),)


def _selftest_problems(device: torch.device, dtype: torch.dtype, gen: torch.Generator,
                       specs=SELFTEST_SPECS) -> list[tuple]:
    """One step per spec over tensors of odd sizes (a single element, a tail, several chunks plus
    a tail, one view off 16-byte alignment) with their own learning rates and step counts."""
    out = []
    for (beta1,) in specs:
        sizes = (1, 1000, 3 * 16384 + 5, 4099)
        params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        exp_avgs = [0.1 * torch.randn(n, generator=gen) for n in sizes]
        exp_avg_sqs = [0.01 * torch.rand(n, generator=gen) for n in sizes]
        lrs = torch.rand(len(sizes), generator=gen, dtype=torch.float64) * 1e-2
        steps = torch.tensor([1.0, 7.0, 150.0, 2.0])

        def on_device(ts: list[Tensor], misalign_last: bool) -> list[Tensor]:
            res = [t.to(device) for t in ts]
            if misalign_last:  # the same values in a buffer not 16-byte aligned
                t = res[-1]
                buf = torch.empty(t.numel() + 8, dtype=t.dtype, device=device)
                res[-1] = buf[2:2 + t.numel()].copy_(t)
            return res

        out.append((on_device(params, True), on_device(grads, True), on_device(exp_avgs, True),
                    on_device(exp_avg_sqs, False), lrs.to(device), steps.to(device), float(beta1), 0.999, 1e-8,
                    0.01))
    return out


dispatch.register_selftest(OP, dispatch.SelfTest(
    make=_selftest_problems, outputs=lambda args, _ret: [*args[0], *args[2], *args[3]],
    # fp32: the reference's operations in its order (FMA contraction / last-bit differences);
    # bf16 parameters: one bf16 ulp (2^-7 relative)
    tolerance=lambda dtype: 1e-6 if dtype == torch.float32 else 2.0 ** -7,
    dtypes=PARAM_DTYPES, specs=SELFTEST_SPECS, spec_of=_spec_of))


# ---- compiled C++ / CUDA ------------------------------------------------------------------------

def _ext_supports(op_name: str, device_type: str):
    def supports(device: torch.device) -> bool:
        return device.type == device_type and dispatch.ext_has(op_name)
    return supports


def _ext_why_not(op_name: str, device_type: str):
    def why_not(device: torch.device) -> str:
        if device.type != device_type:
            return f"backend for {OP} built from hprune._C runs on {device_type} tensors, not {device}"
        from hprune._ext import load_extension
        if load_extension() is None:
            return (f"hprune._C is not built ({load_extension.error or 'HPRUNE_NO_EXT=1 or not built'}); "
                    "run `python setup.py build_ext --inplace`")
        return f"hprune._C was built without torch.ops.hprune.{op_name}"
    return why_not


def _run_ext(op_name: str):
    def run(params, grads, exp_avgs, exp_avg_sqs, lrs, steps, beta1, beta2, eps, weight_decay) -> None:
        device = params[0].device
        hyper = hyper_table(lrs, steps, beta1, beta2, weight_decay, device)
        dispatch.ext_op(op_name)(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), hyper,
                                 float(beta1), float(beta2), float(eps))
    return run


dispatch.register(OP, "cuda", supports=_ext_supports("_scaled_adamw_cuda", "cuda"),
                  why_not=_ext_why_not("_scaled_adamw_cuda", "cuda"),
                  config=_lerp_config)(_run_ext("_scaled_adamw_cuda"))
dispatch.register(OP, "cpp", supports=_ext_supports("_scaled_adamw_cpu", "cpu"),
                  why_not=_ext_why_not("_scaled_adamw_cpu", "cpu"), config=_lerp_config)(_run_ext("_scaled_adamw_cpu"))


# ---- Triton ---------------------------------------------------------------------------------------

class _LRU:
    """A small thread-safe LRU map for the launch tables (a training run uses one or two layouts)."""

    def __init__(self, size: int = 8) -> None:
        self._d: "collections.OrderedDict" = collections.OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            val = self._d.get(key)
            if val is not None:
                self._d.move_to_end(key)
            return val

    def put(self, key, val) -> None:
        with self._lock:
            self._d[key] = val
            self._d.move_to_end(key)
            while len(self._d) > self._size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


_layout_cache = _LRU()  # (device, chunk, numels) -> (numels int64 [n], chunks int32 [C, 2], C)
_pointer_cache = _LRU()  # (device, addresses) -> int64 [5, n]: addresses, then aligned per tensor


_captured_host_tables: List[Tensor] = []  # host sources of copies recorded into CUDA graphs


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type != "cuda":
        return host
    pinned = host.pin_memory()  # pinned so the copy is truly asynchronous (pageable copies block)
    if torch.cuda.is_current_stream_capturing():
        # a graph replay re-reads this host buffer: it must outlive the graph
        _captured_host_tables.append(pinned)
    return pinned.to(device, non_blocking=True)


def _layout_tables(numels: Tuple[int, ...], chunk: int, device: torch.device) -> Tuple[Tensor, Tensor, int]:
    key = (device, chunk, numels)
    hit = _layout_cache.get(key)
    if hit is not None:
        return hit
    counts = [-(-n // chunk) for n in numels]
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32),
                                         torch.tensor(counts, dtype=torch.int64))
    starts = torch.cumsum(torch.tensor([0] + counts[:-1], dtype=torch.int64), 0)
    chunk_idx = (torch.arange(tensor_idx.numel(), dtype=torch.int64)
                 - torch.repeat_interleave(starts, torch.tensor(counts, dtype=torch.int64))).to(torch.int32)
    chunks = torch.stack([tensor_idx, chunk_idx], dim=1).contiguous()
    val = (_to_device(torch.tensor(numels, dtype=torch.int64), device), _to_device(chunks, device),
           int(chunks.shape[0]))
    _layout_cache.put(key, val)
    return val


def _pointer_table(tensors: Sequence[Sequence[Tensor]], device: torch.device) -> Tensor:
    """int64 [5, n]: the addresses of the n params, grads, exp_avgs, exp_avg_sqs, then 1 for each
    tensor whose four addresses are all 16-byte aligned (the kernel vectorises those only)."""
    addrs = tuple(t.data_ptr() for lst in tensors for t in lst)
    key = (device, addrs)
    hit = _pointer_cache.get(key)
    if hit is not None:
        return hit
    table = torch.tensor(addrs, dtype=torch.int64).view(len(tensors), -1)
    aligned = (table % 16 == 0).all(dim=0).to(torch.int64)
    val = _to_device(torch.cat([table, aligned[None]]).contiguous(), device)
    _pointer_cache.put(key, val)
    return val


@dispatch.register(OP, "triton", supports=dispatch.triton_supports, auto=dispatch.triton_auto,
                   why_not=dispatch.triton_why_not, config=_lerp_config)
def scaled_adamw_triton(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                        exp_avg_sqs: Sequence[Tensor], lrs: Tensor, steps: Tensor, beta1: float,
                        beta2: float, eps: float, weight_decay: float) -> None:
    """One Triton launch over every chunk of every tensor (empty tensors get no chunk)."""
    import triton.language as tl

    from hprune.kernels._scaled_adamw_triton import scaled_adamw_kernel as kernel

    device = params[0].device
    chunk = TRITON_BLOCK * TRITON_ITERS
    numels_t, chunks, n_chunks = _layout_tables(tuple(p.numel() for p in params), chunk, device)
    if n_chunks == 0:
        return
    ptrs = _pointer_table((params, grads, exp_avgs, exp_avg_sqs), device)
    hyper = hyper_table(lrs, steps, beta1, beta2, weight_decay, device)
    is_bf16 = params[0].dtype == torch.bfloat16
    w1 = 1.0 - beta1
    kernel[(n_chunks,)](
        ptrs, numels_t, chunks, hyper, len(params), w1, beta2, 1.0 - beta2, eps,
        P_DTYPE=tl.bfloat16 if is_bf16 else tl.float32, BLOCK=TRITON_BLOCK, ITERS=TRITON_ITERS,
        SOFT_BF16=is_bf16 and dispatch.triton_interpret(), LERP_SMALL=abs(w1) < 0.5,
        num_warps=TRITON_NUM_WARPS)


def clear_caches() -> None:
    """Drops the cached Triton launch tables (they are rebuilt on the next call)."""
    _layout_cache.clear()
    _pointer_cache.clear()
