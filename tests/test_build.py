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
