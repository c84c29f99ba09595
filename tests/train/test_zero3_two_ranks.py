"""Two ranks under ZeRO-3 (torchrun + gloo) where one rank's packs hold no image: no hang, the same per-step losses as
one rank on the same global batches, and the router-bias sign rule applied identically on every rank.

The data makes every pack hold exactly one sample (each sample is longer than half a pack): 4 with an image, 12 text
only. A step takes 4 packs (micro 1 x 2 ranks x accumulation 2), and the test checks from the loader's plan that some
steps give one rank images while the other rank sees text only, so ZeRO-3 must gather the vision tower on a rank that
has nothing to encode (it runs a dummy image contributing an exact zero).

Plan of the 4 steps (rank 0 has an image, rank 1 has an image): (yes, no), (yes, yes), (yes, no), (no, no).
Measured (fp32): two ranks vs one, max per-step loss difference 1.2e-7, grad_norm 4e-8 relative; router biases
bit-identical across ranks and equal to the one-rank run's. About 20 s in all (the 2-rank run ~8 s).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from tests.train.conftest import (
    PYTHON,
    SCRIPTS,
    Assets,
    pack_data,
    read_steps,
    recipe_dict,
    run_cli,
    torchrun,
    write_recipe,
)

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # two processes, ~20 s

STEPS = 4
RATE = 1e-3  # train.router_bias_update_rate
TIMEOUT = 300  # a hang ends the test (and collective_timeout_s ends the ranks) instead of blocking the suite


def _mixed_data(folder: Path, image: Path) -> Path:
    """16 single-sample packs' worth of VQA-like samples: 4 with one image, 12 text only, each 300-420 tokens."""
    from data_tools.demo_data import _vocabulary

    words = [w for w in _vocabulary() if w.isalpha()]
    rng = random.Random(0)
    folder.mkdir(parents=True)
    shutil.copy(image, folder / "img.png")
    rows = []
    for i in range(16):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(260, 360)))
        content: list[dict] = [{"type": "text", "text": text}]
        if i % 4 == 0:
            content.insert(0, {"type": "image", "image": "img.png"})
        rows.append({"id": f"s{i}", "messages": [{"role": "user", "content": content},
                                                 {"role": "assistant", "content": rng.choice(words)}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def runs(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same recipe on 1 rank (accumulation 4) and on 2 ranks (accumulation 2); name -> output dir."""
    root = tmp_path_factory.mktemp("two_ranks")
    image = next(p for p in sorted((assets.train_file.parent / "images").iterdir()) if p.suffix == ".png")
    train_file = _mixed_data(root / "data", image)
    packs = pack_data(assets.model, train_file, root / "packs")
    data = Assets(assets.model, train_file, packs)
    out = {}
    for name, launcher in (("one", [PYTHON]), ("two", torchrun(2))):
        recipe = recipe_dict(data, root / name, deepspeed={"zero_stage": 3},
                             train={"max_steps": STEPS, "router_bias_update_rate": RATE, "seed": 0},
                             launch={"collective_timeout_s": 120})
        path = write_recipe(root / f"{name}.yaml", recipe)
        res = run_cli([str(SCRIPTS / "train_dump_bias.py"), str(root / name / "bias"), str(path)], TIMEOUT, launcher)
        assert res.returncode == 0, res.stderr[-4000:]
        out[name] = root / name
    out["packs"] = packs
    out["model"] = assets.model
    return out


def test_one_rank_sees_text_only(runs: dict[str, Path]) -> None:
    """The plan really gives one rank no image in some step while the other rank has one."""
    from vlmtune.data.loader import OfflinePackSource, PackedLoader

    source = OfflinePackSource(runs["packs"])
    assert len(source) == 16 and all(len(source.pack_samples(i)) == 1 for i in range(16))
    has_image = [any(source.sample_meta(s).grids for s in source.pack_samples(i)) for i in range(16)]
    assert sum(has_image) == 4
    per_rank = [PackedLoader(source, micro_batch_size=1, global_batch_size=4, world_size=2, rank=r, seed=0,
                             balance=True).epoch_infos()[:STEPS] for r in (0, 1)]
    split = [tuple(any(has_image[p] for micro in info.rank_pack_ids for p in micro) for info in infos)
             for infos in zip(*per_rank)]
    assert (True, False) in split or (False, True) in split, split
    assert all(len(infos) == STEPS for infos in per_rank)


def test_two_ranks_match_one(runs: dict[str, Path]) -> None:
    one, two = read_steps(runs["one"]), read_steps(runs["two"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-5)
        assert (a["tokens"], a["supervised_tokens"], a["samples"]) == (b["tokens"], b["supervised_tokens"],
                                                                       b["samples"])
    assert json.loads((runs["two"] / "deepspeed.json").read_text())["gradient_accumulation_steps"] == 2
    assert json.loads((runs["one"] / "deepspeed.json").read_text())["gradient_accumulation_steps"] == 4


def test_router_bias_update_is_identical_on_every_rank(runs: dict[str, Path]) -> None:
    """The sign rule moves each expert's bias by +-RATE (or 0) per step from the load summed over ranks, so both
    ranks hold the same fp32 bias, equal to the one-rank run's; the bias never went through the optimizer."""
    r0, r1 = (torch.load(runs["two"] / "bias" / f"bias-rank{r}.pt") for r in (0, 1))
    single = torch.load(runs["one"] / "bias" / "bias-rank0.pt")
    assert sorted(r0) == sorted(r1) == sorted(single) and len(r0) == 2  # the two MoE layers of kimi_vl_tiny
    for name in r0:
        assert r0[name].dtype == torch.float32
        assert torch.equal(r0[name], r1[name]), name
        assert torch.equal(r0[name], single[name]), name
        steps_moved = r0[name] / RATE  # each entry is a sum of STEPS signs
        assert torch.allclose(steps_moved, steps_moved.round(), atol=1e-3)
        assert steps_moved.abs().max() <= STEPS and steps_moved.abs().sum() > 0
    assert (runs["one"] / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:08d}"
