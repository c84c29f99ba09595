"""LR schedules: exact values at landmarks."""

from __future__ import annotations

import math

import pytest
import torch

from vlmtune.train.schedule import lr_multiplier, set_lr, warmup_steps


def test_warmup_steps_resolution_and_clipping() -> None:
    assert warmup_steps(10, 100) == 10
    assert warmup_steps(0.1, 100) == 10
    assert warmup_steps(50, 4) == 4  # clipped: short runs always validate
    assert warmup_steps(0.0, 4) == 0
    with pytest.raises(ValueError):
        warmup_steps(1.5, 10)


def test_cosine_linear_constant_wsd_values() -> None:
    kw = dict(max_steps=10, warmup=2, min_lr_ratio=0.1)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(1, schedule="cosine", **kw) == pytest.approx(1.0)
    # the decay span (8 steps) takes the points k/9, k = 1..8, of the curve: step 2 is 1/9 of the way, step 9 is 8/9
    def cos_at(progress: float) -> float:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    assert [lr_multiplier(s, schedule="cosine", **kw) for s in range(2, 10)] == pytest.approx(
        [cos_at(k / 9) for k in range(1, 9)])
    assert lr_multiplier(9, schedule="linear", **kw) == pytest.approx(1 - 0.9 * 8 / 9)
    assert lr_multiplier(5, schedule="linear", **kw) == pytest.approx(1 - 0.9 * 4 / 9)
    assert lr_multiplier(7, schedule="constant", **kw) == 1.0
    wsd = [lr_multiplier(s, schedule="wsd", decay_fraction=0.2, **kw) for s in range(10)]
    assert wsd[2:8] == [1.0] * 6 and wsd[8] == pytest.approx(1 - 0.9 / 3) and wsd[9] == pytest.approx(1 - 0.9 * 2 / 3)


def test_every_step_learns_with_a_zero_floor() -> None:
    """min_lr_ratio 0: no step gets lr 0 (the last one, or the only one of a 1-step run, would train nothing)."""
    for schedule in ("cosine", "linear", "wsd"):
        for max_steps, warmup in ((1, 0), (2, 0), (10, 0), (10, 3), (300, 9)):
            mults = [lr_multiplier(s, schedule=schedule, max_steps=max_steps, warmup=warmup)
                     for s in range(max_steps)]
            assert min(mults) > 0, (schedule, max_steps, warmup)
            assert all(a >= b for a, b in zip(mults[warmup:], mults[warmup + 1:])), "decay is monotone"
    assert lr_multiplier(0, schedule="cosine", max_steps=1, warmup=0) == pytest.approx(0.5)


def test_set_lr_keeps_per_group_peaks() -> None:
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr": 1e-3}, {"params": [p2], "lr": 1e-4}])
    assert set_lr(opt, 0.5) == [pytest.approx(5e-4), pytest.approx(5e-5)]
    assert set_lr(opt, 1.0) == [pytest.approx(1e-3), pytest.approx(1e-4)]
