"""Clips of T frames ``step`` apart from one or many long videos (spec section b "Frame sampling").

Every frame index starts a clip, as in the reference. Batches are drawn by :class:`ClipBatchSampler`
(deterministic in seed and epoch, sharded over processes, resumable mid-epoch) and fetched by
:class:`VideoClipDataset.__getitems__`, which sends the frame requests of the whole batch to each video's
frame source at once; the sources stay open per worker process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from dora.video import FrameSource, open_source

logger = logging.getLogger(__name__)


def clip_frame_indices(total_frames: int, num_frames: int = 8, step: int = 60) -> np.ndarray:
    """(num_clips, num_frames) int64: clip s holds frames s, s+step, ..., s+(num_frames-1)*step for
    s = 0 .. total_frames - num_frames*step - 1 (the reference's clip count)."""
    num_clips = total_frames - num_frames * step
    if num_clips <= 0:
        raise ValueError(
            f"a video of {total_frames} frames is too short for clips of {num_frames} frames {step} apart "
            f"(needs more than {num_frames * step} frames)"
        )
    return np.arange(num_clips, dtype=np.int64)[:, None] + step * np.arange(num_frames, dtype=np.int64)[None, :]


class ClipBatchSampler(Sampler):
    """Per-process batches of (clip id, augmentation seed) pairs.

    Each epoch shuffles windows of ``window`` consecutive clip ids (window 1 = the reference's uniform shuffle;
    larger windows put neighbouring clips in one batch so the decoder reads them in one pass), drops the
    incomplete last global batch, and gives process r the r-th slice of every global batch. ``set_epoch`` and
    ``start_batch`` make the order reproducible and resumable.
    """

    def __init__(
        self,
        num_clips: int,
        batch_size: int,
        seed: int = 0,
        window: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_clips = num_clips
        self.batch_size = batch_size
        self.seed = seed
        self.window = max(1, int(window))
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        if len(self) == 0:
            raise ValueError(
                f"{num_clips} clips are fewer than one global batch ({batch_size} x {world_size} processes)"
            )

    def __len__(self) -> int:
        return self.num_clips // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's shuffle and start at global batch ``start_batch`` (to resume mid-epoch)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def order(self) -> np.ndarray:
        """The epoch's global clip order (before sharding)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        starts = np.arange(0, self.num_clips, self.window)
        rng.shuffle(starts)
        return np.concatenate([np.arange(s, min(s + self.window, self.num_clips)) for s in starts])

    def __iter__(self):
        order = self.order()
        gb = self.batch_size * self.world_size
        for b in range(self.start_batch, len(self)):
            lo = b * gb + self.rank * self.batch_size
            ids = order[lo : lo + self.batch_size]
            seeds = [int(x) for x in np.random.SeedSequence([self.seed, self.epoch, b * gb]).generate_state(gb)]
            yield [(int(c), seeds[self.rank * self.batch_size + i]) for i, c in enumerate(ids)]


class VideoClipDataset(torch.utils.data.Dataset):
    """Clips from one or many videos. Item ``(clip_id, seed)`` -> ``transform(frames (T, H, W, 3) uint8, generator)``.

    ``sources`` are paths (video files, frame-cache folders, frame folders) or :class:`FrameSource` objects. Each
    source is opened once here so that a missing or unreadable file fails at start; worker processes reopen
    their own decoder on first use and keep it.
    """

    def __init__(
        self,
        sources: Sequence,
        num_frames: int = 8,
        step: int = 60,
        transform: Callable | None = None,
        short_side: int | None = 256,
        seek_gap: int | None = None,
    ) -> None:
        if not sources:
            raise ValueError("no videos given (data.videos is empty)")
        self.specs = list(sources)
        self.num_frames = num_frames
        self.step = step
        self.transform = transform
        self.short_side = short_side
        self.seek_gap = seek_gap if seek_gap is not None else 4 * step
        self._sources: dict[int, FrameSource] = {}
        self._pid = os.getpid()
        counts = []
        for i, spec in enumerate(self.specs):
            src = self._source(i)
            counts.append(src.num_frames - num_frames * step)
            if counts[-1] <= 0:
                clip_frame_indices(src.num_frames, num_frames, step)  # raises with the reason
            if not isinstance(spec, FrameSource):
                src.close()
        self.clips_per_video = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.clips_per_video)])

    def _source(self, i: int) -> FrameSource:
        if os.getpid() != self._pid:  # forked worker: never share a decoder with the parent
            self._sources, self._pid = {}, os.getpid()
        if i not in self._sources:
            spec = self.specs[i]
            self._sources[i] = (
                spec if isinstance(spec, FrameSource) else open_source(spec, self.short_side, self.seek_gap)
            )
        return self._sources[i]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, clip_id: int) -> tuple[int, np.ndarray]:
        """(video index, frame indices (T,)) of a global clip id."""
        if not 0 <= clip_id < len(self):
            raise IndexError(f"clip {clip_id} out of range [0, {len(self)})")
        v = int(np.searchsorted(self.offsets, clip_id, side="right") - 1)
        start = clip_id - int(self.offsets[v])
        return v, start + self.step * np.arange(self.num_frames)

    def read_clips(self, clip_ids: Sequence[int]) -> list[np.ndarray | None]:
        """Raw clips (T, H, W, 3) uint8; frames a source could not deliver are replaced by the nearest frame of the
        same clip, and a clip with no frame at all is None."""
        located = [self.locate(int(c)) for c in clip_ids]
        frames: dict[int, dict[int, np.ndarray]] = {}
        for v in sorted({v for v, _ in located}):
            wanted = np.concatenate([f for vv, f in located if vv == v])
            frames[v] = self._source(v).read(wanted.tolist())
        clips = []
        for v, idx in located:
            have = [i for i in idx.tolist() if i in frames[v]]
            if not have:
                clips.append(None)
                continue
            clips.append(np.stack([frames[v][min(have, key=lambda h, i=i: abs(h - i))] for i in idx.tolist()]))
        return clips

    def __getitems__(self, items: Sequence) -> list:
        items = [(it, 0) if isinstance(it, (int, np.integer)) else it for it in items]
        clips = self.read_clips([c for c, _ in items])
        good = [c for c in clips if c is not None]
        if not good:
            names = sorted({self._source(self.locate(int(c))[0]).name for c, _ in items})
            raise ValueError(f"no frame of clips {[c for c, _ in items]} could be decoded from {names}")
        out = []
        for (clip_id, seed), clip in zip(items, clips):
            if clip is None:
                logger.warning("clip %d could not be decoded at all; reusing another clip of the batch", clip_id)
                clip = good[0]
            if self.transform is None:
                out.append(torch.from_numpy(clip))
            else:
                g = torch.Generator().manual_seed(int(seed))
                out.append(self.transform(clip, g))
        return out

    def __getitem__(self, item):
        return self.__getitems__([item])[0]


def collate_views(batch: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """[(global (T,3,G,G), [local (T,3,l,l)] * L)] * B -> (global (B,T,3,G,G), [local (B,T,3,l,l)] * L); with n > 1
    global views per clip (T,3,G,G) becomes (n,T,3,G,G) and the batch (B,n,T,3,G,G)."""
    glob = torch.stack([b[0] for b in batch])
    locals_ = [torch.stack([b[1][i] for b in batch]) for i in range(len(batch[0][1]))]
    return glob, locals_
