import numpy as np
import pytest

from dora.schedules import cosine_schedule, teacher_temp_schedule


def test_cosine_hand_values():
    s = cosine_schedule(1.0, 0.0, epochs=2, niter_per_ep=2, warmup_epochs=1)
    np.testing.assert_allclose(s, [0.0, 1.0, 1.0, 0.5])
    s = cosine_schedule(0.996, 1.0, epochs=1, niter_per_ep=4)
    np.testing.assert_allclose(
        s, [0.996, 0.996 + 0.004 * (1 - np.cos(np.pi / 4)) / 2, 0.998, 1 - 0.002 * (1 + np.cos(3 * np.pi / 4))]
    )


def test_cosine_loop_and_warmup_start():
    base, final, epochs, niter, warm = 5e-4, 1e-5, 10, 7, 3
    s = cosine_schedule(base, final, epochs, niter, warm, start_warmup_value=1e-6)
    assert s.shape == (70,)
    w = warm * niter
    for i in range(70):
        if i < w:
            expected = 1e-6 + (base - 1e-6) * i / (w - 1)
        else:
            expected = final + 0.5 * (base - final) * (1 + np.cos(np.pi * (i - w) / (70 - w)))
        assert s[i] == pytest.approx(expected, rel=1e-12)


def test_teacher_temperature():
    t = teacher_temp_schedule(0.04, 0.07, 3, 5)
    np.testing.assert_allclose(t, [0.04, 0.055, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.04, 30, 100), np.full(100, 0.04))
    with pytest.raises(ValueError, match="exceeds"):
        teacher_temp_schedule(0.04, 0.07, 10, 5)
