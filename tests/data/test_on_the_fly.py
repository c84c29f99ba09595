"""On-the-fly packing through the real pipeline (demo data, trained tiny tokenizer, Kimi-VL image processor):
same samples as the offline pack output, budgets, exact resume with the packer's open buffers, world-size change."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from data_tools.demo_data import generate_demo_data
from tests.data.test_loader import run_steps
from vlmtune.data.batch import PackedBatch
from vlmtune.data.formats import DatasetSpec
from vlmtune.data.loader import LoaderError, OfflinePackSource, PackedLoader, StepInfo
from vlmtune.data.on_the_fly import OnTheFlySource
from vlmtune.data.pack_cli import PackSettings, build_pack
from vlmtune.data.pack_output import PackReader
from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
from vlmtune.models.kimi_vl.tokenization import KimiTokenizer, build_tokenizer_files

L = 1024
WINDOW = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Demo data (two datasets, weights 1 and 1.5), a tiny model folder, the offline pack and the on-the-fly source."""
    root = tmp_path_factory.mktemp("otf")
    generate_demo_data(root / "demo", samples=60, eval_samples=20, seed=0)
    corpus = (root / "demo" / "train.jsonl").read_text()
    build_tokenizer_files(root / "model", corpus, 200)
    processor = KimiVLImageProcessor.kimi_vl_a3b(in_token_limit=1024)
    processor.save_pretrained(root / "model")
    specs = [
        DatasetSpec(root / "demo" / "train.jsonl", 1.0, "auto", None),
        DatasetSpec(root / "demo" / "eval.jsonl", 1.5, "auto", None),
    ]
    build_pack(specs, PackSettings(model_dir=root / "model", out=root / "packs", packing_length=L, seed=7,
                                   progress=False, cache_dir=root / "cache"))
    source = OnTheFlySource.from_datasets(specs, root / "model", packing_length=L, window=WINDOW, mixing_seed=7,
                                          cache_dir=root / "cache")
    return {"root": root, "specs": specs, "processor": processor, "packs": root / "packs", "source": source,
            "tokenizer": KimiTokenizer.from_pretrained(root / "model")}


def loader_for(world: dict[str, Any], source: Any, **kw: Any) -> PackedLoader:
    args: dict[str, Any] = dict(micro_batch_size=1, global_batch_size=1, world_size=1, rank=0, seed=11,
                                pad_to_length=None, pad_token_id=0, num_workers=0, balance=False,
                                image_processor=world["processor"])
    args.update(kw)
    return PackedLoader(source, **args)


def assert_runs_equal(a: list[tuple[list[PackedBatch], StepInfo]], b: list[tuple[list[PackedBatch], StepInfo]]) -> None:
    assert len(a) == len(b)
    for (ba, ia), (bb, ib) in zip(a, b):
        assert ia == ib and len(ba) == len(bb)
        for x, y in zip(ba, bb):
            for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "image_grid_hws"):
                u, v = getattr(x, name), getattr(y, name)
                assert (u is None) == (v is None) and (u is None or torch.equal(u, v)), name
            assert x.sample_ids == y.sample_ids and x.max_seqlen == y.max_seqlen


def test_source_holds_what_vlmtune_pack_selected(world: dict[str, Any]) -> None:
    source: OnTheFlySource = world["source"]
    reader = PackReader(world["packs"])
    assert source.num_samples == reader.num_samples == 80
    stats = reader.stats
    assert source.accounting is not None and source.accounting.to_json()["pack_entries"] == stats["pack_entries"]
    assert len(source.entries) == 60 + 30 == stats["pack_entries"]  # 20 eval samples x 1.5
    for k in range(source.num_samples):
        ids, mask = reader.sample_tokens(k)
        sample = source.samples[k].sample
        assert np.array_equal(ids, sample.input_ids) and np.array_equal(mask, sample.label_mask.astype(bool))
        assert source.sample_meta(k) == OfflinePackSource(reader).sample_meta(k)


def test_on_the_fly_and_offline_yield_the_same_samples_every_epoch(world: dict[str, Any]) -> None:
    source: OnTheFlySource = world["source"]
    want = Counter(source.entries.tolist())
    offline = loader_for(world, OfflinePackSource(world["packs"]))
    on_the_fly = loader_for(world, source)
    by_sample: dict[int, PackedBatch] = {}
    for epoch in range(2):
        got = {}
        for name, loader in (("offline", offline), ("on_the_fly", on_the_fly)):
            assert loader.epoch == epoch
            ids: Counter[int] = Counter()
            for batches, info in loader:  # one epoch (G = 1: epochs end exactly)
                assert info.epoch == epoch
                for b in batches:
                    assert b.num_tokens <= L
                    ids.update(b.sample_ids)
                    for sid, seg in _segments(b, source):  # a sample's tensors are the same in both modes
                        _assert_same_segment(by_sample.setdefault(sid, seg), seg)
            got[name] = ids
        assert got["offline"] == got["on_the_fly"] == want
    assert len(by_sample) == 80


def _segments(batch: PackedBatch, source: OnTheFlySource) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """Per sample of a batch: its tokens, labels and pixel values (patch offsets from its stored grids)."""
    out, patch = [], 0
    for k, sid in enumerate(batch.sample_ids):
        s, e = int(batch.cu_seqlens[k]), int(batch.cu_seqlens[k + 1])
        n = sum(h * w for h, w in source.samples[sid].sample.grids)
        pv = batch.pixel_values[patch : patch + n] if n else torch.zeros(0)
        patch += n
        out.append((sid, {"ids": batch.input_ids[0, s:e], "labels": batch.labels[0, s:e], "pv": pv}))
    assert patch == batch.num_patches
    return out


def _assert_same_segment(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["labels"], b["labels"]) and torch.equal(a["pv"], b["pv"])


def test_windowed_packs_respect_the_budget_and_fill(world: dict[str, Any]) -> None:
    source: OnTheFlySource = world["source"]
    schedule = source.schedule(seed=11, global_batch_size=1, tail="carry")
    packs = []
    while True:
        plan = schedule.next_plan()
        if plan.epoch > 0:
            break
        packs.append(plan.packs[0])
    tokens = [int(source.tokens[list(p)].sum()) for p in packs]
    assert max(tokens) <= L
    assert Counter(i for p in packs for i in p) == Counter(source.entries.tolist())
    lower = -(-int(source.tokens[source.entries].sum()) // L)
    assert len(packs) <= lower + 2  # a window of 16 samples still packs near the bound


@pytest.mark.parametrize("tail", ["carry", "drop"])
def test_resume_keeps_the_packers_open_buffers_and_continues_exactly(world: dict[str, Any], tail: str) -> None:
    source: OnTheFlySource = world["source"]
    kw: dict[str, Any] = dict(micro_batch_size=1, global_batch_size=2, balance=True, tail=tail)
    total = 14
    reference = run_steps(loader_for(world, source, **kw), total)
    buffered = 0
    for cut, workers in ((2, 2), (5, 0), (9, 0)):
        first = loader_for(world, source, num_workers=workers, **kw)
        assert_runs_equal(run_steps(first, cut), reference[:cut])
        state = first.state_dict()
        sched = state["schedule"]
        assert state["step"] == sched["step"] == cut
        buffered += len(sched["packer"]["open"]) + len(sched["packer"]["pending"]) + len(sched["queue"])
        resumed = loader_for(world, source, num_workers=workers, **kw)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # plain JSON, as a checkpoint stores it
        assert_runs_equal(run_steps(resumed, total - cut), reference[cut:])
    assert buffered > 0  # the states did hold open packs / a partial window / queued packs
    if tail == "drop":
        for _, info in reference:
            assert len(set(info.pack_ids)) == 2


def test_resume_on_the_fly_on_another_world_size(world: dict[str, Any]) -> None:
    source: OnTheFlySource = world["source"]
    kw: dict[str, Any] = dict(micro_batch_size=1, global_batch_size=4, balance=True)
    saved = loader_for(world, source, world_size=4, rank=3, **kw)
    run_steps(saved, 3)
    state = saved.state_dict()
    reference = run_steps(loader_for(world, source, **kw), 7)[3:]
    runs = []
    for r in range(2):
        loader = loader_for(world, source, world_size=2, rank=r, **kw)
        loader.load_state_dict(state)
        runs.append(run_steps(loader, 4))
    for k in range(4):
        assert runs[0][k][1].pack_ids == reference[k][1].pack_ids
        assert Counter(s for r in range(2) for b in runs[r][k][0] for s in b.sample_ids) == Counter(
            s for b in reference[k][0] for s in b.sample_ids)


def test_offline_state_is_refused_by_an_on_the_fly_loader(world: dict[str, Any]) -> None:
    state = loader_for(world, OfflinePackSource(world["packs"])).state_dict()
    with pytest.raises(LoaderError, match="resume on the same pack output"):
        loader_for(world, world["source"]).load_state_dict(state)
