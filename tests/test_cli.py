"""The `vlmtune` entry point: command registry, options/overrides in any order, `validate` output and exit codes."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import yaml

from vlmtune import cli
from vlmtune.cli import COMMANDS, main, parse_with_overrides, split_overrides

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml")


def test_registry_points_at_functions() -> None:
    assert COMMANDS["validate"][1] == "vlmtune.cli:validate"
    assert COMMANDS["demo-data"][1] == "data_tools.demo_data:main"
    assert all(isinstance(h, str) and h and ":" in target for h, target in COMMANDS.values())
    assert cli._resolve("validate") is cli.validate
    if importlib.util.find_spec("data_tools.demo_data") is not None:
        from data_tools import demo_data

        assert cli._resolve("demo-data") is demo_data.main


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (helptext, _) in COMMANDS.items():
        assert f"  {name}" in out and helptext in out
    assert main([]) == 2
    assert "usage: vlmtune COMMAND" in capsys.readouterr().err


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["valdate", TINY]) == 2
    assert capsys.readouterr().err == "error: unknown command `valdate`; did you mean `validate`?\n"


def test_split_overrides_any_order() -> None:
    argv = ["R.yaml", "train.max_steps=4", "--explain", "packing.packing_length=512", "--world-size", "2"]
    assert split_overrides(argv) == (["R.yaml", "--explain", "--world-size", "2"],
                                     ["train.max_steps=4", "packing.packing_length=512"])
    # The value of an option that takes one stays with it even with '='; `--x=y` is an option; after `--` nothing splits.
    assert split_overrides(["--out", "a=b", "--n=3", "k=v", "--", "c=d"], takes_value={"--out"}) == (
        ["--out", "a=b", "--n=3", "--", "c=d"], ["k=v"])
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--out")
    parser.add_argument("--flag", action="store_true")
    args, overrides = parse_with_overrides(parser, ["a.b=1", "--out", "x=y", "R.yaml", "--flag", "c.d=[1, 2]"])
    assert (args.recipe, args.out, args.flag) == ("R.yaml", "x=y", True)
    assert overrides == ["a.b=1", "c.d=[1, 2]"]


def test_validate_prints_resolved_yaml_with_interleaved_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["validate", TINY, "train.max_steps=4", "--world-size", "2", "packing.packing_length=512"])
    out, err = capsys.readouterr()
    assert rc == 0
    resolved = yaml.safe_load(out)
    assert resolved["train"]["max_steps"] == 4
    assert resolved["packing"]["packing_length"] == 512
    assert resolved["train"]["learning_rate"] == 5e-4
    assert Path(resolved["model"]["path"]).is_absolute()
    assert out.splitlines()[1] == (
        "# world size 2: 2 packs/rank/micro-step x 1 accumulation steps = 4 packs/optimizer step; warmup 0 of 4 steps"
    )
    assert all(line.startswith("warning: ") for line in err.splitlines())


def test_validate_explain_lists_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    from vlmtune.config import iter_fields

    assert main(["validate", TINY, "--explain", "train.max_steps=4"]) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line and not line.startswith((" ", "#")) and "  (" in line]
    assert [h.split("  (")[0] for h in heads] == [d.key for d in iter_fields()]
    assert "train.max_steps  (int, default: required)  value: 4" in out
    assert "train.learning_rate  (float, default: 1e-05)  value: 0.0005" in out
    assert main(["validate", "--explain"]) == 0
    assert capsys.readouterr().out.startswith("model  (section, required)\n    The model to fine-tune.\n")


def test_validate_errors_exit_2_with_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", TINY, "train.lerning_rate=1", "--world-size", "3"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"error: {TINY}: override `train.lerning_rate=1`: unknown key `train.lerning_rate`; "
                   "did you mean `train.learning_rate`?\n")
    assert main(["validate", TINY, "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {TINY}: train.global_batch_size=4 is not divisible by") and err.count("\n") == 1
    assert main(["validate", "missing.yaml"]) == 2
    assert capsys.readouterr().err == "error: missing.yaml: recipe file not found\n"
    assert main(["validate", TINY, "--world-size", "0"]) == 2  # argparse usage error
    assert "expected a positive integer, got 0" in capsys.readouterr().err
    assert main(["validate"]) == 2
    assert "a RECIPE is required" in capsys.readouterr().err
    assert main(["validate", "--help"]) == 0
    assert "--world-size" in capsys.readouterr().out


def test_validate_warns_for_missing_files_but_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": "no_model"},
        "data": {"train": [{"path": "no_data.jsonl"}]},
        "train": {"output_dir": "out", "max_steps": 2, "global_batch_size": 1},
    }))
    assert main(["validate", str(recipe)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: model.path {tmp_path / 'no_model'} does not exist; point it at a model directory, or set "
        "model.preset: tiny to generate the tiny model there",
        f"warning: data.train.0.path {tmp_path / 'no_data.jsonl'} does not exist (or set data.demo: true to "
        "generate the demo data there)",
    ]
