"""`hprune generate`: prompts -> PNGs and a contact sheet, for a built-in tiny model, an artifact
alone, a pipeline folder and the ShapesBench teacher; --compare, --lora, --seed."""
import numpy as np
import pytest
from PIL import Image

from hprune.artifacts import save_compressed
from hprune.cli import main
from hprune.models import PrunePlan, apply_plan
from hprune.pipelines import build_pipeline
from hprune.quant import quantize_model
from util import fresh


def _png(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """`hprune compress tiny-sd3 --out out` layout: out/artifact/ (pruned + W4A16)."""
    m = fresh("tiny-sd3")
    apply_plan(m, PrunePlan.manual({2: ["block"], 5: ["ff"]}, m))
    quantize_model(m, 32, refine=False)
    out = tmp_path_factory.mktemp("compress") / "out"
    save_compressed(m, out / "artifact")
    return out


def test_builtin_with_artifact_compare_and_lora(art, tmp_path, capsys):
    from test_lora import make_lora

    _, lora = make_lora("tiny-sd3", tmp_path)
    rc = main(["generate", "tiny-sd3", "--artifact", str(art), "--prompt", "a fox", "--prompt", "a cat",
               "--compare", "--lora", f"{lora}:0.5", "--steps", "2", "--out", str(tmp_path / "g"), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "original: LoRA 'lora0' (scale 0.5): 110 layers applied" in printed
    assert "compressed: LoRA 'lora0'" in printed and "dropped transformer_blocks.2." in printed
    g = tmp_path / "g"
    for label in ("original", "compressed"):
        for i in range(2):
            assert _png(g / label / f"{i:03d}.png").shape == (64, 64, 3)
    assert (g / "contact_sheet.png").stat().st_size > 0 and (g / "prompts.txt").read_text().count("\n") == 2
    assert not np.array_equal(_png(g / "original" / "000.png"), _png(g / "compressed" / "000.png"))
    # the artifact alone (its base is recognised as tiny-sd3); same seed and LoRA: the same images
    assert main(["generate", str(art), "--prompt", "a fox", "--prompt", "a cat", "--lora", f"{lora}:0.5",
                 "--steps", "2", "--out", str(tmp_path / "h"), "--device", "cpu"]) == 0
    for i in range(2):
        assert np.array_equal(_png(tmp_path / "h" / "compressed" / f"{i:03d}.png"),
                              _png(g / "compressed" / f"{i:03d}.png"))
    # another seed: other noise
    assert main(["generate", str(art), "--prompt", "a fox", "--steps", "2", "--seed", "5",
                 "--out", str(tmp_path / "k"), "--device", "cpu"]) == 0
    assert not np.array_equal(_png(tmp_path / "k" / "compressed" / "000.png"), _png(tmp_path / "h" / "compressed" / "000.png"))


def test_pipeline_folder(art, tmp_path):
    base = tmp_path / "base"
    build_pipeline(fresh("tiny-sd3")).save_pretrained(str(base))
    assert main(["generate", str(base), "--artifact", str(art), "--prompt", "x", "--compare", "--steps", "2",
                 "--size", "32", "--out", str(tmp_path / "g"), "--device", "cpu"]) == 0
    assert _png(tmp_path / "g" / "original" / "000.png").shape == (32, 32, 3)
    assert _png(tmp_path / "g" / "compressed" / "000.png").shape == (32, 32, 3)


def test_shapes_teacher(tmp_path):
    from hprune.loading import load_model

    t = load_model("shapes-teacher")
    apply_plan(t, PrunePlan.manual({10: ["block"]}, t))
    quantize_model(t, 32, refine=False)
    save_compressed(t, tmp_path / "art")
    assert main(["generate", "shapes-teacher", "--artifact", str(tmp_path / "art"), "--prompt", "a red circle",
                 "--compare", "--steps", "3", "--out", str(tmp_path / "g"), "--device", "cpu"]) == 0
    for label in ("original", "compressed"):
        assert _png(tmp_path / "g" / label / "000.png").shape == (32, 32, 3)


def test_errors(art, tmp_path, capsys):
    def err(*argv):
        assert main(["generate", *argv, "--out", str(tmp_path / "e"), "--device", "cpu"]) == 1
        return capsys.readouterr().err

    assert "at least one --prompt" in err("tiny-sd3")
    assert "--lora: not found" in err("tiny-sd3", "--prompt", "x", "--lora", str(tmp_path / "no.safetensors:0.5"))
    assert "--compare needs a compressed model" in err("tiny-sd3", "--prompt", "x", "--compare")
    assert "not a ShapesBench caption" in err("shapes-teacher", "--prompt", "a fox in the snow", "--steps", "1")
    assert "MODEL not found" in err(str(tmp_path / "nothing"), "--prompt", "x")
    assert not (tmp_path / "e").exists()
