import json

import numpy as np
import pytest
import torch

from fungi import hummingbird
from fungi.patches import PatchFUNGI


def test_hummingbird_cli_scores_tokens_and_fungi_with_the_token_memory_as_support(tmp_path, monkeypatch):
    seen = []
    original = PatchFUNGI.set_memory

    def spy(self, features):
        seen.append(features.clone())
        original(self, features)

    monkeypatch.setattr(PatchFUNGI, "set_memory", spy)
    rows = hummingbird.main(["--config", "hummingbird_tiny", f"run_dir={tmp_path}"])
    assert [r["features"] for r in rows] == ["embeddings", "embeddings + FUNGI"]
    # the support bank is the plain-token memory: one row per memory row, token width 48
    assert len(seen) == 1 and seen[0].shape == (rows[0]["memory_rows"], 48)
    assert rows[0]["memory_rows"] == rows[1]["memory_rows"]
    for row in rows:  # colour-coded synthetic classes: label transfer is far above chance (1/3)
        assert 0.5 < row["miou"] <= 1.0 and len(row["per_class_iou"]) == 3
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["rows"][1]["miou"] == pytest.approx(rows[1]["miou"])


def test_hummingbird_cli_embeddings_only_and_bad_feature_names(tmp_path):
    rows = hummingbird.main(["--config", "hummingbird_tiny", f"run_dir={tmp_path}", "features=[embeddings]"])
    assert [r["features"] for r in rows] == ["embeddings"]
    again = hummingbird.main(["--config", "hummingbird_tiny", f"run_dir={tmp_path}", "features=[embeddings]"])
    assert again[0]["miou"] == rows[0]["miou"]  # seeded: a random-weight model gives the same score twice
    with pytest.raises(ValueError, match="gradients"):
        hummingbird.main(["--config", "hummingbird_tiny", f"run_dir={tmp_path}", "features=[gradients]"])


def test_train_limit_draws_a_seeded_random_subset_as_the_reference():
    # the reference (voc_data.PascalVOCDataModule, num_train_samples) keeps torch.randperm(len(train))[:N], not the
    # first N images of trainaug.txt (all from 2007)
    cfg = dict(hummingbird.DEFAULTS, dataset="synthetic", data_dir=None, train_limit=3, seed=42)
    cfg["dataset_kwargs"] = {"num_images": 6, "image_size": 32, "num_classes": 3}
    train, val = hummingbird.build_datasets(cfg)
    assert len(train) == 3 and len(val) == 6
    expected = torch.randperm(6, generator=torch.Generator().manual_seed(42))[:3].tolist()
    assert list(train.indices) == expected and expected != [0, 1, 2]
    full, _ = hummingbird.build_datasets(dict(cfg, train_limit=None))
    assert np.array_equal(np.asarray(train[2][0]), np.asarray(full[expected[2]][0]))
    other, _ = hummingbird.build_datasets(dict(cfg, seed=0))
    assert list(other.indices) == torch.randperm(6, generator=torch.Generator().manual_seed(0))[:3].tolist()


def test_hummingbird_cli_unavailable_weights_name_the_model(tmp_path, offline_hub):
    with pytest.raises(FileNotFoundError, match="pretrained weights of model=timm:vit_small_patch16_224 not available"):
        hummingbird.main(["--config", "hummingbird_tiny", f"run_dir={tmp_path}", "pretrained=true"])


def test_dataset_kwargs_of_another_dataset_are_a_clear_error():
    cfg = dict(hummingbird.DEFAULTS, dataset="ade20k", data_dir="unused", dataset_kwargs={"num_images": 8})
    with pytest.raises(ValueError, match=r"dataset_kwargs=\{'num_images': 8\} do not apply to dataset='ade20k'"):
        hummingbird.build_datasets(cfg)


def test_hummingbird_layer_is_a_name_inside_the_model_as_in_fungi_extract(tmp_path, monkeypatch):
    layers = []
    original = PatchFUNGI.set_memory

    def spy(self, features):
        layers.append(self.layer)
        original(self, features)

    monkeypatch.setattr(PatchFUNGI, "set_memory", spy)
    args = ["--config", "hummingbird_tiny", f"run_dir={tmp_path}", "features=[fungi]"]
    rows = hummingbird.main(args + ["layer=blocks.0.attn.proj"])  # was: not found in PatchTokens
    assert layers == ["model.blocks.0.attn.proj"] and rows[0]["miou"] > 0.5
    with pytest.raises(ValueError, match=r"^layer 'blocks.9.attn.proj' not found in DinoInterpolationViT"):
        hummingbird.main(args + ["layer=blocks.9.attn.proj"])
