"""Tiny randomly initialised models of every supported family (tests, demo, CPU smoke runs)."""

import torch


def tiny_timm():
    """timm ViT-S/16 architecture shrunk to 32 px, patch 8, depth 2, width 48 -> embeddings (n, 48)."""
    import timm

    return timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=2,
        num_classes=0,
    ).eval()


def tiny_torchvision():
    """torchvision VisionTransformer (32 px, patch 8, 2 layers, width 48), head removed -> (n, 48)."""
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=48, mlp_dim=96
    )
    model.heads = torch.nn.Identity()
    return model.eval()


def tiny_bert():
    """Hugging Face BERT (vocab 64, width 32, 2 layers) wrapped to CLS embeddings (n, 32)."""
    from transformers import BertConfig, BertModel

    from fungi.models import wrap_hf

    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return wrap_hf(BertModel(cfg), "text").model


def tiny_t5_config():
    """T5 config: vocab 64 (pad 0, eos 1), width 32, 2 blocks of 2 heads x 8 (attention output projection 16 -> 32,
    no bias)."""
    from transformers import T5Config

    return T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)


def tiny_t5():
    """Hugging Face T5 encoder (``tiny_t5_config``) wrapped to first-token embeddings (n, 32)."""
    from transformers import T5EncoderModel

    from fungi.models import wrap_hf

    return wrap_hf(T5EncoderModel(tiny_t5_config()), "text").model


def tiny_hf_vit():
    """Hugging Face ViT (32 px, patch 8, width 32, 2 layers) wrapped to CLS embeddings (n, 32)."""
    from transformers import ViTConfig, ViTModel

    from fungi.models import wrap_hf

    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return wrap_hf(ViTModel(cfg), "image").model


def tiny_ast():
    """Hugging Face AST (48 frames x 32 mel bins, patch 16, width 32, 2 layers) -> (n, 32)."""
    from transformers import ASTConfig, ASTModel

    from fungi.models import wrap_hf

    cfg = ASTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_length=48,
        num_mel_bins=32,
        patch_size=16,
        frequency_stride=16,
        time_stride=16,
    )
    return wrap_hf(ASTModel(cfg), "audio").model
