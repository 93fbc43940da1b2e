"""Winoground scores on hand-made similarity tables, and the release-folder reader's errors."""

import json

import pytest
import torch

from sharelock.winoground import load_examples, summarize, winoground_scores


def table(*rows):
    """(N, 2, 2) [example, caption, image] from rows ((f(C0,I0), f(C0,I1)), (f(C1,I0), f(C1,I1)))."""
    return torch.tensor(rows, dtype=torch.float32)


def test_scores_on_hand_cases():
    sim = table(
        ((1.0, 0.0), (0.0, 1.0)),  # both right: text, image, group
        ((1.0, 2.0), (0.0, 3.0)),  # each image prefers its caption (1 > 0, 3 > 2), but C0 prefers I1 (2 > 1)
        ((1.0, 0.0), (2.0, 3.0)),  # each caption prefers its image (1 > 0, 3 > 2), but I0 prefers C1 (2 > 1)
        ((0.0, 1.0), (1.0, 0.0)),  # everything swapped
        ((1.0, 1.0), (0.0, 2.0)),  # a tie fails: f(C0,I0) = f(C0,I1)
        ((1.0, 0.0), (1.0, 2.0)),  # a tie fails the text score too: f(C0,I0) = f(C1,I0)
    )
    got = winoground_scores(sim)
    assert got["text"].tolist() == [True, True, False, False, True, False]
    assert got["image"].tolist() == [True, False, True, False, False, True]
    assert got["group"].tolist() == [True, False, False, False, False, False]


def test_summary_in_percent_with_tags():
    sim = table(((1.0, 0.0), (0.0, 1.0)), ((1.0, 2.0), (0.0, 3.0)), ((0.0, 1.0), (1.0, 0.0)), ((1.0, 0.0), (2.0, 3.0)))
    out = summarize(sim, ["Object", "Object", "Relation", "Relation"])
    assert out["n"] == 4
    assert (out["text"], out["image"], out["group"]) == (50.0, 50.0, 25.0)
    assert out["per_tag"]["Object"] == {"n": 2, "text": 100.0, "image": 50.0, "group": 50.0}
    assert out["per_tag"]["Relation"] == {"n": 2, "text": 0.0, "image": 50.0, "group": 0.0}
    # swapping both captions and both images of every example relabels the same pairs: same scores
    swapped = sim.flip(1).flip(2)
    assert {k: v.tolist() for k, v in winoground_scores(swapped).items()} == {
        k: v.tolist() for k, v in winoground_scores(sim).items()
    }
    with pytest.raises(ValueError, match=r"\(N, 2, 2\)"):
        winoground_scores(torch.zeros(3, 2, 3))


def test_release_folder_reader_and_its_errors(tmp_path):
    from PIL import Image

    with pytest.raises(FileNotFoundError, match="no examples.jsonl in"):
        load_examples(tmp_path)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rec = {"id": 0, "caption_0": "a mug in some grass", "caption_1": "some grass in a mug", "collapsed_tag": "Object"}
    rec |= {"image_0": "ex_0_img_0", "image_1": "ex_0_img_1"}
    (data / "examples.jsonl").write_text(json.dumps(rec) + "\n\n")
    Image.new("RGB", (8, 8)).save(data / "images" / "ex_0_img_0.png")
    with pytest.raises(FileNotFoundError, match="image 'ex_0_img_1' not found in"):
        load_examples(tmp_path)
    Image.new("RGB", (8, 8)).save(data / "images" / "ex_0_img_1.jpg")
    (ex,) = load_examples(tmp_path)  # the release's data/ folder, found from its parent; blank lines skipped
    assert ex["image_1"].name == "ex_0_img_1.jpg" and ex["tag"] == "Object" and ex["caption_1"] == rec["caption_1"]
    (data / "examples.jsonl").write_text(json.dumps({"id": 1, "caption_0": "x"}))
    with pytest.raises(KeyError, match="line 1 lacks"):
        load_examples(data)
    (data / "examples.jsonl").write_text(json.dumps(rec) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"examples.jsonl line 2 is not JSON"):
        load_examples(data)


class StubModel:
    """encode_image: a solid-colour image -> (red, green) / 255; encode_text: 'x,y' -> (x, y)."""

    def encode_image(self, images):
        return torch.tensor([[c / 255 for c in im.getpixel((0, 0))[:2]] for im in images])

    def encode_text(self, texts):
        return torch.tensor([[float(v) for v in t.split(",")] for t in texts])


def test_similarities_are_indexed_example_caption_image():
    from PIL import Image

    from sharelock.winoground import similarities

    colours = [(255, 0, 0), (0, 255, 0), (51, 102, 0), (204, 153, 0), (0, 0, 0), (255, 255, 0)]
    images = [Image.new("RGB", (4, 4), c) for c in colours]
    captions = ["1,2", "3,-1", "0,1", "2,2", "-1,0", "5,1"]
    examples = [
        {
            "image_0": images[2 * n],
            "image_1": images[2 * n + 1],
            "caption_0": captions[2 * n],
            "caption_1": captions[2 * n + 1],
        }
        for n in range(3)
    ]
    sim = similarities(StubModel(), examples, batch_size=4)  # image batches cross example boundaries
    for n, ex in enumerate(examples):
        for c in (0, 1):
            for i in (0, 1):
                x, y = (float(v) for v in ex[f"caption_{c}"].split(","))
                r, g = (v / 255 for v in ex[f"image_{i}"].getpixel((0, 0))[:2])
                assert sim[n, c, i].item() == pytest.approx(x * r + y * g)
