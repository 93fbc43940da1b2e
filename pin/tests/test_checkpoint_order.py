from pin.checkpoint import find_checkpoint, resolve_checkpoint, set_aside_checkpoints


def test_latest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    """Past the zero padding, sorting names put step_1000000 before step_999999; temp and stray folders are no steps."""
    for name in ("step_999999", "step_1000000", ".tmp_step_1000001", "step_notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert find_checkpoint(tmp_path, "latest").name == "step_1000000"
    assert resolve_checkpoint(tmp_path).name == "step_1000000"


def test_set_aside_moves_the_later_steps_and_replaces_an_older_copy(tmp_path):
    """Steps past the resume's move to checkpoints/abandoned/ (an older copy there replaced), which is no step."""
    for name in ("step_0000001", "step_0000002", "step_0000010", "abandoned/step_0000002/old"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    moved = set_aside_checkpoints(tmp_path, 1)
    assert [p.name for p in moved] == ["step_0000002", "step_0000010"]
    assert not (tmp_path / "checkpoints" / "abandoned" / "step_0000002" / "old").exists()
    assert find_checkpoint(tmp_path, "latest").name == resolve_checkpoint(tmp_path).name == "step_0000001"
    assert set_aside_checkpoints(tmp_path, 1) == []
