"""Exact lengths: every raw sample -> chat-template tokens + image tokens, in worker processes, cached.

The length pass is the expensive half of `vlmtune pack`. For each raw item (a JSONL line, a row) a worker:

    parse (formats.parse_item) -> image headers (size only, no pixel decode) -> processor grid (h, w) per image
    -> real chat template with (h/2)*(w/2) <|media_pad|> per image -> input_ids, label_mask, image spans

so the length that packing uses is the length that training sees, token for token. Results come back in
reading order whatever the number of workers (chunks of `chunk_size` items, at most `2 x workers` chunks in
flight), with a rich progress bar.

Cache: one entry per data file, in ``<cache_dir>/<key>/``, keyed by the sha256 of the file's bytes plus
everything that can change the result (format, image root, split, verify flag, the model folder's
tokenizer and processor files, and the source of the code that computes lengths). Image files are
checked by (size, mtime) at load. A second run over unchanged data reads tokens back instead of
recomputing them. The packing settings are NOT in the key: the cache holds full, untruncated samples.

Accounting (every item read ends in exactly one bucket; `Accounting.check` asserts it):

    read = packed + skipped[reason] + dropped[reason]

    skipped    bad input (formats.BAD_REASONS), with on_bad_sample=skip; on_bad_sample=error stops at the
               first one, naming file, line/row, reason and message
    dropped    overlong          more tokens than packing_length with overlong=drop
               images_exceed_budget   image tokens alone >= packing_length, or more patches than
                                 max_vision_patches: no truncation can help (whatever the policy)
               no_labels_after_truncation   truncate_text left no supervised token
               weight_subsample  a dataset weight below 1 (or the fractional part of one above 1) left the
                                 sample out of this epoch
    truncated  overlong=truncate_text kept the sample with text cut (counted in packed too)

Blank JSONL lines are read items too: they are skipped with reason "blank_line" (so a file's line count is
always its read count).

Overlong policy ``truncate_text`` keeps every image span (with its media wrapper tokens) and the FIRST text
tokens, i.e. it removes text from the END of the conversation (the tail of the last answers) until the
sample fits; the label mask is cut with the same index set, so it stays aligned with the tokens.

Mixing weights (epoch semantics): a dataset of weight w contributes each kept sample floor(w) times, plus
one more time for a subsample of round(frac(w) * n_kept) samples chosen with `random.Random(seed, dataset)`.
w = 1 uses each sample once, w = 2.5 twice each plus half of them a third time, w = 0.25 a quarter of them.
The weight is relative to the dataset's own size (not normalised over datasets). An offline pack output is
one such epoch, drawn once: every training epoch over it sees the same subsample (re-pack with another seed
for another draw). "packed" counts distinct samples stored in at least one pack; "pack_entries" counts their
occurrences (packed x multiplicity).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmtune.data.formats import (
    BadSample,
    DatasetSpec,
    ParsedSample,
    RawItem,
    container_of,
    content_hash,
    count_items,
    iter_raw_items,
    parse_item,
    read_image_size,
)

INGEST_VERSION = 1
OVERLONG_POLICIES = ("truncate_text", "drop", "error")
BAD_SAMPLE_POLICIES = ("error", "skip")
AUTO_WORKERS_MIN_ITEMS = 20_000  # workers=None: below this many items to measure, stay in process
DROP_REASONS = ("overlong", "images_exceed_budget", "no_labels_after_truncation", "weight_subsample")


class IngestError(RuntimeError):
    """The run stops: a bad sample with on_bad_sample=error, or an overlong one with overlong=error."""


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Measured:
    """One good sample, tokenized exactly as training will see it.

    Attributes:
        location: line (1-based) or row (0-based) in its file.
        sample_id: the sample's id.
        input_ids: (L,) int32 token ids, <|media_pad|> already expanded.
        label_mask: (L,) uint8, 1 on supervised tokens.
        image_refs: per image, its JSON reference (formats.ImageSource.ref).
        grids: per image, (h, w) in patches.
        image_spans: per image, [start, end) of its <|media_pad|> run.
        protected: per image, [start, end) of the whole image block (media wrapper included) that truncation
            must keep whole.
        truncated: set by `apply_overlong`.
    """

    location: int
    sample_id: str
    input_ids: np.ndarray
    label_mask: np.ndarray
    image_refs: list[dict[str, Any]]
    grids: list[tuple[int, int]]
    image_spans: list[tuple[int, int]]
    protected: list[tuple[int, int]]
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return sum(h * w for h, w in self.grids)


@dataclass
class Rejected:
    """One bad item: its location, reason code (formats.BAD_REASONS) and message."""

    location: int
    reason: str
    message: str


@dataclass
class FileResult:
    """Every item of one data file, in order, plus what is needed to validate a cache entry."""

    dataset: int
    file: str
    kind: str  # "line" or "row"
    items: list[Measured | Rejected]
    touched: list[str] = field(default_factory=list)  # image paths the workers opened (or tried to)
    from_cache: bool = False
    sha256: str = ""  # content hash of the data file
    cache_key: str = ""


# ----------------------------------------------------------------------------------------------- measuring


class SampleMeasurer:
    """Tokenizes one parsed sample with the model's tokenizer, image processor and chat template.

    Args:
        model_dir: folder with the tokenizer files and preprocessor_config.json.
        verify_images: also run Pillow's verify() on each image (catches damaged PNGs; still no decode).
    """

    def __init__(self, model_dir: Path | str, verify_images: bool = False) -> None:
        # Submodules imported directly (the package __init__ pulls in torch and the model).
        from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
        from vlmtune.models.kimi_vl.tokenization import KimiTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = KimiTokenizer.from_pretrained(self.model_dir)
        self.processor = KimiVLImageProcessor.from_pretrained(self.model_dir)
        self.verify_images = verify_images

    def grid(self, width: int, height: int, where: str) -> tuple[int, int]:
        """(h, w) patches of an image, or BadSample image_too_small / image_too_large."""
        from vlmtune.models.kimi_vl.image_processing import ImageSizeError

        try:
            h, w = self.processor.grid_hw(width, height)
        except ImageSizeError as err:
            # Too small: a side under min_image_side, or (pad_input false) nothing left after the crop to whole
            # merge blocks. Everything else the processor refuses is a side that is too long (>= 512 patches).
            small = min(width, height) < self.processor.min_image_side or "smaller than one" in str(err)
            reason = "image_too_small" if small else "image_too_large"
            raise BadSample(reason, f"image {where} ({width}x{height}): {err}") from err
        return int(h), int(w)

    def measure(self, item: RawItem, spec: DatasetSpec, touched: list[str]) -> Measured:
        """Parse, read image headers, apply the chat template.

        Raises:
            BadSample: the first problem found.
        """
        sample = parse_item(item, spec)
        grids = []
        for source in sample.images:
            if "path" in source.ref:
                touched.append(source.ref["path"])
            width, height = read_image_size(source, verify=self.verify_images)
            where = source.ref.get("path") or f"row {item.location} column {source.ref['column']}"
            grids.append(self.grid(width, height, where))
        return self.tokenize(sample, item.location, grids)

    def tokenize(self, sample: ParsedSample, location: int, grids: list[tuple[int, int]]) -> Measured:
        """Chat template of a parsed sample whose image grids are known."""
        from vlmtune.data.chat_template import ChatTemplateError, apply_chat_template
        from vlmtune.models.kimi_vl.image_processing import grid_tokens

        counts = [grid_tokens(g, self.processor.merge_kernel_size) for g in grids]
        try:
            out = apply_chat_template(sample.messages, self.tokenizer, counts)
        except ChatTemplateError as err:  # formats.parse_item checks the same rules first; kept as a guard
            raise BadSample("invalid_sample", f"chat template: {err}") from err
        input_ids = np.asarray(out.input_ids, dtype=np.int32)
        label_mask = np.asarray(out.label_mask, dtype=np.uint8)
        spans = [(int(s), int(e)) for s, e in out.image_spans]
        if [e - s for s, e in spans] != counts:
            raise AssertionError(
                f"chat template image spans {spans} do not match the image token counts {counts}"
            )
        protected = [_image_block(input_ids, s, e, self.tokenizer) for s, e in spans]
        return Measured(
            location=location,
            sample_id=sample.sample_id,
            input_ids=input_ids,
            label_mask=label_mask,
            image_refs=[src.ref for src in sample.images],
            grids=grids,
            image_spans=spans,
            protected=protected,
        )


def _image_block(input_ids: np.ndarray, start: int, end: int, tokenizer: Any) -> tuple[int, int]:
    """[start, end) of an image's whole block: its <|media_pad|> run plus the media wrapper around it.

    The Kimi-VL wrapper is ``<|media_start|>image<|media_content|> PADS <|media_end|>``; truncation keeps it
    whole so that no dangling wrapper token is left. Tokens are matched by id (the word "image" may be several
    BPE tokens in a small vocabulary); a tokenizer without these specials simply protects the pad run.
    """
    specials = getattr(tokenizer, "special_tokens", None) or {}
    media_start = specials.get("<|media_start|>")
    media_content = specials.get("<|media_content|>")
    media_end = specials.get("<|media_end|>")
    lo, hi = start, end
    if media_content is not None and start > 0 and int(input_ids[start - 1]) == media_content:
        lo = start - 1
        for back in range(start - 2, max(-1, start - 18), -1):
            if int(input_ids[back]) == media_start:
                lo = back
                break
    if media_end is not None and end < len(input_ids) and int(input_ids[end]) == media_end:
        hi = end + 1
    return lo, hi


# Per-process state of a worker (set by the pool initializer).
_WORKER: dict[str, Any] = {}


def _init_worker(model_dir: str, verify_images: bool, specs: list[DatasetSpec], in_process: bool = False) -> None:
    if not in_process:  # worker processes only: never change the caller's environment
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER["measurer"] = SampleMeasurer(model_dir, verify_images)
    _WORKER["specs"] = specs


def _measure_chunk(items: list[RawItem]) -> tuple[list[Measured | Rejected], list[str]]:
    measurer: SampleMeasurer = _WORKER["measurer"]
    specs: list[DatasetSpec] = _WORKER["specs"]
    out: list[Measured | Rejected] = []
    touched: list[str] = []
    for item in items:
        try:
            out.append(measurer.measure(item, specs[item.dataset], touched))
        except BadSample as err:
            out.append(Rejected(item.location, err.reason, err.message))
    return out, touched


# ----------------------------------------------------------------------------------------------- cache


def _hash_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")


def model_hashes(model_dir: Path | str) -> dict[str, str]:
    """sha256 of the tokenizer files (every small non-weight file but preprocessor_config.json) and of the
    image processor's preprocessor_config.json of a model folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"model folder {model_dir} does not exist; pass --model (a folder with the tokenizer)"
        )
    files = [p for p in model_dir.iterdir() if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)]
    processor = [p for p in files if p.name == "preprocessor_config.json"]
    if not processor:
        raise FileNotFoundError(
            f"{model_dir}/preprocessor_config.json missing: the image processor settings are needed"
        )
    tokenizer = [p for p in files if p.name != "preprocessor_config.json"]
    return {"tokenizer": _hash_files(tokenizer), "processor": _hash_files(processor)}


def code_hash() -> str:
    """sha256 of the source files that decide token counts (formats, ingest, template, tokenizer, processor)."""
    import vlmtune

    root = Path(vlmtune.__file__).parent
    names = [
        "data/formats.py",
        "data/ingest.py",
        "data/chat_template.py",
        "models/kimi_vl/tokenization.py",
        "models/kimi_vl/image_processing.py",
    ]
    return _hash_files([root / n for n in names if (root / n).is_file()])


def cache_key(spec: DatasetSpec, file_hash: str, model: dict[str, str], code: str, verify: bool) -> str:
    """The cache key of one data file's length pass (hex)."""
    payload = {
        "version": INGEST_VERSION,
        "file_sha256": file_hash,
        "format": spec.format,
        "image_root": str(spec.root),
        "split": spec.split,
        "verify_images": verify,
        "model": model,
        "code": code,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def save_cache(entry_dir: Path, result: FileResult, key: str) -> None:
    """Write one file's results under `entry_dir` (atomically: temp folder then rename)."""
    entry_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{entry_dir.name}.tmp-", dir=entry_dir.parent))
    try:
        rows = []
        ids, masks = [], []
        for it in result.items:
            if isinstance(it, Rejected):
                rows.append({"loc": it.location, "reason": it.reason, "message": it.message})
            else:
                rows.append(
                    {
                        "loc": it.location,
                        "id": it.sample_id,
                        "n": it.num_tokens,
                        "refs": it.image_refs,
                        "grids": [list(g) for g in it.grids],
                        "spans": [list(s) for s in it.image_spans],
                        "protected": [list(s) for s in it.protected],
                    }
                )
                ids.append(it.input_ids)
                masks.append(it.label_mask)
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, separators=(",", ":")) + "\n")
        np.save(tmp / "input_ids.npy", np.concatenate(ids) if ids else np.zeros(0, np.int32))
        np.save(tmp / "label_mask.npy", np.concatenate(masks) if masks else np.zeros(0, np.uint8))
        meta = {
            "key": key,
            "file": result.file,
            "kind": result.kind,
            "num_items": len(result.items),
            "touched": {p: _stat(p) for p in sorted(set(result.touched))},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        if entry_dir.exists():
            shutil.rmtree(entry_dir)
        os.rename(tmp, entry_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prune_cache(cache_dir: Path, keep: set[str]) -> list[str]:
    """Remove the entries of `cache_dir` whose key is not in `keep` (stale files of one output); returns them."""
    removed = []
    if not Path(cache_dir).is_dir():
        return removed
    for entry in Path(cache_dir).iterdir():
        if entry.is_dir() and entry.name not in keep and (entry / "meta.json").is_file():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def load_cache(entry_dir: Path, dataset: int, key: str) -> FileResult | None:
    """One file's cached results, or None when absent, unreadable, or an image file changed since."""
    try:
        meta = json.loads((entry_dir / "meta.json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        for path, stat in meta["touched"].items():
            if _stat(path) != stat:
                return None
        ids = np.load(entry_dir / "input_ids.npy")
        masks = np.load(entry_dir / "label_mask.npy")
        items: list[Measured | Rejected] = []
        offset = 0
        with open(entry_dir / "items.jsonl", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                if "reason" in row:
                    items.append(Rejected(row["loc"], row["reason"], row["message"]))
                    continue
                n = row["n"]
                items.append(
                    Measured(
                        location=row["loc"],
                        sample_id=row["id"],
                        input_ids=ids[offset : offset + n],
                        label_mask=masks[offset : offset + n],
                        image_refs=row["refs"],
                        grids=[(g[0], g[1]) for g in row["grids"]],
                        image_spans=[(s[0], s[1]) for s in row["spans"]],
                        protected=[(s[0], s[1]) for s in row["protected"]],
                    )
                )
                offset += n
        if len(items) != meta["num_items"] or offset != len(ids):
            return None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return FileResult(dataset, meta["file"], meta["kind"], items, list(meta["touched"]), from_cache=True)


# ----------------------------------------------------------------------------------------------- the pass


@dataclass
class LengthPassSettings:
    """Settings of the length pass.

    Attributes:
        model_dir: folder with the tokenizer and preprocessor_config.json.
        workers: worker processes (0 = in this process; None = auto: in process below `AUTO_WORKERS_MIN_ITEMS`
            items to measure, where starting workers (~1-3 s each: torch import) costs more than it saves,
            else min(8, CPUs)).
        chunk_size: items per task sent to a worker.
        cache_dir: where cache entries live (None = no cache).
        verify_images: Pillow verify() on every image (no decode; catches damaged PNG chunks).
        on_bad_sample: "error" (stop at the first bad item, in reading order) or "skip" (count it).
        progress: show a rich progress bar.
    """

    model_dir: Path
    workers: int | None = 0
    chunk_size: int = 32
    cache_dir: Path | None = None
    verify_images: bool = False
    on_bad_sample: str = "error"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample={self.on_bad_sample!r}; expected one of {BAD_SAMPLE_POLICIES}")
        if (self.workers is not None and self.workers < 0) or self.chunk_size < 1:
            raise ValueError(f"workers={self.workers} must be >= 0 and chunk_size={self.chunk_size} >= 1")


def bad_sample_error(file: str, kind: str, item: Rejected) -> IngestError:
    """The error raised by on_bad_sample=error: file, line/row, reason, message, and the way out."""
    return IngestError(
        f"{file}:{kind} {item.location}: bad sample ({item.reason}): {item.message}. "
        "Fix the sample, or pass --on-bad-sample skip (data.on_bad_sample: skip) to skip and count such samples"
    )


def _chunks(items: Iterator[RawItem], size: int) -> Iterator[list[RawItem]]:
    chunk: list[RawItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _dataset_items(spec: DatasetSpec, dataset: int) -> Iterator[RawItem]:
    return iter_raw_items(Path(spec.path), dataset, spec.split)


def run_length_pass(specs: Sequence[DatasetSpec], settings: LengthPassSettings) -> list[FileResult]:
    """Measure every item of every dataset (from the cache when valid), in reading order.

    Args:
        specs: the datasets, in order (their index is the `dataset` of every result).
        settings: workers, cache, policies.

    Returns:
        One FileResult per dataset.

    Raises:
        IngestError: with on_bad_sample=error, at the first bad item (the run's cache entries for files
            finished before it are kept).
    """
    model = model_hashes(settings.model_dir)
    code = code_hash()
    results: list[FileResult | None] = [None] * len(specs)
    todo: list[tuple[int, str, Path | None]] = []
    hashes = [content_hash(Path(spec.path)) for spec in specs]
    for d, spec in enumerate(specs):
        key = cache_key(spec, hashes[d], model, code, settings.verify_images)
        entry = settings.cache_dir / key if settings.cache_dir is not None else None
        cached = load_cache(entry, d, key) if entry is not None else None
        if cached is not None:
            cached.sha256, cached.cache_key = hashes[d], key
            _raise_first_bad(cached, settings.on_bad_sample)
            results[d] = cached
        else:
            todo.append((d, key, entry))
    if todo:
        totals = {d: count_items(Path(specs[d].path), specs[d].split) for d, _, _ in todo}
        workers = settings.workers
        if workers is None:
            workers = 0 if sum(totals.values()) < AUTO_WORKERS_MIN_ITEMS else min(8, os.cpu_count() or 1)
        with _Runner(settings, list(specs), sum(totals.values()), workers) as runner:
            for d, key, entry in todo:
                spec = specs[d]
                kind = "line" if container_of(Path(spec.path)) == "jsonl" else "row"
                file = os.path.abspath(spec.path)
                items: list[Measured | Rejected] = []
                touched: list[str] = []
                for chunk_items, chunk_touched in runner.map(
                    _chunks(_dataset_items(spec, d), settings.chunk_size)
                ):
                    _raise_first_bad(FileResult(d, file, kind, chunk_items), settings.on_bad_sample)
                    items.extend(chunk_items)
                    touched.extend(chunk_touched)
                result = FileResult(d, file, kind, items, touched, sha256=hashes[d], cache_key=key)
                if entry is not None:
                    save_cache(entry, result, key)
                results[d] = result
    return [r for r in results if r is not None]


def _raise_first_bad(result: FileResult, on_bad_sample: str) -> None:
    if on_bad_sample == "error":
        for it in result.items:
            if isinstance(it, Rejected):
                raise bad_sample_error(result.file, result.kind, it)


class _Runner:
    """Maps chunks through worker processes (or in-process), in order, with a bounded number in flight."""

    def __init__(
        self, settings: LengthPassSettings, specs: list[DatasetSpec], total: int, workers: int
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.specs = specs
        self.total = total
        self.pool: Any = None
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> _Runner:
        s = self.settings
        if self.workers > 0:
            import multiprocessing

            # spawn: no fork of a parent that may hold threads (torch, tokenizers); workers import only what
            # the length pass needs.
            context = multiprocessing.get_context("spawn")
            self.pool = context.Pool(
                self.workers,
                initializer=_init_worker,
                initargs=(str(s.model_dir), s.verify_images, self.specs),
            )
        else:
            _init_worker(str(s.model_dir), s.verify_images, self.specs, in_process=True)
        if s.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("exact lengths"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("samples"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("lengths", total=self.total)
        return self

    def map(self, chunks: Iterator[list[RawItem]]) -> Iterator[tuple[list[Measured | Rejected], list[str]]]:
        if self.pool is None:
            for chunk in chunks:
                out = _measure_chunk(chunk)
                self._advance(len(chunk))
                yield out
            return
        in_flight: deque[tuple[int, Any]] = deque()
        for chunk in chunks:
            in_flight.append((len(chunk), self.pool.apply_async(_measure_chunk, (chunk,))))
            if len(in_flight) >= 2 * self.workers:
                n, pending = in_flight.popleft()
                out = pending.get()
                self._advance(n)
                yield out
        while in_flight:
            n, pending = in_flight.popleft()
            out = pending.get()
            self._advance(n)
            yield out

    def _advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.pool is not None:
            if exc[0] is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
        _WORKER.clear()


# ----------------------------------------------------------------------------------------------- overlong


def apply_overlong(
    sample: Measured, packing_length: int, max_vision_patches: int | None, policy: str
) -> tuple[Measured | None, str]:
    """Fit one sample to the budgets.

    Args:
        sample: the measured sample.
        packing_length: LM tokens per buffer.
        max_vision_patches: vision patches per buffer, or None.
        policy: "truncate_text", "drop" or "error".

    Returns:
        (sample or None, outcome) with outcome "ok", "truncated", or a drop reason: "overlong",
        "images_exceed_budget", "no_labels_after_truncation". With policy "error" an overlong sample raises
        instead (a sample whose images alone exceed a budget is dropped under every policy).
    """
    if policy not in OVERLONG_POLICIES:
        raise ValueError(f"overlong={policy!r}; expected one of {OVERLONG_POLICIES}")
    image_tokens = sum(e - s for s, e in sample.protected)
    if image_tokens >= packing_length or (
        max_vision_patches is not None and sample.num_patches > max_vision_patches
    ):
        return None, "images_exceed_budget"
    if sample.num_tokens <= packing_length:
        return sample, "ok"
    if policy == "drop":
        return None, "overlong"
    if policy == "error":
        raise IngestError(
            f"sample {sample.sample_id!r} at location {sample.location} has {sample.num_tokens} tokens > "
            f"packing_length {packing_length}; raise --packing-length, or pass --overlong truncate_text / drop"
        )
    return truncate_text(sample, packing_length)


def truncate_text(sample: Measured, packing_length: int) -> tuple[Measured | None, str]:
    """Keep every image block and the first (packing_length - image block tokens) text tokens.

    Returns:
        (the truncated sample, "truncated"), or (None, "no_labels_after_truncation") when no supervised token
        survives.
    """
    n = sample.num_tokens
    is_image = np.zeros(n, dtype=bool)
    for s, e in sample.protected:
        is_image[s:e] = True
    text_budget = packing_length - int(is_image.sum())
    text_rank = np.cumsum(~is_image)  # 1-based rank of each text token among text tokens
    keep = is_image | (text_rank <= text_budget)
    new_index = np.cumsum(keep) - 1  # position of each kept token in the truncated sample
    label_mask = sample.label_mask[keep]
    if not label_mask.any():
        return None, "no_labels_after_truncation"
    return (
        Measured(
            location=sample.location,
            sample_id=sample.sample_id,
            input_ids=sample.input_ids[keep],
            label_mask=label_mask,
            image_refs=sample.image_refs,
            grids=sample.grids,
            image_spans=[(int(new_index[s]), int(new_index[e - 1]) + 1) for s, e in sample.image_spans],
            protected=[(int(new_index[s]), int(new_index[e - 1]) + 1) for s, e in sample.protected],
            truncated=True,
        ),
        "truncated",
    )


# ----------------------------------------------------------------------------------------------- weights


def mixing_multiplicity(n: int, weight: float, seed: int, dataset: int) -> np.ndarray:
    """How many times each of a dataset's n kept samples appears in one epoch (see the module docstring).

    Returns:
        (n,) int64: floor(weight) for every sample, +1 for a seeded subsample of round(frac * n) of them.
    """
    if weight < 0 or not math.isfinite(weight):
        raise ValueError(f"weight {weight!r} must be finite and >= 0")
    whole = math.floor(weight)
    counts = np.full(n, whole, dtype=np.int64)
    extra = round((weight - whole) * n)
    if extra:
        rng = random.Random(f"vlmtune-mixing/{seed}/{dataset}")
        counts[rng.sample(range(n), extra)] += 1
    return counts


# ----------------------------------------------------------------------------------------------- accounting


@dataclass
class Accounting:
    """Counts of what happened to every item read (see the module docstring)."""

    read: int = 0
    packed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    entries: int = 0  # sample occurrences in packs (packed x mixing multiplicity)

    def add(self, other: Accounting) -> None:
        self.read += other.read
        self.packed += other.packed
        self.skipped.update(other.skipped)
        self.dropped.update(other.dropped)
        self.truncated += other.truncated
        self.entries += other.entries

    def check(self, where: str = "") -> None:
        """Assert read = packed + skipped + dropped."""
        total = self.packed + sum(self.skipped.values()) + sum(self.dropped.values())
        if total != self.read:
            raise AssertionError(
                f"accounting broken{where}: read {self.read} != packed {self.packed} + skipped "
                f"{dict(self.skipped)} + dropped {dict(self.dropped)}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "samples_read": self.read,
            "samples_packed": self.packed,
            "samples_skipped": dict(sorted(self.skipped.items())),
            "samples_skipped_total": sum(self.skipped.values()),
            "samples_dropped": sum(self.dropped.values()),
            "samples_dropped_by_reason": dict(sorted(self.dropped.items())),
            "samples_truncated": self.truncated,
            "pack_entries": self.entries,
        }


@dataclass
class Selected:
    """A kept sample and how many times it enters the packs this epoch."""

    dataset: int
    file: str
    kind: str
    sample: Measured
    multiplicity: int


def select_samples(
    results: Sequence[FileResult],
    specs: Sequence[DatasetSpec],
    packing_length: int,
    max_vision_patches: int | None,
    overlong: str,
    seed: int,
    on_bad_sample: str = "skip",
) -> tuple[list[Selected], list[Accounting], dict[str, list[str]]]:
    """Apply the overlong policy and the mixing weights to the length pass's results.

    Returns:
        (the samples with multiplicity >= 1 in reading order, one Accounting per dataset,
        up to 3 example locations per skip/drop reason for the report).

    Raises:
        IngestError: a bad item with on_bad_sample=error, an overlong sample with overlong=error.
    """
    selected: list[Selected] = []
    per_dataset: list[Accounting] = []
    examples: dict[str, list[str]] = {}

    def note(reason: str, text: str) -> None:
        bucket = examples.setdefault(reason, [])
        if len(bucket) < 3:
            bucket.append(text)

    for result in results:
        acc = Accounting(read=len(result.items))
        kept: list[Measured] = []
        for it in result.items:
            where = f"{result.file}:{result.kind} {it.location}"
            if isinstance(it, Rejected):
                if on_bad_sample == "error":
                    raise bad_sample_error(result.file, result.kind, it)
                acc.skipped[it.reason] += 1
                note(it.reason, f"{where}: {it.message}")
                continue
            try:
                fitted, outcome = apply_overlong(it, packing_length, max_vision_patches, overlong)
            except IngestError as err:
                raise IngestError(f"{where}: {err}") from err
            if fitted is None:
                acc.dropped[outcome] += 1
                note(outcome, f"{where}: {it.num_tokens} tokens, {it.num_patches} patches")
                continue
            kept.append(fitted)
        counts = mixing_multiplicity(len(kept), specs[result.dataset].weight, seed, result.dataset)
        for sample, count in zip(kept, counts):
            if count == 0:
                acc.dropped["weight_subsample"] += 1
                continue
            acc.packed += 1
            acc.entries += int(count)
            acc.truncated += int(sample.truncated)
            selected.append(Selected(result.dataset, result.file, result.kind, sample, int(count)))
        acc.check(f" in {result.file}")
        per_dataset.append(acc)
    return selected, per_dataset, examples
