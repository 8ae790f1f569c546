"""SensitivityAdamW against torch.optim.AdamW with one parameter group per scale (lr * s).

fp32: 20 steps, each parameter within 1e-6 of torch relative to its largest magnitude
(max|ours - torch| / max|torch|; observed ~1e-7: the kernels do torch's operations in torch's
order, differences are last-bit rounding).
bf16: our semantics are "AdamW in fp32 from the bf16 value, rounded to bf16 once per step, fp32
moments". The exact oracle for that is torch.optim.AdamW on fp32 copies whose values are rounded
to bf16 after every step: we require every element within one bf16 ulp of it and >= 99% bit-equal.
Against plain fp32 AdamW (never rounded) the difference is bf16 rounding only. AdamW's update does
not depend on the parameter value (m, v come from the gradients; weight decay only shrinks a
difference), so the difference after T steps is at most the sum of the per-step roundings, each
<= 2^-8 |p_t|: we require |ours - fp32| <= (T + 1) * 2^-8 * max_t |p_t| elementwise.
"""
import copy
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hprune.errors import BackendUnavailableError, OptimizerConfigError, ScaleError, ShapeError
from hprune.kernels import dispatch
from hprune.kernels import scaled_adamw as sa
from hprune.optim import SensitivityAdamW

SHAPES = [(7, 5), (33,), (1,), (40, 26), (4097,), (3, 1, 2), (9,)]
SCALES = [1.0, 0.5, 0.0, 0.25, 0.1, 0.0, 0.5]  # two frozen, two sharing 0.5
LR, WD, STEPS = 1e-2, 0.05, 20
BACKENDS = ("reference", "cpp", "triton", "cuda")


def need(backend, device):
    try:
        dispatch.select(sa.OP, device, backend)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


def make_params(dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=g)).to(dtype).to(device).requires_grad_() for s in SHAPES]


def grads_for(step, params, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(dtype).to(p.device) for p in params]


def torch_per_scale(params, scales, lr=LR, wd=WD):
    """torch.optim.AdamW with one group per distinct non-zero scale; frozen parameters left out."""
    groups = [{"params": [p for p, s in zip(params, scales) if s == sc], "lr": lr * sc}
              for sc in sorted({s for s in scales if s > 0})]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)


def rel_err(a, b):
    return (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_torch_adamw_one_group_per_scale(device, backend):
    need(backend, device)
    ours = make_params(torch.float32, device)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    init = [p.detach().clone() for p in ours]
    opt = SensitivityAdamW(ours, lr=LR, weight_decay=WD, scales=dict(zip(ours, SCALES)), backend=backend)
    topt = torch_per_scale(ref, SCALES)
    for t in range(STEPS):
        for p, r, g in zip(ours, ref, grads_for(t, ours, torch.float32)):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
    for i, (p, r, p0, s) in enumerate(zip(ours, ref, init, SCALES)):
        if s == 0:
            assert torch.equal(p.detach(), p0), f"frozen parameter {i} changed"
            assert len(opt.state[p]) == 0, f"frozen parameter {i} got optimizer state"
        else:
            assert rel_err(p.detach(), r.detach()) <= 1e-6, f"param {i}: {rel_err(p.detach(), r.detach()):.3g}"
            st, tst = opt.state[p], topt.state[r]
            assert st["step"].item() == STEPS
            assert st["exp_avg"].dtype == torch.float32
            assert rel_err(st["exp_avg"], tst["exp_avg"]) <= 1e-6
            assert rel_err(st["exp_avg_sq"], tst["exp_avg_sq"]) <= 1e-6
            assert not torch.equal(p.detach(), p0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_bf16_rounding(device, backend):
    need(backend, device)
    # |p| ~ 0.1 so that lr-sized updates exceed half a bf16 ulp and the parameters really move
    ours = make_params(torch.bfloat16, device, scale=0.1)
    init = [p.detach().clone() for p in ours]
    master = [p.detach().float().clone().requires_grad_() for p in ours]  # fp32, rounded every step
    plain = [p.detach().float().clone().requires_grad_() for p in ours]   # fp32, never rounded
    opt = SensitivityAdamW(ours, lr=LR, weight_decay=WD, scales=dict(zip(ours, SCALES)), backend=backend)
    topt_master = torch_per_scale(master, SCALES)
    topt_plain = torch_per_scale(plain, SCALES)
    peak = [q.detach().abs().clone() for q in plain]  # max_t |p_t| of the unrounded run
    for t in range(STEPS):
        gs = grads_for(t, ours, torch.bfloat16)
        for p, m, q, g in zip(ours, master, plain, gs):
            p.grad, m.grad, q.grad = g.clone(), g.float(), g.float()
        opt.step()
        topt_master.step()
        topt_plain.step()
        with torch.no_grad():
            for m in master:
                m.copy_(m.bfloat16().float())
            for pk, q in zip(peak, plain):
                torch.maximum(pk, q.abs(), out=pk)
    for i, (p, m, q, pk, p0, s) in enumerate(zip(ours, master, plain, peak, init, SCALES)):
        p = p.detach()
        assert p.dtype == torch.bfloat16
        if s == 0:
            assert torch.equal(p, p0) and len(opt.state[ours[i]]) == 0
            continue
        assert opt.state[ours[i]]["exp_avg"].dtype == torch.float32
        exact = m.detach().bfloat16()
        ulp = 2.0 ** -7 * exact.float().abs()
        assert ((p.float() - exact.float()).abs() <= ulp).all(), f"param {i}: more than 1 ulp off"
        assert (p == exact).float().mean().item() >= 0.99, f"param {i}: too few bit-identical elements"
        q = q.detach()
        bound = (STEPS + 1) * 2.0 ** -8 * pk
        assert ((p.float() - q).abs() <= bound).all(), f"param {i}: beyond bf16 rounding of fp32 AdamW"
        assert (p != p0).float().mean().item() > 0.5, f"param {i} barely moved: the test would be vacuous"


class _OpSpy(TorchDispatchMode):
    """Records the parameter addresses of every scaled_adamw_ call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.hprune.scaled_adamw_.default:
            self.calls.append({t.data_ptr() for t in args[0]})
        return func(*args, **(kwargs or {}))


def test_frozen_parameters_never_reach_the_kernel():
    ps = make_params(torch.float32, "cpu")
    opt = SensitivityAdamW(ps, lr=LR, scales=dict(zip(ps, SCALES)))
    for p, g in zip(ps, grads_for(0, ps, torch.float32)):
        p.grad = g
    with _OpSpy() as spy:
        opt.step()
    assert len(spy.calls) == 1, "one (device, dtype) bucket must be one call"
    passed = spy.calls[0]
    for p, s in zip(ps, SCALES):
        assert (p.data_ptr() in passed) == (s > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_changes_mid_run(device, backend):
    """10 steps with scales A, then set_scales(B): freeze a trained parameter, unfreeze a frozen
    one (fresh state from step 1), change others. torch reference: one group per parameter, lr
    set per phase, grad None for frozen ones (torch then skips them, as we do)."""
    need(backend, device)
    a = [1.0, 0.5, 0.0, 0.25, 0.1, 0.0, 0.5]
    b = [0.2, 0.0, 1.0, 0.25, 1.0, 0.0, 0.5]
    ours = make_params(torch.float32, device, seed=3)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = SensitivityAdamW(ours, lr=LR, weight_decay=WD, scales=dict(zip(ours, a)), backend=backend)
    topt = torch.optim.AdamW([{"params": [r], "lr": LR * s} for r, s in zip(ref, a)], lr=LR, weight_decay=WD)
    snapshot = None
    for t in range(STEPS):
        if t == STEPS // 2:
            opt.set_scales(dict(zip(ours, b)))
            for grp, s in zip(topt.param_groups, b):
                grp["lr"] = LR * s
            snapshot = {k: v.clone() for k, v in opt.state[ours[1]].items()}
        scales = a if t < STEPS // 2 else b
        for p, r, g, s in zip(ours, ref, grads_for(t, ours, torch.float32), scales):
            p.grad, r.grad = g.clone(), (g.clone() if s > 0 else None)
        opt.step()
        topt.step()
    for i, (p, r) in enumerate(zip(ours, ref)):
        assert rel_err(p.detach(), r.detach()) <= 1e-6, f"param {i}"
        assert len(opt.state[p]) == len(topt.state[r])
    assert opt.state[ours[2]]["step"].item() == STEPS // 2  # unfrozen half-way
    for k, v in snapshot.items():  # frozen half-way: state kept as it was
        assert torch.equal(opt.state[ours[1]][k], v)
    assert len(opt.state[ours[5]]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    """Save after 10 steps, load into a fresh optimizer built with other scales, run 10 more:
    bit-identical to the uninterrupted run, scales restored, moments still fp32."""
    ps = make_params(dtype, "cpu", seed=4, scale=0.1)
    opt = SensitivityAdamW(ps, lr=LR, weight_decay=WD, scales=dict(zip(ps, SCALES)))
    for t in range(10):
        for p, g in zip(ps, grads_for(t, ps, dtype)):
            p.grad = g
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    qs = [t.clone().requires_grad_() for t in saved["params"]]
    opt2 = SensitivityAdamW(qs, lr=LR, weight_decay=WD, scales={q: 1.0 for q in qs})
    opt2.load_state_dict(saved["opt"])
    assert [opt2.get_scale(q) for q in qs] == SCALES
    for q, s in zip(qs, SCALES):
        if s > 0:
            assert opt2.state[q]["exp_avg"].dtype == torch.float32
            assert opt2.state[q]["exp_avg_sq"].dtype == torch.float32
        else:
            assert len(opt2.state[q]) == 0
    for t in range(10, 20):
        gs = grads_for(t, ps, dtype)
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt2.state[q][k])


def test_named_parameters_and_names_mapping():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = SensitivityAdamW(model.named_parameters(), lr=LR, scales={"0.weight": 0.5, "1.bias": 0.0})
    assert opt.get_scale("0.weight") == 0.5 and opt.get_scale(model[1].bias) == 0.0
    assert opt.get_scale("0.bias") == 1.0
    opt.set_scales({"0.bias": 0.25})
    assert opt.get_scale(model[0].bias) == 0.25
    opt2 = SensitivityAdamW(model.parameters(), names=dict(model.named_parameters()), scales={"1.weight": 0.0})
    assert opt2.get_scale(model[1].weight) == 0.0
    opt2.load_state_dict(opt2.state_dict())  # names given with names= survive a load
    opt2.set_scales({"1.weight": 0.75})
    assert opt2.get_scale(model[1].weight) == 0.75
    clone = copy.deepcopy(opt2)  # and a deep copy (its parameters are copies too)
    assert clone.get_scale("1.weight") == 0.75 and clone.get_scale("0.bias") == 1.0
    # a name of a parameter that exists in the model but is not optimised
    opt3 = SensitivityAdamW(model[0].parameters(), names=model.named_parameters())
    with pytest.raises(ScaleError, match="unknown parameter name '1.weight'"):
        opt3.set_scales({"1.weight": 0.5})


def test_scale_errors_are_clear_and_atomic():
    model = torch.nn.Linear(4, 3)
    opt = SensitivityAdamW(model.named_parameters(), lr=LR)
    for bad, match in [({"weight": 1.5}, r"\[0, 1\]"), ({"weight": -0.1}, r"\[0, 1\]"),
                       ({"weight": float("nan")}, r"\[0, 1\]"), ({"weight": "x"}, "real number"),
                       ({"wieght": 0.5}, "unknown parameter name 'wieght'"),
                       ({torch.zeros(2): 0.5}, "not a parameter of this optimizer"),
                       ({3: 0.5}, "keys must be parameters or parameter names")]:
        with pytest.raises(ScaleError, match=match):
            opt.set_scales({"bias": 0.5, **bad})
        assert opt.get_scale("bias") == 1.0, "a rejected set_scales must change nothing"
    assert issubclass(ScaleError, ValueError)
    unnamed = SensitivityAdamW(model.parameters())
    with pytest.raises(ScaleError, match="knows no names"):
        unnamed.set_scales({"weight": 0.5})
    with pytest.raises(ScaleError, match=r"\[0, 1\]"):
        SensitivityAdamW(model.parameters(), scales={model.weight: 2.0})


def test_hyperparameter_errors():
    ps = [torch.nn.Parameter(torch.zeros(3))]
    for kwargs, match in [({"lr": -1.0}, "learning rate"), ({"betas": (1.0, 0.9)}, "betas"),
                          ({"eps": -1.0}, "eps"), ({"weight_decay": -0.1}, "weight_decay")]:
        with pytest.raises(OptimizerConfigError, match=match):
            SensitivityAdamW(ps, **kwargs)


def test_dtype_errors_name_the_parameter():
    model = torch.nn.Linear(4, 3).half()
    opt = SensitivityAdamW(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(ShapeError, match="parameter 'weight' is torch.float16"):
        opt.step()
    model = torch.nn.Linear(4, 3)
    opt = SensitivityAdamW(model.named_parameters())
    if not hasattr(model.weight, "grad_dtype"):
        return  # torch < 2.10 cannot even hold a gradient of another dtype
    model.weight.grad_dtype = None  # allow a gradient of another dtype (torch >= 2.10)
    model.weight.grad = torch.zeros(3, 4, dtype=torch.bfloat16)
    model.bias.grad = torch.zeros(3)
    with pytest.raises(ShapeError, match=r"parameter 'weight'.*grads\[0\] is torch.bfloat16"):
        opt.step()
    # the refused step did not count: fixed and retried, it is step 1 (torch AdamW's first step)
    model.weight.grad = torch.full((3, 4), 0.5)
    model.bias.grad = torch.full((3,), 0.5)
    w0 = model.weight.detach().clone()
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in model.parameters())
    ref = torch.nn.Parameter(w0.clone())
    ref.grad = torch.full((3, 4), 0.5)
    torch.optim.AdamW([ref], lr=opt.defaults["lr"], weight_decay=opt.defaults["weight_decay"]).step()
    torch.testing.assert_close(model.weight.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_parameters_without_grad_are_skipped():
    ps = make_params(torch.float32, "cpu", seed=5)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    opt = SensitivityAdamW(ps, lr=LR, weight_decay=WD, scales=dict(zip(ps, SCALES)))
    topt = torch_per_scale(ref, SCALES)
    for t in range(4):
        for i, (p, r, g) in enumerate(zip(ps, ref, grads_for(t, ps, torch.float32))):
            has = not (i == 1 and t % 2 == 0)  # parameter 1 gets a gradient every other step
            p.grad, r.grad = (g.clone(), g.clone()) if has else (None, None)
        opt.step()
        topt.step()
    assert opt.state[ps[1]]["step"].item() == 2
    for p, r in zip(ps, ref):
        assert rel_err(p.detach(), r.detach()) <= 1e-6


def test_groups_mixed_dtypes_and_lr_scheduler():
    """Two groups (own weight decay), fp32 and bf16 parameters in one group (two buckets, one
    call each), and an lr scheduler changing group lr between steps."""
    g = torch.Generator().manual_seed(6)
    f32 = [torch.randn(50, generator=g).requires_grad_() for _ in range(2)]
    b16 = [torch.randn(30, generator=g).bfloat16().requires_grad_()]
    other = [torch.randn(20, generator=g).requires_grad_()]
    opt = SensitivityAdamW([{"params": f32 + b16}, {"params": other, "weight_decay": 0.3}], lr=LR,
                           weight_decay=WD, scales={f32[1]: 0.5, b16[0]: 0.25})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref32 = [p.detach().clone().requires_grad_() for p in f32 + other]
    topt = torch.optim.AdamW([{"params": [ref32[0]], "lr": LR}, {"params": [ref32[1]], "lr": LR * 0.5},
                              {"params": [ref32[2]], "lr": LR, "weight_decay": 0.3}], lr=LR, weight_decay=WD)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=2, gamma=0.5)
    with _OpSpy() as spy:
        for t in range(5):
            grads = [torch.randn(p.shape, generator=g) for p in f32 + other]
            for p, r, gr in zip(f32 + other, ref32, grads):
                p.grad, r.grad = gr.clone(), gr.clone()
            b16[0].grad = torch.randn(30, generator=g).bfloat16()
            opt.step()
            topt.step()
            sched.step()
            tsched.step()
    assert len(spy.calls) == 5 * 3  # (group 0: fp32 + bf16 buckets) + group 1, every step
    for p, r in zip(f32 + other, ref32):
        assert rel_err(p.detach(), r.detach()) <= 1e-6
    assert opt.state[b16[0]]["step"].item() == 5


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_step(compile_backend):
    """torch.compile(opt.step) gives the eager result. One graph; it recompiles once after the
    first step (the optimizer state now exists), then not while the scales stay the same."""
    torch._dynamo.reset()
    models = []
    for _ in range(2):
        torch.manual_seed(7)
        models.append(torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Linear(5, 3)))
    scales = {"0.weight": 0.5, "1.bias": 0.0}
    eager = SensitivityAdamW(models[0].named_parameters(), lr=LR, scales=scales, backend="reference")
    comp = SensitivityAdamW(models[1].named_parameters(), lr=LR, scales=scales, backend="reference")
    step = torch.compile(comp.step, backend=compile_backend)
    for t in range(4):
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t))
            q.grad = p.grad.clone()
        eager.step()
        step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert comp.state[models[1][0].weight]["step"].item() == 4
    assert len(comp.state[models[1][1].bias]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture(backend):
    """A captured step replays like eager steps (launch tables cached, per-tensor scalars computed
    on the device, host tables of captured copies kept alive)."""
    need(backend, torch.device("cuda"))
    ours = make_params(torch.float32, "cuda", seed=8)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    for p, r in zip(ours, ref):
        p.grad = torch.zeros_like(p)  # static gradient buffers, refilled in place
        r.grad = torch.zeros_like(r)
    opt = SensitivityAdamW(ours, lr=LR, weight_decay=WD, scales=dict(zip(ours, SCALES)), backend=backend)
    topt = SensitivityAdamW(ref, lr=LR, weight_decay=WD, scales=dict(zip(ref, SCALES)), backend="reference")

    def fill(t):
        for p, r, g in zip(ours, ref, grads_for(t, ours, torch.float32)):
            p.grad.copy_(g)
            r.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for t in range(3):
            fill(t)
            opt.step()
            topt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for t in range(3, 8):
        fill(t)
        graph.replay()
        topt.step()
    torch.cuda.synchronize()
    for p, r in zip(ours, ref):
        assert rel_err(p.detach(), r.detach()) <= 1e-6
    assert opt.state[ours[0]]["step"].item() == 8
