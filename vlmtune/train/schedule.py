"""Learning-rate schedules: cosine, linear, constant and warmup-stable-decay (WSD), all with linear warmup.

A schedule is a pure function of the step (0-based optimizer step about to be taken) returning a multiplier of the
peak learning rate, so resuming needs no scheduler state beyond the step count. Warmup reaches the peak at its last
step; the decay of S steps takes the points 1/(S+1) .. S/(S+1) of its curve, so every step learns: the floor
min_lr_ratio is where the curve would go next, never a step's lr (a last step at lr 0, or a 1-step run that trains
nothing, is what the other convention gives with min_lr_ratio 0)::

    mult
    1.0 |      ______________            wsd: warmup, stable at peak, decay over the last decay_fraction
        |     /              \\
        |    /                \\___ min_lr_ratio
        +---+----------------+---> step
          warmup         max_steps*(1-decay_fraction)
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def warmup_steps(warmup: int | float, max_steps: int) -> int:
    """Warmup given as steps (int) or as a fraction of max_steps (float in [0, 1)); clipped to max_steps."""
    if isinstance(warmup, float):
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup fraction {warmup} must be in [0, 1)")
        steps = int(round(warmup * max_steps))
    else:
        steps = int(warmup)
        if steps < 0:
            raise ValueError(f"warmup steps {steps} must be >= 0")
    return min(steps, max_steps)


def lr_multiplier(step: int, *, schedule: str, max_steps: int, warmup: int, min_lr_ratio: float = 0.0,
                  decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based).

    Args:
        step: the step about to be taken. schedule: one of :data:`SCHEDULES`.
        max_steps: total optimizer steps. warmup: warmup steps (already resolved by :func:`warmup_steps`).
        min_lr_ratio: floor of the decay, as a fraction of the peak.
        decay_fraction: WSD only, the final fraction of the run spent decaying.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, int(round(decay_fraction * max_steps)))
        start = max(warmup, max_steps - decay_steps)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / (max(1, max_steps - start) + 1))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    span = max(1, max_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup + 1) / (span + 1)))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> list[float]:
    """Set every param group's lr to its ``base_lr`` (per-part peak) x multiplier; returns the new lrs."""
    lrs = []
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * multiplier
        lrs.append(group["lr"])
    return lrs
