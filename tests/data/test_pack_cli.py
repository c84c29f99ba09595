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
