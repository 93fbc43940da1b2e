"""Device placement of the evaluation helpers, checked without a GPU: tensors on the "meta" device behave like CUDA
tensors for device mismatches (a CPU tensor of more than 0 dims combined with them raises)."""

import torch

from dora.davis import label_propagation, labels_to_mask, neighbourhood_mask, propagate
from dora.visualise import clip_masks

META = torch.device("meta")


class _AcceleratorTensor(torch.Tensor):
    """Stands in for a CUDA tensor: ``.numpy()`` refuses, as it does on CUDA, until ``.cpu()`` is called."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def test_neighbourhood_mask_on_the_requested_device():
    for size in (0, 1):
        assert neighbourhood_mask(3, 4, size, META).device == META
        assert torch.equal(neighbourhood_mask(3, 4, size, "cpu"), neighbourhood_mask(3, 4, size))


def test_propagation_stays_on_the_features_device():
    grid, p, d, c = (4, 4), 16, 8, 3
    for neighbourhood in (0, 1):
        target, sources = torch.randn(p, d, device=META), torch.randn(2, p, d, device=META)
        out = propagate(target, sources, torch.rand(2, p, c, device=META), grid, 5, neighbourhood)
        assert out.device == META and out.shape == (p, c)
    labels = label_propagation([torch.randn(p, d, device=META)] * 3, torch.rand(p, c, device=META), grid, 2, 5, 1)
    assert [lab.device for lab in labels] == [META] * 3


def test_labels_to_mask_copies_accelerator_labels_to_the_cpu():
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).as_subclass(_AcceleratorTensor)
    assert labels_to_mask(labels, (2, 2), 1, (2, 2)).tolist() == [[0, 1], [0, 1]]


def test_clip_masks_stay_on_the_model_device(tiny_vit):
    clip = torch.rand(2, 3, 32, 32, device=META)
    masks = clip_masks(tiny_vit.to(META), clip, [0, 1])
    assert masks.device == META and masks.shape == (2, 2, 32, 32)
