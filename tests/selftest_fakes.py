"""Fake backends for tests/test_selftest_isolation.py, registered at import so that the self-test's
child process (which imports the module of each backend it checks) knows them too: one right,
one that kills its process (os.abort, as a dead CUDA context or a segfault would), one that
segfaults through ctypes, one that hangs, one that exits without answering."""
from __future__ import annotations

import ctypes
import os
import time

import torch

from hprune.kernels import dispatch

OP_CRASH = "fake_isolated_crash_op"
OP_SEGV = "fake_isolated_segv_op"
OP_HANG = "fake_isolated_hang_op"
OP_EXIT = "fake_isolated_exit_op"
OPS = (OP_CRASH, OP_SEGV, OP_HANG, OP_EXIT)


def make(device, dtype, gen, specs=((5,),)):
    return [(torch.randn(n, generator=gen).to(device=device, dtype=dtype),) for (n,) in specs]


def right(x):
    return x * 2


def aborts(x):
    os.abort()


def segfaults(x):
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def hangs(x):
    time.sleep(3600)


def exits(x):
    os._exit(3)


for op, bad in ((OP_CRASH, aborts), (OP_SEGV, segfaults), (OP_HANG, hangs), (OP_EXIT, exits)):
    dispatch.register(op, "reference")(right)
    dispatch.register(op, "cuda")(bad)  # preferred first: its failure must hand over to the next
    dispatch.register(op, "cpp")(right)
    dispatch.register_selftest(op, dispatch.SelfTest(make=make, outputs=lambda _a, out: [out],
                                                     tolerance=lambda _d: 1e-6, dtypes=(torch.float32,),
                                                     specs=((5,),)))
