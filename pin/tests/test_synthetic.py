import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pin.heldout import HELD_OUT_CLASSES
from pin.layout import LayoutSampler
from pin.synthetic import (
    Backgrounds,
    Composer,
    ObjectPool,
    SyntheticCompositions,
    crop_to_alpha,
    normalise_name,
    procedural_pool,
)


def _cutout(path, colour, size=(20, 10)):
    arr = np.zeros((size[1] + 4, size[0] + 4, 4), np.uint8)
    arr[2:-2, 2:-2] = (*colour, 255)
    Image.fromarray(arr).save(path)


def test_normalise_name():
    assert normalise_name("bow_(weapon)") == "bow"
    assert normalise_name("tennis_racket") == "tennis racket"
    assert normalise_name("bus_(vehicle)") == "bus"


def test_crop_to_alpha():
    arr = np.zeros((10, 12, 4), np.uint8)
    arr[2:5, 3:9, 3] = 255
    assert crop_to_alpha(arr).shape == (3, 6, 4)


def test_pool_from_folder_json_and_split(tmp_path):
    for name in ["zebra", "wok", "yak", "projectile", "bow_(weapon)"]:
        (tmp_path / "pool" / name).mkdir(parents=True)
        for i in range(3):
            _cutout(tmp_path / "pool" / name / f"{i}.png", (200, 0, 0))
    pool = ObjectPool.from_folder(tmp_path / "pool")
    assert pool.names == ["bow", "wok", "yak", "zebra"]  # projectile dropped
    train, val, zero = pool.split(HELD_OUT_CLASSES, val_size=2, seed=10)
    assert zero.names == ["zebra"] and len(zero) == 3
    assert len(train) + len(val) == 9 and len(val) == 2
    assert pool.load(0).shape == (10, 20, 4)
    data = {"yak": ["pool/yak/0.png", "pool/yak/1.png"], "projectile": ["pool/projectile/0.png"]}
    (tmp_path / "LVIS_instance_pools.json").write_text(json.dumps(data))
    assert ObjectPool.from_json(tmp_path / "LVIS_instance_pools.json").names == ["yak"]
    with pytest.raises(FileNotFoundError, match="expected <root>/<class name>"):
        ObjectPool.from_folder(tmp_path / "missing")


def test_pool_json_with_the_authors_absolute_paths(tmp_path):
    root = tmp_path / "objects"
    (root / "images" / "yak").mkdir(parents=True)
    _cutout(root / "images" / "yak" / "0.png", (0, 200, 0))
    _cutout(root / "own.png", (0, 0, 200))
    # the released list: paths of the authors' machine, re-rooted after the last "images" component
    authors = "/home/author/images/xpaste/images/yak/0.png"
    data = {"yak": [authors, str(root / "own.png"), "own.png"]}
    (root / "LVIS_instance_pools.json").write_text(json.dumps(data))
    pool = ObjectPool.from_json(root / "LVIS_instance_pools.json")
    assert [p for _, p in pool.instances] == [root / "images" / "yak" / "0.png", root / "own.png", root / "own.png"]
    assert pool.load(0).shape == (10, 20, 4)
    # missing cut-outs fail when the pool is built, counted, the first ones named in list order
    data["yak"] += ["/elsewhere/images/yak/9.png", "/elsewhere/images/yak/8.png"]
    (root / "LVIS_instance_pools.json").write_text(json.dumps(data))
    match = r"2 of 5 cut-outs not found, e.g. \['.*objects/images/yak/9\.png', '.*objects/images/yak/8\.png'\]"
    with pytest.raises(FileNotFoundError, match=match):
        ObjectPool.from_json(root / "LVIS_instance_pools.json")


def test_held_out_classes_cover_coco_and_pvoc():
    assert {"person", "dining table", "tv", "aeroplane", "tvmonitor", "television set"} <= set(HELD_OUT_CLASSES)
    assert "wok" not in HELD_OUT_CLASSES


def test_composition_pastes_objects_at_their_boxes():
    pool = ObjectPool(
        [("red thing", np.dstack([np.full((8, 8, 3), (255, 0, 0), np.uint8), np.full((8, 8), 255, np.uint8)]))]
    )
    bg = Backgrounds(None)
    comp = Composer(pool, bg, LayoutSampler(), seed=3, fixed_objects=1).compose(0)
    x1, y1, x2, y2 = comp.boxes[0]
    img = np.asarray(comp.image).astype(int)
    inside = img[y1 * 14 : (y2 + 1) * 14, x1 * 14 : (x2 + 1) * 14]
    assert (inside == [255, 0, 0]).all()
    red = (img == [255, 0, 0]).all(-1)
    ys, xs = np.nonzero(red)
    assert xs.min() == x1 * 14 and xs.max() == (x2 + 1) * 14 - 1 and ys.min() == y1 * 14
    assert comp.names == ["red thing"] and comp.phrase == "red thing"


def test_boxes_follow_the_cutout_aspect_ratio():
    # a 4:1 wide and a 1:4 tall cut-out: each gets a box elongated the same way (aspect = width / height)
    def cutout(h, w):
        return np.dstack([np.full((h, w, 3), 200, np.uint8), np.full((h, w), 255, np.uint8)])

    pool = ObjectPool([("wide", cutout(8, 32)), ("tall", cutout(32, 8))])
    composer = Composer(pool, Backgrounds(None), LayoutSampler(), seed=0, fixed_objects=2)
    for index in range(8):
        comp = composer.compose(index)
        for name, (x1, y1, x2, y2) in zip(comp.names, comp.boxes):
            width, height = x2 - x1 + 1, y2 - y1 + 1
            assert width > height if name == "wide" else height > width


def test_compositions_are_deterministic_and_switch_object_count():
    pool = procedural_pool(["circle", "square", "triangle", "cross"], per_class=2)
    composer = Composer(pool, Backgrounds(None), LayoutSampler(), seed=0)
    ds = SyntheticCompositions(composer, length=60, switch_epoch=2)
    a, b = ds[5], ds[5]
    assert (a["image"] == b["image"]).all() and a["phrase"] == b["phrase"]
    assert a["image"].shape == (3, 224, 224) and a["reconstruct"]
    counts = Counter(len(ds[i]["all_cells"]) for i in range(30))
    assert counts == {3: 30}
    ds.set_epoch(2)
    assert not ds[0]["reconstruct"]
    counts = Counter(len(ds[i]["all_cells"]) for i in range(60))
    assert set(counts) == {1, 2, 3} and min(counts.values()) >= 10
    ds.set_epoch(3)
    assert not (ds[5]["image"] == a["image"]).all()


def test_background_folder(tmp_path):
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(tmp_path / "a.jpg")
    img = Backgrounds(tmp_path, 224).sample(np.random.default_rng(0))
    assert img.size == (224, 224)
    with pytest.raises(FileNotFoundError, match="BG-20k"):
        Backgrounds(tmp_path / "nope")


def test_backgrounds_and_cutouts_are_resized_like_the_reference(tmp_path):
    # the reference calls PIL's resize without a filter for both (synthetic_dataloader.py), i.e. Pillow's default
    # (bicubic since Pillow 7), not bilinear
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(tmp_path / "bg.png")
    background = Backgrounds(tmp_path, 224).sample(np.random.default_rng(0))
    expected = Image.open(tmp_path / "bg.png").resize((224, 224))
    assert np.array_equal(np.asarray(background), np.asarray(expected))

    cut = np.dstack([rng.integers(0, 256, (9, 13, 3), dtype=np.uint8), np.full((9, 13), 255, np.uint8)])
    composer = Composer(ObjectPool([("thing", cut)]), Backgrounds(None), LayoutSampler(), seed=1, fixed_objects=1)
    comp = composer.compose(0)
    x1, y1, x2, y2 = comp.boxes[0]
    w, h = (x2 - x1 + 1) * 14, (y2 - y1 + 1) * 14
    pasted = np.asarray(comp.image)[y1 * 14 : y1 * 14 + h, x1 * 14 : x1 * 14 + w]
    expected = np.asarray(Image.fromarray(cut).resize((w, h)))[..., :3]
    assert np.array_equal(pasted, expected)


def test_unreadable_cutouts_backgrounds_and_object_lists_are_errors_naming_them(tmp_path):
    (tmp_path / "pool" / "yak").mkdir(parents=True)
    (tmp_path / "pool" / "yak" / "0.png").write_bytes(b"not a png" * 10)
    with pytest.raises(ValueError, match=r"pool/yak/0\.png is not a readable image"):
        ObjectPool.from_folder(tmp_path / "pool").load(0)
    (tmp_path / "bg").mkdir()
    (tmp_path / "bg" / "a.jpg").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"bg/a\.jpg is not a readable image"):
        Backgrounds(tmp_path / "bg", 224).sample(np.random.default_rng(0))
    cases = {
        "cut.json": ('{"yak": ["a.png"', r"cut\.json is not valid JSON: Expecting ',' delimiter at line 1"),
        "list.json": ("[1, 2]", r"list\.json: expected \{class name: \[cut-out paths\]\}, got a list"),
        "str.json": ('{"yak": "a.png"}', r"str\.json: the entry of 'yak' is a str, expected a list"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=message):
            ObjectPool.from_json(tmp_path / name)


def test_a_validation_split_as_large_as_the_pool_is_an_error(tmp_path):
    from pin.pipeline import pools_from_cfg

    for i in range(2):
        (tmp_path / "pool" / "yak").mkdir(parents=True, exist_ok=True)
        _cutout(tmp_path / "pool" / "yak" / f"{i}.png", (0, 90, 0))
    data = {"objects": str(tmp_path / "pool"), "held_out": [], "val_size": 2}
    with pytest.raises(ValueError, match=r"data.val_size=2 leaves no training cut-outs: .* holds 2 outside"):
        pools_from_cfg({"data": data})
    train, val, _ = pools_from_cfg({"data": {**data, "val_size": 1}})
    assert len(train) == len(val) == 1
