"""`data.synonyms_description`: objects described by one of their class's synonyms (LVIS categories' `synonyms`)."""

import json
import re

import numpy as np
import pytest

from pin.config import load_config
from pin.layout import LayoutSampler
from pin.pipeline import dataset_from_cfg, pools_from_cfg
from pin.synonyms import load_synonyms
from pin.synthetic import Backgrounds, Composer, ObjectPool, procedural_pool

CATEGORIES = [
    {"id": 1, "name": "cup", "synonyms": ["cup", "drinking_cup", "teacup_(small)"]},
    {"id": 2, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)", "longbow"]},
    {"id": 3, "name": "bow_(decorative_ribbons)", "synonyms": ["bow_(decorative_ribbons)", "hair_bow"]},
    {"id": 4, "name": "mug", "synonyms": ["mug", "beer_mug"]},
]
NORMALISED = {
    "cup": ["cup", "drinking cup", "teacup"],
    "bow": ["bow", "longbow", "hair bow"],
    "mug": ["mug", "beer mug"],
}


def _lvis(tmp_path, categories=CATEGORIES):
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    return path


def _composer(synonyms=None, seed=0, **kwargs):
    px = np.full((4, 6, 4), 255, np.uint8)
    pool = ObjectPool([(name, px) for name in NORMALISED for _ in range(2)])
    return Composer(pool, Backgrounds(None), LayoutSampler(), seed, synonyms=synonyms, **kwargs)


def test_lvis_synonyms_are_normalised_like_names(tmp_path):
    # "_" -> " ", " (...)" dropped; the two LVIS "bow" classes normalise alike and pool their synonyms
    assert load_synonyms(str(_lvis(tmp_path))) == NORMALISED
    flat = tmp_path / "flat.json"  # the reference's own {name: [synonyms]} file
    flat.write_text(json.dumps({"cup": ["cup", "drinking_cup"]}))
    assert load_synonyms(str(flat)) == {"cup": ["cup", "drinking cup"]}


def test_missing_synonyms_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope" / "lvis_v1_val.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_synonyms(str(missing))
    cfg, _ = load_config(["--config", "tiny", "data.synonyms_description=true", f"data.synonyms_path={missing}"])
    with pytest.raises(FileNotFoundError, match=re.escape(f"data.synonyms_path={missing}")):
        dataset_from_cfg(cfg, pools_from_cfg(cfg)[0])
    cfg, _ = load_config(["--config", "tiny", "data.synonyms_description=true"])  # tiny: synonyms_path null
    with pytest.raises(ValueError, match="data.synonyms_path is not set"):
        dataset_from_cfg(cfg, pools_from_cfg(cfg)[0])


def test_malformed_synonyms_and_the_reference_aliases(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cup": "mug"}))  # a string, not a list: would split into letters
    with pytest.raises(ValueError, match="'cup' must be a list of strings"):
        load_synonyms(str(bad))
    with pytest.raises(ValueError, match="name and a synonyms list"):
        load_synonyms(str(_lvis(tmp_path, [{"id": 1, "name": "cup"}])))
    flat = tmp_path / "flat.json"  # the reference aliases baguet -> baguette and icecream -> ice cream
    flat.write_text(json.dumps({"baguette": ["baguette", "french_bread"], "ice cream": ["ice cream", "gelato"]}))
    out = load_synonyms(str(flat))
    assert out["baguet"] == ["baguette", "french bread"] and out["icecream"] == ["ice cream", "gelato"]


def test_descriptions_come_from_the_listed_synonyms_and_are_seeded(tmp_path):
    synonyms = load_synonyms(str(_lvis(tmp_path)))
    on, off = _composer(synonyms), _composer()
    seen = {name: set() for name in NORMALISED}
    for i in range(60):
        a, b = on.compose(i, 0, fixed=False), off.compose(i, 0, fixed=False)
        for name, phrase in zip(a.names, a.phrases):
            assert phrase in NORMALISED[name]
            seen[name].add(phrase)
        # drawn after everything else: same image, objects, boxes and target as without synonyms
        assert (a.names, a.boxes, a.target) == (b.names, b.boxes, b.target) and a.image == b.image
        assert b.phrases == b.names and a.phrase == a.phrases[a.target]
    assert seen == {name: set(words) for name, words in NORMALISED.items()}  # every synonym is used
    again, other = _composer(synonyms), _composer(synonyms, seed=1)
    assert [again.compose(i).phrases for i in range(20)] == [on.compose(i).phrases for i in range(20)]
    assert [other.compose(i).phrases for i in range(20)] != [on.compose(i).phrases for i in range(20)]


def test_referral_phrases_use_the_synonym(tmp_path):
    composer = _composer(load_synonyms(str(_lvis(tmp_path))), same_object_likelihood=1.0)
    used = set()
    for i in range(30):
        comp = composer.compose(i)
        for name, phrase in zip(comp.names, comp.phrases):
            words = [w for w in NORMALISED[name] if w in phrase]
            assert words  # one of its class's synonyms ...
            if comp.names.count(name) > 1:
                assert phrase not in NORMALISED[name]  # ... with a relative word when the class repeats
            used.update(words)
    assert {"drinking cup", "longbow", "beer mug"} <= used


def test_classes_without_synonyms_keep_their_name():
    with pytest.warns(UserWarning, match="2 of 3 classes have no synonyms"):
        composer = _composer({"cup": ["mug"]})
    for i in range(10):
        comp = composer.compose(i)
        assert comp.phrases == [{"cup": "mug"}.get(n, n) for n in comp.names]


def test_off_by_default_leaves_compositions_unchanged():
    for name in ("tiny", "blip2", "openflamingo"):
        assert load_config(["--config", name])[0]["data"]["synonyms_description"] is False
    # values of the composer before the option existed (procedural pool, referral on, so the draws after the target
    # matter): unchanged
    pool = procedural_pool(["red circle", "blue square", "green cross"], per_class=2)
    composer = Composer(pool, Backgrounds(None), LayoutSampler(), 5, same_object_likelihood=0.5, pos_img_referral=0.5)
    expected = [
        ([[3, 5, 5, 6], [1, 6, 10, 13], [4, 0, 6, 3]], 1,
         ["green cross at the left", "below red circle", "red circle above"]),
        ([[0, 2, 15, 12], [5, 11, 9, 15], [8, 0, 11, 2]], 1,
         ["green cross at the center", "below blue square", "above blue square"]),
        ([[3, 5, 8, 8]], 0, ["blue square"]),
        ([[9, 6, 13, 14], [12, 8, 15, 10], [1, 1, 9, 5]], 2,
         ["red circle left", "red circle right", "top blue square"]),
    ]  # fmt: skip
    for i, (boxes, target, phrases) in enumerate(expected):
        comp = composer.compose(i, 0, fixed=False)
        assert (comp.boxes, comp.target, comp.phrases) == (boxes, target, phrases)


def test_config_option_describes_every_split(tmp_path):
    path = _lvis(
        tmp_path, [{"name": n, "synonyms": [n, f"odd_{n}"]} for n in ("circle", "square", "triangle", "cross")]
    )
    cfg, _ = load_config(["--config", "tiny", "data.synonyms_description=true", f"data.synonyms_path={path}"])
    train, val, _ = pools_from_cfg(cfg)
    for pool, split in ((train, "train"), (val, "val")):
        phrases = [dataset_from_cfg(cfg, pool, split)[i]["phrase"] for i in range(8)]
        assert all(p.removeprefix("odd ") in {"circle", "square", "triangle", "cross"} for p in phrases)
        assert any(p.startswith("odd ") for p in phrases)


def test_tiny_tokenizer_knows_the_synonyms(tmp_path, codec):
    """A tiny VLM's word tokenizer knows the synonyms that describe the procedural shapes (it read them as <unk>)."""
    from pin.pipeline import class_names
    from pin.zoo import word_tokenizer

    path = _lvis(
        tmp_path, [{"name": n, "synonyms": [n, f"odd_{n}"]} for n in ("circle", "square", "triangle", "cross")]
    )
    cfg, _ = load_config(["--config", "tiny", "data.synonyms_description=true", f"data.synonyms_path={path}"])
    tok = word_tokenizer(class_names(cfg), codec)
    train, _, _ = pools_from_cfg(cfg)
    phrases = {dataset_from_cfg(cfg, train, "train")[i]["phrase"] for i in range(8)}
    assert any(p.startswith("odd ") for p in phrases)
    for phrase in phrases:
        assert tok.unk_token_id not in tok(f"In the image is a {phrase} located at")["input_ids"], phrase
