import json

import pytest
import torch

from pin import train as train_mod
from pin.config import load_config
from pin.eval import run_eval
from pin.pipeline import codec_from_cfg, dataset_from_cfg, pixel_values, pools_from_cfg, training_batch
from pin.synthetic import to_tensor


def _boxes_from_pixels(vlm, codec, images, names, *args, **kwargs):
    """Stand-in for the tiny VLM's generations (all fallback boxes, IoU 0): a square whose side follows the image's
    mean, so that the mIoU of two runs agrees only when they score the same queries the same way."""
    sides = [float(56 + 168 * image.mean()) for image in images]
    return [[0.0, 0.0, side, side] for side in sides], [""] * len(names)


def test_validation_every_epoch_matches_pin_eval_and_a_plain_loss_loop(tmp_path, monkeypatch):
    monkeypatch.setattr("pin.eval.predict_boxes", _boxes_from_pixels)
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
    assert rows[-1]["miou"] > 0.05
    for key in ("miou", "miou_m", "miou_l", "miou_grid", "batch_weighted_miou_m", "batch_weighted_miou_l"):
        assert rows[-1][key] == pytest.approx(evaluated[0][key], abs=1e-9), key
    assert rows[-1]["miou_grid"] == pytest.approx(rows[-1]["miou"])  # synthetic boxes lie on the grid
    assert rows[-1]["num"] == evaluated[0]["num"] > 0

    # loss: token mean over the fixed val compositions (pin-eval's held-out epoch) in the phase of epoch 1 (box only),
    # here one image at a time from the per-token losses
    vlm, method = result["vlm"], result["method"]
    composer = dataset_from_cfg(cfg, pools_from_cfg(cfg)[1], "val").composer
    codec = codec_from_cfg(cfg)
    method.train(False)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for j in range(cfg["data"]["val_size"]):
            comp = composer.compose(j, 10**6, fixed=False)
            cells = [list(comp.boxes[comp.target])]
            ids, mask, targets = training_batch(vlm, codec, [comp.phrase], cells, False)
            logits = vlm.logits(pixel_values(vlm, to_tensor(comp.image)[None]), ids, mask)
            keep = targets.flatten() != -100
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1)[keep], targets.flatten()[keep], reduction="sum"
            )
            tokens += int(keep.sum())
    assert rows[-1]["val_loss"] == pytest.approx(total.item() / tokens, rel=1e-5)


def test_validation_scores_the_same_images_each_time(tmp_path):
    # nothing trains (lr 0) and the phase does not change: the validation loss must not either
    args = ["--config", "tiny", f"out_dir={tmp_path}", "optim.lr=0", "data.switch_epoch=5", "train.epochs=3"]
    rows = train_mod.main(args)["validation"]
    assert len(rows) == 3 and rows[0]["val_loss"] == rows[1]["val_loss"] == rows[2]["val_loss"]


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


def test_each_process_evaluates_whole_batches_of_the_single_process_run(tmp_path, monkeypatch):
    """The batch-weighted mIoU bins depend on the batches: split over processes, each evaluates whole batches of the
    single process's partition (here as rank 0 and 1 of 2, with accelerate's contiguous, uneven split)."""
    import contextlib

    from accelerate import Accelerator

    from pin import validation as val_mod

    cfg, _ = load_config(["--config", "tiny", f"out_dir={tmp_path}", "eval.batch_size=5"])
    validation = val_mod.SyntheticValidation(cfg, tmp_path)
    assert len(validation.queries) % 5 and len(validation.queries) // 5 > 2
    seen = []

    def record(vlm, codec, queries, size, *args):
        seen.append((list(queries), size))
        return {"preds": [], "gts": [], "texts": [], "batches": []}

    monkeypatch.setattr(val_mod, "evaluate_queries", record)
    monkeypatch.setattr(val_mod, "summed_training_loss", lambda *args: (torch.tensor(1.0), 1))
    monkeypatch.setattr(val_mod, "summarise", lambda result, codec: {})
    accelerator = Accelerator(cpu=True)
    for rank in range(2):

        @contextlib.contextmanager
        def split(items, rank=rank):
            per, extra = divmod(len(items), 2)
            start = rank * per + min(rank, extra)
            yield items[start : start + per + (rank < extra)]

        monkeypatch.setattr(accelerator, "split_between_processes", split)
        validation.run(None, codec_from_cfg(cfg), torch.nn.Identity(), accelerator, 0, 0)
    got = [[id(q) for q in queries[i : i + size]] for queries, size in seen for i in range(0, len(queries), size)]
    single = [[id(q) for q in validation.queries[i : i + 5]] for i in range(0, len(validation.queries), 5)]
    assert got == single


def test_validation_also_scores_the_zero_shot_pool_like_pin_eval(tmp_path, monkeypatch, write_object_pool):
    monkeypatch.setattr("pin.eval.predict_boxes", _boxes_from_pixels)
    write_object_pool(tmp_path / "pool", ("circle", "square", "triangle", "cross"))
    data = [f"data.objects={tmp_path / 'pool'}", "data.held_out=[cross]", "data.val_size=3"]
    args = ["--config", "tiny", f"out_dir={tmp_path}", "train.val_every_epochs=2", *data]
    row = train_mod.main(args)["validation"][-1]
    cfg, _ = load_config(["--config", "tiny", f"out_dir={tmp_path}", "method=pin", *data])
    cfg["eval"]["checkpoint"] = str(tmp_path / "tiny" / "checkpoints" / "step_0000004")
    cfg["eval"]["datasets"] = ["synthetic", "synthetic_zero_shot"]
    evaluated, _ = run_eval(cfg, out_dir=tmp_path / "eval")
    for prefix, result in zip(("", "zero_shot_"), evaluated):
        for key in ("miou", "miou_m", "miou_l", "num"):
            assert row[prefix + key] == pytest.approx(result[key], abs=1e-9), prefix + key
    assert row["zero_shot_num"] > 0 and row["zero_shot_val_loss"] > 0 and row["zero_shot_miou"] != row["miou"]
