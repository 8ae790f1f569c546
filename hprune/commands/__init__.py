"""Subcommands of the `hprune` CLI (one module each; heavy imports stay inside run())."""
from __future__ import annotations

import argparse


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """--device / --dtype for commands that run a model."""
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: as stored; the tiny models are float32)")


def device_and_dtype(args: argparse.Namespace):
    """(torch.device, torch.dtype or None) from --device / --dtype; HpruneError for a device that
    does not parse or is not here."""
    import torch

    from hprune.errors import HpruneError

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise HpruneError(f"--device: unknown device {args.device!r} (use cuda, cuda:N or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HpruneError("--device cuda: no CUDA GPU is available here")
    if device.type not in ("cpu", "cuda"):
        raise HpruneError(f"--device {args.device}: hprune runs on cpu or cuda")
    return device, (getattr(torch, args.dtype) if args.dtype else None)


def load_weighted_model(name: str, device=None, dtype=None, *, config=None, random_ok: bool = False,
                        hint: str = "give a local checkpoint (diffusers folder or .safetensors)"):
    """hprune.models.load_model for a command that needs weights. A real-size built-in name is an
    architecture without trained weights here: refused before loading, unless `random_ok` (latency /
    memory work on a GPU, where it gets random weights); whatever comes back with parameters on the
    meta device is refused too. HpruneError names the model and `hint`."""
    import torch

    from hprune.errors import HpruneError
    from hprune.models import load_model
    from hprune.models.registry import BUILTINS

    if not random_ok and name in BUILTINS and not BUILTINS[name].tiny:
        raise HpruneError(f"{name} is an architecture without trained weights here; {hint}")
    model = load_model(name, device=device if device is not None else "cpu", dtype=dtype, config=config)
    if any(p.device.type == "meta" for p in model.parameters()):
        where = "" if torch.cuda.is_available() else " on the CPU"
        raise HpruneError(f"{name} has no weights here (a real-size architecture{where}); {hint}")
    return model


def read_prompts(path: str, what: str = "prompts") -> list[str]:
    """Non-empty lines of a text file, stripped; HpruneError for a missing file or one without any."""
    from pathlib import Path

    from hprune.errors import HpruneError

    p = Path(path)
    if not p.is_file():
        raise HpruneError(f"{what} file not found: {p}")
    lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not lines:
        raise HpruneError(f"{p}: no {what} in the file")
    return lines
