import json

import pytest


@pytest.mark.slow
def test_demo_quick(tmp_path):
    from pin.demo import main

    metrics = main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 3 <= len(summary) <= 6 and "random-box mIoU" in summary
    assert (tmp_path / "boxes.png").is_file() and (tmp_path / "metrics.json").is_file()
    methods = [r["method"] for r in metrics["rows"]]
    assert methods == ["random box", "constant mean box", "frozen VLM, raw prompt", "frozen VLM + PIN"]
    assert all(0 <= r["miou"] <= 1 for r in metrics["rows"])
    # the constant-box row: one box scored against every ground truth, recomputed here from its definition
    from pin.metrics import paired_iou

    gts = metrics["ground_truth_boxes"]
    expected = paired_iou([metrics["constant_box"]] * len(gts), gts).mean().item()
    assert metrics["rows"][1]["miou"] == pytest.approx(expected)
