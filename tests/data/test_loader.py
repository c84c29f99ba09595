"""Packed loader: pack tensors vs the stored tokens and the template, rank sharding, loss denominators, exact
resume (mid-epoch, with workers, across world sizes), tail policies, step balancing, worker determinism."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtune.data.batch import IGNORE_INDEX, PackedBatch
from vlmtune.data.loader import (
    CostModel,
    LoaderError,
    OfflinePackSource,
    PackedLoader,
    StepInfo,
    assign_packs,
    imbalance_figures,
)
from vlmtune.data.pack_output import ImageRecord, PackReader, SampleRecord, ShardWriter, write_pack_output
from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
from vlmtune.train.loss import count_supervision, segment_ids_from_cu_seqlens, shift_labels

# A miniature chat template with Kimi-VL's structure (ids stand in for the special tokens).
IM_SYSTEM, IM_USER, IM_ASSISTANT, IM_MIDDLE, IM_END = 1, 2, 3, 4, 5
MEDIA_START, MEDIA_CONTENT, MEDIA_PAD, MEDIA_END = 6, 7, 8, 9
ROLE_WORD = {IM_SYSTEM: 10, IM_USER: 11, IM_ASSISTANT: 12}
IMAGE_WORD = 13
PAD_ID = 0


PROC = KimiVLImageProcessor.kimi_vl_a3b()  # pad to multiples of 28 px: grid = 2 ceil(H/28) x 2 ceil(W/28)


def _block(role: int, body: list[int], supervised: bool) -> tuple[list[int], list[bool]]:
    ids = [role, ROLE_WORD[role], IM_MIDDLE, *body, IM_END]
    mask = [False, False, False, *([supervised] * len(body)), supervised]  # content + closing <|im_end|>
    return ids, mask


def make_sample(rng: random.Random, image_sizes: list[tuple[int, int]], turns: int = 1) -> dict[str, Any]:
    """Tokens and label mask of one templated sample; image_sizes = (width, height) of its images."""
    ids, mask = _block(IM_SYSTEM, [rng.randrange(100, 1000) for _ in range(3)], False)
    spans = []
    for turn in range(turns):
        body: list[int] = []
        if turn == 0:
            for width, height in image_sizes:
                h, w = PROC.grid_hw(width, height)
                body += [MEDIA_START, IMAGE_WORD, MEDIA_CONTENT]
                spans.append((len(ids) + 3 + len(body), len(ids) + 3 + len(body) + h * w // 4))
                body += [MEDIA_PAD] * (h * w // 4) + [MEDIA_END]
        body += [rng.randrange(100, 1000) for _ in range(rng.randrange(2, 12))]
        for role, sup, n in ((IM_USER, False, 0), (IM_ASSISTANT, True, rng.randrange(1, 30))):
            b = body if role == IM_USER else [rng.randrange(100, 1000) for _ in range(n)]
            x, m = _block(role, b, sup)
            ids += x
            mask += m
    return {"ids": np.array(ids, np.int32), "mask": np.array(mask, np.uint8), "spans": spans}


def build_pack_output(
    out: Path,
    samples: list[tuple[list[tuple[int, int]], int]],
    packing_length: int,
    packs: list[list[int]] | None = None,
    seed: int = 0,
) -> Path:
    """Write a real pack output (shards, samples.jsonl, manifest) with real PNGs.

    Args:
        samples: per sample, (image sizes, turns).
        packs: explicit packs (sample indices); default first-fit-decreasing into packing_length.
    """
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / "img").mkdir(exist_ok=True)
    writer = ShardWriter(out, shard_tokens=300)  # several shards
    records = []
    for k, (sizes, turns) in enumerate(samples):
        s = make_sample(rng, sizes, turns)
        writer.add(s["ids"], s["mask"])
        images = []
        for j, (width, height) in enumerate(sizes):
            path = out.parent / "img" / f"{out.name}-{k}-{j}.png"
            color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            Image.new("RGB", (width, height), color).save(path)
            images.append(ImageRecord({"path": str(path)}, PROC.grid_hw(width, height)))
        records.append(
            SampleRecord(
                index=k, dataset=0, source="/data/train.jsonl", location=k + 1, location_kind="line",
                sample_id=f"s{k}", images=tuple(images), num_tokens=len(s["ids"]),
                num_patches=sum(im.num_patches for im in images), truncated=False, image_spans=tuple(s["spans"]),
            )
        )
    if packs is None:
        packs, room = [], []
        for k in sorted(range(len(records)), key=lambda k: -records[k].num_tokens):
            n = records[k].num_tokens
            assert n <= packing_length
            for b, r in enumerate(room):
                if r >= n:
                    packs[b].append(k)
                    room[b] -= n
                    break
            else:
                packs.append([k])
                room.append(packing_length - n)
    write_pack_output(
        out, records, writer.close(), packs, {"packing_length": packing_length, "max_vision_patches": None}, [], {}
    )
    return out


def random_samples(n: int, seed: int, image_rate: float = 0.6) -> list[tuple[list[tuple[int, int]], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice([0, 1, 1, 2]) if rng.random() < image_rate else 0
        out.append(([(rng.randrange(20, 90), rng.randrange(20, 90)) for _ in range(k)], rng.choice([1, 1, 2])))
    return out


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 24 packs of <= 160 tokens from 70 samples (0-2 images each)."""
    return build_pack_output(tmp_path_factory.mktemp("loader") / "packs", random_samples(70, seed=1), 160)


def run_steps(loader: PackedLoader, steps: int) -> list[tuple[list[PackedBatch], StepInfo]]:
    """The next `steps` optimizer steps, crossing epochs."""
    out: list[tuple[list[PackedBatch], StepInfo]] = []
    while len(out) < steps:
        for item in loader:
            out.append(item)
            if len(out) == steps:
                break
    return out


def make_loader(path: Path, **kw: Any) -> PackedLoader:
    args: dict[str, Any] = dict(
        micro_batch_size=1, global_batch_size=4, world_size=1, rank=0, seed=3, pad_to_length=None,
        pad_token_id=PAD_ID, num_workers=0, balance=False, image_processor=PROC,
    )
    args.update(kw)
    return PackedLoader(OfflinePackSource(path), **args)


def assert_batches_equal(a: PackedBatch, b: PackedBatch) -> None:
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "image_grid_hws"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.max_seqlen == b.max_seqlen and a.sample_ids == b.sample_ids and a.num_padding == b.num_padding


def assert_runs_equal(a: list[tuple[list[PackedBatch], StepInfo]], b: list[tuple[list[PackedBatch], StepInfo]]) -> None:
    assert len(a) == len(b)
    for (ba, ia), (bb, ib) in zip(a, b):
        assert ia == ib
        assert len(ba) == len(bb)
        for x, y in zip(ba, bb):
            assert_batches_equal(x, y)


# ----------------------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("pad", [None, 160])
def test_pack_tensors_match_stored_tokens_images_and_template(packs: Path, pad: int | None) -> None:
    reader = PackReader(packs)
    loader = make_loader(packs, micro_batch_size=2, global_batch_size=4, pad_to_length=pad)
    checked_samples = checked_images = 0
    for batches, info in run_steps(loader, 4):
        assert len(batches) == 2
        for batch, pack_ids in zip(batches, info.rank_pack_ids):
            expected_ids = [i for p in pack_ids for i in reader.pack_indices(p)]
            assert batch.sample_ids == expected_ids
            seqlens = batch.seqlens
            real = sum(seqlens[: len(expected_ids)])
            assert batch.num_padding == (2 * pad - real if pad else 0)
            assert batch.num_tokens == (2 * pad if pad else real)
            assert batch.max_seqlen == max(seqlens)
            assert batch.cu_seqlens.dtype == torch.int32
            pv_offset = 0
            for k, idx in enumerate(expected_ids):
                s, e = int(batch.cu_seqlens[k]), int(batch.cu_seqlens[k + 1])
                ids, mask = reader.sample_tokens(idx)
                assert torch.equal(batch.input_ids[0, s:e], torch.from_numpy(ids.astype(np.int64)))
                assert torch.equal(batch.position_ids[0, s:e], torch.arange(e - s))
                labels = batch.labels[0, s:e]
                # template: supervised = exactly the assistant content and its closing <|im_end|>
                x = ids.tolist()
                want = torch.full((e - s,), IGNORE_INDEX)
                t = 0
                while t < len(x):
                    if x[t] == IM_ASSISTANT and x[t + 2] == IM_MIDDLE:
                        t += 3
                        while x[t] != IM_END:
                            want[t] = x[t]
                            t += 1
                        want[t] = IM_END
                    t += 1
                assert torch.equal(labels, want)
                assert labels[0] == IGNORE_INDEX  # never a sample's first token
                assert torch.equal(labels != IGNORE_INDEX, torch.from_numpy(mask) & (torch.arange(e - s) > 0))
                ends = [t for t in range(e - s) if x[t] == IM_END and mask[t]]
                assert ends and all(labels[t] == IM_END for t in ends)
                record = reader.sample(idx)
                for (a, b), im in zip(record.image_spans, record.images):
                    assert torch.all(batch.input_ids[0, s + a : s + b] == MEDIA_PAD)
                    n = im.num_patches
                    want_pv = PROC([reader.open_image(im.ref)])["pixel_values"]
                    assert torch.equal(batch.pixel_values[pv_offset : pv_offset + n], want_pv)
                    pv_offset += n
                    checked_images += 1
                checked_samples += 1
            assert pv_offset == batch.num_patches
            if pad:
                assert torch.all(batch.labels[0, real:] == IGNORE_INDEX)
                assert torch.all(batch.input_ids[0, real:] == PAD_ID)
    assert checked_samples > 20 and checked_images > 5


def test_processed_grid_must_equal_stored_grid(packs: Path) -> None:
    cropping = KimiVLImageProcessor.kimi_vl_a3b(pad_input=False)  # other settings than the packs were made with
    loader = make_loader(packs, image_processor=cropping)
    with pytest.raises(LoaderError, match=r"sample \d+ .*patch grids \[.*\] but the packs were counted with .*Re-run"):
        run_steps(loader, 3)
    with pytest.raises(LoaderError, match="no image_processor"):
        run_steps(make_loader(packs, image_processor=None), 3)


# ----------------------------------------------------------------------------------------------- ranks


def test_ranks_share_each_global_step_disjointly_whatever_the_world_size(packs: Path) -> None:
    steps = 14  # crosses two epoch boundaries (about 24 packs, G = 8)
    reference: list[Counter[int]] | None = None
    for world in (1, 2, 4):
        per_rank = [
            run_steps(make_loader(packs, micro_batch_size=1, global_batch_size=8, world_size=world, rank=r), steps)
            for r in range(world)
        ]
        step_sets = []
        for k in range(steps):
            infos = [per_rank[r][k][1] for r in range(world)]
            assert all(i.pack_ids == infos[0].pack_ids for i in infos)  # every rank knows the whole step
            micro_counts = {len(per_rank[r][k][0]) for r in range(world)}
            assert micro_counts == {8 // world}  # same number of micro-batches on every rank
            rank_packs = [Counter(p for m in i.rank_pack_ids for p in m) for i in infos]
            union = sum(rank_packs, Counter())
            assert union == Counter(infos[0].pack_ids)  # disjoint shares that cover the step
            samples = Counter(s for r in range(world) for b in per_rank[r][k][0] for s in b.sample_ids)
            reader = PackReader(packs)
            assert samples == Counter(s for p in infos[0].pack_ids for s in reader.pack_indices(p))
            step_sets.append(Counter(infos[0].pack_ids))
        if reference is None:
            reference = step_sets
        assert step_sets == reference  # the same global batches at world size 1, 2 and 4


def test_step_info_totals_equal_the_sum_over_all_ranks_batches(packs: Path) -> None:
    world = 2
    runs = [
        run_steps(make_loader(packs, micro_batch_size=2, global_batch_size=8, world_size=world, rank=r,
                              pad_to_length=160, balance=True), 5)
        for r in range(world)
    ]
    for k in range(5):
        info = runs[0][k][1]
        tok = samp = packed = real = pad = patches = 0
        sqrt_sum = 0.0
        for r in range(world):
            for batch in runs[r][k][0]:
                targets = shift_labels(batch.labels, batch.cu_seqlens)[0]
                seg = segment_ids_from_cu_seqlens(batch.cu_seqlens, batch.num_tokens)
                t, s, q = count_supervision(targets, seg)
                tok, samp, sqrt_sum = tok + t, samp + s, sqrt_sum + q
                packed += batch.num_samples
                real += batch.num_tokens - batch.num_padding
                pad += batch.num_padding
                patches += batch.num_patches
        assert info.num_supervised_tokens == tok and info.num_samples == samp
        assert math.isclose(info.sum_sqrt_supervised, sqrt_sum, rel_tol=1e-12)
        assert (info.num_packed_samples, info.num_tokens, info.num_padding, info.num_patches) == (
            packed, real, pad, patches)
        assert info.denominators == (tok, samp, info.sum_sqrt_supervised)
        assert tok > 50
        assert runs[1][k][1] == dataclasses.replace(info, rank_pack_ids=runs[1][k][1].rank_pack_ids)


# ----------------------------------------------------------------------------------------------- epochs


def test_carry_tail_uses_every_pack_once_per_epoch_and_drop_tail_drops_the_remainder(packs: Path) -> None:
    n = len(PackReader(packs))
    G = 8
    loader = make_loader(packs, global_batch_size=G)
    assert len(loader) == loader.steps_per_epoch() == math.ceil(n / G)
    epochs = 3
    total = -(-epochs * n // G)  # steps whose first pack lies in the first 3 epochs
    stream = [p for _, info in run_steps(loader, total) for p in info.pack_ids]
    for e in range(epochs):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))  # a permutation per epoch, tail carried
        assert stream[e * n : (e + 1) * n] == np.random.default_rng(3 + e).permutation(n).tolist()
    infos = [info for _, info in run_steps(make_loader(packs, global_batch_size=G), total)]
    assert [i.epoch for i in infos] == [k * G // n for k in range(total)]

    drop = make_loader(packs, global_batch_size=G, tail="drop")
    assert len(drop) == n // G
    got = run_steps(drop, 2 * (n // G))
    for e in range(2):
        ids = [p for _, info in got[e * (n // G) : (e + 1) * (n // G)] for p in info.pack_ids]
        assert len(set(ids)) == len(ids) == (n // G) * G
        assert ids == np.random.default_rng(3 + e).permutation(n)[: len(ids)].tolist()
        assert {info.epoch for _, info in got[e * (n // G) : (e + 1) * (n // G)]} == {e}


def test_carry_with_fewer_packs_than_a_global_batch_still_uses_each_pack_once_per_epoch(packs: Path) -> None:
    n = len(PackReader(packs))
    G = 64  # more than the packs of one epoch: a step spans several epochs
    steps = n // math.gcd(n, G)  # the first steps that end exactly at an epoch's end
    epochs = steps * G // n
    infos = [info for _, info in run_steps(make_loader(packs, global_batch_size=G), steps)]
    counts = Counter(p for info in infos for p in info.pack_ids)
    assert epochs > 2 and counts == Counter({p: epochs for p in range(n)})
    assert [i.epoch for i in infos] == [k * G // n for k in range(steps)]


def test_len_and_iteration_after_break_continue_from_the_next_step(packs: Path) -> None:
    loader = make_loader(packs, global_batch_size=4)
    per_epoch = loader.steps_per_epoch()
    first = []
    for item in loader:
        first.append(item)
        if len(first) == 2:
            break
    assert len(loader) == per_epoch - 2 and loader.step == 2
    rest = list(loader)
    assert [i.step for _, i in rest] == list(range(2, per_epoch))
    assert loader.epoch == 1 and loader.step == per_epoch


# ----------------------------------------------------------------------------------------------- resume


def test_resume_mid_epoch_with_workers_continues_with_exactly_the_remaining_batches(packs: Path) -> None:
    kw = dict(micro_batch_size=2, global_batch_size=4, balance=True, pad_to_length=160)
    total = 16  # about 2.7 epochs of 6 steps
    reference = run_steps(make_loader(packs, **kw), total)
    for cut, workers in ((3, 2), (6, 0), (11, 2)):
        first = make_loader(packs, num_workers=workers, **kw)
        head = run_steps(first, cut)
        assert_runs_equal(head, reference[:cut])
        state = first.state_dict()
        assert state["step"] == cut
        resumed = make_loader(packs, num_workers=workers, **kw)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # plain JSON, as a checkpoint stores it
        assert_runs_equal(run_steps(resumed, total - cut), reference[cut:])


def test_resume_on_another_world_size_continues_with_the_same_global_steps(packs: Path) -> None:
    kw = dict(micro_batch_size=1, global_batch_size=8, balance=True)
    cut, more = 4, 5
    saved = make_loader(packs, world_size=2, rank=1, **kw)
    run_steps(saved, cut)
    state = saved.state_dict()
    reference = run_steps(make_loader(packs, world_size=1, rank=0, **kw), cut + more)[cut:]
    runs = []
    for r in range(4):
        loader = make_loader(packs, world_size=4, rank=r, **kw)
        loader.load_state_dict(state)
        runs.append(run_steps(loader, more))
    for k in range(more):
        ref_batches, ref_info = reference[k]
        assert runs[0][k][1].pack_ids == ref_info.pack_ids and runs[0][k][1].step == cut + k
        assert Counter(s for r in range(4) for b in runs[r][k][0] for s in b.sample_ids) == Counter(
            s for b in ref_batches for s in b.sample_ids)


def test_resume_refuses_a_state_from_another_seed_or_global_batch(packs: Path) -> None:
    state = make_loader(packs, global_batch_size=4).state_dict()
    with pytest.raises(LoaderError, match="train.seed=3"):
        make_loader(packs, global_batch_size=4, seed=4).load_state_dict(state)
    with pytest.raises(LoaderError, match="train.global_batch_size=4"):
        make_loader(packs, global_batch_size=8).load_state_dict(state)


def test_zero_and_two_workers_give_identical_batches(packs: Path) -> None:
    kw = dict(micro_batch_size=2, global_batch_size=8, world_size=2, rank=1, balance=True)
    assert_runs_equal(run_steps(make_loader(packs, num_workers=0, **kw), 5),
                      run_steps(make_loader(packs, num_workers=2, **kw), 5))


def test_settings_that_cannot_work_fail_with_the_fix(packs: Path) -> None:
    with pytest.raises(LoaderError, match="not a multiple of train.micro_batch_size 2 x world size 2"):
        make_loader(packs, micro_batch_size=2, global_batch_size=6, world_size=2)
    with pytest.raises(LoaderError, match="pad_to_length=100 is shorter than the longest pack"):
        make_loader(packs, pad_to_length=100)
    with pytest.raises(LoaderError, match="tail='drop' with"):
        make_loader(packs, global_batch_size=64, tail="drop")


# ----------------------------------------------------------------------------------------------- balancing


def test_assign_packs_is_exact_and_balances_ranks_and_micro_steps() -> None:
    costs = [100.0, 90, 80, 70, 1, 1, 1, 1]
    plain = assign_packs(costs, world_size=2, micro_batch_size=1, balance=False)
    assert plain == [[[0], [1], [2], [3]], [[4], [5], [6], [7]]]
    assert imbalance_figures(costs, plain) == ([340.0, 4.0], 340 / 172, 340 / 172)
    bal = assign_packs(costs, world_size=2, micro_batch_size=1, balance=True)
    # micro-step 0: 100 | 90; step 1: 80 to rank 1 (90 so far) and 70 to rank 0; then the 1s
    assert bal == [[[0], [3], [4], [6]], [[1], [2], [5], [7]]]
    assert imbalance_figures(costs, bal) == ([172.0, 172.0], 1.0, (100 + 80 + 1 + 1) / 172)

    costs = [100.0, 1, 1, 1, 50, 50, 2, 3]
    bal = assign_packs(costs, world_size=2, micro_batch_size=2, balance=True)
    assert bal == [[[0, 7], [1, 2]], [[4, 5], [3, 6]]]
    assert all(len(m) == 2 for r in bal for m in r)
    assert imbalance_figures(costs, bal)[0] == [105.0, 103.0]


def test_cost_model_defaults_match_kimi_vl_a3b_flops() -> None:
    from vlmtune.models.kimi_vl.configuration import kimi_vl_a3b

    derived = CostModel.from_config(kimi_vl_a3b())
    default = CostModel()
    for name in ("token", "patch", "attention", "vision_attention"):
        assert getattr(default, name) == pytest.approx(getattr(derived, name), rel=0.01), name
    assert default.cost([4096], []) == pytest.approx(4096 + 2.68e-5 * 4096**2)
    assert default.cost([10], [(2, 4)], padding=6) == pytest.approx(16 + 0.163 * 8 + 2.68e-5 * 100 + 2.41e-5 * 64)


def test_balancing_reduces_the_imbalance_on_a_skewed_set(tmp_path: Path) -> None:
    # 32 packs: every fourth holds one long sample with two large images, the others one short text sample,
    # laid out so that the epoch-0 permutation (seed 0) puts every heavy pack in rank 0's contiguous share.
    samples = []
    for k in range(32):
        heavy = k % 4 == 0
        samples.append(([(84, 84), (84, 84)] if heavy else [], 2 if heavy else 1))
    order = [k for k in range(32) if k % 4 == 0] + [k for k in range(32) if k % 4]
    perm = np.random.default_rng(0).permutation(32)
    packs: list[list[int]] = [[] for _ in range(32)]
    for position, k in enumerate(order):
        packs[perm[position]] = [k]
    path = build_pack_output(tmp_path / "skew", samples, 400, packs=packs, seed=5)
    figures = {}
    for balance in (False, True):
        infos = []
        for r in range(4):
            loader = PackedLoader(OfflinePackSource(path), micro_batch_size=1, global_batch_size=32, world_size=4,
                                  rank=r, seed=0, pad_to_length=None, pad_token_id=0, num_workers=0,
                                  balance=balance, image_processor=PROC, tail="drop")
            (info,) = loader.epoch_infos()  # plan only (one step: 32 packs, G = 32)
            assert loader.step == 0
            infos.append(info)
        assert len({i.rank_costs for i in infos}) == 1  # every rank computes the same figures
        figures[balance] = infos[0]
    plain, balanced = figures[False], figures[True]
    assert plain.imbalance > 1.8 and plain.microstep_imbalance > 1.8  # measured 1.907 and 1.907
    assert balanced.imbalance < 1.01 and balanced.microstep_imbalance < 1.1  # measured 1.003 and 1.070
    assert plain.imbalance / balanced.imbalance > 1.8


# ----------------------------------------------------------------------------------------------- real pipeline


@pytest.fixture(scope="module")
def demo_pack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`vlmtune pack` over the demo data with a trained tiny tokenizer and the Kimi-VL-A3B image processor."""
    from data_tools.demo_data import generate_demo_data
    from vlmtune.data.formats import DatasetSpec
    from vlmtune.data.pack_cli import PackSettings, build_pack
    from vlmtune.models.kimi_vl.tokenization import build_tokenizer_files

    root = tmp_path_factory.mktemp("demo_pack")
    generate_demo_data(root / "demo", samples=40, eval_samples=6, seed=1)
    tokenizer = build_tokenizer_files(root / "model", (root / "demo" / "train.jsonl").read_text(), 120)
    processor = KimiVLImageProcessor.kimi_vl_a3b(in_token_limit=1024)
    processor.save_pretrained(root / "model")
    build_pack([DatasetSpec(root / "demo" / "train.jsonl")],
               PackSettings(model_dir=root / "model", out=root / "packs", packing_length=1536, progress=False))
    return {"packs": root / "packs", "tokenizer": tokenizer, "processor": processor}


def test_real_pack_tensors_match_inspect_pack_and_the_chat_template(demo_pack: dict[str, Any]) -> None:
    from vlmtune.data.pack_cli import describe_pack

    reader = PackReader(demo_pack["packs"])
    tok = demo_pack["tokenizer"]
    loader = PackedLoader(demo_pack["packs"], micro_batch_size=1, global_batch_size=1, seed=0, pad_to_length=1536,
                          pad_token_id=tok.pad_id, num_workers=0, balance=False,
                          image_processor=demo_pack["processor"])
    seen = 0
    for batches, info in loader:  # one epoch: every pack once
        (batch,) = batches
        rows = describe_pack(reader, info.pack_ids[0])
        assert batch.sample_ids == [row["index"] for row in rows]
        assert batch.num_tokens == 1536 and batch.num_padding == 1536 - rows[-1]["positions"][1]
        assert batch.image_grid_hws.tolist() == [list(g) for row in rows for g in row["grids"]]
        pads = (batch.input_ids[0] == tok.media_pad_id).nonzero().flatten().tolist()
        assert pads == [t for row in rows for s, e in row["image_spans"] for t in range(s, e)]
        for k, row in enumerate(rows):
            s, e = row["positions"]
            assert (int(batch.cu_seqlens[k]), int(batch.cu_seqlens[k + 1])) == (s, e)
            labels = batch.labels[0, s:e]
            sup = labels != IGNORE_INDEX
            assert int(sup.sum()) == row["supervised"] and not bool(sup[0])
            assert batch.input_ids[0, s] == tok.im_system_id
            runs = " ".join(f"{'+' if v else '-'}{n}" for v, n in _runs(sup.tolist()))
            assert runs == row["label_runs"]
            record = reader.sample(row["index"])
            line = Path(record.source).read_text().splitlines()[record.location - 1]
            answers = [m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant"]
            # labels supervise exactly each assistant answer and its closing <|im_end|>, as the template renders
            assert tok.decode(labels[sup].tolist()) == "".join(f"{a}<|im_end|>" for a in answers)
            assert torch.equal(labels[sup], batch.input_ids[0, s:e][sup])
            seen += 1
    assert seen == 40 and loader.epoch == 1


def _runs(values: list[bool]) -> list[tuple[bool, int]]:
    out: list[tuple[bool, int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out
