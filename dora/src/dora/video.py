"""Frame sources: PyAV video decoding at training resolution, a JPEG frame cache, in-memory arrays, image folders.

A source maps frame indices to uint8 RGB arrays (H, W, 3). ``read`` takes a whole group of requests at once so
the PyAV source can serve them in one forward decoding pass, seeking only across large gaps; the decoder stays
open between calls (one per worker process).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class FrameSource:
    """Base class: ``num_frames``, ``read(indices) -> {index: (H, W, 3) uint8}``; missing frames are absent."""

    name: str = "frames"
    num_frames: int = 0
    skipped_frames: int = 0

    def read(self, indices: Iterable[int]) -> dict[int, np.ndarray]:
        """{index: (H, W, 3) uint8} of the requested frames; subclasses implement it."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles (sources reopen lazily)."""

    def _warn_missing(self, missing: list[int]) -> None:
        if missing:
            self.skipped_frames += len(missing)
            logger.warning(
                "%s: %d corrupt or missing frame(s) skipped (e.g. %s); %d so far",
                self.name,
                len(missing),
                missing[:3],
                self.skipped_frames,
            )


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so the short side is ``short_side`` (never upscaled; even numbers for swscale)."""
    if not short_side or min(width, height) <= short_side:
        return width, height
    s = short_side / min(width, height)
    return max(2, round(width * s / 2) * 2), max(2, round(height * s / 2) * 2)


class ArrayFrameSource(FrameSource):
    """Frames held in memory, (N, H, W, 3) uint8."""

    def __init__(self, frames: np.ndarray, name: str = "array") -> None:
        self.frames = np.asarray(frames, dtype=np.uint8)
        self.num_frames = len(self.frames)
        self.name = name

    def read(self, indices: Iterable[int]) -> dict[int, np.ndarray]:
        """The requested frames from memory; out-of-range indices are missing (counted, with a warning)."""
        idx = sorted({int(i) for i in indices})
        out = {i: self.frames[i] for i in idx if 0 <= i < self.num_frames}
        self._warn_missing([i for i in idx if i not in out])
        return out


class ImageFolderFrameSource(FrameSource):
    """Frames stored as sorted image files in one folder (frame i = i-th file in name order)."""

    def __init__(self, root: str | Path, short_side: int | None = None) -> None:
        self.root = Path(root)
        self.files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"{self.root}: no frames found (expected image files {IMAGE_EXTENSIONS})")
        self.num_frames = len(self.files)
        self.short_side = short_side
        self.name = str(self.root)

    def read(self, indices: Iterable[int]) -> dict[int, np.ndarray]:
        """The requested frames read from their files and resized to ``short_side``; out-of-range or unreadable ones
        are missing (counted, with a warning)."""
        out, missing = {}, []
        for i in sorted({int(i) for i in indices}):
            if not 0 <= i < self.num_frames:  # a negative index would silently read from the end
                missing.append(i)
                continue
            try:
                img = Image.open(self.files[i]).convert("RGB")
                img = img.resize(output_size(*img.size, self.short_side), Image.BILINEAR)
                out[i] = np.asarray(img)
            except OSError:
                missing.append(i)
        self._warn_missing(missing)
        return out


_PTS_CACHE: dict[tuple[str, int, int], np.ndarray] = {}


def frame_timestamps(path: str | Path, header_frames: int = 0, fps: Fraction | None = None) -> np.ndarray:
    """(N,) int64 pts of the video frames of ``path`` in presentation order, from its demuxed packets.

    Frame i of a video is the i-th distinct presentation time, so variable-frame-rate files index correctly. The
    scan reads packets without decoding, once per file and process (forked loader workers inherit the table). When
    the header promises more frames than the file holds (a truncated download), the missing tail gets timestamps
    extrapolated at the median frame spacing (``fps`` for a single frame), so that those frames exist and are
    reported missing when read.
    """
    import av

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _PTS_CACHE:
        return _PTS_CACHE[key]
    pts = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            tb = Fraction(stream.time_base)
            for packet in container.demux(stream):
                if packet.size > 0 and packet.pts is not None and not getattr(packet, "is_discard", False):
                    pts.append(packet.pts)
    except av.error.FFmpegError as e:  # a damaged tail: keep the packets read so far
        logger.warning("%s: packet scan stopped early (%s)", path, e)
    table = _fill_constant_rate_gaps(np.unique(np.asarray(pts, dtype=np.int64)))
    if header_frames > len(table) and len(table) and fps:
        step = np.median(np.diff(table)) if len(table) > 1 else 1 / (fps * tb)
        extra = table[-1] + np.round(step * np.arange(1, header_frames - len(table) + 1)).astype(np.int64)
        table = np.concatenate([table, extra])
    _PTS_CACHE[key] = table
    return table


def _fill_constant_rate_gaps(table: np.ndarray) -> np.ndarray:
    """A constant-rate table (every spacing a whole multiple of the median) with a few gaps (at most 1 % of the frames,
    or 2) has them filled: a frame whose packet was lost (truncated or damaged file) keeps its slot, so later frames
    are not renumbered. Other tables (no gap, or variable frame rate) are returned as given."""
    if len(table) < 3:
        return table
    step = float(np.median(np.diff(table)))
    ratios = np.diff(table) / step
    gaps = int((ratios > 1.5).sum())
    if step <= 0 or not np.allclose(ratios, np.round(ratios), atol=0.02) or not 0 < gaps <= max(2, len(table) // 100):
        return table
    count = int(round((table[-1] - table[0]) / step)) + 1
    return table[0] + np.round(step * np.arange(count)).astype(np.int64)


class PyAVFrameSource(FrameSource):
    """A video file decoded with PyAV, converted to RGB at ``short_side`` (not the native 4K).

    Frame i is the i-th frame in presentation order (:func:`frame_timestamps`), for constant or variable frame rate.
    Requests within ``seek_gap`` frames of the decoding position are reached by decoding forward; larger jumps
    seek to the preceding keyframe. Frames whose packets fail to decode, or that a truncated file lacks, are
    skipped and counted (``skipped_frames``) with a warning.
    """

    def __init__(self, path: str | Path, short_side: int | None = 256, seek_gap: int = 240, threads: bool = True):
        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"video file {self.path} not found")
        self.short_side = short_side
        self.seek_gap = seek_gap
        self.threads = threads
        self._container = None
        self._open()
        s = self._stream
        self.fps = Fraction(s.average_rate or s.guessed_rate or 30)
        self._pts = frame_timestamps(self.path, s.frames or 0, self.fps)
        self.num_frames = len(self._pts)
        if self.num_frames <= 0:
            raise ValueError(f"video {self.path} has no decodable video frames")
        self.size = output_size(s.codec_context.width, s.codec_context.height, short_side)

    def _open(self) -> None:
        import av

        try:
            self._container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as e:
            raise ValueError(f"cannot open video {self.path}: {e}") from e
        if not self._container.streams.video:
            raise ValueError(f"{self.path} has no video stream")
        self._stream = self._container.streams.video[0]
        if self.threads:
            self._stream.thread_type = "AUTO"
        self._start = self._stream.start_time or 0
        self._gen = None
        self._next = 0
        self._seek_target = -1

    def _index(self, pts: int) -> int:
        """Presentation-order index of a decoded frame's pts (-1 when the file's packets never announced it)."""
        i = int(np.searchsorted(self._pts, pts))
        return i if i < len(self._pts) and self._pts[i] == pts else -1

    def _frames(self):
        import av

        for packet in self._container.demux(self._stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                self.skipped_frames += 1
                logger.warning("%s: undecodable packet skipped (%d so far)", self.name, self.skipped_frames)
                continue
            for frame in frames:
                idx = -1 if frame.pts is None else self._index(frame.pts)
                if idx >= 0:
                    yield idx, frame

    def _seek(self, target: int) -> None:
        pts = int(self._pts[min(max(target, 0), self.num_frames - 1)])
        self._container.seek(max(pts, self._start), stream=self._stream, backward=True, any_frame=False)
        self._gen = self._frames()
        self._seek_target = target
        self._next = -1

    def _convert(self, frame) -> np.ndarray:
        w, h = self.size
        return frame.to_ndarray(width=w, height=h, format="rgb24")

    def read(self, indices: Iterable[int]) -> dict[int, np.ndarray]:
        """Decode the requested frames (sorted) forward in one pass, seeking only across gaps over ``seek_gap``;
        returns {index: (h, w, 3) uint8} at ``self.size``, undecodable frames skipped."""
        if self._container is None:
            self._open()
        wanted = sorted({int(i) for i in indices})
        out: dict[int, np.ndarray] = {}
        missing: list[int] = []
        j = 0
        while j < len(wanted):
            target = wanted[j]
            if self._gen is None or target < self._next or target - self._next > self.seek_gap:
                self._seek(target)
            for idx, frame in self._gen:
                self._next = idx + 1
                while j < len(wanted) and wanted[j] < idx:
                    if idx >= self._seek_target:
                        missing.append(wanted[j])
                    j += 1
                if j < len(wanted) and wanted[j] == idx:
                    out[idx] = self._convert(frame)
                    j += 1
                if j >= len(wanted) or (idx >= self._seek_target and wanted[j] - self._next > self.seek_gap):
                    break
            else:
                self._gen = None
                missing += wanted[j:]
                break
        self._warn_missing([i for i in missing if i not in out])
        return out

    def close(self) -> None:
        """Close the container; the next ``read`` reopens the file."""
        if self._container is not None:
            self._container.close()
        self._container = None
        self._gen = None


class JpegCacheFrameSource(FrameSource):
    """Frames pre-extracted by :func:`build_frame_cache`: one file of concatenated JPEGs plus an offsets index."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a frame cache (missing meta.json); build it with build_frame_cache"
            )
        self.meta = json.loads(meta_path.read_text())
        self.offsets = np.load(self.root / "offsets.npy")
        self.num_frames = len(self.offsets) - 1
        self.name = str(self.root)
        self._file = None

    def read(self, indices: Iterable[int]) -> dict[int, np.ndarray]:
        """The requested frames decoded from the JPEG cache (opened on first use); empty or corrupt ones are skipped."""
        if self._file is None:
            self._file = open(self.root / "frames.bin", "rb")
        out, missing = {}, []
        for i in sorted({int(i) for i in indices}):
            if not 0 <= i < self.num_frames or self.offsets[i + 1] == self.offsets[i]:
                missing.append(i)
                continue
            self._file.seek(int(self.offsets[i]))
            data = self._file.read(int(self.offsets[i + 1] - self.offsets[i]))
            try:
                out[i] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            except OSError:
                missing.append(i)
        self._warn_missing(missing)
        return out

    def close(self) -> None:
        """Close ``frames.bin``; the next ``read`` reopens it."""
        if self._file is not None:
            self._file.close()
        self._file = None


def build_frame_cache(
    video: str | Path, cache_dir: str | Path, short_side: int | None = 256, quality: int = 90
) -> Path:
    """Decode a video once, in order, into a compact JPEG frame cache at ``short_side``; returns the cache folder.

    Written to a temporary folder and renamed when complete, so an interrupted build leaves nothing half-made.
    Frames that fail to decode are stored empty and reported missing when read. A cache of another video, or of this
    video before it was rewritten with another size in bytes, is an error.
    """
    cache_dir, source = Path(cache_dir), str(Path(video).resolve())
    if (cache_dir / "meta.json").is_file():
        meta = json.loads((cache_dir / "meta.json").read_text())
        if str(Path(meta["source"]).resolve()) != source:
            raise ValueError(
                f"data.cache_dir: {cache_dir} is the frame cache of {meta['source']}, not of {video} (two videos of one"
                " name?): rename one, or use another data.cache_dir"
            )
        size = Path(video).stat().st_size if Path(video).is_file() else None  # the cache may outlive its video
        if None not in (size, meta.get("source_bytes")) and meta["source_bytes"] != size:  # older caches: no size
            raise ValueError(
                f"data.cache_dir: {cache_dir} was built from {video} when it had {meta['source_bytes']} bytes; it now"
                f" has {size} (rewritten since?): delete {cache_dir} to rebuild it"
            )
        return cache_dir
    src = PyAVFrameSource(video, short_side=short_side)
    tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    offsets = np.zeros(src.num_frames + 1, dtype=np.int64)
    pos, last = 0, -1
    with open(tmp / "frames.bin", "wb") as f:
        src._seek(0)
        for idx, frame in src._gen:
            if not last < idx < src.num_frames:
                continue
            buf = io.BytesIO()
            Image.fromarray(src._convert(frame)).save(buf, format="JPEG", quality=quality)
            offsets[last + 1 : idx + 1] = pos  # frames never decoded between last and idx stay empty
            f.write(buf.getvalue())
            pos += buf.tell()
            offsets[idx + 1] = pos
            last = idx
    offsets[last + 1 :] = pos
    np.save(tmp / "offsets.npy", offsets)
    meta = {"source": source, "source_bytes": Path(video).stat().st_size, "num_frames": src.num_frames}
    meta |= {"short_side": short_side, "size": list(src.size)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    src.close()
    if cache_dir.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, cache_dir)
    return cache_dir


def open_source(path: str | Path, short_side: int | None = 256, seek_gap: int = 240) -> FrameSource:
    """A frame source for a video file, a frame-cache folder or a folder of frame images."""
    path = Path(path)
    if path.is_dir():
        if (path / "meta.json").is_file():
            return JpegCacheFrameSource(path)
        return ImageFolderFrameSource(path, short_side)
    if not path.exists():
        raise FileNotFoundError(f"video {path} not found (expected a video file, frame-cache folder or frame folder)")
    return PyAVFrameSource(path, short_side=short_side, seek_gap=seek_gap)
