"""Triton kernel of `hprune::scaled_adamw_` (imported only when the triton backend runs, so that
importing hprune never imports triton). Launch tables and the host side live in scaled_adamw.py."""
import triton
import triton.language as tl


@triton.jit
def _round_bf16(x):
    # fp32 -> bf16, round to nearest even, with integer ops. Only for the interpreter, whose own
    # fp32->bf16 cast truncates (DESIGN §7); on a GPU the native cast is exact RNE.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _update(p, g, m, v, step_size, bc2_sqrt, decay, w1, beta2, omb2, eps, LERP_SMALL: tl.constexpr):
    # The operations of torch.optim.AdamW's single-tensor step, in its order, in fp32.
    p = p * decay
    if LERP_SMALL:  # torch's lerp uses one of two formulas depending on the weight
        m = m + w1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - w1)
    v = v * beta2 + omb2 * g * g
    # IEEE sqrt / division (Triton's defaults are approximate) to stay within ~1 ulp of torch
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.math.div_rn(m, denom)
    return p, m, v


@triton.jit
def _chunk(p_ptr, g_ptr, m_ptr, v_ptr, start, numel, step_size, bc2_sqrt, decay, w1, beta2, omb2, eps,
           P_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, SOFT_BF16: tl.constexpr,
           LERP_SMALL: tl.constexpr):
    lane = tl.arange(0, BLOCK)
    for i in range(ITERS):
        base = start + i * BLOCK
        offs = base + lane
        if base + BLOCK <= numel:  # full block: no mask, so the accesses vectorise
            p = tl.load(p_ptr + offs).to(tl.float32)  # upcast right after the load (DESIGN §7)
            g = tl.load(g_ptr + offs).to(tl.float32)
            m = tl.load(m_ptr + offs)
            v = tl.load(v_ptr + offs)
            p, m, v = _update(p, g, m, v, step_size, bc2_sqrt, decay, w1, beta2, omb2, eps, LERP_SMALL)
            if SOFT_BF16:
                tl.store(p_ptr + offs, _round_bf16(p))
            else:
                tl.store(p_ptr + offs, p.to(P_DTYPE))
            tl.store(m_ptr + offs, m)
            tl.store(v_ptr + offs, v)
        elif base < numel:  # the tensor's tail
            mask = offs < numel
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0)
            p, m, v = _update(p, g, m, v, step_size, bc2_sqrt, decay, w1, beta2, omb2, eps, LERP_SMALL)
            if SOFT_BF16:
                tl.store(p_ptr + offs, _round_bf16(p), mask=mask)
            else:
                tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def scaled_adamw_kernel(ptrs, numels, chunks, hyper, n_tensors, w1, beta2, omb2, eps,
                        P_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                        SOFT_BF16: tl.constexpr, LERP_SMALL: tl.constexpr):
    """Program `pid` updates elements [c * BLOCK * ITERS, (c + 1) * BLOCK * ITERS) of tensor t.

    ptrs:   int64 [5, n]: addresses of param (P_DTYPE), grad (P_DTYPE), exp_avg, exp_avg_sq (fp32),
            then 1 where all four are 16-byte aligned (per tensor: one misaligned tensor does not
            slow the others down)
    numels: int64 [n];   chunks: int32 [C, 2] rows (t, c);   hyper: fp32 [3, n] rows step_size,
    bc2_sqrt, decay (see scaled_adamw.hyper_table).  w1 = 1 - beta1, omb2 = 1 - beta2."""
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    c = tl.load(chunks + 2 * pid + 1).to(tl.int64)
    numel = tl.load(numels + t)
    p_ptr = tl.load(ptrs + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(ptrs + n_tensors + t).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(ptrs + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(ptrs + 3 * n_tensors + t).to(tl.pointer_type(tl.float32))
    aligned = tl.load(ptrs + 4 * n_tensors + t)
    step_size = tl.load(hyper + t)
    bc2_sqrt = tl.load(hyper + n_tensors + t)
    decay = tl.load(hyper + 2 * n_tensors + t)
    start = c * (BLOCK * ITERS)
    if aligned != 0:  # checked on the host; lets the compiler emit 16-byte loads and stores
        _chunk(tl.multiple_of(p_ptr, 16), tl.multiple_of(g_ptr, 16), tl.multiple_of(m_ptr, 16),
               tl.multiple_of(v_ptr, 16), start, numel, step_size, bc2_sqrt, decay, w1, beta2, omb2, eps,
               P_DTYPE, BLOCK, ITERS, SOFT_BF16, LERP_SMALL)
    else:
        _chunk(p_ptr, g_ptr, m_ptr, v_ptr, start, numel, step_size, bc2_sqrt, decay, w1, beta2, omb2, eps,
               P_DTYPE, BLOCK, ITERS, SOFT_BF16, LERP_SMALL)
