"""The training loop end to end on the tiny model, one process: ZeRO 0/2/3 agree, checkpointing changes nothing,
metrics.jsonl holds the exact step facts, and the tiny recipe takes the bar's overrides.

Measured (fp32, 6 steps of 4 packs, lr 1e-3): stages 0 and 2 give bit-identical losses, stage 3 differs by at most
2.4e-7; grad_norm differs by at most 1e-7 relative between stages (the trainer's float64 norm for stage 0, DeepSpeed's
for 2 and 3); decoder + vision gradient checkpointing on vs off is bit-identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.train.conftest import Assets, make_recipe, read_steps, run_in_process

REPO = Path(__file__).resolve().parents[2]
STAGES = (0, 2, 3)


@pytest.fixture(scope="module")
def runs(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 6-step run per ZeRO stage, plus ZeRO-2 with decoder + vision checkpointing; name -> output dir."""
    root = tmp_path_factory.mktemp("stage_runs")
    out = {}
    for stage in STAGES:
        recipe, _ = make_recipe(assets, root, f"z{stage}", deepspeed={"zero_stage": stage})
        run_in_process(recipe)
        out[f"z{stage}"] = Path(recipe.train.output_dir)
    recipe, _ = make_recipe(assets, root, "z2_gc", model={
        "path": str(assets.model), "dtype": "float32", "attention": "sdpa_varlen",
        "gradient_checkpointing": {"decoder": True, "vision": True}})
    run_in_process(recipe)
    out["z2_gc"] = Path(recipe.train.output_dir)
    out["model"] = assets.model
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_trains(runs: dict[str, Path], stage: int) -> None:
    steps = read_steps(runs[f"z{stage}"])
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    losses = [r["loss"] for r in steps]
    assert all(math.isfinite(x) for x in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # lr 1e-3 on random weights: every step lower
    assert losses[-1] < losses[0] - 1.0, losses
    vocab = json.loads((runs["model"] / "config.json").read_text())["text_config"]["vocab_size"]
    assert losses[0] == pytest.approx(math.log(vocab), abs=0.25)  # random init: about log(vocab) nats
    assert all(r["grad_norm"] is not None and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)


def test_stages_give_the_same_losses(runs: dict[str, Path]) -> None:
    ref = read_steps(runs["z0"])
    for stage in (2, 3):
        got = read_steps(runs[f"z{stage}"])
        diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, got))
        assert diff <= 1e-5, f"ZeRO-{stage} vs ZeRO-0: max loss diff {diff:.3g}"
        for a, b in zip(ref, got):
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
            assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-5)
    assert [r["loss"] for r in read_steps(runs["z2"])] == [r["loss"] for r in ref]  # 0 and 2: bit-identical


def test_gradient_checkpointing_same_losses(runs: dict[str, Path]) -> None:
    off, on = read_steps(runs["z2"]), read_steps(runs["z2_gc"])
    assert len(off) == len(on) == 6
    for a, b in zip(off, on):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)


def test_metrics_hold_the_step_facts(runs: dict[str, Path], assets: Assets) -> None:
    """tokens / supervised_tokens / samples per step equal the loader's plan (exact), lr is the constant peak,
    tokens_per_s = tokens / step_time_s, and the run folder holds every artefact."""
    from vlmtune.data.loader import OfflinePackSource, PackedLoader
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor

    loader = PackedLoader(OfflinePackSource(assets.packs), micro_batch_size=1, global_batch_size=4, seed=0,
                          balance=True, image_processor=KimiVLImageProcessor.from_pretrained(assets.model))
    plan = []
    while len(plan) < 6:
        plan += loader.epoch_infos()
        for _ in loader:  # move to the next epoch (images are opened: 12 packs, cheap)
            pass
    out = runs["z2"]
    steps = read_steps(out)
    for rec, info in zip(steps, plan):
        assert rec["tokens"] == info.num_tokens
        assert rec["supervised_tokens"] == info.num_supervised_tokens
        assert rec["samples"] == info.num_packed_samples
        assert rec["epoch"] == info.epoch
        assert rec["padding_fraction"] == 0.0
        assert rec["lr"] == 1e-3
        assert rec["tokens_per_s"] == pytest.approx(rec["tokens"] / rec["step_time_s"], rel=1e-9)
        assert rec["aux_loss"] > 0  # kimi_vl_tiny has aux_loss_alpha 0.001
        assert rec["expert_load_max_mean"] >= 1.0
        assert rec["mfu"] is None  # CPU: no peak figure
    # Epochs are carried over (no pack dropped): the first lcm(packs, 4) / 4 steps cover every pack equally often.
    source = OfflinePackSource(assets.packs)
    cover = math.lcm(len(source), 4)
    assert cover // 4 <= len(steps)
    all_tokens = sum(int(p["tokens"]) for p in source.reader.manifest["packs"])
    assert sum(r["tokens"] for r in steps[:cover // 4]) == all_tokens * cover // len(source)
    ds = json.loads((out / "deepspeed.json").read_text())
    assert (ds["zero_optimization"]["stage"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 1, 4, 4)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["final_loss"]) == (6, steps[-1]["loss"])
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "recipe.resolved.yaml").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000006"


def test_tiny_recipe_takes_the_bar_overrides(assets: Assets, tmp_path: Path) -> None:
    """recipes/tiny_cpu.yaml (ZeRO-2, checkpointing on, 1024-token packs) with the bar's overrides, on the test
    model and data: 4 steps, checkpoints at 2 and 4, accumulation 4, the seed changes the data order."""
    from vlmtune.config import load_recipe

    out = tmp_path / "tiny"
    bar = ["train.max_steps=4", "train.global_batch_size=4", "train.micro_batch_size=1", "train.save_every=2",
           "train.seed=3"]
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [
        f"model.path={assets.model}", f"data.train.0.path={assets.train_file}", "data.eval=null", "train.eval_every=null",
        f"train.output_dir={out}", *bar],
        world_size=1)
    assert recipe.train.warmup_steps == 0  # warmup 0.1 x 4 steps rounds to 0: still valid
    steps = run_in_process(recipe)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in steps)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000002", "step-00000004"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    ds = json.loads((out / "deepspeed.json").read_text())
    assert (ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == (4, 1)
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert (state["step"], state["loader"]["seed"], state["loader"]["step"]) == (4, 3, 4)
    assert (out / "tensorboard").is_dir()  # the recipe keeps TensorBoard on
