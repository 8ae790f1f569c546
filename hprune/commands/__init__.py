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
