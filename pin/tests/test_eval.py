import json
import pickle

import numpy as np
import pytest
from PIL import Image

from pin.eval import main as eval_main
from pin.eval_data import coco_queries, lvis_queries, pvoc_queries, refcoco_queries
from pin.localise import main as localise_main
from pin.train import main as train_main


def _image(path, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def _coco(tmp_path):
    images = [
        {
            "id": i,
            "width": 640,
            "height": 480,
            "file_name": f"{i:012d}.jpg",
            "coco_url": f"http://x/val2017/{i:012d}.jpg",
        }
        for i in range(1, 4)
    ]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [64, 48, 320, 240], "iscrowd": 0}]
    anns += [{"id": 2 + j, "image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "iscrowd": 0} for j in range(4)]
    anns += [{"id": 9, "image_id": 3, "category_id": 2, "bbox": [0, 0, 640, 480], "iscrowd": 1}]
    cats = [{"id": 1, "name": "dog"}, {"id": 2, "name": "bus_(vehicle)"}]
    for i in range(1, 4):
        _image(tmp_path / "val2017" / f"{i:012d}.jpg", 640, 480)
    return {"images": images, "annotations": anns, "categories": cats}


def test_coco_and_lvis_loaders_keep_images_with_at_most_three_objects(tmp_path):
    data = _coco(tmp_path)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    (tmp_path / "annotations" / "lvis_v1_val.json").write_text(json.dumps(data))
    q = coco_queries(tmp_path)
    assert [(x.name, x.image_id) for x in q] == [("dog", "1"), ("bus_(vehicle)", "3")]  # image 2 has 4 objects
    assert q[0].box == [22.0, 22.0, 134.0, 134.0]  # int(64*.35)=22, int(48*.4667)=22, +int(320*.35)=112, +112
    assert q[1].box == [0.0, 0.0, 223.0, 223.0]  # crowd counts; far edge clipped to 223
    lq = lvis_queries(tmp_path)
    assert [x.name for x in lq] == ["dog", "bus"] and lq[0].image.name == "000000000001.jpg"
    with pytest.raises(FileNotFoundError, match="COCO val2017 annotations"):
        coco_queries(tmp_path / "missing")


def test_pvoc_loader(tmp_path):
    base = tmp_path / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir()
    (base / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n")
    obj = (
        "<object><name>{}</name><difficult>{}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>250</xmax>"
        "<ymax>375</ymax></bndbox></object>"
    )
    for i, objs in [(1, [("diningtable", 0)]), (2, [("dog", 1)] * 4)]:
        xml = "<annotation><size><width>500</width><height>375</height></size>" + "".join(obj.format(*o) for o in objs)
        (base / "Annotations" / f"00000{i}.xml").write_text(xml + "</annotation>")
    q = pvoc_queries(tmp_path)
    assert len(q) == 1 and q[0].name == "diningtable"  # the annotation name, as the reference prompts
    assert q[0].box == [1.0, 1.0, 112.0, 224.0]  # x * 224/500, y * 224/375, near edges clipped to 1


def test_pvoc_missing_names_the_documented_layout(tmp_path):
    (tmp_path / "VOCdevkit").mkdir()  # VOC2007/ not unpacked there: the error names the README's path
    with pytest.raises(FileNotFoundError, match=r"VOCdevkit/VOC2007/ImageSets/Main/test\.txt"):
        pvoc_queries(tmp_path / "VOCdevkit")
    with pytest.raises(FileNotFoundError, match=r"missing/VOC2007/ImageSets/Main/test\.txt"):
        pvoc_queries(tmp_path / "missing")


def test_refcoco_loader_and_safe_unpickling(tmp_path):
    base = tmp_path / "refcoco"
    base.mkdir()
    refs = [
        {
            "ref_id": 5,
            "image_id": 1,
            "ann_id": 1,
            "split": "testA",
            "sentences": [{"sent": "a"}, {"sent": "left man", "raw": "Left man."}],
        },
        {"ref_id": 6, "image_id": 1, "ann_id": 1, "split": "val", "sentences": [{"sent": "x"}]},
        {"ref_id": 7, "image_id": 1, "ann_id": 1, "split": "testA", "sentences": [{"sent": "dog"}]},  # no raw text
    ]
    with open(base / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    inst = {
        "images": [{"id": 1, "width": 640, "height": 480, "file_name": "a.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [64, 48, 320, 240]}],
    }
    (base / "instances.json").write_text(json.dumps(inst))
    q = refcoco_queries(tmp_path)
    box = [22.0, 22.0, 134.0, 134.0]
    assert [(x.name, x.image_id, x.box) for x in q] == [
        ("Left man.", "5", box),
        ("dog", "7", box),
    ]  # raw, as the reference

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(base / "refs(unc).p", "wb") as f:
        pickle.dump([Evil()], f)
    with pytest.raises(pickle.UnpicklingError, match="only plain data"):
        refcoco_queries(tmp_path)


def test_train_eval_localise_end_to_end(tmp_path, capsys):
    out = train_main(["--config", "tiny", f"out_dir={tmp_path}", "train.max_steps=1"])
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_0000001"
    assert out["step"] == 1 and ckpt.is_dir()
    rows = eval_main(
        [
            "--config",
            "tiny",
            f"out_dir={tmp_path}",
            f"eval.checkpoint={ckpt}",
            "eval.limit=4",
            "data.val_size=2",
            "eval.num_beams=2",
            "eval.max_new_tokens=4",
        ]
    )
    assert rows[0]["method"] == "pin" and rows[0]["num"] == 4 and 0 <= rows[0]["miou"] <= 1
    metrics = json.loads((tmp_path / "tiny" / "eval" / "metrics.json").read_text())
    assert metrics[0]["num"] == 4 and (tmp_path / "tiny" / "eval" / "boxes_synthetic_pin.png").is_file()
    assert metrics[0]["miou_grid"] == pytest.approx(metrics[0]["miou"])  # synthetic GT boxes lie on the grid
    # a run folder stands for its latest checkpoint, as in neco-eval and sharelock-eval (it was "no PIN weights")
    args = ["--config", "tiny", f"out_dir={tmp_path}", "eval.limit=4", "data.val_size=2", "eval.max_new_tokens=4"]
    by_run = eval_main([*args, "eval.num_beams=2", f"eval.checkpoint={tmp_path / 'tiny'}"])
    assert by_run[0]["miou"] == rows[0]["miou"]
    rows = eval_main(["--config", "tiny", f"out_dir={tmp_path}", "method=random", "data.val_size=4"])
    assert rows[0]["miou_std"] >= 0 and 0 < rows[0]["miou"] < 1
    with pytest.raises(ValueError, match="needs eval.checkpoint"):
        eval_main(["--config", "tiny", f"out_dir={tmp_path}"])

    img = tmp_path / "query.png"
    _image(img, 100, 80)
    box = localise_main([str(img), "circle", "--config", "tiny", f"checkpoint={ckpt}", f"out={tmp_path / 'b.png'}"])
    assert len(box) == 4 and (tmp_path / "b.png").is_file()
    assert "circle: box xyxy" in capsys.readouterr().out


def test_synthetic_zero_shot_split_queries_only_held_out_classes(tmp_path, write_object_pool):
    """The reference's "zero_shot" synthetic split: compositions of the held-out classes' cut-outs only."""
    from pin.config import load_config
    from pin.eval import run_eval, synthetic_eval_queries
    from pin.eval_data import HELD_OUT_EPOCH
    from pin.pipeline import dataset_from_cfg, pools_from_cfg

    write_object_pool(tmp_path / "pool", ("wok", "yak", "zebra", "dog"))
    args = [
        "--config",
        "tiny",
        f"out_dir={tmp_path}",
        f"data.objects={tmp_path / 'pool'}",
        "data.held_out=[zebra, dog]",
    ]
    args += [
        "data.val_size=3",
        "method=random",
        "eval.datasets=[synthetic, synthetic_zero_shot]",
        "eval.random_seeds=2",
    ]
    cfg, _ = load_config(args)
    queries = synthetic_eval_queries(cfg, "synthetic_zero_shot")
    # by hand: the 3 compositions of the held-out epoch, every pasted object a query with its cell rectangle
    _, _, zero_shot = pools_from_cfg(cfg)
    assert zero_shot.names == ["dog", "zebra"]
    composer = dataset_from_cfg(cfg, zero_shot, "val").composer
    expected = []
    for i in range(3):
        comp = composer.compose(i, HELD_OUT_EPOCH, fixed=True)  # 3 objects, as the reference's val loaders
        expected += [
            (n, [14.0 * b[0], 14.0 * b[1], 14.0 * (b[2] + 1), 14.0 * (b[3] + 1)])
            for n, b in zip(comp.names, comp.boxes)
        ]
    assert [(q.name, q.box) for q in queries] == expected
    assert {q.name for q in synthetic_eval_queries(cfg, "synthetic")} <= {"wok", "yak"}
    rows, _ = run_eval(cfg)
    assert [r["dataset"] for r in rows] == ["synthetic", "synthetic_zero_shot"] and rows[1]["num"] == len(expected)
    cfg["data"]["held_out"] = []
    with pytest.raises(ValueError, match="synthetic_zero_shot: its object pool is empty"):
        synthetic_eval_queries(cfg, "synthetic_zero_shot")


def test_procedural_pools_hold_out_classes_and_never_pass_train_classes_off_as_zero_shot(tmp_path, monkeypatch):
    """Procedural pools: `data.held_out` shapes form the zero-shot pool; without any it is empty, and pin-eval refuses
    `synthetic_zero_shot` before building the VLM (it used to score the val pool's trained classes under that name)."""
    from pin import eval as eval_mod
    from pin.config import load_config
    from pin.pipeline import pools_from_cfg

    base = ["--config", "tiny", f"out_dir={tmp_path}", "method=raw"]
    cfg, _ = load_config(base)
    train, val, zero_shot = pools_from_cfg(cfg)
    assert len(zero_shot) == 0 and train.names == val.names == sorted(cfg["data"]["procedural_classes"])
    cfg, _ = load_config(base + ["data.held_out=[cross]"])
    train, val, zero_shot = pools_from_cfg(cfg)
    assert zero_shot.names == ["cross"] and "cross" not in train.names + val.names
    with pytest.raises(ValueError, match="every one of data.procedural_classes"):
        pools_from_cfg(load_config(base + ["data.held_out=[circle, square, triangle, cross]"])[0])
    with pytest.raises(ValueError, match=r"data.held_out names \['crosss'\], which are not classes"):
        pools_from_cfg(load_config(base + ["data.held_out=[circle, crosss]"])[0])  # a typo is not silently trained on
    with pytest.raises(ValueError, match=r"data.held_out='cross': expected 'default' or a list .* \[cross\]"):
        pools_from_cfg(load_config(base + ["data.held_out=cross"])[0])  # not held out letter by letter

    def no_vlm(_cfg):
        raise AssertionError("the VLM was built before the bad eval dataset was noticed")

    monkeypatch.setattr(eval_mod, "vlm_from_cfg", no_vlm)
    with pytest.raises(ValueError, match=r"synthetic_zero_shot: its object pool is empty.*data\.held_out"):
        eval_main(base + ["eval.datasets=[synthetic, synthetic_zero_shot]"])
    with pytest.raises(ValueError, match=r"unknown eval dataset 'cocoo'; expected one of .*'synthetic_zero_shot'"):
        eval_main(base + ["eval.datasets=[synthetic, cocoo]"])
    with pytest.raises(ValueError, match=r"eval.datasets lists \['synthetic'\] more than once"):
        eval_main(base + ["eval.datasets=[synthetic, synthetic]"])
    with pytest.raises(
        ValueError, match=r"eval.datasets='synthetic': expected a list, e.g. eval.datasets=\[synthetic\]"
    ):
        eval_main(base + ["eval.datasets=synthetic"])  # read letter by letter before
    with pytest.raises(FileNotFoundError, match="no PIN weights at"):
        eval_main(base[:-1] + ["method=pin", f"eval.checkpoint={tmp_path / 'missing.pt'}"])
    assert not (tmp_path / "tiny" / "eval" / "metrics.json").exists()


def test_eval_images_are_resized_like_the_reference(tmp_path):
    # the reference's eval loaders resize with torchvision F.resize(PIL image, (S, S)) at its default interpolation
    # (bilinear); the VLM processors' own resize is then a no-op on the square image
    import torch
    import torchvision.transforms.functional as TF

    from pin.eval_data import ObjectQuery, load_image

    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(path)
    got = load_image(ObjectQuery(path, "dog", [0, 0, 1, 1], "0"), 224)
    ref = TF.resize(Image.open(path).convert("RGB"), [224, 224])
    assert torch.equal(got, torch.from_numpy(np.asarray(ref, np.float32) / 255.0).permute(2, 0, 1))


def test_held_out_synthetic_sets_paste_three_objects_per_image(tmp_path):
    """The reference's val and zero-shot XPaste loaders are built with num_objects=3 and --num_objects_fixed, and its
    UpdateDataLoaderCallback switches only `trainer.train_dataloader.dataset` to 1-3 objects: every held-out
    composition (pin-eval `synthetic`, the validation inside pin-train) has exactly 3 objects, 3 queries per image."""
    from collections import Counter

    from pin.config import load_config
    from pin.eval import synthetic_eval_queries

    cfg, _ = load_config(["--config", "tiny", f"out_dir={tmp_path}", "data.val_size=12"])
    queries = synthetic_eval_queries(cfg, "synthetic")
    per_image = Counter(q.image_id for q in queries)
    assert len(per_image) == 12 and set(per_image.values()) == {3}
    assert len(queries) == 36


def test_unloadable_model_or_missing_optional_package_is_a_one_line_error(tmp_path, monkeypatch):
    """A model.name that is neither a folder nor a loadable id, and kind=openflamingo without open_flamingo, end the
    console script with one line naming the cause, not a traceback."""
    import sys

    from pin import eval as eval_mod

    base = ["pin-eval", "--config", "tiny", f"out_dir={tmp_path}", "method=raw"]
    missing = tmp_path / "no" / "blip2"
    monkeypatch.setattr(sys, "argv", base + [f"model.name={missing}"])
    with pytest.raises(SystemExit) as exc:
        eval_mod.cli()
    message = str(exc.value.code)
    assert message.startswith(f"pin-eval: error: model.name='{missing}' is neither a local checkpoint folder")
    assert "\n" not in message
    monkeypatch.setitem(sys.modules, "open_flamingo", None)  # import fails as when the package is not installed
    monkeypatch.setattr(sys, "argv", base + ["model.kind=openflamingo", f"model.name={tmp_path / 'of.pt'}"])
    with pytest.raises(SystemExit) as exc:
        eval_mod.cli()
    assert str(exc.value.code) == "pin-eval: error: kind=openflamingo needs the optional package: pip install " + (
        "'funai-pin[openflamingo]'"
    )


def test_loaders_keep_images_with_exactly_max_objects(tmp_path):
    """The limit is inclusive: an image with max_objects objects is kept, one more (or none) drops the image."""
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
    anns = [{"id": 10 + j, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50]} for j in range(3)]
    anns += [{"id": 20 + j, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50]} for j in range(4)]
    (tmp_path / "annotations").mkdir()
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "dog"}]}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    assert [q.image_id for q in coco_queries(tmp_path, max_objects=3)] == ["1"] * 3
    assert coco_queries(tmp_path, max_objects=2) == []
    assert len(coco_queries(tmp_path, max_objects=4)) == 7

    base = tmp_path / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir()
    (base / "ImageSets" / "Main" / "test.txt").write_text("1\n2\n")
    obj = "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
    for i, k in [(1, 3), (2, 4)]:
        xml = f"<annotation><size><width>10</width><height>10</height></size>{obj * k}</annotation>"
        (base / "Annotations" / f"{i}.xml").write_text(xml)
    assert [q.image_id for q in pvoc_queries(tmp_path, max_objects=3)] == ["1"] * 3


def test_kshot_context_boxes_are_not_taken_for_the_prediction(tiny_blip2, codec, monkeypatch):
    """The k-shot examples hold boxes of their own; only the continuation after the context is parsed."""
    import torch

    from pin.pipeline import predict_boxes
    from pin.prompts import training_text

    context = training_text("square", codec.encode([0, 0, 1, 1]), ".", False) + " "
    seen = {}

    def generate(pv, prompts, num_beams=3, max_new_tokens=12):
        seen["prompts"] = list(prompts)
        return [p + " [28,42,84,112]" for p in prompts]

    monkeypatch.setattr(tiny_blip2, "generate", generate)
    boxes, texts = predict_boxes(tiny_blip2, codec, torch.rand(1, 3, 224, 224), ["circle"], context=context)
    assert seen["prompts"] == [context + "In the image is a circle located at"]
    assert boxes == [[28.0, 42.0, 84.0, 112.0]]


def test_summary_reports_p_at_0_3_for_refcoco_only():
    from pin.boxes import GridCodec
    from pin.eval import summarise

    codec = GridCodec()
    preds, gts = [[0, 0, 40, 100], [0, 0, 20, 100]], [[0, 0, 100, 100], [0, 0, 100, 100]]  # IoU 0.4 and 0.2
    result = {"preds": preds, "gts": gts, "batches": [(preds, gts)]}
    row = summarise(result, codec, refcoco=True)
    assert row["p@0.3"] == pytest.approx(50.0)
    assert row["miou"] == pytest.approx(0.3) and row["batch_weighted_miou"] == pytest.approx(0.3)
    assert "p@0.3" not in summarise(result, codec)


def test_eval_runs_the_method_with_its_dropout_off(tmp_path, tiny_blip2, monkeypatch):
    """A VPT / LoRA method handed over from training (dropout on) is evaluated in eval mode."""
    from pin import eval as eval_mod
    from pin.config import load_config
    from pin.methods import Method

    cfg, _ = load_config(["--config", "tiny", f"out_dir={tmp_path}", "method=vpt", "data.val_size=2"])
    cfg["eval"]["figure_images"] = 0
    method = Method(tiny_blip2, "vpt", {"vpt": {"num_tokens": 2, "dropout": 0.5}})
    method.train(True)
    seen = []

    def evaluate(vlm, codec, queries, *args, **kwargs):
        seen.append(method.module.dropout.training)
        preds, gts = [codec.fallback_box] * len(queries), [q.box for q in queries]
        return {"preds": preds, "gts": gts, "texts": [""] * len(queries), "batches": [(preds, gts)]}

    monkeypatch.setattr(eval_mod, "evaluate_queries", evaluate)
    rows, _ = eval_mod.run_eval(cfg, tiny_blip2, method, tmp_path / "eval")
    assert seen == [False] and rows[0]["method"] == "vpt"


def test_kshot_needs_at_least_one_example(tmp_path):
    """method=kshot with eval.kshot=0 (the paper configs' value) silently evaluated the raw prompt: now an error;
    eval.kshot=1 runs end to end."""
    with pytest.raises(ValueError, match=r"^eval.kshot=0: method=kshot needs at least one in-context example"):
        eval_main(["--config", "tiny", f"out_dir={tmp_path}", "method=kshot", "eval.kshot=0"])
    rows = eval_main(["--config", "tiny", f"out_dir={tmp_path}", "method=kshot", "eval.kshot=1", "data.val_size=4"])
    assert [(r["method"], r["num"]) for r in rows] == [("kshot", 12)]


def test_a_checkpoint_is_evaluated_and_resumed_only_with_the_settings_it_was_trained_with(tmp_path):
    """A tiny run trained with codec.grid=8 (its max_cells too) and seed 2, evaluated or resumed with the tiny config,
    was scored against another box codec and another random VLM without a word; now an error listing the keys, and
    the run's own config.yaml evaluates it. A bare .safetensors file carries no config and is not checked."""
    run = tmp_path / "run"
    train_main(
        [
            "--config",
            "tiny",
            f"out_dir={tmp_path}",
            "name=run",
            "train.max_steps=1",
            "codec.grid=8",
            "data.max_cells=8",
            "seed=2",
        ]
    )
    ckpt = run / "checkpoints" / "step_0000001"
    base = ["--config", "tiny", f"out_dir={tmp_path}", "data.val_size=4"]
    expected = r"was trained with other settings: codec.grid=16 \(checkpoint: 8\); seed=1 \(checkpoint: 2\)"
    with pytest.raises(ValueError, match=rf"^eval.checkpoint=.*run: .*step_0000001 {expected}; evaluate it with"):
        eval_main([*base, f"eval.checkpoint={run}"])
    with pytest.raises(ValueError, match=rf"^--resume: .*step_0000001 {expected}; resume it with its run's config"):
        train_main(["--config", "tiny", f"out_dir={tmp_path}", "name=run", "--resume", "latest"])
    with pytest.raises(ValueError, match=r"method='vpt' \(checkpoint: 'pin'\)"):
        eval_main([*base, "method=vpt", "seed=2", "codec.grid=8", "data.max_cells=8", f"eval.checkpoint={run}"])
    rows = eval_main(["--config", str(ckpt / "config.yaml"), f"out_dir={tmp_path}", f"eval.checkpoint={run}"])
    assert rows[0]["method"] == "pin"
    assert eval_main([*base, f"eval.checkpoint={ckpt / 'weights.safetensors'}"])[0]["method"] == "pin"
