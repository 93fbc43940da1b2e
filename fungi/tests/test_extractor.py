import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fungi import FUNGIExtractor, random_projection
from fungi.gradients import per_sample_gradients_loop
from fungi.losses import kl_uniform_per_sample
from fungi.models import Backbone
from fungi.tiny import tiny_timm
from fungi.views import dino_views, patchify_views

OPTIONS = {"dino": {"latent_dim": 64, "num_local": 2}, "simclr": {"num_negatives": 3, "stride_scale": 2}}


def make(seed=0, objectives=("kl", "dino", "simclr"), model=None):
    torch.manual_seed(0)
    return FUNGIExtractor(model or tiny_timm(), objectives=objectives, seed=seed, objective_options=OPTIONS)


@pytest.fixture(scope="module")
def bank_images():
    return [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(100 + i)) for i in range(4)]


def test_layout_norms_and_batch_independence(images, bank_images):
    ex = make()
    ex.setup(bank_images)
    assert ex.objectives["simclr"].negatives.shape == (3 * 9, 96)  # 3 x 3 patch views of 16 px at stride 8
    feats = ex(images)
    assert feats.shape == (4, 4 * 48) and ex.feature_dim == 4 * 48
    assert torch.allclose(feats.view(4, 4, 48).norm(dim=-1), torch.ones(4, 4), atol=1e-5)
    split = torch.cat([ex(images[:1]), ex(images[1:3]), ex(images[3:])])
    assert torch.allclose(feats, split, rtol=1e-5, atol=1e-5)
    ex.max_views_per_pass = 1  # one sample per pass gives the same features
    assert torch.allclose(feats, ex(images), atol=1e-5)


def test_kl_block_matches_independent_computation(images):
    ex = make(seed=3, objectives=("kl",))
    blocks = ex.blocks(images)
    torch.manual_seed(0)  # same weights as the extractor's model
    model = tiny_timm()
    gen = torch.Generator().manual_seed(3)
    bound = 1 / math.sqrt(48)
    w = torch.empty(768, 48).uniform_(-bound, bound, generator=gen)
    b = torch.empty(768).uniform_(-bound, bound, generator=gen)

    def loss_fn(emb):
        return kl_uniform_per_sample(F.normalize(emb[:, 0], dim=-1) @ w.T + b, 15.0)

    grads = per_sample_gradients_loop(model, "blocks.1.attn.proj", images[:, None], loss_fn)
    proj = random_projection(48, 48 * 49, seed=3)
    expected = F.normalize(grads.reshape(4, -1) @ proj.T, dim=-1)
    assert torch.allclose(blocks["kl"], expected, atol=1e-4)
    assert torch.allclose(blocks["embeddings"], F.normalize(model(images), dim=-1), atol=1e-5)


def test_every_block_and_the_concat_order_match_an_independent_computation(images, bank_images):
    ex = make(seed=5)
    ex.setup(bank_images)
    feats = ex(images)
    torch.manual_seed(0)  # same weights as the extractor's model
    model = tiny_timm()
    gen = torch.Generator().manual_seed(5)

    def head(out_dim):  # nn.Linear's default init, weight then bias, drawn from the seed in objective order
        bound = 1 / math.sqrt(48)
        w = torch.empty(out_dim, 48).uniform_(-bound, bound, generator=gen)
        b = torch.empty(out_dim).uniform_(-bound, bound, generator=gen)
        return lambda x: x @ w.T + b

    kl_head, student, teacher, simclr_head = head(768), head(64), head(64), head(96)
    # negative bank: 3 of the 4 bank images (seeded permutation), 9 patch views each, head on raw embeddings
    picked = torch.stack(bank_images)[torch.randperm(4, generator=torch.Generator().manual_seed(5))[:3]]
    with torch.no_grad():
        negatives = simclr_head(model(patchify_views(picked, 4, 2).flatten(0, 1)))
    assert torch.allclose(ex.objectives["simclr"].negatives, negatives, atol=1e-5)

    def kl_loss(emb):
        log_p = torch.log_softmax(kl_head(F.normalize(emb[:, 0], dim=-1)) / 15.0, -1)
        return (-math.log(768) - log_p).mean(-1) / 768

    def dino_loss(emb):  # sum over 2 teacher (global) views x all 4 student views, same-view pairs included;
        # the teacher is a frozen copy of the backbone: no gradient flows through its branch
        z = F.normalize(emb[0], dim=-1)
        p, log_q = torch.softmax(teacher(z[:2].detach()) / 0.07, -1), torch.log_softmax(student(z) / 0.1, -1)
        return -sum((p[g] * log_q[v]).sum() for g in range(2) for v in range(4))[None]

    def simclr_loss(emb):  # paper InfoNCE: tau inside the logsumexp, self-similarity -10000
        views = F.normalize(simclr_head(emb[0]), dim=-1)
        rows = torch.cat([F.normalize(negatives, dim=-1), views])
        nll = []
        for i in range(len(views)):
            sim = rows @ views[i]
            sim = torch.cat([sim[: len(negatives) + i], sim.new_full((1,), -10000.0), sim[len(negatives) + i + 1 :]])
            others = [sim[len(negatives) + j] for j in range(len(views)) if j != i]
            nll.append(-sum(others) / (len(others) * 0.07) + torch.logsumexp(sim / 0.07, 0))
        return torch.stack(nll).mean()[None]

    proj = random_projection(48, 48 * 49, seed=5)
    expected = [F.normalize(model(images), dim=-1)]
    for loss_fn, views in (
        (kl_loss, images[:, None]),
        (dino_loss, dino_views(images, 5, 2, 2)),
        (simclr_loss, patchify_views(images, 4, 2)),
    ):
        grads = per_sample_gradients_loop(model, "blocks.1.attn.proj", views, loss_fn)
        expected.append(F.normalize(grads.reshape(4, -1) @ proj.T, dim=-1))
    # embeddings first, then KL, DINO, SimCLR, each block L2-normalised separately
    assert torch.allclose(feats, torch.cat(expected, dim=1), atol=1e-4)
    blocks = ex.blocks(images)  # named blocks (features files, per-block evaluation): each under its own name
    assert list(blocks) == ["embeddings", "kl", "dino", "simclr"]
    for name, value in zip(blocks, expected):
        assert torch.allclose(blocks[name], value, atol=1e-4), name


def test_seed_reproducibility_and_save_load(tmp_path, images, bank_images):
    images, bank_images = images[:2], bank_images[:2]
    a = make(seed=0)
    a.setup(bank_images)
    fa = a(images)
    b = make(seed=0)
    b.setup(bank_images)
    assert torch.allclose(fa, b(images), atol=1e-6)
    c = make(seed=1)
    c.setup(bank_images)
    assert not torch.allclose(fa[:, 48:], c(images)[:, 48:], atol=1e-2)
    a.save(tmp_path / "state.safetensors")
    d = make(seed=7).load(tmp_path / "state.safetensors")  # no setup: negatives come from the file
    assert d.seed == 0
    assert torch.allclose(fa, d(images), atol=1e-6)
    with pytest.raises(ValueError, match="objectives"):
        make(objectives=("kl",)).load(tmp_path / "state.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        make().load(tmp_path / "missing.safetensors")


def test_load_refuses_a_state_of_a_model_of_another_width(tmp_path, bank_images):
    """A state written with another model width (fungi-extract state= with other model_kwargs) was a RuntimeError
    on tensor sizes deep in load."""
    import timm

    a = make(seed=0)
    a.setup(bank_images[:2])
    a.save(tmp_path / "state.safetensors")
    wide = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2
    )
    with pytest.raises(ValueError, match=r"gradient of 2352 values, this model.s has 4160: the state belongs"):
        make(model=Backbone(wide)).load(tmp_path / "state.safetensors")


def test_load_refuses_other_objective_options(tmp_path, images, bank_images):
    a = make(seed=0)
    a.setup(bank_images[:2])
    a.save(tmp_path / "state.safetensors")

    def load(options):
        torch.manual_seed(0)
        ex = FUNGIExtractor(tiny_timm(), seed=0, objective_options=options)
        return ex.load(tmp_path / "state.safetensors")

    other = {**OPTIONS, "dino": {**OPTIONS["dino"], "teacher_temperature": 0.5}, "kl": {"temperature": 1}}
    with pytest.raises(ValueError, match=r"kl.temperature: saved 15.0, here 1.*dino.teacher_temperature"):
        load(other)
    with pytest.raises(ValueError, match=r"dino.latent_dim: saved 64, here 32"):
        load({**OPTIONS, "dino": {**OPTIONS["dino"], "latent_dim": 32}})
    # spelling out a default, or a tuple where JSON gives a list, is the same setting
    same = {**OPTIONS, "kl": {"temperature": 15.0}, "dino": {**OPTIONS["dino"], "global_scale": (0.25, 1.0)}}
    assert torch.allclose(load(same)(images[:2]), a(images[:2]), atol=1e-6)


def test_simclr_needs_negatives_and_objective_names(images):
    with pytest.raises(RuntimeError, match="setup"):
        make(objectives=("simclr",))(images)
    with pytest.raises(ValueError, match="unknown objectives"):
        make(objectives=("kl", "mae"))


def test_pil_input_and_extract(images):
    ex = FUNGIExtractor(
        Backbone(tiny_timm(), input_size=32, resize_size=36), objectives=("kl",), seed=0, objective_options=OPTIONS
    )
    pil = [Image.new("RGB", (40, 50), color=(10 * i, 100, 200)) for i in range(3)]
    feats = ex(pil)
    assert feats.shape == (3, 96)
    dataset = [(im, i) for i, im in enumerate(pil)]
    assert torch.allclose(ex.extract(dataset, batch_size=2), feats, atol=1e-5)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]
        ),
    ],
)
def test_bfloat16_autocast_close_to_float32(images, device):
    feats = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        ex = FUNGIExtractor(
            tiny_timm(), objectives=("kl", "dino"), seed=0, device=device, dtype=dtype, objective_options=OPTIONS
        )
        feats[dtype] = ex(images[:2]).view(2, 3, 48).cpu()
    cos = F.cosine_similarity(feats[torch.float32], feats[torch.bfloat16], dim=-1)
    assert feats[torch.bfloat16].dtype == torch.float32 and (cos > 0.99).all()


def test_projection_lives_on_the_extractor_device():
    """The +-1 matrix is built once on the extractor's device (the meta device stands in for a GPU here), so a batch
    does not copy it from the host."""
    ex = FUNGIExtractor(tiny_timm(), seed=0, device="meta")
    ex.build(8)
    assert ex.projection.device.type == "meta" and ex.projection.dtype == torch.int8


def test_extract_blocks_keeps_dataset_order_and_labels_across_batches(images):
    ex = make(objectives=("kl",))
    labels = [3, 1, 4, 1]
    items = [(image, y, f"extra {i}") for i, (image, y) in enumerate(zip(images, labels))]  # label: second entry
    blocks, ys = ex.extract_blocks(items, batch_size=3)  # batches of 3 and 1
    assert ys.dtype == torch.long and ys.tolist() == labels
    whole = ex.blocks(images)
    assert list(blocks) == ["embeddings", "kl"]
    for name in blocks:
        assert torch.allclose(blocks[name], whole[name], atol=1e-5), name
    assert ex.extract_blocks(list(images), batch_size=3)[1].tolist() == [-1] * 4  # unlabelled inputs
