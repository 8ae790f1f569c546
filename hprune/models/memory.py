"""Predicting what a run needs before it starts: peak device and host memory and time per stage,
from a model's config and safetensors headers (no weight is read).

The arithmetic (P = parameters, b = bytes per stored weight, S = tokens per sample (image + text),
D = hidden width, L = blocks, N = devices of an FSDP2 run):

- weights: Σ of the tensors' bytes from the headers; a block's bytes from its tensors' names.
- inference activations of one block forward, per sample: ACT_INFER · S · D · c bytes (c = compute
  dtype bytes): the two streams, q/k/v, the attention output and the 4·D MLP hidden are alive at
  once (attention itself is a fused SDPA kernel on CPU and GPU: no S² matrix).
- training (distillation): the student's weights (P·b), gradients (P·b) and AdamW's two moments
  (2·P·b; 8-bit AdamW: 2·P bytes plus one fp32 absmax per 256 values), all ÷ N under FSDP2, plus
  the activations autograd keeps: ACT_TRAIN · S · D · c per block and sample, or with gradient
  checkpointing only each block's input (2 streams) plus one block's full set during its
  recompute. The teacher's weights (replicated under FSDP2) and its no-grad forward are added.
  With the teacher streamed block by block (offload) its weights leave the device: it holds the
  teacher's non-block modules + its largest block (in the compute dtype; on a CPU only the fp32
  copies of 16-bit weights, the rest being mapped file pages), alive during the teacher's
  forward only, before the student's gradients exist: the step's peak is then student + states
  + max(teacher stream + its forward's activations, grads + training activations); each step
  also copies the teacher's weights to the device once (H2D_RATE).
- block-by-block (offload): the non-block modules + the largest block in the compute dtype + its
  activations on the device; the host holds the memory-mapped weights (file pages, not anonymous
  memory) and what the stage produces.
- GPTQ: one block's Hessians, in² · 4 bytes per group of Linears that share an input (offload), or
  Hessian groups of ≤ 2 GiB (resident, one calibration pass per group).
- calibration set: C = calls · r · s · b bytes (r = rows per call: 2 under SD3's classifier-free
  guidance, 1 for FLUX; s = values of one sample: latents + text tokens · joint_attention_dim +
  pooled). Stages that read a set hold it.
- calib (capture): weights + one call's activations (r rows) + 2 · C (the recorded inputs, then
  their concatenation).
- fidelity check: weights + C + one forward of one sample + its kept inputs and outputs
  (≈ 3 · s · b per sample checked).
- probe: weights + C + per batch of B samples one block's activations + the L + 1 block inputs kept
  for the tails (S · D · c · B each) + the float64 pair of the similarity (2 · S · D · 8 · B).
- OBS-Diff resident, unstructured / N:M: weights + C + the float32 Hessians of every Linear group
  (÷ --groups) + the larger of (the forward's activations + one Linear input in float32) and one
  Linear's solve (4 · (2 · out · in + 3 · in²): W, damped H, its Cholesky factor and inverse).
  Structured: the Hessians of the consumers of heads / neurons (to_out, to_add_out, the FFNs' down
  projections, a FLUX single block's proj_out) + ColumnOBS's float64 work of the largest consumer,
  8 · (3 · in² + out · in) (H, its Cholesky factor and H⁻¹ live together while it is set up).
  Block by block (`offload`): one block's Hessians (structured: its consumers') + every call's
  block input and output (2 · calls · r · S · D · c) + the block in the compute dtype while it
  runs. (A structured run of memory-mapped weights also holds the shrunk
  Linears it makes, at most the model's Linears × (1 − sparsity): not counted.)
- prune (surgery): the weights as loaded; removed parts are dropped, nothing kept is copied.
Checked on the CPU against peaks measured in a fresh process (benchmarks/stage_peaks.py,
tests/test_memory_plan.py): calib, fidelity, probe, prune and the four OBS-Diff forms within
±25 % on a tiny activation-bound SD3 and medium (hidden 384) SD3 fp32 / bf16 and FLUX shapes; the
runtime's own memory (imports, first-call kernel workspaces: tens of MB) is not in the plan.
- quantize (RTN, GPTQ): `hprune quantize` runs block by block with --offload and by itself on a
  CPU for 16-bit weights; then each block's packed layers go to a spill file beside --out as the
  block is done (models.offload.Spill), so the host holds ONE block's output, not the model's
  (packed: 0.5 + 2·s/64 bytes per weight, s = 2 for 16-bit weights, 4 for fp32 scales). RTN adds
  formats.quantize's working memory for the largest Linear (6·D² weights, the AdaLN one): its
  codes and fp32 scales (1 + 8/64 bytes per weight) + the scale search's RTN_SEARCH_BUFFERS fp32
  values per weight of a RTN_CHUNK-weight chunk. GPTQ is the largest of its phases: RTN of the
  other Linears; collecting (the block in the compute dtype, the Hessians, one x^T x of the
  widest input k, the activations); solving (the Hessians, 3 · 4·k² of the solver's matrices and
  the D x k weight in fp32, the packed output); + GPTQ_FIXED. save-quantized streams the tensors
  (from the spill file's maps when spilled) and adds the manifest hash's buffers (SAVE_BUFFERS).
  Checked against measured peaks on the CPU (tiny and medium SD3 shapes, resident and block by
  block, RTN and GPTQ: tests/test_memory_plan_quantize.py, within ±25 %) and on a full 38-block
  SD3.5-Large-shaped folder (docs/scale.md). The Python / torch process itself (~0.25-0.5 GB
  anonymous) is not counted.

Time: forward FLOPs per sample and block = 2 · P_block · S + 4 · S² · D (attention), at an
assumed sustained rate (THROUGHPUT: fp32 GEMM on one CPU thread as measured on this project's
AVX2 machine; bf16 on an H100-class GPU at ~40 % of its dense peak). Training costs 3x the
student's forward + the teacher's forward. RTN rounds RTN_RATE weights/s per CPU thread (measured
with the scale search) and GPU_RTN_RATE on a GPU. These are estimates to plan with, not promises;
ACT_INFER / ACT_TRAIN were fitted on CPU measurements of a medium SD3 shape and checked on the
tiny built-ins (tests/test_memory_plan.py); one warm SD3 forward measures 12.9 S·D values (batch
1-4, 272-2,320 tokens). The CPU rate is conservative: fp32 GEMMs run at 50-86 GFLOP/s on one thread
of this project's machine, and the stage times above came out 1-6x the measured CPU seconds
(docs/scale.md).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACT_INFER = 12.0  # live activations of one block forward, in units of S·D values
ACT_TRAIN = 22.0  # activations autograd keeps per block (no checkpointing), in units of S·D values
THROUGHPUT = {"cpu": 10e9, "cuda": 300e12}  # FLOP/s: per CPU thread (fp32); per GPU (bf16)
RTN_RATE = 10e6  # weights/s per CPU thread with the scale search (11.3 M/s measured: SD3.5-Large, docs/scale.md)
GPU_RTN_RATE = 2.0e9  # weights/s on a GPU (estimate)
HESSIAN_BUDGET = 2 << 30
H2D_RATE = 10e9  # bytes/s host -> GPU of pageable (memory-mapped) weights (estimate)
# a block's removable components (hprune.models.adapters), told by a tensor name's part
_COMPONENT_MARKS = ((".attn.", "attn"), (".attn2.", "attn2"), (".ff.", "ff"), (".ff_context.", "context_ff"),
                    (".to_add_out.", "context"), (".proj_mlp.", "mlp"))
_CONSUMERS = (".to_out.0.weight", ".to_add_out.weight", ".net.2.weight")  # read heads / FFN neurons
RTN_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 22}  # weights per chunk of formats.quantize's scale search
RTN_SEARCH_BUFFERS = 18  # fp32 values per chunk weight alive in the search (9 candidates x 2: fitted)
GPTQ_FIXED = 2 << 20  # small buffers and objects of the calibration machinery (fitted on the tiny shape)
SAVE_BUFFERS = 8 << 20  # the save's own buffers: two 4 MiB blocks of the manifest's hash
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class ModelShape:
    """What the plan needs to know about a model, read from its config and tensor headers."""

    name: str
    family: str  # "sd3" | "flux"
    num_blocks: int
    hidden: int
    params: int
    weight_bytes: int  # stored bytes of every tensor
    block_bytes: list[int]  # per block, execution order
    block_params: list[int]
    linear_in: list[list[int]]  # per block: in_features of its Linears that share no input (Hessians)
    store_bytes: int  # bytes per stored float weight (2 for bf16, 4 for fp32)
    tokens_img: int
    tokens_txt: int
    quantised: bool = False
    mapped: bool = True  # weights memory-mapped from files (False: built in memory, e.g. tiny built-ins)
    calib_sample_values: int = 0  # values of one calibration sample (latents + text + pooled embeddings)
    cfg_rows: int = 1  # rows per transformer call while denoising (2: SD3's classifier-free guidance)
    components: list[int] = field(default_factory=list)  # per block: removable components (ΔP pieces)
    linear_max: int = 0  # values of the largest Linear weight in a block
    consumers: list[list[tuple[int, int]]] = field(default_factory=list)  # per block: (out, in) of the
    # Linears that read attention heads / FFN neurons (structured OBS-Diff's Hessians)

    @property
    def other_bytes(self) -> int:
        return self.weight_bytes - sum(self.block_bytes)

    @property
    def tokens(self) -> int:
        return self.tokens_img + self.tokens_txt

    @property
    def calib_sample_bytes(self) -> int:
        return self.calib_sample_values * self.store_bytes  # stored as the model's inputs are (its dtype)


def _header_tensors(files: list[str]) -> dict[str, tuple[str, list[int]]]:
    from hprune.io import check_safetensors

    out = {}
    for f in files:
        for k, v in check_safetensors(f).items():
            if k != "__metadata__":
                out[k] = (v["dtype"], list(v["shape"]))
    return out


def _block_key(name: str, lists: tuple[str, ...], counts: dict[str, int]) -> int | None:
    for li, ln in enumerate(lists):
        if name.startswith(ln + "."):
            j = int(name[len(ln) + 1:].split(".", 1)[0])
            return sum(counts[x] for x in lists[:li]) + j
    return None


def model_shape(spec: str, latent_size: int | None = None) -> ModelShape:
    """The ModelShape of a MODEL argument (built-in name, diffusers folder, artifact, .safetensors
    with config.json beside it) from configs and safetensors headers only; `latent_size`: the
    samples' latent side (default: the model's own default image size)."""
    import json

    from hprune.errors import ModelNotFoundError
    from hprune.models.registry import read_config, resolve

    kind, what = resolve(spec)
    mapped, quantised = True, False
    if kind == "builtin":
        # a real-size name stands for its checkpoint folder (bf16, memory-mapped)
        return config_shape(what.class_name, dict(what.config), store_bytes=4 if what.tiny else 2,
                            latent_size=latent_size or what.sample.get("latent_size", 32),
                            text_len=what.sample.get("text_len", 16),
                            mapped=not what.tiny, name=spec)
    else:
        if kind == "artifact":
            doc = json.loads((Path(what) / "hprune.json").read_text())
            cfg, cls = dict(doc["base_config"]), doc["class_name"]
            files = sorted(glob.glob(str(Path(what) / "*.safetensors")))
            quantised = any(st.get("op") == "quantize" for st in doc.get("recipe", []) if isinstance(st, dict))
        elif kind == "diffusers":
            cfg = read_config(Path(what) / "config.json")
            cls = cfg["_class_name"]
            files = sorted(glob.glob(str(Path(what) / "*.safetensors")))
        else:
            cfg_path = Path(what).parent / "config.json"
            if not cfg_path.is_file():
                raise ModelNotFoundError(f"{what}: no config.json beside it")
            cfg = read_config(cfg_path)
            cls = cfg["_class_name"]
            files = [str(what)]
        if not files:
            raise ModelNotFoundError(f"{spec}: no .safetensors weights")
        tensors = _header_tensors(files)
        floats = [_DTYPE_BYTES.get(d, 2) for k, (d, s) in tensors.items() if d.startswith(("F", "BF"))]
        b = max(set(floats), key=floats.count) if floats else 2
        txt = 333 if cls.startswith("SD3") else (512 if cfg.get("guidance_embeds") else 256)
        lat = latent_size or (int(cfg.get("sample_size") or 128) if cls.startswith("SD3") else 128)
    return _shape(spec, cls, cfg, tensors, b, lat, txt, quantised, mapped)


def config_shape(class_name: str, config: dict[str, Any], *, store_bytes: int = 4, latent_size: int = 32,
                 text_len: int = 16, mapped: bool = False, name: str = "") -> ModelShape:
    """The ModelShape of a transformer config (its tensors built on the meta device: no memory),
    stored in `store_bytes`-byte floats, for samples of latent_size² latents and text_len tokens."""
    from hprune.models.registry import build_from_config

    model = build_from_config(class_name, config, meta=True)
    dt = {4: "F32", 2: "BF16"}[store_bytes]
    tensors = {k: (dt if t.is_floating_point() else "I64", list(t.shape)) for k, t in model.state_dict().items()}
    return _shape(name or class_name, class_name, config, tensors, store_bytes, latent_size, text_len, False, mapped)


def _shape(spec: str, cls: str, cfg: dict[str, Any], tensors: dict[str, tuple[str, list[int]]], b: int, lat: int,
           txt: int, quantised: bool, mapped: bool) -> ModelShape:
    family = "sd3" if cls.startswith("SD3") else "flux"
    lists = ("transformer_blocks",) if family == "sd3" else ("transformer_blocks", "single_transformer_blocks")
    counts = {"transformer_blocks": int(cfg.get("num_layers", 0)),
              "single_transformer_blocks": int(cfg.get("num_single_layers", 0) if family == "flux" else 0)}
    n_blocks = sum(counts[x] for x in lists)
    hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    patch = int(cfg.get("patch_size") or 1)
    img = (lat // patch) ** 2 if family == "sd3" else (lat // 2) ** 2
    block_bytes, block_params = [0] * n_blocks, [0] * n_blocks
    lin_in: list[dict[str, int]] = [dict() for _ in range(n_blocks)]
    comps: list[set[str]] = [set() for _ in range(n_blocks)]
    cons: list[list[tuple[int, int]]] = [[] for _ in range(n_blocks)]
    lin_max = 0
    total_b = total_p = 0
    for k, (dt, shape) in tensors.items():
        n = 1
        for d in shape:
            n *= int(d)
        nb = n * _DTYPE_BYTES.get(dt, 2)
        total_b += nb
        total_p += n
        i = _block_key(k, lists, counts)
        if i is None or i >= n_blocks:
            continue
        block_bytes[i] += nb
        block_params[i] += n
        comps[i] |= {c for mark, c in _COMPONENT_MARKS if mark in k}
        if k.endswith(".weight") and len(shape) == 2 and ".norm" not in k:
            lin_max = max(lin_max, n)
            if k.endswith(_CONSUMERS) or (k.endswith(".proj_out.weight") and "single_" in k):
                cons[i].append((int(shape[0]), int(shape[1])))
            # q/k/v (and add_*) read one input: one Hessian per distinct (module parent, in) pair
            parent = k.rsplit(".", 2)[0]
            key = parent if k.rsplit(".", 2)[1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                    "add_v_proj") else k
            lin_in[i][key] = int(shape[1])
    c_in, joint, pooled = int(cfg.get("in_channels") or 16), int(cfg.get("joint_attention_dim") or 0), \
        int(cfg.get("pooled_projection_dim") or 0)
    # SD3: latents (C, lat, lat); FLUX: packed 2x2 latent tokens of in_channels values; + text + pooled
    sample = (c_in * lat * lat if family == "sd3" else img * c_in) + txt * joint + pooled
    return ModelShape(spec, family, n_blocks, hidden, total_p, total_b, block_bytes, block_params,
                      [list(d.values()) for d in lin_in], b, img, txt, quantised, mapped, sample,
                      2 if family == "sd3" else 1, [len(c) for c in comps], lin_max, cons)


# ---- stages ------------------------------------------------------------------------------------------

@dataclass
class Options:
    """What the run would use (the CLI flags of the plan)."""

    device: str = "cpu"  # "cpu" | "cuda"
    devices: int = 1  # FSDP2 ranks (torchrun)
    threads: int = 1  # CPU threads (time estimates on a CPU)
    offload: bool = False
    batch_size: int = 4  # distillation batch (per step, all ranks)
    calib_samples: int = 64  # calibration transformer calls (prompts x steps) for GPTQ / probe
    probe_samples: int = 32
    steps: int = 200
    ratio: float = 0.3
    optimizer: str = "adamw"  # "adamw" | "adamw8bit"
    grad_checkpointing: bool = False
    groups_auto: bool = True
    pattern: str = "unstructured"  # OBS-Diff: "unstructured" / "N:M" | "structured"
    groups: int = 1  # OBS-Diff's --groups (resident: Hessians of one group at a time)
    probe_batch: int = 4  # probe's --batch-size
    eval_samples: int = 8  # the fidelity check's calibration samples


@dataclass
class StagePlan:
    stage: str
    device_bytes: int
    host_bytes: int
    seconds: float
    note: str = ""
    fits: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _flops_block(m: ModelShape, i: int) -> float:
    return 2.0 * m.block_params[i] * m.tokens + 4.0 * m.tokens ** 2 * m.hidden


def _rate(o: Options) -> float:
    return THROUGHPUT["cuda"] if o.device == "cuda" else THROUGHPUT["cpu"] * max(1, o.threads)


def _compute_bytes(m: ModelShape, o: Options) -> int:
    return 4 if o.device == "cpu" else m.store_bytes  # CPUs compute 16-bit storage in fp32


def _act_infer(m: ModelShape, o: Options, batch: int = 1) -> int:
    return int(ACT_INFER * m.tokens * m.hidden * _compute_bytes(m, o) * batch)


def _resident_weights(m: ModelShape, o: Options) -> tuple[int, int]:
    """(device, host) anonymous bytes of the weights during an inference stage. Memory-mapped
    weights are file pages (0 here); a CPU that computes 16-bit storage in fp32 holds fp32 copies
    of the non-block modules and of one block (weights already in the compute dtype are used in
    place: `offload.placed` copies nothing)."""
    c = _compute_bytes(m, o)
    big = max(m.block_bytes, default=0)
    upcast = (m.other_bytes + big) * c // m.store_bytes
    base = 0 if m.mapped else m.weight_bytes
    if o.device == "cpu":
        extra = upcast if c != m.store_bytes else 0
        return base + extra, base + extra
    return (upcast if o.offload else m.weight_bytes), base


def _split(o: Options, wdev: int, whost: int, on_dev: int, on_host: int) -> tuple[int, int]:
    """(device, host) of a stage whose weights take (wdev, whost) and which adds `on_dev` bytes on
    the compute device and `on_host` on the host (the calibration set, outputs moved off the
    device); on a CPU the device is the host: all of it, on both."""
    if o.device == "cpu":
        return (wdev + on_dev + on_host,) * 2
    return wdev + on_dev, whost + on_host


def _calib_set_bytes(m: ModelShape, o: Options) -> int:
    """Bytes of a calibration set of o.calib_samples transformer calls (cfg_rows samples each)."""
    return o.calib_samples * m.cfg_rows * m.calib_sample_bytes


def _obs_blockwise(m: ModelShape, o: Options, hess: int, cal: int, whost: int, during: int, solve: int,
                   secs: float, note: str) -> StagePlan:
    """OBS-Diff block by block (any pattern): one block's Hessians `hess`; every call's block input
    and output (both streams, compute dtype) stay on the device (BlockStream); the block in the
    compute dtype while it runs (on a CPU a block already in that dtype runs in place, no copy)."""
    c = _compute_bytes(m, o)
    states = 2 * o.calib_samples * m.cfg_rows * m.tokens * m.hidden * c
    block = max(m.block_bytes, default=0) * c // m.store_bytes
    if o.device == "cpu":
        up = block if c != m.store_bytes else 0
        dev = host = (0 if m.mapped else m.weight_bytes) + cal + states + hess + max(during + up, solve)
    else:
        dev, host = block + states + hess + max(during, solve), whost + cal
    return StagePlan("obs", dev, host, secs, note)


def _obs_plan(m: ModelShape, o: Options, fwd: float, rate: float) -> StagePlan:
    """OBS-Diff (hprune.obs.sequential.obs_prune_model) with the calibration set in memory."""
    wdev, whost = _resident_weights(m, o)
    cal = _calib_set_bytes(m, o)
    act = _act_infer(m, o, m.cfg_rows)  # the denoising loop re-run: one call of cfg_rows rows at a time
    # Hessians fill during the forward: its activations + a hook's float32 copy of one Linear's
    # input (hprune.obs.hessian.HessianCollector.add); the solver runs after it
    ins = [k for b in m.linear_in for k in b]
    during = act + 4 * m.tokens * m.cfg_rows * max(ins, default=0)
    if o.pattern == "structured":
        # float32 Hessians of every consumer of heads / neurons (÷ groups), then per consumer
        # ColumnOBS's float64 W, H, its Cholesky factor, H⁻¹ and the greedy removal's work
        # (hprune.obs.structured)
        hess = sum(4 * i * i for b in m.consumers for _, i in b) // max(1, o.groups)
        solve = max((8 * (3 * i * i + out * i) for b in m.consumers for out, i in b), default=0)
        flops = sum(4.0 * i ** 3 for b in m.consumers for _, i in b)
        if o.offload:  # hprune.obs.sequential._structured_blockwise: one block's consumer Hessians
            hess = max((sum(4 * i * i for _, i in b) for b in m.consumers), default=0)
            return _obs_blockwise(m, o, hess, cal, whost, during, solve, (o.calib_samples * m.cfg_rows * fwd + flops) / rate,
                                  f"structured, block by block: one pass of {o.calib_samples} calls, the "
                                  f"consumers' Hessians of one block ({hess / 1e9:.2f} GB)")
        k = max(1, o.groups)
        return StagePlan("obs", *_split(o, wdev, whost, hess + max(during, solve), cal), (k * o.calib_samples * m.cfg_rows * fwd + flops) / rate,
                         f"structured: {k} calibration pass(es) of {o.calib_samples} calls, Hessians of the "
                         f"heads' / neurons' consumers {hess / 1e9:.2f} GB per group")
    # the solver of one Linear: a float32 copy of W, the damped H, its Cholesky factor and inverse
    solve = 4 * (2 * m.linear_max + 3 * max(ins, default=0) ** 2)
    flops = sum(2.0 * k ** 3 for k in ins)
    if o.offload:  # hprune.obs.blockwise: one block's Hessians
        hess = max((sum(4 * k * k for k in b) for b in m.linear_in), default=0)
        return _obs_blockwise(m, o, hess, cal, whost, during, solve, (o.calib_samples * m.cfg_rows * fwd + flops) / rate,
                              f"block by block: one pass of {o.calib_samples} calls, Hessians of one block "
                              f"({hess / 1e9:.2f} GB)")
    hess = sum(4 * k * k for k in ins) // max(1, o.groups)
    return StagePlan("obs", *_split(o, wdev, whost, hess + max(during, solve), cal),
                     (max(1, o.groups) * o.calib_samples * m.cfg_rows * fwd + flops) / rate,
                     f"{max(1, o.groups)} calibration pass(es) of {o.calib_samples} calls, Hessians "
                     f"{hess / 1e9:.2f} GB per group")


def _packed(weights: int, store_bytes: int = 2) -> int:
    """Bytes of `weights` quantised: 4 bits each + a scale and a zero per 64, 16-bit for 16-bit
    weights, else fp32 (formats.quantize's default scale dtype)."""
    return int(weights * (0.5 + 2 * (2 if store_bytes == 2 else 4) / 64))


def _quantize_offload(m: ModelShape, o: Options) -> bool:
    """Whether `hprune quantize` runs block by block: --offload, or automatic on a CPU for 16-bit
    weights (commands.load_for_offload); then each block's output is spilled (models.offload.Spill)."""
    return o.offload or (o.device == "cpu" and m.store_bytes == 2)


def _rtn_temporaries(m: ModelShape, o: Options) -> int:
    """formats.quantize's working memory for the largest Linear: its uint8 codes and fp32 scales /
    zeros (1 + 8/64 bytes per weight) and the scale search's buffers (candidates x rows chunk)."""
    largest = 6 * m.hidden * m.hidden if m.num_blocks else 0  # the AdaLN Linear (D -> 6·D), the largest
    chunk = RTN_CHUNK["cuda" if o.device == "cuda" else "cpu"]
    return int(largest * (1 + 8 / 64)) + RTN_SEARCH_BUFFERS * 4 * min(chunk, max(largest, 1))


def _plan_gptq(m: ModelShape, o: Options, fwd: float, rate: float) -> StagePlan:
    """quantize-gptq, the largest of three phases (fitted on CPU measurements, see the module
    docstring): RTN of the Linears outside the GPTQ units; collecting the Hessians (the block in
    the compute dtype when block by block, the Hessians, one x^T x temporary of the widest input,
    the activations); solving (the Hessians, gptq_quantize's copies of H, its inverse and a work
    matrix, 3 · 4·k², and the D x k weight in fp32, the packed output: one block's when spilled).
    Block by block also the inputs and outputs of every calibration call between two blocks."""
    calls = o.calib_samples
    off = _quantize_offload(m, o)
    c = _compute_bytes(m, o)
    hess = [sum(4 * k * k for k in ins) for ins in m.linear_in]
    kmax = max((k for ins in m.linear_in for k in ins), default=0)
    solve = 3 * 4 * kmax * kmax + 4 * kmax * m.hidden
    state = 2 * m.tokens * m.hidden * c * calls  # both streams, every call
    base = 0 if m.mapped else m.weight_bytes
    if off:
        passes, h = 1, max(hess, default=0)
        held = _packed(max(m.block_params, default=0), m.store_bytes)
        keep_dev = o.device == "cpu" or 2 * state < 0.25 * 80e9
        blk = max(m.block_bytes, default=0) * c // m.store_bytes
        moved = 2 * state if keep_dev else 0
    else:
        total = sum(hess)
        passes = max(1, -(-total // HESSIAN_BUDGET)) if o.groups_auto else 1
        h = min(total, HESSIAN_BUDGET) if passes > 1 else total
        held = _packed(sum(m.block_params), m.store_bytes)
        blk, moved = 0, 0
    on_dev = held if o.device == "cpu" else 0  # the packed layers live where the weights do
    phases = [_rtn_temporaries(m, o) + on_dev,
              blk + h + 4 * kmax * kmax + _act_infer(m, o) + moved,
              h + solve + moved + on_dev]
    if o.device == "cpu":  # the host is the device
        dev = host = base + max(phases) + GPTQ_FIXED
    else:
        dev = (0 if off else m.weight_bytes) + max(phases) + GPTQ_FIXED
        host = base + held + (2 * state if off and not keep_dev else 0)
    solve_flops = sum(2.0 * k * k * k for ins in m.linear_in for k in ins)  # ~ Cholesky + sweep
    secs = passes * calls * fwd / rate + solve_flops / rate
    note = f"{passes} calibration pass(es) of {calls} calls, Hessians of " + \
           ("one block" if off else f"{passes} group(s)") + ("; each block's output spilled" if off else "")
    return StagePlan("quantize-gptq", int(dev), int(host), secs, note)


def plan_stage(stage: str, m: ModelShape, o: Options) -> StagePlan:
    """Predicted peak device / host bytes and seconds of one stage (see the module docstring)."""
    fwd = sum(_flops_block(m, i) for i in range(m.num_blocks))
    rate = _rate(o)
    wdev, whost = _resident_weights(m, o)
    linear_w = sum(m.block_params)  # ~ the Linear weights (norms are tiny)
    packed = int(linear_w * 0.5625)  # 4 bits + a 16-bit scale and zero per 64 weights
    if stage == "load":
        # loading maps the files; compute-dtype copies are made by the stages that run a forward
        # (their rows count them), so a verb that never computes (prune) is not charged for them
        base = 0 if m.mapped else m.weight_bytes
        dev = base if o.device == "cpu" else (0 if o.offload else m.weight_bytes)
        return StagePlan(stage, dev, base, m.weight_bytes / 2e9, "read (mapped) at ~2 GB/s")
    if stage == "quantize-rtn":
        # RTN runs in the storage dtype (no fp32 copies); block by block, the output is spilled
        off = _quantize_offload(m, o)
        packed = _packed(linear_w, m.store_bytes)
        held = _packed(max(m.block_params, default=0), m.store_bytes) if off else packed  # on the host at the peak
        tmp = _rtn_temporaries(m, o)
        base = 0 if m.mapped else m.weight_bytes
        if o.device == "cpu":
            dev = host = base + held + tmp
        else:
            dev = (0 if off else m.weight_bytes) + (int(m.other_bytes + max(m.block_bytes, default=0)) if off else 0) \
                + tmp + (0 if off else packed)
            host = base + (held if off else 0)
        secs = linear_w / (GPU_RTN_RATE if o.device == "cuda" else RTN_RATE * max(1, o.threads))
        return StagePlan(stage, dev, host, secs, f"{linear_w / 1e9:.2f} B weights rounded"
                         + ("; each block's output spilled to a file beside --out" if off else ""))
    if stage == "save-quantized":
        # streamed tensor by tensor (io.write_safetensors); block by block the packed layers are
        # read from the spill file's maps (file pages); the manifest's hash reads 4 MiB at a time
        off = _quantize_offload(m, o)
        base = 0 if m.mapped else m.other_bytes
        return StagePlan(stage, 0, base + (0 if off else packed) + SAVE_BUFFERS, packed / 0.5e9,
                         "written tensor by tensor" + (" from the spill file" if off else ""))
    if stage == "quantize-gptq":
        return _plan_gptq(m, o, fwd, rate)
    if stage == "calib":
        # hprune.calib.capture: calls of cfg_rows rows; every call's inputs are recorded (stored
        # dtype), then concatenated: the set twice at the end
        cal = _calib_set_bytes(m, o)
        # (the records go to the host as they are made)
        return StagePlan(stage, *_split(o, wdev, whost, _act_infer(m, o, m.cfg_rows), 2 * cal), o.calib_samples * m.cfg_rows * fwd / rate,
                         f"{o.calib_samples} transformer calls of {m.cfg_rows} row(s); set {cal / 1e6:.0f} MB")
    if stage == "fidelity":
        # hprune.commands.FidelityCheck: eval_samples batches of one, the reference outputs kept;
        # the calibration set is in memory
        n = min(o.eval_samples, o.calib_samples * m.cfg_rows)
        cal = _calib_set_bytes(m, o)
        # (the inputs on the device, the outputs on the host)
        on_dev = _act_infer(m, o) + n * m.calib_sample_bytes
        return StagePlan(stage, *_split(o, wdev, whost, on_dev, cal + 2 * n * m.calib_sample_bytes), 2 * n * fwd / rate,
                         f"{n} samples, before and after")
    if stage == "probe":
        # hprune.probe: per batch of probe_batch samples, every block's input state is kept for the
        # tails (L + 1 states, both streams), plus one block's activations and the float64 pair
        # of states of the similarity; the calibration set is in memory
        bsz = o.probe_batch
        comps = m.components or [4] * m.num_blocks
        probes = [(i, 1 + comps[i]) for i in range(m.num_blocks)]
        passes = m.num_blocks + sum((m.num_blocks - i) * k for i, k in probes)  # probe.probe_block_passes
        unit = m.tokens * m.hidden * bsz
        cal = _calib_set_bytes(m, o)
        on_dev = _act_infer(m, o, bsz) + (m.num_blocks + 1) * unit * _compute_bytes(m, o) + 2 * 8 * unit
        secs = o.probe_samples * passes / max(1, m.num_blocks) * fwd / rate
        return StagePlan(stage, *_split(o, wdev, whost, on_dev, cal), secs,
                         f"{passes} block passes per sample ({sum(k for _, k in probes)} pieces x "
                         f"{o.probe_samples} samples)")
    if stage == "obs":
        return _obs_plan(m, o, fwd, rate)
    if stage == "prune":
        # surgery on the host (hprune.models.surgery.apply_plan): removed blocks / components are
        # dropped, nothing kept is copied; the weights as loaded
        base = 0 if m.mapped else m.weight_bytes
        return StagePlan(stage, 0 if o.device == "cuda" else base, base, 0.0, "surgery on the host")
    if stage == "distill":
        t = training_step_bytes(m, o)
        dev = distill_step_peak(m, o, t)
        p_s = int(m.params * (1 - o.ratio))
        secs = o.steps * (4 * (1 - o.ratio) + 1) * fwd * max(1, o.batch_size // max(1, o.devices)) / rate
        if o.offload and o.device == "cuda":
            secs += o.steps * m.weight_bytes / H2D_RATE  # every step moves every teacher block once
        note = (f"student {p_s / 1e9:.2f} B params: weights {t['student'] / 1e9:.2f} + grads {t['grads'] / 1e9:.2f} + "
                f"{o.optimizer} states {t['states'] / 1e9:.2f} GB/device; activations {t['activations'] / 1e9:.2f} GB"
                f"{' (checkpointed)' if o.grad_checkpointing else ''}; teacher "
                + (f"streamed block by block, {t['teacher'] / 1e9:.2f} GB on the device at a time" if o.offload
                   else f"{t['teacher'] / 1e9:.2f} GB"))
        return StagePlan(stage, dev, dev if o.device == "cpu" else int(m.other_bytes), secs, note)
    if stage == "save":
        return StagePlan(stage, 0, packed + max(m.block_bytes, default=0), packed / 0.5e9,
                         "written tensor by tensor (io.write_safetensors)")
    raise ValueError(stage)


def training_step_bytes(m: ModelShape, o: Options) -> dict[str, int]:
    """Bytes per device of one distillation step, by kind: teacher weights (replicated), student
    weights / grads / optimizer states (÷ devices under FSDP2), the activations autograd keeps and
    the teacher's no-grad forward (whichever is larger). The student trains in fp32 on a CPU, in its storage dtype on a
    GPU (bf16 autocast); 8-bit AdamW keeps 2 bytes per value + an fp32 absmax per 256."""
    c = _compute_bytes(m, o)
    n = max(1, o.devices)
    p_s = int(m.params * (1 - o.ratio))
    wb = m.store_bytes if o.device == "cuda" else 4
    states = 2 * p_s + 2 * 4 * p_s // 256 if o.optimizer == "adamw8bit" else 2 * p_s * wb
    per = max(1, o.batch_size // n)
    blocks = max(1, round(m.num_blocks * (1 - o.ratio)))
    unit = per * m.tokens * m.hidden * c
    act = unit * (2 * blocks + ACT_TRAIN) if o.grad_checkpointing else unit * ACT_TRAIN * blocks
    # the teacher's no-grad forward runs (and frees its activations) before the student's
    act = max(int(act), _act_infer(m, o, per))
    if o.offload:  # streamed: the non-block modules + one block at a time (see the module docstring)
        stream = m.other_bytes + max(m.block_bytes, default=0)
        if o.device == "cuda":
            teacher = stream
        else:  # the host is the device: mapped weights are file pages, 16-bit ones are upcast per block
            teacher = (0 if m.mapped else m.weight_bytes) + (stream * c // m.store_bytes if c != m.store_bytes else 0)
    else:
        teacher = m.weight_bytes if o.device == "cuda" else m.params * c
    return {"teacher": teacher, "student": p_s * wb // n,
            "grads": p_s * wb // n, "states": states // n, "activations": act}


def distill_step_peak(m: ModelShape, o: Options, t: dict[str, int] | None = None) -> int:
    """Peak device bytes of a distillation step from training_step_bytes' kinds: their sum, or
    with the teacher streamed (offload) student + states + max(teacher stream + its forward's
    activations, grads + training activations): the streamed blocks are freed before the
    student's forward and backward."""
    t = t or training_step_bytes(m, o)
    if not o.offload:
        return sum(t.values())
    infer = _act_infer(m, o, max(1, o.batch_size // max(1, o.devices)))
    return t["student"] + t["states"] + max(t["teacher"] + infer, t["grads"] + t["activations"])


VERB_STAGES = {
    "quantize": ["load", "quantize-rtn", "save-quantized"],
    "quantize-gptq": ["load", "calib", "quantize-gptq", "save-quantized"],
    "compress": ["load", "calib", "probe", "distill", "quantize-gptq", "save"],
    "calib": ["load", "calib"],
    "probe": ["load", "probe"],
    "obs": ["load", "obs", "save"],
    "prune": ["load", "prune", "save"],
    "distill": ["load", "distill", "save"],
    "eval": ["load", "fidelity"],
    "generate": ["load", "fidelity"],
}


def plan(m: ModelShape, stages: list[str], o: Options, device_memory: int | None) -> list[StagePlan]:
    """Every stage's plan with `fits` set (None when no device memory is known), and, for a stage
    that does not fit, the cheapest options found that make it fit (`options`)."""
    import dataclasses

    out = []
    for s in stages:
        p = plan_stage(s, m, o)
        if device_memory:
            p.fits = p.device_bytes <= device_memory
            if not p.fits:
                for trial in _remedies(s, o):
                    q = plan_stage(s, m, dataclasses.replace(o, **trial))
                    if q.device_bytes <= device_memory:
                        p.options = trial
                        break
        out.append(p)
    return out


def _remedies(stage: str, o: Options) -> list[dict[str, Any]]:
    """Options to try, cheapest first."""
    if stage == "distill":
        base: list[dict[str, Any]] = [{"grad_checkpointing": True}, {"offload": True}, {"optimizer": "adamw8bit"},
                                      {"grad_checkpointing": True, "offload": True},
                                      {"grad_checkpointing": True, "optimizer": "adamw8bit"},
                                      {"offload": True, "optimizer": "adamw8bit"},
                                      {"grad_checkpointing": True, "offload": True, "optimizer": "adamw8bit"}]
        out = list(base)
        for n in (2, 4, 8, 16, 32, 64):
            if n > o.devices:
                out += [{"devices": n, **b} for b in [{}] + base]
        out += [{"batch_size": 1, "grad_checkpointing": True, "offload": True, "optimizer": "adamw8bit", "devices": n}
                for n in (1, 2, 4, 8, 16, 32, 64)]
        return out
    return [{"offload": True}, {"offload": True, "calib_samples": max(1, o.calib_samples // 4)}]


def device_memory_found(device: str) -> tuple[int, str]:
    """(bytes, description) of the memory of one device here: a GPU's total, or the host's
    available memory (MemAvailable) for the CPU."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return int(p.total_memory), f"{p.name}, {torch.cuda.device_count()} found"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "host memory available"
    except OSError:
        pass
    return 0, "unknown"


def parse_size(text: str) -> int:
    """'24GB', '24GiB', '512MB', '80G' -> bytes; HpruneError otherwise."""
    from hprune.errors import HpruneError

    import re

    mt = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not mt:
        raise HpruneError(f"--device-memory {text!r}: give a size like 24GB, 80GiB or 512MB")
    value, unit, binary = float(mt.group(1)), mt.group(2).upper(), mt.group(3)
    mult = (1024 if binary else 1000) ** " KMGT".index(unit or " ")
    if value <= 0:
        raise HpruneError(f"--device-memory {text!r}: must be positive")
    return int(value * mult)


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
