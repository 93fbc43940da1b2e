import torch

from fungi.views import dino_views, noise_roll_views, patchify_geometry, patchify_views, resize, word_deletion


def test_patchify_geometry_and_content():
    assert patchify_geometry(224) == (112, 18, 7)
    assert patchify_geometry(32) == (16, 2, 9)
    image = torch.randn(1, 3, 224, 224)
    views = patchify_views(image)
    assert views.shape == (1, 49, 3, 224, 224)
    for index, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (6, 6)]):
        k = row * 7 + col  # row-major, height outer
        crop = image[:, :, 18 * row : 18 * row + 112, 18 * col : 18 * col + 112]
        assert torch.allclose(views[0, k], resize(crop, (224, 224))[0], atol=1e-5), index


def test_dino_views_depend_only_on_image_and_seed():
    images = torch.randn(3, 3, 32, 32)
    views = dino_views(images, seed=0, num_local=4)
    assert views.shape == (3, 6, 3, 32, 32)
    assert torch.equal(views[1:2], dino_views(images[1:2], seed=0, num_local=4))
    assert not torch.equal(views, dino_views(images, seed=1, num_local=4))
    assert not torch.equal(views[0, 0], views[0, 1])


def test_text_and_audio_views():
    text = "i lost my card yesterday can you block it"
    views = word_deletion(text, 12, 0.1, seed=0)
    assert views == word_deletion(text, 12, 0.1, seed=0) and len(views) == 12
    assert all(set(v.split()) <= set(text.split()) for v in views)
    assert word_deletion("a b c", 3, 1.0, seed=0) == ["a", "a", "a"]  # never empty
    spec = torch.zeros(2, 20, 4)
    audio = noise_roll_views(spec, 5, seed=0, max_noise=0.1)
    assert audio.shape == (2, 5, 20, 4) and 0 <= audio.min() and audio.max() < 0.1
