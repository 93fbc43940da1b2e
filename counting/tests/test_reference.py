"""The official release (lukasknobel/SelfCollages `UnCounTRModel.pt` + `args.pt`) read through counting.reference."""

import argparse
import enum
import json
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from counting.checkpoint import save_checkpoint
from counting.config import load_config
from counting.eval import main as eval_main
from counting.models import build_model
from counting.predict import main as predict_main
from counting.reference import from_reference_state_dict, load_reference_model, read_reference_args


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def reference_layout(model) -> OrderedDict:
    """``model``'s weights as the reference's ``UnCounTRModel.state_dict()`` (shared encoder, paper head), keys in the
    order torch saves them, written out by hand from SelfCollages' UnCounTRModel.py, modules/Attention.py and
    modules/DensityMapDecoder.py: own parameters, then backbone / encoder / exemplar_encoder (one module under three
    names), fim_embed, fim_blocks, fim_norm, pred_head, then the ModuleList and ParameterList copies."""
    ours, dim = model.state_dict(), model.image_proj.out_features
    backbone = {k.replace("backbone.vit.", "model.", 1): v for k, v in ours.items() if k.startswith("backbone.vit.")}
    ref = OrderedDict(shot_token=torch.randn(model.backbone.embed_dim) * 0.02, fim_pos_embed=model.pos_embed[None])
    for name in ("backbone", "encoder", "exemplar_encoder"):
        ref.update({f"{name}.{k}": v for k, v in backbone.items()})
    modules = {"fim_embed": {"weight": ours["image_proj.weight"], "bias": ours["image_proj.bias"]}}
    modules["fim_blocks"] = {}
    for i in range(len(model.blocks)):

        def parts(t, i=i):
            def o(name):
                return ours[f"blocks.{i}.{name}.{t}"]

            return {
                "norm0": o("norm1"),
                "selfattn.qkv": torch.cat([o("self_attn.q"), o("self_attn.kv")]),
                "selfattn.proj": o("self_attn.proj"),
                "norm1": o("norm2"),
                "attn.wq": o("cross_attn.q"),
                "attn.wk": o("cross_attn.kv")[:dim],
                "attn.wv": o("cross_attn.kv")[dim:],
                "attn.proj": o("cross_attn.proj"),
                "norm2": o("norm3"),
                "mlp.fc1": o("mlp.0"),
                "mlp.fc2": o("mlp.2"),
            }

        weights, biases = parts("weight"), parts("bias")
        for part in weights:
            modules["fim_blocks"].update({f"{i}.{part}.weight": weights[part], f"{i}.{part}.bias": biases[part]})
    modules["fim_norm"] = {"weight": ours["norm.weight"], "bias": ours["norm.bias"]}
    modules["pred_head"] = {f"pred_head.{k[15:]}": v for k, v in ours.items() if k.startswith("decoder.stages.")}
    for name, entries in modules.items():
        ref.update({f"{name}.{k}": v for k, v in entries.items()})
    ref.update({f"backbone_modules.0.{k}": v for k, v in backbone.items()})
    for index, name in ((0, "fim_embed"), (1, "fim_blocks"), (2, "fim_norm"), (4, "pred_head")):
        ref.update({f"counting_modules.{index}.{k}": v for k, v in modules[name].items()})
    ref.update({f"backbone_parameters.{i}": v for i, v in enumerate(backbone.values())})
    head = [v for entries in modules.values() for v in entries.values()] + [ref["fim_pos_embed"], ref["shot_token"]]
    ref.update({f"counting_parameters.{i}": v for i, v in enumerate(head)})
    return ref


def tiny_model(**overrides):
    cfg, _ = load_config(["--config", "tiny"])
    cfg["model"].update(overrides)
    torch.manual_seed(0)
    return build_model(cfg["model"]).eval(), cfg


@pytest.fixture
def release(tmp_path):
    """A tiny model and its weights saved as the reference does: ``torch.save(model.state_dict(), ...)``."""
    model, cfg = tiny_model()
    path = tmp_path / "uncountr_model" / "UnCounTRModel.pt"
    path.parent.mkdir()
    torch.save(reference_layout(model), path)
    return model, cfg, path


def test_release_loads_exactly(release):
    model, _, path = release
    assert from_reference_state_dict(reference_layout(model)).keys() == model.state_dict().keys()
    loaded, cfg = load_reference_model(path, model_config="tiny")
    assert cfg["collage"]["density_scaling"] == 3000.0 and cfg["model"]["pretrained"] is False
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    torch.manual_seed(1)
    images, exemplars = torch.randn(2, 3, 64, 96), torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images, exemplars), model(images, exemplars))


def save_args(path, monkeypatch, backbone="ViT_S_16", **values):
    """``args.pt`` as the reference writes it: torch.save of its argparse.Namespace holding its own enums."""
    enums = types.ModuleType("src.models.ModelEnums")
    enums.BackboneTypes = enum.Enum("BackboneTypes", {"ViT_B_8": 0, "ViT_B_16": 1, "ViT_S_16": 2})
    enums.PretrainedWeights = enum.Enum("PretrainedWeights", {"RANDOM": 0, "DINO": 1})
    for cls in (enums.BackboneTypes, enums.PretrainedWeights):
        cls.__module__ = enums.__name__
    monkeypatch.setitem(sys.modules, "src", types.ModuleType("src"))
    monkeypatch.setitem(sys.modules, enums.__name__, enums)
    args = {"backbone_type": enums.BackboneTypes[backbone], "weights": enums.PretrainedWeights.DINO, "img_size": 64}
    args.update({"share_encoder": True, "density_scaling": 60.0, "reference_crop_size": 64, "data_dir": "", **values})
    torch.save(argparse.Namespace(**args), path)
    monkeypatch.undo()  # reading them must not need (nor import) the reference's modules


def test_release_args(release, monkeypatch):
    model, _, path = release
    args_path = path.parent / "args.pt"
    save_args(args_path, monkeypatch)
    args = read_reference_args(args_path)
    assert args["backbone_type"] == "BackboneTypes.ViT_S_16" and args["weights"] == "PretrainedWeights.DINO"
    assert args["img_size"] == 64 and args["share_encoder"] is True
    _, cfg = load_reference_model(path, model_config="tiny")  # args.pt beside the weights is found
    assert cfg["collage"]["density_scaling"] == 60.0
    for values, match in [
        ({"share_encoder": False}, "share_encoder=False; only the paper's share_encoder=True"),
        ({"img_size": 224}, "img_size=224 but the model config has 64"),
        ({"weights": "x"}, "weights='x'"),
    ]:
        save_args(args_path, monkeypatch, **values)
        with pytest.raises(ValueError, match=match):
            load_reference_model(path, model_config="tiny")
    save_args(args_path, monkeypatch, backbone="ViT_B_16")
    with pytest.raises(ValueError, match="backbone_type='BackboneTypes.ViT_B_16' but the model config has vit_small"):
        load_reference_model(path, model_config="tiny")
    save_args(args_path, monkeypatch)  # without a model config: the paper's ViT-S/16 config, 224 px
    with pytest.raises(ValueError, match="img_size=64 but the model config has 224"):
        load_reference_model(path)


def test_release_errors(release, tmp_path, capsys):
    model, _, path = release
    ref, wv = reference_layout(model), "fim_blocks.0.attn.wv.weight"
    cases = [  # (keys added or replaced, key prefixes dropped (with their copies), error)
        ({"fim_extra.weight": torch.zeros(3)}, [], r"unexpected keys .*\['fim_extra.weight'\]"),
        ({}, [wv, f"counting_modules.1.{wv[11:]}", "counting_parameters."], rf"lacks keys \['{wv}'\]"),
        ({"fim_exemplar_blocks.0.norm1.weight": torch.zeros(3)}, [], "use_exemplar_attention=True"),
        ({"encoder.model.norm.weight": torch.zeros(48)}, [], "encoder.model.norm.weight should be a copy of backbone"),
        ({"fim_pos_embed": torch.zeros(1, 64, 32)}, ["counting_parameters."], "fim_pos_embed is not the fixed 2-D sin"),
    ]
    for extra, dropped, match in cases:
        state = OrderedDict((k, v) for k, v in {**ref, **extra}.items() if not k.startswith(tuple(dropped)))
        torch.save(state, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=match):
            load_reference_model(tmp_path / "bad.pt", model_config="tiny")
    other, _ = tiny_model(fim_dim=16)  # another head width than the config's: named with both shapes
    torch.save(reference_layout(other), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"image_proj.weight \(16, 48\) vs \(32, 48\)"):
        load_reference_model(tmp_path / "bad.pt", model_config="tiny")
    # pickled code is refused before it runs, in the weights and in args.pt
    torch.save({"fim_embed.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt: refused.*\(global print\)"):
        load_reference_model(tmp_path / "evil.pt", model_config="tiny")
    torch.save(argparse.Namespace(img_size=Evil()), path.parent / "args.pt")
    with pytest.raises(ValueError, match=r"args.pt: refused.*\(global __builtin__.print\)"):
        load_reference_model(path, model_config="tiny")
    assert "pwned" not in capsys.readouterr().out


def test_eval_and_predict_with_release(release, tmp_path):
    model, cfg, path = release
    root = tmp_path / "CARPK"
    for d in ("Images", "Annotations", "ImageSets"):
        (root / d).mkdir(parents=True)
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "Images" / "a.png")
    (root / "Annotations" / "a.txt").write_text("2 3 12 14 1\n20 10 31 22 1\n40 30 52 41 1\n")
    (root / "ImageSets" / "test.txt").write_text("a\n")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    native = save_checkpoint(tmp_path / "run", 1, model, optimizer, cfg, {})
    common = ["dataset=carpk", f"root={root}", "target_height=64", "window=64", "stride=32", "figures=0"]
    eval_main([f"checkpoint={native}", *common, f"out={tmp_path / 'native'}"])
    eval_main([f"checkpoint={path}", "model_config=tiny", *common])  # out: beside UnCounTRModel.pt
    native_preds = json.loads((tmp_path / "native" / "predictions.json").read_text())
    assert json.loads((path.parent / "eval_carpk" / "predictions.json").read_text()) == native_preds
    args = [str(root / "Images" / "a.png"), "--boxes", "2,3,12,14", "--height", "64", "--stride", "32"]
    args += ["--out", str(tmp_path / "a.png")]
    result = predict_main([*args, "--checkpoint", str(path), "--model-config", "tiny"])
    assert result["count"] == predict_main([*args, "--checkpoint", str(native)])["count"]
