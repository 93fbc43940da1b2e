import numpy as np
import pytest
import torch

from funai_common.knn import knn_classify, knn_classify_many
from funai_common.search import BACKENDS, nearest_neighbors, resolve_backend


def reference_knn(train_f, train_y, test_f, test_y, k, T, C):
    """The obvious per-sample loop: normalise, sort similarities, vote exp(s/T), rank with ties to small ids."""
    train_f = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
    test_f = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
    top1 = top5 = 0
    for q, y in zip(test_f, test_y):
        sims = train_f @ q
        order = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(C)
        for j in order:
            votes[train_y[j]] += np.exp(sims[j] / T)
        ranking = sorted(range(C), key=lambda c: (-votes[c], c))
        top1 += ranking[0] == y
        top5 += y in ranking[: min(5, k)]
    return 100.0 * top1 / len(test_y), 100.0 * top5 / len(test_y)


def test_hand_computed_case():
    # Two training points per class on the unit circle; the query sits near class 1's points.
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1])
    test = np.array([[0.2, 1.0], [1.0, 0.05]])
    result = knn_classify(train, labels, test, np.array([1, 1]), k=2)
    assert result == {"top1": 50.0, "top5": 100.0}


def test_k_beyond_the_training_set_votes_with_all_and_keeps_the_requested_k():
    # 3 training points of classes 0, 1, 2 and 10 classes: the ranking is 0, 1, 2 (votes), then 3, 4, ... (no vote,
    # smaller index first), so a query of class 3 is a top-5 hit for every k >= 5, though only 3 neighbours exist.
    train = np.eye(3)
    test = np.array([[1.0, 0.2, 0.1]])
    result = knn_classify_many(train, np.arange(3), test, np.array([3]), ks=(2, 10, 20), num_classes=10)
    assert sorted(result) == [2, 10, 20]
    assert result[2] == {"top1": 0.0, "top5": 0.0}  # top-5 window is min(5, k) = 2 classes: 0, 1
    assert result[10] == result[20] == {"top1": 0.0, "top5": 100.0}
    assert reference_knn(train, np.arange(3), test, [3], 20, 0.07, 10) == (0.0, 100.0)


def test_ties_go_to_smaller_class_index():
    # One neighbour (k=1) of class 3 out of 6 classes: classes without votes rank in index order 0, 1, 2, 4, 5.
    train = np.eye(4)[[0, 1]]
    labels = np.array([3, 5])
    test = np.array([[1.0, 0.0, 0.0, 0.0]])
    assert knn_classify(train, labels, test, np.array([3]), k=1, num_classes=6)["top1"] == 100.0
    # top-5 looks at the first min(5, k) = 1 classes only.
    assert knn_classify(train, labels, test, np.array([0]), k=1, num_classes=6)["top5"] == 0.0
    # With k=2 both neighbours vote: ranking 3, 5 (then 0, 1, 2, 4), and top-5 looks at [3, 5].
    assert knn_classify(train, labels, test, np.array([5]), k=2, num_classes=6) == {"top1": 0.0, "top5": 100.0}
    assert knn_classify(train, labels, test, np.array([0]), k=2, num_classes=6)["top5"] == 0.0


@pytest.mark.parametrize("n_test", [1, 7, 250])
def test_matches_reference_loop(n_test):
    rng = np.random.default_rng(n_test)
    train_f, test_f = rng.normal(size=(300, 16)), rng.normal(size=(n_test, 16))
    train_y, test_y = rng.integers(0, 10, 300), rng.integers(0, 10, n_test)
    for k in (1, 5, 20):
        got = knn_classify(torch.tensor(train_f), torch.tensor(train_y), test_f, test_y, k=k, temperature=0.07)
        want = reference_knn(train_f, train_y, test_f, test_y, k, 0.07, 10)
        assert got["top1"] == pytest.approx(want[0], abs=1e-9)
        assert got["top5"] == pytest.approx(want[1], abs=1e-9)


def test_defaults_are_dino_k20_and_temperature_007():
    """The paper's k-NN numbers use k = 20 and T = 0.07: the defaults must be those (checked against the loop)."""
    rng = np.random.default_rng(0)
    train_f, test_f = rng.normal(size=(200, 8)), rng.normal(size=(60, 8))
    train_y, test_y = rng.integers(0, 6, 200), rng.integers(0, 6, 60)
    want = reference_knn(train_f, train_y, test_f, test_y, 20, 0.07, 6)
    for k, t in ((10, 0.07), (20, 0.1)):  # the case tells k and T apart
        assert want != reference_knn(train_f, train_y, test_f, test_y, k, t, 6)
    got = knn_classify(train_f, train_y, test_f, test_y)
    assert (got["top1"], got["top5"]) == pytest.approx(want, abs=1e-9)


def test_many_k_from_one_search_equals_single_k():
    rng = np.random.default_rng(0)
    train_f, test_f = rng.normal(size=(200, 8)), rng.normal(size=(50, 8))
    train_y, test_y = rng.integers(0, 5, 200), rng.integers(0, 5, 50)
    many = knn_classify_many(train_f, train_y, test_f, test_y, ks=(10, 20, 100, 200))
    for k, res in many.items():
        assert res == knn_classify(train_f, train_y, test_f, test_y, k=k)


def test_backends_agree():
    available = [b for b in BACKENDS if b != "auto"]
    rng = np.random.default_rng(1)
    bank = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(500, 32)), dtype=torch.float32), dim=1)
    queries = torch.tensor(rng.normal(size=(40, 32)), dtype=torch.float32)
    results = {}
    for backend in available:
        try:
            resolve_backend(backend)
        except ValueError:  # faiss (or its GPU build) not installed
            continue
        results[backend] = nearest_neighbors(queries, bank, k=7, backend=backend)
    assert "torch" in results
    brute = torch.topk(queries @ bank.T, 7, dim=1)
    for scores, indices in results.values():
        assert torch.equal(indices, brute.indices)
        torch.testing.assert_close(scores, brute.values, rtol=1e-5, atol=1e-5)


def test_auto_backend_keeps_a_cuda_bank_on_the_gpu_without_faiss_gpu(monkeypatch):
    from funai_common import search

    monkeypatch.setattr(search, "faiss_gpu_available", lambda: False)
    assert resolve_backend("auto", torch.device("cuda")) == "torch"  # no copy of the bank to faiss-cpu
    assert resolve_backend("auto", "cpu") == resolve_backend("auto") == ("faiss-cpu" if search._faiss() else "torch")
    monkeypatch.setattr(search, "faiss_gpu_available", lambda: True)
    assert resolve_backend("auto", "cuda") == resolve_backend("auto", "cpu") == "faiss-gpu"


def test_torch_backend_merges_bank_chunks(monkeypatch):
    import funai_common.search as search

    monkeypatch.setattr(search, "_TORCH_BLOCK_ELEMENTS", 64)  # forces many bank chunks
    bank = torch.randn(300, 8)
    queries = torch.randn(20, 8)
    scores, indices = nearest_neighbors(queries, bank, k=5, backend="torch", chunk_size=4)
    brute = torch.topk(queries @ bank.T, 5, dim=1)
    assert torch.equal(indices, brute.indices)


def test_torch_backend_widens_a_float16_bank_one_bounded_block_at_a_time(monkeypatch):
    """A float16 bank is scored in float32 block by block: with few queries the score bound alone would allow a block
    of the whole bank, i.e. a float32 copy twice the size of the float16 bank it was meant to save."""
    import funai_common.search as search

    monkeypatch.setattr(search, "_TORCH_BLOCK_ELEMENTS", 1024)
    widened = []
    to_float = torch.Tensor.float

    def spy(t, *args, **kwargs):
        if t.dtype == torch.float16:
            widened.append(t.numel())
        return to_float(t, *args, **kwargs)

    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(3000, 32, generator=g), torch.randn(2, 32, generator=g)
    index = search.NeighborIndex(bank, backend="torch", bank_dtype=torch.float16)
    monkeypatch.setattr(torch.Tensor, "float", spy)
    scores, indices = index.search(queries, 5)
    monkeypatch.undo()
    assert widened and max(widened) <= 1024  # blocks of at most _TORCH_BLOCK_ELEMENTS float32 entries
    brute = torch.topk(queries @ bank.half().float().T, 5, dim=1)
    assert torch.equal(indices, brute.indices)
    torch.testing.assert_close(scores, brute.values)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown search backend"):
        nearest_neighbors(torch.randn(2, 3), torch.randn(4, 3), 1, backend="scann")
    with pytest.raises(ValueError, match="k must be in"):
        nearest_neighbors(torch.randn(2, 3), torch.randn(4, 3), 5)
    with pytest.raises(ValueError, match="features and labels disagree"):
        knn_classify(np.ones((3, 2)), np.zeros(2), np.ones((1, 2)), np.zeros(1))
    # labels outside [0, num_classes) would index past the vote table or never match: named, not a torch error
    with pytest.raises(ValueError, match=r"train labels must be class ids in \[0, 2\) \(num_classes=2\), got 0..2"):
        knn_classify(np.eye(3), np.arange(3), np.eye(3), np.zeros(3), k=1, num_classes=2)
    with pytest.raises(ValueError, match=r"test labels must be class ids in \[0, 3\) \(num_classes=3\), got -1..0"):
        knn_classify(np.eye(3), np.arange(3), np.eye(3), [0, -1, 0], k=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_bank_on_gpu_finds_the_same_neighbours():
    from funai_common.search import NeighborIndex

    bank = torch.nn.functional.normalize(torch.randn(20000, 64), dim=1)
    queries = torch.randn(300, 64)
    want = NeighborIndex(bank, backend="torch").search(queries, 10)[1]
    got = NeighborIndex(bank.cuda(), backend="torch", bank_dtype=torch.float16).search(queries.cuda(), 10)[1]
    # float16 rounding may swap near-ties: compare as sets per query, allowing one swap
    overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(want, got.cpu())]
    assert min(overlap) >= 9


def test_float16_bank_on_faiss_cpu_searches_the_rounded_bank():
    pytest.importorskip("faiss")
    from funai_common.search import NeighborIndex

    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(500, 24, generator=g), torch.randn(30, 24, generator=g)
    scores, indices = NeighborIndex(bank, backend="faiss-cpu", bank_dtype=torch.float16).search(queries, 5)
    rounded = bank.half().float()  # the bank as float16 holds it, scores in float32
    brute = torch.topk(queries @ rounded.T, 5, dim=1)
    assert torch.equal(indices, brute.indices)
    torch.testing.assert_close(scores, brute.values, rtol=1e-5, atol=1e-4)
    plain = NeighborIndex(bank, backend="faiss-cpu").search(queries, 5)[1]  # the default keeps float32
    assert torch.equal(plain, torch.topk(queries @ bank.T, 5, dim=1).indices)
