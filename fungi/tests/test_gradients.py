import pytest
import torch

from fungi.gradients import (
    default_layer,
    layer_io_gradients,
    module_call_guard,
    per_sample_gradients,
    per_sample_gradients_loop,
)
from fungi.losses import dino_per_sample, kl_uniform_per_sample
from fungi.tiny import tiny_ast, tiny_bert, tiny_hf_vit, tiny_t5, tiny_timm, tiny_torchvision


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
    "hf_t5": (tiny_t5, "model.encoder.block.1.layer.0.SelfAttention.o", 32, None),
}
T5_LAYER = CASES["hf_t5"][1]


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
    assert fast.shape == (3, linear.out_features, linear.in_features + (linear.bias is not None))
    assert slow.abs().max() > 0
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5 * slow.abs().max().item())
    # each sample's gradient is its own: the samples differ
    assert not torch.allclose(fast[0], fast[1])


def _t5_views():
    """(3, 2, 9) token ids padded on the right with T5's pad id 0: lengths 9, 6 / 4, 9 / 2, 7."""
    ids = torch.randint(2, 64, (3, 2, 9), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([[9, 6], [4, 9], [2, 7]])
    mask = (torch.arange(9) < lengths[..., None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}, lengths


def test_t5_batched_gradients_equal_unpadded_autograd_one_sample_at_a_time():
    torch.manual_seed(0)
    model = tiny_t5()
    views, lengths = _t5_views()
    loss_fn = _loss_fn(32)
    fast = per_sample_gradients(model, T5_LAYER, views, loss_fn)
    weight = model.get_submodule(T5_LAYER).weight
    assert model.get_submodule(T5_LAYER).bias is None and weight.shape == (32, 16)
    assert fast.shape == (3, 32, 16)  # (B, O, I): no bias column
    weight.requires_grad_(True)
    try:
        for b in range(3):  # each view alone and unpadded: plain autograd of the sample's loss w.r.t. the weight
            emb = torch.stack([model(views["input_ids"][b, v : v + 1, : lengths[b, v]])[0] for v in range(2)])
            (expected,) = torch.autograd.grad(loss_fn(emb[None])[0], weight)
            torch.testing.assert_close(fast[b], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    finally:
        weight.requires_grad_(False)


def test_t5_first_token_feature_gets_gradient_from_token_zero_only():
    torch.manual_seed(0)
    model = tiny_t5()
    views, _ = _t5_views()
    flat = {k: v.flatten(0, 1) for k, v in views.items()}
    acts, grad_out = layer_io_gradients(model, T5_LAYER, flat, lambda emb: emb.pow(2).sum(-1))
    assert grad_out[:, 0].abs().min() > 0 and not grad_out[:, 1:].any()
    first_views = {k: v[:, :1] for k, v in views.items()}
    grads = per_sample_gradients(model, T5_LAYER, first_views, lambda emb: emb.pow(2).sum((1, 2)))
    outer = torch.einsum("no,ni->noi", grad_out[::2, 0], acts[::2, 0])  # the first view of each sample
    torch.testing.assert_close(grads, outer, rtol=1e-5, atol=1e-6)


def test_t5_right_padding_changes_neither_feature_nor_gradient():
    torch.manual_seed(0)
    model = tiny_t5()
    ids = torch.tensor([[[5, 17, 30, 1]]])  # (B, V, T), ends with eos as T5's tokenizer writes it
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 1, 5, dtype=torch.long)], -1)}
    padded["attention_mask"] = (torch.arange(9) < 4).long().expand(1, 1, 9)
    loss_fn = _loss_fn(32)
    with torch.no_grad():
        torch.testing.assert_close(model(**{k: v[0] for k, v in padded.items()}), model(ids[0]), rtol=1e-5, atol=1e-6)
    alone = per_sample_gradients(model, T5_LAYER, {"input_ids": ids}, loss_fn)
    torch.testing.assert_close(per_sample_gradients(model, T5_LAYER, padded, loss_fn), alone, rtol=1e-5, atol=1e-6)


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
