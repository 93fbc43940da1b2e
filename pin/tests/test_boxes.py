import itertools

import pytest

from pin.boxes import GridCodec, coco_box_to_frame, format_value, voc_box_to_frame


def test_default_vocabulary_is_grid_line_pixels():
    codec = GridCodec()
    assert codec.vocabulary == [str(14 * i) for i in range(17)]
    assert codec.cell == 14


def test_vocabulary_decimals_follow_int_one_two_decimal_rule():
    # M = 1, G = 8: 0.125 -> "0.12" and 0.375 -> "0.38" under Python's "%.2f" (exact binary ties, round-half-even)
    assert GridCodec(grid=8, max_value=1).vocabulary == [
        "0",
        "0.12",
        "0.25",
        "0.38",
        "0.5",
        "0.62",
        "0.75",
        "0.88",
        "1",
    ]
    assert GridCodec(grid=4, max_value=10).vocabulary == ["0", "2.5", "5", "7.5", "10"]
    assert format_value(3.0) == "3" and format_value(0.1) == "0.1" and format_value(1 / 3) == "0.33"


def test_encode_example_of_the_spec(codec):
    assert codec.encode([2, 3, 5, 7]) == "[28,42,84,112]"
    assert codec.encode([0, 0, 15, 15]) == "[0,0,224,224]"


@pytest.mark.parametrize("cells", [[-1, 0, 2, 2], [3, 0, 2, 2], [0, 0, 16, 2]])
def test_encode_rejects_invalid_cells(codec, cells):
    with pytest.raises(ValueError, match="cells"):
        codec.encode(cells)


def test_round_trip_every_grid_box(codec):
    spans = [(a, b) for a in range(16) for b in range(a, 16)]
    for (x1, x2), (y1, y2) in itertools.product(spans[::3], spans[::2]):
        text = "In the image is a dog located at " + codec.encode([x1, y1, x2, y2]) + "."
        assert codec.decode(text) == [14.0 * x1, 14.0 * y1, 14.0 * (x2 + 1), 14.0 * (y2 + 1)]


@pytest.mark.parametrize(
    "text",
    [
        "located at[28,42,84,112]",  # no space before "["
        "located at [30,42,84,112]",  # not a vocabulary value
        "located at [28, 42,84,112]",  # " 42" fails the exact match
        "located at [28,42,28,112]",  # x1 == x2
        "located at [84,42,28,112]",  # x1 > x2
        "located at [28,112,84,42]",  # y1 > y2
        "located at [224,0,224,14]",  # x1 = 224 is not in v[:-1]
        "located at [0,0,0,14]",  # x2 = 0 is not in v[1:]
        "located at [28,42,84]",  # three values
        "located at a dog",
        "",
    ],
)
def test_invalid_text_gives_the_reference_fallback(codec, text):
    assert codec.decode(text) == [0.0, 0.0, 14.0, 14.0]


def test_first_match_wins_and_prompt_is_part_of_the_text(codec):
    assert codec.decode(" [0,0,14,14] and [28,42,84,112]") == [0.0, 0.0, 14.0, 14.0]
    assert codec.decode("x [14,14,28,28] [0,0,224,224]") == [14.0, 14.0, 28.0, 28.0]


def test_decode_clips_to_image_when_cells_do_not_divide():
    codec = GridCodec(grid=16, max_value=224, image_size=100)  # cell = ceil(100/16) = 7
    assert codec.cell == 7
    assert codec.decode(" [0,14,224,224]") == [0.0, 7.0, 100.0, 100.0]  # 16 * 7 = 112 -> 100


def test_random_cells_are_valid(codec):
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, y1, x2, y2 = codec.random_cells(rng)
        assert 0 <= x1 <= x2 <= 15 and 0 <= y1 <= y2 <= 15


def test_coco_box_conversion_truncates_and_clips():
    # 640x480 image, xywh (100.7, 50.2, 300.9, 429.9): scale 0.35, 0.4666
    x, y, w, h = int(100.7 * 0.35), int(50.2 * 224 / 480), int(300.9 * 0.35), int(429.9 * 224 / 480)
    assert coco_box_to_frame([100.7, 50.2, 300.9, 429.9], 640, 480) == [x, y, min(x + w, 223), min(y + h, 223)]
    assert coco_box_to_frame([0, 0, 640, 480], 640, 480) == [0, 0, 223, 223]


def test_voc_box_conversion():
    assert voc_box_to_frame([1, 1, 500, 375], 500, 375) == [1, 1, 224, 224]
    assert voc_box_to_frame([250.9, 100, 300, 200], 500, 375) == [
        int(250 * 224 / 500),
        int(100 * 224 / 375),
        int(300 * 224 / 500),
        int(200 * 224 / 375),
    ]


def test_snap_keeps_grid_boxes_and_encloses_others(codec):
    # on the grid (what the codec writes): unchanged, so IoU_grid == IoU there
    for box in ([28.0, 42.0, 84.0, 112.0], [0.0, 0.0, 224.0, 224.0], codec.cells_to_pixels([2, 3, 5, 7])):
        assert codec.snap(box) == box
    # cell 14: x1 20 -> floor(20/14)=1 -> 14, y1 30 -> 2 -> 28, x2 60 -> ceil(60/14)=5 -> 70, y2 100 -> ceil 8 -> 112
    assert codec.snap([20, 30, 60, 100]) == [14.0, 28.0, 70.0, 112.0]
    assert codec.snap([0, 0, 223, 223]) == [0.0, 0.0, 224.0, 224.0]  # COCO's far edge clipped to 223
    assert codec.snap([28, 28, 28, 40]) == [28.0, 28.0, 42.0, 42.0]  # an empty side still spans one cell
    # 364 frame, cell ceil(364/16) = 23: 100 -> 4*23=92, 50 -> 2*23=46, 200 -> ceil 9 -> 207, 150 -> ceil 7 -> 161;
    # the last grid line 16*23 = 368 is clipped to 364
    wide = GridCodec(16, 224, 364)
    assert wide.snap([100, 50, 200, 150]) == [92.0, 46.0, 207.0, 161.0]
    assert wide.snap([0, 0, 363, 363]) == [0.0, 0.0, 364.0, 364.0]
    # a box on the far border (a VOC edge clipped to 224) snaps to the last cell, not to an empty box past the image
    assert codec.snap([224, 224, 224, 224]) == [210.0, 210.0, 224.0, 224.0]
    assert codec.snap([224, 0, 224, 20]) == [210.0, 0.0, 224.0, 28.0]
