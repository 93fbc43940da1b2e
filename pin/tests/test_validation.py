import json

import pytest
import torch

from pin import train as train_mod
from pin.config import load_config
from pin.eval import run_eval
from pin.pipeline import codec_from_cfg, dataset_from_cfg, pixel_values, pools_from_cfg, training_batch


def test_validation_every_epoch_matches_pin_eval_and_a_plain_loss_loop(tmp_path):
    args = ["--config", "tiny", f"out_dir={tmp_path}", "train.val_every_epochs=1"]
    result = train_mod.main(args)
    rows = result["validation"]
    assert [(r["epoch"], r["step"]) for r in rows] == [(0, 2), (1, 4)]
    logged = [json.loads(line) for line in (tmp_path / "tiny" / "validation.jsonl").read_text().splitlines()]
    assert logged == rows

    # mIoU: the same queries and weights through pin-eval's synthetic set
    cfg, _ = load_config(["--config", "tiny", f"out_dir={tmp_path}", "method=pin"])
    cfg["eval"]["checkpoint"] = str(tmp_path / "tiny" / "checkpoints" / "step_0000004")
    cfg["eval"]["datasets"] = ["synthetic"]
    evaluated, _ = run_eval(cfg, out_dir=tmp_path / "eval")
    assert rows[-1]["miou"] == pytest.approx(evaluated[0]["miou"], abs=1e-9)
    assert rows[-1]["num"] == evaluated[0]["num"] > 0

    # loss: token mean over the val compositions at epoch 1, here one image at a time from the per-token losses
    vlm, method = result["vlm"], result["method"]
    val = dataset_from_cfg(cfg, pools_from_cfg(cfg)[1], "val")
    val.set_epoch(1)
    codec = codec_from_cfg(cfg)
    method.train(False)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for j in range(len(val)):
            ids, mask, targets = training_batch(
                vlm, codec, [val[j]["phrase"]], [val[j]["cells"].tolist()], val.first_phase
            )
            logits = vlm.logits(pixel_values(vlm, val[j]["image"][None]), ids, mask)
            keep = targets.flatten() != -100
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1)[keep], targets.flatten()[keep], reduction="sum"
            )
            tokens += int(keep.sum())
    assert rows[-1]["val_loss"] == pytest.approx(total.item() / tokens, rel=1e-5)


def test_validation_every_second_epoch_only(tmp_path):
    result = train_mod.main(["--config", "tiny", f"out_dir={tmp_path}", "train.val_every_epochs=2", "train.epochs=3"])
    assert [r["epoch"] for r in result["validation"]] == [1]


@pytest.mark.parametrize("method", ["pin", "vpt"])
def test_validation_does_not_change_the_training_trajectory(tmp_path, method):
    base = ["--config", "tiny", f"out_dir={tmp_path}", f"method={method}"]
    with_val = train_mod.main([*base, "name=a", "train.val_every_epochs=1"])
    without = train_mod.main([*base, "name=b", "train.val_every_epochs=null"])
    assert len(with_val["validation"]) == 2 and without["validation"] == []
    assert with_val["losses"] == without["losses"]
    assert not (tmp_path / "b" / "validation.jsonl").exists()


def test_validation_without_held_out_compositions_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"val_every_epochs=1 needs data.val_size > 0.*val_every_epochs=null"):
        train_mod.main(["--config", "tiny", f"out_dir={tmp_path}", "data.val_size=0"])
