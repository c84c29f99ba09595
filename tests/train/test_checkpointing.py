"""Atomic checkpoint directory protocol and RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from vlmtune.train.checkpointing import (
    clean_stale_tmp,
    finalize,
    latest_checkpoint,
    list_checkpoints,
    load_rng,
    save_rng,
    tmp_dir_for,
    write_json_atomic,
)


def _save(root: Path, step: int, keep: int = 2) -> Path:
    tmp = tmp_dir_for(root, step)
    tmp.mkdir(parents=True)
    write_json_atomic(tmp / "trainer_state.json", {"step": step})
    return finalize(root, step, keep)


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    # killed mid-save: the temporary directory exists, partially written
    tmp = tmp_dir_for(tmp_path, 6)
    tmp.mkdir()
    (tmp / "engine").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert clean_stale_tmp(tmp_path) == [".tmp-step-00000006"]
    # a complete dir whose `latest` pointer was not yet updated is still found (pointer is a hint, not the truth)
    (tmp_path / "latest").write_text("step-00000099\n")
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_keep_last(tmp_path: Path) -> None:
    for s in (2, 4, 6, 8):
        _save(tmp_path, s, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8]
    assert (tmp_path / "latest").read_text().strip() == "step-00000008"


def test_rng_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    save_rng(tmp_path / "rng.pt")
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    load_rng(tmp_path / "rng.pt")
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
