"""Typed recipe schema, YAML loading with dotted overrides, and the checks run before any heavy work.

    from vlmtune.config import load_recipe
    recipe = load_recipe("recipes/tiny_cpu.yaml", ["train.max_steps=4"])
    recipe.grad_accum_steps()   # global_batch_size / (micro_batch_size x world size)
"""

from vlmtune.config.errors import RecipeError
from vlmtune.config.explain import explain, iter_fields
from vlmtune.config.loading import (
    apply_overrides,
    check_files,
    deep_merge,
    dump_recipe,
    load_recipe,
    parse_override,
    read_yaml,
    recipe_from_dict,
    save_resolved,
)
from vlmtune.config.schema import (
    DataSection,
    DatasetSpec,
    DeepSpeedSection,
    Freeze,
    GradientCheckpointing,
    LaunchSection,
    LoggingSection,
    Lora,
    ModelSection,
    PackingSection,
    Recipe,
    Slurm,
    TrainSection,
    Wandb,
)

__all__ = [
    "DataSection",
    "DatasetSpec",
    "DeepSpeedSection",
    "Freeze",
    "GradientCheckpointing",
    "LaunchSection",
    "LoggingSection",
    "Lora",
    "ModelSection",
    "PackingSection",
    "Recipe",
    "RecipeError",
    "Slurm",
    "TrainSection",
    "Wandb",
    "apply_overrides",
    "check_files",
    "deep_merge",
    "dump_recipe",
    "explain",
    "iter_fields",
    "load_recipe",
    "parse_override",
    "read_yaml",
    "recipe_from_dict",
    "save_resolved",
]
