from pin.checkpoint import find_checkpoint, resolve_checkpoint


def test_latest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    """Past the zero padding, sorting names put step_1000000 before step_999999; temp and stray folders are no steps."""
    for name in ("step_999999", "step_1000000", ".tmp_step_1000001", "step_notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert find_checkpoint(tmp_path, "latest").name == "step_1000000"
    assert resolve_checkpoint(tmp_path).name == "step_1000000"
