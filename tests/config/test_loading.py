"""Recipe loading: unknown keys, override coercion, deep merge, combinations, paths, warmup, round trip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from vlmtune.config import (
    Recipe,
    RecipeError,
    apply_overrides,
    check_files,
    deep_merge,
    dump_recipe,
    iter_fields,
    load_recipe,
    parse_override,
    recipe_from_dict,
    save_resolved,
)

MINIMAL = {
    "model": {"path": "models/tiny"},
    "data": {"train": [{"path": "data/a.jsonl"}, {"path": "data/b.jsonl", "weight": 3}]},
    "train": {"output_dir": "runs/x", "max_steps": 10, "global_batch_size": 8},
}


def write(tmp_path: Path, tree: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / "recipes" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def with_(tree: dict, **sections: dict) -> dict:
    return deep_merge(tree, sections)


def error_of(tree: dict, overrides: list[str] = (), world_size: int | None = None, **kw) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(tree, overrides, world_size, **kw)
    return str(info.value)


# ----------------------------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, with_(MINIMAL, train={"lerning_rate": 1e-3}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: unknown key `train.lerning_rate`; did you mean `train.learning_rate`?"


def test_unknown_key_nested_and_in_list_item_all_reported() -> None:
    tree = with_(MINIMAL, model={"gradient_checkpointing": {"decodr": True}})
    tree["data"]["train"][1]["wieght"] = 2
    err = error_of(tree, source="x.yaml")
    assert err.splitlines() == [
        "x.yaml: unknown key `model.gradient_checkpointing.decodr`; did you mean `model.gradient_checkpointing.decoder`?",
        "x.yaml: unknown key `data.train.1.wieght`; did you mean `data.train.1.weight`?",
    ]


def test_unknown_key_in_override_and_misplaced_key_points_to_its_section() -> None:
    err = error_of(MINIMAL, ["train.zero_stage=3", "data.train.0.pth=x", "trian.max_steps=4"], source="x.yaml")
    lines = err.splitlines()
    assert len(lines) == 3
    assert "x.yaml: override `train.zero_stage=3`: unknown key `train.zero_stage`; did you mean `deepspeed.zero_stage`?" in lines
    assert "x.yaml: override `data.train.0.pth=x`: unknown key `data.train.0.pth`; did you mean `data.train.0.path`?" in lines
    assert "x.yaml: override `trian.max_steps=4`: unknown key `trian`; did you mean `train`?" in lines


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    err = error_of(with_(MINIMAL, logging={"zzzz": 1}), source="x.yaml")
    assert err == "x.yaml: unknown key `logging.zzzz`; valid keys here: log_every, tensorboard, wandb, plots"


def test_type_error_names_key_value_and_expected_type() -> None:
    err = error_of(MINIMAL, ["train.max_steps=abc"], source="x.yaml")
    assert err.startswith("x.yaml: override `train.max_steps=abc`: `train.max_steps` = 'abc' is invalid (expected int)")
    err = error_of(with_(MINIMAL, model={"dtype": "float16"}), source="x.yaml")
    assert err.startswith("x.yaml: `model.dtype` = 'float16' is invalid (expected bfloat16 | float32 | float64)")
    err = error_of(with_(MINIMAL, train={"resume": 5}), source="x.yaml")
    assert err.startswith("x.yaml: `train.resume` = 5 is invalid (expected auto | never | path)")


def test_missing_required_key_is_named_with_its_description() -> None:
    tree = {k: v for k, v in MINIMAL.items() if k != "train"} | {"train": {"max_steps": 3, "global_batch_size": 1}}
    err = error_of(tree, source="x.yaml")
    assert err.startswith("x.yaml: missing required key `train.output_dir` (path): Run folder")


def test_duplicate_key_and_non_mapping_files_are_errors(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  max_steps: 4\n  max_steps: 5\n")
    with pytest.raises(RecipeError, match=r"dup.yaml: invalid YAML: .*duplicate key 'max_steps'"):
        load_recipe(dup)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match=r"list.yaml: a recipe must be a YAML mapping .* got a list"):
        load_recipe(lst)
    with pytest.raises(RecipeError, match=r"nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------- overrides


def test_override_coercion() -> None:
    r = recipe_from_dict(
        MINIMAL,
        [
            "train.max_steps=4",  # int
            "train.learning_rate=1e-4",  # a float (YAML 1.1 alone would read text)
            "train.weight_decay=0.05",  # float
            "model.rmpad=false",  # bool
            "train.grad_clip=null",  # null
            "launch.slurm.extra_sbatch=[--qos=high, --exclusive]",  # list
            "logging.wandb.run_name=007",  # str field: stays the text '007', not the int 7
            "logging.wandb.enabled=true",
            "launch.slurm.time=4:00:00",  # str field: not YAML 1.1's sexagesimal 14400
            "train.warmup=0.25",
        ],
    )
    assert r.train.max_steps == 4 and type(r.train.max_steps) is int
    assert r.train.learning_rate == 1e-4 and type(r.train.learning_rate) is float
    assert r.train.weight_decay == 0.05
    assert r.model.rmpad is False
    assert r.train.grad_clip is None
    assert r.launch.slurm.extra_sbatch == ["--qos=high", "--exclusive"]
    assert r.logging.wandb.run_name == "007"
    assert r.launch.slurm.time == "4:00:00"
    assert r.train.warmup == 0.25 and r.train.warmup_steps == 1


def test_parse_override_values_and_syntax_errors() -> None:
    assert parse_override("a.b=[1, 2.5, x]").value == [1, 2.5, "x"]
    assert parse_override("a.b={c: 1}").value == {"c": 1}
    assert parse_override("a.b=x=y").value == "x=y"
    assert parse_override("logging.wandb.project=1.5").value == "1.5"
    for bad in ["noequals", "=3", "a..b=3", "a.b="]:
        with pytest.raises(RecipeError, match="override"):
            parse_override(bad)


def test_exponent_floats_are_numbers_in_files_and_in_untyped_places(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `1e9` as text; the recipe loader reads it as a float, as YAML 1.2 does.
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "deepspeed:\n  extra:\n    zero_optimization:\n"
                    "      stage3_max_live_parameters: 1e9\n")
    r = load_recipe(path, ["deepspeed.extra.zero_optimization.stage3_prefetch_bucket_size=5e7"])
    assert r.deepspeed.extra == {"zero_optimization": {"stage3_max_live_parameters": 1e9,
                                                       "stage3_prefetch_bucket_size": 5e7}}
    assert type(r.deepspeed.extra["zero_optimization"]["stage3_max_live_parameters"]) is float


def test_unquoted_slurm_time_in_file_is_an_error() -> None:
    tree = with_(MINIMAL, launch={"slurm": {"time": yaml.safe_load("4:00:00")}})
    err = error_of(tree, source="x.yaml")
    assert "`launch.slurm.time` = 14400" in err and "quote the time" in err


def test_deep_merge_keeps_siblings() -> None:
    tree = with_(MINIMAL, model={"lora": {"enabled": True, "r": 8}, "freeze": {"decoder": True, "vision_tower": True}})
    merged = apply_overrides(tree, ["model.lora={alpha: 4}", "model.freeze.projector=true"])
    assert merged["model"]["lora"] == {"enabled": True, "r": 8, "alpha": 4}
    assert merged["model"]["freeze"] == {"decoder": True, "vision_tower": True, "projector": True}
    assert merged["model"]["path"] == "models/tiny"
    assert tree["model"]["lora"] == {"enabled": True, "r": 8}  # input untouched
    r = recipe_from_dict(tree, ["model.lora={alpha: 4}"])
    assert (r.model.lora.enabled, r.model.lora.r, r.model.lora.alpha) == (True, 8, 4.0)
    assert deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}


def test_override_list_element_by_index() -> None:
    r = recipe_from_dict(MINIMAL, ["data.train.0.weight=2", "data.train.1.format=llava"])
    assert [d.weight for d in r.data.train] == [2.0, 3.0]
    assert [d.format for d in r.data.train] == ["auto", "llava"]
    assert "index 2 is out of range for `data.train` (2 items)" in error_of(MINIMAL, ["data.train.2.weight=1"])
    err = error_of(MINIMAL, ["data.eval.0.path=x"])
    assert "`data.eval` is not in the recipe, so it has no item 0" in err
    assert "`train.max_steps` is 10, not a section" in error_of(MINIMAL, ["train.max_steps.x=1"])


# ---------------------------------------------------------------------------------------------- combinations


def test_global_batch_divisibility_uses_world_size() -> None:
    r = recipe_from_dict(with_(MINIMAL, train={"micro_batch_size": 2}))
    assert r.grad_accum_steps() == 4  # launch default: 1 process
    assert r.grad_accum_steps(2) == 2
    assert r.grad_accum_steps(4) == 1
    err = error_of(with_(MINIMAL, train={"micro_batch_size": 2}), world_size=3, source="x.yaml")
    assert err == (
        "x.yaml: train.global_batch_size=8 is not divisible by train.micro_batch_size (2) x world size (3) = 6; "
        "use a multiple of 6 (e.g. 6 or 12) or change train.micro_batch_size"
    )
    # Without an argument, the world size is launch.nproc_per_node x launch.nnodes.
    err = error_of(MINIMAL, ["launch.nproc_per_node=3", "launch.nnodes=2"])
    assert "world size (6) = 6" in err
    assert recipe_from_dict(MINIMAL, ["launch.nproc_per_node=4", "launch.nnodes=2"]).grad_accum_steps() == 1


def test_invalid_combinations() -> None:
    err = error_of(MINIMAL, ["deepspeed.offload_param=cpu"], source="x.yaml")
    assert err.startswith("x.yaml: deepspeed.offload_param: cpu needs ZeRO stage 3, and deepspeed.zero_stage is 2")
    assert recipe_from_dict(MINIMAL, ["deepspeed.offload_param=cpu", "deepspeed.zero_stage=3"]).deepspeed.zero_stage == 3
    assert "`train.save_every` = 0 is invalid" in error_of(MINIMAL, ["train.save_every=0"])
    assert "`train.save_every` = -5 is invalid" in error_of(MINIMAL, ["train.save_every=-5"])
    assert "`deepspeed.zero_stage` = 4 is invalid" in error_of(MINIMAL, ["deepspeed.zero_stage=4"])
    assert "deepspeed.extra.train_batch_size is set by the recipe" in error_of(
        MINIMAL, ["deepspeed.extra={train_batch_size: 4}"]
    )
    assert "train.decay_fraction only applies to schedule wsd" in error_of(MINIMAL, ["train.decay_fraction=0.2"])
    assert "model.lora.r set but model.lora.enabled is false" in error_of(MINIMAL, ["model.lora.r=8"])
    assert "nothing would train" in error_of(
        MINIMAL, ["model.freeze={vision_tower: true, projector: true, decoder: true}"]
    )
    assert "frozen tower runs under no_grad" in error_of(
        MINIMAL, ["model.freeze.vision_tower=true", "model.gradient_checkpointing.vision=true"]
    )
    assert "train.eval_every is set but data.eval is empty" in error_of(MINIMAL, ["train.eval_every=5"])
    assert "disagrees with model.dtype" in error_of(MINIMAL, ["deepspeed.precision=fp32"])
    assert "launch.node_rank (2) must be < launch.nnodes (2)" in error_of(
        MINIMAL, ["launch.nnodes=2", "launch.node_rank=2"]
    )
    assert "only applies to the rmpad varlen path" in error_of(MINIMAL, ["model.rmpad=false", "model.attention=sdpa_varlen"])
    assert "a float warmup is a fraction" in error_of(MINIMAL, ["train.warmup=1.5"])


def test_minimal_recipe_defaults_are_accepted_and_filled_in() -> None:
    r = recipe_from_dict(MINIMAL)
    assert r.grad_accum_steps() == 8
    assert r.precision == "bf16"
    assert r.packing.pack_dir == Path("runs/x/packs")
    assert r.model.freeze.router_frozen is False
    fly = recipe_from_dict(MINIMAL, ["packing.mode=on_the_fly"])
    assert (fly.packing.pack_dir, fly.packing.window) == (None, 2048)


@pytest.mark.parametrize(
    ("warmup", "schedule", "max_steps", "expected"),
    [(0, "cosine", 4, 0), (100, "cosine", 4, 4), (0.5, "cosine", 4, 2), (0.99, "linear", 4, 4),
     (3, "cosine", 10, 3), (100, "wsd", 4, 3), (0.5, "wsd", 10, 5), (2, "constant", 1, 1)],
)
def test_warmup_clipped_to_max_steps(warmup: float, schedule: str, max_steps: int, expected: int) -> None:
    r = recipe_from_dict(MINIMAL, [f"train.warmup={warmup}", f"train.schedule={schedule}", f"train.max_steps={max_steps}"])
    assert r.train.warmup_steps == expected


def test_wsd_decay_steps() -> None:
    r = recipe_from_dict(MINIMAL, ["train.schedule=wsd", "train.decay_fraction=0.2", "train.max_steps=50"])
    assert (r.train.decay_steps, r.train.warmup_steps) == (10, 0)
    assert recipe_from_dict(MINIMAL, ["train.max_steps=50"]).train.decay_steps == 0


# --------------------------------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_recipe_folder_and_overrides_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = with_(MINIMAL, data={"train": [{"path": "../data/a.jsonl", "image_root": "imgs"}]},
                 packing={"pack_dir": "packs"}, launch={"hostfile": "hosts"}, train={"resume": "ckpt/step-5"})
    path = write(tmp_path, tree)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rd = tmp_path / "recipes"
    r = load_recipe(os.path.relpath(path, cwd), ["data.train.0.weight=2", "launch.hostfile=my_hosts"])
    assert r.model.path == rd / "models/tiny"
    assert r.data.train[0].path == tmp_path / "data/a.jsonl"  # `..` collapsed
    assert r.data.train[0].image_root == rd / "imgs"
    assert r.train.output_dir == rd / "runs/x"
    assert r.train.resume == rd / "ckpt/step-5"
    assert r.packing.pack_dir == rd / "packs"
    assert r.launch.hostfile == cwd / "my_hosts"  # given on the command line: relative to the CWD
    r2 = load_recipe(path, ["train.output_dir=out", "train.resume=never", "data.train=[{path: d.jsonl}]"])
    assert r2.train.output_dir == cwd / "out"
    assert r2.train.resume == "never"
    assert r2.data.train[0].path == cwd / "d.jsonl"
    assert r2.packing.pack_dir == rd / "packs"
    abs_path = write(tmp_path, with_(MINIMAL, model={"path": "/abs/model"}), "abs.yaml")
    assert load_recipe(abs_path).model.path == Path("/abs/model")


def test_check_files_warns_for_missing_files(tmp_path: Path) -> None:
    model_dir = tmp_path / "recipes/models/tiny"
    model_dir.mkdir(parents=True)
    (tmp_path / "recipes/data").mkdir()
    (tmp_path / "recipes/data/a.jsonl").write_text("{}\n")
    r = load_recipe(write(tmp_path, MINIMAL))
    assert check_files(r) == [
        f"model.path {model_dir} has no config.json; point model.path at an HF-style model directory",
        f"data.train.1.path {tmp_path / 'recipes/data/b.jsonl'} does not exist",
    ]
    (model_dir / "config.json").write_text("{}")
    (tmp_path / "recipes/data/b.jsonl").write_text("{}\n")
    assert check_files(r) == []
    # Generated things are not missing: model.preset and data.demo.
    gen = load_recipe(write(tmp_path, with_(MINIMAL, model={"path": "gen/m", "preset": "tiny"},
                                                data={"train": [{"path": "gen/d/train.jsonl"}], "demo": True,
                                                      "eval": [{"path": "gen/d/eval.jsonl"}]}), "gen.yaml"))
    assert check_files(gen) == []


# ---------------------------------------------------------------------------------------------- round trip


def test_dump_and_save_resolved_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, with_(MINIMAL, train={"schedule": "wsd", "warmup": 0.1}))
    r = load_recipe(path, ["train.micro_batch_size=2", "model.lora={enabled: true}", "model.freeze.decoder=true"])
    out = save_resolved(r, tmp_path / "run")
    assert out == tmp_path / "run" / "recipe.resolved.yaml"
    assert out.read_text() == dump_recipe(r)
    again = load_recipe(out)
    assert again == r
    assert dump_recipe(again) == dump_recipe(r)
    resolved = yaml.safe_load(out.read_text())
    assert resolved["model"]["path"] == str(tmp_path / "recipes/models/tiny")
    assert resolved["train"]["adam_betas"] == [0.9, 0.95]
    assert set(resolved) == set(Recipe.model_fields)


def test_every_field_has_a_description() -> None:
    docs = list(iter_fields())
    assert len(docs) > 90
    assert [d.key for d in docs if len(d.description) < 5] == []
    keys = {d.key for d in docs}
    for required in ["model.path", "data.train", "data.train.<i>.path", "data.train.<i>.weight",
                     "packing.packing_length", "packing.max_vision_patches", "train.output_dir", "train.max_steps",
                     "train.micro_batch_size", "train.global_batch_size", "train.learning_rate", "train.seed",
                     "train.save_every", "train.resume", "deepspeed.zero_stage"]:
        assert required in keys
