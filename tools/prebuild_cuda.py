"""Compile the CUDA sources that need only the CUDA runtime into objects the GPU machine links.

    python tools/prebuild_cuda.py [--jobs 2] [--group main --group cutlass]

Here (no GPU needed; nvcc 13, the device's release): csrc/cuda/*.cu for sm_80 and sm_90a and
csrc/cuda/cutlass/*.cu (the pinned nvidia-cutlass headers) for sm_90a, into .prebuilt/cuda/ with
a manifest (nvcc release, archs, source hashes): hprune/kernels/prebuilt.py. setup.py then links
them, and the GPU machine compiles only the torch bindings. Carry `.prebuilt` (git-ignored) with
the device run (`run(carry=[".whl", ".prebuilt"])`). Prints the compile time of each source.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


P = _load("hprune_prebuilt", "hprune/kernels/prebuilt.py")
H = _load("hprune_cutlass_headers", "hprune/kernels/cutlass_headers.py")


def _compile(cmd: list[str]) -> tuple[list[str], int, float, float, str]:
    """(cmd, exit code, wall seconds, CPU seconds of nvcc and everything it ran, output)."""
    t0 = time.perf_counter()
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=devnull, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of nvcc with cicc / ptxas / the host compiler
        proc.returncode = os.waitstatus_to_exitcode(status)
    return cmd, proc.returncode, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--group", action="append", choices=sorted(P.GROUPS), help="default: all")
    ap.add_argument("--nvcc", default="nvcc")
    args = ap.parse_args(argv)
    release = P.nvcc_release(args.nvcc)
    if release is None:
        print("no nvcc found", file=sys.stderr)
        return 2
    out_dir = os.path.join(ROOT, P.PREBUILT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    groups = args.group or sorted(P.GROUPS)
    jobs = []
    for group in groups:
        if group == "main":
            flags = P.MAIN_FLAGS + [P.gencode(a) for a in P.MAIN_ARCHS] + ["-I", os.path.join(ROOT, "csrc")]
        else:
            inc, why = H.cutlass_include()
            if inc is None:
                print(f"skipping the CUTLASS objects: {why}", file=sys.stderr)
                continue
            flags = list(H.NVCC_FLAGS) + ["-I", os.path.join(ROOT, "csrc", "cuda", "cutlass"), "-I", inc]
        for src in sorted(P.source_hashes(ROOT, group)):
            if src.endswith(".cu"):
                obj = os.path.join(out_dir, P.object_name(src))
                jobs.append((group, [args.nvcc, "-c", src, "-o", obj + ".tmp", "-Xcompiler", "-fPIC", *flags]))
    man = P.load_manifest(ROOT) or {"groups": {}}
    if man.get("nvcc") != release:
        man = {"groups": {}}
    man["nvcc"] = release
    failed = False
    t_all = time.perf_counter()
    with cf.ThreadPoolExecutor(max(1, args.jobs)) as ex:
        results = list(ex.map(lambda j: (j[0], *_compile(j[1])), jobs))
    times = {}
    for group, cmd, code, secs, cpu, log in results:
        src = cmd[2]
        obj = cmd[4][:-len(".tmp")]
        print(f"{src}: {'ok' if code == 0 else 'FAILED'} in {secs:.1f} s ({cpu:.1f} s CPU)", flush=True)
        if code != 0:
            print(log[-4000:], file=sys.stderr)
            failed = True
            continue
        os.replace(cmd[4], obj)
        times[src] = {"wall_s": round(secs, 1), "cpu_s": round(cpu, 1)}
    for group in groups:
        srcs = [j[1][2] for j in jobs if j[0] == group]
        if srcs and all(s in times for s in srcs):
            man["groups"][group] = {"archs": list(P.MAIN_ARCHS if group == "main" else P.CUTLASS_ARCHS),
                                    "sources": P.source_hashes(ROOT, group),
                                    "compile": {s: times[s] for s in srcs},
                                    "host": f"{os.cpu_count()} cores, jobs {args.jobs}"}
    with open(os.path.join(out_dir, P.MANIFEST + ".tmp"), "w") as f:
        json.dump(man, f, indent=1)
    os.replace(os.path.join(out_dir, P.MANIFEST + ".tmp"), os.path.join(out_dir, P.MANIFEST))
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"{len(times)} objects in {time.perf_counter() - t_all:.0f} s, {size / 2**20:.1f} MiB in {P.PREBUILT_DIR}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
