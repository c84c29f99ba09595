"""Atomic, SIGKILL-safe training checkpoints.

Layout under ``train.output_dir/checkpoints``::

    step-00000020/          a complete checkpoint (renamed into place only once fully written)
        engine/             DeepSpeed's own states (model, optimizer, per-rank partitions)
        trainer_state.json  step, loader position, recipe hash, metrics offset
        rng-rank00000.pt    RNG states of each rank (torch, numpy, python) - plain tensors, weights_only load
    .tmp-step-00000040/     a save in progress or killed mid-way: ignored on resume, removed by the next save
    latest                  text file naming the newest complete checkpoint; written last, with os.replace

A checkpoint becomes visible only through the rename, and ``latest`` only points at renamed directories, so a process
killed at any instant leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_RE = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-"


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first (half-written ``.tmp-*`` ones excluded)."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, falling back to the newest complete one (``latest`` written last)."""
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "trainer_state.json").is_file():
            return cand
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f"{TMP_PREFIX}{step_dirname(step)}"


def clean_stale_tmp(root: Path) -> list[str]:
    """Remove checkpoints killed mid-save. Returns their names (for the log)."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finalize(root: Path, step: int, keep_last: int) -> Path:
    """Rename the finished temporary checkpoint into place, point ``latest`` at it, prune old ones (rank 0 only)."""
    tmp = tmp_dir_for(root, step)
    final = root / step_dirname(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / "latest.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / "latest")
    if keep_last > 0:
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_rng(path: Path) -> None:
    st = rng_state()
    np_state = st["numpy"]
    torch.save({"torch": st["torch"], "cuda": st["cuda"],
                "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
                "python": repr(st["python"])}, path)


def load_rng(path: Path) -> None:
    st = torch.load(path, weights_only=True)  # tensors, tuples, ints and strings only: nothing is unpickled
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(ast.literal_eval(st["python"]))
