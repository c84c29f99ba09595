"""`vlmtune train` that resumes across a world-size change through vlmtune.train.reshard (test driver).

Until the trainer calls :func:`vlmtune.train.reshard.load_resharded` itself, this script wraps the trainer's two resume
functions the way the trainer change proposed in the launch report does: the world-size check is kept for every other
recipe difference, and a checkpoint written by another number of ranks is loaded with ``load_resharded`` (then the
loader position, and the RNG state of the ranks that have one). Once the trainer resumes across world sizes on its
own (it references ``load_resharded``), this script runs the trainer unchanged.

    python tests/launch/_reshard_train.py RECIPE [overrides]            (one rank, or under torchrun)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import vlmtune.train.trainer as T
from vlmtune.train import checkpointing as ckpt
from vlmtune.train.reshard import load_resharded


def _install() -> None:
    check, load = T._check_resumable, T._load_checkpoint

    def check_resumable(path: Path, recipe: Any, dist: Any) -> None:
        st = json.loads((path / "trainer_state.json").read_text())
        check(path, recipe, dataclasses.replace(dist, world_size=st["world_size"]))  # every other check as is

    def load_checkpoint(path: Path, engine: Any, loader: Any, recipe: Any, dist: Any) -> Any:
        st = json.loads((path / "trainer_state.json").read_text())
        if st["world_size"] == dist.world_size:
            return load(path, engine, loader, recipe, dist)
        info = load_resharded(engine, path, is_main=dist.is_main, barrier=T.barrier)
        print(f"resharded {st['world_size']} -> {dist.world_size} ranks: {info}", file=sys.stderr)
        loader.load_state_dict(st["loader"])
        rng = path / f"rng-rank{dist.rank:05d}.pt"
        if rng.is_file():
            ckpt.load_rng(rng)
        return T.RunState(step=int(st["step"]))

    T._check_resumable = check_resumable
    T._load_checkpoint = load_checkpoint


if __name__ == "__main__":
    if "load_resharded" not in inspect.getsource(T):
        _install()
    sys.exit(T.main(sys.argv[1:]))
