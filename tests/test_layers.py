"""The import structure: imports point down only (the layers contract in pyproject.toml, checked
by import-linter), and no two modules import each other, however indirectly (no cycle in the
module graph, function-level imports included)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

grimp = pytest.importorskip("grimp", reason="import-linter is a test dependency")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    g = grimp.build_graph("hprune", include_external_packages=False)
    graph = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    assert _cycles(graph) == [], "modules that import each other (directly or through others)"


def test_layers_contract():
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_import_hprune_registers_the_torch_ops_cheaply():
    """`import hprune` alone makes torch.ops.hprune.* callable (a fresh interpreter: nothing else
    imported first), without importing diffusers, triton or any stage of the pipeline."""
    code = ("import sys, torch, hprune\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'triton', 'transformers')\n"
            "               or m.startswith(('hprune.models', 'hprune.quant', 'hprune.distill', 'hprune.compress')))\n"
            "assert not heavy, heavy\n"
            "x = torch.randn(3, 64)\n"
            "from hprune.formats import quantize\n"
            "q = quantize(torch.randn(8, 64), 32, 'int4')\n"
            "y = torch.ops.hprune.w4a16_mm(x, q.qweight, q.scales, q.zeros, None, 32, 'int4', None)\n"
            "assert y.shape == (3, 8)\n"
            "assert torch.ops.hprune.w4a8_mm.default and torch.ops.hprune.scaled_adamw_.default\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONSTARTUP"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bitsandbytes_kernels_community_notice_is_dropped():
    """bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning (on
    AVX-512 BF16 CPUs without the optional `kernels` package) is not printed once hprune is
    imported; its other messages are left alone."""
    code = ("import logging, hprune, bitsandbytes\n"
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another notice')\n")
    env = {k: v for k, v in __import__("os").environ.items()}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kernels-community" not in proc.stderr and "another notice" in proc.stderr
