"""Fixtures for the launch tests: a tiny model folder, demo data packed once, recipes that point at them, and helpers
that run `vlmtune train` / `vlmtune launch` in clean subprocesses and read back what a run wrote.

The model is `init_model`'s tiny preset (seed 0) with the image processor capped at 256 patches per image; the demo
set has 60 samples packed into 512-token packs, so a 4-pack step takes a fraction of a second on one core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
PACKING_LENGTH = 512
DIST_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Assets:
    """The session's tiny model folder, demo train.jsonl and its pack folder (read-only for tests)."""

    model: Path
    train_file: Path
    packs: Path


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    from data_tools.demo_data import generate_demo_data
    from vlmtune.data.formats import DatasetSpec
    from vlmtune.data.pack_cli import PackSettings, build_pack
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.init_model import init_model

    root = tmp_path_factory.mktemp("launch_assets")
    model = init_model(root / "model", preset="tiny", seed=0)
    KimiVLImageProcessor.kimi_vl_a3b(in_token_limit=256).save_pretrained(model)
    generate_demo_data(root / "data", samples=60, eval_samples=12, seed=0)
    train_file = root / "data" / "train.jsonl"
    packs = root / "packs"
    build_pack([DatasetSpec(train_file, 1.0, "auto", None)],
               PackSettings(model_dir=model, out=packs, packing_length=PACKING_LENGTH, progress=False))
    return Assets(model=model, train_file=train_file, packs=packs)


def write_recipe(path: Path, assets: Assets, **sections: dict[str, Any]) -> Path:
    """A CPU recipe on the session assets (fp32, exact varlen SDPA, 4 packs a step); ``sections`` update it."""
    recipe: dict[str, Any] = {
        "model": {"path": str(assets.model), "dtype": "float32", "attention": "sdpa_varlen"},
        "data": {"train": [{"path": str(assets.train_file)}]},
        "packing": {"packing_length": PACKING_LENGTH, "pack_dir": str(assets.packs)},
        "train": {"output_dir": str(path.parent / "run"), "max_steps": 4, "global_batch_size": 4,
                  "micro_batch_size": 1, "learning_rate": 1e-3, "save_every": 1000, "seed": 0},
        "deepspeed": {"zero_stage": 2},
        "logging": {"tensorboard": False, "plots": False},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    path.write_text("# Run: vlmtune train " + path.name + "\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without torchrun's variables, one OpenMP thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV_KEYS}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra})
    return env


def run(args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in the repository root; fail the test with the output tail when it fails."""
    proc = subprocess.run([PYTHON, *args], cwd=REPO, env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"python {' '.join(args)} exited {proc.returncode}:\n{tail}")
    return proc


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of a run (metrics.jsonl), in step order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["step"])


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def final_weights(checkpoint: Path) -> dict[str, Any]:
    """fp32 weights of a vlmtune checkpoint, consolidated from the ZeRO partitions (any stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "engine"), tag="state")


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
