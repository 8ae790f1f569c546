"""SensitivityAdamW: AdamW whose updates are scaled per parameter (Sensitivity-Guided Distillation).

Each parameter p has a scale s_p in [0, 1]. The step is exactly `torch.optim.AdamW` with learning
rate `lr * s_p` for p (the decoupled weight decay shrinks by `lr * s_p * weight_decay` too), and
s_p = 0 freezes p: it is left out of the step entirely, so it stays bit-identical, gets no
optimizer state (if it never had a non-zero scale) and costs no memory traffic. torch's fused
AdamW takes one learning rate per call, so the same thing there costs one launch per distinct
scale; here every (device, dtype) bucket of a parameter group is one call of the fused
`torch.ops.hprune.scaled_adamw_` (one kernel launch on a GPU).
"""
from __future__ import annotations

from itertools import chain
from numbers import Real
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

from hprune.errors import OptimizerConfigError, ScaleError, ShapeError
from hprune.kernels import scaled_adamw as _kernels  # noqa: F401  - registers hprune::scaled_adamw_

try:  # FSDP2 parameters are DTensors; the step works on their local shards
    from torch.distributed.tensor import DTensor
except Exception:  # noqa: BLE001 - builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

ScaleKey = Union[Tensor, str]


def _local(t: Tensor) -> Tensor:
    """The tensor the kernel updates: a DTensor's local shard, or the tensor itself."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor  # the shard itself (to_local() would add an autograd view per call)
    return t


def _check_scale(key: Any, s: Any) -> float:
    if isinstance(s, Tensor) and s.numel() == 1:
        s = s.item()
    if isinstance(s, bool) or not isinstance(s, Real):
        raise ScaleError(f"scale for {key!r} must be a real number in [0, 1], got {s!r}")
    s = float(s)
    if not 0.0 <= s <= 1.0:  # also rejects NaN
        raise ScaleError(f"scale for {key!r} must lie in [0, 1], got {s}")
    return s


class _Bucket:
    """Parameters of one group sharing (device, dtype) and a non-zero scale: one fused call.

    Once every parameter has its state, the lists the op takes (local params, moments, steps)
    are kept here, so a step only gathers the gradients; `ready` is False until then, and the
    bucket is rebuilt whenever scales, parameters or the state dict object change."""

    __slots__ = ("params", "scale_table", "dtensor", "ready", "locals", "exp_avgs", "exp_avg_sqs", "steps")

    def __init__(self, params: list[Tensor], scales: list[float], device: torch.device):
        self.params = params
        # float64 so lr * s equals the Python product torch.optim.AdamW would use for lr * s
        self.scale_table = torch.tensor(scales, dtype=torch.float64, device=device)
        self.dtensor = DTensor is not None and any(isinstance(p, DTensor) for p in params)
        self.ready = False
        self.locals: list[Tensor] = []
        self.exp_avgs: list[Tensor] = []
        self.exp_avg_sqs: list[Tensor] = []
        self.steps: list[Tensor] = []


class SensitivityAdamW(torch.optim.Optimizer):
    """AdamW with a learning-rate scale s in [0, 1] per parameter; s = 0 freezes the parameter.

    Args:
        params: parameters, `(name, parameter)` pairs (e.g. `model.named_parameters()`), or
            param-group dicts as for any torch optimizer. Parameters: float32 or bfloat16,
            contiguous; plain tensors or FSDP2 DTensors (the step updates the local shards).
        lr, betas, eps, weight_decay: as `torch.optim.AdamW` (weight decay is decoupled).
        scales: `{parameter or name: s}`; parameters not listed get s = 1. Names resolve through
            the names given with `params` or through `names`.
        names: `{name: parameter}` or `(name, parameter)` pairs to resolve string keys when
            `params` came without names (e.g. `dict(model.named_parameters())`).
        backend: force a kernel backend of `hprune::scaled_adamw_` ("cuda", "triton", "cpp",
            "reference"); None picks the fastest one available (see hprune.kernels.dispatch).

    State per trained parameter: `step` (float32 scalar on the parameter's device), `exp_avg`,
    `exp_avg_sq` (float32, even for bfloat16 parameters, DTensors for DTensor parameters). A
    bfloat16 parameter is updated in float32 and rounded to bfloat16 once per step.
    The scales live in each param group under "scales" (a list aligned with "params"), so
    `state_dict()` / `load_state_dict()` carry them.
    """

    def __init__(self, params: Iterable[Any], lr: Union[float, Tensor] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 scales: Optional[Mapping[ScaleKey, float]] = None, *,
                 names: Optional[Union[Mapping[str, Tensor], Iterable[tuple[str, Tensor]]]] = None,
                 backend: Optional[str] = None) -> None:
        lr_value = float(lr) if not isinstance(lr, Tensor) else float(lr.item())
        if not lr_value >= 0.0:
            raise OptimizerConfigError(f"invalid learning rate {lr!r}: must be >= 0")
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise OptimizerConfigError(f"invalid betas {betas!r}: both must lie in [0, 1)")
        if not eps >= 0.0:
            raise OptimizerConfigError(f"invalid eps {eps!r}: must be >= 0")
        if not weight_decay >= 0.0:
            raise OptimizerConfigError(f"invalid weight_decay {weight_decay!r}: must be >= 0")
        self._init_private(backend)
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                        weight_decay=float(weight_decay))
        super().__init__(params, defaults)
        if names is not None:
            pairs = names.items() if isinstance(names, Mapping) else names
            for name, p in pairs:
                if id(p) in self._index:
                    self._names[name] = p
        if scales:
            self.set_scales(scales)

    def _init_private(self, backend: Optional[str] = None) -> None:
        self._backend = backend
        self._index: dict[int, tuple[int, int]] = {}  # id(param) -> (group, position)
        self._names: dict[str, Tensor] = {}
        self._plans: dict[int, tuple[tuple, list[_Bucket]]] = {}  # group -> (key, buckets)

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle keep names and backend
        state = super().__getstate__()
        state["_hprune"] = {"names": self._names, "backend": self._backend}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by unpickling / deepcopy, and by Optimizer.load_state_dict with only
        # {"state", "param_groups"}: keep what this object already knows in the latter case.
        state = dict(state)
        extra = state.pop("_hprune", None)
        super().__setstate__(state)
        if extra is not None or not hasattr(self, "_index"):
            self._init_private(extra["backend"] if extra else None)
            self._names.update(extra["names"] if extra else {})
        self._reindex()

    # ---- parameter groups, names and scales ------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        n = len(group["params"])
        scales = group.setdefault("scales", [1.0] * n)
        if len(scales) != n:
            raise ScaleError(f"param group {len(self.param_groups) - 1} has {n} parameters but "
                             f"{len(scales)} scales")
        group["scales"] = [_check_scale(f"group {len(self.param_groups) - 1} parameter {i}", s)
                           for i, s in enumerate(scales)]
        self._reindex()

    def _reindex(self) -> None:
        self._index = {id(p): (gi, i) for gi, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])}
        for g in self.param_groups:
            for name, p in zip(g.get("param_names", ()), g["params"]):
                self._names[name] = p
        self._plans.clear()

    def _resolve(self, key: ScaleKey) -> tuple[int, int]:
        if isinstance(key, str):
            p = self._names.get(key)
            if p is None:
                if not self._names:
                    raise ScaleError(f"scales names parameter {key!r}, but this optimizer knows no names: "
                                     "pass model.named_parameters() as params, or names=...")
                near = ", ".join(sorted(self._names)[:5])
                raise ScaleError(f"unknown parameter name {key!r} in scales (known names include: {near}, ...)")
            return self._index[id(p)]
        if isinstance(key, Tensor):
            where = self._index.get(id(key))
            if where is None:
                raise ScaleError(f"a tensor of shape {tuple(key.shape)} in scales is not a parameter of "
                                 "this optimizer")
            return where
        raise ScaleError(f"scales keys must be parameters or parameter names, got {type(key).__name__}")

    def set_scales(self, scales: Mapping[ScaleKey, float]) -> None:
        """Sets s for the listed parameters (keyed by parameter or name); others keep theirs.

        Takes effect at the next step. Raises ScaleError (a ValueError), changing nothing, when a
        scale is outside [0, 1] or a key names no parameter of this optimizer. A parameter frozen
        after training keeps its optimizer state untouched; unfrozen again, it resumes from it."""
        resolved = [(self._resolve(k), _check_scale(k, s)) for k, s in scales.items()]
        for (gi, i), s in resolved:
            self.param_groups[gi]["scales"][i] = s
        self._plans.clear()

    def get_scale(self, key: ScaleKey) -> float:
        """The scale of one parameter (keyed by parameter or name)."""
        gi, i = self._resolve(key)
        return self.param_groups[gi]["scales"][i]

    def _label(self, p: Tensor) -> str:
        for name, q in self._names.items():
            if q is p:
                return repr(name)
        return f"of shape {tuple(p.shape)}"

    def _buckets(self, gi: int, group: dict[str, Any]) -> list[_Bucket]:
        """Trained parameters of a group split by (device, dtype); rebuilt only when the group's
        scales or parameters change (the scale tables then live on the device)."""
        params, scales = group["params"], group["scales"]
        key = (tuple(scales), tuple(map(id, params)), id(self.state))
        plan = self._plans.get(gi)
        if plan is not None and plan[0] == key:
            return plan[1]
        if len(scales) != len(params):
            raise ScaleError(f"param group {gi} has {len(params)} parameters but {len(scales)} scales")
        split: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        for i, (p, s) in enumerate(zip(params, scales)):
            if not 0.0 <= s <= 1.0:
                raise ScaleError(f"scale of parameter {self._label(p)} must lie in [0, 1], got {s}")
            if s == 0.0:
                continue  # frozen: never reaches the kernel
            local = _local(p)
            if local.dtype not in _kernels.PARAM_DTYPES:
                raise ShapeError(f"parameter {self._label(p)} is {local.dtype}; SensitivityAdamW supports "
                                 "float32 and bfloat16 parameters")
            if not local.is_contiguous():
                raise ShapeError(f"parameter {self._label(p)} (shape {tuple(local.shape)}) is not contiguous")
            ps, sc = split.setdefault((local.device, local.dtype), ([], []))
            ps.append(p)
            sc.append(s)
        buckets = [_Bucket(ps, sc, dev) for (dev, _), (ps, sc) in split.items()]
        self._plans[gi] = (key, buckets)
        return buckets

    # ---- the step --------------------------------------------------------------------------

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        # Moments are float32 whatever the parameter dtype; zeros_like keeps DTensor placements.
        state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One AdamW step for every parameter with a gradient and a non-zero scale.

        Parameters without a gradient are skipped (as torch.optim.AdamW does): their step count
        does not advance. Returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            for bucket in self._buckets(gi, group):
                grads = [p.grad for p in bucket.params]
                if bucket.ready and all(g is not None for g in grads):
                    # steady state: only the gradients change from step to step
                    params = [_local(p) for p in bucket.params] if bucket.dtensor else bucket.locals
                    if bucket.dtensor:
                        grads = [_local(g) for g in grads]
                    args = (params, grads, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.steps, bucket.scale_table)
                else:
                    args = self._gather(bucket, grads)
                    if args is None:
                        continue
                params, grads, exp_avgs, exp_avg_sqs, steps, table = args
                try:
                    torch.ops.hprune.scaled_adamw_(
                        params, grads, exp_avgs, exp_avg_sqs, table * group["lr"], torch.stack(steps).add_(1),
                        beta1, beta2, group["eps"], group["weight_decay"], self._backend)
                except ShapeError as err:
                    i = getattr(err, "index", None)
                    if i is None:
                        raise
                    owner = [p for p in bucket.params if p.grad is not None][i]
                    raise ShapeError(f"parameter {self._label(owner)}: {err}") from err
                torch._foreach_add_(steps, 1.0)  # only once the step was taken: a refused one does not count
        return loss

    def _gather(self, bucket: _Bucket, grads: list[Optional[Tensor]]):
        """The op's lists for the parameters that have a gradient, creating missing state.
        Marks the bucket ready (lists cached) when every parameter took part."""
        params, kept_grads, exp_avgs, exp_avg_sqs, steps, keep = [], [], [], [], [], []
        for k, (p, g) in enumerate(zip(bucket.params, grads)):
            if g is None:
                continue  # as torch.optim.AdamW: no gradient, no step (the count does not advance)
            if g.is_sparse:
                raise ShapeError(f"parameter {self._label(p)} has a sparse gradient; "
                                 "SensitivityAdamW needs dense gradients")
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state)
            keep.append(k)
            params.append(_local(p))
            kept_grads.append(_local(g))
            exp_avgs.append(_local(state["exp_avg"]))
            exp_avg_sqs.append(_local(state["exp_avg_sq"]))
            steps.append(state["step"])
        if not params:
            return None
        if len(keep) == len(bucket.params):
            table = bucket.scale_table
            bucket.locals, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.steps = params, exp_avgs, exp_avg_sqs, steps
            bucket.ready = True
        else:  # rare: some trained parameters got no gradient this step
            table = bucket.scale_table[torch.tensor(keep, device=bucket.scale_table.device)]
        return params, kept_grads, exp_avgs, exp_avg_sqs, steps, table

    # ---- state dict ------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads state and scales. Unlike torch's base class, keeps the moments in float32 for
        bfloat16 parameters (torch casts floating state to the parameter dtype), and puts
        `step` on the parameter's device."""
        old_scales = [list(g["scales"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, params))
        for k, saved in state_dict["state"].items():
            p = id_map.get(k)
            if p is None:
                continue
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=torch.float32)
            if "step" in saved:
                state["step"] = saved["step"].to(device=_local(p).device, dtype=torch.float32)
        for gi, (group, old) in enumerate(zip(self.param_groups, old_scales)):
            scales = group.setdefault("scales", old)  # a dict from torch's AdamW has no scales
            if len(scales) != len(group["params"]):
                raise ScaleError(f"loaded param group {gi} has {len(group['params'])} parameters but "
                                 f"{len(scales)} scales")
            group["scales"] = [_check_scale(f"group {gi} parameter {i}", s) for i, s in enumerate(scales)]
        self._reindex()
