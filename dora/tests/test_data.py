import numpy as np
import pytest
import torch

from dora.augment import ClipAugmentation
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
    A.photometric = lambda f, g, p: f
    try:
        glob, locals_ = aug(clip, torch.Generator().manual_seed(0))
    finally:
        A.photometric = orig
    torch.testing.assert_close(glob[0], glob[1])
    torch.testing.assert_close(glob[0], glob[2])
    assert not torch.allclose(locals_[0][0], locals_[0][1])  # local crops are drawn per frame
