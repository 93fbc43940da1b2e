import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fungi import demo, eval, extract
from fungi.config import parse_overrides, resolve
from fungi.evaluation import evaluate_blocks, few_shot_indices, knn_predict, knn_scores
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
    rows = eval.main([f"features={path}", "protocols=[knn,fewshot]", "k=3", "shots=1", "pca_dim=0"])
    assert len(rows) == 15 and rows[0]["features"] == "embeddings"
    assert json.loads((run / "metrics.json").read_text()) == rows
    assert all(0 <= r["knn_top1"] <= 100 for r in rows)


def test_config_errors_and_overrides():
    assert parse_overrides(["--a.b", "3", "c=[1, 2]", "--quick"]) == (None, {"a": {"b": 3}, "c": [1, 2], "quick": True})
    with pytest.raises(KeyError, match="valid keys"):
        resolve(["--config", "tiny", "dino.tempreature=0.1"], extract.DEFAULTS, None)
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve(["--config", "nope"], extract.DEFAULTS, None)
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["stray"])
    for name in ("paper", "text", "audio", "tiny"):
        cfg = resolve(["--config", name], extract.DEFAULTS, None)
        assert cfg["kl"]["temperature"] == 15.0  # paper default everywhere
    with pytest.raises(ValueError, match=r"unknown split 'val'.*\['train', 'test'\]"):
        extract.main(["--config", "tiny", "splits=[train,val]", "run_dir=unused"])
    with pytest.raises(ValueError, match="protocols"):
        eval.main(["features=x.safetensors", "protocols=[knn,svm]"])


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


def test_demo_quick(tmp_path):
    summary = demo.main(["--out", str(tmp_path), "--quick"])
    assert (tmp_path / "knn_digits.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert 0 <= summary["kNN top-1 embeddings+FUNGI (%)"] <= 100


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_keys_and_exits_0(flag, capsys):
    from fungi import hummingbird

    for main in (extract.main, eval.main, hummingbird.main):
        with pytest.raises(SystemExit) as exc:
            main([flag])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "pca_dim = 512" in out and "shipped configs:" in out and "hummingbird_tiny" in out


def test_extract_reports_missing_data_before_fetching_weights(tmp_path, offline_hub):
    root = tmp_path / "flowers"
    with pytest.raises(FileNotFoundError, match=str(root / "train")):
        extract.main(["--config", "paper", f"data.root={root}", f"run_dir={tmp_path / 'run'}"])
    (root / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / "0.png")
    with pytest.raises(FileNotFoundError, match="model=timm:vit_base_patch16_224.dino"):
        extract.main(["--config", "paper", f"data.root={root}", "data.test_split=train", f"run_dir={tmp_path / 'run'}"])
