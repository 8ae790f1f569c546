"""The compiled extension is optional: the package imports and works with it disabled."""
import os
import subprocess
import sys

from hprune._ext import build_info


def test_build_info_is_consistent():
    info = build_info()
    assert set(info) >= {"available", "cuda"}
    if info["available"]:
        import torch

        assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
        assert info["cuda"] in (True, False)


def test_pure_python_mode_runs_a_model():
    code = ("import torch\n"
            "from hprune._ext import build_info\n"
            "from hprune.loading import load_model\nfrom hprune.models import sample_inputs\n"
            "assert build_info()['available'] is False\n"
            "m = load_model('tiny-flux'); y = m(**sample_inputs(m)).sample\n"
            "assert torch.isfinite(y).all()\n"
            "print('ok')\n")
    env = {**os.environ, "HPRUNE_NO_EXT": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_build_without_torch_says_so_instead_of_a_quiet_pure_python_wheel():
    """setup.py with torch missing stops with instructions (pip shows a build's output only when it
    fails); HPRUNE_NO_EXT=1 asks for the pure-Python package explicitly."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']\n"
            "import runpy; runpy.run_path('setup.py', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "HPRUNE_NO_EXT"}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "torch is not importable at build time" in r.stderr
    assert "--no-build-isolation" in r.stderr and "HPRUNE_NO_EXT=1" in r.stderr
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "HPRUNE_NO_EXT": "1"},
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "hprune", r.stderr[-2000:]


def test_info_says_whether_the_extension_is_built():
    for env, want in (({}, "hprune._C: built, CPU C++" if build_info()["available"] else "NOT built"),
                      ({"HPRUNE_NO_EXT": "1"}, "hprune._C: NOT built")):
        r = subprocess.run([sys.executable, "-m", "hprune", "info", "tiny-flux"], capture_output=True, text=True,
                           env={**os.environ, **env})
        assert r.returncode == 0 and want in r.stdout.splitlines()[-1], r.stdout[-500:] + r.stderr[-1000:]
