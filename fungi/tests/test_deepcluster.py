"""The DeepCluster objective (the experiment repo's ablation): loss, k-means prototypes, views, per-sample gradients,
extractor state and the command line."""

import math

import pytest
import torch
import torch.nn.functional as F

from fungi import FUNGIExtractor, eval, extract, random_projection
from fungi.gradients import per_sample_gradients, per_sample_gradients_loop
from fungi.kmeans import inner_product_kmeans
from fungi.losses import deepcluster_loss, deepcluster_per_sample, deepcluster_targets
from fungi.objectives import DeepClusterObjective
from fungi.runs import load_features
from fungi.tiny import tiny_timm, tiny_torchvision
from fungi.views import dino_views, random_resized_crop_box, resize, sample_generator

OPTIONS = {"deepcluster": {"num_prototypes": 4, "num_local": 2, "latent_dim": 16}}
TINY = ["--config", "tiny", "limit=12", "dino.num_local=2", "simclr.stride_scale=2", "simclr.num_negatives=2"]


def make(seed=0, objectives=("deepcluster",), options=OPTIONS):
    torch.manual_seed(0)
    return FUNGIExtractor(tiny_timm(), objectives=objectives, seed=seed, objective_options=options)


@pytest.fixture(scope="module")
def train_images():
    return [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(200 + i)) for i in range(6)]


def test_loss_and_targets_hand_case():
    # one sample, views [1, 0] and [0, 1], prototypes e1, e2, target e1, T = 0.5: scores [2, 0] and [0, 2]
    latents = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    prototypes = torch.eye(2)[None]
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    loss = deepcluster_loss(latents, prototypes, torch.tensor([[0]]), temperature=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # head h assigns crop h mod 2: head 0 -> crop [1, 0] -> e1; head 1 -> crop [0, 1] -> e2; head 2 (prototypes
    # swapped) -> crop [1, 0] -> its second prototype
    heads = torch.stack([torch.eye(2), torch.eye(2), torch.eye(2).flip(0)])
    assert deepcluster_targets(latents, heads).tolist() == [[0, 1, 1]]


def test_loss_matches_cross_entropy_loop():
    latents, prototypes = torch.randn(3, 5, 8), torch.randn(2, 7, 8)
    targets = torch.randint(0, 7, (3, 2))
    expected = torch.stack(
        [  # the reference: one cross_entropy over the (head, crop) rows of each sample
            F.cross_entropy(
                torch.cat([latents[b] @ prototypes[h].T / 0.1 for h in range(2)]), targets[b].repeat_interleave(5)
            )
            for b in range(3)
        ]
    )
    torch.testing.assert_close(deepcluster_per_sample(latents, prototypes, targets, 0.1), expected)


def test_kmeans_hand_case_keeps_unnormalised_means():
    # two groups of unit vectors; whatever the two initial rows, 10 rounds end at the group means (norm 0.99 < 1)
    x = torch.tensor([[1.0, 0.0], [0.96, 0.28], [0.0, 1.0], [0.28, 0.96]])
    for seed in range(6):
        centroids, assignments = inner_product_kmeans(x, 2, torch.Generator().manual_seed(seed))
        assert assignments[0] == assignments[1] != assignments[2] == assignments[3]
        torch.testing.assert_close(centroids[assignments[0]], torch.tensor([0.98, 0.14]))
        torch.testing.assert_close(centroids[assignments[2]], torch.tensor([0.14, 0.98]))
    with pytest.raises(ValueError, match="k=5 for 4 rows"):
        inner_product_kmeans(x, 5, torch.Generator())


def test_kmeans_returns_the_assignments_to_the_final_centroids():
    # one round from random rows does not converge: the returned assignments must be recomputed after the last move
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(1))
    centroids, assignments = inner_product_kmeans(x, 4, torch.Generator().manual_seed(0), iters=1, backend="torch")
    assert torch.equal(assignments, (x @ centroids.T).argmax(1))


def test_kmeans_is_seeded_and_backends_agree():
    x = F.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(0)), dim=-1)

    def fit(seed, backend="torch"):
        return inner_product_kmeans(x, 10, torch.Generator().manual_seed(seed), backend=backend)

    first, again, other = fit(3), fit(3), fit(4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.allclose(first[0], other[0])
    pytest.importorskip("faiss")
    torch.testing.assert_close(fit(3, "faiss-cpu")[0], first[0])


def test_views_are_reference_crops():
    objective = DeepClusterObjective(48, torch.Generator().manual_seed(0))
    defaults = (objective.num_global, objective.num_local, objective.num_prototypes, objective.temperature)
    assert defaults == (2, 6, 3000, 0.1)
    assert (objective.global_scale, objective.local_scale) == ((0.14, 1.0), (0.05, 0.14))
    assert torch.allclose(objective.head.weight.norm(dim=1), torch.ones(128))  # weight norm with g = 1
    images = torch.randn(2, 3, 32, 32)
    views = objective.views(images, seed=7)
    assert views.shape == (2, 2 + 6 + 2, 3, 32, 32)
    for b in range(2):  # every crop rebuilt: loss crops from seed 7 + 2, assignment crops from seed 7 + 1, bilinear
        loss_gen, assign_gen = sample_generator(images[b], 9), sample_generator(images[b], 8)
        draws = [(loss_gen, (0.14, 1.0))] * 2 + [(loss_gen, (0.05, 0.14))] * 6 + [(assign_gen, (0.14, 1.0))] * 2
        for v, (gen, scale) in enumerate(draws):
            top, left, h, w = random_resized_crop_box(32, 32, scale, (3 / 4, 4 / 3), gen)
            expected = resize(images[b : b + 1, :, top : top + h, left : left + w], (32, 32), "bilinear")[0]
            torch.testing.assert_close(views[b, v], expected, atol=1e-6, rtol=0)
    # apart from the DINO objective's crops, which are drawn from the seed itself
    assert not torch.allclose(views[:, :2], dino_views(images, 7, 2, 0, (0.14, 1.0), mode="bilinear"))
    for bad in (["some text"], torch.randn(2, 50, 128)):  # text, audio spectrograms
        with pytest.raises(ValueError, match="image batches"):
            objective.views(bad, seed=0)
        with pytest.raises(ValueError, match="image batches"):
            objective.assignment_views(bad, seed=0)
    for key in ("num_prototypes", "num_heads", "num_global"):
        with pytest.raises(ValueError, match=f"deepcluster.{key}=0"):
            DeepClusterObjective(48, torch.Generator().manual_seed(0), **{key: 0})


@pytest.mark.parametrize(
    "build, layer",
    [(tiny_timm, "blocks.1.attn.proj"), (tiny_torchvision, "encoder.layers.encoder_layer_1.self_attention.out_proj")],
)
def test_batched_gradients_equal_per_sample_loop(build, layer):
    torch.manual_seed(0)
    model = build()
    objective = DeepClusterObjective(48, torch.Generator().manual_seed(0), latent_dim=16, num_prototypes=5, num_local=2)
    objective.fit(F.normalize(torch.randn(20, 2, 16), dim=-1), torch.Generator().manual_seed(0))
    views = objective.views(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)), seed=0)
    fast = per_sample_gradients(model, layer, views, objective)
    slow = per_sample_gradients_loop(model, layer, views, objective)
    assert fast.shape == (3, 48, 49) and slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * slow.abs().max().item())
    assert not torch.allclose(fast[0], fast[1])


def test_block_matches_independent_computation(images, train_images):
    ex = make(seed=3)
    ex.setup(train_images, batch_size=4)
    torch.manual_seed(0)  # the extractor's model weights
    model = tiny_timm()
    bound = 1 / math.sqrt(48)
    weight = torch.empty(16, 48).uniform_(-bound, bound, generator=torch.Generator().manual_seed(3))
    weight = weight / weight.norm(dim=1, keepdim=True)

    def latent(x):
        return F.normalize(model(x) @ weight.T, dim=-1)

    views = ex.objectives["deepcluster"].views(torch.stack(train_images), seed=3)
    with torch.no_grad():  # prototypes: k-means of the training images' assignment crops (views 4, 5)
        train_latents = torch.stack([latent(v[4:]) for v in views])
    gen = torch.Generator().manual_seed(3)
    prototypes = torch.stack([inner_product_kmeans(train_latents[:, h % 2], 4, gen)[0] for h in range(3)])
    torch.testing.assert_close(ex.objectives["deepcluster"].prototypes, prototypes, rtol=1e-5, atol=1e-6)

    def loss_fn(emb):  # one sample: every (head, loss crop) row against the head's assignment of crop 4 + h mod 2
        z = F.normalize(emb[0] @ weight.T, dim=-1)
        rows, targets = [], []
        for h in range(3):
            target = (prototypes[h] @ z[4 + h % 2].detach()).argmax()
            for v in range(4):
                rows.append(prototypes[h] @ z[v] / 0.1)
                targets.append(target)
        return F.cross_entropy(torch.stack(rows), torch.stack(targets))[None]

    grads = per_sample_gradients_loop(
        model, "blocks.1.attn.proj", ex.objectives["deepcluster"].views(images, 3), loss_fn
    )
    expected = F.normalize(grads.reshape(4, -1) @ random_projection(48, 48 * 49, seed=3).T, dim=-1)
    torch.testing.assert_close(ex.blocks(images)["deepcluster"], expected, rtol=1e-4, atol=1e-4)


def test_batch_independence_seed_and_save_load(tmp_path, images, train_images):
    ex = make()
    ex.setup(train_images)
    feats = ex(images)
    assert feats.shape == (4, 2 * 48)
    torch.testing.assert_close(torch.cat([ex(images[i : i + 1]) for i in range(4)]), feats, rtol=1e-5, atol=1e-5)
    again = make()
    again.setup(train_images)
    assert torch.equal(again.objectives["deepcluster"].prototypes, ex.objectives["deepcluster"].prototypes)
    other = make(seed=1)
    other.setup(train_images)
    assert not torch.allclose(other.objectives["deepcluster"].prototypes, ex.objectives["deepcluster"].prototypes)
    ex.save(tmp_path / "state.safetensors")
    loaded = make(seed=5).load(tmp_path / "state.safetensors")  # no setup: the prototypes come from the file
    assert torch.equal(loaded.objectives["deepcluster"].prototypes, ex.objectives["deepcluster"].prototypes)
    torch.testing.assert_close(loaded(images), feats, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="deepcluster.num_prototypes: saved 4, here 3"):
        make(options={"deepcluster": {**OPTIONS["deepcluster"], "num_prototypes": 3}}).load(
            tmp_path / "state.safetensors"
        )


def test_errors_and_off_by_default(images, train_images):
    with pytest.raises(RuntimeError, match="setup"):
        make()(images)
    with pytest.raises(ValueError, match=r"deepcluster.num_prototypes=4 exceeds the 3 training items"):
        make().setup(train_images[:3])
    assert FUNGIExtractor(tiny_timm()).objective_names == ("kl", "dino", "simclr")
    assert "deepcluster" not in extract.resolve(["--config", "paper"], extract.DEFAULTS, None)["objectives"]


def test_cli_extract_and_eval(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "objectives=[kl,deepcluster]", "deepcluster.num_prototypes=4"]
    path = extract.main([*args, f"run_dir={run}"])
    splits, meta = load_features(path)
    blocks, labels = splits["train"]
    assert set(blocks) == {"embeddings", "kl", "deepcluster"} and blocks["deepcluster"].shape == (12, 48)
    assert meta["extractor"]["objective_options"]["deepcluster"]["num_prototypes"] == 4
    # the saved state (prototypes fitted on train) gives the same test features in a run without train
    state = run / "fungi_state.safetensors"
    again = extract.main([*args, f"run_dir={tmp_path / 'again'}", f"state={state}", "splits=[test]"])
    test = load_features(again)[0]["test"][0]["deepcluster"]
    torch.testing.assert_close(test, splits["test"][0]["deepcluster"], rtol=1e-5, atol=1e-6)
    rows = eval.main([f"features={path}", "protocols=[knn]", "k=3", "pca_dim=0"])
    assert len(rows) == 7 and rows[-1]["features"] == "embeddings+kl+deepcluster"
    with pytest.raises(ValueError, match="deepcluster.num_prototypes=13 exceeds the 12 training items"):
        extract.main([*args, "deepcluster.num_prototypes=13", f"run_dir={tmp_path / 'bad'}"])
