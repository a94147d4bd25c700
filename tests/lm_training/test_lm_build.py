"""What an LM config builds: the learning-rate schedule and the atomic save_pretrained."""

from __future__ import annotations

import pytest

from locakd.lm.build import lr_factor


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 2, "cosine", 0.0) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    assert f[-1] < 0.05
    assert lr_factor(5, 10, 0, "constant", 0.0) == 1.0
    assert lr_factor(10, 10, 0, "linear", 0.1) == pytest.approx(0.1)
