import pytest

TINY_VIT = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


@pytest.fixture
def tiny_model_cfg() -> dict:
    return {
        "backbone": "vit_small_patch16_224.dino",
        "pretrained": False,
        "checkpoint_path": None,
        "backbone_kwargs": dict(TINY_VIT),
        "img_size": 64,
        "fim_dim": 32,
        "fim_depth": 1,
        "fim_heads": 2,
        "mlp_ratio": 2.0,
        "decoder_width": 16,
        "decoder_groups": 4,
    }
