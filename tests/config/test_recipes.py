"""Every YAML recipe shipped under recipes/ loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmtune.config import dump_recipe, load_recipe, recipe_from_dict
from vlmtune.config.loading import read_yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
# Whoever adds (or removes) a recipe bumps this number, so that a recipe never goes untested by accident.
EXPECTED_RECIPE_COUNT = 6
RECIPES = sorted(p for p in RECIPES_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_recipe_count() -> None:
    assert len(RECIPES) == EXPECTED_RECIPE_COUNT, [str(p.relative_to(RECIPES_DIR)) for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_recipe_validates(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Run: vlmtune "), "a recipe opens with the command that runs it"
    recipe = load_recipe(path)
    world = recipe.launch.world_size
    accum = recipe.grad_accum_steps(world)
    assert accum * recipe.train.micro_batch_size * world == recipe.train.global_batch_size
    assert recipe.model.path.is_absolute() and recipe.train.output_dir.is_absolute()
    # The resolved form loads back to the same recipe.
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_tiny_cpu_recipe_values() -> None:
    r = load_recipe(RECIPES_DIR / "tiny_cpu.yaml")
    root = RECIPES_DIR.parent
    assert r.model.path == root / ".cache/tiny_model" and r.model.preset == "tiny"
    assert r.data.train[0].path == root / ".cache/demo_data/train.jsonl" and r.data.demo
    assert (r.model.dtype, r.model.attention, r.precision) == ("float32", "sdpa_varlen", "fp32")
    assert r.model.gradient_checkpointing.decoder and r.model.gradient_checkpointing.vision
    assert (r.packing.packing_length, r.deepspeed.zero_stage) == (1024, 2)
    assert (r.train.max_steps, r.train.global_batch_size, r.train.micro_batch_size) == (300, 4, 2)
    assert (r.train.learning_rate, r.train.save_every, r.train.warmup_steps) == (5e-4, 100, 9)
    assert r.train.output_dir == root / "runs/tiny_cpu"
    assert r.train.eval_every == 50 and r.data.eval[0].path == root / ".cache/demo_data/eval.jsonl"
    assert r.grad_accum_steps() == 2
    assert read_yaml(RECIPES_DIR / "tiny_cpu.yaml")["train"]["learning_rate"] == 5e-4  # a float, not YAML 1.1 text
