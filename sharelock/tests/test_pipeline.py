"""End to end: the demo (features -> train -> eval CLIs) on synthetic shapes, then eval, probe and API on its output."""

import json

import numpy as np
import pytest
import torch

from sharelock import demo, precompute, probe
from sharelock import eval as evaluate
from sharelock.models import load_model
from sharelock.store import FeatureStore, FeatureWriter
from sharelock.synthetic import CLASSES


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = demo.main(["--out", str(out), "--quick"])
    return out, summary


@pytest.mark.slow
def test_demo_quick_beats_chance(demo_out):
    out, summary = demo_out
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["zero-shot top-1 (%)"] > 3 * summary["chance top-1 (%)"]
    assert (out / "similarity.png").stat().st_size > 10_000
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 48 and metrics["top5"] >= metrics["top1"]
    # the resolved config is in the run dir and the store metadata names the backbones
    assert (out / "run" / "config.yaml").is_file()
    assert FeatureStore(out / "features" / "captions_a").model.endswith("llama")


@pytest.mark.slow
def test_console_entry_point_returns_none_for_exit_status_0(demo_out, monkeypatch, tmp_path):
    out, _ = demo_out
    argv = ["sharelock-eval", f"checkpoint={out / 'run'}", f"features={out / 'features' / 'test_images'}"]
    monkeypatch.setattr("sys.argv", argv + [f"class_names={out / 'data' / 'class_names.json'}", f"out={tmp_path}"])
    assert evaluate.cli() is None  # console scripts run sys.exit(cli()): None -> status 0
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 48


@pytest.mark.slow
def test_python_api_matches_stored_features(demo_out):
    out, _ = demo_out
    model = load_model(out / "run", load_backbones=True)
    captions = json.loads((out / "data" / "captions_a.json").read_text())
    ids = list(captions)[:5]
    store = FeatureStore(out / "features" / "captions_a")
    from_strings = model.encode_text([captions[i] for i in ids])
    torch.testing.assert_close(from_strings, model.encode_text(store.get(ids)), atol=1e-5, rtol=1e-5)
    from PIL import Image

    images = [Image.open(out / "data" / "images" / i) for i in ids]
    vision = FeatureStore(out / "features" / "train_images")
    torch.testing.assert_close(model.encode_image(images), model.encode_image(vision.get(ids)), atol=1e-4, rtol=1e-4)
    clf = model.zero_shot_classifier(["red circle", "blue square"], ["A photo of a {}", "a {} shape"])
    assert clf.shape == (2, 48)
    torch.testing.assert_close(clf.norm(dim=-1), torch.ones(2))
    single = model.zero_shot_classifier(["red circle"])
    torch.testing.assert_close(single, model.encode_text(["A photo of a red circle"]))


@pytest.mark.slow
def test_eval_with_precomputed_template_ensemble_and_other_language(demo_out, tmp_path):
    out, _ = demo_out
    test_store = FeatureStore(out / "features" / "test_images")
    names_file = out / "data" / "class_names.json"
    # class prompts precomputed by the features CLI, with a 2-template ensemble (ids t/c)
    spec = json.loads((out / "run" / "checkpoints" / "best" / "meta.json").read_text())["backbones"]["text"]
    templates_file = tmp_path / "templates.json"
    templates_file.write_text(json.dumps(["A photo of a {}", "a photo of a {}"]))  # same tokens (lowercased)
    ordered = tmp_path / "names.json"
    ordered.write_text(
        json.dumps([json.loads(names_file.read_text())[c] for c in test_store.meta["source"]["classes"]])
    )
    precompute.main(
        ["modality=text", "source.type=classnames", f"source.path={ordered}", f"source.template={templates_file}"]
        + [f"language.model={spec['model']}", f"out={tmp_path / 'prompts'}"]
    )
    assert sorted(FeatureStore(tmp_path / "prompts").ids)[:2] == ["0/0", "0/1"]
    direct = evaluate.main([f"checkpoint={out / 'run'}", f"features={out / 'features' / 'test_images'}",
                            f"class_names={names_file}", f"out={tmp_path / 'e1'}"])  # fmt: skip
    ens = evaluate.main([f"checkpoint={out / 'run'}", f"features={out / 'features' / 'test_images'}",
                         f"class_features={tmp_path / 'prompts'}", f"out={tmp_path / 'e2'}"])  # fmt: skip
    # identical prompts after lowercasing: the 2-template ensemble equals the single reference template
    assert ens["top1"] == pytest.approx(direct["top1"]) and ens["top5"] == pytest.approx(direct["top5"])
    # class names in another language (UTF-8) go through the same path; unknown words map to <unk>
    chinese = tmp_path / "zh.json"
    chinese.write_text(
        json.dumps({f: f"红色 {i}" for i, f in enumerate(test_store.meta["source"]["classes"])}, ensure_ascii=False)
    )
    zh = evaluate.main([f"checkpoint={out / 'run'}", f"features={out / 'features' / 'test_images'}",
                        f"class_names={chinese}", f"out={tmp_path / 'e3'}"])  # fmt: skip
    assert 0 <= zh["top1"] <= 100
    # raw images through the checkpoint's recorded vision backbone give the same numbers as the cached features
    raw = evaluate.main([f"checkpoint={out / 'run'}", f"images={out / 'data' / 'test'}", f"class_names={names_file}",
                         f"out={tmp_path / 'e4'}", "batch_size=16", "num_workers=0"])  # fmt: skip
    assert raw["top1"] == pytest.approx(direct["top1"]) and raw["top5"] == pytest.approx(direct["top5"])
    # class prompts encoded by another language model than the checkpoint's are refused, naming both
    write = FeatureWriter(tmp_path / "other_lm", "other/llm", "text", test_store.dim)
    write.close()
    with pytest.raises(ValueError, match=f"made with model 'other/llm', but '{spec['model']}' was expected"):
        evaluate.main([f"checkpoint={out / 'run'}", f"features={out / 'features' / 'test_images'}",
                       f"class_features={tmp_path / 'other_lm'}", f"out={tmp_path / 'e5'}"])  # fmt: skip
    with pytest.raises(ValueError, match="set class_names=FILE or class_features=STORE"):
        evaluate.main([f"checkpoint={out / 'run'}", f"features={out / 'features' / 'test_images'}"])


@pytest.mark.slow
def test_probe_class_disjoint(demo_out, tmp_path):
    out, _ = demo_out
    names = json.loads((out / "data" / "class_names.json").read_text())
    splits = tmp_path / "splits.json"
    test_classes = ["yellow circle", "green square"]
    splits.write_text(json.dumps({"train": [c for c in CLASSES if c not in test_classes], "test": test_classes}))
    spec = json.loads((out / "run" / "checkpoints" / "best" / "meta.json").read_text())["backbones"]["text"]
    result = probe.main(
        [f"probe.features={out / 'features' / 'test_images'}", f"probe.class_names={out / 'data' / 'class_names.json'}"]
        + [f"probe.splits={splits}", f"language.model={spec['model']}", f"run_dir={tmp_path / 'run'}"]
        + ["model.hidden_dim=32", "optim.batch_size=8", "optim.max_steps=20", "optim.warmup_steps=2"]
        + ["val_check_interval=10", "data.val_size=4"]
    )
    assert result["n_test_classes"] == 2 and result["chance_top1"] == 50.0
    # the resolved config is written to the run directory, as by sharelock-train
    import yaml

    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["probe"]["splits"] == str(splits)
    assert 0 <= result["unseen top1"] <= 100 and result["unseen top5"] == 100.0  # k capped at the 2 test classes
    assert len(names) == 12
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": ["red circle", "blue square"], "test": ["red circle"]}))
    with pytest.raises(ValueError, match=r"classes in both splits: \['red circle'\]"):
        probe.class_split(CLASSES, str(bad), 0.5, 0)
    train_ids, test_ids = probe.class_split(CLASSES, None, 0.25, 0)
    assert len(test_ids) == 3 and not set(train_ids) & set(test_ids) and len(train_ids) + 3 == 12
    assert np.all(np.diff(train_ids) > 0)
    # class names are optional (a store extracted from an hf: dataset records them), the features are not
    with pytest.raises(ValueError, match=r"set probe.features=STORE .* unless the store was extracted from an hf:"):
        probe.main([f"run_dir={tmp_path / 'unused'}"])


@pytest.mark.slow
def test_hf_dataset_eval_equals_the_image_folder_path(demo_out, tmp_path, monkeypatch):
    """The demo's labelled test images as a Hugging Face dataset (rows shuffled, classes in another order, names in a
    ClassLabel, saved with save_to_disk, read offline) give the same features, labels and zero-shot accuracy as the
    ImageFolder + class_names.json path: images, labels and class names come through consistently."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    from torchvision.datasets import ImageFolder

    from sharelock.demo import _spec_args

    out, _ = demo_out
    folder = ImageFolder(str(out / "data" / "test"))
    names = json.loads((out / "data" / "class_names.json").read_text())
    rng = np.random.default_rng(0)
    rows, classes = rng.permutation(len(folder.samples)), rng.permutation(len(folder.classes))
    new_label = {old: new for new, old in enumerate(classes)}
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[names[folder.classes[c]] for c in classes])}
    )
    table = {"image": [], "label": []}
    for r in rows:
        path, label = folder.samples[r]
        table["image"].append({"bytes": open(path, "rb").read(), "path": None})
        table["label"].append(new_label[label])
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(
        str(tmp_path / "shapes")
    )
    hf = f"hf:{tmp_path / 'shapes'}"
    meta = json.loads((out / "run" / "checkpoints" / "best" / "meta.json").read_text())["backbones"]
    precompute.main(
        ["modality=image", "source.type=labelled", f"source.path={hf}:test", f"out={tmp_path / 'store'}"]
        + [*_spec_args("vision", meta["vision"]), "num_workers=0", "batch_size=16"]
    )
    ref, store = FeatureStore(out / "features" / "test_images"), FeatureStore(tmp_path / "store")
    ids = [str(i) for i in range(len(rows))]
    torch.testing.assert_close(store.get(ids), ref.get([str(r) for r in rows]), atol=1e-5, rtol=1e-5)
    hf_labels = [int(store.labels[store.ids.index(i)]) for i in ids]
    ref_labels = [int(ref.labels[ref.ids.index(str(r))]) for r in rows]
    assert [classes[label] for label in hf_labels] == ref_labels
    assert store.meta["source"]["classes"] == features["label"].names

    run = [f"checkpoint={out / 'run'}"]
    direct = evaluate.main(
        [*run, f"features={ref.path}", f"class_names={out / 'data' / 'class_names.json'}", f"out={tmp_path / 'e0'}"]
    )
    # a store extracted from an hf: dataset: class names from its ClassLabel, no class_names= needed
    from_store = evaluate.main([*run, f"features={store.path}", f"out={tmp_path / 'e1'}"])
    # raw images straight from the dataset (split= for a spec without one), names given as hf:
    from_images = evaluate.main(
        [*run, f"images={hf}", "split=test", f"class_names={hf}", f"out={tmp_path / 'e2'}", "num_workers=0"]
    )
    # the ImageFolder read by `datasets` (imagefolder builder: one `train` split), names keyed by folder
    via_datasets = evaluate.main(
        [*run, f"images=hf:{out / 'data' / 'test'}:train", f"class_names={out / 'data' / 'class_names.json'}"]
        + [f"out={tmp_path / 'e3'}", "num_workers=0"]
    )
    assert from_images["dataset"] == "shapes-test" and direct["n"] == from_store["n"] == via_datasets["n"] == 48
    for result in (from_store, from_images, via_datasets):
        assert result["top1"] == pytest.approx(direct["top1"]) and result["top5"] == pytest.approx(direct["top5"])
    assert direct["top1"] > 3 * 100 / len(CLASSES)  # a trained model, so a wrong class order would show

    # sharelock-probe on that store: the recorded ClassLabel names serve as class_names=, as given explicitly
    common = [f"probe.features={store.path}", f"language.model={meta['text']['model']}", "model.hidden_dim=32"]
    common += ["optim.batch_size=8", "optim.max_steps=4", "optim.warmup_steps=1", "data.val_size=4"]
    recorded = probe.main([*common, f"run_dir={tmp_path / 'p0'}"])
    explicit = probe.main([*common, f"probe.class_names={hf}:test", f"run_dir={tmp_path / 'p1'}"])
    assert recorded["n_test_classes"] == explicit["n_test_classes"] > 0
    assert recorded["unseen top1"] == explicit["unseen top1"] and recorded["unseen top5"] == explicit["unseen top5"]
    with pytest.raises(ValueError, match="no label column 'fine'"):  # probe.label_column reaches the hf: names
        probe.main([*common, f"probe.class_names={hf}:test", "probe.label_column=fine", f"run_dir={tmp_path / 'p3'}"])
    with pytest.raises(ValueError, match="set probe.class_names=FILE"):
        probe.main([f"probe.features={ref.path}", f"run_dir={tmp_path / 'p2'}"])  # an ImageFolder store


def test_eval_checks_class_names_and_templates_before_loading_or_encoding(demo_out, tmp_path, monkeypatch):
    """Labels without class names, a template without the class placeholder, or a class-name count that does not
    match are reported before the checkpoint's models are loaded and before any image is encoded."""
    out, _ = demo_out

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(evaluate, "load_model", no_model)
    run = [f"checkpoint={out / 'run'}", f"out={tmp_path / 'e'}", "num_workers=0"]
    store = [f"features={out / 'features' / 'test_images'}", f"class_names={out / 'data' / 'class_names.json'}"]
    (tmp_path / "t.txt").write_text("a photo\n")
    with pytest.raises(ValueError, match="each template needs the class-name placeholder"):
        evaluate.main([*run, *store, f"templates={tmp_path / 't.txt'}"])
    (tmp_path / "names.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="2 class names but the dataset has 12 class folders"):
        evaluate.main([*run, f"images={out / 'data' / 'test'}", f"class_names={tmp_path / 'names.txt'}"])
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    plain = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    image = {"bytes": next((out / "data" / "test").glob("*/*")).read_bytes(), "path": None}
    datasets.Dataset.from_dict({"image": [image] * 2, "label": [0, 1]}, features=plain).save_to_disk(
        str(tmp_path / "plain")
    )
    with pytest.raises(ValueError, match="has no class names \\(its label column is not a ClassLabel\\)"):
        evaluate.main([*run, f"images=hf:{tmp_path / 'plain'}"])


@pytest.mark.slow
def test_winoground_equals_a_per_example_reference(demo_out, tmp_path, monkeypatch):
    """sharelock-winoground on a release-layout folder built from the demo's test images (caption k names image k's
    class) equals a per-example loop through the Python API with the definitions written out; swapping both pairs
    of every example changes nothing, and the same examples read from a Hugging Face dataset give the same scores."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from sharelock import winoground

    out, _ = demo_out
    folder = ImageFolder(str(out / "data" / "test"))
    names = json.loads((out / "data" / "class_names.json").read_text())
    order = np.random.default_rng(0).permutation(len(folder.samples))
    pairs = [(a, b) for a, b in zip(order[0::2], order[1::2]) if folder.samples[a][1] != folder.samples[b][1]]
    data = tmp_path / "wino" / "data"
    (data / "images").mkdir(parents=True)
    records = []
    for n, pair in enumerate(pairs[:12]):
        rec = {"id": n, "collapsed_tag": ("Object", "Relation")[n % 2]}
        for k, index in enumerate(pair):
            path, label = folder.samples[index]
            Image.open(path).convert("RGB").save(data / "images" / f"ex_{n}_img_{k}.png")
            rec |= {f"image_{k}": f"ex_{n}_img_{k}", f"caption_{k}": f"a photo of a {names[folder.classes[label]]}"}
        if n % 3 == 0:  # a caption naming neither image's class: not every example is solved
            other = next(c for c in folder.classes if names[c] not in rec["caption_0"] + rec["caption_1"])
            rec["caption_1"] = f"a photo of a {names[other]}"
        records.append(rec)
    (data / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    run = [f"checkpoint={out / 'run'}"]
    result = winoground.main([*run, f"data={tmp_path / 'wino'}", f"out={tmp_path / 'e0'}"])
    assert json.loads((tmp_path / "e0" / "metrics.json").read_text()) == json.loads(json.dumps(result))
    rows = [json.loads(line) for line in (tmp_path / "e0" / "per_example.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(12)) and rows[1]["tag"] == "Relation"

    model = load_model(out / "run", load_backbones=True)
    hits = {"text": [], "image": [], "group": []}
    for rec in records:
        img = model.encode_image([Image.open(data / "images" / f"{rec[f'image_{k}']}.png") for k in (0, 1)])
        f = (model.encode_text([rec["caption_0"], rec["caption_1"]]) @ img.T).tolist()  # f[caption][image]
        hits["text"].append(f[0][0] > f[1][0] and f[1][1] > f[0][1])
        hits["image"].append(f[0][0] > f[0][1] and f[1][1] > f[1][0])
        hits["group"].append(hits["text"][-1] and hits["image"][-1])
        row = rows[rec["id"]]
        assert np.allclose(row["sim"], f, atol=1e-5) and [row[k] for k in hits] == [v[-1] for v in hits.values()]
    assert result["n"] == 12 and result["per_tag"]["Object"]["n"] == 6
    for key, values in hits.items():
        assert result[key] == pytest.approx(100 * np.mean(values))
        assert result["per_tag"]["Object"][key] == pytest.approx(100 * np.mean(values[0::2]))
    assert result["group"] > 25  # a trained model on class-name captions: above chance (16.7 %)

    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "images").symlink_to(data / "images")
    flip = [
        {**r, **{f"{kind}_{k}": r[f"{kind}_{1 - k}"] for kind in ("image", "caption") for k in (0, 1)}} for r in records
    ]
    (swapped / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in flip))
    again = winoground.main([*run, f"data={swapped}", f"out={tmp_path / 'e1'}"])
    assert {k: again[k] for k in hits} == {k: result[k] for k in hits}

    columns = {key: [] for key in ("image_0", "image_1", "caption_0", "caption_1", "collapsed_tag")}
    for rec in records:
        for k in (0, 1):
            columns[f"image_{k}"].append({"bytes": (data / "images" / f"{rec[f'image_{k}']}.png").read_bytes()})
            columns[f"caption_{k}"].append(rec[f"caption_{k}"])
        columns["collapsed_tag"].append(rec["collapsed_tag"])
    features = datasets.Features(
        {**{f"image_{k}": datasets.Image() for k in (0, 1)}, **{k: datasets.Value("string") for k in list(columns)[2:]}}
    )
    columns["id"], features["id"] = [100 + r["id"] for r in records], datasets.Value("int32")  # the Hub's id column
    table = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "hf"))
    from_hf = winoground.main([*run, f"data=hf:{tmp_path / 'hf'}", f"out={tmp_path / 'e2'}"])
    assert {k: from_hf[k] for k in (*hits, "n", "per_tag")} == {k: result[k] for k in (*hits, "n", "per_tag")}
    hf_rows = [json.loads(line) for line in (tmp_path / "e2" / "per_example.jsonl").read_text().splitlines()]
    assert [r["id"] for r in hf_rows] == [100 + n for n in range(12)]

    # language_model= replaces the checkpoint's LLM: the builder gets it (a copy of the recorded one: same scores),
    # and a folder that does not exist is an error naming it
    import shutil

    from sharelock import features

    recorded = json.loads((out / "run" / "checkpoints" / "best" / "meta.json").read_text())["backbones"]["text"]
    copy = shutil.copytree(recorded["model"], tmp_path / "llm-copy")
    seen, build = [], features.build_language_encoder
    monkeypatch.setattr(
        features, "build_language_encoder", lambda spec, device: seen.append(spec) or build(spec, device)
    )
    same = winoground.main([*run, f"data={tmp_path / 'wino'}", f"language_model={copy}", f"out={tmp_path / 'e3'}"])
    assert [s["model"] for s in seen] == [str(copy)] and {k: same[k] for k in hits} == {k: result[k] for k in hits}
    with pytest.raises(FileNotFoundError, match="language model .*llm-missing"):
        winoground.main(
            [*run, f"data={tmp_path / 'wino'}", f"language_model={tmp_path / 'llm-missing'}", f"out={tmp_path / 'e4'}"]
        )
