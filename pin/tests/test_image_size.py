"""The synthetic canvas, eval frame and size bins follow the VLM's input size (codec.image_size = model.image_size)."""

from importlib import resources

import pytest
import torch

from pin.config import load_config
from pin.metrics import localisation_miou
from pin.pipeline import codec_from_cfg, dataset_from_cfg, pools_from_cfg, training_loss, vlm_from_cfg
from pin.synthetic import collate

SHIPPED = sorted(p.name[:-5] for p in (resources.files("pin") / "configs").iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_compose_at_the_model_resolution(name):
    cfg, _ = load_config(["--config", name])
    if cfg["model"]["image_size"] is not None:
        assert cfg["codec"]["image_size"] == cfg["model"]["image_size"]
    codec_from_cfg(cfg)  # the consistency check passes


def test_blip2_364_codec_frame():
    cfg, _ = load_config(["--config", "blip2_364"])
    codec = codec_from_cfg(cfg)
    # text vocabulary unchanged (0, 14, ..., 224); pixels in the 364 frame with cell ceil(364/16) = 23
    assert codec.encode([2, 3, 5, 7]) == "[28,42,84,112]"
    assert codec.decode(" [28,42,84,112]") == [46.0, 69.0, 138.0, 184.0]
    assert codec.decode(" [0,0,224,224]") == [0.0, 0.0, 364.0, 364.0]
    # size bins scale with 364/224: the small/medium edge moves from 32^2 to 52^2, so a 40 x 40 box changes bin
    box = [[0.0, 0.0, 40.0, 40.0]]
    assert localisation_miou(box, box, 224)["miou_m"] == 1.0
    assert localisation_miou(box, box, 364)["miou_s"] == 1.0


def test_mismatched_sizes_are_an_error_naming_both_keys():
    cfg, _ = load_config(["--config", "tiny", "model.image_size=112"])
    with pytest.raises(ValueError, match=r"codec\.image_size=224.*model\.image_size=112"):
        codec_from_cfg(cfg)
    # model.image_size null: the size the VLM resolves to (tiny BLIP-2: 224) is checked once it is built
    cfg, _ = load_config(["--config", "tiny", "codec.image_size=112"])
    with pytest.raises(ValueError, match=r"codec\.image_size=112.*model\.image_size=224"):
        vlm_from_cfg(cfg)


def test_training_at_another_resolution_uses_full_size_compositions(monkeypatch):
    cfg, _ = load_config(["--config", "tiny", "model.image_size=112", "codec.image_size=112"])
    vlm = vlm_from_cfg(cfg)
    pool, _, _ = pools_from_cfg(cfg)
    batch = collate([dataset_from_cfg(cfg, pool, "train", length=2)[i] for i in range(2)])
    assert batch["image"].shape == (2, 3, 112, 112)

    def no_resize(*args, **kwargs):
        raise AssertionError("compositions must not be resized to the model's input")

    monkeypatch.setattr(torch.nn.functional, "interpolate", no_resize)
    assert torch.isfinite(training_loss(vlm, codec_from_cfg(cfg), batch, "cpu"))
