import pytest
import torch
from PIL import Image

from fungi import FUNGIExtractor
from fungi.models import build_backbone, build_torchvision, torchvision_backbone

TINY_VIT = {"patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}


def photo(width=90, height=60):
    """A non-square RGB image with structure (so resizes and crops show)."""
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def test_timm_transform_uses_built_img_size():
    import timm

    bb = build_backbone("timm:vit_small_patch16_224.augreg_in1k", pretrained=False, img_size=64, **TINY_VIT)
    assert (bb.input_size, bb.resize_size, bb.interpolation) == (64, 71, "bicubic")  # crop_pct 0.9: floor(64 / 0.9)
    # timm's own eval transform at the overridden size, as an independent reference
    cfg = timm.data.resolve_data_config({"input_size": (3, 64, 64)}, model=bb.model)
    reference = timm.data.create_transform(**cfg)(photo())
    ex = FUNGIExtractor(bb, objectives=("kl",), seed=0)
    assert torch.allclose(ex.transform(photo()), reference, atol=1e-5)
    assert ex([photo(), photo(50, 70)]).shape == (2, 96)


def test_dino_and_dinov2_use_their_official_eval_transform_as_the_reference():
    from torchvision import transforms as T

    # the reference (src/models/dino.py, dinov2.py): Resize(256, bicubic), CenterCrop(224), ImageNet mean / std,
    # where timm's data config would resize DINO to floor(224 / 0.9) = 248 and DINOv2 at 224 px to 224
    reference = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    tiny14 = {**TINY_VIT, "patch_size": 14, "dynamic_img_size": True}
    for bb in (
        build_backbone("timm:vit_base_patch16_224.dino", pretrained=False, **TINY_VIT),
        build_backbone("timm:vit_base_patch14_dinov2.lvd142m", False, None, 224, **tiny14),
    ):
        assert (bb.input_size, bb.resize_size, bb.interpolation) == (224, 256, "bicubic")
        image = photo(400, 300)
        torch.testing.assert_close(FUNGIExtractor(bb, objectives=()).transform(image), reference(image))
    # CLIP keeps timm's data config, as the reference's clip_vision.py (timm's create_transform): floor(224 / 0.9)
    clip = build_backbone("timm:vit_base_patch16_clip_224.openai", pretrained=False, **TINY_VIT)
    assert (clip.input_size, clip.resize_size) == (224, 248)


def test_timm_model_kwargs_may_keep_a_head_as_the_reference_clip_models():
    # the reference builds CLIP / EVA-CLIP with timm's default head (the 512-d image projection): model_kwargs
    # num_classes must reach timm instead of clashing with the num_classes=0 default
    clip = build_backbone("timm:vit_base_patch16_clip_224", pretrained=False, img_size=32, num_classes=16, **TINY_VIT)
    assert clip.model.head.out_features == 16
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pooled = clip.model.forward_head(clip.model.forward_features(x), pre_logits=True)
    assert torch.allclose(clip.model(x), clip.model.head(pooled), atol=1e-6)
    assert (
        build_backbone("timm:vit_base_patch16_clip_224", pretrained=False, img_size=32, **TINY_VIT).model(x).shape[1]
        == 48
    )


def test_timm_input_size_on_a_dynamic_vit_interpolates_like_dino():
    from funai_common.vit import DinoInterpolationViT, dino_interpolate

    torch.manual_seed(0)
    bb = build_backbone(
        "timm:vit_small_patch16_224.dino", False, None, 32, img_size=64, dynamic_img_size=True, **TINY_VIT
    )
    # DINO's official crop_pct 0.875: floor(32 / 0.875)
    assert isinstance(bb.model, DinoInterpolationViT) and (bb.input_size, bb.resize_size) == (32, 36)
    x = torch.randn(2, 3, 32, 32)
    m = bb.model
    grid = 32 // m.patch_embed.patch_size[0]
    pos = torch.cat([m.pos_embed[:, :1], dino_interpolate(m.pos_embed[:, 1:], (grid, grid))], 1)
    tokens = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(x).flatten(1, 2)], 1) + pos
    torch.testing.assert_close(m(x), m.norm(m.blocks(tokens))[:, 0])
    with pytest.raises(ValueError, match=r"input_size=32 differs from .* built size 64.*dynamic_img_size: true"):
        build_backbone("timm:vit_small_patch16_224.dino", False, None, 32, img_size=64, **TINY_VIT)
    with pytest.raises(ValueError, match="input_size=32 applies to timm models"):
        build_backbone("torchvision:vit_b_16", False, None, 32)


def test_dynamic_vits_the_dino_interpolation_does_not_fit_keep_timms_resampling():
    from timm.models.deit import VisionTransformerDistilled

    from funai_common.vit import DinoInterpolationViT

    # DeiT's distillation token: a VisionTransformer subclass with its own token layout
    kw = {"img_size": 64, "dynamic_img_size": True, **TINY_VIT}
    bb = build_backbone("timm:deit_tiny_distilled_patch16_224", False, None, 32, **kw)
    assert type(bb.model) is VisionTransformerDistilled and bb.model(torch.randn(1, 3, 32, 32)).shape[0] == 1
    # a 2 x 8 table (as many entries as 4 x 4) is not an M x M grid
    bb = build_backbone("timm:vit_small_patch16_224", False, None, 48, **{**kw, "img_size": (32, 128)})
    assert not isinstance(bb.model, DinoInterpolationViT) and bb.model(torch.randn(1, 3, 48, 48)).shape == (1, 48)


def test_timm_keeps_model_mean_std_crop():
    bb = build_backbone("timm:vit_base_patch16_clip_224.openai", pretrained=False, img_size=32, **TINY_VIT)
    assert bb.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert bb.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert (bb.resize_size, bb.interpolation) == (35, "bicubic")  # crop_pct 0.9: floor(32 / 0.9)


def tiny_vit_tv(image_size):
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size, patch_size=image_size // 2, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8)


def test_torchvision_transform_from_weights():
    from torchvision.models import ViT_B_16_Weights, ViT_H_14_Weights

    bb = torchvision_backbone(tiny_vit_tv(518), ViT_H_14_Weights.DEFAULT)  # SWAG E2E weights: resize 518, crop 518
    assert (bb.input_size, bb.resize_size, bb.interpolation) == (518, 518, "bicubic")
    bb = torchvision_backbone(tiny_vit_tv(224), ViT_B_16_Weights.DEFAULT)
    assert (bb.input_size, bb.resize_size, bb.interpolation) == (224, 256, "bilinear")
    with pytest.raises(ValueError, match="518"):
        torchvision_backbone(tiny_vit_tv(224), ViT_H_14_Weights.DEFAULT)


def test_torchvision_without_weights_scales_resize_with_size():
    bb = build_torchvision("vit_b_32", pretrained=False, image_size=384)
    assert (bb.input_size, bb.resize_size) == (384, 438)  # floor(384 / 0.875)
    x = FUNGIExtractor(bb, objectives=()).transform(Image.new("RGB", (800, 600), (255, 255, 255)))
    assert x.shape == (3, 384, 384) and (x > 0).all()  # white everywhere: no black padding


def save_hf_vit(path, processor):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    ViTModel(cfg).save_pretrained(path)
    processor.save_pretrained(path)


def test_hf_image_processor_direct_resize(tmp_path):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 32, "width": 32})
    save_hf_vit(tmp_path, processor)
    bb = build_backbone(f"hf:{tmp_path}")
    assert (bb.mean, bb.std, bb.input_size, bb.resize_size) == ((0.5,) * 3, (0.5,) * 3, 32, (32, 32))
    ex = FUNGIExtractor(bb, objectives=("kl",))
    expected = processor(images=photo(), return_tensors="pt")["pixel_values"][0]  # squashes, no crop
    assert torch.allclose(ex.transform(photo()), expected, atol=2 / 255 + 1e-6)  # one uint8 level (rounding)


def test_hf_image_processor_resize_and_crop(tmp_path):
    from transformers import BitImageProcessor

    processor = BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    save_hf_vit(tmp_path, processor)
    bb = build_backbone(f"hf:{tmp_path}")
    assert (bb.input_size, bb.resize_size, bb.interpolation) == (32, 40, "bicubic")
    assert bb.mean == pytest.approx(processor.image_mean) and bb.std == pytest.approx(processor.image_std)
    expected = processor(images=photo(), return_tensors="pt")["pixel_values"][0]
    diff = (FUNGIExtractor(bb, objectives=()).transform(photo()) - expected).abs()
    assert diff.max() < 0.016 and diff.mean() < 1e-3  # one uint8 level / CLIP std 0.26 = 0.015


def test_hf_folder_without_processor_falls_back_to_imagenet_transform(tmp_path, caplog):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    ViTModel(cfg).save_pretrained(tmp_path)
    bb = build_backbone(f"hf:{tmp_path}")
    assert (bb.input_size, bb.resize_size) == (32, 36)  # floor(32 / 0.875)
    assert "no image processor" in caplog.text


def test_hf_t5_encoder_decoder_keeps_its_encoder():
    from transformers import T5Model

    from fungi.models import wrap_hf
    from fungi.tiny import tiny_t5_config

    model = T5Model(tiny_t5_config()).eval()
    bb = wrap_hf(model, "text")
    ids = torch.tensor([[5, 9, 1], [7, 1, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        expected = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        torch.testing.assert_close(bb.model(ids, mask), expected)
    assert FUNGIExtractor(bb, objectives=("kl",)).layer == "model.block.1.layer.0.SelfAttention.o"


def test_encoder_only_model_with_a_decoder_module_is_kept_whole():
    """Funnel is encoder-only but names its upsampling block ``decoder``: only encoder-decoders lose their decoder."""
    from transformers import FunnelConfig, FunnelModel

    from fungi.models import wrap_hf

    cfg = FunnelConfig(vocab_size=32, block_sizes=[1, 1], d_model=16, n_head=2, d_head=8, d_inner=32)
    model = FunnelModel(cfg).eval()
    ids = torch.tensor([[5, 9, 3, 2], [7, 4, 6, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        torch.testing.assert_close(wrap_hf(model, "text").model(ids, mask), expected)


@pytest.mark.parametrize(
    "name", ["timm:vit_small_patch16_224.dino", "hf:google-bert/bert-base-uncased", "hf:google-t5/t5-small"]
)
def test_unavailable_pretrained_weights_are_an_error_naming_the_model(offline_hub, name):
    with pytest.raises(FileNotFoundError, match=f"pretrained weights of model={name} not available.*checkpoint=PATH"):
        build_backbone(name)


class _HiddenStates(torch.nn.Module):
    """Stands in for a Hugging Face encoder: last_hidden_state (B, 4, 2) with token t holding the value t."""

    def forward(self, **inputs):
        from types import SimpleNamespace

        batch = next(iter(inputs.values())).shape[0]
        hidden = torch.arange(4.0)[None, :, None].expand(batch, 4, 2) + torch.tensor([0.0, 10.0])
        return SimpleNamespace(last_hidden_state=hidden)


def test_hugging_face_pooling_per_modality():
    from fungi.models import HFAudioEmbedder, HFImageEmbedder, HFTextEmbedder

    stub = _HiddenStates()
    cls = torch.tensor([[0.0, 10.0]] * 2)
    assert torch.equal(HFImageEmbedder(stub)(torch.zeros(2, 3, 8, 8)), cls)  # CLS token, pooler unused
    assert torch.equal(HFTextEmbedder(stub)(torch.zeros(2, 5, dtype=torch.long)), cls)  # first token
    # AST: mean of the CLS (token 0) and distillation (token 1) tokens
    assert torch.equal(HFAudioEmbedder(stub)(torch.zeros(2, 16, 8)), torch.tensor([[0.5, 10.5]] * 2))
