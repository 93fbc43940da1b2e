import json
import sys

import pytest

from dora import demo, visualise, walking_tours


def test_visualise_writes_png_and_mp4(tmp_path):
    from dora.synthetic import write_walking_video

    video = write_walking_video(tmp_path / "walk.mp4", num_frames=30, size=48)
    info = visualise.main(
        [
            f"video={video}",
            f"out_dir={tmp_path / 'vis'}",
            "model_overrides={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 4}",
            "size=32",
            "num_frames=3",
            "step=10",
            "num_objects=2",
        ]
    )
    assert (tmp_path / "vis" / "masks.png").stat().st_size > 0 and (tmp_path / "vis" / "masks.mp4").stat().st_size > 0
    assert len(info["heads"]) == 2 and info["frames"] == [0, 10, 20]
    assert all(0 < f < 1 for f in info["mask_fraction"])
    with pytest.raises(ValueError, match="exceed"):
        visualise.main(
            [
                f"video={video}",
                f"out_dir={tmp_path / 'v2'}",
                "num_frames=8",
                "step=60",
                "model_overrides={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 4}",
            ]
        )


def test_visualise_bad_heads_is_a_clear_error(tmp_path):
    from dora.synthetic import write_walking_video

    video = write_walking_video(tmp_path / "walk.mp4", num_frames=30, size=48)
    args = [f"video={video}", f"out_dir={tmp_path / 'vis'}", "size=32", "num_frames=2", "step=10"]
    args.append("model_overrides={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 4}")
    for heads in ("[7]", "3"):
        with pytest.raises(ValueError, match=r"heads=.*expected a list of head indices in 0..3"):
            visualise.main([*args, f"heads={heads}"])


def test_visualise_bad_clip_size_and_out_dir_are_clear_errors(tmp_path):
    """start=-5 read from the end and then reported no decodable frame, num_frames=0 was an IndexError, a size off
    the patch grid timm's AssertionError, an out_dir under a file a traceback after all the work."""
    from dora.synthetic import write_walking_video

    video = write_walking_video(tmp_path / "walk.mp4", num_frames=30, size=48)
    args = [f"video={video}", f"out_dir={tmp_path / 'vis'}", "size=32", "num_frames=2", "step=10"]
    args.append("model_overrides={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 4}")
    for bad, message in (
        ("start=-5", r"^start=-5: expected an integer >= 0"),
        ("num_frames=0", r"^num_frames=0: expected an integer >= 1"),
        ("size=30", r"^size=30: expected a multiple of the model's patch size 8"),
    ):
        with pytest.raises(ValueError, match=message):
            visualise.main([*args, bad])
    (tmp_path / "file").write_text("kept")
    with pytest.raises(ValueError, match=r"^out_dir: .*file is a file; expected a folder"):
        visualise.main([*args, f"out_dir={tmp_path / 'file' / 'vis'}"])
    assert (tmp_path / "file").read_text() == "kept" and not (tmp_path / "vis").exists()


def test_demo_out_under_a_file_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("kept")
    with pytest.raises(ValueError, match=r"^--out: .*file is a file; expected a folder"):
        demo.main(["--quick", "--out", str(tmp_path / "file" / "demo")])
    assert (tmp_path / "file").read_text() == "kept"


def test_visualise_lists_only_the_frames_it_draws(tmp_path, monkeypatch):
    """A frame the source cannot decode is left out of the figure and of masks.json's frame list alike."""
    from dora.synthetic import write_walking_video

    video = write_walking_video(tmp_path / "walk.mp4", num_frames=30, size=48)
    real_open = visualise.open_source

    class DropsFrame10:
        def __init__(self, source):
            self.source, self.num_frames = source, source.num_frames

        def read(self, idx):
            return {i: f for i, f in self.source.read(idx).items() if i != 10}

    monkeypatch.setattr(visualise, "open_source", lambda *a, **k: DropsFrame10(real_open(*a, **k)))
    args = [f"video={video}", f"out_dir={tmp_path / 'vis'}", "size=32", "num_frames=3", "step=10", "num_objects=2"]
    info = visualise.main(
        args + ["model_overrides={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 4}"]
    )
    assert info["frames"] == [0, 20]
    assert json.loads((tmp_path / "vis" / "masks.json").read_text())["frames"] == [0, 20]


@pytest.mark.slow
def test_demo_quick(tmp_path):
    metrics = demo.main(["--quick", "--out", str(tmp_path), "--seed", "3"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 3 <= len(summary) <= 6
    assert (tmp_path / "masks.png").is_file() and (tmp_path / "metrics.json").is_file()
    assert metrics["train_steps"] == 3 and metrics["classes"] == "hue"
    assert (tmp_path / "frame_cache" / "walk-64p" / "meta.json").is_file()  # trained from the decoded frames
    beats = metrics["knn_top1_learned"] > max(metrics["knn_top1_random_init_per_seed"])
    assert summary["verdict"] == ("learned beats every random init" if beats else "no win: not above every random init")
    (state,) = (tmp_path / "train" / "checkpoints").glob("*/state.json")
    assert json.loads(state.read_text())["config"]["seed"] == 3
    logged = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    again = demo.main(["--quick", "--out", str(tmp_path), "--seed", "3"])  # the demo replaces its own earlier run
    assert again["train_steps"] == 3 and len(list((tmp_path / "train" / "checkpoints").glob("*/state.json"))) == 1
    assert len((tmp_path / "train" / "metrics.jsonl").read_text().splitlines()) == len(logged)  # not appended to


def test_walking_tours_listing(capsys):
    walking_tours.main([])
    out = capsys.readouterr().out
    for city in ("Venice", "Amsterdam", "Wildlife"):
        assert city in out
    assert "deface" in out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_keys_and_exits_0(flag, capsys, monkeypatch):
    from dora import eval as dora_eval
    from dora import train

    monkeypatch.setattr(sys, "argv", ["/venv/bin/dora-train", flag])  # the usage line names the command

    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # a console script, not `python -m`
    with pytest.raises(SystemExit):
        train.main([flag])
    assert capsys.readouterr().out.startswith("usage: dora-train [--config NAME|PATH]")

    for main in (train.main, dora_eval.main, visualise.main):
        with pytest.raises(SystemExit) as exc:
            main([flag])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "default config: wt_venice.yaml" in out and "shipped configs:" in out


def test_help_lists_the_keys_of_the_config_given(capsys):
    from dora import train

    with pytest.raises(SystemExit) as exc:
        train.main(["--config", "tiny", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "default config: tiny" in out and "name = 'tiny'" in out and "out_dim = 64" in out


def test_command_line_and_config_file_slips_are_errors_as_in_the_other_packages(tmp_path):
    from dora.config import load_config

    with pytest.raises(ValueError, match=r"^optim\.epochs=True: expected a number$"):
        load_config(["optim.epochs=true"])  # a flag is an int to Python: one epoch
    with pytest.raises(ValueError, match=r"^optim\.lr=\[0\.1\]: expected a number$"):
        load_config(["optim.lr=[0.1]"])
    with pytest.raises(ValueError, match=r"^option --run_dir needs a value$"):
        load_config(["--run_dir", "--seed=3"])  # run_dir was the text '--seed=3'
    with pytest.raises(FileNotFoundError, match=r"^config '' not found"):
        load_config(["--config="])  # an empty $CFG ran the paper recipe
    mine = tmp_path / "mine.yaml"  # a user's file is checked as the overrides are (it reached training unchecked)
    for text, error in [
        ("optim: {lr: abc}\n", r"^optim\.lr='abc': expected a number$"),
        ("optim: 3\n", r"^optim=3: optim is a section"),
        ("model: {norm_last_layer: flase}\n", r"^model\.norm_last_layer='flase': expected true"),
    ]:
        mine.write_text(text)
        with pytest.raises(ValueError, match=error):
            load_config(["--config", str(mine)])
    # one blur / solarisation probability per global view stays accepted, from a file or an override
    mine.write_text("method: dino\naugment: {num_global_crops: 2, global_blur_p: [1.0, 0.1]}\n")
    cfg = load_config(["--config", str(mine), "augment.global_solarize_p=[0.0, 0.2]"])
    assert cfg["augment"]["global_blur_p"] == [1.0, 0.1] and cfg["augment"]["global_solarize_p"] == [0.0, 0.2]


def test_a_text_key_keeps_the_text_typed_and_a_file_must_quote_yes_or_no(tmp_path):
    from dora.config import load_config

    # YAML 1.1 reads yes/no/on/off as booleans (a run folder named True) and 1e3 as 1000.0: a text key keeps the text
    assert [load_config([f"name={w}"])["name"] for w in ("yes", "off", "1e3")] == ["yes", "off", "1e3"]
    cfg = load_config(["optim.mixed_precision=no", "run_dir=/tmp/x"])
    assert cfg["optim"]["mixed_precision"] == "no"
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: yes\n")
    with pytest.raises(ValueError, match=r'^name: yes/on/true reads as true, but name holds text .*: name: "yes"$'):
        load_config(["--config", str(mine)])
    mine.write_text("optim: {mixed_precision: no}\n")
    assert load_config(["--config", str(mine)])["optim"]["mixed_precision"] == "no"


def test_null_or_an_empty_value_is_refused_for_a_number_or_text_key_unless_it_means_something(tmp_path):
    from dora.config import _flat_keys, get_key, load_config

    with pytest.raises(ValueError, match=r"^optim\.lr=null: expected a number, not null or an empty value \(default"):
        load_config(["optim.lr="])  # an empty $LR: a traceback in the schedule
    with pytest.raises(ValueError, match=r"^optim\.mixed_precision=null: expected text, not null .* \(default 'no'\)$"):
        load_config(["optim.mixed_precision=null"])  # silently "no" before
    (tmp_path / "mine.yaml").write_text("data:\n  batch_size_per_gpu:\n")
    with pytest.raises(ValueError, match=r"^data\.batch_size_per_gpu=null: expected a number"):
        load_config(["--config", str(tmp_path / "mine.yaml")])
    cfg = load_config(["resume=", "keep_checkpoints=", "keep_every_epochs=~", "optim.clip_grad="])
    assert cfg["resume"] is None and cfg["keep_checkpoints"] is None and cfg["keep_every_epochs"] is None
    # a null of a shipped config means something there: the other configs of its command take it too
    cfgs = {name: load_config(["--config", name]) for name in ("wt_venice", "dino_wt_venice", "tiny")}
    nulls = {k for cfg in cfgs.values() for k in _flat_keys(cfg) if get_key(cfg, k) is None}
    assert {"augment.precrop_size", "optim.steps_per_epoch"} <= nulls
    for name, cfg in cfgs.items():
        for key in sorted(k for k in nulls if isinstance(get_key(cfg, k), int | float | str)):
            assert get_key(load_config(["--config", name, f"{key}="]), key) is None


def test_false_is_no_for_mixed_precision_and_null_decoding_keys_mean_full_size_and_the_default_gap():
    from dora.config import load_config

    for word in ("no", "off", "false", "No"):  # mixed_precision=off meant "no" before text keys kept the text typed
        assert load_config([f"optim.mixed_precision={word}"])["optim"]["mixed_precision"] == "no"
    cfg = load_config(["data.decode_short_side=null", "data.seek_gap="])
    assert cfg["data"]["decode_short_side"] is None and cfg["data"]["seek_gap"] is None


def test_a_text_key_left_null_keeps_the_text_typed_and_false_or_null_leave_it_unset(tmp_path):
    from dora.config import load_config

    # run_dir is null in every training config: YAML reads 2024 as a number, off as false and on as true
    assert load_config(["run_dir=2024", "resume=latest"])["run_dir"] == "2024"
    for word in ("off", "no", "", "null"):  # the default run folder, as an empty value
        assert load_config([f"run_dir={word}"])["run_dir"] is None
    with pytest.raises(ValueError, match=r"^run_dir=True: expected text \(a path or name\), or null$"):
        load_config(["run_dir=on"])
    mine = tmp_path / "mine.yaml"
    mine.write_text("run_dir: 2024\nresume: no\n")
    cfg = load_config(["--config", str(mine)])
    assert cfg["run_dir"] == "2024" and cfg["resume"] is None
