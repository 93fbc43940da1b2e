import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sharelock.losses import LOGIT_SCALE, clip_loss
from sharelock.models import ProjectionHead, ShareLock


def manual_head(x, linears, bns, normalize=True, train=False):
    """The reference block by hand: (Linear, BN, ReLU)^(L-1), Linear; BN with explicit statistics."""
    for lin, bn in zip(linears[:-1], bns):
        x = x @ lin.weight.t() + lin.bias
        if train:
            mean, var = x.mean(0), x.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        x = (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        x = torch.clamp(x, min=0)
    x = x @ linears[-1].weight.t() + linears[-1].bias
    return x / torch.sqrt((x * x).sum(-1, keepdim=True)) if normalize else x


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_head_layout_and_eval_forward(layers):
    torch.manual_seed(layers)
    head = ProjectionHead(6, 5, hidden_dim=7, num_layers=layers)
    mods = [m for m in head.modules() if isinstance(m, nn.Linear | nn.BatchNorm1d | nn.ReLU | nn.Dropout)]
    expected = [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout] * (layers - 1) + [nn.Linear]
    assert [type(m) for m in mods] == expected
    assert all(m.p == 0.2 for m in mods if isinstance(m, nn.Dropout))
    linears = [m for m in mods if isinstance(m, nn.Linear)]
    bns = [m for m in mods if isinstance(m, nn.BatchNorm1d)]
    for bn in bns:  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(9, 6)
    head.eval()
    out = head(x)
    assert out.shape == (9, 5)
    torch.testing.assert_close(out, manual_head(x, linears, bns), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(9))


def test_head_train_mode_batchnorm_statistics():
    torch.manual_seed(0)
    head = ProjectionHead(4, 3, hidden_dim=5, num_layers=2, dropout=0.0)
    bn = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)][0]
    lin = [m for m in head.modules() if isinstance(m, nn.Linear)]
    x = torch.randn(8, 4)
    head.train()
    out = head(x)
    torch.testing.assert_close(out, manual_head(x, lin, [bn], train=True), atol=1e-5, rtol=1e-5)
    pre = x @ lin[0].weight.t() + lin[0].bias
    # running stats: momentum 0.1 towards the batch mean and the *unbiased* batch variance
    torch.testing.assert_close(bn.running_mean, 0.1 * pre.mean(0).detach())
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * pre.var(0, unbiased=True).detach())


def test_head_identity_and_unnormalised():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    torch.testing.assert_close(ProjectionHead(2, 99, num_layers=0)(x), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(ProjectionHead(2, 99, num_layers=0, normalize=False)(x), x)
    assert ProjectionHead(2, 99, num_layers=0).output_dim == 2


def test_sharelock_embedding_dim_rule_and_param_count():
    m = ShareLock(vision_dim=12, text_dim=20, text_layers=3, hidden_dim=16, vision_layers=0, embedding_dim=999)
    zv, zt = m(torch.randn(5, 12), torch.randn(5, 20))
    assert zv.shape == zt.shape == (5, 12)
    torch.testing.assert_close(zv.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(zt.norm(dim=-1), torch.ones(5))
    m2 = ShareLock(vision_dim=12, text_dim=20, text_layers=2, hidden_dim=16, vision_layers=2, embedding_dim=7)
    assert [t.shape for t in m2(torch.randn(5, 12), torch.randn(5, 20))] == [(5, 7), (5, 7)]
    # spec: vision dim 768, text 4096, 4 layers, hidden 4096 -> 3 x (Linear 4096^2 + BN) + Linear(4096, 768)
    ref = ShareLock(768, 4096)
    expected = 3 * (4096 * 4096 + 4096 + 2 * 4096) + 4096 * 768 + 768
    assert sum(p.numel() for p in ref.parameters()) == expected


def test_zero_shot_logits_hand_case():
    # identity heads (text_layers=0) make the expected cosines easy to write down
    m = ShareLock(vision_dim=2, text_dim=2, text_layers=0)
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    classes = torch.tensor([[0.0, 5.0], [3.0, 0.0]])
    logits = m.zero_shot_logits(v, classes)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(logits, torch.tensor([[0.0, 1.0], [1.0, 0.0], [s, s]]))
    labels = torch.tensor([1, 0, 0])
    assert (logits.argmax(1) == labels).float().mean().item() == 1.0


def test_zero_shot_logits_uses_eval_mode_and_restores_training():
    torch.manual_seed(0)
    m = ShareLock(vision_dim=4, text_dim=6, text_layers=2, hidden_dim=8)
    m.train()
    v, c = torch.randn(3, 4), torch.randn(5, 6)
    a = m.zero_shot_logits(v, c)
    assert m.training
    m.eval()
    expected = F.normalize(v, dim=-1) @ m.text_head(c).t()
    torch.testing.assert_close(a, expected)
    assert a.shape == (3, 5)


def test_clip_loss_hand_case_and_properties():
    # B=1: a 1x1 softmax always gives probability 1
    assert clip_loss(torch.randn(1, 4), torch.randn(1, 4)).item() == pytest.approx(0.0, abs=1e-7)
    # B=2, rows 0.3*e_i: logits 0.09*s*I -> each CE = log(1 + e^{-0.09 s}), identical for rows and columns
    eye = torch.eye(2)
    s = math.exp(2.6592)
    assert clip_loss(0.3 * eye, 0.3 * eye).item() == pytest.approx(math.log1p(math.exp(-0.09 * s)), rel=1e-5)
    assert LOGIT_SCALE == pytest.approx(s, rel=1e-6)
    # a non-symmetric case against a by-hand softmax in float64
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    logits = (s * a @ b.t()).double()

    def ce(m):
        return -sum(m[i, i] - torch.logsumexp(m[i], 0) for i in range(2)) / 2

    assert clip_loss(a, b).item() == pytest.approx(0.5 * (ce(logits) + ce(logits.t())).item(), rel=1e-5)
    # symmetric in its two inputs; custom scale
    x, y = torch.randn(6, 3), torch.randn(6, 3)
    torch.testing.assert_close(clip_loss(x, y), clip_loss(y, x))
    assert clip_loss(eye, eye, logit_scale=1.0).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-5)
    with pytest.raises(ValueError, match="equal shape"):
        clip_loss(torch.randn(2, 3), torch.randn(3, 3))


def test_clip_loss_gradient_matches_closed_form():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_(True)
    b = F.normalize(torch.randn(4, 3), dim=-1).requires_grad_(True)
    clip_loss(a, b).backward()
    s = LOGIT_SCALE
    a0, b0 = a.detach(), b.detach()
    logits = s * a0 @ b0.t()
    p_rows, p_cols = logits.softmax(1), logits.t().softmax(1)
    eye = torch.eye(4)
    # dL/da = s/(2B) [(P_rows - I) b + (P_cols - I)^T b]
    grad = s / 8 * ((p_rows - eye) @ b0 + (p_cols - eye).t() @ b0)
    torch.testing.assert_close(a.grad, grad, atol=1e-5, rtol=1e-4)
    # dL/db = s/(2B) [(P_rows - I)^T a + (P_cols - I) a]
    grad_b = s / 8 * ((p_rows - eye).t() @ a0 + (p_cols - eye) @ a0)
    torch.testing.assert_close(b.grad, grad_b, atol=1e-5, rtol=1e-4)


def test_embedding_dim_when_only_the_text_head_is_identity():
    m = ShareLock(vision_dim=6, text_dim=4, text_layers=0, vision_layers=2, hidden_dim=8, embedding_dim=99)
    assert m.embedding_dim == 4
    assert [t.shape for t in m(torch.randn(3, 6), torch.randn(3, 4))] == [(3, 4), (3, 4)]
    with pytest.raises(ValueError, match="two identity heads"):
        ShareLock(vision_dim=6, text_dim=4, text_layers=0, vision_layers=0)


def test_reference_weight_layout_converts():
    from sharelock.models import from_reference_state_dict

    torch.manual_seed(0)
    # the official layout: Projection.projection = Sequential(Linear, BN, ReLU, Dropout, ..., Linear)
    ref = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 6)).eval()
    ref[1].running_mean.uniform_(-1, 1)
    state = {f"language_projector.projection.{k}": v for k, v in ref.state_dict().items()}
    m = ShareLock(vision_dim=6, text_dim=10, text_layers=2, hidden_dim=8)
    m.load_state_dict(from_reference_state_dict(state))
    x = torch.randn(4, 10)
    torch.testing.assert_close(m.eval().text_head(x), F.normalize(ref(x), dim=-1))


def test_model_loss_and_parameter_gradients_match_a_float64_hand_computation():
    """Spec g3: z_v, z_t, the loss and d loss / d params in eval mode, against the block written out by hand."""
    torch.manual_seed(0)
    m = ShareLock(vision_dim=5, text_dim=7, text_layers=3, hidden_dim=6, vision_layers=0, embedding_dim=99)
    bns = [mod for mod in m.text_head.modules() if isinstance(mod, nn.BatchNorm1d)]
    for bn in bns:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    m.eval()
    v, t = torch.randn(6, 5), torch.randn(6, 7)
    zv, zt = m(v, t)
    assert m.embedding_dim == 5 and zv.shape == zt.shape == (6, 5)  # identity vision head: d_v, not embedding_dim
    loss = clip_loss(zv, zt)
    loss.backward()

    # the same computation in float64 on leaf copies of the parameters
    leaves = {n: p.detach().double().requires_grad_(True) for n, p in m.named_parameters()}
    linears = [mod for mod in m.text_head.modules() if isinstance(mod, nn.Linear)]
    names = {id(p): n for n, p in m.named_parameters()}
    x = t.double()
    for i, lin in enumerate(linears):
        x = x @ leaves[names[id(lin.weight)]].t() + leaves[names[id(lin.bias)]]
        if i < len(bns):
            bn = bns[i]
            mean, var = bn.running_mean.double(), bn.running_var.double()
            x = (x - mean) / torch.sqrt(var + bn.eps) * leaves[names[id(bn.weight)]] + leaves[names[id(bn.bias)]]
            x = torch.clamp(x, min=0)
    ref_zt = x / torch.sqrt((x * x).sum(-1, keepdim=True))
    ref_zv = v.double() / torch.sqrt((v.double() ** 2).sum(-1, keepdim=True))
    s = math.exp(2.6592)
    logits = s * ref_zv @ ref_zt.t()
    rows = sum(torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(6)) / 6
    cols = sum(torch.logsumexp(logits[:, j], 0) - logits[j, j] for j in range(6)) / 6
    ref_loss = 0.5 * (rows + cols)
    grads = torch.autograd.grad(ref_loss, list(leaves.values()))
    torch.testing.assert_close(zv.double(), ref_zv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(zt.double(), ref_zt.detach(), atol=1e-5, rtol=1e-4)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for (name, p), g in zip(m.named_parameters(), grads):
        torch.testing.assert_close(p.grad.double(), g, atol=1e-5, rtol=1e-3, msg=name)
    # eval-mode BN: the running statistics are inputs, not updated by the forward pass
    assert all(bn.num_batches_tracked.item() == 0 for bn in bns)


def test_zero_shot_accuracy_from_features_hand_case():
    """Spec g4: argmax of cosine logits against the class prototypes, accuracy = mean equality, in batches."""
    from sharelock.eval import evaluate_features, topk_accuracy

    m = ShareLock(vision_dim=2, text_dim=2, text_layers=0)  # identity heads: prototypes = normalised class rows
    classifier = m.zero_shot_classifier(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
    torch.testing.assert_close(classifier, torch.eye(2))
    v = torch.tensor([[2.0, 1.0], [1.0, 3.0], [-1.0, 0.5], [1.0, -1.0], [0.5, 0.4]])
    labels = torch.tensor([0, 1, 0, 0, 1])
    # by hand: the larger coordinate (after normalisation) wins -> predictions 0, 1, 1, 0, 0: 3 of 5 right
    for batch_size in (2, 4096):
        out = evaluate_features(m, v, labels, classifier, batch_size=batch_size)
        assert out["top1"] == pytest.approx(60.0) and out["top5"] == pytest.approx(100.0)  # k capped at C = 2
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.0], [0.9, 0.2, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3]])
    # ranks of the true class: 2nd, 1st, 4th
    acc = topk_accuracy(logits, torch.tensor([2, 0, 0]), ks=(1, 2, 3, 5))
    assert acc == pytest.approx({"top1": 100 / 3, "top2": 200 / 3, "top3": 200 / 3, "top5": 100.0})


def test_unnormalised_heads_give_raw_dot_products(tmp_path):
    """Reference `normalize: False`: the head outputs are the raw projections, the loss and the zero-shot logits
    plain dot products (hand case); the flags travel with the checkpoint."""
    from sharelock.models import load_model
    from sharelock.training import save_checkpoint

    raw = ShareLock(vision_dim=2, text_dim=2, text_layers=0, vision_normalize=False, text_normalize=False)
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    classes = torch.tensor([[0.0, 5.0], [3.0, 0.0]])
    # v @ classes^T by hand, no division by norms
    torch.testing.assert_close(raw.zero_shot_logits(v, classes), torch.tensor([[0.0, 3.0], [10.0, 0.0], [5.0, 3.0]]))
    zv, zt = raw(v[:2], classes)
    torch.testing.assert_close(zv, v[:2])
    torch.testing.assert_close(zt, classes)
    # loss on the raw rows: logits s * [[0, 3], [10, 0]], both diagonal entries 0, so every row and column CE is
    # log(1 + e^{s * off-diagonal}); rows and columns hold the same two values
    s = LOGIT_SCALE
    assert clip_loss(zv, zt).item() == pytest.approx(0.5 * (math.log1p(math.exp(3 * s)) + math.log1p(math.exp(10 * s))))
    # with a trained text head only the text side changes: vision rows stay unit vectors
    torch.manual_seed(0)
    mixed = ShareLock(vision_dim=3, text_dim=5, text_layers=2, hidden_dim=4, text_normalize=False).eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(mixed.text_head(x), mixed.text_head.layers(x))
    torch.testing.assert_close(mixed.vision_head(torch.tensor([[3.0, 0.0, 4.0]])), torch.tensor([[0.6, 0.0, 0.8]]))
    # template ensemble: the plain mean of the raw text embeddings, no renormalising
    t1, t2 = torch.tensor([[2.0, 0.0], [0.0, 4.0]]), torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    torch.testing.assert_close(raw.ensemble((raw.encode_text(t1) + raw.encode_text(t2)) / 2), (t1 + t2) / 2)
    unit = ShareLock(vision_dim=2, text_dim=2, text_layers=0)
    torch.testing.assert_close(unit.ensemble(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))
    # the flags are part of the saved model config and restored by load_model
    save_checkpoint(tmp_path / "ckpt", mixed, {"model": mixed.config}, {"model": {}})
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.text_head.normalize is False and loaded.vision_head.normalize is True
    torch.testing.assert_close(loaded.encode_text(x), mixed.text_head.layers(x))


@pytest.mark.parametrize("normalize", [True, False])
def test_template_ensemble_from_a_prompt_store_averages_the_embeddings(tmp_path, normalize):
    """Prototypes of a `t/c` prompt store: per class, the mean over all templates of the text embeddings (each unit
    length, the mean renormalised; raw embeddings when the text head is unnormalised), whatever the row order."""
    from sharelock.eval import classifier_from_store
    from sharelock.store import FeatureStore, FeatureWriter

    torch.manual_seed(0)
    model = ShareLock(6, 5, text_layers=2, hidden_dim=7, text_normalize=normalize).eval()
    n_t, n_c = 3, 4
    feats = torch.randn(n_t, n_c, 5)
    keys = [(t, c) for t in range(n_t) for c in range(n_c)]
    order = torch.randperm(len(keys)).tolist()
    with FeatureWriter(tmp_path / "prompts", "llm", "text", 5, shard_size=5) as w:
        w.add([f"{keys[i][0]}/{keys[i][1]}" for i in order], torch.stack([feats[keys[i]] for i in order]))
    got = classifier_from_store(model, FeatureStore(tmp_path / "prompts"))
    with torch.no_grad():
        emb = model.text_head.layers(feats.reshape(-1, 5)).reshape(n_t, n_c, -1)
    if normalize:
        emb = emb / emb.norm(dim=-1, keepdim=True)
    expected = emb.mean(0)
    if normalize:
        expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
