"""Subcommands of the `hprune` CLI (one module each; heavy imports stay inside run())."""
from __future__ import annotations

import argparse
import sys


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """--device / --dtype for commands that run a model."""
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: as stored; the tiny models are float32)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each stage's predicted peak device / host memory and time, whether it fits the "
                        "device(s) found (or --device-memory) and what would make it fit; reads no weights")
    p.add_argument("--device-memory", metavar="SIZE", help="--dry-run: plan for devices of this size (e.g. 24GB)")


def device_and_dtype(args: argparse.Namespace):
    """(torch.device, torch.dtype or None) from --device / --dtype; HpruneError for a device that
    does not parse or is not here."""
    import torch

    from hprune.dist import local_device
    from hprune.errors import HpruneError

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise HpruneError(f"--device: unknown device {args.device!r} (use cuda, cuda:N or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HpruneError("--device cuda: no CUDA GPU is available here (this torch sees none); run on the CPU "
                          "with --device cpu, or leave --device out")
    if device.type not in ("cpu", "cuda"):
        raise HpruneError(f"--device {args.device}: hprune runs on cpu or cuda")
    device = local_device(device)  # under torchrun: this rank's GPU
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise HpruneError(f"--device {device}: this machine has {n} CUDA GPU(s); use cuda:0" + (f" to cuda:{n - 1}" if n > 1 else ""))
    return device, (getattr(torch, args.dtype) if args.dtype else None)


def check_size(pipe, size: int | None, *, only_max: bool = False, vae_scale: int | None = None) -> None:
    """HpruneError unless `size` pixels (height = width) fit the pipeline: a multiple of the VAE's
    downscale times the transformer's patch (FLUX packs 2x2 latents), and within what its position
    embedding covers (SD3: pos_embed_max_size patches; FLUX: 4x its default size). `vae_scale`:
    the pixels per latent pixel that `size` assumes, when not the pipeline's own VAE (calibration
    of a real transformer through the stand-in pipeline reads sizes at the real VAE's scale)."""
    from hprune.errors import HpruneError

    if size is None:
        return
    t = pipe.transformer
    vae_scale = int(vae_scale or getattr(pipe, "vae_scale_factor", 8))
    patch = int(getattr(t.config, "patch_size", 1) or 1)
    flux = type(pipe).__name__.startswith("Flux")
    step = vae_scale * (2 if flux else patch)
    pos_max = getattr(t.config, "pos_embed_max_size", None)
    if pos_max:
        most = int(pos_max) * patch * vae_scale
    else:
        most = 4 * int(getattr(pipe, "default_sample_size", 128)) * vae_scale
    most -= most % step
    least = step * -(-8 // step)  # at least 8 pixels
    if only_max and size <= most:  # the caller checks the multiple (hprune.calib.check_image_size)
        return
    if size % step or not least <= size <= most:
        raise HpruneError(f"--size {size}: this model makes images of {least} to {most} pixels, in steps of {step}")


def load_weighted_model(name: str, device=None, dtype=None, *, config=None, random_ok: bool = False,
                        hint: str = "give a local checkpoint (diffusers folder or .safetensors)"):
    """hprune.loading.load_model for a command that needs weights. A real-size built-in name is an
    architecture without trained weights here: refused before loading, unless `random_ok` (latency /
    memory work on a GPU, where it gets random weights); whatever comes back with parameters on the
    meta device is refused too. HpruneError names the model and `hint`."""
    import torch

    from hprune.errors import HpruneError
    from hprune.loading import load_model
    from hprune.models.registry import BUILTINS

    if not random_ok and name in BUILTINS and not BUILTINS[name].tiny:
        raise HpruneError(f"{name} is an architecture without trained weights here; {hint}")
    model = load_model(name, device=device if device is not None else "cpu", dtype=dtype, config=config)
    if any(p.device.type == "meta" for p in model.parameters()):
        where = "" if torch.cuda.is_available() else " on the CPU"
        raise HpruneError(f"{name} has no weights here (a real-size architecture{where}); {hint}")
    return model


def load_for_offload(name: str, device, dtype, offload: bool, **kw):
    """(model, offload): the model of `load_weighted_model`, and whether the command runs it block
    by block (hprune.models.offload). With --offload, or when its weights would not fit the GPU
    (then said on stderr), the model stays on the host (memory-mapped), else it goes to `device`.
    16-bit weights on a CPU run block by block too, computing in float32 (several times faster
    than bf16 on CPUs without native bf16; the stored weights are unchanged)."""
    import torch

    from hprune.models.offload import HALF, should_offload, storage_dtype
    from hprune.models.stats import weight_bytes

    host = torch.device("cpu")
    model = load_weighted_model(name, host if (offload or device.type == "cuda") else device, dtype, **kw)
    if not offload and device.type == "cuda":
        need = weight_bytes(model)
        if should_offload(need, device):
            free = torch.cuda.mem_get_info(device)[0]
            print(f"the model's {need / 1e9:.1f} GB of weights do not fit {device} ({free / 1e9:.1f} GB free with "
                  f"room for activations): running block by block (--offload)", file=sys.stderr)
            offload = True
        else:
            model = model.to(device)
    if not offload and device.type == "cpu" and storage_dtype(model) in HALF:
        offload = True  # fp32 compute, block by block (see the docstring)
    return model, offload


def offload_context(model, device, offload: bool):
    """hprune.models.offload.offloaded(model, device) when `offload`, else a no-op context."""
    import contextlib

    from hprune.models.offload import offloaded

    return offloaded(model, device) if offload else contextlib.nullcontext(model)


def read_prompts(path: str, what: str = "prompts") -> list[str]:
    """Non-empty lines of a text file, stripped; HpruneError for a missing file or one without any."""
    from pathlib import Path

    from hprune.errors import HpruneError

    p = Path(path)
    if not p.is_file():
        raise HpruneError(f"{what} file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HpruneError(f"{p}: not a UTF-8 text file ({what}, one per line; byte {exc.start} does not decode)") from None
    except OSError as exc:
        raise HpruneError(f"{p}: cannot read the {what} file ({exc.strerror or exc})") from None
    if "\x00" in text:
        raise HpruneError(f"{p}: a binary file, not {what} (one per line)")
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark (Windows editors) is not part of the first prompt
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise HpruneError(f"{p}: no {what} in the file")
    return lines


def calibration_for(name: str, model, path: str | None, *, what: str):
    """The calibration set a command runs on: `path` (CalibrationSet.save), else a built-in one for
    a built-in model (synthetic stand-in prompts, or the ShapesBench teacher's own captions);
    HpruneError otherwise, naming `what` needs it. Checked to fit `model`."""
    from pathlib import Path

    from hprune.calib import CalibrationSet, builtin_calibration
    from hprune.errors import HpruneError
    from hprune.models.registry import BUILTINS

    if path:
        if not Path(path).is_file():
            raise HpruneError(f"calibration set not found: {path}")
        calib = CalibrationSet.load(path)
    elif name in BUILTINS and BUILTINS[name].tiny:
        print(f"no --calib: using a built-in calibration set for {name} (4 prompts, 8 steps)", file=sys.stderr)
        calib = builtin_calibration(name, model, n_prompts=4, num_steps=8)
    else:
        raise HpruneError(f"--calib is required for {name} with {what} (capture one with `hprune calib` "
                          f"or hprune.calib.capture on a pipeline around this model)")
    calib.check_fits(model)
    return calib


class FidelityCheck:
    """The model's velocity on up to `n` calibration samples (spread over the set), taken at
    construction; `measure(model)` compares the model's velocity now with it."""

    def __init__(self, model, calib, n: int) -> None:
        import torch

        from hprune.metrics import predict

        self.batches, self.refs = [], []
        if calib is None or n <= 0:
            return
        idx = torch.linspace(0, len(calib) - 1, min(n, len(calib))).round().long().unique().tolist()
        p = next(model.parameters())
        self.batches = list(calib.batches(batch_size=1, device=p.device, dtype=p.dtype, indices=idx))
        self.refs = [predict(model, x).float().cpu() for x in self.batches]

    def measure(self, model) -> dict | None:
        """{"samples", "rel_mse", "cosine"} (0 = identical), or None when nothing was taken."""
        from hprune.metrics import cosine_distance, predict, rel_mse

        if not self.refs:
            return None
        preds = [predict(model, x).float().cpu() for x in self.batches]
        n = len(self.refs)
        return {"samples": n, "rel_mse": sum(rel_mse(a, b) for a, b in zip(preds, self.refs)) / n,
                "cosine": sum(cosine_distance(a, b) for a, b in zip(preds, self.refs)) / n}
