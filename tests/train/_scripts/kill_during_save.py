"""`vlmtune train RECIPE [overrides]` that SIGKILLs itself in the middle of saving the checkpoint of one step.

    python tests/train/_scripts/kill_during_save.py --step 4 --at engine RECIPE [key=value ...]

--at engine    after DeepSpeed wrote the engine state into the temporary folder, before the RNG states and
               trainer_state.json (a checkpoint folder with half of its files)
--at finalize  after every file is written, just before the temporary folder is renamed into place

The process dies with SIGKILL (no cleanup, no atexit), exactly as a killed job would.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step", type=int, required=True, help="the step whose checkpoint save is killed")
    parser.add_argument("--at", choices=("engine", "finalize"), required=True)
    args, rest = parser.parse_known_args()

    from vlmtune.train import checkpointing, trainer

    target = checkpointing.step_dirname(args.step)

    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if args.at == "engine":
        save_rng = checkpointing.save_rng

        def save_rng_or_die(path: Path) -> None:
            if path.parent.name.endswith(target):
                die()
            save_rng(path)

        checkpointing.save_rng = save_rng_or_die
    else:
        finalize = checkpointing.finalize

        def finalize_or_die(root: Path, step: int, keep_last: int) -> Any:
            if step == args.step:
                die()
            return finalize(root, step, keep_last)

        checkpointing.finalize = finalize_or_die
    return trainer.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
