"""`vlmtune train RECIPE [overrides]`, then each rank writes its MoE router correction biases to
``OUT/bias-rank{RANK}.pt`` ({parameter name: tensor}) so a test can compare them across ranks.

    python tests/train/_scripts/train_dump_bias.py OUT RECIPE [key=value ...]        (one process)
    torchrun --nproc_per_node 2 tests/train/_scripts/train_dump_bias.py OUT RECIPE   (two ranks)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    from vlmtune.train import trainer

    captured: dict[str, Any] = {}
    build_model = trainer.build_model

    def build_and_keep(recipe: Any, dist: Any) -> Any:
        model, vlm = build_model(recipe, dist)
        captured["vlm"] = vlm
        return model, vlm

    trainer.build_model = build_and_keep
    rc = trainer.main(argv)
    if rc == 0:
        rank = int(os.environ.get("RANK", "0"))
        biases = {n: b.detach().clone() for n, b in captured["vlm"].named_buffers()
                  if n.endswith("e_score_correction_bias")}
        out.mkdir(parents=True, exist_ok=True)
        torch.save(biases, out / f"bias-rank{rank}.pt")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
