"""Fixtures for the trainer tests: a tiny Kimi-VL model folder, a small demo data set packed once, and helpers that
write recipes pointing at them and run the trainer in this process or in a clean one.

Everything is generated here (nothing binary in the repository). The model folder is `init_model`'s tiny preset (seed 0)
with the image processor capped at 256 patches per image; the demo set has 48 samples, packed into packs of 512
tokens, so a step of 4 packs takes well under a second on one core.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "_scripts"
PYTHON = sys.executable
PACKING_LENGTH = 512
IN_TOKEN_LIMIT = 256
TRAIN_SAMPLES = 48
DIST_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Assets:
    """The session's tiny model folder, demo train.jsonl and its pack folder (read-only for tests)."""

    model: Path
    train_file: Path
    packs: Path


def build_tiny_model(out_dir: Path) -> Path:
    """`init_model(out_dir, preset="tiny", seed=0)`, with the image processor capped at 256 patches per image (64 LM
    tokens) instead of 1024, so that the demo samples stay short and a step stays fast."""
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.init_model import init_model

    init_model(out_dir, preset="tiny", seed=0)
    KimiVLImageProcessor.kimi_vl_a3b(in_token_limit=IN_TOKEN_LIMIT).save_pretrained(out_dir)
    return out_dir


def pack_data(model: Path, train_file: Path, out: Path, packing_length: int = PACKING_LENGTH) -> Path:
    """`vlmtune pack` of one jsonl file into ``out`` (no vision budget, whole-data best fit)."""
    from vlmtune.data.formats import DatasetSpec
    from vlmtune.data.pack_cli import PackSettings, build_pack

    build_pack([DatasetSpec(train_file, 1.0, "auto", None)],
               PackSettings(model_dir=model, out=out, packing_length=packing_length, progress=False))
    return out


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """Tiny model + 48-sample demo set + its packs, built once per session."""
    from data_tools.demo_data import generate_demo_data

    root = tmp_path_factory.mktemp("train_assets")
    model = build_tiny_model(root / "model")
    generate_demo_data(root / "demo", samples=TRAIN_SAMPLES, eval_samples=6, seed=0)
    train_file = root / "demo" / "train.jsonl"
    return Assets(model, train_file, pack_data(model, train_file, root / "packs"))


def recipe_dict(assets: Assets, output_dir: Path, **sections: Any) -> dict[str, Any]:
    """A tiny fp32 recipe: ZeRO-2, 4 packs per step as micro 1 x accumulation 4, lr 1e-3 constant, no clipping,
    no checkpointing of activations, 6 steps. ``sections`` are merged one level deep (e.g. ``train={"seed": 3}``)."""
    base: dict[str, Any] = {
        "model": {"path": str(assets.model), "dtype": "float32", "attention": "sdpa_varlen",
                  "gradient_checkpointing": {"decoder": False, "vision": False}},
        "data": {"train": [{"path": str(assets.train_file)}]},
        "packing": {"packing_length": PACKING_LENGTH, "pack_dir": str(assets.packs)},
        "train": {"output_dir": str(output_dir), "max_steps": 6, "global_batch_size": 4, "micro_batch_size": 1,
                  "learning_rate": 1e-3, "schedule": "constant", "grad_clip": None, "save_every": 1000, "seed": 0},
        "deepspeed": {"zero_stage": 2},
        "logging": {"tensorboard": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_recipe(assets: Assets, root: Path, name: str, overrides: tuple[str, ...] | list[str] = (),
                world_size: int = 1, **sections: Any) -> tuple[Any, Path]:
    """Write ``root/name.yaml`` (output in ``root/name``) and load it with ``overrides``. Returns (Recipe, path)."""
    from vlmtune.config import load_recipe

    path = write_recipe(root / f"{name}.yaml", recipe_dict(assets, root / name, **sections))
    return load_recipe(path, list(overrides), world_size=world_size), path


def read_steps(output_dir: Path) -> list[dict[str, Any]]:
    """The step records of ``output_dir/metrics.jsonl`` (eval lines left out)."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if not r.get("eval")]


@contextlib.contextmanager
def launcher_env_restored() -> Iterator[None]:
    """Put the launcher variables (RANK, WORLD_SIZE, MASTER_PORT, ...) back as they were after an in-process run: the
    trainer sets one-rank defaults for itself."""
    saved = {k: os.environ.get(k) for k in DIST_ENV_KEYS}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_in_process(recipe: Any) -> list[dict[str, Any]]:
    """`train(recipe)` in this process (one rank, the trainer's env defaults) -> the step records."""
    from vlmtune.train.trainer import train

    with launcher_env_restored():
        train(recipe)
    return read_steps(Path(recipe.train.output_dir))


def clean_env() -> dict[str, str]:
    """This environment without launcher variables, with one thread per process and the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV_KEYS}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO), "VLMTUNE_PROGRESS": "0"})
    return env


def run_cli(args: list[str], timeout: float, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m vlmtune ARGS`` (or ``launcher + ARGS``) in a clean process from the repository root."""
    cmd = (launcher or [PYTHON, "-m", "vlmtune"]) + args
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int) -> list[str]:
    """The torchrun launcher of this interpreter's environment (standalone rendezvous, free port)."""
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def deepspeed_optim_state(output_dir: Path, step: int) -> dict[str, Any]:
    """The ``optimizer_state_dict`` of rank 0's partition in a one-rank ZeRO-1/2 trainer checkpoint of ``step``."""
    path = (Path(output_dir) / "checkpoints" / f"step-{step:08d}" / "engine" / "state"
            / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]


def deepspeed_first_step_grads(output_dir: Path, beta1: float) -> dict[str, torch.Tensor]:
    """The gradients of a one-rank ZeRO-1/2 run's FIRST step by parameter name (flat fp32): after one AdamW step
    exp_avg = (1 - beta1) g, at the offset DeepSpeed records for each parameter in its flat partition (the step-1
    checkpoint must exist)."""
    state = deepspeed_optim_state(output_dir, 1)
    grads: dict[str, torch.Tensor] = {}
    for group, mapping in enumerate(state["param_slice_mappings"]):
        exp_avg = state["base_optimizer_state"]["state"][group]["exp_avg"]
        for key, frag in mapping.items():
            grads[key.removeprefix("model.")] = exp_avg[frag.start:frag.start + frag.numel] / (1 - beta1)
    return grads
