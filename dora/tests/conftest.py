import pytest
import torch


@pytest.fixture(scope="session")
def coded_video(tmp_path_factory):
    """A 100-frame, 25 fps H.264 mp4 (moov atom first) whose frame i encodes i; keyframe every 10 frames."""
    import av

    from dora.synthetic import CODE_BITS, coded_frame

    path = tmp_path_factory.mktemp("video") / "coded.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = CODE_BITS * 12, 64, "yuv420p"
        stream.gop_size = 10
        stream.options = {"crf": "10"}
        for i in range(100):
            for p in stream.encode(av.VideoFrame.from_ndarray(coded_frame(i), format="rgb24")):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return path


@pytest.fixture
def tiny_vit():
    from dora.models import build_backbone

    torch.manual_seed(0)
    return build_backbone("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4).eval()
