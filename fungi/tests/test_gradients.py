import pytest
import torch

from fungi.gradients import default_layer, module_call_guard, per_sample_gradients, per_sample_gradients_loop
from fungi.losses import dino_per_sample, kl_uniform_per_sample
from fungi.tiny import tiny_ast, tiny_bert, tiny_hf_vit, tiny_timm, tiny_torchvision


def _loss_fn(embed_dim):
    head = torch.nn.Linear(embed_dim, 12)
    teacher = torch.nn.Linear(embed_dim, 12)

    def loss_fn(emb):  # a DINO-like loss mixing the views of each sample (never across samples)
        return dino_per_sample(head(emb), teacher(emb[:, :1])) + kl_uniform_per_sample(head(emb[:, 0]), 2.0)

    return loss_fn


def _views(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CASES = {
    "timm": (tiny_timm, "blocks.1.attn.proj", 48, lambda: _views((3, 2, 3, 32, 32))),
    "torchvision": (
        tiny_torchvision,
        "encoder.layers.encoder_layer_1.self_attention.out_proj",
        48,
        lambda: _views((3, 2, 3, 32, 32)),
    ),
    "hf_vit": (tiny_hf_vit, None, 32, lambda: _views((3, 2, 3, 32, 32))),
    "hf_ast": (tiny_ast, None, 32, lambda: _views((3, 2, 48, 32))),
    "hf_bert": (tiny_bert, "model.encoder.layer.1.attention.output.dense", 32, None),
}


def _bert_views():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 64, (3, 2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 1, 6:] = 0  # padding must not leak into the gradient
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", list(CASES))
def test_batched_equals_per_sample_loop(family):
    torch.manual_seed(0)
    build, layer, embed_dim, views = CASES[family]
    model = build()
    expected_layer = layer or default_layer(model)
    assert default_layer(model) == expected_layer
    views = _bert_views() if views is None else views()
    loss_fn = _loss_fn(embed_dim)
    fast = per_sample_gradients(model, expected_layer, views, loss_fn)
    slow = per_sample_gradients_loop(model, expected_layer, views, loss_fn)
    linear = model.get_submodule(expected_layer)
    assert fast.shape == (3, linear.out_features, linear.in_features + 1)
    assert slow.abs().max() > 0
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5 * slow.abs().max().item())
    # each sample's gradient is its own: the samples differ
    assert not torch.allclose(fast[0], fast[1])


def test_bias_column_and_sum_over_tokens_by_hand():
    # model: embedding = mean over 2 tokens of W x_t + b; loss_b = sum(emb_b) -> dW = sum_t x_t / 2 per output row
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.proj(x).mean(1)

    model = Toy()
    views = torch.randn(4, 1, 2, 3)
    grads = per_sample_gradients(model, "proj", views, lambda e: e.sum(-1).sum(-1))
    expected_w = views[:, 0].sum(1)[:, None, :].expand(4, 2, 3) / 2
    assert torch.allclose(grads[..., :3], expected_w, atol=1e-6)
    assert torch.allclose(grads[..., 3], torch.ones(4, 2))


def test_batch_composition_does_not_change_gradients(timm_vit):
    views = _views((4, 2, 3, 32, 32))
    loss_fn = _loss_fn(48)
    full = per_sample_gradients(timm_vit, "blocks.1.attn.proj", views, loss_fn)
    parts = torch.cat(
        [per_sample_gradients(timm_vit, "blocks.1.attn.proj", views[i : i + 1], loss_fn) for i in range(4)]
    )
    assert torch.allclose(full, parts, rtol=1e-5, atol=1e-5 * full.abs().max().item())


def test_prefix_runs_without_autograd(timm_vit):
    seen = []
    handle = timm_vit.blocks[0].register_forward_hook(lambda m, a, o: seen.append(o.requires_grad))
    try:
        per_sample_gradients(timm_vit, "blocks.1.attn.proj", _views((1, 1, 3, 32, 32)), lambda e: e.sum((1, 2)))
    finally:
        handle.remove()
    assert seen == [False]
    assert torch.is_grad_enabled()


def test_patched_mha_matches_native():
    model = tiny_torchvision()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        native = model(x)
        with module_call_guard(model, model.get_submodule("encoder.layers.encoder_layer_1.self_attention.out_proj")):
            patched = model(x)
    assert torch.allclose(native, patched, atol=1e-5)
    assert "forward" not in vars(model.encoder.layers.encoder_layer_1.self_attention)


def test_bad_layer_errors(timm_vit):
    views = _views((1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="not found"):
        per_sample_gradients(timm_vit, "blocks.9.attn.proj", views, lambda e: e.sum((1, 2)))
    with pytest.raises(ValueError, match="expected torch.nn.Linear"):
        per_sample_gradients(timm_vit, "blocks.1.attn", views, lambda e: e.sum((1, 2)))
    with pytest.raises(ValueError, match="per-sample losses"):
        per_sample_gradients(timm_vit, "blocks.1.attn.proj", views, lambda e: e.sum())
    with pytest.raises(ValueError, match="attention output projection"):
        default_layer(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_inference_mode_is_a_clear_error(timm_vit):
    views = _views((1, 1, 3, 32, 32))
    with torch.no_grad():  # fine: autograd is re-enabled at the layer
        expected = per_sample_gradients(timm_vit, "blocks.1.attn.proj", views, lambda e: e.sum((1, 2)))
    assert torch.equal(expected, per_sample_gradients(timm_vit, "blocks.1.attn.proj", views, lambda e: e.sum((1, 2))))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="need autograd.*inference_mode"):
        per_sample_gradients(timm_vit, "blocks.1.attn.proj", views, lambda e: e.sum((1, 2)))
