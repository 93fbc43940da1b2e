"""sharelock-convert: reference-layout Lightning checkpoints -> checkpoint folders for load_model and sharelock-eval."""

import collections
import json
import sys
import types
import typing

import numpy as np
import pytest
import torch
import torch.nn as nn

from sharelock import convert
from sharelock import eval as evaluate
from sharelock.models import ShareLock, load_model
from sharelock.store import FeatureWriter


def source_model(vision_dim=12, text_layers=3, vision_layers=0, **kwargs):
    """A tiny trained-looking ShareLock: random weights and BatchNorm statistics."""
    torch.manual_seed(0)
    m = ShareLock(vision_dim, 20, text_layers, 16, vision_layers, 10 if vision_layers else None, **kwargs)
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm1d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return m.eval()


def reference_state_dict(model, prefix=""):
    """The reference's names (ShareLock.{vision,language}_projector, Projection.projection = Sequential(Linear,
    BatchNorm1d, ReLU, Dropout(0.2), ..., Linear); identity heads have no weights), values from `model`."""
    state = collections.OrderedDict()
    for name, head in (("vision_projector", model.vision_head), ("language_projector", model.text_head)):
        for block in range(head.num_layers):
            linear = head.layers[4 * block]
            state[f"{prefix}{name}.projection.{4 * block}.weight"] = linear.weight.detach().clone()
            state[f"{prefix}{name}.projection.{4 * block}.bias"] = linear.bias.detach().clone()
            if block < head.num_layers - 1:
                bn = head.layers[4 * block + 1]
                for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    state[f"{prefix}{name}.projection.{4 * block + 1}.{key}"] = getattr(bn, key).detach().clone()
    return state


def reference_hparams(model, vision="dinov2_vitb14", language="tiny/llama"):
    """The reference's configs/default_config.yaml layout, with this model's head sizes."""
    cfg = model.config
    return {
        "seed": 42,
        "data": {"dataset": ["cc3m"], "caption_files": ["cc3m.json"], "val_split_num": 50000},
        "model": {
            "embedding_space_dim": 768 if cfg["embedding_dim"] is None else cfg["embedding_dim"],
            "vision_encoder": vision,
            "vision_projector": {"hidden_size": 16, "num_layers": cfg["vision_layers"], "normalize": True},
            "language_encoder": language,
            "language_projector": {"hidden_size": 16, "num_layers": cfg["text_layers"], "normalize": True},
        },
        "training": {"max_steps": 5000, "learning_rate": 0.001},
    }


def save_lightning(path, state, hparams, **extra):
    """A Lightning-style checkpoint dict (the keys Lightning writes) saved with torch.save."""
    torch.save(
        {"epoch": 3, "global_step": 1500, "pytorch-lightning_version": "2.1.3", "state_dict": state,
         "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [], "hparams_name": "config",
         "hyper_parameters": hparams, **extra},
        path,
    )  # fmt: skip
    return path


class Augmentation:
    """A non-plain object among hyper-parameters (pickled as class + state, never imported when read)."""

    def __init__(self):
        self.p = 0.5


@pytest.fixture
def fake_omegaconf(monkeypatch):
    """`to_dictconfig(d)`: classes pickled under omegaconf's names with omegaconf 2.x's pickled layout (`__dict__`:
    `_metadata` with a defaultdict resolver cache, `_parent`, `_content` of nodes holding `_val`), without
    omegaconf installed."""
    names = ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes", "omegaconf.base")
    package, dictconfig, nodes, base = (types.ModuleType(name) for name in names)

    class ContainerMetadata:
        def __init__(self, key):
            self.ref_type, self.object_type, self.key, self.flags = typing.Any, dict, key, {}
            self.resolver_cache = collections.defaultdict(dict)

    class DictConfig:
        def __init__(self, content, key=None, parent=None):
            self.__dict__.update(_metadata=ContainerMetadata(key), _parent=parent, _content={})
            for k, v in content.items():
                self._content[k] = DictConfig(v, k, self) if isinstance(v, dict) else AnyNode(v, k, self)

    class AnyNode:
        def __init__(self, value, key, parent):
            self.__dict__.update(_metadata=ContainerMetadata(key), _parent=parent, _val=value)

    for cls, module in ((ContainerMetadata, base), (DictConfig, dictconfig), (AnyNode, nodes)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    for module in (package, dictconfig, nodes, base):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return DictConfig


@pytest.mark.parametrize("layout", ["plain", "omegaconf", "both_heads"])
def test_converted_checkpoint_has_the_same_weights_and_logits(tmp_path, layout, fake_omegaconf):
    if layout == "both_heads":
        model = source_model(text_layers=2, vision_layers=3, vision_normalize=False, text_normalize=False)
    else:
        model = source_model()
    hparams = reference_hparams(model)
    if layout == "both_heads":
        hparams["model"]["vision_projector"]["normalize"] = hparams["model"]["language_projector"]["normalize"] = False
    extra = {}
    if layout == "omegaconf":
        hparams["training"]["augmentation"] = Augmentation()
        hparams = fake_omegaconf(hparams)
        extra = {"hparams_type": fake_omegaconf}
    state = reference_state_dict(model, prefix="model." if layout == "both_heads" else "")
    ckpt = save_lightning(tmp_path / "ShareLock-CC3M.ckpt", state, hparams, **extra)
    if layout == "omegaconf":  # the restricted reader is what reads this one
        with pytest.raises(Exception, match="omegaconf"):
            torch.load(ckpt, weights_only=True)
    out = convert.main([str(ckpt), str(tmp_path / "converted"), "vision.model=tiny_vit"])
    loaded = load_model(out)
    assert loaded.config == model.config
    theirs, ours = loaded.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    v, t = torch.randn(9, model.vision_dim), torch.randn(5, model.text_dim)
    assert torch.equal(loaded.zero_shot_logits(v, t), model.zero_shot_logits(v, t))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backbones"]["vision"]["model"] == meta["backbones"]["vision_model"] == "tiny_vit"
    assert meta["backbones"]["text"] == {"model": "tiny/llama", "dtype": "float32", "max_length": None}
    assert meta["step"] == 1500


def test_reference_backbone_names_are_translated_and_sharelock_eval_reads_the_folder(tmp_path):
    model = source_model(vision_dim=384, text_layers=2)
    ckpt = save_lightning(tmp_path / "a.ckpt", reference_state_dict(model), reference_hparams(model, "dinov2_vits14"))
    out = convert.main([f"checkpoint={ckpt}", f"out={tmp_path / 'converted'}"])
    backbones = json.loads((out / "meta.json").read_text())["backbones"]
    assert backbones["vision"]["model"] == backbones["vision_model"] == "vit_small_patch14_dinov2.lvd142m"
    assert backbones["vision"]["kwargs"] == {"dynamic_img_size": True}
    # zero-shot top-1 through sharelock-eval equals the source model's own on stored features
    rng = np.random.default_rng(0)
    images, prompts = torch.from_numpy(rng.normal(size=(40, 384))).float(), torch.randn(4, 20)
    labels = rng.integers(0, 4, 40)
    with FeatureWriter(tmp_path / "images", backbones["vision_model"], "image", 384) as w:
        w.add([str(i) for i in range(40)], images, labels.tolist())
    with FeatureWriter(tmp_path / "prompts", "tiny/llama", "text", 20) as w:
        w.add([str(c) for c in range(4)], prompts)
    result = evaluate.main([f"checkpoint={out}", f"features={tmp_path / 'images'}",
                            f"class_features={tmp_path / 'prompts'}", f"out={tmp_path / 'eval'}"])  # fmt: skip
    expected = (model.zero_shot_logits(images, prompts).argmax(1).numpy() == labels).mean() * 100
    assert result["top1"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="already exists"):
        convert.main([str(ckpt), str(out)])
    convert.main([str(ckpt), str(out), "overwrite=true"])


def test_a_malicious_pickle_is_refused_without_running(tmp_path, capfd):
    class Payload:
        def __reduce__(self):
            return print, ("PWNED",)

    model = source_model()
    hparams = reference_hparams(model)
    hparams["model"]["callback"] = Payload()
    ckpt = save_lightning(tmp_path / "evil.ckpt", reference_state_dict(model), hparams)
    with pytest.raises(ValueError, match=r"calls builtins\.print\(\.\.\.\) while loading; refusing"):
        convert.main([str(ckpt), str(tmp_path / "out")])
    assert "PWNED" not in capfd.readouterr().out
    assert not (tmp_path / "out").exists()


def test_errors_name_the_missing_or_disagreeing_key(tmp_path, monkeypatch):
    model = source_model()
    hparams = reference_hparams(model)
    del hparams["model"]["language_encoder"]
    ckpt = save_lightning(tmp_path / "a.ckpt", reference_state_dict(model), hparams)
    with pytest.raises(ValueError, match=r"language\.model is not set .* model\.language_encoder"):
        convert.main([str(ckpt), str(tmp_path / "out")])
    hparams = reference_hparams(model, vision="resnet50")
    ckpt = save_lightning(tmp_path / "b.ckpt", reference_state_dict(model), hparams)
    with pytest.raises(ValueError, match=r"vision\.model is not set .* names 'resnet50'"):
        convert.main([str(ckpt), str(tmp_path / "out")])
    # the reference's ViT-B/14 gives 768-d features; these heads take 12-d
    ckpt = save_lightning(tmp_path / "c.ckpt", reference_state_dict(model), reference_hparams(model))
    with pytest.raises(ValueError, match=r"vit_base_patch14_dinov2\.lvd142m' gives 768-d features.* 12-d"):
        convert.main([str(ckpt), str(tmp_path / "out")])
    hparams = reference_hparams(model)
    hparams["model"]["language_projector"]["num_layers"] = 4
    ckpt = save_lightning(tmp_path / "d.ckpt", reference_state_dict(model), hparams)
    with pytest.raises(ValueError, match=r"model\.language_projector\.num_layers=4 but the weights give 3"):
        convert.main([str(ckpt), str(tmp_path / "out"), "vision.model=tiny_vit"])
    state = reference_state_dict(model) | {"logit_scale": torch.ones(())}
    ckpt = save_lightning(tmp_path / "e.ckpt", state, reference_hparams(model))
    with pytest.raises(ValueError, match="not ShareLock projection weights.*logit_scale"):
        convert.main([str(ckpt), str(tmp_path / "out"), "vision.model=tiny_vit"])
    monkeypatch.setattr("sys.argv", ["sharelock-convert", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="sharelock-convert: error: checkpoint .*missing.ckpt does not exist"):
        convert.cli()


def test_sharelock_winoground_uses_the_backbones_given_to_convert(tmp_path):
    from PIL import Image

    from sharelock import winoground
    from sharelock.features import build_language_encoder, build_vision_encoder
    from sharelock.tiny import save_tiny_backbones

    captions = ["a red mug in grass", "grass in a red mug", "a dog on a cat", "a cat on a dog"]
    vision, language = save_tiny_backbones(tmp_path / "backbones", captions, torch.rand(2, 3, 224, 224))
    torch.manual_seed(1)
    model = ShareLock(vision_dim=48, text_dim=64, text_layers=2, hidden_dim=16).eval()
    hparams = reference_hparams(model, vision=None, language=None)
    ckpt = save_lightning(tmp_path / "a.ckpt", reference_state_dict(model), hparams)
    backbones = [
        f"vision.model={vision['model']}",
        "vision.pretrained=false",
        f"vision.checkpoint={vision['checkpoint']}",
    ]
    backbones += [f"vision.kwargs={json.dumps(vision['kwargs'])}", f"language.model={language['model']}"]
    out = convert.main([str(ckpt), str(tmp_path / "converted"), *backbones])
    data = tmp_path / "winoground"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(data / "examples.jsonl", "w") as f:
        for n in range(2):
            for k in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"images/{n}_{k}.png")
            rec = {"id": n, "caption_0": captions[2 * n], "caption_1": captions[2 * n + 1], "collapsed_tag": "Object"}
            f.write(json.dumps(rec | {"image_0": f"{n}_0", "image_1": f"{n}_1"}) + "\n")
    winoground.main([f"checkpoint={out}", f"data={data}", f"out={tmp_path / 'eval'}"])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "per_example.jsonl").read_text().splitlines()]
    model.attach_encoders(build_vision_encoder(vision), None, *build_language_encoder(language))
    expected = winoground.similarities(model, winoground.load_examples(data), batch_size=4)
    torch.testing.assert_close(torch.tensor([r["sim"] for r in rows]), expected, rtol=0, atol=1e-6)


def test_a_truncated_checkpoint_or_a_folder_is_an_error_naming_it(tmp_path):
    model = source_model()
    ckpt = save_lightning(tmp_path / "a.ckpt", reference_state_dict(model), reference_hparams(model))
    (tmp_path / "cut.ckpt").write_bytes(ckpt.read_bytes()[:300])  # an interrupted download
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*cut\.ckpt: PytorchStreamReader failed"):
        convert.main([str(tmp_path / "cut.ckpt"), str(tmp_path / "out")])
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path} is a folder, expected a Lightning \.ckpt file"):
        convert.main([str(tmp_path), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
