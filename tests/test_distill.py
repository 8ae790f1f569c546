"""Distillation: it recovers fidelity, PWP freezes, SGDistill scales show in the updates, resume is
exact, bad settings and non-finite losses are caught, and 2 processes follow the 1-process run."""
import copy
import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hprune.calib import synthetic
from hprune.distill import DistillConfig, distill, training_schedule
from hprune.errors import HpruneError
from hprune.hpp import plan_hpp
from hprune.metrics import fidelity
from hprune.models import apply_plan
from hprune.probe import probe_sensitivity
from util import fresh


@functools.lru_cache(maxsize=None)
def setup(name="tiny-sd3", ratio=0.3):
    teacher = fresh(name)
    cal = synthetic(teacher, n_prompts=4, num_steps=4, seed=0)
    table = probe_sensitivity(teacher, cal, max_samples=8, progress=False)
    student = copy.deepcopy(teacher)
    apply_plan(student, plan_hpp(table, ratio))
    return teacher, student, cal, table


def student_copy(name="tiny-sd3"):
    return copy.deepcopy(setup(name)[1])


def test_distillation_recovers_fidelity():
    teacher, _, cal, table = setup()
    teacher = copy.deepcopy(teacher).train().requires_grad_(True)  # as a caller that goes on training it
    student = student_copy()
    held = list(synthetic(teacher, n_prompts=2, num_steps=3, seed=99).batches(4))
    before = fidelity(teacher, student, held)["rel_mse"]
    student, res = distill(teacher, student, cal, DistillConfig(steps=40, batch_size=8, lr=3e-4), table=table,
                           progress=False)
    after = fidelity(teacher, student, held)["rel_mse"]
    first = sum(r["out"] for r in res.history[:5]) / 5
    last = sum(r["out"] for r in res.history[-5:]) / 5
    assert last < 0.5 * first  # the KD loss falls
    assert after < 0.6 * before  # held-out fidelity to the teacher improves over the pruned-only model
    # the caller's teacher is left as it was given (it may go on training elsewhere)
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training


def test_pwp_freezes_early_blocks_bit_for_bit():
    teacher, _, cal, table = setup()
    student = student_copy()
    sched = training_schedule(student, table, pwp=True)
    first = sched["first_pruned"]
    assert first is not None and first > 0
    frozen = [n for n, s in sched["scales"].items() if s == 0]
    assert any(n.startswith("transformer_blocks.0.") for n in frozen)
    assert any(n.startswith("pos_embed.") or n.startswith("time_text_embed.") for n in frozen)
    assert not any(n.startswith(f"transformer_blocks.{first}.") for n in frozen)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    student, _ = distill(teacher, student, cal, DistillConfig(steps=3, batch_size=4, lr=1e-3, sgd=False),
                         progress=False)
    after = dict(student.named_parameters())
    for n in frozen:
        assert torch.equal(before[n], after[n]), n
    unmoved = {n for n in before if n not in frozen and torch.equal(before[n], after[n])}
    # Only dead weights stay put: diffusers' last SD3 block (context_pre_only) computes context
    # queries whose attention output it discards, so add_q_proj never gets a gradient.
    assert unmoved == {"transformer_blocks.7.attn.add_q_proj.weight", "transformer_blocks.7.attn.add_q_proj.bias"}


@pytest.mark.parametrize("scale,budget", [("inverse", "fixed"), ("inverse", "mean"), ("log", "mean")])
def test_sgdistill_scales_show_in_the_first_update(scale, budget):
    """Adam's first step moves an element by rate * g / (|g| + eps): so max |Δp| = lr * lr_scale * s."""
    teacher, _, cal, table = setup()
    student = student_copy()
    lr = 1e-3
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    student, res = distill(teacher, student, cal, DistillConfig(steps=1, batch_size=4, lr=lr, sgd=True,
                                                                sgd_scale=scale, sgd_budget=budget,
                                                                grad_clip=None, eps=1e-12), table=table,
                           progress=False)
    scales, mult = res.schedule["scales"], res.schedule["lr_scale"]
    assert res.schedule["sgd"] and len({round(s, 6) for s in scales.values()}) > 3
    assert min(s for s in scales.values()) == 0.0  # the most sensitive unit is frozen
    assert (mult == 1.0) if budget == "fixed" else (mult > 1.0)
    checked = 0
    for n, p in student.named_parameters():
        moved = (p.detach() - before[n]).abs().max().item()
        s = scales[n]
        if s == 0 or ".7.attn.add_q_proj." in n:  # frozen, or dead (no gradient: see the PWP test)
            assert moved == 0, n
        elif p.numel() > 16:
            assert moved == pytest.approx(lr * mult * s, rel=0.02), n
            checked += 1
    assert checked > 10


def test_sgdistill_scale_and_budget():
    """Both scales order the units by ΔP with the end points 1 (least sensitive) and 0 (most); the
    log scale sits above the inverse one in between; budget "mean" makes lr the units' mean rate
    and leaves every other trainable parameter at lr."""
    _, student, _, table = setup()
    numel = {n: p.numel() for n, p in student.named_parameters()}
    fixed = training_schedule(student, table, sgd=True, scale="inverse", budget="fixed")
    log = training_schedule(student, table, sgd=True, scale="log", budget="fixed")
    assert fixed["lr_scale"] == log["lr_scale"] == 1.0
    rows_i = [(r["dP"], r["scale"]) for r in fixed["rows"] if r["why"] == "SGDistill"]
    rows_l = [(r["dP"], r["scale"]) for r in log["rows"] if r["why"] == "SGDistill"]
    assert len(rows_i) > 4
    for rows in (rows_i, rows_l):
        by_dp = [s for _, s in sorted(rows)]
        assert by_dp == sorted(by_dp, reverse=True) and by_dp[0] == 1.0 and by_dp[-1] == 0.0
    assert all(sl >= si - 1e-12 for (_, si), (_, sl) in zip(rows_i, rows_l))
    assert any(sl > si + 0.05 for (_, si), (_, sl) in zip(rows_i, rows_l))

    mean = training_schedule(student, table, sgd=True, scale="inverse", budget="mean")
    first = mean["first_pruned"]
    unit = {n for n in numel if n.startswith("transformer_blocks.") and int(n.split(".")[1]) >= first}
    rate = {n: mean["lr_scale"] * s for n, s in mean["scales"].items()}
    assert sum(rate[n] * numel[n] for n in unit) / sum(numel[n] for n in unit) == pytest.approx(1.0)
    for n, s in fixed["scales"].items():
        if n in unit:
            assert rate[n] == pytest.approx(mean["lr_scale"] * s), n
        else:  # PWP-frozen stays frozen, the rest keeps the base rate
            assert rate[n] == pytest.approx(s), n
    with pytest.raises(HpruneError, match="sgd_budget must be one of mean, fixed"):
        DistillConfig(sgd_budget="avg").validate()
    with pytest.raises(HpruneError, match="sgd_scale must be one of inverse, log"):
        DistillConfig(sgd_scale="sqrt").validate()


def test_sgd_is_automatic_above_r_thres():
    teacher, _, cal, table = setup()
    _, res = distill(teacher, student_copy(), cal, DistillConfig(steps=1, batch_size=2), table=table, progress=False)
    assert res.schedule["removed_ratio"] > 0.25 and res.schedule["sgd"]
    light = copy.deepcopy(teacher)
    apply_plan(light, plan_hpp(table, 0.1))
    _, res = distill(teacher, light, cal, DistillConfig(steps=1, batch_size=2), table=table, progress=False)
    assert res.schedule["removed_ratio"] < 0.25 and not res.schedule["sgd"]


def test_resume_equals_uninterrupted(tmp_path):
    teacher, _, cal, table = setup()
    cfg = dict(steps=6, batch_size=4, lr=1e-3, checkpoint_every=2)
    a, res_a = distill(teacher, student_copy(), cal, DistillConfig(**cfg, checkpoint_dir=str(tmp_path / "a")),
                       table=table, progress=False)

    class Killed(Exception):
        pass

    def kill(step, _rec):
        if step == 4:  # after the step-4 checkpoint, before step 6's
            raise Killed

    with pytest.raises(Killed):
        distill(teacher, student_copy(), cal, DistillConfig(**cfg, checkpoint_dir=str(tmp_path / "b")),
                table=table, progress=False, on_step=kill)
    # the manifest lists what hprune wrote there (hprune.owned): only that is ever removed
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".hprune-output", "step-0000002", "step-0000004"]
    b, res_b = distill(teacher, student_copy(), cal,
                       DistillConfig(**cfg, checkpoint_dir=str(tmp_path / "b"), resume=True), table=table,
                       progress=False)
    assert res_b.resumed_from == 4
    assert [r["loss"] for r in res_b.history] == [r["loss"] for r in res_a.history]
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    # only the newest checkpoints are kept
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".hprune-output", "step-0000004", "step-0000006"]


def test_resume_of_a_checkpoint_older_than_sgd_budget(tmp_path):
    """A checkpoint written before sgd_scale / sgd_budget existed was trained with inverse / fixed:
    it resumes under those and is refused under the new default budget."""
    import json

    teacher, _, cal, table = setup()
    cfg = dict(steps=3, batch_size=2, lr=1e-3, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    with pytest.raises(RuntimeError):
        distill(teacher, student_copy(), cal, DistillConfig(**cfg, sgd_budget="fixed"), table=table, progress=False,
                on_step=lambda step, _r: (_ for _ in ()).throw(RuntimeError("stop")) if step == 2 else None)
    state = tmp_path / "step-0000002" / "state.json"
    data = json.loads(state.read_text())
    del data["config"]["sgd_budget"], data["config"]["sgd_scale"]
    state.write_text(json.dumps(data))
    with pytest.raises(HpruneError, match="sgd_budget fixed -> mean"):
        distill(teacher, student_copy(), cal, DistillConfig(**cfg, resume=True), table=table, progress=False)
    _, res = distill(teacher, student_copy(), cal, DistillConfig(**cfg, resume=True, sgd_budget="fixed"),
                     table=table, progress=False)
    assert res.resumed_from == 2 and len(res.history) == 3


def test_bad_settings_and_non_finite_loss(tmp_path):
    teacher, _, cal, table = setup()
    with pytest.raises(HpruneError, match="needs the sensitivity table"):
        distill(teacher, student_copy(), cal, DistillConfig(steps=1, sgd=True), progress=False)
    with pytest.raises(HpruneError, match="checkpoint_every needs checkpoint_dir"):
        distill(teacher, student_copy(), cal, DistillConfig(steps=1, checkpoint_every=1), progress=False)
    distill(teacher, student_copy(), cal, DistillConfig(steps=2, batch_size=2, checkpoint_every=1,
                                                        checkpoint_dir=str(tmp_path)), table=table, progress=False)
    with pytest.raises(HpruneError, match="cannot resume with different settings: lr"):
        distill(teacher, student_copy(), cal, DistillConfig(steps=3, batch_size=2, lr=1, checkpoint_every=1,
                                                            checkpoint_dir=str(tmp_path), resume=True),
                table=table, progress=False)
    broken = student_copy()
    with torch.no_grad():
        next(p for n, p in broken.named_parameters() if n.startswith("proj_out")).fill_(float("nan"))
    with pytest.raises(HpruneError, match="non-finite loss at step 0"):
        distill(teacher, broken, cal, DistillConfig(steps=2, batch_size=2), table=table, progress=False)


# ---- 2 processes (gloo, FSDP2) vs 1 ---------------------------------------------------------------

STEPS, BATCH = 3, 4


def _run(out_path, world=1, rank=0, port=0):
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        teacher, _, cal, table = setup()
        student, res = distill(teacher, student_copy(), cal, DistillConfig(steps=STEPS, batch_size=BATCH, lr=1e-3),
                               table=table, progress=False)
        if rank == 0:
            torch.save({"losses": [r["loss"] for r in res.history],
                        "params": {n: p.detach().clone() for n, p in student.named_parameters()}}, out_path)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _worker(rank, world, port, out_path):
    _run(out_path, world, rank, port)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_processes_follow_the_one_process_run(tmp_path):
    _run(tmp_path / "one.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path / "two.pt")), nprocs=2, join=True)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    # Gradients are summed in another order across 2 ranks; Adam divides by |g|, so an element with a
    # near-zero gradient can move differently by a fraction of one step (lr = 1e-3): allow 1% of it.
    for n, p in one["params"].items():
        torch.testing.assert_close(two["params"][n], p, rtol=1e-5, atol=1e-5)


def test_resume_refuses_another_student_or_a_bad_state_before_any_work(tmp_path):
    """The checkpoint records what it fits: a student of another plan / ratio, a state without
    world_size, a negative step or one past `steps` are refused with one line, before training."""
    import json

    teacher, _, cal, table = setup()
    cfg = dict(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    with pytest.raises(RuntimeError):
        distill(teacher, student_copy(), cal, DistillConfig(**cfg), table=table, progress=False,
                on_step=lambda step, _r: (_ for _ in ()).throw(RuntimeError("stop")) if step == 2 else None)
    other = copy.deepcopy(teacher)
    apply_plan(other, plan_hpp(table, 0.15))
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(HpruneError, match="trained on another student"):
        distill(teacher, other, cal, DistillConfig(**cfg, resume=True), table=table, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # untouched
    with pytest.raises(HpruneError, match="past the run's 1 steps"):
        distill(teacher, student_copy(), cal, DistillConfig(**{**cfg, "steps": 1}, resume=True), table=table,
                progress=False)
    state = tmp_path / "step-0000002" / "state.json"
    good = json.loads(state.read_text())
    for change, match in [(lambda d: d.pop("world_size"), "missing 'world_size'"),
                          (lambda d: d.update(step=-3), "step -3"),
                          (lambda d: d.update(step="2"), "step '2'")]:
        bad = copy.deepcopy(good)
        change(bad)
        state.write_text(json.dumps(bad))
        with pytest.raises(HpruneError, match=match):
            distill(teacher, student_copy(), cal, DistillConfig(**cfg, resume=True), table=table, progress=False)
    state.write_text(json.dumps(good))
    _, res = distill(teacher, student_copy(), cal, DistillConfig(**cfg, resume=True), table=table, progress=False)
    assert res.resumed_from == 2 and len(res.history) == 4


def test_config_refuses_non_finite_and_negative_settings():
    for kw, match in [(dict(lr=float("nan")), "lr must be a positive number"),
                      (dict(lr=float("inf")), "lr must be a positive number"),
                      (dict(checkpoint_every=-1, checkpoint_dir="x"), "checkpoint_every must be >= 0"),
                      (dict(lambda_feat=float("nan")), "lambda_feat must be a finite number"),
                      (dict(keep_checkpoints=0), "keep_checkpoints must be >= 1")]:
        with pytest.raises(HpruneError, match=match):
            DistillConfig(**kw).validate()


def test_pruned_student_copies_only_what_it_keeps():
    from hprune.distill import pruned_student

    teacher, student, _, table = setup()
    plan = plan_hpp(table, 0.3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    got = pruned_student(teacher, plan, dtype=torch.float64)
    want = student.state_dict()
    assert got.state_dict().keys() == want.keys()
    assert all(torch.equal(got.state_dict()[k], want[k].double()) for k in want)  # the same values, cast once
    theirs = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in theirs for p in got.parameters())  # it owns its weights: training is safe
    shared = pruned_student(teacher, plan, share=True)
    kept = [n for n, _ in shared.named_parameters() if "norm1" not in n]  # modulation rows are sliced anew
    assert kept and all(shared.get_parameter(n).data_ptr() in theirs for n in kept)  # nothing copied
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())  # the teacher is unchanged


def test_streamed_teacher_equals_resident_teacher_bit_for_bit():
    """offload_teacher: the teacher's blocks come to the device one at a time and compute in the
    compute dtype (float32 on a CPU for bf16 weights): the run equals one with a resident float32
    copy of those weights, and the bf16 weights are neither copied for good nor changed."""
    from hprune.distill import pruned_student
    from hprune.models import get_adapter

    base, _, cal, table = setup()
    plan = plan_hpp(table, 0.3)
    t16 = copy.deepcopy(base).to(torch.bfloat16)
    t32 = copy.deepcopy(t16).float()  # the same (bf16-exact) values, resident in float32
    stored = {k: v.clone() for k, v in t16.state_dict().items()}
    cfg = DistillConfig(steps=3, batch_size=2, lr=1e-3)
    ref, _ = distill(t32, pruned_student(t32, plan), cal, cfg, table=table, progress=False)
    seen = []
    q = get_adapter(t16).get_block(t16, 1).attn.to_q
    h = q.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    got, _ = distill(t16, pruned_student(t16, plan, dtype=torch.float32), cal, cfg, table=table, progress=False,
                     offload_teacher=True)
    h.remove()
    assert seen and set(seen) == {torch.float32}  # the block computed in float32 ...
    assert all(v.dtype == torch.bfloat16 and torch.equal(t16.state_dict()[k], v)
               for k, v in stored.items() if v.is_floating_point())  # ... its stored weights stayed bf16
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
