import json

import numpy as np
import pytest
import torch

from sharelock.store import FeatureStore, FeatureWriter, same_model


def make_store(path, n=23, dim=5, shard_size=7, model="m", dtype="float32", labels=True):
    feats = np.arange(n * dim, dtype=np.float32).reshape(n, dim) / 10
    ids = [f"id{i:03d}" for i in range(n)]
    with FeatureWriter(path, model, "image", dim, dtype=dtype, shard_size=shard_size) as w:
        for start in range(0, n, 4):  # batches that do not align with shards
            w.add(
                ids[start : start + 4],
                feats[start : start + 4],
                list(range(start, min(n, start + 4))) if labels else None,
            )
    return ids, feats


def test_round_trip_random_reads(tmp_path):
    ids, feats = make_store(tmp_path / "s")
    store = FeatureStore(tmp_path / "s", model="m", modality="image")
    assert len(store) == 23 and store.dim == 5 and store.ids == ids
    assert len(list((tmp_path / "s").glob("shard_*.npy"))) == 4  # 7 + 7 + 7 + 2 rows
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 23, size=50)  # random order with repeats
    np.testing.assert_array_equal(store.rows(rows).numpy(), feats[rows])
    pick = [ids[i] for i in rows]
    np.testing.assert_array_equal(store.get(pick).numpy(), feats[rows])
    np.testing.assert_array_equal(store.load_all().numpy(), feats)
    np.testing.assert_array_equal(store.labels, np.arange(23))
    mem = FeatureStore(tmp_path / "s", in_memory=True)
    np.testing.assert_array_equal(mem.rows(rows).numpy(), feats[rows])
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert meta["model"] == "m" and meta["dim"] == 5 and meta["dtype"] == "float32"


def test_float16_store(tmp_path):
    _, feats = make_store(tmp_path / "h", dtype="float16", labels=False)
    store = FeatureStore(tmp_path / "h")
    out = store.load_all()
    assert out.dtype == torch.float32 and store.labels is None
    np.testing.assert_allclose(out.numpy(), feats.astype(np.float16).astype(np.float32))


def test_errors_name_both_models_and_missing_ids(tmp_path):
    make_store(tmp_path / "s", model="dinov2")
    with pytest.raises(ValueError, match=r"made with model 'dinov2', but 'llama' was expected"):
        FeatureStore(tmp_path / "s", model="llama")
    with pytest.raises(ValueError, match="holds image features, but text"):
        FeatureStore(tmp_path / "s", modality="text")
    with pytest.raises(ValueError, match="made with model 'dinov2'"):
        FeatureWriter(tmp_path / "s", "other", "image", 5)
    store = FeatureStore(tmp_path / "s")
    with pytest.raises(KeyError, match=r"lacks 2 of 3 requested ids \(required by captions\).*nope"):
        store.positions(["id001", "nope", "nada"], other="captions")
    with pytest.raises(FileNotFoundError, match="no feature store at"):
        FeatureStore(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"expected features of shape \(2, 5\)"):
        FeatureWriter(tmp_path / "s", "dinov2", "image", 5).add(["a", "b"], np.zeros((2, 4)))


def test_hub_id_and_local_folder_of_one_model_match(tmp_path, caplog):
    assert same_model("meta-llama/Meta-Llama-3-8B", "/models/Meta-Llama-3-8B/")
    assert same_model("/a/Meta-Llama-3-8B", "/b/meta-llama-3-8b") and same_model("m", "m")
    assert not same_model("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-70B")
    assert not same_model("/models/llama", "/models/llama2")
    # vision stores with local checkpoints: other weights that happen to share the file name
    assert not same_model("vit_base_patch16_224.dino@/ckpt/a/model.safetensors", "vit_b@/ckpt/b/model.safetensors")
    assert not same_model("vit_b@/runs/1/model.pth", "vit_b@/runs/2/model.pth")
    make_store(tmp_path / "s", model="meta-llama/Meta-Llama-3-8B")
    with caplog.at_level("WARNING"):
        assert FeatureStore(tmp_path / "s", model="/models/Meta-Llama-3-8B").model == "meta-llama/Meta-Llama-3-8B"
    assert "the same model" in caplog.text
    with pytest.raises(ValueError, match="made with model 'meta-llama/Meta-Llama-3-8B', but '/models/llama3'"):
        FeatureStore(tmp_path / "s", model="/models/llama3")


def test_resume_skips_done_and_ignores_incomplete_shards(tmp_path):
    path = tmp_path / "r"
    feats = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    w = FeatureWriter(path, "m", "text", 3, shard_size=4)
    w.add([str(i) for i in range(6)], feats[:6])  # one full shard written, 2 rows buffered
    del w  # "killed": the buffered rows are lost
    (path / "shard_r000_000009.npy").write_bytes(b"garbage")  # a shard whose id list never got written
    w = FeatureWriter(path, "m", "text", 3, shard_size=4)
    assert w.done == {"0", "1", "2", "3"}
    todo = [i for i in range(10) if str(i) not in w.done]
    w.add([str(i) for i in todo], feats[todo])
    w.close()
    store = FeatureStore(path)
    assert sorted(store.ids, key=int) == [str(i) for i in range(10)]
    np.testing.assert_array_equal(store.get([str(i) for i in range(10)]).numpy(), feats)


def test_two_ranks_write_one_store(tmp_path):
    path = tmp_path / "multi"
    feats = np.eye(6, dtype=np.float32)
    for rank in (0, 1):
        with FeatureWriter(path, "m", "image", 6, shard_size=2, rank=rank) as w:
            w.add([str(i) for i in range(rank, 6, 2)], feats[rank::2])
    store = FeatureStore(path)
    np.testing.assert_array_equal(store.get([str(i) for i in range(6)]).numpy(), feats)


def test_appending_with_other_backbone_settings_is_refused(tmp_path):
    spec = {"vision": {"model": "vit", "checkpoint": None, "kwargs": {"img_size": 224}}}
    with FeatureWriter(tmp_path / "s", "vit", "image", 2, backbone=spec) as w:
        w.add(["a"], np.zeros((1, 2)))
    with FeatureWriter(tmp_path / "s", "vit", "image", 2, backbone=json.loads(json.dumps(spec))) as w:  # resume
        assert w.done == {"a"}
    other = {"vision": {"model": "vit", "checkpoint": None, "kwargs": {"dynamic_img_size": True}}}
    with pytest.raises(ValueError, match=r"vision.kwargs.dynamic_img_size: None -> True; vision.kwargs.img_size: 224"):
        FeatureWriter(tmp_path / "s", "vit", "image", 2, backbone=other)
