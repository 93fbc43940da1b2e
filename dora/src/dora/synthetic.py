"""Synthetic "walking tour": textured shapes moving over a scrolling background, written with PyAV, plus a small
labelled image set of the same object classes (for the demo's k-NN check)."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

NUM_CLASSES = 4
CLASS_KINDS = ("hue", "texture")
# "hue" (the demo's): the class is the object's hue family, red / yellow-green / cyan / violet, in a dark and a light
# shade of that hue, with any of the four textures. "texture": the class is the texture (horizontal stripes, vertical
# stripes, checkerboard, dots), in two random colours (the demo's earlier experiment rounds, README "Demo").
HUES = (0.0, 0.25, 0.5, 0.75)


def _texture(cls: int, size: int, period: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) {0, 1} texture pattern of class ``cls``."""
    yy, xx = np.mgrid[:size, :size]
    phase = int(rng.integers(period))
    if cls == 0:
        return ((yy + phase) // (period // 2)) % 2
    if cls == 1:
        return ((xx + phase) // (period // 2)) % 2
    if cls == 2:
        return (((yy + phase) // (period // 2)) + ((xx + phase) // (period // 2))) % 2
    return ((yy + phase) % period - period / 2) ** 2 + ((xx + phase) % period - period / 2) ** 2 < (period / 3) ** 2


def _colours(rng: np.random.Generator, grey: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if grey:  # a dark and a light grey level, at least 96 apart
        a = int(rng.integers(0, 100))
        return np.full(3, a, np.uint8), np.full(3, a + int(rng.integers(96, 156)), np.uint8)
    a = rng.integers(0, 256, 3)
    b = (a + rng.integers(96, 160, 3)) % 256
    return a.astype(np.uint8), b.astype(np.uint8)


def _hue_colours(cls: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark and a light shade of hue family ``cls`` (hue within 0.06 of ``HUES[cls]``, saturation 0.6-1)."""
    hue, sat = (HUES[cls] + rng.uniform(-0.06, 0.06)) % 1, rng.uniform(0.6, 1.0)
    dark, light = rng.uniform(0.35, 0.55), rng.uniform(0.8, 1.0)
    return tuple(np.round(np.array(colorsys.hsv_to_rgb(hue, sat, v)) * 255).astype(np.uint8) for v in (dark, light))


def _check_kind(classes: str, grey: bool) -> None:
    if classes not in CLASS_KINDS:
        raise ValueError(f"classes must be one of {CLASS_KINDS}, got {classes!r}")
    if grey and classes != "texture":
        raise ValueError("grey=True needs classes='texture' (grey objects have no hue)")


def make_object(
    cls: int, size: int, rng: np.random.Generator, grey: bool = False, classes: str = "hue"
) -> tuple[np.ndarray, np.ndarray]:
    """An object of class ``cls``: (size, size, 3) uint8 image and a (size, size) bool disc/square silhouette.

    ``classes="hue"``: a random texture in two shades of the class's hue; ``classes="texture"``: the class's texture in
    two random colours, or two grey levels with ``grey=True``."""
    _check_kind(classes, grey)
    texture = int(rng.integers(NUM_CLASSES)) if classes == "hue" else cls
    tex = _texture(texture, size, int(rng.integers(8, 13)), rng)  # stripes 4-6 px wide: visible after 2x downscaling
    a, b = _hue_colours(cls, rng) if classes == "hue" else _colours(rng, grey)
    img = np.where(tex[..., None] > 0, a, b).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    mask = (yy**2 + xx**2 <= (size / 2) ** 2) if rng.random() < 0.5 else np.ones((size, size), bool)
    return img, mask


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random panorama (height, width, 3) to scroll over."""
    coarse = rng.integers(70, 186, (height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
    rows = np.linspace(0, coarse.shape[0] - 1, height)
    cols = np.linspace(0, coarse.shape[1] - 1, width)
    r0, c0 = rows.astype(int).clip(max=coarse.shape[0] - 2), cols.astype(int).clip(max=coarse.shape[1] - 2)
    fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bot = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    return (top * (1 - fr) + bot * fr).astype(np.uint8)


def walking_frames(
    num_frames: int,
    size: int = 64,
    num_objects: int = 3,
    seed: int = 0,
    speed: float = 1.0,
    width: int | None = None,
    classes: str = "hue",
):
    """Yield (size, width or size, 3) uint8 frames: a scrolling background with ``num_objects`` textured objects
    drifting across; objects leave and are replaced by new ones of random classes (of kind ``classes``)."""
    _check_kind(classes, False)
    rng = np.random.default_rng(seed)
    width = width or size
    pano = _background(size, width * 2 if width > 256 else width * 8, rng)
    objs = []

    def spawn(x=None):
        cls = int(rng.integers(NUM_CLASSES))
        s = int(rng.integers(size // 4, size // 2))
        img, mask = make_object(cls, s, rng, classes=classes)
        return {
            "img": img,
            "mask": mask,
            "x": float(rng.uniform(-s, width) if x is None else x),
            "y": float(rng.uniform(0, size - s)),
            "vx": float(rng.uniform(0.3, 1.2) * speed),
            "vy": float(rng.uniform(-0.3, 0.3) * speed),
        }

    objs = [spawn() for _ in range(num_objects)]
    for t in range(num_frames):
        off = int(t * speed) % (pano.shape[1] - width)
        frame = pano[:, off : off + width].copy()
        for i, o in enumerate(objs):
            s = o["img"].shape[0]
            x0, y0 = int(round(o["x"])), int(round(o["y"]))
            xs, ys = max(0, x0), max(0, y0)
            xe, ye = min(width, x0 + s), min(size, y0 + s)
            if xe > xs and ye > ys:
                m = o["mask"][ys - y0 : ye - y0, xs - x0 : xe - x0]
                frame[ys:ye, xs:xe][m] = o["img"][ys - y0 : ye - y0, xs - x0 : xe - x0][m]
            o["x"] += o["vx"]
            o["y"] = float(np.clip(o["y"] + o["vy"], 0, size - s))
            if o["x"] > width:
                objs[i] = spawn(x=-size / 2)
        yield frame


def write_video(path: str | Path, frames, fps: int = 30, codec: str = "libx264", crf: int = 18, options=None) -> Path:
    """Encode an iterable of (H, W, 3) uint8 frames with PyAV (yuv420p). libx264 runs without macroblock-tree rate
    control: with it, the same frames encoded twice in one process came out as different bitstreams."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=options or {}) as out:
        stream = None
        for frame in frames:
            if stream is None:
                stream = out.add_stream(codec, rate=fps)
                stream.width, stream.height = frame.shape[1], frame.shape[0]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "mbtree": "0"} if codec == "libx264" else {}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                out.mux(packet)
    return path


def write_walking_video(
    path: str | Path, num_frames: int = 300, size: int = 64, fps: int = 30, seed: int = 0, classes: str = "hue"
) -> Path:
    """Write :func:`walking_frames` to a video file."""
    return write_video(path, walking_frames(num_frames, size=size, seed=seed, classes=classes), fps=fps)


def labelled_objects(
    num_per_class: int = 40, size: int = 32, seed: int = 1, grey: bool = False, classes: str = "hue"
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, size, size, 3) uint8 of one object of a known class on a background patch, labels (N,).

    Rendered at twice the size, then halved: the scale at which the demo's model sees the 64 px video.
    ``classes="hue"``: objects as large as in :func:`walking_frames` (a quarter to half the side), so that the
    background fills most of the image; ``classes="texture"``: a third of the side to nearly all of it.
    ``grey=True`` (texture classes only): grey objects on a grey background, so that colour cannot tell two images
    apart (``benchmarks/selfdistill_budget.py --grey``)."""
    from PIL import Image

    _check_kind(classes, grey)
    rng = np.random.default_rng(seed)
    big = 2 * size
    images, labels = [], []
    for cls in range(NUM_CLASSES):
        for _ in range(num_per_class):
            img = _background(big, big, rng)
            if grey:
                img = img.mean(-1, keepdims=True).repeat(3, -1).astype(np.uint8)
            s = int(rng.integers(big // 4, big // 2) if classes == "hue" else rng.integers(big // 3, big - 4))
            obj, mask = make_object(cls, s, rng, grey, classes)
            y, x = (int(v) for v in rng.integers(0, big - s + 1, 2))
            img[y : y + s, x : x + s][mask] = obj[mask]
            images.append(np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)))
            labels.append(cls)
    return np.stack(images), np.asarray(labels)


CODE_BITS = 8


def coded_frame(i: int, height: int = 64, band: int = 12) -> np.ndarray:
    """A frame whose 8 vertical bands are white/black by the bits of ``i``; survives lossy coding and resizing,
    so decoded frames can be checked for order (tests, benchmarks)."""
    frame = np.zeros((height, CODE_BITS * band, 3), np.uint8)
    for b in range(CODE_BITS):
        if (i >> b) & 1:
            frame[:, b * band : (b + 1) * band] = 255
    return frame


def decode_index(frame: np.ndarray) -> int:
    """Inverse of :func:`coded_frame` at any frame size."""
    w = frame.shape[1]
    return sum(1 << b for b in range(CODE_BITS) if frame[:, int((b + 0.5) * w / CODE_BITS)].mean() > 128)
