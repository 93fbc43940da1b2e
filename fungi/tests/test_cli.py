import json
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fungi import demo, eval, extract, hummingbird
from fungi.config import parse_overrides, resolve, run_cli
from fungi.evaluation import (
    accuracy_scores,
    concat_blocks,
    evaluate_blocks,
    few_shot_indices,
    fit_pca,
    knn_predict,
    knn_scores,
)
from fungi.runs import load_features

TINY = ["--config", "tiny", "limit=12", "dino.num_local=2", "simclr.stride_scale=2", "simclr.num_negatives=2"]


def test_extract_then_eval_end_to_end(tmp_path):
    run = tmp_path / "run"
    path = extract.main([*TINY, f"run_dir={run}"])
    splits, meta = load_features(path)
    assert set(splits) == {"train", "test"}
    blocks, labels = splits["train"]
    assert set(blocks) == {"embeddings", "kl", "dino", "simclr"} and labels.shape == (12,)
    assert blocks["kl"].shape == (12, 48)
    assert meta["extractor"]["layer"] == "blocks.1.attn.proj"
    assert yaml.safe_load((run / "config.yaml").read_text())["limit"] == 12
    assert (run / "fungi_state.safetensors").is_file() and (run / "log.txt").is_file()
    # a second run reusing the saved state reproduces the features exactly
    again = extract.main(
        [*TINY, f"run_dir={tmp_path / 'again'}", f"state={run / 'fungi_state.safetensors'}", "splits=[test]"]
    )
    assert torch.allclose(load_features(again)[0]["test"][0]["simclr"], splits["test"][0]["simclr"], atol=1e-6)
    # a state is the negatives and prototypes of its model: another one of the same width is refused (was silent)
    other = "model_kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 4}"
    with pytest.raises(ValueError, match=r"written for another model: model_kwargs: saved \{.*'num_heads': 2\}"):
        extract.main([*TINY, f"run_dir={tmp_path / 'other'}", f"state={run / 'fungi_state.safetensors'}", other])
    rows = eval.main([f"features={path}", "protocols=[knn,fewshot]", "k=3", "shots=1", "pca_dim=0"])
    assert len(rows) == 15 and rows[0]["features"] == "embeddings"
    assert json.loads((run / "metrics.json").read_text()) == rows
    assert all(0 <= r["knn_top1"] <= 100 for r in rows)


def test_simclr_negatives_come_from_train_whatever_the_split_order(tmp_path):
    """Negatives from the test split would leak test images into every feature: the order of `splits` must not
    choose them (the bank, hence the SimCLR block, is the same for [test, train] as for [train, test])."""
    assert extract.negatives_split(["queries", "database"]) == "database"
    assert extract.negatives_split(["val", "test", "train"]) == "train" and extract.negatives_split(["test"]) == "test"
    first = load_features(extract.main([*TINY, f"run_dir={tmp_path / 'a'}", "splits=[train,test]"]))[0]
    second = load_features(extract.main([*TINY, f"run_dir={tmp_path / 'b'}", "splits=[test,train]"]))[0]
    for split in ("train", "test"):
        torch.testing.assert_close(second[split][0]["simclr"], first[split][0]["simclr"], rtol=1e-5, atol=1e-6)


def test_extract_then_eval_text_t5(tmp_path, t5_folder):
    """`fungi-extract --config text_t5 model=hf:FOLDER` on a tiny random T5 laid out as t5-small (see conftest)."""
    texts = ["my card was stolen", "how do i top up", "card not working at the shop", "exchange rate for euros"]
    texts += ["top up not working", "rate for my card"]
    for split, rows in (("train", texts), ("test", texts[:2])):  # test: shorter padding than the first train batch
        (tmp_path / f"{split}.tsv").write_text("".join(f"{t}\t{i % 2}\n" for i, t in enumerate(rows)))
    data = [f"data.train_file={tmp_path / 'train.tsv'}", f"data.test_file={tmp_path / 'test.tsv'}"]
    overrides = ["simclr.num_negatives=3", "simclr.num_text_views=3", "batch_size=4", f"run_dir={tmp_path / 'run'}"]
    path = extract.main(["--config", "text_t5", f"model=hf:{t5_folder}", *data, *overrides])
    splits, meta = load_features(path)
    assert meta["extractor"]["layer"] == "model.encoder.block.1.layer.0.SelfAttention.o"
    blocks, labels = splits["train"]
    assert set(blocks) == {"embeddings", "kl", "simclr"} and blocks["simclr"].shape == (6, 32)
    assert labels.tolist() == [0, 1, 0, 1, 0, 1] and set(splits) == {"train", "test"}
    for name, block in splits["test"][0].items():  # the same texts, padded to other lengths in other batches
        torch.testing.assert_close(block, blocks[name][:2], rtol=1e-4, atol=1e-5)
    rows = eval.main([f"features={path}", "protocols=[knn]", "k=3", "pca_dim=0"])
    assert len(rows) == 7 and rows[0]["features"] == "embeddings"


def test_config_errors_and_overrides(tmp_path):
    nested, typed = {"a": {"b": 3}, "c": [1, 2], "quick": True}, {"a.b": "3", "c": "[1, 2]", "quick": "true"}
    assert parse_overrides(["--a.b", "3", "c=[1, 2]", "--quick"]) == (None, nested, typed)
    with pytest.raises(KeyError, match="valid keys") as err:
        resolve(["--config", "tiny", "dino.tempreature=0.1"], extract.DEFAULTS, None)
    # printed unquoted by the console scripts, with the closest keys
    assert str(err.value).startswith(
        "unknown config key 'dino.tempreature' (did you mean dino.teacher_temperature or dino.student_temperature?)"
    )
    # a bare key of a section is pointed to it (difflib alone misses it), from a config file too
    with pytest.raises(KeyError, match=r"^unknown config key 'teacher_temperature' \(did you mean dino.teacher_temp"):
        resolve(["--config", "tiny", "teacher_temperature=0.1"], extract.DEFAULTS, None)
    (tmp_path / "mine.yaml").write_text("dino:\n  num_prototypes: 3\n")
    with pytest.raises(KeyError, match=r"^unknown config key 'dino.num_prototypes' \(did you mean deepcluster.num_pro"):
        resolve(["--config", str(tmp_path / "mine.yaml")], extract.DEFAULTS, None)
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve(["--config", "nope"], extract.DEFAULTS, None)
    assert resolve(["--config", "tiny", "name=2024"], extract.DEFAULTS, None)["name"] == "2024"  # stays a string
    with pytest.raises(ValueError, match=r"^pretrained='flase': expected true or false$"):
        resolve(["--config", "tiny", "pretrained=flase"], extract.DEFAULTS, None)  # a non-empty string: true before
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["stray"])
    for name in ("paper", "text", "text_t5", "audio", "tiny"):
        cfg = resolve(["--config", name], extract.DEFAULTS, None)
        assert cfg["kl"]["temperature"] == 15.0  # paper default everywhere
    with pytest.raises(ValueError, match=r"unknown split 'valid'.*\['train', 'val', 'test'\]"):
        extract.main(["--config", "tiny", "splits=[train,valid]", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"splits=\[val\] but the dataset has no validation split"):
        extract.main(["--config", "tiny", "splits=[val]", f"run_dir={tmp_path}"])  # digits have none
    with pytest.raises(ValueError, match="protocols"):
        eval.main(["features=x.safetensors", "protocols=[knn,svm]"])


def test_command_line_mistakes_are_clear_errors(monkeypatch, tmp_path):
    """Mistakes a user makes on the command line: one ValueError naming the bad value, not a KeyError or traceback."""
    from fungi.models import build_timm
    from fungi.runs import resolve_device

    with pytest.raises(ValueError, match=r"unknown objectives \['foo'\]"):
        extract.main(["--config", "tiny", "objectives=[kl,foo]", f"run_dir={tmp_path}"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device='gpu' is not a torch device"):
        resolve_device("gpu")
    # YAML reads {img_size:32} as a key 'img_size:32' without value: it was silently ignored by timm
    with pytest.raises(ValueError, match="'img_size:32' has no value"):
        parse_overrides(["model_kwargs={img_size:32}"])
    with pytest.raises(ValueError, match="dynamic_img_sise"):
        build_timm("vit_small_patch16_224", pretrained=False, img_size=32, depth=1, dynamic_img_sise=True)


def test_values_of_the_wrong_kind_and_broken_yaml_are_named(tmp_path):
    """A word or list for a number, a bare word for a list or a scalar for a section used to fail deep inside the
    extraction (range() with a str, 'unknown objectives ['k', 'l']'); broken YAML was a yaml traceback."""
    cases = [
        ("batch_size=four", r"^batch_size='four': expected a number \(default 16\)$"),
        ("dino.num_local=[2,3]", r"^dino.num_local=\[2, 3\]: expected a number"),
        ("objectives=kl", r"^objectives='kl': expected a list, e.g. objectives=\[kl\]$"),
        ("dino=3", r"^dino=3: dino is a section; set its keys, e.g. dino.latent_dim=\.\.\.$"),
        ("objectives=[kl,dino", r"^cannot parse '\[kl,dino' as a YAML value: expected ',' or '\]'"),
    ]
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            resolve(["--config", "tiny", override], extract.DEFAULTS, None)
    with pytest.raises(ValueError, match=r"^memory_size='big': expected a number \(default 102400\)$"):
        resolve(["--config", "hummingbird_tiny", "memory_size=big"], hummingbird.DEFAULTS, None)  # null in the config
    cfg = resolve(["--config", "tiny", "limit=null", "kl.temperature=1", "input_size=48"], extract.DEFAULTS, None)
    assert cfg["limit"] is None and cfg["kl"]["temperature"] == 1 and cfg["input_size"] == 48
    (tmp_path / "broken.yaml").write_text("dino: {latent_dim: 8\n")
    with pytest.raises(ValueError, match=r"broken.yaml: not valid YAML \(while parsing a flow mapping"):
        resolve(["--config", str(tmp_path / "broken.yaml")], extract.DEFAULTS, None)


def test_bad_counts_and_run_folders_fail_before_anything_is_written(tmp_path):
    """A failed extraction into an existing run folder used to overwrite its config.yaml first; a batch of 0, k=0 or
    a file as the run folder were tracebacks or scikit-learn's words."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: earlier\n")
    for bad in (["batch_size=0"], ["data.kind=imagefolder", f"data.root={tmp_path / 'nowhere'}"]):
        with pytest.raises((ValueError, FileNotFoundError), match=r"^batch_size=0: expected a positive|nowhere/train"):
            extract.main([*TINY, f"run_dir={run}", *bad])
        assert (run / "config.yaml").read_text() == "name: earlier\n"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file is a file; the run folder \(run_dir, out\) must be a directory"):
        extract.main([*TINY, f"run_dir={tmp_path / 'file'}"])
    with pytest.raises(ValueError, match=r"^k=0: expected a positive integer \(protocols \['fewshot', 'knn'\]\)$"):
        eval.main(["features=x.safetensors", "protocols=[knn]", "k=0"])
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--out", str(tmp_path / "file")])


def test_free_form_mappings_take_new_keys_after_a_config_filled_them():
    """`--config tiny` fills model_kwargs; a further model_kwargs key is still a model argument, not an unknown key."""
    cfg = resolve(["--config", "tiny", "model_kwargs.dynamic_img_size=true"], extract.DEFAULTS, None)
    assert cfg["model_kwargs"] == {
        "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2, "dynamic_img_size": True
    }  # fmt: skip
    with pytest.raises(KeyError, match="dino.latentdim"):  # fixed sections stay strict
        resolve(["--config", "tiny", "dino.latentdim=3"], extract.DEFAULTS, None)


def test_digits_at_another_size_than_a_fixed_size_model_are_a_clear_error(tmp_path):
    """The digits skip the resize: a model built for 64 px fed 32 px digits stopped on timm's AssertionError."""
    run = ["--config", "tiny", "model_kwargs.img_size=64", "limit=4", f"run_dir={tmp_path / 'a'}"]
    with pytest.raises(ValueError, match=r"^data.image_size=32: .* built for 64x64 px; set data.image_size=64"):
        extract.main(run)
    assert not (tmp_path / "a" / "config.yaml").exists()  # refused before the run is recorded
    assert extract.main(run[:-1] + ["data.image_size=64", f"run_dir={tmp_path / 'b'}"]).is_file()
    assert extract.main(run[:-1] + ["model_kwargs.dynamic_img_size=true", f"run_dir={tmp_path / 'c'}"]).is_file()


def test_knn_protocol_matches_brute_force_and_few_shot():
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(30, 5, generator=gen), torch.randn(7, 5, generator=gen)
    labels = torch.arange(30) % 3
    pred = knn_predict(train, labels, test, k=5, pca_dim=None)
    dist = torch.cdist(test.double(), train.double())
    votes = labels[dist.topk(5, largest=False).indices]
    expected = [torch.bincount(v, minlength=3).argmax().item() for v in votes]  # ties -> smallest label, as sklearn
    assert pred.tolist() == expected
    assert few_shot_indices([2, 0, 2, 1, 0, 2, 1], 2).tolist() == [0, 1, 2, 3, 4, 6]


def test_knn_after_pca_matches_an_svd_projection_and_brute_force():
    # PCA fitted on train only: centre with the train mean, keep the top-3 right singular vectors of train
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(40, 6, generator=gen).double(), torch.randn(9, 6, generator=gen).double()
    train[:, 0] *= 5  # a dominant direction, so PCA differs visibly from the raw features
    labels = torch.arange(40) % 4
    mean = train.mean(0)
    _, _, vh = torch.linalg.svd(train - mean, full_matrices=False)
    train_p, test_p = (train - mean) @ vh[:3].T, (test - mean) @ vh[:3].T  # signs do not change distances
    votes = labels[torch.cdist(test_p, train_p).topk(7, largest=False).indices]
    expected = [torch.bincount(v, minlength=4).argmax().item() for v in votes]
    assert knn_predict(train.numpy(), labels.numpy(), test.numpy(), k=7, pca_dim=3).tolist() == expected
    raw = knn_predict(train.numpy(), labels.numpy(), test.numpy(), k=7, pca_dim=None).tolist()
    assert raw != expected  # the case distinguishes projecting from not projecting


def test_pca_is_skipped_unless_it_reduces_as_the_reference():
    """The reference projects only when pca_dim < N and pca_dim < D: at pca_dim == D a full-rank PCA would centre and
    rotate, changing inner-product rankings (retrieval) and the intercept-free linear probe."""
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(20, 6)) + 3.0, rng.normal(size=(5, 6)) + 3.0
    for dim in (6, 20, 30):  # == D, == N, > both: unchanged
        assert all(a is b for a, b in zip(fit_pca(train, test, dim, test), (train, test, test)))
    projected = fit_pca(train, test, 5)
    assert projected[0].shape == (20, 5) and np.allclose(projected[0].mean(0), 0)


def test_knn_auc_for_binary_labels_hand_case():
    # class 0 at 0..3, class 1 at 4..7; with k = 5 the vote shares for class 1 of the test points 1.4, 2.8, 4.3, 6.6
    # are 1/5, 2/5, 3/5, 4/5; labels 0, 1, 0, 1: positive-negative pairs won 3 of 4 -> AUC 75 %
    train = np.arange(8.0)[:, None]
    scores = knn_scores(train, [0] * 4 + [1] * 4, np.array([[1.4], [2.8], [4.3], [6.6]]), [0, 1, 0, 1], 5, None)
    assert scores == pytest.approx({"top1": 50.0, "mean_per_class": 50.0, "auc": 75.0})
    # labels other than 0/1: the larger one is the positive class
    assert knn_scores(train, [3] * 4 + [7] * 4, [[1.4], [2.8], [4.3], [6.6]], [3, 7, 3, 7], 5, None)["auc"] == 75.0
    # multi-class, or a single test class: no AUC
    assert "auc" not in knn_scores(train, [0, 0, 1, 1, 2, 2, 2, 2], train, [0, 0, 1, 1, 2, 2, 2, 2], 3, None)
    assert "auc" not in knn_scores(train, [0] * 4 + [1] * 4, train[:3], [0, 0, 0], 5, None)


def test_knn_auc_matches_brute_force_vote_and_pair_count():
    gen = torch.Generator().manual_seed(3)
    # unit rows, so that evaluate_blocks' L2 normalisation leaves the features as they are
    train = torch.nn.functional.normalize(torch.randn(40, 3, generator=gen, dtype=torch.float64), dim=1)
    test = torch.nn.functional.normalize(torch.randn(25, 3, generator=gen, dtype=torch.float64), dim=1)
    train_labels = (train[:, 0] + 0.5 * torch.randn(40, generator=gen, dtype=torch.float64) > 0).long()
    test_labels = (test[:, 0] > 0).long()
    share = train_labels[torch.cdist(test, train).topk(7, largest=False).indices].double().mean(1)
    pos, neg = share[test_labels == 1], share[test_labels == 0]
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    expected = 100.0 * pairs.mean().item()
    assert knn_scores(train.numpy(), train_labels.numpy(), test.numpy(), test_labels.numpy(), 7, None)["auc"] == (
        pytest.approx(expected)
    )
    blocks = {"embeddings": train}
    rows = evaluate_blocks(blocks, train_labels, {"embeddings": test}, test_labels, ("knn", "fewshot"), 7, None, 6)
    assert rows[0]["knn_auc"] == pytest.approx(expected)
    idx = few_shot_indices(train_labels, 6)  # the few-shot row scores the first 6 images of each class
    assert (
        rows[0]["6shot_auc"]
        == knn_scores(train[idx].numpy(), train_labels[idx], test.numpy(), test_labels, 7, None)["auc"]
    )


def test_accuracy_scores_mean_per_class_is_the_mean_recall():
    # labels [0, 0, 0, 1], predictions [0, 0, 1, 1]: recalls 2/3 and 1 -> 83.3 %; top-1 3/4
    scores = accuracy_scores([0, 0, 0, 1], [0, 0, 1, 1])
    assert scores == pytest.approx({"top1": 75.0, "mean_per_class": 100 * (2 / 3 + 1) / 2})


def test_concat_blocks_normalises_each_block_before_concatenating():
    blocks = {"embeddings": torch.tensor([[3.0, 4.0]]), "kl": torch.tensor([[0.0, 10.0]])}
    torch.testing.assert_close(concat_blocks(blocks, ["kl", "embeddings"]), torch.tensor([[0.0, 1.0, 0.6, 0.8]]))


def test_clustering_row_scores_the_test_split():
    # test: 3 tight groups on the unit circle with labels 0, 1, 2 -> k-means recovers them (NMI = ARI = 100);
    # train: random points with random labels (clustering it would score far lower)
    gen = torch.Generator().manual_seed(0)
    angles = torch.tensor([0.0, 2.1, 4.2]).repeat_interleave(10) + 0.05 * torch.randn(30, generator=gen)
    test = torch.stack([angles.cos(), angles.sin()], 1)
    train = torch.randn(30, 2, generator=gen)
    train_labels, test_labels = torch.randint(0, 3, (30,), generator=gen), torch.arange(3).repeat_interleave(10)
    rows = evaluate_blocks({"embeddings": train}, train_labels, {"embeddings": test}, test_labels, ("clustering",))
    assert rows[0]["kmeans_nmi"] == pytest.approx(100.0) and rows[0]["kmeans_ari"] == pytest.approx(100.0)


def test_demo_quick(tmp_path):
    summary = demo.main(["--out", str(tmp_path), "--quick"])
    assert (tmp_path / "knn_digits.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert 0 <= summary["kNN top-1 embeddings+FUNGI (%)"] <= 100


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_keys_and_exits_0(flag, capsys, monkeypatch):
    from fungi import hummingbird

    monkeypatch.setattr(sys, "argv", ["/venv/bin/fungi-eval", flag])  # the usage line names the command

    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # a console script, not `python -m`
    with pytest.raises(SystemExit):
        eval.main([flag])
    assert capsys.readouterr().out.startswith("usage: fungi-eval [--config NAME|PATH]")

    for main in (extract.main, eval.main, hummingbird.main):
        with pytest.raises(SystemExit) as exc:
            main([flag])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "pca_dim = 512" in out and "shipped configs:" in out and "hummingbird_tiny" in out


def test_rerun_into_the_same_run_folder_replaces_the_state(tmp_path):
    """A second extraction into a run folder saves its own state: reusing it reproduces that run's features."""
    run = tmp_path / "run"
    extract.main([*TINY, f"run_dir={run}", "seed=1"])
    path = extract.main([*TINY, f"run_dir={run}", "seed=2"])
    state = f"state={run / 'fungi_state.safetensors'}"
    again = extract.main([*TINY, f"run_dir={tmp_path / 'again'}", state, "seed=2"])  # seed: the random backbone
    new, old = load_features(path)[0]["test"][0]["simclr"], load_features(again)[0]["test"][0]["simclr"]
    assert torch.allclose(old, new, atol=1e-6)


def test_extract_reports_missing_data_before_fetching_weights(tmp_path, offline_hub):
    root = tmp_path / "flowers"
    with pytest.raises(FileNotFoundError, match=str(root / "train")):
        extract.main(["--config", "paper", f"data.root={root}", f"run_dir={tmp_path / 'run'}"])
    assert "no validation split" not in (tmp_path / "run" / "log.txt").read_text()  # no dataset: nothing to say of val
    (root / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / "0.png")
    with pytest.raises(FileNotFoundError, match="model=timm:vit_base_patch16_224.dino"):
        extract.main(["--config", "paper", f"data.root={root}", "data.test_split=train", f"run_dir={tmp_path / 'run'}"])


def make_colour_folders(root, counts, seed=0):
    """<root>/<split>/<class>/<i>.png: 16 px images around a grey tinted per class (red, green, blue) with pixel noise
    larger than the tint, so that the classes overlap and the lambdas of the paper's grid score differently."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c, colour in zip("abc", ((130, 110, 110), (110, 130, 110), (110, 110, 130))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 100, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_linear_probe_lambda_is_chosen_on_the_validation_split_end_to_end(tmp_path, monkeypatch):
    """An ImageFolder with train / val / test folders: fungi-extract writes the 'val' split, and fungi-eval's linear
    probe chooses lambda on it (features projected with the PCA fitted on train only), then fits on train only."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    import funai_common.linear
    from fungi.evaluation import PAPER_LINEAR_PROBE
    from fungi.runs import save_features

    root, run = tmp_path / "colours", tmp_path / "run"
    make_colour_folders(root, {"train": 4, "val": 3, "test": 2})
    data = [f"data.root={root}", "data.kind=imagefolder", "data.test_split=test"]
    path = extract.main([*TINY, *data, f"run_dir={run}"])
    splits, meta = load_features(path)
    assert {s: len(splits[s][1]) for s in splits} == {"train": 12, "val": 9, "test": 6}
    assert meta["config"]["data"]["val_split"] == "val" and meta["config"]["splits"] == ["train", "val", "test"]
    assert splits["val"][1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # splits=[train,test]: no val extracted, and the recorded config says so
    _, skipped = load_features(extract.main([*TINY, *data, "splits=[train,test]", f"run_dir={tmp_path / 'tt'}"]))
    assert skipped["config"]["data"]["val_split"] is None and skipped["config"]["splits"] == ["train", "test"]

    calls = []
    probe = funai_common.linear.linear_probe
    monkeypatch.setattr(funai_common.linear, "linear_probe", lambda *a, **kw: calls.append(kw) or probe(*a, **kw))
    rows = eval.main([f"features={path}", "protocols=[linear]", "pca_dim=4", "incremental=true"])

    def features(split):  # the 'embeddings' row: L2-normalised embeddings
        return torch.nn.functional.normalize(splits[split][0]["embeddings"], dim=1).numpy().astype(np.float64)

    (x_train, y_train), (x_val, y_val) = [(features(s), splits[s][1].numpy()) for s in ("train", "val")]
    pca = PCA(4, svd_solver="full", random_state=42).fit(x_train)
    tr, va, te = pca.transform(x_train), pca.transform(x_val), pca.transform(features("test"))
    assert np.allclose(calls[0]["val_features"], va, atol=1e-5) and calls[0]["val_labels"].tolist() == y_val.tolist()
    joint = PCA(4, svd_solver="full", random_state=42).fit(np.concatenate([x_train, x_val]))
    assert not np.allclose(calls[0]["val_features"], joint.transform(x_val), atol=1e-3)  # train only, not train+val
    fit = dict(fit_intercept=False, tol=1e-3, max_iter=300, random_state=0)
    lambdas = PAPER_LINEAR_PROBE["lambdas"]
    val_top1 = [LogisticRegression(C=1 / (12 * lam), **fit).fit(tr, y_train).score(va, y_val) for lam in lambdas]
    chosen = lambdas[int(np.argmax(val_top1))]
    assert rows[0]["features"] == "embeddings" and rows[0]["linear_lambda"] == chosen
    final = LogisticRegression(C=1 / (12 * chosen), **fit).fit(tr, y_train)  # train only: val never enters the fit
    assert rows[0]["linear_top1"] == pytest.approx(100 * (final.predict(te) == splits["test"][1].numpy()).mean())
    assert len(rows) == 4 and all("linear_lambda" in r for r in rows)
    assert "lambda chosen on split 'val' (9 items), then fitted on 'train' only" in (run / "log.txt").read_text()

    # a features file with train and test only (extracted before val splits existed): the 80/20 split of train
    old = tmp_path / "old" / "features.safetensors"
    old.parent.mkdir()
    save_features(old, {s: splits[s] for s in ("train", "test")}, meta)
    calls.clear()
    assert eval.main([f"features={old}", "protocols=[linear]", "pca_dim=4"])[0]["linear_top1"] >= 0
    assert all("val_features" not in kw for kw in calls) and len(calls) == 4
    assert "lambda chosen on an 80/20 split of 'train'" in (old.parent / "log.txt").read_text()
    with pytest.raises(KeyError, match=r"split 'dev' not in .*available: \['test', 'train'\]"):
        eval.main([f"features={old}", "val_split=dev"])
    with pytest.raises(ValueError, match="val_split='test' is also the train or test split"):
        eval.main([f"features={path}", "val_split=test"])


def test_an_impossible_lambda_split_is_reported_before_any_work(tmp_path):
    """10 classes of 4 training items: the stratified 20 % part (8 items) cannot hold each class, an error from
    scikit-learn that came after the k-NN rows; now reported first, naming the ways out, and nothing is written."""
    from fungi.evaluation import check_lambda_split
    from fungi.runs import save_features

    labels = torch.arange(40) % 10
    blocks = {"embeddings": torch.randn(40, 6, generator=torch.Generator().manual_seed(0))}
    path = tmp_path / "run" / "features.safetensors"
    path.parent.mkdir()
    test = ({k: v.clone() for k, v in blocks.items()}, labels.clone())
    save_features(path, {"train": (blocks, labels), "test": test}, {})
    with pytest.raises(ValueError, match=r"20% split of 40 training items .* set linear_C=VALUE, or extract a valid"):
        eval.main([f"features={path}", "protocols=[knn,linear]"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["features.safetensors"]
    rows = eval.main([f"features={path}", "protocols=[linear]", "linear_C=1.0"])  # no search: no split needed
    assert rows[0]["linear_top1"] >= 0
    check_lambda_split(torch.arange(50) % 10)  # 10 validation items for 10 classes: possible
    check_lambda_split([0, 0, 1, 2, 3])  # a class with one item: linear_probe does not stratify


def test_features_file_round_trip(tmp_path):
    from fungi.runs import save_features

    gen = torch.Generator().manual_seed(0)
    splits = {
        "train": (
            {"embeddings": torch.randn(3, 4, generator=gen), "kl": torch.randn(3, 4, generator=gen)},
            torch.tensor([2, 0, 1]),
        ),
        "test": (
            {"embeddings": torch.randn(2, 4, generator=gen), "kl": torch.randn(2, 4, generator=gen)},
            torch.tensor([1, 1]),
        ),
    }
    save_features(tmp_path / "f.safetensors", splits, {"config": {"seed": 3}})
    loaded, meta = load_features(tmp_path / "f.safetensors")
    assert meta == {"config": {"seed": 3}} and sorted(loaded) == ["test", "train"]
    for split, (blocks, labels) in splits.items():
        assert loaded[split][1].dtype == torch.long and torch.equal(loaded[split][1], labels)
        assert sorted(loaded[split][0]) == ["embeddings", "kl"]
        for name, value in blocks.items():
            assert torch.equal(loaded[split][0][name], value), (split, name)


def test_features_file_errors_name_the_file_and_what_is_wrong(tmp_path):
    from safetensors.torch import save_file

    def write(name, tensors):
        save_file(tensors, str(tmp_path / name))
        return tmp_path / name

    rows = {"train/embeddings": torch.zeros(3, 4), "train/labels": torch.zeros(3), "test/labels": torch.zeros(2)}
    cases = [
        ({"features": torch.zeros(3, 4), "labels": torch.zeros(3)}, r"key 'features' is not '<split>/<block>'"),
        (
            {**rows, "test/embeddings": torch.zeros(2, 5)},
            r"t\w+/embeddings has [45] dimensions but t\w+/embeddings has [45]: the splits come from different",
        ),
        ({**rows, "test/embeddings": torch.zeros(3, 4)}, r"test/embeddings has shape \(3, 4\), expected \(2, D\)"),
        ({"train/embeddings": torch.zeros(3, 4)}, r"split 'train' has no train/labels"),
    ]
    for i, (tensors, message) in enumerate(cases):
        with pytest.raises(ValueError, match=rf"f{i}.safetensors: {message}"):
            load_features(write(f"f{i}.safetensors", tensors))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "f0.safetensors").read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cut.safetensors is not a readable safetensors file \(.+\): truncated"):
        load_features(tmp_path / "cut.safetensors")


def test_run_cli_errors_are_one_line_and_a_missing_key_has_no_quotes(tmp_path):
    def raising(err):
        def main():
            raise err

        return main

    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(KeyError("checkpoint c.safetensors lacks head.weight")), "fungi-eval")
    assert exit_.value.code == "fungi-eval: error: checkpoint c.safetensors lacks head.weight"
    with pytest.raises(SystemExit) as exit_:
        run_cli(raising(FileNotFoundError(f"{tmp_path / 'x.yaml'} does not exist")), "fungi-eval")
    assert exit_.value.code == f"fungi-eval: error: {tmp_path / 'x.yaml'} does not exist"
    with pytest.raises(ImportError):  # only the errors named: anything else keeps its traceback
        run_cli(raising(ImportError("no module named av")), "fungi-eval")
    with pytest.raises(SystemExit, match="^fungi-eval: error: no module named av$"):
        run_cli(raising(ImportError("no module named av")), "fungi-eval", ImportError)
    worker = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    worker += '  File "w.py", line 1, in f\nValueError: x.jpg is not a readable image\n'
    with pytest.raises(SystemExit) as exit_:  # torch re-raises a worker's error with the worker's traceback
        run_cli(raising(ValueError(worker)), "fungi-eval")
    assert exit_.value.code == "fungi-eval: error: x.jpg is not a readable image"
    assert run_cli(lambda: 3, "fungi-eval") is None
