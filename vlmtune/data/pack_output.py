"""The on-disk pack output written by `vlmtune pack` and read by the training loader.

Layout of an output folder (format "vlmtune-pack", version `FORMAT_VERSION`)::

    DIR/manifest.json            format, version, settings (packing_length, max_vision_patches, seed, model dir
                                 and tokenizer/processor hashes), datasets, shards, and the packs: for each
                                 buffer its sample indices (in buffer order), tokens and vision patches
    DIR/samples.jsonl            one `SampleRecord` per stored sample, line k = global sample index k
    DIR/shards/shard-00000.input_ids.npy   int32 (N_shard,)   tokens of the shard's samples, concatenated
    DIR/shards/shard-00000.label_mask.npy  uint8 (N_shard,)   1 on supervised tokens (assistant + its <|im_end|>)
    DIR/shards/shard-00000.offsets.npy     int64 (S_shard+1,) sample k of the shard is [offsets[k], offsets[k+1])
    DIR/stats.json               counts (read = packed + skipped + dropped), fill, bounds, time
    DIR/plots/*.png              buffer fill and sample length histograms

A pack entry is a global sample index; a sample whose dataset weight is above 1 appears in several packs.
Samples are stored once, in reading order (dataset, then line/row), so a shard is one `np.load(mmap_mode="r")`
away and training never re-tokenizes.

The folder is written atomically (`atomic_output_dir`): everything goes into ``DIR.tmp-XXXX`` and is renamed
over DIR at the end, so a reader never sees a half-written pack and a failed run leaves the previous output as
it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "vlmtune-pack"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLES = "samples.jsonl"
STATS = "stats.json"
SHARD_DIR = "shards"
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens = 256 MiB of int32 per shard


class PackFormatError(ValueError):
    """A folder that is not a readable pack output (missing files, other format, unsupported version)."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a sample.

    Attributes:
        ref: how to re-open it: {"path": absolute path} or {"file", "row", "column", "index"} for bytes in a
            parquet/arrow column (`vlmtune.data.formats.ImageOpener`).
        grid_hw: (h, w) in 14-pixel patches after the processor's resize and pad; h*w patches, h*w/4 tokens.
    """

    ref: dict[str, Any]
    grid_hw: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def num_tokens(self) -> int:
        return self.num_patches // 4


@dataclass(frozen=True)
class SampleRecord:
    """Everything known about one stored sample (one line of samples.jsonl).

    Attributes:
        index: global sample index (row in the shards).
        dataset: index into manifest["datasets"].
        source: absolute path of the data file.
        location: 1-based line (JSONL) or 0-based row (JSON array, parquet, arrow) in `source`.
        location_kind: "line" or "row".
        sample_id: the sample's "id" field, or "FILE:LOCATION".
        images: the sample's images in token order.
        num_tokens: LM tokens of the stored sample (after truncation), image tokens included.
        num_patches: vision patches of its images (sum of h*w).
        truncated: True when `overlong: truncate_text` cut text tokens from it.
        image_spans: per image, [start, end) token positions of its <|media_pad|> run inside the sample.
    """

    index: int
    dataset: int
    source: str
    location: int
    location_kind: str
    sample_id: str
    images: tuple[ImageRecord, ...]
    num_tokens: int
    num_patches: int
    truncated: bool
    image_spans: tuple[tuple[int, int], ...]

    def where(self) -> str:
        return f"{self.source}:{self.location_kind} {self.location}"

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "dataset": self.dataset,
            "source": self.source,
            "location": self.location,
            "location_kind": self.location_kind,
            "id": self.sample_id,
            "images": [{"ref": im.ref, "grid_hw": list(im.grid_hw)} for im in self.images],
            "tokens": self.num_tokens,
            "patches": self.num_patches,
            "truncated": self.truncated,
            "image_spans": [list(span) for span in self.image_spans],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SampleRecord:
        return cls(
            index=int(obj["index"]),
            dataset=int(obj["dataset"]),
            source=obj["source"],
            location=int(obj["location"]),
            location_kind=obj["location_kind"],
            sample_id=obj["id"],
            images=tuple(
                ImageRecord(im["ref"], (int(im["grid_hw"][0]), int(im["grid_hw"][1]))) for im in obj["images"]
            ),
            num_tokens=int(obj["tokens"]),
            num_patches=int(obj["patches"]),
            truncated=bool(obj["truncated"]),
            image_spans=tuple((int(s), int(e)) for s, e in obj["image_spans"]),
        )


# ----------------------------------------------------------------------------------------------- atomic folder


def is_pack_output(path: Path) -> bool:
    """True when `path` is a folder holding a manifest.json of this format (any version)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def check_replaceable(out: Path) -> None:
    """Refuse to overwrite anything but a previous pack output or an empty folder.

    Raises:
        FileExistsError: `out` is a file, or a non-empty folder that is not a pack output.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; pass a folder path for the pack output")
    if any(out.iterdir()) and not is_pack_output(out):
        raise FileExistsError(
            f"--out {out} is a non-empty folder that is not a pack output (no {MANIFEST} with format "
            f"{FORMAT_NAME!r}); refusing to replace it. Pass a new or empty folder"
        )


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out`; on success it replaces `out`, on failure it is removed.

    A previous pack output in `out` is replaced only after the new one is complete; an exception leaves it as
    it was. (Between the two renames of the swap a crash leaves it under ``out.old-XXXX``.)

    Raises:
        FileExistsError: see `check_replaceable`.
    """
    out = Path(os.path.abspath(out))
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        check_replaceable(out)  # it may have changed while we worked
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            os.rename(out, old / "previous")
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends tokenized samples to numbered shards of at most `shard_tokens` tokens (a sample never splits)."""

    def __init__(self, out_dir: Path, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> None:
        self.shard_dir = Path(out_dir) / SHARD_DIR
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.num_samples = 0
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, input_ids: np.ndarray, label_mask: np.ndarray) -> int:
        """Store one sample; returns its global index."""
        if input_ids.shape != label_mask.shape or input_ids.ndim != 1:
            raise ValueError(
                f"input_ids {input_ids.shape} and label_mask {label_mask.shape} must be equal 1-D shapes"
            )
        if self._ids and self._pending_tokens + len(input_ids) > self.shard_tokens:
            self._flush()
        self._ids.append(np.asarray(input_ids, dtype=np.int32))
        self._masks.append(np.asarray(label_mask, dtype=np.uint8))
        self._pending_tokens += len(input_ids)
        self.num_samples += 1
        return self.num_samples - 1

    def _flush(self) -> None:
        if not self._ids:
            return
        name = f"shard-{len(self.shards):05d}"
        lengths = np.array([len(x) for x in self._ids], dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # (S_shard+1,)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.shard_dir / f"{name}.input_ids.npy", np.concatenate(self._ids))
        np.save(self.shard_dir / f"{name}.label_mask.npy", np.concatenate(self._masks))
        np.save(self.shard_dir / f"{name}.offsets.npy", offsets)
        first = sum(s["num_samples"] for s in self.shards)
        self.shards.append(
            {"name": name, "first_sample": first, "num_samples": len(lengths), "num_tokens": int(offsets[-1])}
        )
        self._ids, self._masks, self._pending_tokens = [], [], 0

    def close(self) -> list[dict[str, Any]]:
        """Flush the last shard; returns the shard table for the manifest."""
        self._flush()
        return self.shards


def write_json(path: Path, obj: Any) -> None:
    """Pretty, key-sorted JSON with a trailing newline."""
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """manifest.json: pretty at the top level, one compact line per pack (a million packs stay one line each)."""
    head = {k: v for k, v in manifest.items() if k != "packs"}
    text = json.dumps(head, indent=1, sort_keys=True)
    packs = ",\n".join("  " + json.dumps(p, sort_keys=True, separators=(",", ":")) for p in manifest["packs"])
    text = text[: text.rindex("}")].rstrip() + ',\n "packs": [\n' + packs + "\n ]\n}\n"
    path.write_text(text, encoding="utf-8")


def write_pack_output(
    out_dir: Path,
    records: Sequence[SampleRecord],
    shards: list[dict[str, Any]],
    packs: Sequence[Sequence[int]],
    settings: dict[str, Any],
    datasets: list[dict[str, Any]],
    stats: dict[str, Any],
) -> dict[str, Any]:
    """Write samples.jsonl, manifest.json and stats.json into `out_dir` (shards are already there).

    Args:
        out_dir: the (temporary) output folder.
        records: every stored sample, records[k].index == k.
        shards: `ShardWriter.close()`'s table.
        packs: per buffer, the global sample indices in buffer order.
        settings: packing and model settings (recorded as given).
        datasets: one entry per input dataset (path, weight, format, content hash, counts).
        stats: the stats.json content.

    Returns:
        The manifest written.
    """
    out_dir = Path(out_dir)
    for k, record in enumerate(records):
        if record.index != k:
            raise ValueError(f"records must be in index order; records[{k}].index = {record.index}")
    with open(out_dir / SAMPLES, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), sort_keys=True, separators=(",", ":")) + "\n")
    pack_table = []
    for samples in packs:
        pack_table.append(
            {
                "samples": [int(i) for i in samples],
                "tokens": int(sum(records[i].num_tokens for i in samples)),
                "patches": int(sum(records[i].num_patches for i in samples)),
            }
        )
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "settings": settings,
        "datasets": datasets,
        "num_samples": len(records),
        "num_packs": len(pack_table),
        "samples_file": SAMPLES,
        "shards": shards,
        "packs": pack_table,
    }
    _write_manifest(out_dir / MANIFEST, manifest)
    write_json(out_dir / STATS, stats)
    return manifest


# ----------------------------------------------------------------------------------------------- reading


class PackReader:
    """Random access to a pack output: packs, sample records and tokens (memory-mapped shards).

    Example::

        reader = PackReader("packs/")
        for record in reader.pack(0):
            input_ids, label_mask = reader.sample_tokens(record.index)   # (L,) int32, (L,) bool
            images = [reader.open_image(im.ref) for im in record.images]

    Safe to use from DataLoader worker processes: shards are opened lazily per process.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise PackFormatError(
                f"{self.path} is not a pack output: {MANIFEST} missing; run `vlmtune pack` first"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PackFormatError(f"{manifest_path}: not valid JSON ({err}); re-run `vlmtune pack`") from err
        if manifest.get("format") != FORMAT_NAME:
            raise PackFormatError(
                f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        if manifest.get("version") != FORMAT_VERSION:
            raise PackFormatError(
                f"{manifest_path}: pack format version {manifest.get('version')!r}, this vlmtune reads version "
                f"{FORMAT_VERSION}; re-run `vlmtune pack` with this version"
            )
        self.manifest: dict[str, Any] = manifest
        with open(self.path / manifest.get("samples_file", SAMPLES), encoding="utf-8") as handle:
            self.records: list[SampleRecord] = [SampleRecord.from_json(json.loads(line)) for line in handle]
        if len(self.records) != manifest["num_samples"]:
            raise PackFormatError(
                f"{self.path / SAMPLES}: {len(self.records)} records but the manifest says {manifest['num_samples']}"
            )
        self._shard_starts = np.array([s["first_sample"] for s in manifest["shards"]], dtype=np.int64)
        self._shards: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._opener: Any = None

    # -- packs
    def __len__(self) -> int:
        return len(self.manifest["packs"])

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def packing_length(self) -> int:
        return int(self.settings["packing_length"])

    @property
    def num_samples(self) -> int:
        return len(self.records)

    @property
    def stats(self) -> dict[str, Any]:
        return json.loads((self.path / STATS).read_text(encoding="utf-8"))

    def pack_indices(self, i: int) -> list[int]:
        """Global sample indices of buffer i, in buffer order."""
        return list(self.manifest["packs"][i]["samples"])

    def pack_info(self, i: int) -> dict[str, Any]:
        """{"samples": [...], "tokens": int, "patches": int} of buffer i."""
        return self.manifest["packs"][i]

    def pack(self, i: int) -> list[SampleRecord]:
        """The sample records of buffer i, in buffer order."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"pack {i} out of range: {self.path} holds {len(self)} packs")
        return [self.records[k] for k in self.manifest["packs"][i]["samples"]]

    # -- samples
    def sample(self, idx: int) -> SampleRecord:
        return self.records[idx]

    def sample_tokens(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids (L,) np.int32, label_mask (L,) np.bool_) of global sample `idx` (copies, not views)."""
        if not 0 <= idx < len(self.records):
            raise IndexError(f"sample {idx} out of range: {self.path} holds {len(self.records)} samples")
        shard = int(np.searchsorted(self._shard_starts, idx, side="right")) - 1
        ids, mask, offsets = self._shard(shard)
        local = idx - int(self._shard_starts[shard])
        start, end = int(offsets[local]), int(offsets[local + 1])
        return np.array(ids[start:end], dtype=np.int32), np.array(mask[start:end], dtype=np.bool_)

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if shard not in self._shards:
            name = self.manifest["shards"][shard]["name"]
            base = self.path / SHARD_DIR
            self._shards[shard] = (
                np.load(base / f"{name}.input_ids.npy", mmap_mode="r"),
                np.load(base / f"{name}.label_mask.npy", mmap_mode="r"),
                np.load(base / f"{name}.offsets.npy"),
            )
        return self._shards[shard]

    # -- images
    def open_image(self, ref: dict[str, Any]) -> Any:
        """The image a record's `ImageRecord.ref` points at, as an RGB PIL image (orientation as counted)."""
        if self._opener is None:
            from vlmtune.data.formats import ImageOpener

            self._opener = ImageOpener()
        return self._opener.open(ref)

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps and open files stay in the process that made them; workers reopen lazily.
        state = dict(self.__dict__)
        state["_shards"], state["_opener"] = {}, None
        return state
