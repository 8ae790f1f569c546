"""`calib --size` on a transformer without its pipeline: the size is read at the SD3/FLUX VAE scale
(8 pixels per latent pixel), not at the stand-in VAE's (2), so the tokens are those of that size."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from hprune.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import fresh  # noqa: E402


def _calib(capsys, *argv):
    code = main(["calib", *argv, "--num-prompts", "1", "--steps", "1"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("name, latent_shape", [("tiny-sd3", (32, 32)), ("tiny-flux", (256,))])
def test_size_256_on_a_transformer_folder_calibrates_256_px(tmp_path, capsys, name, latent_shape):
    fresh(name).save_pretrained(tmp_path / "m")  # a transformer folder: config.json + weights, no VAE
    out = tmp_path / "c.safetensors"
    code, text, err = _calib(capsys, str(tmp_path / "m"), "--size", "256", "--out", str(out))
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        shape = f.get_slice("in.hidden_states").get_shape()
    # 256 px / 8 = 32 latent pixels a side; SD3 patches of 2, FLUX packs 2x2: 16 x 16 = 256 tokens
    assert tuple(shape[-2:] if name == "tiny-sd3" else shape[1:2]) == latent_shape
    assert meta["vae_scale"] == 8 and meta["image_size"] == 256 and meta["latent_size"] == 32
    assert meta["tokens"] == 256
    assert "256x256 px = 32x32 latents at VAE scale 8 (assumed: the SD3/FLUX VAE" in text
    assert "256 image tokens per sample" in text


def test_a_size_the_vae_and_patches_cannot_make_is_refused(tmp_path, capsys):
    fresh("tiny-sd3").save_pretrained(tmp_path / "m")
    code, _, err = _calib(capsys, str(tmp_path / "m"), "--size", "200", "--out", str(tmp_path / "c.safetensors"))
    assert code != 0 and "image size 200 px: it must be a positive multiple of 16" in err
    assert "VAE scale 8" in err and not (tmp_path / "c.safetensors").exists()


def test_a_tiny_builtin_keeps_its_own_vae(tmp_path, capsys):
    """The built-in tiny models are generated with the tiny VAE (scale 2): their sizes stay at it."""
    out = tmp_path / "c.safetensors"
    code, text, err = _calib(capsys, "tiny-sd3", "--size", "32", "--out", str(out))
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        assert f.get_slice("in.hidden_states").get_shape()[-1] == 16
    assert meta["vae_scale"] == 2 and meta["image_size"] == 32 and meta["tokens"] == 64
    assert "VAE scale 2 (the built-in's tiny VAE)" in text
