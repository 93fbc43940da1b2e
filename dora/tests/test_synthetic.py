import colorsys

import numpy as np
import pytest

from dora.synthetic import HUES, NUM_CLASSES, labelled_objects, make_object, walking_frames, write_video


def _hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 1 - abs(a - b))


def test_hue_object_is_two_shades_of_its_class_hue_in_any_texture():
    rng = np.random.default_rng(0)
    for cls in range(NUM_CLASSES):
        rows = set()
        for _ in range(12):
            img, _ = make_object(cls, 24, rng)
            colours = np.unique(img.reshape(-1, 3), axis=0)
            assert len(colours) == 2
            hsv = [colorsys.rgb_to_hsv(*(c / 255)) for c in colours]
            assert all(_hue_distance(h, HUES[cls]) <= 0.06 + 0.01 and 0.6 - 0.02 <= s for h, s, _ in hsv)
            assert sorted(v for *_, v in hsv)[0] <= 0.55 + 0.01 and sorted(v for *_, v in hsv)[1] >= 0.8 - 0.01
            rows.add(bool((img == img[:, :1]).all()))  # every row one colour: horizontal stripes
        assert rows == {True, False}  # the texture is not the class: stripes and other patterns in every class


def test_unknown_classes_and_grey_hue_are_errors():
    with pytest.raises(ValueError, match="classes must be one of"):
        make_object(0, 8, np.random.default_rng(0), classes="shape")
    with pytest.raises(ValueError, match="grey=True needs classes='texture'"):
        labelled_objects(1, grey=True)


def test_grey_object_has_two_grey_levels_far_apart():
    img, mask = make_object(0, 24, np.random.default_rng(0), grey=True, classes="texture")
    assert (img == img[..., :1]).all()
    levels = np.unique(img[..., 0])
    assert len(levels) == 2 and levels[1] - levels[0] >= 96
    assert mask.shape == (24, 24) and mask.any()


def test_labelled_objects_grey_and_colour():
    grey, labels = labelled_objects(3, size=32, seed=0, grey=True, classes="texture")
    assert grey.shape == (3 * NUM_CLASSES, 32, 32, 3) and grey.dtype == np.uint8
    assert (grey == grey[..., :1]).all()
    assert np.bincount(labels).tolist() == [3] * NUM_CLASSES
    colour, colour_labels = labelled_objects(3, size=32, seed=0, classes="texture")
    assert (colour_labels == labels).all()
    assert not (colour == colour[..., :1]).all()


def test_labelled_hue_objects_show_their_class_hue_on_a_background():
    images, labels = labelled_objects(5, size=32, seed=0)
    assert images.shape == (5 * NUM_CLASSES, 32, 32, 3) and np.bincount(labels).tolist() == [5] * NUM_CLASSES
    for img, y in zip(images, labels):
        hsv = np.array([colorsys.rgb_to_hsv(*(p / 255)) for p in img.reshape(-1, 3)])
        vivid = hsv[hsv[:, 1] > 0.6]  # object pixels: the background's channels are 70-185, saturation <= 0.62
        assert 0.04 < len(vivid) / len(hsv) < 0.5  # a quarter to half the side: the background fills most of it
        assert np.median([_hue_distance(h, HUES[y]) for h in vivid[:, 0]]) < 0.08


def test_walking_video_objects_take_their_hue_classes():
    for classes, in_families in (("hue", True), ("texture", False)):
        colours = np.unique(np.stack(list(walking_frames(30, seed=0, classes=classes))).reshape(-1, 3), axis=0)
        hsv = np.array([colorsys.rgb_to_hsv(*(c / 255)) for c in colours])
        vivid = hsv[hsv[:, 1] > 0.63, 0]  # object colours only: the background's saturation is at most 0.62
        nearest = np.array([min(_hue_distance(h, f) for f in HUES) for h in vivid])
        assert len(vivid) > 0 and (nearest <= 0.07).all() == in_families


def test_write_video_same_frames_same_bytes_within_one_process(tmp_path):
    # libx264's macroblock-tree rate control gave a different bitstream on the 2nd and 3rd encode in a process
    frames = list(walking_frames(40, size=32, num_objects=2, seed=0))
    data = [write_video(tmp_path / f"w{i}.mp4", frames).read_bytes() for i in range(3)]
    assert data[0] == data[1] == data[2]
