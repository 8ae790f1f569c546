"""Block-by-block execution: the weights stay on the host, one transformer block at a time on the
compute device.

A model loaded from safetensors keeps its weights as memory-mapped file pages on the host (no
anonymous memory). Two ways to run it on a bounded device:

- `offloaded(model, device)`: a context in which every forward of the model runs with the
  non-block modules (embedders, final norm and projection) resident on `device` and each block
  moved there only for its own forward (diffusers' `enable_sequential_cpu_offload`, per block).
  Any existing code path works unchanged inside it (pipelines, calibration capture, the fidelity
  check, ΔP probing); every call moves every block once.
- `BlockStream(model, batches, device)`: block-major execution over a fixed list of input batches
  (calibration samples), as sequential GPTQ / OBS do: block i is moved to the device once, run on
  every batch, and its outputs become block i+1's inputs; the activations between blocks stay on
  the device or on the host. A consumer sees each block on the device (in its storage dtype) and
  may attach hooks (Hessians) or replace its layers before the stream moves on.

Compute dtype. On a CPU, bf16/fp16 matmuls run several times slower than fp32 where the CPU has
no native bf16 (AVX2: 1.5 vs 10.8 GFLOP/s measured here), so a block stored in 16 bits computes
in float32 there: its weights are upcast for its forward only (bf16 -> fp32 -> bf16 is exact, so
nothing stored changes). On a GPU the compute dtype is the storage dtype. Peak device memory is
then about the non-block modules + the largest block (in compute dtype) + its activations; the
host holds the mapped weights, the outputs written so far and (BlockStream, activations="host")
the activations of all batches between two blocks.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from hprune.models.adapters import FlowState, get_adapter

HALF = (torch.float16, torch.bfloat16)


def storage_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's floating-point parameters (the first one; float32 if none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def compute_dtype(storage: torch.dtype, device: torch.device | str) -> torch.dtype:
    """float32 for 16-bit storage on a CPU (see the module docstring), else the storage dtype."""
    return torch.float32 if torch.device(device).type == "cpu" and storage in HALF else storage


def block_names(model: nn.Module) -> list[str]:
    """Module paths of the transformer blocks in execution order (e.g. "transformer_blocks.3")."""
    return [info.name for info in get_adapter(model).blocks(model)]


def resident_modules(model: nn.Module) -> list[nn.Module]:
    """The model's top-level children that are not block lists (embedders, norm_out, proj_out)."""
    lists = set(get_adapter(model).lists)
    return [m for name, m in model.named_children() if name not in lists]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


@contextlib.contextmanager
def placed(modules: Sequence[nn.Module] | nn.Module, device: torch.device | str,
           dtype: torch.dtype | None = None, writeback: bool = False) -> Iterator[None]:
    """Moves every parameter and buffer of `modules` to `device` (floating-point ones to `dtype`
    if given) for the duration of the context, then puts the original tensors back. The modules
    stay the same objects (hooks and references keep working); a tensor already where it should
    be is not copied. Only for inference (the copies do not carry gradients back). writeback:
    values changed in place meanwhile (e.g. pruned weights) are copied back into the originals."""
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for m in mods:
            for t in _tensors(m):
                want = dtype if dtype is not None and t.is_floating_point() else t.dtype
                if t.device != torch.device(device) or t.dtype != want:
                    saved.append((t, t.data))
                    t.data = t.data.to(device=device, dtype=want)
        yield
        if writeback:
            with torch.no_grad():
                for t, data in saved:
                    data.copy_(t.data.to(device=data.device, dtype=data.dtype))
    finally:
        for t, data in reversed(saved):
            t.data = data


def _move(v: Any, device: torch.device | str | None, dtype: torch.dtype | None) -> Any:
    if isinstance(v, torch.Tensor):
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        return v.to(device) if device is not None else v
    if isinstance(v, tuple):
        return tuple(_move(x, device, dtype) for x in v)
    return v


def move_state(st: FlowState, device: torch.device | str | None, dtype: torch.dtype | None = None) -> FlowState:
    """The FlowState on `device` (streams and temb cast to `dtype` if given; the rotary embedding
    keeps its dtype, as in the model's own forward)."""
    return FlowState(_move(st.hidden, device, dtype), _move(st.context, device, dtype), _move(st.temb, device, dtype),
                     {k: _move(v, device, None) for k, v in st.extra.items()})


def state_bytes(st: FlowState) -> int:
    n = 0
    for t in (st.hidden, st.context, st.temb):
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    return n


# ---- per-call offload (any forward) -----------------------------------------------------------------

@contextlib.contextmanager
def offloaded(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None,
              progress: bool = False, desc: str = "blocks") -> Iterator[nn.Module]:
    """Every forward of `model` inside the context runs block by block on `device` in the compute
    dtype (`dtype`, default `compute_dtype` of the storage), the weights staying where they are.

    Floating-point inputs are cast to the compute dtype and moved to `device`; the output comes
    back in the dtype and on the device of `hidden_states` (what a resident model would return), so
    pipelines run unchanged around it. Yields the model."""
    device = torch.device(device)
    cdt = dtype or compute_dtype(storage_dtype(model), device)
    ad = get_adapter(model)
    handles: list[Any] = []
    stacks: dict[int, contextlib.ExitStack] = {}
    where: list[tuple[torch.device, torch.dtype]] = []

    def on_model(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hs, torch.Tensor):
            where.append((hs.device, hs.dtype))
        return _move(args, device, cdt), {k: _move(v, device, cdt) if k != "joint_attention_kwargs" else v
                                          for k, v in kwargs.items()}

    def after_model(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> Any:
        if not where:
            return out
        dev, dt = where.pop()
        if isinstance(out, tuple):
            return _move(out, dev, dt)
        if hasattr(out, "sample"):
            out.sample = _move(out.sample, dev, dt)
        return out

    def pre(block: nn.Module) -> Callable:
        def hook(_m: nn.Module, _args: tuple) -> None:
            st = contextlib.ExitStack()
            st.enter_context(placed(block, device, cdt))
            stacks[id(block)] = st
        return hook

    def post(block: nn.Module) -> Callable:
        def hook(_m: nn.Module, _args: tuple, _out: Any) -> None:
            st = stacks.pop(id(block), None)
            if st is not None:
                st.close()
        return hook

    with placed(resident_modules(model), device, cdt):
        try:
            handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True))
            handles.append(model.register_forward_hook(after_model, with_kwargs=True))
            for i in range(ad.num_blocks(model)):
                blk = ad.get_block(model, i)
                handles.append(blk.register_forward_pre_hook(pre(blk)))
                handles.append(blk.register_forward_hook(post(blk)))
            yield model
        finally:
            for h in handles:
                h.remove()
            for st in list(stacks.values()):  # a block that raised: put its weights back
                st.close()
            stacks.clear()


# ---- block-major streaming over fixed inputs --------------------------------------------------------

def _activations_where(requested: str, device: torch.device, nbytes: int) -> str:
    if requested not in ("auto", "device", "host"):
        from hprune.errors import HpruneError

        raise HpruneError(f"activations must be auto, device or host, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "device"  # the host is the device
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if 2 * nbytes < free // 4 else "host"  # inputs and outputs of one block at once


@dataclass
class StreamStep:
    """Block `index` of a BlockStream, moved to the device (in its storage dtype)."""

    stream: "BlockStream"
    index: int
    block: nn.Module
    inputs: list[FlowState]
    outputs: list[FlowState] | None = None

    def run(self, before_batch: Callable[[int], None] | None = None) -> list[FlowState]:
        """Runs the block (as it is now: hooks and replaced layers included) on every input batch
        in the compute dtype; returns the outputs (where the stream keeps activations). Call it
        as often as needed; the last result (or `outputs` if set) feeds the next block.
        before_batch(k) is called before batch k runs (e.g. to set the weight of its samples)."""
        s = self.stream
        ad = get_adapter(s.model)
        outs = []
        with placed(self.block, s.device, s.dtype):
            for k, st in enumerate(self.inputs):
                if before_batch is not None:
                    before_batch(k)
                out = ad.run_block(s.model, self.index, move_state(st, s.device), block=self.block)
                outs.append(move_state(out, s.keep) if s.keep != s.device else out)
        self.outputs = outs
        return outs


class BlockStream:
    """Block-major execution of `model` over `batches` (transformer kwargs, as CalibrationSet
    .batches gives them) with one block at a time on `device`; see the module docstring.

        stream = BlockStream(model, batches, device)
        for step in stream:             # step.block is on the device
            outs = step.run()           # optional: the stream runs the block if the body did not
        velocities = stream.finish()    # the model's outputs, one per batch (on the host)

    Args:
        dtype: compute dtype (default: `compute_dtype` of the storage on `device`).
        activations: "device", "host" or "auto" (host when the activations of all batches would
            take more than about a quarter of the device's free memory).
        progress: a progress line per block with an ETA (hprune.report.tqdm).
        writeback: weights a consumer changes in place on the device go back to the host copy."""

    def __init__(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str,
                 dtype: torch.dtype | None = None, activations: str = "auto", progress: bool = False,
                 desc: str = "blocks", writeback: bool = False) -> None:
        self.model = model
        self.writeback = writeback
        self.device = torch.device(device)
        self.dtype = dtype or compute_dtype(storage_dtype(model), self.device)
        self.batches = list(batches)
        self.progress, self.desc = progress, desc
        self.requested = activations
        self.keep = self.device
        self.states: list[FlowState] | None = None

    def _prepare(self) -> list[FlowState]:
        ad = get_adapter(self.model)
        states = []
        with torch.no_grad(), placed(resident_modules(self.model), self.device, self.dtype):
            for x in self.batches:
                states.append(ad.prepare(self.model, {k: _move(v, self.device, self.dtype) for k, v in x.items()}))
        where = _activations_where(self.requested, self.device, sum(state_bytes(s) for s in states))
        self.keep = self.device if where == "device" else torch.device("cpu")
        return [move_state(s, self.keep) for s in states]

    def __iter__(self) -> Iterator[StreamStep]:
        from hprune.report import tqdm

        ad = get_adapter(self.model)
        states = self._prepare()
        n = ad.num_blocks(self.model)
        with torch.no_grad():
            for i in tqdm(range(n), desc=self.desc, disable=not self.progress, unit="block"):
                block = ad.get_block(self.model, i)
                with placed(block, self.device, writeback=self.writeback):
                    step = StreamStep(self, i, block, states)
                    yield step
                    if step.outputs is None:
                        step.run()
                    states = step.outputs
        self.states = states

    def finish(self) -> list[torch.Tensor]:
        """The model's outputs for each batch (after iterating), on the host in the compute dtype."""
        if self.states is None:
            for _ in self:
                pass
        ad = get_adapter(self.model)
        out = []
        with torch.no_grad(), placed(resident_modules(self.model), self.device, self.dtype):
            for st in self.states:
                out.append(ad.finish(self.model, move_state(st, self.device)).cpu())
        return out


def should_offload(weight_bytes: int, device: torch.device | str, headroom: float = 0.8) -> bool:
    """Whether a model of `weight_bytes` should run block by block on `device`: a GPU with less
    free memory than weight_bytes / headroom (room left for activations). Never on a CPU, whose
    'device' is the host (there the compute dtype still applies through `offloaded`)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return weight_bytes > headroom * free


# ---- the output spilled to a file, block by block ---------------------------------------------------

SPILL_ALIGN = 64  # bytes: every tensor starts aligned in the spill file (any dtype's view is valid)


def _release_free_heap() -> None:
    """Gives the C heap's free pages back to the OS (glibc malloc_trim; nothing elsewhere). The
    tensors a Spill frees are mostly below glibc's mmap threshold (a packed SD3.5-Large Linear is
    ~12 MB; the threshold rises to 32 MB once big blocks are freed), so they stay in the heap as
    anonymous memory, partly reused but fragmented, unless trimmed."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


class Spill:
    """Moves the host tensors of modules out of anonymous memory as soon as they are made: their
    bytes go to an hprune-owned temporary file beside an output `near` (named by
    hprune.owned.tmp_sibling, `.NAME.tmp-xxxxxxxx`, so a killed run's leftover is removed by the
    next run that takes output_lock(near)), and each tensor's data becomes a view of a shared
    memory map of that file: file pages, which the kernel writes back and drops under pressure,
    instead of anonymous memory that stays until the process ends.

    Block-by-block quantisation spills each block's new layers (hprune.quant.blockwise), so the
    host holds the mapped input weights + one block's output; the save then streams the tensors
    from the maps (hprune.io.write_safetensors). Values, dtypes and shapes are unchanged (a spilled
    tensor is contiguous), so whatever is saved from them is byte-identical. A tensor keeps its
    identity, except a view (its base would keep the memory alive): the module gets a new tensor.

        with output_lock(out), Spill(out) as spill:
            spill(new_layers_of_block)      # after each block, on the host
            save_compressed(model, out)     # streams from the maps
        # the file is gone; the model stays usable (the maps outlive the name)

    Use it only under output_lock(near) (the stale-temporary cleanup of a concurrent run would
    otherwise remove the file; the maps would survive, the disk space would not be reclaimed at
    once). CUDA / meta tensors are left where they are (move modules to the host first)."""

    def __init__(self, near: str | os.PathLike) -> None:
        from pathlib import Path

        from hprune.owned import tmp_sibling

        self.path = tmp_sibling(Path(os.path.abspath(os.path.expanduser(near))), "tmp")
        self._f: Any = None
        self._end = 0  # bytes written so far
        self._maps: list[tuple[int, int]] = []  # (address, bytes) of each map: tensors already spilled

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bytes(self) -> int:
        """Bytes spilled so far (with alignment padding)."""
        return self._end

    def _spilled(self, t: torch.Tensor) -> bool:
        p = t.untyped_storage().data_ptr()
        return any(a <= p < a + n for a, n in self._maps)

    def __call__(self, modules: Sequence[nn.Module] | nn.Module) -> int:
        """Spills every CPU parameter and buffer of `modules` (see the class docstring); returns the
        bytes written. A write that fails for lack of room or rights is an OutputError (nothing of
        the module is changed then)."""
        import numpy as np

        from hprune.errors import OutputError
        from hprune.io import write_tensor_bytes
        from hprune.owned import write_error

        mods = [modules] if isinstance(modules, nn.Module) else list(modules)
        todo: list[torch.Tensor] = []
        seen: set[int] = set()
        for m in mods:
            for t in _tensors(m):
                if id(t) not in seen and t.device.type == "cpu" and t.numel() and not self._spilled(t):
                    seen.add(id(t))
                    todo.append(t)
        if not todo:
            return 0
        start = self._end
        layout = []
        try:
            if self._f is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "wb+")
            off = start
            for t in todo:
                off += -off % SPILL_ALIGN
                self._f.seek(off)
                n = write_tensor_bytes(self._f, t)
                layout.append((t, off - start, n))
                off += n
            self._f.flush()
            self._end = off
            # mode r+: a shared map (file pages; a write to a spilled tensor goes to the file)
            mm = np.memmap(self.path, dtype=np.uint8, mode="r+", offset=start, shape=(off - start,))
        except OSError as exc:
            err = write_error(exc, f"the spill file {self.path}")
            if err is None:
                raise
            raise err from None
        except ValueError as exc:  # np.memmap of an empty / short file
            raise OutputError(f"cannot map the spill file {self.path}: {exc}") from None
        base = torch.from_numpy(mm)  # no copy: the tensor keeps the map alive
        self._maps.append((base.data_ptr(), off - start))
        new = {id(t): base[o:o + n].view(t.dtype).reshape(t.shape) for t, o, n in layout}
        with torch.no_grad():
            for m in mods:
                for sub in m.modules():
                    for table in (sub._parameters, sub._buffers):
                        for k, t in table.items():
                            if t is None or id(t) not in new or t._base is None:
                                continue
                            # a view keeps its base tensor (and its memory) alive whatever its .data:
                            # the module gets a new tensor instead (ties between modules kept)
                            table[k] = (nn.Parameter(new[id(t)], requires_grad=t.requires_grad)
                                        if isinstance(t, nn.Parameter) else new[id(t)])
            for t, _, _ in layout:
                if t._base is None:
                    t.data = new[id(t)]  # the same tensor object: references and hooks keep working
        del layout, todo, new
        _release_free_heap()
        return off - start

    def close(self) -> None:
        """Closes and removes the spill file. Tensors spilled keep their values (the maps hold the
        pages until the tensors are freed). Idempotent."""
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._f = None
        self.path.unlink(missing_ok=True)
