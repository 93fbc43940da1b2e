import json
import logging
import shutil

import numpy as np
import pytest

from dora.data import VideoClipDataset
from dora.synthetic import coded_frame, decode_index, write_video
from dora.video import (
    ImageFolderFrameSource,
    JpegCacheFrameSource,
    PyAVFrameSource,
    build_frame_cache,
    open_source,
    output_size,
)


def test_frame_count_and_order(coded_video):
    src = PyAVFrameSource(coded_video, short_side=None)
    assert src.num_frames == 100
    want = [3, 4, 5, 40, 41, 97, 99]
    got = src.read(want)
    assert sorted(got) == want
    assert [decode_index(got[i]) for i in want] == want
    # backwards request after the decoder moved on: must seek back, not return wrong frames
    got = src.read([17, 2])
    assert {i: decode_index(f) for i, f in got.items()} == {2: 2, 17: 17}
    assert src.skipped_frames == 0


def test_forward_reads_without_seeking(coded_video, monkeypatch):
    src = PyAVFrameSource(coded_video, short_side=None, seek_gap=50)
    seeks = []
    orig = src._seek
    monkeypatch.setattr(src, "_seek", lambda t: (seeks.append(t), orig(t)))
    src.read([0, 10, 20])
    src.read([30, 40])  # within seek_gap of the decoding position: continue decoding forward
    assert seeks == [0]
    src.read([95])  # 54 frames past the decoding position (> seek_gap): seek
    src.read([5])  # backwards: seek
    assert seeks == [0, 95, 5]


def test_decode_at_training_resolution(coded_video):
    src = PyAVFrameSource(coded_video, short_side=32)
    assert src.size == (48, 32)
    frame = src.read([77])[77]
    assert frame.shape == (32, 48, 3)
    assert decode_index(frame) == 77
    assert output_size(3840, 2160, 320) == (568, 320)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        PyAVFrameSource(tmp_path / "nope.mp4")
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="garbage.mp4"):
        PyAVFrameSource(bad)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        VideoClipDataset([tmp_path / "nope.mp4"], num_frames=2, step=3)


def test_truncated_tail_is_skipped_and_counted(coded_video, tmp_path, caplog):
    data = coded_video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    src = PyAVFrameSource(cut, short_side=None)
    assert src.num_frames == 100  # the header still claims every frame
    with caplog.at_level(logging.WARNING):
        got = src.read([10, 20, 95, 99])
    assert {i: decode_index(f) for i, f in got.items() if i < 50} == {10: 10, 20: 20}
    assert 95 not in got and 99 not in got
    assert src.skipped_frames >= 2
    assert "skipped" in caplog.text
    # a clip that reaches into the lost tail gets its missing frames from the nearest decoded frame of the clip
    present = set(PyAVFrameSource(cut, short_side=None).read(range(100)))
    assert 10 in present and 99 not in present
    ds = VideoClipDataset([cut], num_frames=3, step=30, short_side=None)
    (clip,) = ds.read_clips([9])  # frames 9, 39, 69
    expected = [min((p for p in (9, 39, 69) if p in present), key=lambda p, f=f: abs(p - f)) for f in (9, 39, 69)]
    assert 69 not in present and [decode_index(f) for f in clip] == expected


def test_frame_cache_roundtrip(coded_video, tmp_path):
    cache = build_frame_cache(coded_video, tmp_path / "cache", short_side=32)
    assert not list(tmp_path.glob("*.tmp*"))
    src = open_source(cache)
    assert isinstance(src, JpegCacheFrameSource) and src.num_frames == 100
    got = src.read([0, 50, 99])
    assert [decode_index(got[i]) for i in (0, 50, 99)] == [0, 50, 99]
    assert got[50].shape == (32, 48, 3)
    assert build_frame_cache(coded_video, cache) == cache  # built once


def test_frame_cache_of_a_rewritten_video_is_an_error(tmp_path):
    # before: a video re-encoded at the same path was served from the cache of its earlier frames
    video = write_video(tmp_path / "v.mp4", [coded_frame(i) for i in range(20)])
    cache = build_frame_cache(video, tmp_path / "cache", short_side=32)
    write_video(video, [coded_frame(i) for i in range(40)])
    with pytest.raises(ValueError, match=r"^data.cache_dir: .*cache was built from .*v.mp4 when it had \d+ bytes; "):
        build_frame_cache(video, cache)
    shutil.rmtree(cache)
    assert open_source(build_frame_cache(video, cache)).num_frames == 40
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps({**meta, "source_bytes": 1}))
    video.unlink()  # a cache outlives its video: not checked, as one written before the size was recorded
    assert build_frame_cache(video, cache) == cache
    del meta["source_bytes"]
    (cache / "meta.json").write_text(json.dumps(meta))
    write_video(video, [coded_frame(i) for i in range(20)])
    assert build_frame_cache(video, cache) == cache


def test_dataset_over_video_matches_clip_indices(coded_video):
    ds = VideoClipDataset([coded_video, coded_video], num_frames=3, step=20, short_side=None)
    assert len(ds) == 2 * (100 - 60)
    clips = ds.read_clips([0, 39, 40, 45])
    assert [[decode_index(f) for f in c] for c in clips] == [[0, 20, 40], [39, 59, 79], [0, 20, 40], [5, 25, 45]]


def test_variable_frame_rate_frames_are_indexed_in_presentation_order(tmp_path):
    """Frame i shown for 1, 1, 5, 2, 1 or 4 ticks of 1/60 s: rounding pts x average rate would misplace frames."""
    import fractions

    import av

    from dora.synthetic import CODE_BITS, coded_frame

    path = tmp_path / "vfr.mp4"
    tb = fractions.Fraction(1, 60)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = CODE_BITS * 12, 64, "yuv420p"
        stream.codec_context.time_base = tb
        stream.gop_size = 12
        pts = 0
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(coded_frame(i), format="rgb24")
            frame.pts, frame.time_base = pts, tb
            pts += [1, 1, 5, 2, 1, 4][i % 6]
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    src = PyAVFrameSource(path, short_side=None, seek_gap=4)
    assert src.num_frames == 60
    got = src.read(range(60))
    assert {i: decode_index(f) for i, f in got.items()} == {i: i for i in range(60)}
    got = src.read([51, 7, 30, 31, 59])  # backwards and far jumps seek by timestamp
    assert {i: decode_index(f) for i, f in got.items()} == {i: i for i in (7, 30, 31, 51, 59)}
    assert src.skipped_frames == 0


def test_truncated_file_without_frame_count_keeps_later_frames_in_place(tmp_path):
    """An mkv (no frame count in the header) cut at 95 %: B-frame reordering loses frame 98's packet but not 99's;
    frame 99 must stay frame 99, and 98 be reported missing."""
    import av

    from dora.synthetic import CODE_BITS, coded_frame

    full, cut = tmp_path / "full.mkv", tmp_path / "cut.mkv"
    with av.open(str(full), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = CODE_BITS * 12, 64, "yuv420p"
        stream.gop_size, stream.options = 10, {"crf": "10"}
        for i in range(100):
            for p in stream.encode(av.VideoFrame.from_ndarray(coded_frame(i), format="rgb24")):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.95)])
    got = PyAVFrameSource(cut, short_side=None, seek_gap=4).read(range(90, 100))
    decoded = {i: decode_index(f) for i, f in got.items()}
    assert decoded and all(i == v for i, v in decoded.items())  # never another frame under an index
    assert len(decoded) < 10  # the cut lost something


def test_frame_read_again_by_the_next_request_is_delivered(coded_video):
    """Consecutive batches may ask again for the last frame decoded (clips sharing a frame): it must come back, not be
    reported missing (and silently replaced by a neighbour)."""
    src = PyAVFrameSource(coded_video, short_side=None)
    assert decode_index(src.read([40])[40]) == 40
    got = src.read([40, 41])
    assert {i: decode_index(f) for i, f in got.items()} == {40: 40, 41: 41}
    assert decode_index(src.read([41])[41]) == 41
    assert src.skipped_frames == 0


def test_frame_cache_keeps_frames_after_an_undecodable_one_in_place(coded_video, tmp_path, monkeypatch):
    frames = PyAVFrameSource._frames

    def losing_frame_50(self):
        return ((i, f) for i, f in frames(self) if i != 50)

    monkeypatch.setattr(PyAVFrameSource, "_frames", losing_frame_50)
    src = open_source(build_frame_cache(coded_video, tmp_path / "cache", short_side=None))
    got = src.read([49, 50, 51, 52])
    assert {i: decode_index(f) for i, f in got.items()} == {49: 49, 51: 51, 52: 52}
    assert src.skipped_frames == 1


def test_frame_folder_reads_in_name_order_and_counts_missing_frames(tmp_path):
    """Frame i is the i-th file by name; a corrupt file and indices outside [0, N) (negative ones too, which plain
    list indexing would wrap to the end) are skipped and counted."""
    from PIL import Image

    for i in range(6):
        Image.fromarray(coded_frame(i, height=64, band=12)).save(tmp_path / f"frame_{i:03d}.png")
    (tmp_path / "frame_006.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("ignored: not an image")
    src = open_source(tmp_path, short_side=32)
    assert isinstance(src, ImageFolderFrameSource) and src.num_frames == 7
    got = src.read([5, 0, 3, 6, -2, 7])
    assert sorted(got) == [0, 3, 5]
    assert {i: decode_index(f) for i, f in got.items()} == {0: 0, 3: 3, 5: 5}
    assert got[0].shape == (32, 48, 3)  # 64 x 96 resized to short side 32
    assert src.skipped_frames == 3
