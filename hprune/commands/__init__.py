"""Subcommands of the `hprune` CLI (one module each; heavy imports stay inside run())."""
from __future__ import annotations

import argparse


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """--device / --dtype for commands that run a model."""
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: as stored; the tiny models are float32)")


def device_and_dtype(args: argparse.Namespace):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device), (getattr(torch, args.dtype) if args.dtype else None)
