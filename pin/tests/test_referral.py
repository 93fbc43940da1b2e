"""Referral phrases and object sampling of the synthetic compositions, against hand-built layouts and analytic rates."""

import itertools
import warnings

import numpy as np
import pytest

from pin.layout import LayoutSampler
from pin.synthetic import (
    ABSOLUTE_FORMS,
    Backgrounds,
    Composer,
    ObjectPool,
    absolute_position_word,
    corner_overlap,
    procedural_pool,
    referral_form,
    relative_position_word,
)


def _words(fn, draws=40):
    """Every word `fn(rng)` gives over `draws` seeded generators (the A|B choices are the only randomness)."""
    return {fn(np.random.default_rng(s)) for s in range(draws)}


def _pool(counts):
    """A pool with counts[name] one-pixel cut-outs per class."""
    px = np.full((2, 2, 4), 255, np.uint8)
    return ObjectPool([(name, px) for name, n in counts.items() for _ in range(n)])


def _composer(pool, **kwargs):
    return Composer(pool, Backgrounds(None), LayoutSampler(), **kwargs)


def test_relative_word_above_below_left_right():
    names = ["cup", "cup"]
    above = [[2, 0, 5, 3], [2, 10, 5, 13]]  # the first cup fully above the second, same columns
    assert _words(lambda r: relative_position_word(0, names, above, r)) == {"above", "top"}
    assert _words(lambda r: relative_position_word(1, names, above, r)) == {"below"}
    side = [[0, 4, 3, 7], [9, 5, 12, 8]]  # dx = -9, dy = -1
    assert _words(lambda r: relative_position_word(0, names, side, r)) == {"left"}
    assert _words(lambda r: relative_position_word(1, names, side, r)) == {"right"}
    # |dx| == |dy|: the vertical word (the reference's strict "|dx| > |dy|" for horizontal)
    diagonal = [[0, 0, 2, 2], [4, 4, 6, 6]]
    assert _words(lambda r: relative_position_word(0, names, diagonal, r)) == {"above", "top"}
    assert _words(lambda r: relative_position_word(1, names, diagonal, r)) == {"below"}


def test_relative_word_needs_a_same_class_twin():
    boxes = [[0, 0, 3, 3], [8, 8, 11, 11], [0, 10, 3, 13]]
    rng = np.random.default_rng(0)
    assert relative_position_word(0, ["cup", "bowl", "plate"], boxes, rng) is None
    # the bowl (index 1) is ignored: only the other cup (index 2, below) counts
    assert _words(lambda r: relative_position_word(0, ["cup", "bowl", "cup"], boxes, r)) == {"above", "top"}


def test_relative_word_in_front_and_behind_by_paste_order():
    names = ["cup", "cup"]
    big_then_small = [[0, 0, 9, 9], [2, 2, 4, 4]]  # the small one lies inside the big one: overlap 1 > 0.75
    assert _words(lambda r: relative_position_word(1, names, big_then_small, r)) == {"before", "in front"}
    assert _words(lambda r: relative_position_word(0, names, big_then_small, r)) == {"behind"}
    small_then_big = big_then_small[::-1]
    assert _words(lambda r: relative_position_word(0, names, small_then_big, r)) == {"behind"}
    assert _words(lambda r: relative_position_word(1, names, small_then_big, r)) == {"before", "in front"}


def test_relative_word_overlap_uses_the_cell_corners_like_the_reference():
    # as corners (no +1): intersection 6x8 over 8x8 = 0.75, not > 0.75 -> spatial word; the paste rectangles
    # (9x9 cells, intersection 7x9) would give 0.78 and "before"
    a, b = [0, 0, 8, 8], [2, 0, 10, 8]
    assert corner_overlap(a, b) == 0.75
    assert _words(lambda r: relative_position_word(0, ["cup", "cup"], [a, b], r)) == {"left"}
    assert _words(lambda r: relative_position_word(0, ["cup", "cup"], [a, [2, 0, 10, 9]], r)) == {"left"}
    # one more row taller but nested: the smaller box is covered fully -> 1.0
    assert corner_overlap([0, 0, 4, 4], [0, 0, 4, 5]) == 1.0
    assert _words(lambda r: relative_position_word(0, ["cup", "cup"], [[0, 0, 4, 4], [0, 0, 4, 5]], r)) == {"behind"}
    assert corner_overlap([0, 0, 0, 3], [0, 0, 4, 4]) == 0.0  # an empty box


def test_relative_word_middle_of_three():
    names = ["cup"] * 3
    between = [[6, 6, 9, 9], [0, 0, 3, 3], [12, 12, 15, 15]]  # centre strictly between both twins on x and y
    assert _words(lambda r: relative_position_word(0, names, between, r)) == {"middle", "center"}
    # the outer ones: the largest signed difference decides (to the farther twin, a tie -> vertical)
    assert _words(lambda r: relative_position_word(1, names, between, r)) == {"above", "top"}
    assert _words(lambda r: relative_position_word(2, names, between, r)) == {"below"}
    # between on x only: no "middle"; dx to the twins = +6, -6 (first on ties: +6), dy = -1, -12 -> vertical
    x_only = [[6, 0, 9, 3], [0, 1, 3, 4], [12, 12, 15, 15]]
    assert _words(lambda r: relative_position_word(0, names, x_only, r)) == {"above", "top"}
    # one twin only when the third object is of another class: dx = dy = +6 to it, a tie -> vertical, "below"
    assert _words(lambda r: relative_position_word(0, ["cup", "cup", "bowl"], between, r)) == {"below"}


@pytest.mark.parametrize(
    "box, words",
    [
        ([0, 0, 3, 3], {"left"}),  # centre 2 cells: first third (< 16/3)
        ([0, 12, 3, 15], {"left"}),  # the horizontal third wins over the vertical one
        ([12, 0, 15, 3], {"right"}),
        ([6, 6, 9, 9], {"middle", "center"}),  # centre (8, 8)
        ([6, 0, 9, 3], {"top"}),
        ([6, 12, 9, 15], {"bottom"}),
        ([4, 4, 6, 6], {"middle", "center"}),  # paste rectangle 4..7: centre 5.5 > 16/3, the middle third
        ([4, 6, 5, 9], {"left"}),  # paste rectangle 4..6: centre 5.0 < 16/3
        ([9, 6, 11, 9], {"middle", "center"}),  # centre 10.5 < 32/3
        ([10, 6, 11, 9], {"right"}),  # centre 11.0 >= 32/3
        ([0, 0, 15, 15], {"middle", "center"}),  # the whole image
    ],
)
def test_absolute_word_from_the_thirds(box, words):
    assert _words(lambda r: absolute_position_word(box, 16, r)) == words


def test_phrase_forms():
    relative = {"left cup", "cup left", "cup on left"}
    absolute = relative | {"cup at the left"}
    rel_forms = ("{word} {name}", "{name} {word}", "{name} on {word}")
    assert _words(lambda r: referral_form("cup", "left", rel_forms, r)) == relative
    assert _words(lambda r: referral_form("cup", "left", (*rel_forms, "{name} at the {word}"), r)) == absolute
    assert _words(lambda r: referral_form("wine glass", "in front", rel_forms, r)) == {
        "in front wine glass",
        "wine glass in front",
        "wine glass on in front",
    }


def _family(word):
    return {"top": "above", "in front": "before", "center": "middle"}.get(word, word)


def _split_phrase(phrase, name):
    """(form, word) of a referral phrase of `name`."""
    for form in ("{name} at the {word}", "{name} on {word}", "{name} {word}", "{word} {name}"):
        head, tail = form.split("{word}")
        head, tail = head.format(name=name), tail.format(name=name)
        if phrase.startswith(head) and phrase.endswith(tail) and len(phrase) > len(head) + len(tail):
            return form, phrase[len(head) : len(phrase) - len(tail)]
    raise AssertionError(f"{phrase!r} is no referral phrase of {name!r}")


def test_compositions_carry_the_referral_of_their_layout():
    pool = procedural_pool(["circle", "square"], per_class=3)
    composer = _composer(pool, seed=5, same_object_likelihood=0.6, pos_img_referral=0.5)
    counts = {"relative": 0, "absolute": 0, "bare": 0}
    for i in range(40):
        comp = composer.compose(i, fixed=i % 2 == 0)
        assert comp.phrase == comp.phrases[comp.target] and len(comp.phrases) == len(comp.names)
        for j, (name, phrase) in enumerate(zip(comp.names, comp.phrases)):
            word = relative_position_word(j, comp.names, comp.boxes, np.random.default_rng(0))
            if word is not None:
                form, got = _split_phrase(phrase, name)
                assert form != "{name} at the {word}" and _family(got) == _family(word)
                counts["relative"] += 1
            elif phrase == name:
                counts["bare"] += 1
            else:
                form, got = _split_phrase(phrase, name)
                assert _family(got) == _family(absolute_position_word(comp.boxes[j], 16, np.random.default_rng(0)))
                counts["absolute"] += 1
        again = composer.compose(i, fixed=i % 2 == 0)  # same seed, same data
        assert again.phrases == comp.phrases and again.boxes == comp.boxes and again.target == comp.target
    assert min(counts.values()) >= 5, counts


def test_referral_is_gated_on_same_object_likelihood():
    pool = _pool({"cup": 1, "bowl": 1, "plate": 1, "fork": 1})
    with pytest.warns(UserWarning, match="pos_img_referral has no effect"):
        off = _composer(pool, pos_img_referral=1.0)
    for i in range(10):
        comp = off.compose(i)
        assert comp.phrases == comp.names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on = _composer(pool, same_object_likelihood=1e-9, pos_img_referral=1.0, object_sampling="classes")
    for i in range(10):  # distinct classes, no repeat: every object gets an absolute word
        comp = on.compose(i)
        assert len(set(comp.names)) == 3
        for name, phrase, box in zip(comp.names, comp.phrases, comp.boxes):
            _, word = _split_phrase(phrase, name)
            assert _family(word) == _family(absolute_position_word(box, 16, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="object_sampling='distinct'"):
        _composer(pool, object_sampling="distinct")


def _class_draws(composer, k, n=20000, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(composer.pool.instances[i][0] for i in composer.draw_objects(rng, k)) for _ in range(n)]


def _close(rate, expected, n=20000):
    return abs(rate - expected) < 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9


def test_instance_sampling_weights_classes_by_instance_count():
    pool = _pool({"a": 3, "b": 1})
    draws = _class_draws(_composer(pool), k=2)
    first_a = np.mean([d[0] == "a" for d in draws])
    assert _close(first_a, 0.75)
    assert _close(np.mean([d[0] == d[1] for d in draws]), 0.75**2 + 0.25**2)  # independent, with replacement
    draws = _class_draws(_composer(pool, object_sampling="classes"), k=2)
    assert _close(np.mean([d[0] == "a" for d in draws]), 0.5) and all(d[0] != d[1] for d in draws)
    assert {len(d) for d in _class_draws(_composer(pool, object_sampling="classes"), k=3, n=10)} == {2}


def test_same_object_repeats_the_previous_object_with_the_analytic_rates():
    """Object j+1 becomes another cut-out of object j's class with probability p unless that class is already
    repeated; rates worked out by summing over the classes of the independent uniform-instance draws."""
    weights = {"a": 0.75, "b": 0.25}
    pool = _pool({"a": 3, "b": 1})
    p = 0.5
    draws2 = _class_draws(_composer(pool, same_object_likelihood=p), k=2)
    s2 = sum(w**2 for w in weights.values())
    assert _close(np.mean([d[0] == d[1] for d in draws2]), p + (1 - p) * s2)

    draws3 = _class_draws(_composer(pool, same_object_likelihood=p), k=3, seed=1)
    all_same = sum(w * (p + (1 - p) * w) * w for w in weights.values())  # no forced third after a repeat
    assert _close(np.mean([len(set(d)) == 1 for d in draws3]), all_same)
    # the third repeats the *second* object: P(c3 == c2 != c1)
    last_pair = sum(
        weights[a] * (1 - p) * weights[b] * (p + (1 - p) * weights[b]) for a, b in itertools.permutations(weights, 2)
    )
    assert _close(np.mean([d[2] == d[1] != d[0] for d in draws3]), last_pair)
    # the repeated cut-out is uniform within the class (3 cut-outs of "a": each 1/3)
    rng = np.random.default_rng(2)
    composer = _composer(_pool({"a": 3}), same_object_likelihood=1.0)
    second = [composer.draw_objects(rng, 2)[1] for _ in range(6000)]
    assert all(_close(np.mean(np.array(second) == i), 1 / 3, 6000) for i in range(3))


def test_held_out_queries_use_each_objects_phrase():
    from pin.eval_data import synthetic_queries
    from pin.synthetic import SyntheticCompositions

    composer = _composer(procedural_pool(["circle", "square"], per_class=2), same_object_likelihood=0.8)
    queries = synthetic_queries(SyntheticCompositions(composer, 6), 6, epoch=7)
    expected = [p for i in range(6) for p in composer.compose(i, 7, fixed=True).phrases]
    assert [q.name for q in queries] == expected
    assert any(q.name not in ("circle", "square") for q in queries)


def test_tiny_tokenizer_knows_every_referral_word(codec):
    """With referral on, the tiny VLM's word tokenizer reads "behind" and "before" as words, not <unk> (one token for
    both, so the tiny run could not tell them apart); off, its vocabulary is unchanged."""
    from pin.config import load_config
    from pin.pipeline import class_names
    from pin.zoo import word_tokenizer

    cfg, _ = load_config(["--config", "tiny", "data.same_object_likelihood=0.5", "data.pos_img_referral=0.5"])
    tok = word_tokenizer(class_names(cfg), codec)
    words = ("before", "in front", "behind", "middle", "center", "left", "right", "above", "top", "below", "bottom")
    for word, form in itertools.product(words, ABSOLUTE_FORMS):
        ids = tok(f"In the image is a {form.format(word=word, name='circle')} located at")["input_ids"]
        assert tok.unk_token_id not in ids, (word, form)
    off, _ = load_config(["--config", "tiny"])
    shapes = off["data"]["procedural_classes"]
    assert word_tokenizer(class_names(off), codec).get_vocab() == word_tokenizer(shapes, codec).get_vocab()
