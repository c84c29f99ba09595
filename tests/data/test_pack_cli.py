"""Pack output format (manifest, shards, PackReader, atomic replace) and the `vlmtune pack` pipeline end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlmtune.data.pack_output import (
    FORMAT_VERSION,
    ImageRecord,
    PackFormatError,
    PackReader,
    SampleRecord,
    ShardWriter,
    atomic_output_dir,
    write_pack_output,
)

# ----------------------------------------------------------------------------------------------- format only


def _record(index: int, n: int, images: int = 0) -> SampleRecord:
    return SampleRecord(
        index=index,
        dataset=index % 2,
        source=f"/data/{index % 2}.jsonl",
        location=index + 1,
        location_kind="line",
        sample_id=f"id-{index}",
        images=tuple(ImageRecord({"path": f"/img/{index}-{k}.png"}, (2, 4 + 2 * k)) for k in range(images)),
        num_tokens=n,
        num_patches=sum(2 * (4 + 2 * k) for k in range(images)),
        truncated=index == 3,
        image_spans=tuple((1 + 10 * k, 3 + 10 * k) for k in range(images)),
    )


def _write(
    out: Path, lengths: list[int], shard_tokens: int = 10
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    writer = ShardWriter(out, shard_tokens)
    ids, masks, records = [], [], []
    for k, n in enumerate(lengths):
        ids.append(np.arange(100 * k, 100 * k + n, dtype=np.int32))
        masks.append((np.arange(n) % 3 == 0).astype(np.uint8))
        assert writer.add(ids[-1], masks[-1]) == k
        records.append(_record(k, n, images=k % 3))
    shards = writer.close()
    packs = [[0, 3], [1], [2, 4, 5]]
    write_pack_output(
        out, records, shards, packs, {"packing_length": 16, "max_vision_patches": None}, [], {"x": 1}
    )
    return ids, masks


def test_manifest_and_shards_round_trip(tmp_path: Path) -> None:
    lengths = [3, 4, 9, 1, 12, 2]
    ids, masks = _write(tmp_path, lengths, shard_tokens=10)
    reader = PackReader(tmp_path)
    manifest = reader.manifest
    assert manifest["version"] == FORMAT_VERSION and manifest["num_samples"] == 6 and len(reader) == 3
    # Shards never split a sample; a sample larger than a shard gets a shard of its own.
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 2, 1, 1]
    assert [s["num_tokens"] for s in manifest["shards"]] == [7, 10, 12, 2]
    assert [s["first_sample"] for s in manifest["shards"]] == [0, 2, 4, 5]
    for k in range(6):
        got_ids, got_mask = reader.sample_tokens(k)
        assert got_ids.dtype == np.int32 and got_mask.dtype == np.bool_
        np.testing.assert_array_equal(got_ids, ids[k])
        np.testing.assert_array_equal(got_mask, masks[k].astype(bool))
        assert reader.sample(k) == _record(k, lengths[k], images=k % 3)  # records round trip exactly
    assert [r.index for r in reader.pack(2)] == [2, 4, 5]
    assert reader.pack_info(0) == {"samples": [0, 3], "tokens": 4, "patches": _record(3, 1, 0).num_patches}
    assert reader.pack_info(2) == {
        "samples": [2, 4, 5],
        "tokens": 9 + 12 + 2,
        "patches": _record(2, 9, 2).num_patches
        + _record(4, 12, 1).num_patches
        + _record(5, 2, 2).num_patches,
    }
    assert reader.stats == {"x": 1}
    with pytest.raises(IndexError):
        reader.pack(3)
    with pytest.raises(IndexError):
        reader.sample_tokens(6)


def test_reader_validates_format_and_version(tmp_path: Path) -> None:
    with pytest.raises(PackFormatError, match="manifest.json missing"):
        PackReader(tmp_path)
    _write(tmp_path, [3, 3, 3, 3, 3, 3])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["version"] = FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackFormatError, match="version"):
        PackReader(tmp_path)
    manifest["version"], manifest["format"] = FORMAT_VERSION, "something-else"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackFormatError, match="format"):
        PackReader(tmp_path)


def test_reader_pickles_without_open_maps(tmp_path: Path) -> None:
    import pickle

    _write(tmp_path, [5, 5, 5, 5, 5, 5])
    reader = PackReader(tmp_path)
    before = reader.sample_tokens(4)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._shards == {}
    np.testing.assert_array_equal(clone.sample_tokens(4)[0], before[0])


def test_atomic_output_dir_replaces_and_keeps_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "packs"
    with atomic_output_dir(out) as tmp:
        _write(tmp, [2, 2, 2, 2, 2, 2])
        assert not out.exists()  # nothing visible until the end
    assert PackReader(out).num_samples == 6
    first = (out / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out) as tmp:
            _write(tmp, [1, 1, 1, 1, 1, 1])
            raise RuntimeError("boom")
    assert (out / "manifest.json").read_bytes() == first  # previous output intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packs"]  # no temporary folder left behind
    with atomic_output_dir(out) as tmp:
        _write(tmp, [4, 4, 4, 4, 4, 4])
    assert PackReader(out).sample_tokens(0)[0].tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packs"]
    # A failing first run leaves nothing at all.
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "fresh") as tmp:
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packs"]


def test_atomic_output_dir_refuses_foreign_folders(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a pack output"):
        with atomic_output_dir(tmp_path / "mine"):
            pass
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        with atomic_output_dir(tmp_path / "file"):
            pass
    (tmp_path / "empty").mkdir()
    with atomic_output_dir(tmp_path / "empty") as tmp:
        _write(tmp, [1, 1, 1, 1, 1, 1])
    assert PackReader(tmp_path / "empty").num_samples == 6


# ----------------------------------------------------------------------------------------------- end to end


def _conftest():  # noqa: ANN202 - conftest is not importable as a module under importlib mode
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_data_conftest_pack", Path(__file__).with_name("conftest.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFTEST = _conftest()


def _pack(out: Path, model: Path, data: list[Path] | Path, **kw: object) -> dict:
    from vlmtune.data.formats import DatasetSpec
    from vlmtune.data.pack_cli import PackSettings, build_pack

    weights = kw.pop("weights", None)
    paths = data if isinstance(data, list) else [data]
    specs = [DatasetSpec(p, w) for p, w in zip(paths, weights or [1.0] * len(paths))]
    options = {"packing_length": 512, "workers": 0, "progress": False, "cache_dir": None, **kw}
    return build_pack(specs, PackSettings(model_dir=model, out=out, **options))


def _all_packs(reader: PackReader) -> list[list[int]]:
    return [reader.pack_indices(i) for i in range(len(reader))]


def test_pack_demo_end_to_end(tmp_path: Path, demo_data_dir: Path, tiny_model_dir: Path) -> None:
    from vlmtune.data.chat_template import apply_chat_template
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.tokenization import KimiTokenizer

    out = tmp_path / "packs"
    stats = _pack(out, tiny_model_dir, demo_data_dir / "train.jsonl", packing_length=512)
    reader = PackReader(out)
    assert json.loads((out / "stats.json").read_text()) == stats == reader.stats
    assert stats["samples_read"] == stats["samples_packed"] == stats["pack_entries"] == 60
    assert (
        stats["samples_skipped"] == {} and stats["samples_dropped"] == 0 and stats["samples_truncated"] == 0
    )
    # Budgets and "every good sample exactly once".
    packs = _all_packs(reader)
    assert sorted(i for p in packs for i in p) == list(range(60))
    pack_tokens = [sum(reader.sample(i).num_tokens for i in p) for p in packs]
    assert max(pack_tokens) <= 512 and stats["max_pack_tokens"] == max(pack_tokens)
    assert [reader.pack_info(k)["tokens"] for k in range(len(reader))] == pack_tokens
    total = sum(r.num_tokens for r in reader.records)
    assert stats["packs"] == len(reader) and stats["lower_bound_packs"] == -(-total // 512)
    assert stats["fill_ratio"] == pytest.approx(total / (len(reader) * 512))
    assert len(reader) <= stats["lower_bound_packs"] + 1
    # Each stored sample is the chat template of its JSONL line, token for token, label for label.
    tokenizer = KimiTokenizer.from_pretrained(tiny_model_dir)
    processor = KimiVLImageProcessor.from_pretrained(tiny_model_dir)
    lines = (demo_data_dir / "train.jsonl").read_text().splitlines()
    for record in reader.records:
        obj = json.loads(lines[record.location - 1])
        assert record.sample_id == obj["id"] and record.location_kind == "line"
        sizes = [
            reader.open_image(im.ref).size for im in record.images
        ]  # re-opened from the stored reference
        assert [im.grid_hw for im in record.images] == [processor.grid_hw(w, h) for w, h in sizes]
        expected = apply_chat_template(obj["messages"], tokenizer, [im.num_tokens for im in record.images])
        ids, mask = reader.sample_tokens(record.index)
        assert ids.tolist() == expected.input_ids and mask.tolist() == expected.label_mask
        assert list(record.image_spans) == expected.image_spans and record.num_tokens == len(ids)
        assert record.num_patches == sum(im.num_patches for im in record.images)
    # The processor, run on the pixels, agrees with the header-only grids (first images only: speed).
    for record in reader.records[:5]:
        for im in record.images:
            assert processor([reader.open_image(im.ref)])["image_grid_hws"].tolist() == [list(im.grid_hw)]
    settings = reader.settings
    assert settings["packing_length"] == 512 and settings["model_dir"] == str(tiny_model_dir)
    assert len(settings["tokenizer_sha256"]) == 64 and len(settings["processor_sha256"]) == 64
    for name in ("buffer_fill.png", "sample_lengths.png"):
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_same_seed_same_packs(tmp_path: Path, demo_data_dir: Path, tiny_model_dir: Path) -> None:
    data = demo_data_dir / "train.jsonl"
    _pack(tmp_path / "a", tiny_model_dir, data, seed=3)
    _pack(tmp_path / "b", tiny_model_dir, data, seed=3)
    _pack(tmp_path / "c", tiny_model_dir, data, seed=4)
    a, b, c = (PackReader(tmp_path / n) for n in "abc")
    assert _all_packs(a) == _all_packs(b)
    assert (tmp_path / "a" / "samples.jsonl").read_bytes() == (tmp_path / "b" / "samples.jsonl").read_bytes()
    for shard in (tmp_path / "a" / "shards").iterdir():
        assert shard.read_bytes() == (tmp_path / "b" / "shards" / shard.name).read_bytes()
    # Another seed: the same buffers (best fit is deterministic), in another order.
    assert _all_packs(a) != _all_packs(c) and sorted(_all_packs(a)) == sorted(_all_packs(c))


def test_cache_hit_on_second_run(
    tmp_path: Path, demo_data_dir: Path, tiny_model_dir: Path, monkeypatch
) -> None:  # noqa: ANN001
    from vlmtune.data import ingest

    data = tmp_path / "train.jsonl"
    data.write_bytes((demo_data_dir / "train.jsonl").read_bytes())
    for line in data.read_text().splitlines():  # make the copy's relative image paths valid
        for block in json.loads(line)["messages"][0]["content"]:
            if block.get("type") == "image":
                (tmp_path / "images").mkdir(exist_ok=True)
                name = block["image"].split("/")[-1]
                (tmp_path / "images" / name).write_bytes((demo_data_dir / "images" / name).read_bytes())
    cache = tmp_path / "cache"
    first = _pack(tmp_path / "p1", tiny_model_dir, data, cache_dir=cache)
    assert first["cache"] == {"dir": str(cache), "files_from_cache": 0, "files_computed": 1}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the length pass ran although the cache is valid")

    monkeypatch.setattr(ingest.SampleMeasurer, "measure", refuse)
    second = _pack(tmp_path / "p2", tiny_model_dir, data, cache_dir=cache)
    assert second["cache"]["files_from_cache"] == 1
    assert _all_packs(PackReader(tmp_path / "p1")) == _all_packs(PackReader(tmp_path / "p2"))
    assert (tmp_path / "p1" / "samples.jsonl").read_bytes() == (
        tmp_path / "p2" / "samples.jsonl"
    ).read_bytes()
    # Changing a packing setting keeps the cache valid (it holds untruncated samples).
    _pack(tmp_path / "p3", tiny_model_dir, data, cache_dir=cache, packing_length=300)
    # Changing the data file or an image invalidates it.
    with data.open("ab") as handle:
        handle.write(b"\n")
    with pytest.raises(AssertionError, match="the length pass ran"):
        _pack(tmp_path / "p4", tiny_model_dir, data, cache_dir=cache, on_bad_sample="skip")
    data.write_bytes((demo_data_dir / "train.jsonl").read_bytes())
    image = next((tmp_path / "images").iterdir())
    image.write_bytes(image.read_bytes())  # same bytes, new mtime
    with pytest.raises(AssertionError, match="the length pass ran"):
        _pack(tmp_path / "p5", tiny_model_dir, data, cache_dir=cache)
    monkeypatch.undo()
    assert _pack(tmp_path / "p6", tiny_model_dir, data, cache_dir=cache)["cache"]["files_computed"] == 1


def test_vision_budget_and_window(tmp_path: Path, demo_data_dir: Path, tiny_model_dir: Path) -> None:
    stats = _pack(
        tmp_path / "p",
        tiny_model_dir,
        demo_data_dir / "train.jsonl",
        packing_length=400,
        max_vision_patches=600,
        window=16,
    )
    reader = PackReader(tmp_path / "p")
    for k in range(len(reader)):
        records = reader.pack(k)
        assert sum(r.num_tokens for r in records) <= 400 and sum(r.num_patches for r in records) <= 600
        assert reader.pack_info(k)["patches"] == sum(r.num_patches for r in records)
    too_many = stats["samples_dropped_by_reason"].get("images_exceed_budget", 0)
    assert too_many == sum(1 for r in _measure_all(demo_data_dir, tiny_model_dir) if r > 600)
    assert stats["samples_packed"] + too_many == stats["samples_read"] == 60
    assert stats["max_pack_vision_patches"] <= 600 and stats["packer"]["window"] == 16
    total_patches = sum(r.num_patches for r in reader.records)
    assert stats["lower_bound_packs"] == max(
        -(-sum(r.num_tokens for r in reader.records) // 400), -(-total_patches // 600)
    )


def _measure_all(demo_data_dir: Path, model: Path) -> list[int]:
    from vlmtune.data.formats import DatasetSpec
    from vlmtune.data.ingest import LengthPassSettings, run_length_pass

    [result] = run_length_pass(
        [DatasetSpec(demo_data_dir / "train.jsonl")], LengthPassSettings(model, progress=False)
    )
    return [it.num_patches for it in result.items]


def test_truncation_never_cuts_an_image_span(
    tmp_path: Path, demo_data_dir: Path, tiny_model_dir: Path
) -> None:
    from vlmtune.models.kimi_vl.tokenization import KimiTokenizer

    tokenizer = KimiTokenizer.from_pretrained(tiny_model_dir)
    pad = tokenizer.special_tokens["<|media_pad|>"]
    CUT = 48  # demo samples are ~25-70 tokens (images of 4-16 tokens): 48 cuts the long ones
    full = _pack(tmp_path / "full", tiny_model_dir, demo_data_dir / "train.jsonl", packing_length=1024)
    stats = _pack(tmp_path / "cut", tiny_model_dir, demo_data_dir / "train.jsonl", packing_length=CUT)
    full_reader, reader = PackReader(tmp_path / "full"), PackReader(tmp_path / "cut")
    assert full["samples_truncated"] == 0 and stats["samples_truncated"] > 0
    assert stats["samples_read"] == stats["samples_packed"] + stats["samples_dropped"] == 60
    by_id = {r.sample_id: r for r in full_reader.records}
    truncated = [r for r in reader.records if r.truncated]
    assert len(truncated) == stats["samples_truncated"]
    for record in reader.records:
        ids, mask = reader.sample_tokens(record.index)
        assert len(ids) == record.num_tokens <= CUT
        original = by_id[record.sample_id]
        full_ids, full_mask = full_reader.sample_tokens(original.index)
        assert [im.grid_hw for im in record.images] == [im.grid_hw for im in original.images]
        for (s, e), im in zip(record.image_spans, record.images):  # every image whole, at its new place
            assert e - s == im.num_tokens and set(ids[s:e].tolist()) == {pad}
            assert ids[s - 1] == tokenizer.special_tokens["<|media_content|>"]
            assert ids[e] == tokenizer.special_tokens["<|media_end|>"]
        if not record.truncated:
            assert ids.tolist() == full_ids.tolist()
            continue
        assert len(ids) == CUT and mask.any()
        # Kept tokens are a subsequence of the original with their label bits: text is cut, never relabelled.
        it = iter(zip(full_ids.tolist(), full_mask.tolist()))
        assert all(pair in it for pair in zip(ids.tolist(), mask.tolist()))
        assert (ids == pad).sum() == (full_ids == pad).sum()


def test_mixing_weights_end_to_end(tmp_path: Path, demo_data_dir: Path, tiny_model_dir: Path) -> None:
    stats = _pack(
        tmp_path / "p",
        tiny_model_dir,
        [demo_data_dir / "train.jsonl", demo_data_dir / "eval.jsonl"],
        weights=[2.0, 0.5],
        packing_length=1024,
    )
    reader = PackReader(tmp_path / "p")
    assert stats["samples_read"] == 66 and stats["pack_entries"] == 2 * 60 + 3
    assert stats["samples_packed"] == 63 and stats["samples_dropped_by_reason"] == {"weight_subsample": 3}
    counts: dict[int, int] = {}
    for pack in _all_packs(reader):
        for i in pack:
            counts[i] = counts.get(i, 0) + 1
    assert sorted(counts) == list(range(63))
    assert [counts[r.index] for r in reader.records if r.dataset == 0] == [2] * 60
    assert [counts[r.index] for r in reader.records if r.dataset == 1] == [1] * 3
    assert [d["weight"] for d in reader.manifest["datasets"]] == [2.0, 0.5]
    assert [d["pack_entries"] for d in reader.manifest["datasets"]] == [120, 3]


def test_cli_main_and_inspect(tmp_path: Path, demo_data_dir: Path, tiny_model_dir: Path, capsys) -> None:  # noqa: ANN001
    from vlmtune.data.pack_cli import inspect_main, main

    out = tmp_path / "packs"
    argv = ["--model", str(tiny_model_dir), "--data", str(demo_data_dir / "train.jsonl"), "--out", str(out)]
    assert main([*argv, "--packing-length", "600", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "samples read" in printed and "fill ratio" in printed
    assert (tmp_path / "packs.cache").is_dir()  # default cache next to the output
    reader = PackReader(out)
    assert inspect_main([str(out), "--pack", "1"]) == 0
    shown = capsys.readouterr().out
    info = reader.pack_info(1)
    assert f"pack 1 of {len(reader)}: {len(info['samples'])} samples, {info['tokens']} / 600 tokens" in shown
    position = 0
    for record in reader.pack(1):
        assert record.sample_id in shown and f"train.jsonl:{record.location}" in shown
        for s, e in record.image_spans:
            assert f"[{position + s},{position + e})" in shown
        position += record.num_tokens
    assert "U: <image " in shown and "supervised:" in shown
    # Argument and range errors exit 2 with a message; a data error exits 1.
    assert main(["--model", str(tiny_model_dir), "--out", str(out), "--packing-length", "600"]) == 2
    assert "missing --data" in capsys.readouterr().err
    assert inspect_main([str(out), "--pack", str(len(reader))]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main([*argv, "--packing-length", "600", "--weight", "1", "--weight", "2"]) == 2


def test_failed_run_keeps_previous_output(
    tmp_path: Path, demo_data_dir: Path, tiny_model_dir: Path, bad_corpus: Path, capsys
) -> None:  # noqa: ANN001
    from vlmtune.data.pack_cli import main

    out = tmp_path / "packs"
    _pack(out, tiny_model_dir, demo_data_dir / "train.jsonl")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(bad_corpus),
        "--out",
        str(out),
        "--packing-length",
        "200",
    ]
    assert main([*argv, "--no-cache", "--quiet"]) == 1  # on_bad_sample error by default
    assert f"{bad_corpus}:line 2: bad sample (blank_line)" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "outside.png", "packs"]
    # The same run with skip replaces it; stats.json carries the exact accounting.
    assert main([*argv, "--no-cache", "--quiet", "--on-bad-sample", "skip", "--overlong", "drop"]) == 0
    stats = PackReader(out).stats
    reasons = [r for r in CONFTEST.BAD_CORPUS_REASONS if r]
    assert (
        stats["samples_skipped"] == dict.fromkeys(sorted(reasons), 1) and stats["samples_skipped_total"] == 13
    )
    assert stats["samples_dropped_by_reason"] == {"images_exceed_budget": 1, "overlong": 1}
    assert stats["samples_read"] == 18 and stats["samples_packed"] == 3 and PackReader(out).num_samples == 3
    assert (
        stats["samples_read"]
        == stats["samples_packed"] + stats["samples_skipped_total"] + stats["samples_dropped"]
    )


def test_recipe_mode(tmp_path: Path, demo_data_dir: Path, tiny_model_dir: Path) -> None:
    from vlmtune.data.pack_cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{path: {tiny_model_dir}}}\n"
        f"data: {{train: [{{path: {demo_data_dir / 'train.jsonl'}}}, {{path: {demo_data_dir / 'eval.jsonl'}, weight: 2}}]}}\n"
        f"packing: {{packing_length: 700, pack_dir: {tmp_path / 'packs'}}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}, max_steps: 1, global_batch_size: 1}}\n"
    )
    assert main(["--recipe", str(recipe), "packing.packing_length=800", "--quiet"]) == 0
    reader = PackReader(tmp_path / "packs")
    assert reader.packing_length == 800 and reader.stats["pack_entries"] == 60 + 2 * 6
    assert main(["--recipe", str(recipe), "--out", str(tmp_path / "other"), "--seed", "5", "--quiet"]) == 0
    assert PackReader(tmp_path / "other").settings["seed"] == 5
    assert main(["--recipe", str(recipe), "--data", str(demo_data_dir / "train.jsonl")]) == 2
    # data.demo: true writes the demo set where data.train[0].path points when it is absent (as training does).
    demo = tmp_path / "gen" / "train.jsonl"
    recipe.write_text(
        f"model: {{path: {tiny_model_dir}}}\n"
        f"data: {{train: [{{path: {demo}}}], demo: true, on_bad_sample: skip}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}, max_steps: 1, global_batch_size: 1}}\n"
    )
    assert main(["--recipe", str(recipe), "--quiet"]) == 0
    assert demo.is_file() and PackReader(tmp_path / "run" / "packs").stats["samples_read"] == 5000


def test_parquet_with_image_bytes_end_to_end(tmp_path: Path, tiny_model_dir: Path, png) -> None:  # noqa: ANN001
    import datasets

    features = datasets.Features(
        {"messages": datasets.Value("string"), "images": datasets.List(datasets.Image())}
    )
    rows = {"messages": [], "images": []}
    for k in range(6):
        messages = [
            {"role": "user", "content": "<image>what color is the shape?"},
            {"role": "assistant", "content": "red"},
        ]
        rows["messages"].append(json.dumps(messages))
        rows["images"].append([{"bytes": png(60 + 20 * k, 50), "path": None}])
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path), batch_size=4)
    stats = _pack(tmp_path / "p", tiny_model_dir, path, packing_length=300)
    assert stats["samples_read"] == stats["samples_packed"] == 6
    reader = PackReader(tmp_path / "p")
    for record in reader.records:
        assert record.location_kind == "row"
        [image] = record.images
        assert image.ref == {"file": str(path), "row": record.location, "column": "images", "index": 0}
        assert reader.open_image(image.ref).size == (60 + 20 * record.location, 50)


def test_default_cache_is_pruned_and_all_bad_data_gives_an_empty_pack(
    tmp_path: Path, tiny_model_dir: Path, write_jsonl
) -> None:  # noqa: ANN001
    from vlmtune.data.pack_cli import default_cache_dir

    out = tmp_path / "packs"
    data = write_jsonl(
        tmp_path / "bad.jsonl", [b"", b"{oops", {"messages": [{"role": "user", "content": "q"}]}]
    )
    cache = default_cache_dir(out)
    stats = _pack(out, tiny_model_dir, data, cache_dir=cache, on_bad_sample="skip")
    assert stats["samples_read"] == 3 and stats["samples_packed"] == 0 and stats["packs"] == 0
    assert stats["samples_skipped"] == {"blank_line": 1, "malformed_json": 1, "no_assistant_turn": 1}
    assert stats["fill_ratio"] == 0.0 and stats["lower_bound_packs"] == 0
    reader = PackReader(out)
    assert len(reader) == 0 and reader.num_samples == 0
    [first_entry] = [p.name for p in cache.iterdir()]
    data.write_bytes(data.read_bytes() + b"\n")  # new content: new key; the old entry is pruned
    _pack(out, tiny_model_dir, data, cache_dir=cache, on_bad_sample="skip")
    [second_entry] = [p.name for p in cache.iterdir()]
    assert second_entry != first_entry


def test_a_packer_bug_never_reaches_the_disk(
    tmp_path: Path, demo_data_dir: Path, tiny_model_dir: Path, monkeypatch
) -> None:  # noqa: ANN001
    from vlmtune.data import pack_cli

    data = demo_data_dir / "train.jsonl"
    real = pack_cli.run_packer
    cases = {
        "exactly once": lambda t, p, s: ([pk for pk in real(t, p, s)[0]][1:], {}),  # loses a pack
        "exceeds a budget": lambda t, p, s: ([list(range(len(t)))], {}),  # everything in one buffer
    }
    for message, fake in cases.items():
        monkeypatch.setattr(pack_cli, "run_packer", fake)
        with pytest.raises(AssertionError, match=message):
            _pack(tmp_path / "p", tiny_model_dir, data)
        assert list(tmp_path.iterdir()) == []
