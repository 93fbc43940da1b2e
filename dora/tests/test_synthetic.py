import numpy as np

from dora.synthetic import NUM_CLASSES, labelled_objects, make_object, walking_frames, write_video


def test_grey_object_has_two_grey_levels_far_apart():
    img, mask = make_object(0, 24, np.random.default_rng(0), grey=True)
    assert (img == img[..., :1]).all()
    levels = np.unique(img[..., 0])
    assert len(levels) == 2 and levels[1] - levels[0] >= 96
    assert mask.shape == (24, 24) and mask.any()


def test_labelled_objects_grey_and_colour():
    grey, labels = labelled_objects(3, size=32, seed=0, grey=True)
    assert grey.shape == (3 * NUM_CLASSES, 32, 32, 3) and grey.dtype == np.uint8
    assert (grey == grey[..., :1]).all()
    assert np.bincount(labels).tolist() == [3] * NUM_CLASSES
    colour, colour_labels = labelled_objects(3, size=32, seed=0)
    assert (colour_labels == labels).all()
    assert not (colour == colour[..., :1]).all()


def test_write_video_same_frames_same_bytes_within_one_process(tmp_path):
    # libx264's macroblock-tree rate control gave a different bitstream on the 2nd and 3rd encode in a process
    frames = list(walking_frames(40, size=32, num_objects=2, seed=0))
    data = [write_video(tmp_path / f"w{i}.mp4", frames).read_bytes() for i in range(3)]
    assert data[0] == data[1] == data[2]
