import json

import pytest
import torch

from dora import train

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_training_on_cuda(tmp_path):
    from dora.synthetic import write_walking_video

    video = write_walking_video(tmp_path / "walk.mp4", num_frames=40, size=48)
    run = tmp_path / "run"
    summary = train.main(
        [
            "--config",
            "tiny",
            f"run_dir={run}",
            f"data.videos=[{video}]",
            "cpu=false",
            "optim.mixed_precision=bf16",
            "optim.epochs=1",
        ]
    )
    assert summary["steps"] == 2
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tracking_on_cuda_matches_cpu():
    from dora.tracking import track_and_mask

    torch.manual_seed(0)
    T, B, H, N, DH = 2, 2, 4, 16, 8
    args = (
        torch.rand(T, B, H, N + 1, N + 1).softmax(-1),
        torch.randn(T, B, H, N + 1, DH),
        torch.randn(T, B, H, N + 1, DH),
        torch.randn(T, B, N, H * DH),
        torch.randn(B, T, 3, 16, 16),
    )
    cpu = track_and_mask(*args, 4, [0, 2])
    gpu = track_and_mask(*(a.cuda() for a in args), 4, [0, 2])
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
