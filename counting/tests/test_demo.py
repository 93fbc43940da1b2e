import json

import pytest

from counting.demo import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    metrics = main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 3 <= len(summary) <= 6 and all(isinstance(v, (int, float, str)) for v in summary.values())
    assert (tmp_path / "coins_density.png").is_file() and (tmp_path / "heldout_collage.png").is_file()
    assert metrics["held-out MAE"] == summary["held-out MAE"] and "held-out MAE" in capsys.readouterr().out


def test_demo_out_under_a_file_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("kept")
    with pytest.raises(ValueError, match=r"^--out: .*file is a file; expected a folder"):
        main(["--quick", "--out", str(tmp_path / "file" / "demo")])
    assert (tmp_path / "file").read_text() == "kept"
