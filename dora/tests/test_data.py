import numpy as np
import pytest
import torch

from dora.augment import ClipAugmentation, photometric
from dora.data import ClipBatchSampler, VideoClipDataset, clip_frame_indices, collate_views
from dora.video import ArrayFrameSource


def test_clip_frame_indices_hand_case():
    np.testing.assert_array_equal(clip_frame_indices(10, 2, 3), [[0, 3], [1, 4], [2, 5], [3, 6]])
    idx = clip_frame_indices(1000, 8, 60)
    assert idx.shape == (1000 - 480, 8)
    np.testing.assert_array_equal(idx[-1], 519 + 60 * np.arange(8))
    with pytest.raises(ValueError, match="too short"):
        clip_frame_indices(480, 8, 60)


def fake_source(n=50):
    frames = np.zeros((n, 8, 8, 3), np.uint8)
    frames[..., 0] = np.arange(n)[:, None, None]
    return ArrayFrameSource(frames)


def test_dataset_through_fake_reader():
    ds = VideoClipDataset([fake_source(50), fake_source(30)], num_frames=3, step=5)
    assert len(ds) == 35 + 15
    expected = np.concatenate([clip_frame_indices(50, 3, 5), clip_frame_indices(30, 3, 5)])
    for clip_id in (0, 17, 34, 35, 49):
        clip = ds[clip_id]
        np.testing.assert_array_equal(clip[:, 0, 0, 0].numpy(), expected[clip_id])


def test_a_batch_without_any_decodable_frame_is_an_error_naming_the_video(tmp_path):
    """A frame folder of corrupt images was a RuntimeError traceback that named no file."""
    for i in range(12):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"not a jpeg" * 20)
    ds = VideoClipDataset([str(tmp_path)], num_frames=2, step=3)
    with pytest.raises(ValueError, match=rf"no frame of clips \[0, 1\] could be decoded from \['{tmp_path}'\]"):
        ds.__getitems__([0, 1])


def test_sampler_shards_resumes_and_groups():
    a = ClipBatchSampler(100, 4, seed=3, rank=0, world_size=2)
    b = ClipBatchSampler(100, 4, seed=3, rank=1, world_size=2)
    assert len(a) == 12
    ids = [c for batch in list(a) + list(b) for c, _ in batch]
    assert len(ids) == len(set(ids)) == 96  # disjoint, incomplete global batch dropped
    full = list(a)
    a.set_epoch(0, start_batch=5)
    assert list(a) == full[5:]  # resuming mid-epoch continues the same batches, same augmentation seeds
    a.set_epoch(1)
    assert list(a) != full
    w = ClipBatchSampler(64, 8, seed=0, window=8)
    for batch in w:
        ids = sorted(c for c, _ in batch)
        assert ids == list(range(ids[0], ids[0] + 8))  # one window of neighbouring clips per batch


def test_augmentation_shapes_and_determinism():
    aug = ClipAugmentation(precrop_size=48, global_size=32, local_size=16, num_local_crops=3)
    clip = np.random.default_rng(0).integers(0, 256, (4, 40, 60, 3), dtype=np.uint8)
    g1, l1 = aug(clip, torch.Generator().manual_seed(5))
    g2, l2 = aug(clip, torch.Generator().manual_seed(5))
    assert g1.shape == (4, 3, 32, 32) and len(l1) == 3 and l1[0].shape == (4, 3, 16, 16)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(l1[2], l2[2])
    glob, locals_ = collate_views([(g1, l1), (g2, l2)])
    assert glob.shape == (2, 4, 3, 32, 32) and locals_[0].shape == (2, 4, 3, 16, 16)


def test_global_crop_is_shared_over_frames():
    # a static clip: without photometric changes every frame of the global view must be identical
    aug = ClipAugmentation(precrop_size=48, global_size=32, local_size=16, num_local_crops=2, global_blur_p=0.0)
    frame = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    clip = np.stack([frame] * 3)
    import dora.augment as A

    orig = A.photometric
    A.photometric = lambda f, g, *p: f
    try:
        glob, locals_ = aug(clip, torch.Generator().manual_seed(0))
    finally:
        A.photometric = orig
    torch.testing.assert_close(glob[0], glob[1])
    torch.testing.assert_close(glob[0], glob[2])
    assert not torch.allclose(locals_[0][0], locals_[0][1])  # local crops are drawn per frame


def test_dino_views_two_globals_from_the_whole_frame(monkeypatch):
    """method: dino views: two global views, each with its own crop and flip shared over the frames; no pre-crop."""
    import dora.augment as A

    monkeypatch.setattr(A, "photometric", lambda f, g, *p: f)
    frame = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    aug = ClipAugmentation(
        precrop_size=None, global_size=32, local_size=16, num_local_crops=2, num_global_crops=2, local_flip_p=0.5
    )
    glob, locals_ = aug(np.stack([frame] * 2), torch.Generator().manual_seed(0))
    assert glob.shape == (2, 2, 3, 32, 32) and len(locals_) == 2 and locals_[0].shape == (2, 3, 16, 16)
    torch.testing.assert_close(glob[0, 0], glob[0, 1])
    torch.testing.assert_close(glob[1, 0], glob[1, 1])
    assert not torch.allclose(glob[0], glob[1])
    # without a pre-crop every box is drawn on the whole decoded frame (40 x 60), not on a square pre-crop
    sizes = []
    real = A.rrc_params
    monkeypatch.setattr(A, "rrc_params", lambda h, w, scale, g: sizes.append((h, w)) or real(h, w, scale, g))
    aug(frame[None], torch.Generator().manual_seed(1))
    assert sizes == [(40, 60)] * 4  # 2 global boxes and 2 local boxes for the one frame
    cropped = ClipAugmentation(precrop_size=48, global_size=32, local_size=16, num_local_crops=2, num_global_crops=2)
    sizes.clear()
    cropped(frame[None], torch.Generator().manual_seed(1))
    assert sizes == [(40, 60)] + [(48, 48)] * 4
    # local_flip_p = 1 mirrors every local crop (the box is fixed here, so only the flip differs)
    monkeypatch.setattr(A, "rrc_params", lambda h, w, scale, g: (3, 5, 20, 30))
    kw = dict(precrop_size=None, global_size=32, local_size=16, num_local_crops=2, num_global_crops=2)
    _, plain = ClipAugmentation(**kw)(frame[None], torch.Generator().manual_seed(2))
    _, flipped = ClipAugmentation(**kw, local_flip_p=1.0)(frame[None], torch.Generator().manual_seed(2))
    torch.testing.assert_close(flipped[1], plain[1].flip(-1))
    with pytest.raises(ValueError, match="global_blur_p"):
        ClipAugmentation(num_global_crops=2, global_blur_p=[1.0, 0.1, 0.0])


def test_solarisation_comes_last():
    frame = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = photometric(frame, torch.Generator().manual_seed(4), 1.0)  # with blur: solarisation comes after it
    solar = photometric(frame, torch.Generator().manual_seed(4), 1.0, solarize_p=1.0)
    torch.testing.assert_close(solar, torch.where(plain >= 128 / 255, 1 - plain, plain))  # PIL's threshold 128


def test_sharded_batches_are_slices_of_the_global_batch_with_its_seeds():
    """Process r's batch is the r-th slice of the one-process batch of the global size, augmentation seeds included;
    a new epoch draws new seeds; windows at the end of the clip range stay inside it."""
    whole = list(ClipBatchSampler(50, 8, seed=4))
    shards = [list(ClipBatchSampler(50, 4, seed=4, rank=r, world_size=2)) for r in range(2)]
    assert len(whole) == len(shards[0]) == 6
    for b, batch in enumerate(whole):
        assert shards[0][b] + shards[1][b] == batch
    seeds = {s for batch in whole for _, s in batch}
    assert len(seeds) == 48
    later = ClipBatchSampler(50, 8, seed=4)
    later.set_epoch(1)
    assert not seeds & {s for batch in later for _, s in batch}
    tail = ClipBatchSampler(10, 2, seed=0, window=4)
    assert sorted(tail.order().tolist()) == list(range(10))
    assert all(0 <= c < 10 for batch in tail for c, _ in batch)


def test_global_view_flips_horizontally_and_jitters_each_frame():
    """A grey ramp from left to right (no blur, whole-frame crop): each global view is either the ramp or its mirror
    image, the same for all its frames; colour jitter is drawn per frame, so identical frames come out different."""
    ramp = np.broadcast_to(np.linspace(80, 150, 24).astype(np.uint8)[None, :, None], (24, 24, 3))
    clip = np.stack([ramp] * 3)
    aug = ClipAugmentation(precrop_size=None, global_size=24, global_scale=(1.0, 1.0), num_local_crops=0,
                           global_blur_p=0.0)  # fmt: skip
    flipped, jittered = [], []
    for seed in range(12):
        glob, _ = aug(clip, torch.Generator().manual_seed(seed))
        right_minus_left = glob[:, 0, :, -1].mean(-1) - glob[:, 0, :, 0].mean(-1)  # (T,)
        assert bool((right_minus_left > 0).all()) or bool((right_minus_left < 0).all())
        flipped.append(bool(right_minus_left[0] < 0))
        jittered.append(not torch.allclose(glob[0], glob[1]))
    assert any(flipped) and not all(flipped)
    assert sum(jittered) >= 8


@pytest.mark.parametrize("height, width", [(20, 100), (100, 20)])
def test_crop_boxes_stay_inside_non_square_frames(height, width):
    from dora.augment import rrc_params

    for seed in range(40):
        top, left, h, w = rrc_params(height, width, (0.2, 1.0), torch.Generator().manual_seed(seed))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
