import io
import json
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sharelock import precompute
from sharelock.data import (
    ImageCaptionFolder,
    eval_transform,
    expand_urls,
    iter_webdataset,
    load_class_names,
    read_captions,
)
from sharelock.features import build_vision_encoder
from sharelock.store import FeatureStore
from sharelock.tiny import tiny_vit_spec


def write_shards(root, n=8, per_shard=5):
    """img2dataset layout: {key}.jpg, {key}.txt, {key}.json grouped per key, several tar shards."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    images, captions = {}, {}
    for shard in range(0, n, per_shard):
        with tarfile.open(root / f"{shard // per_shard:05d}.tar", "w") as tar:
            for i in range(shard, min(n, shard + per_shard)):
                key = f"{i:09d}"
                img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, format="PNG")  # lossless, so decoded pixels can be compared
                images[key], captions[key] = img, f"caption number {i}"
                for ext, data in (("png", buf.getvalue()), ("txt", captions[key].encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return images, captions


def test_webdataset_reader_and_url_expansion(tmp_path):
    images, captions = write_shards(tmp_path / "wds")
    urls = expand_urls(str(tmp_path / "wds" / "{00000..00001}.tar"))
    assert [u.rsplit("/", 1)[1] for u in urls] == ["00000.tar", "00001.tar"]
    assert expand_urls(str(tmp_path / "wds" / "*.tar")) == urls
    items = list(iter_webdataset(urls))
    assert [k for k, _, _ in items] == sorted(images)
    for key, image, caption in items:
        assert caption == captions[key]
        np.testing.assert_array_equal(np.asarray(image), np.asarray(images[key]))
    skipped = list(iter_webdataset(urls, images=False, skip=lambda k: k.endswith("3")))
    assert len(skipped) == 7 and all(im is None for _, im, _ in skipped)
    with pytest.raises(FileNotFoundError, match="no webdataset shard matches"):
        expand_urls(str(tmp_path / "nothing-*.tar"))


def test_features_cli_from_webdataset_resumes(tmp_path):
    images, _ = write_shards(tmp_path / "wds")
    torch.manual_seed(0)
    vit = build_vision_encoder(tiny_vit_spec(img_size=224))
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    spec = tiny_vit_spec(img_size=224, checkpoint=str(tmp_path / "vit.safetensors"))
    args = ["modality=image", "source.type=webdataset", f"source.path={tmp_path / 'wds' / '*.tar'}"]
    args += [f"out={tmp_path / 'store'}", f"vision.checkpoint={spec['checkpoint']}", "vision.pretrained=false"]
    args += [f"vision.model={spec['model']}"]
    args += [f"vision.kwargs={json.dumps(spec['kwargs'])}", "shard_size=3", "batch_size=4", "num_workers=0"]
    precompute.main(args)
    # simulate a run killed after two shards: drop the others, then run again
    store_dir = tmp_path / "store"
    for p in sorted(store_dir.glob("shard_*.json"))[2:]:
        p.unlink()
    assert len(FeatureStore(store_dir)) == 6
    precompute.main(args)
    store = FeatureStore(store_dir, model=f"vit_small_patch14_dinov2@{spec['checkpoint']}")
    assert sorted(store.ids) == sorted(images)
    expected = vit(torch.stack([eval_transform()(images[k].convert("RGB")) for k in sorted(images)]))
    torch.testing.assert_close(store.get(sorted(images)), expected, atol=1e-5, rtol=1e-5)


def test_vision_dtype_float32_or_bf16_autocast_recorded_in_the_store(tmp_path, monkeypatch):
    """vision.dtype: float32 is the reference's forward; bfloat16 runs the backbone under bf16 autocast (the default on
    GPU, here forced on CPU); the resolved dtype is recorded, so a store is never resumed with the other one."""
    images, _ = write_shards(tmp_path / "wds", n=4, per_shard=4)
    torch.manual_seed(0)
    vit = build_vision_encoder(tiny_vit_spec(img_size=224))
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    spec = tiny_vit_spec(img_size=224, checkpoint=str(tmp_path / "vit.safetensors"))
    args = ["modality=image", "source.type=webdataset", f"source.path={tmp_path / 'wds' / '*.tar'}"]
    args += [f"vision.checkpoint={spec['checkpoint']}", "vision.pretrained=false", f"vision.model={spec['model']}"]
    args += [f"vision.kwargs={json.dumps(spec['kwargs'])}", "batch_size=4", "num_workers=0"]
    seen = []  # dtype of the patch embeddings in each forward of the extraction
    build = precompute.build_vision_encoder

    def recording(vision_spec):
        model = build(vision_spec)
        model.patch_embed.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        return model

    monkeypatch.setattr(precompute, "build_vision_encoder", recording)
    batch = torch.stack([eval_transform()(images[k].convert("RGB")) for k in sorted(images)])
    with torch.no_grad():
        fp32 = vit(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = vit(batch).float()
    for dtype, expected in (("float32", fp32), ("bfloat16", bf16)):
        seen.clear()
        precompute.main([*args, f"vision.dtype={dtype}", f"out={tmp_path / dtype}"])
        assert seen and set(seen) == {getattr(torch, dtype)}
        store = FeatureStore(tmp_path / dtype)
        assert store.meta["backbone"]["vision"]["dtype"] == dtype
        torch.testing.assert_close(store.get(sorted(images)), expected, atol=1e-5, rtol=1e-5)
    seen.clear()
    precompute.main([*args, f"out={tmp_path / 'default'}"])  # the default on CPU: float32
    assert set(seen) == {torch.float32}
    assert FeatureStore(tmp_path / "default").meta["backbone"]["vision"]["dtype"] == "float32"
    with pytest.raises(ValueError, match=r"other backbone settings \(vision.dtype: 'bfloat16' -> 'float32'\)"):
        precompute.main([*args, "vision.dtype=float32", f"out={tmp_path / 'bfloat16'}"])
    with pytest.raises(ValueError, match="vision.dtype='float16': expected float32, bfloat16 or null"):
        precompute.main([*args, "vision.dtype=float16", f"out={tmp_path / 'fp16'}"])


def test_features_cli_checks_the_source_before_loading_a_backbone(tmp_path):
    # the backbones named here cannot be loaded: the missing data must be reported first, and no store created
    store = tmp_path / "store"
    image = ["modality=image", "vision.model=no_such_vit", "vision.pretrained=false", f"out={store}"]
    with pytest.raises(FileNotFoundError, match="no webdataset shard matches"):
        precompute.main([*image, "source.type=webdataset", f"source.path={tmp_path / 'wds' / '{00000..00003}.tar'}"])
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        precompute.main([*image, "source.type=labelled", f"source.path={tmp_path / 'val'}"])
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="source.type=folder needs source.captions"):
        precompute.main([*image, "source.type=folder", f"source.path={tmp_path / 'images'}"])
    text = ["modality=text", f"language.model={tmp_path / 'no-such-llm'}", f"out={store}"]
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        precompute.main([*text, "source.type=captions", f"source.path={tmp_path / 'captions.json'}"])
    assert not store.exists()


def test_caption_files_and_class_names(tmp_path):
    (tmp_path / "caps.json").write_text(json.dumps({"a.png": "one", "b.png": "two"}))
    (tmp_path / "caps.csv").write_text('filepath,title\na.png,one\nb.png,"two, with comma"\n')
    (tmp_path / "recs.json").write_text(json.dumps([{"image": "a.png", "text": "one"}]))
    assert read_captions(tmp_path / "caps.json") == {"a.png": "one", "b.png": "two"}
    assert read_captions(tmp_path / "caps.csv") == {"a.png": "one", "b.png": "two, with comma"}
    assert read_captions(tmp_path / "recs.json") == {"a.png": "one"}
    (tmp_path / "bad.csv").write_text("name,caption\nx,y\n")
    with pytest.raises(KeyError, match="has none of the columns"):
        read_captions(tmp_path / "bad.csv")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (30, 20), (0, 0, 255)).save(tmp_path / "imgs" / "b.png")
    folder = ImageCaptionFolder(tmp_path / "imgs", tmp_path / "caps.csv")
    key, image = folder[1]
    assert key == "b.png" and image.shape == (3, 224, 224) and image[2].mean() > image[0].mean()
    # class names: HF-style synonyms, other languages, dicts keyed by id or folder (e.g. WordNet id)
    (tmp_path / "names.json").write_text(json.dumps(["tench, Tinca tinca", "goldfish"]))
    assert load_class_names(tmp_path / "names.json") == ["tench", "goldfish"]
    (tmp_path / "zh.json").write_text(json.dumps({"1": "金鱼", "0": "丁鲷"}, ensure_ascii=False))
    assert load_class_names(tmp_path / "zh.json") == ["丁鲷", "金鱼"]
    (tmp_path / "wnid.json").write_text(json.dumps({"n01443537": "goldfish", "n01440764": "tench"}))
    assert load_class_names(tmp_path / "wnid.json", ["n01440764", "n01443537"]) == ["tench", "goldfish"]
    (tmp_path / "ja.txt").write_text("金魚\nテンチ\n", encoding="utf-8")
    assert load_class_names(tmp_path / "ja.txt") == ["金魚", "テンチ"]
    with pytest.raises(ValueError, match="keys must be label ids or the dataset's folder names"):
        load_class_names(tmp_path / "wnid.json")
    # torchvision sets without .classes (GTSRB, SVHN) record [] as folder classes: id-keyed files still work
    assert load_class_names(tmp_path / "zh.json", []) == ["丁鲷", "金鱼"]
    # Keras' imagenet_class_index.json: {"0": [wnid, name]}, by wnid for a class subset (ImageNet-R/-A folders)
    (tmp_path / "keras.json").write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}))
    assert load_class_names(tmp_path / "keras.json") == ["tench", "goldfish"]
    assert load_class_names(tmp_path / "keras.json", ["n01443537"]) == ["goldfish"]
    # 2 names for 1 class folder (e.g. the 1000 ImageNet names for a 200-class subset) is refused
    with pytest.raises(ValueError, match="holds 2 class names but the dataset has 1 class folders"):
        load_class_names(tmp_path / "zh.json", ["n01443537"])
    (tmp_path / "coco.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="COCO-style annotation file"):
        read_captions(tmp_path / "coco.json")
    (tmp_path / "bom.csv").write_text("image,caption\na.png,one\n", encoding="utf-8-sig")
    assert read_captions(tmp_path / "bom.csv") == {"a.png": "one"}
    with pytest.raises(FileNotFoundError, match="class names file not found"):
        load_class_names(tmp_path / "missing.json")


def test_torchvision_sets_never_download_and_say_where_they_looked(tmp_path):
    from sharelock.data import LabelledImages

    with pytest.raises(FileNotFoundError, match=f"torchvision DTD not found under {tmp_path}"):
        LabelledImages(tmp_path, "DTD", "val")


def test_reference_class_names_file_holds_prompts_and_takes_the_identity_template(tmp_path):
    """The reference's imagenet-1k/class_names.json maps label ids to whole prompts ("A photo of a tench"):
    templates='{}' uses them as they are, giving the prompts of plain names with the reference template."""
    from sharelock.config import load_config
    from sharelock.models import format_prompt
    from sharelock.templates import REFERENCE, resolve_templates

    # on a command line YAML reads a bare `{}` (or `{c}`) as a mapping: still the identity template
    assert resolve_templates(load_config(["templates={}"], "eval")["templates"]) == ["{}"]
    assert resolve_templates(load_config(["templates={c}"], "eval")["templates"]) == ["{c}"]
    (tmp_path / "class_names.json").write_text(json.dumps({"1": "A photo of a goldfish", "0": "A photo of a tench"}))
    prompts = [
        format_prompt(t, n) for t in resolve_templates("{}") for n in load_class_names(tmp_path / "class_names.json")
    ]
    assert prompts == [format_prompt(REFERENCE[0], n) for n in ("tench", "goldfish")]


def test_templates_without_the_class_placeholder_are_errors(tmp_path):
    """A template without {} / {c} gives every class the same prompt (chance accuracy, silently): refused, from a
    command line mapping (`templates={x}`), a list or a file."""
    from sharelock.config import load_config
    from sharelock.templates import resolve_templates

    for bad in ("templates={x}", "templates={a: 1}", "templates={c: 1}"):
        with pytest.raises(ValueError, match="a mapping is only read as the bare placeholder"):
            resolve_templates(load_config([bad], "eval")["templates"])
    with pytest.raises(ValueError, match="from the list: each template needs .*'a photo' has none"):
        resolve_templates(["a {} photo", "a photo"])
    with pytest.raises(ValueError, match="no templates"):
        resolve_templates([])
    (tmp_path / "t.txt").write_text("a {} photo\nart of the object\n")
    with pytest.raises(ValueError, match=r"t.txt: each template needs .*'art of the object' has none"):
        resolve_templates(str(tmp_path / "t.txt"))
    (tmp_path / "t.json").write_text(json.dumps(["a {c}.", "itap of a {}."]))
    assert resolve_templates(str(tmp_path / "t.json")) == ["a {c}.", "itap of a {}."]


def test_templates_from_a_file_keyed_by_dataset(tmp_path):
    """CLIP_benchmark keeps its templates in one JSON object keyed by dataset, with the {c} placeholder:
    `FILE.json#imagenet1k` picks one list; a missing or superfluous key is an error naming the file."""
    from sharelock.models import format_prompt
    from sharelock.templates import resolve_templates

    path = tmp_path / "en_zeroshot_classification_templates.json"
    path.write_text(
        json.dumps({"imagenet1k": ["a bad photo of a {c}.", "itap of my {c}."], "cars": ["i love my {c}!"]})
    )
    chosen = resolve_templates(f"{path}#imagenet1k")
    assert [format_prompt(t, "tench") for t in chosen] == ["a bad photo of a tench.", "itap of my tench."]
    assert resolve_templates(f"{path}#cars") == ["i love my {c}!"]
    with pytest.raises(ValueError, match=r"maps datasets to templates: choose one as templates=.*#KEY"):
        resolve_templates(str(path))
    with pytest.raises(KeyError, match=r"'imagenet' not in .*keys: \['imagenet1k', 'cars'\]"):
        resolve_templates(f"{path}#imagenet")
    (tmp_path / "t.json").write_text(json.dumps(["a {}."]))
    with pytest.raises(ValueError, match="is a list of templates, not keyed by dataset: drop #x"):
        resolve_templates(f"{tmp_path / 't.json'}#x")
    path.write_text(json.dumps({"bad": ["a photo"]}))
    with pytest.raises(ValueError, match=r"#bad: each template needs"):
        resolve_templates(f"{path}#bad")


def test_hf_datasets_without_the_optional_package_say_how_to_install_it(tmp_path, monkeypatch):
    """`datasets` is an optional extra: without it an hf: source is a one-line error naming the extra to install
    (simulated here by hiding the package), raised before any backbone is loaded."""
    from sharelock.data import LabelledImages

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'funai-sharelock\[hf\]'"):
        LabelledImages("hf:cifar10:test")
    with pytest.raises(ImportError, match=r"funai-sharelock\[hf\]"):
        load_class_names("hf:cifar10")
    argv = ["sharelock-features", "modality=image", "source.type=labelled", "source.path=hf:cifar10:test"]
    monkeypatch.setattr("sys.argv", [*argv, "vision.model=no_such_vit", f"out={tmp_path / 'store'}"])
    with pytest.raises(SystemExit, match=r"sharelock-features: error: .*pip install 'funai-sharelock\[hf\]'"):
        precompute.cli()
    assert not (tmp_path / "store").exists()


def test_captions_json_with_several_captions_per_id_is_refused(tmp_path):
    """A JSON value that is a list (e.g. COCO's five captions per image) must not become the caption string
    "['one', 'uno']": the caption of an id is one string; several captions go in several caption files."""
    (tmp_path / "multi.json").write_text(json.dumps({"a.png": "one", "b.png": ["two", "dos"]}))
    with pytest.raises(ValueError, match=r"b\.png.*one caption file per caption"):
        read_captions(tmp_path / "multi.json")
    (tmp_path / "recs.json").write_text(json.dumps([{"image": "a.png", "caption": ["one", "uno"]}]))
    with pytest.raises(ValueError, match=r"a\.png.*one caption file per caption"):
        read_captions(tmp_path / "recs.json")
    (tmp_path / "nested.json").write_text(json.dumps({"a.png": {"caption": "one"}}))
    with pytest.raises(ValueError, match=r"a\.png"):
        read_captions(tmp_path / "nested.json")


def test_pending_images_are_shared_between_ranks_without_the_done_ones():
    from sharelock.precompute import _Pending

    class Items:
        ids = [f"{i:02d}" for i in range(10)]

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return self.ids[i], i

    done = {"01", "04"}
    parts = [[Items.ids[i] for i in _Pending(Items(), done, rank, 3).items] for rank in range(3)]
    assert sorted(sum(parts, [])) == sorted(set(Items.ids) - done)  # every pending item exactly once
    assert all(parts) and _Pending(Items(), done, 0, 3)[0] == ("00", 0, -1)


def test_caption_files_with_broken_rows_or_no_captions_are_errors_naming_the_file(tmp_path):
    """A missing CSV field or a JSON null would be encoded as the caption "None", an unquoted comma would cut the
    caption short, and an empty file would give an empty store: all refused, naming the file (and line)."""
    cases = {
        "short.csv": ("image,caption\na.png,one\nb.png\n", r"short\.csv line 3: fewer fields than the header"),
        "comma.csv": ("image,caption\na.png,a cat, sitting\n", r"comma\.csv line 2: more fields than the header"),
        "empty.csv": ("image,caption\n", r"captions file .*empty\.csv holds no captions"),
        "null.json": ('{"a.png": null}', r"null\.json: the caption of 'a\.png' is null, expected a string"),
        "broken.json": ('{"a.png": "one",\n', r"broken\.json is not valid JSON: .* at line 2, column 1"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=match):
            read_captions(tmp_path / name)
    (tmp_path / "names.json").write_text('["tench", "goldfish"')
    with pytest.raises(ValueError, match=r"names\.json is not valid JSON"):
        load_class_names(tmp_path / "names.json")


def test_unreadable_images_and_shards_are_errors_naming_them(tmp_path):
    from sharelock.data import LabelledImages

    (tmp_path / "val" / "cls").mkdir(parents=True)
    (tmp_path / "val" / "cls" / "x.jpg").write_bytes(b"\x00garbage, not a JPEG" * 20)
    with pytest.raises(ValueError, match=r"cls/x\.jpg is not a readable image \(cannot identify image file"):
        LabelledImages(tmp_path / "val")[0]
    (tmp_path / "caps.json").write_text(json.dumps({"x.jpg": "a caption"}))
    with pytest.raises(ValueError, match=r"cls/x\.jpg is not a readable image"):
        ImageCaptionFolder(tmp_path / "val" / "cls", tmp_path / "caps.json")[0]
    write_shards(tmp_path / "wds", n=2, per_shard=2)
    with tarfile.open(tmp_path / "wds" / "00001.tar", "w") as tar:  # a corrupt image member
        info = tarfile.TarInfo("000000009.jpg")
        info.size = 40
        tar.addfile(info, io.BytesIO(b"\xff\xd8" + b"\x00" * 38))
    with pytest.raises(ValueError, match=r"^000000009 in .*00001\.tar is not a readable image"):
        list(iter_webdataset(str(tmp_path / "wds" / "*.tar"), captions=False))
    (tmp_path / "wds" / "00002.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(ValueError, match=r"webdataset shard .*00002\.tar is not a readable tar file"):
        list(iter_webdataset(str(tmp_path / "wds" / "00002.tar")))
    with pytest.raises(ValueError, match=r"no captions \(\{key\}\.txt members\) in the webdataset shards"):
        precompute._texts({"type": "webdataset", "path": str(tmp_path / "wds" / "00001.tar")})
