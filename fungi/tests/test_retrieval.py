import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fungi import eval, extract
from fungi.config import resolve
from fungi.data import RefusedGlobalError, RevisitedDataset, build_split, load_ground_truth
from fungi.evaluation import evaluate_retrieval
from fungi.retrieval import (
    average_precision,
    mean_average_precision,
    mean_precision_at_k,
    positive_ranks,
    precision_at_k,
    rank_database,
    restrict_ground_truth,
    revisited_map,
    setup_lists,
)
from fungi.runs import load_features

TINY = ["--config", "tiny", "dino.num_local=2", "simclr.stride_scale=2", "simclr.num_negatives=2"]


def make_revisited(root, name="roxford5k", num_images=8, numpy_arrays=False, protocol=pickle.HIGHEST_PROTOCOL):
    """A revisited-style folder: <root>/<name>/jpg/*.jpg (random images of different sizes) and gnd_<name>.pkl with
    3 queries that are database images 0, 3 and 5."""
    rng = np.random.default_rng(0)
    folder = root / name
    (folder / "jpg").mkdir(parents=True)
    imlist = [f"im_{i:03d}" for i in range(num_images)]
    for i, n in enumerate(imlist):
        pixels = rng.integers(0, 256, size=(30 + 2 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "jpg" / f"{n}.jpg")
    gnd = [
        {"bbx": [2.0, 3.0, 22.0, 18.0], "easy": [1, 2], "hard": [4], "junk": [0]},
        {"bbx": [0.0, 0.0, 40.0, 20.4], "easy": [], "hard": [6, 7], "junk": [3, 5]},
        {"bbx": [10.6, 5.0, 30.0, 25.0], "easy": [], "hard": [], "junk": [5]},  # no positives at all
    ]
    if numpy_arrays:
        gnd = [{k: np.asarray(v, dtype=np.float64 if k == "bbx" else np.int64) for k, v in g.items()} for g in gnd]
    data = {"imlist": imlist, "qimlist": [imlist[0], imlist[3], imlist[5]], "gnd": gnd}
    with open(folder / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return folder


# ---------------------------------------------------------------- mAP


def brute_force_ap(ranking, positives, junk):
    """AP walking the ranking with the junk images deleted: trapezoid between the precision before and after each
    positive, divided by the number of positives."""
    kept = [x for x in ranking if x not in set(junk)]
    hits, total = 0, 0.0
    for i, x in enumerate(kept):
        if x in set(positives):
            before = hits / i if i else 1.0
            hits += 1
            total += (before + hits / (i + 1)) / 2
    return total / len(positives)


def brute_force_rankings(database, queries):
    """Each query's database indices by decreasing dot product (Python sort; ties by index)."""
    return [
        sorted(range(len(database)), key=lambda j, q=q: (-sum(a * b for a, b in zip(q, database[j])), j))
        for q in queries.tolist()
    ]


def test_average_precision_hand_cases():
    # positives at ranks 0 and 2 of [p, n, p, n]: (1 + 1) / 2 and (1/2 + 2/3) / 2 -> (1 + 7/12) / 2 = 19/24
    assert positive_ranks(np.array([3, 0, 1, 2]), [3, 1]).tolist() == [0, 2]
    assert average_precision(np.array([0, 2]), 2) == pytest.approx(19 / 24)
    # a junk image ranked first is skipped: same ranks, same AP; counted as a negative it would give 1/3
    ranking = np.array([5, 3, 0, 1, 2])
    assert positive_ranks(ranking, [3, 1], junk=[5]).tolist() == [0, 2]
    assert average_precision(positive_ranks(ranking, [3, 1], [5]), 2) == pytest.approx(19 / 24)
    assert average_precision(positive_ranks(ranking, [3, 1]), 2) == pytest.approx(((0 + 1 / 2) + (1 / 3 + 2 / 4)) / 4)
    # junk between positives only shifts the later one; junk after the last positive changes nothing
    assert positive_ranks(np.array([3, 0, 5, 1, 2]), [3, 1], [5, 2]).tolist() == [0, 2]
    # a positive missing from the ranking still counts in the total: (1 + 7/12) / 3
    assert average_precision(positive_ranks(np.array([3, 0, 1, 2]), [3, 1, 9]), 3) == pytest.approx(19 / 36)
    assert average_precision(np.array([0, 1, 2]), 3) == 1.0


def test_precision_at_k_hand_cases():
    # positives at 1-based ranks 1 and 3: P@10 divides by the last positive's rank, 3 -> 2/3; P@1 = 1; P@2 = 1/2
    assert precision_at_k(np.array([0, 2]), 10) == pytest.approx(2 / 3)
    assert precision_at_k(np.array([0, 2]), 1) == 1.0 and precision_at_k(np.array([0, 2]), 2) == 0.5
    assert precision_at_k(np.array([0, 1, 2]), 10) == 1.0 and precision_at_k(np.array([]), 10) == 0.0
    query = {"easy": [10], "hard": [11], "junk": [12]}
    rankings = np.array([[10, 12, 13, 11]])  # medium after junk removal: [p, n, p] -> 2/3; hard: [n, p] -> 1/2
    assert mean_precision_at_k(rankings, [query], "medium") == pytest.approx(2 / 3)
    assert mean_precision_at_k(rankings, [query], "hard") == pytest.approx(1 / 2)
    assert np.isnan(mean_precision_at_k(rankings, [{"easy": [], "hard": []}], "medium"))


def test_rank_database_keeps_database_order_among_ties():
    # 40 rows (more than numpy's insertion-sort cut-off) with two scores only: each score group in index order
    database = np.array([[1.0, 0.0], [2.0, 0.0]] * 20)
    expected = list(range(1, 40, 2)) + list(range(0, 40, 2))
    assert rank_database(database, np.array([[1.0, 5.0]])).tolist() == [expected]


def test_medium_and_hard_setups_hand_case():
    query = {"easy": [10], "hard": [11], "junk": [12]}
    assert [a.tolist() for a in setup_lists(query, "medium")] == [[10, 11], [12]]
    assert [a.tolist() for a in setup_lists(query, "hard")] == [[11], [12, 10]]
    rankings = np.array([[10, 12, 13, 11]])
    # Medium: [easy, junk, neg, hard] -> [p, n, p] after junk removal -> 19/24
    assert mean_average_precision(rankings, [query], "medium")[0] == pytest.approx(19 / 24)
    # Hard: the easy image is junk too -> [n, p]: (0/1 + 1/2) / 2
    assert mean_average_precision(rankings, [query], "hard")[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown setup 'easy'"):
        setup_lists(query, "easy")


def test_queries_without_positives_are_left_out_as_the_reference():
    gt = [{"easy": [0], "hard": [], "junk": []}, {"easy": [], "hard": [], "junk": [1]}, {"easy": [1], "hard": []}]
    rankings = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    mean, aps = mean_average_precision(rankings, gt, "medium")
    assert np.isnan(aps[1]) and aps[0] == 1.0 and aps[2] == pytest.approx(0.25)
    assert mean == pytest.approx((1.0 + 0.25) / 2)  # the mean of the two queries that have positives
    hard, aps = mean_average_precision(rankings, gt, "hard")  # no query has a hard positive
    assert np.isnan(hard) and np.isnan(aps).all()


def test_map_matches_brute_force_on_random_features():
    rng = np.random.default_rng(0)
    database, queries = rng.normal(size=(40, 6)), rng.normal(size=(9, 6))
    ground_truth = []
    for _ in range(9):
        labels = rng.choice(5, size=40, p=[0.5, 0.15, 0.15, 0.1, 0.1])  # 0 negative, 1 easy, 2 hard, 3 junk
        ground_truth.append({k: np.flatnonzero(labels == c) for k, c in (("easy", 1), ("hard", 2), ("junk", 3))})
    rankings = rank_database(database, queries)
    assert rankings.tolist() == brute_force_rankings(database, queries)
    scores = revisited_map(database, queries, ground_truth)
    for setup, key in (("medium", "mAP_M"), ("hard", "mAP_H")):
        expected = []
        for ranking, query in zip(rankings.tolist(), ground_truth):
            positives, junk = (a.tolist() for a in setup_lists(query, setup))
            if positives:
                expected.append(brute_force_ap(ranking, positives, junk))
        assert scores[key] == pytest.approx(100 * np.mean(expected), rel=1e-12)
        precisions = []
        for ranking, query in zip(rankings.tolist(), ground_truth):
            positives, junk = (set(a.tolist()) for a in setup_lists(query, setup))
            if positives:  # 1-based places of the positives once junk is skipped
                places = [i + 1 for i, x in enumerate(x for x in ranking if x not in junk) if x in positives]
                kq = min(10, places[-1])
                precisions.append(sum(p <= kq for p in places) / kq)
        assert scores["mP@10_" + key[-1]] == pytest.approx(100 * np.mean(precisions), rel=1e-12)
        _, aps = mean_average_precision(rankings, ground_truth, setup)
        assert len(expected) == np.count_nonzero(~np.isnan(aps))


def test_evaluate_retrieval_rows_follow_the_block_recipe():
    gen = torch.Generator().manual_seed(0)
    database = {"embeddings": torch.randn(30, 4, generator=gen), "kl": torch.randn(30, 4, generator=gen)}
    queries = {k: v[:5] + 0.1 * torch.randn(5, 4, generator=gen) for k, v in database.items()}
    gt = [{"easy": [i], "hard": [], "junk": []} for i in range(5)]
    rows = evaluate_retrieval(database, queries, gt, pca_dim=None)
    assert [r["features"] for r in rows] == ["embeddings", "kl", "embeddings+kl"]
    both = torch.cat([torch.nn.functional.normalize(database[k], dim=1) for k in ("embeddings", "kl")], 1)
    both_q = torch.cat([torch.nn.functional.normalize(queries[k], dim=1) for k in ("embeddings", "kl")], 1)
    assert rows[2]["retrieval_mAP_M"] == pytest.approx(revisited_map(both.numpy(), both_q.numpy(), gt)["mAP_M"])
    assert rows[2]["retrieval_mAP_M"] == 100.0  # near-copies of the database rows are found first
    assert np.isnan(rows[2]["retrieval_mAP_H"])  # no hard positives anywhere
    assert [r["features"] for r in evaluate_retrieval(database, queries, gt, 3, incremental=True)] == [
        "embeddings",
        "embeddings+kl",
    ]


def test_restrict_ground_truth_maps_ids_to_rows_and_drops_absent_images():
    gnd = [{"easy": np.array([4, 1]), "hard": np.array([7]), "junk": np.array([0])}, {"easy": [2], "hard": []}]
    rows, dropped = restrict_ground_truth(gnd, database_ids=[0, 1, 2, 4], query_ids=[1, 0])
    assert rows[0]["easy"].tolist() == [2] and rows[1]["easy"].tolist() == [3, 1] and rows[1]["junk"].tolist() == [0]
    assert dropped == 1  # image 7 is not among the database rows
    with pytest.raises(ValueError, match="query id 5"):
        restrict_ground_truth(gnd, [0], [5])


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("numpy_arrays, protocol", [(False, pickle.HIGHEST_PROTOCOL), (True, 2), (True, 5)])
def test_revisited_loader_on_a_generated_folder(tmp_path, numpy_arrays, protocol):
    folder = make_revisited(tmp_path, numpy_arrays=numpy_arrays, protocol=protocol)
    gt = load_ground_truth(folder / "gnd_roxford5k.pkl")
    assert gt["qimlist"] == ["im_000", "im_003", "im_005"] and len(gt["imlist"]) == 8
    assert gt["gnd"][0]["bbx"] == (2.0, 3.0, 22.0, 18.0) and gt["gnd"][1]["hard"].tolist() == [6, 7]
    data = {"kind": "revisited", "root": str(tmp_path), "name": "roxford5k", "crop_queries": True}
    database, queries = build_split(data, "database"), build_split(data, "queries")
    assert len(database) == 8 and len(queries) == 3
    image, index = database[3]
    assert index == 3 and image.mode == "RGB" and image.size == (40, 36)  # whole image
    crops = [queries[i] for i in range(3)]
    assert [i for _, i in crops] == [0, 1, 2]
    assert [c.size for c, _ in crops] == [(20, 15), (40, 20), (19, 20)]  # bbx, rounded as PIL does
    whole = Image.open(folder / "jpg" / "im_000.jpg").convert("RGB")
    assert np.array_equal(np.asarray(crops[0][0]), np.asarray(whole)[3:18, 2:22])
    uncropped = RevisitedDataset(tmp_path, "roxford5k", "queries")  # the default, as the reference: whole images
    assert uncropped[1][0].size == (40, 36)
    assert build_split({k: v for k, v in data.items() if k != "crop_queries"}, "queries")[1][0].size == (40, 36)


def test_revisited_errors_name_the_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "roxford5k")):
        RevisitedDataset(tmp_path, "roxford5k", "database")
    with pytest.raises(ValueError, match=r"unknown revisited dataset 'oxford5k'.*roxford5k"):
        RevisitedDataset(tmp_path, "oxford5k", "database")
    folder = make_revisited(tmp_path)
    (folder / "jpg" / "im_006.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 8 database images .* e\.g\. .*im_006\.jpg"):
        RevisitedDataset(tmp_path, "roxford5k", "database")
    assert len(RevisitedDataset(tmp_path, "roxford5k", "queries")) == 3  # queries are all present
    (folder / "gnd_roxford5k.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=r"ground truth .*gnd_roxford5k\.pkl does not exist"):
        RevisitedDataset(tmp_path, "roxford5k", "queries")
    with pytest.raises(ValueError, match=r"unknown split 'test' for data.kind=revisited.*\['database', 'queries'\]"):
        build_split({"kind": "revisited", "root": str(tmp_path), "name": "roxford5k"}, "test")


def test_ground_truth_structure_is_checked(tmp_path):
    path = tmp_path / "gnd.pkl"
    for data, message in (
        ({"imlist": ["a"], "qimlist": ["a"]}, r"missing \['gnd'\]"),
        ({"imlist": ["a"], "qimlist": ["a"], "gnd": []}, "0 'gnd' entries for 1 queries"),
        ({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"easy": [3], "hard": []}]}, r"gnd\[0\]\['easy'\] must hold"),
        ({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"bbx": [5, 0, 1, 1], "easy": [], "hard": []}]}, "x2 > x1"),
    ):
        path.write_bytes(pickle.dumps(data))
        with pytest.raises(ValueError, match=message):
            load_ground_truth(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=f"{path} is not a readable ground-truth pickle"):
        load_ground_truth(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_other_globals(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Exploit(marker)]}))
    with pytest.raises(pickle.UnpicklingError, match=r"refers to (posix|nt|os)\.system"):
        load_ground_truth(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "extra": _Exploit}))  # a class, not called
    with pytest.raises(RefusedGlobalError, match=r"gnd_roxford5k\.pkl refers to .*test_retrieval\._Exploit"):
        load_ground_truth(path)
    assert issubclass(RefusedGlobalError, ValueError)  # the CLIs report it as a one-line error


class _Call:
    """Pickles as a call of ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_unpickler_byte_string_helpers_accept_only_their_array_use(tmp_path, protocol):
    """`_codecs.encode` and `bytes` are allowed for the byte strings of numpy array data only: another codec, or
    bytes(...) with arguments, is refused with an error naming the file."""
    import codecs

    path = tmp_path / "gnd_roxford5k.pkl"
    for call, message in (
        (_Call(codecs.encode, "abc", "rot13"), r"_codecs.encode is only accepted for \(str, 'latin1'\)"),
        (_Call(bytes, "abc", "utf-8"), r"bytes\(\.\.\.\) is only accepted without arguments"),
    ):
        path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": call}, protocol=protocol))
        with pytest.raises(ValueError, match=f"{path} is not a readable ground-truth pickle: {message}"):
            load_ground_truth(path)
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": _Call(bytes)}, protocol=protocol))
    assert load_ground_truth(path) == {"imlist": [], "qimlist": [], "gnd": []}


def test_retrieval_rows_join_the_classification_rows_on_their_block_combination():
    rows = [{"features": "embeddings", "knn_top1": 50.0}, {"features": "kl", "knn_top1": 40.0}]
    extra = [{"features": "kl", "retrieval_mAP_M": 7.0}, {"features": "embeddings+kl", "retrieval_mAP_M": 9.0}]
    assert eval.merge_rows(rows, extra) == [
        {"features": "embeddings", "knn_top1": 50.0},
        {"features": "kl", "knn_top1": 40.0, "retrieval_mAP_M": 7.0},
        {"features": "embeddings+kl", "retrieval_mAP_M": 9.0},
    ]
    assert rows[1] == {"features": "kl", "knn_top1": 40.0}  # the inputs are not modified
    assert eval.merge_rows([], extra) == extra


# ---------------------------------------------------------------- CLIs


def test_extract_then_eval_retrieval_end_to_end(tmp_path):
    make_revisited(tmp_path / "data")
    run = tmp_path / "run"
    data = ["data.kind=revisited", f"data.root={tmp_path / 'data'}", "data.name=roxford5k"]
    path = extract.main([*TINY, *data, "splits=[database,queries]", f"run_dir={run}"])
    splits, meta = load_features(path)
    assert set(splits) == {"database", "queries"} and meta["config"]["data"]["crop_queries"] is False
    assert splits["database"][1].tolist() == list(range(8)) and splits["queries"][1].tolist() == [0, 1, 2]
    assert splits["queries"][0]["dino"].shape == (3, 48)
    rows = eval.main([f"features={path}", "protocols=[retrieval]"])
    assert len(rows) == 15 and rows[-1]["features"] == "embeddings+kl+dino+simclr"
    assert set(rows[0]) == {"features", *(f"retrieval_{m}_{s}" for m in ("mAP", "mP@10") for s in "MH")}
    assert all(0 < r["retrieval_mAP_M"] <= 100 and 0 < r["retrieval_mAP_H"] <= 100 for r in rows)
    assert json.loads((run / "metrics.json").read_text()) == rows
    # the rows are the retrieval protocol on the stored features, with the file's ground truth
    gt, _ = restrict_ground_truth(
        load_ground_truth(tmp_path / "data/roxford5k/gnd_roxford5k.pkl")["gnd"], range(8), [0, 1, 2]
    )
    assert rows == evaluate_retrieval(splits["database"][0], splits["queries"][0], gt)
    # limit=6: database images 6 and 7 (query 1's hard positives) are not extracted, so query 1 drops out of Hard
    small = extract.main([*TINY, *data, "splits=[database,queries]", "limit=6", f"run_dir={tmp_path / 'small'}"])
    out = tmp_path / "elsewhere"
    limited = eval.main(
        [
            f"features={small}",
            "protocols=[retrieval]",
            f"ground_truth={tmp_path / 'data/roxford5k/gnd_roxford5k.pkl'}",
            f"out={out}",
            "incremental=true",
        ]
    )
    assert [r["features"] for r in limited] == [
        "embeddings",
        "embeddings+kl",
        "embeddings+kl+dino",
        "embeddings+kl+dino+simclr",
    ]
    assert (out / "metrics.json").is_file() and "ignored" in (out / "log.txt").read_text()
    # limit=4: no query keeps a hard positive, so the Hard mAP is NaN, written as null (NaN is not standard JSON)
    tiny = extract.main([*TINY, *data, "splits=[database,queries]", "limit=4", f"run_dir={tmp_path / 'tiny'}"])
    gt_file = f"ground_truth={tmp_path / 'data/roxford5k/gnd_roxford5k.pkl'}"
    no_hard = eval.main([f"features={tiny}", "protocols=[retrieval]", gt_file, f"out={tmp_path / 'no_hard'}"])
    assert all(np.isnan(r["retrieval_mAP_H"]) and r["retrieval_mAP_M"] > 0 for r in no_hard)
    written = json.loads((tmp_path / "no_hard" / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert [r["retrieval_mAP_H"] for r in written] == [None] * len(no_hard)


def test_retrieval_cli_errors(tmp_path):
    cfg = resolve(["--config", "retrieval"], extract.DEFAULTS, None)  # the shipped recipe: KL + DINO, both splits
    assert cfg["objectives"] == ["kl", "dino"] and cfg["splits"] == ["database", "queries"]
    assert cfg["data"]["kind"] == "revisited" and cfg["kl"]["temperature"] == 15.0
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "roxford5k")):
        extract.main(["--config", "retrieval", f"data.root={tmp_path}", f"run_dir={tmp_path / 'unused'}"])
    make_revisited(tmp_path / "data")
    data = ["data.kind=revisited", f"data.root={tmp_path / 'data'}", "data.name=roxford5k"]
    with pytest.raises(ValueError, match=r"unknown split 'train' for data.kind=revisited.*splits=\[database,queries\]"):
        extract.main([*TINY, *data, f"run_dir={tmp_path / 'unused'}"])
    path = extract.main([*TINY, *data, "splits=[database,queries]", "objectives=[kl]", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(KeyError, match=r"split 'train' not in .*protocols=\[retrieval\]"):
        eval.main([f"features={path}"])
    (tmp_path / "data/roxford5k/gnd_roxford5k.pkl").rename(tmp_path / "gnd.pkl")
    with pytest.raises(FileNotFoundError, match="gnd_roxford5k.pkl does not exist"):
        eval.main([f"features={path}", "protocols=[retrieval]"])
    assert not (tmp_path / "r" / "metrics.json").exists()  # nothing written before the check
    assert len(eval.main([f"features={path}", "protocols=[retrieval]", f"ground_truth={tmp_path / 'gnd.pkl'}"])) == 3
    digits = extract.main([*TINY, "limit=12", "objectives=[kl]", f"run_dir={tmp_path / 'digits'}"])
    with pytest.raises(ValueError, match="not extracted from a revisited dataset.*ground_truth="):
        eval.main([f"features={digits}", "protocols=[knn,retrieval]", "database_split=train", "query_split=test"])


def test_truncated_jpegs_are_decoded_as_far_as_they_go_as_the_reference(tmp_path):
    from PIL import ImageFile

    folder = make_revisited(tmp_path)
    path = folder / "jpg" / "im_002.jpg"
    whole = np.asarray(Image.open(path).convert("RGB"))
    path.write_bytes(path.read_bytes()[:-200])  # cut the end of the JPEG stream
    with pytest.raises(OSError, match="truncated"):
        Image.open(path).convert("RGB")
    image, index = RevisitedDataset(tmp_path, "roxford5k", "database")[2]
    assert index == 2 and np.asarray(image).shape == whole.shape
    assert np.array_equal(np.asarray(image)[:4], whole[:4])  # the top rows come through unchanged
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the global switch is restored
