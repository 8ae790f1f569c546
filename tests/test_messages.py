"""Error messages name the way out (the option or command that fixes the input)."""
import pytest

from hprune.cli import main


def err(capsys, argv) -> str:
    assert main(argv) == 1
    text = capsys.readouterr().err.strip()
    assert text.startswith("hprune: error:") and "\n" not in text
    return text


def test_sgdistill_without_table_names_sensitivity_and_sgd_off(capsys, tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["plan", "--method", "manual", "--blocks", "1-3", "--model", "tiny-sd3", "--out", str(plan)]) == 0
    text = err(capsys, ["distill", "tiny-sd3", "--plan", str(plan), "--out", str(tmp_path / "d")])
    assert "--sensitivity" in text and "--sgd off" in text and "hprune probe" in text
    assert not (tmp_path / "d").exists()


def test_library_message_names_both_routes():
    from hprune.distill import training_schedule
    from hprune.errors import HpruneError
    from util import fresh

    with pytest.raises(HpruneError, match=r"table=.*sgd=False"):
        training_schedule(fresh("tiny-sd3"), None, sgd=True)


def test_other_messages_name_the_fix(capsys, tmp_path):
    assert "hprune calib" in err(capsys, ["quantize", "tiny-sd3", "--calib", str(tmp_path / "nope"),
                                          "--out", str(tmp_path / "q")])
    assert "--ratio 0.3" in err(capsys, ["plan", "--method", "hpp", "--sensitivity", str(tmp_path / "t.json"),
                                         "--out", str(tmp_path / "p.json")])
    assert "hprune probe" in err(capsys, ["distill", "tiny-sd3", "--plan", str(tmp_path / "p.json"), "--sensitivity",
                                          str(tmp_path / "none.json"), "--out", str(tmp_path / "d")])
