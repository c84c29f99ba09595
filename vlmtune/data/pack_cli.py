"""`vlmtune pack` and `vlmtune inspect-pack`: raw data -> exact lengths -> packs on disk, and a look inside.

    vlmtune pack --model MODEL_DIR --data train.jsonl [--data more.parquet --weight 1 --weight 0.5] \\
        --out packs/ --packing-length 4096 [--max-vision-patches 16384] [--window 10000] [--workers 8] \\
        [--on-bad-sample skip] [--overlong drop] [--image-root DIR] [--seed 0]
    vlmtune pack --recipe recipes/tiny_cpu.yaml [packing.packing_length=2048 ...] [--out DIR]
    vlmtune inspect-pack packs/ --pack 0

The tokenizer and image settings come from MODEL_DIR. The output (`vlmtune.data.pack_output`) is written
atomically; its stats.json holds the full accounting (read = packed + skipped + dropped) and the fill.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmtune.data.formats import DataFormatError, DatasetSpec
from vlmtune.data.ingest import (
    OVERLONG_POLICIES,
    Accounting,
    IngestError,
    LengthPassSettings,
    Selected,
    model_hashes,
    prune_cache,
    run_length_pass,
    select_samples,
)
from vlmtune.data.pack_output import (
    FORMAT_VERSION,
    STATS,
    ImageRecord,
    PackFormatError,
    PackReader,
    SampleRecord,
    ShardWriter,
    atomic_output_dir,
    check_replaceable,
    write_json,
    write_pack_output,
)

DEFAULT_CLI_OVERLONG = "truncate_text"


@dataclass
class PackSettings:
    """Everything `build_pack` needs besides the datasets.

    Attributes:
        model_dir: folder with the tokenizer files and preprocessor_config.json.
        out: output folder (replaced atomically).
        packing_length: LM tokens per buffer.
        max_vision_patches: vision patches per buffer (None = no vision budget).
        window: samples packed together (None = all at once, the best fill).
        seed: seed of the mixing subsample and of the pack order.
        overlong: truncate_text | drop | error.
        on_bad_sample: error | skip.
        workers: length-pass worker processes (0 = in this process, None = auto, see `LengthPassSettings`).
        cache_dir: length cache folder (None = no cache). Default next to the output: ``<out>.cache``.
        verify_images: Pillow verify() on every image in the length pass.
        progress: show progress bars and the summary table.
        shard_tokens: tokens per shard file.
        extra: more settings to record in manifest.json (e.g. the recipe path).
    """

    model_dir: Path
    out: Path
    packing_length: int
    max_vision_patches: int | None = None
    window: int | None = None
    seed: int = 0
    overlong: str = DEFAULT_CLI_OVERLONG
    on_bad_sample: str = "error"
    workers: int | None = 0
    cache_dir: Path | None = None
    verify_images: bool = False
    progress: bool = True
    shard_tokens: int = 1 << 26
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.packing_length < 1:
            raise ValueError(f"packing_length={self.packing_length} must be >= 1")
        if self.max_vision_patches is not None and self.max_vision_patches < 1:
            raise ValueError(f"max_vision_patches={self.max_vision_patches} must be >= 1 (or None)")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1 (or None for the whole dataset)")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={self.overlong!r}; expected one of {OVERLONG_POLICIES}")


def default_cache_dir(out: Path) -> Path:
    """``<out>.cache`` next to the output folder (outside it, so replacing the output keeps the cache)."""
    out = Path(os.path.abspath(out))
    return out.parent / f"{out.name}.cache"


# ----------------------------------------------------------------------------------------------- packing step


def run_packer(
    tokens: np.ndarray, patches: np.ndarray, settings: PackSettings
) -> tuple[list[list[int]], dict[str, Any]]:
    """Pack items (one per pack entry) under the two budgets with `vlmtune.data.packing`.

    Returns:
        (per buffer, the entry indices in buffer order; the packer's stats).
    """
    from vlmtune.data import packing

    return packing.pack_items(
        tokens,
        patches,
        packing_length=settings.packing_length,
        max_vision_patches=settings.max_vision_patches,
        window=settings.window,
        seed=settings.seed,
    )


# ----------------------------------------------------------------------------------------------- build


def build_pack(specs: list[DatasetSpec], settings: PackSettings, console: Any = None) -> dict[str, Any]:
    """Run the whole pipeline and write the pack output; returns stats.json's content.

    Raises:
        IngestError: a bad sample with on_bad_sample=error, an overlong one with overlong=error.
        DataFormatError: a data file that cannot be read at all.
        FileExistsError: `settings.out` exists and is not a previous pack output.
    """
    start = time.perf_counter()
    out = Path(os.path.abspath(settings.out))
    check_replaceable(out)  # fail before any work
    if not specs:
        raise DataFormatError("no dataset given; pass --data FILE (or data.train in the recipe)")
    model = model_hashes(settings.model_dir)

    t0 = time.perf_counter()
    pass_settings = LengthPassSettings(
        model_dir=Path(settings.model_dir),
        workers=settings.workers,
        cache_dir=settings.cache_dir,
        verify_images=settings.verify_images,
        on_bad_sample=settings.on_bad_sample,
        progress=settings.progress,
    )
    results = run_length_pass(specs, pass_settings)
    length_seconds = time.perf_counter() - t0
    if settings.cache_dir is not None and Path(settings.cache_dir) == default_cache_dir(out):
        prune_cache(Path(settings.cache_dir), {r.cache_key for r in results})  # this output's own cache only

    selected, per_dataset, examples = select_samples(
        results,
        specs,
        settings.packing_length,
        settings.max_vision_patches,
        settings.overlong,
        settings.seed,
        settings.on_bad_sample,
    )
    total = Accounting()
    for acc in per_dataset:
        total.add(acc)
    total.check()

    # One pack entry per occurrence: sample k appears multiplicity[k] times.
    entry_sample = np.repeat(np.arange(len(selected)), [s.multiplicity for s in selected]).astype(np.int64)
    sample_tokens = np.array([s.sample.num_tokens for s in selected], dtype=np.int64)
    sample_patches = np.array([s.sample.num_patches for s in selected], dtype=np.int64)
    t0 = time.perf_counter()
    entry_packs, packer_stats = run_packer(
        sample_tokens[entry_sample], sample_patches[entry_sample], settings
    )
    packing_seconds = time.perf_counter() - t0
    packs = [[int(entry_sample[e]) for e in pack] for pack in entry_packs]
    _check_packs(entry_packs, packs, len(entry_sample), sample_tokens, sample_patches, settings)

    t0 = time.perf_counter()
    with atomic_output_dir(out) as tmp:
        records, shards = _write_samples(tmp, selected, settings.shard_tokens)
        pack_tokens = np.array([sample_tokens[p].sum() for p in packs], dtype=np.int64)
        pack_patches = np.array([sample_patches[p].sum() for p in packs], dtype=np.int64)
        stats = _stats(
            total,
            per_dataset,
            examples,
            packs,
            pack_tokens,
            pack_patches,
            sample_tokens,
            sample_patches,
            settings,
        )
        stats["packer"] = packer_stats
        stats["cache"] = {
            "dir": str(settings.cache_dir) if settings.cache_dir is not None else None,
            "files_from_cache": sum(r.from_cache for r in results),
            "files_computed": sum(not r.from_cache for r in results),
        }
        settings_json = {
            "packing_length": settings.packing_length,
            "max_vision_patches": settings.max_vision_patches,
            "window": settings.window,
            "seed": settings.seed,
            "overlong": settings.overlong,
            "on_bad_sample": settings.on_bad_sample,
            "verify_images": settings.verify_images,
            "model_dir": str(Path(os.path.abspath(settings.model_dir))),
            "tokenizer_sha256": model["tokenizer"],
            "processor_sha256": model["processor"],
            **settings.extra,
        }
        datasets = [
            {
                "path": str(Path(os.path.abspath(spec.path))),
                "weight": spec.weight,
                "format": spec.format,
                "image_root": str(spec.root),
                "split": spec.split,
                "sha256": results[d].sha256,
                **per_dataset[d].to_json(),
            }
            for d, spec in enumerate(specs)
        ]
        write_pack_output(tmp, records, shards, packs, settings_json, datasets, stats)
        _plots(tmp, pack_tokens, pack_patches, sample_tokens, sample_patches, settings)
        stats["seconds"] = {
            "length_pass": round(length_seconds, 3),
            "packing": round(packing_seconds, 3),
            "write": round(time.perf_counter() - t0, 3),
            "total": round(time.perf_counter() - start, 3),
        }
        write_json(tmp / STATS, stats)
    if settings.progress:
        print_summary(stats, out, console)
    return stats


def _check_packs(
    entry_packs: list[list[int]],
    packs: list[list[int]],
    num_entries: int,
    sample_tokens: np.ndarray,
    sample_patches: np.ndarray,
    settings: PackSettings,
) -> None:
    """Every pack entry exactly once, no budget exceeded: a packer bug must never reach the disk."""
    entries = sorted(e for pack in entry_packs for e in pack)
    if entries != list(range(num_entries)):
        raise AssertionError(
            f"packer output does not hold each of the {num_entries} pack entries exactly once"
        )
    for k, pack in enumerate(packs):
        tokens, patches = int(sample_tokens[pack].sum()), int(sample_patches[pack].sum())
        if tokens > settings.packing_length or (
            settings.max_vision_patches is not None and patches > settings.max_vision_patches
        ):
            raise AssertionError(f"pack {k} exceeds a budget: {tokens} tokens, {patches} patches")


def _write_samples(
    out: Path, selected: list[Selected], shard_tokens: int
) -> tuple[list[SampleRecord], list[dict[str, Any]]]:
    """Write the shards of the selected samples; returns their records and the shard table."""
    writer = ShardWriter(out, shard_tokens)
    records: list[SampleRecord] = []
    for sel in selected:
        s = sel.sample
        index = writer.add(s.input_ids, s.label_mask)
        records.append(
            SampleRecord(
                index=index,
                dataset=sel.dataset,
                source=sel.file,
                location=s.location,
                location_kind=sel.kind,
                sample_id=s.sample_id,
                images=tuple(ImageRecord(ref, grid) for ref, grid in zip(s.image_refs, s.grids)),
                num_tokens=s.num_tokens,
                num_patches=s.num_patches,
                truncated=s.truncated,
                image_spans=tuple(s.image_spans),
            )
        )
    return records, writer.close()


def _stats(
    total: Accounting,
    per_dataset: list[Accounting],
    examples: dict[str, list[str]],
    packs: list[list[int]],
    pack_tokens: np.ndarray,
    pack_patches: np.ndarray,
    sample_tokens: np.ndarray,
    sample_patches: np.ndarray,
    settings: PackSettings,
) -> dict[str, Any]:
    """stats.json: the accounting, the fill and the bounds (see the module docstring of pack_output)."""
    L, P = settings.packing_length, settings.max_vision_patches
    entry_tokens = int(pack_tokens.sum())
    entry_patches = int(pack_patches.sum())
    lower = math.ceil(entry_tokens / L) if entry_tokens else 0
    if P is not None and entry_patches:
        lower = max(lower, math.ceil(entry_patches / P))
    num_packs = len(pack_tokens)
    stats: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        **total.to_json(),
        "packs": num_packs,
        "lower_bound_packs": lower,
        "packs_over_lower_bound": num_packs / lower if lower else None,
        "fill_ratio": entry_tokens / (num_packs * L) if num_packs else 0.0,
        "vision_fill_ratio": entry_patches / (num_packs * P) if num_packs and P else None,
        "packing_length": L,
        "max_vision_patches": P,
        "max_pack_tokens": int(pack_tokens.max()) if num_packs else 0,
        "max_pack_vision_patches": int(pack_patches.max()) if num_packs else 0,
        "total_tokens": entry_tokens,
        "total_vision_patches": entry_patches,
        "sample_tokens": _describe(sample_tokens),
        "sample_patches": _describe(sample_patches),
        "samples_per_pack": _describe(np.array([len(p) for p in packs], dtype=np.int64)),
        "examples": examples,
        "per_dataset": [acc.to_json() for acc in per_dataset],
    }
    return stats


def _describe(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"count": 0}
    return {
        "count": int(len(values)),
        "min": int(values.min()),
        "mean": round(float(values.mean()), 2),
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "max": int(values.max()),
    }


def _plots(
    out: Path,
    pack_tokens: np.ndarray,
    pack_patches: np.ndarray,
    sample_tokens: np.ndarray,
    sample_patches: np.ndarray,
    settings: PackSettings,
) -> None:
    """plots/buffer_fill.png and plots/sample_lengths.png (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(exist_ok=True)
    L, P = settings.packing_length, settings.max_vision_patches
    ncols = 2 if P else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    axes[0, 0].hist(pack_tokens / L if len(pack_tokens) else [], bins=50, range=(0, 1), color="tab:blue")
    axes[0, 0].set(
        title=f"token fill per buffer ({len(pack_tokens)} buffers, L={L})",
        xlabel="tokens / L",
        ylabel="buffers",
    )
    if P:
        axes[0, 1].hist(
            pack_patches / P if len(pack_patches) else [], bins=50, range=(0, 1), color="tab:orange"
        )
        axes[0, 1].set(title=f"vision fill per buffer (P={P})", xlabel="patches / P", ylabel="buffers")
    fig.tight_layout()
    fig.savefig(out / "plots" / "buffer_fill.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    axes[0, 0].hist(sample_tokens, bins=60, color="tab:green")
    axes[0, 0].set(title=f"sample length ({len(sample_tokens)} samples)", xlabel="tokens", ylabel="samples")
    axes[0, 0].axvline(L, color="red", linestyle="--", label="packing_length")
    axes[0, 0].legend()
    axes[0, 1].hist(sample_patches, bins=60, color="tab:purple")
    axes[0, 1].set(title="vision patches per sample", xlabel="patches", ylabel="samples")
    fig.tight_layout()
    fig.savefig(out / "plots" / "sample_lengths.png", dpi=100)
    plt.close(fig)


def print_summary(stats: dict[str, Any], out: Path, console: Any = None) -> None:
    """The rich summary table printed at the end of `vlmtune pack`."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"vlmtune pack -> {out}", show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("samples read", stats["samples_read"]),
        ("samples packed", stats["samples_packed"]),
        ("  of which truncated", stats["samples_truncated"]),
        ("samples skipped", stats["samples_skipped_total"]),
        *[(f"  {reason}", n) for reason, n in stats["samples_skipped"].items()],
        ("samples dropped", stats["samples_dropped"]),
        *[(f"  {reason}", n) for reason, n in stats["samples_dropped_by_reason"].items()],
        ("pack entries (after weights)", stats["pack_entries"]),
        ("packs", stats["packs"]),
        ("lower bound", stats["lower_bound_packs"]),
        ("fill ratio", f"{stats['fill_ratio']:.4f}"),
        ("max pack tokens", f"{stats['max_pack_tokens']} / {stats['packing_length']}"),
        (
            "max pack vision patches",
            f"{stats['max_pack_vision_patches']} / {stats['max_vision_patches'] or '-'}",
        ),
        (
            "length pass (cached files)",
            f"{stats['seconds']['length_pass']:.2f} s ({stats['cache']['files_from_cache']})",
        ),
        ("packing", f"{stats['seconds']['packing']:.2f} s"),
        ("total", f"{stats['seconds']['total']:.2f} s"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    console.print(
        f"wrote {out}: manifest.json, samples.jsonl, shards/, stats.json, plots/ (buffer_fill, sample_lengths)"
    )


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmtune pack",
        description="Tokenize image+text data with exact lengths and pack it into fixed-length buffers on disk.",
    )
    p.add_argument(
        "overrides", nargs="*", help="with --recipe: dotted overrides such as packing.packing_length=2048"
    )
    p.add_argument("--recipe", type=Path, help="take model, data and packing settings from this recipe")
    p.add_argument("--model", type=Path, help="model folder (tokenizer files + preprocessor_config.json)")
    p.add_argument("--data", type=Path, action="append", help="a data file (repeat for several datasets)")
    p.add_argument(
        "--weight",
        type=float,
        action="append",
        help="epoch weight of each --data, same order: each sample floor(w) times plus a seeded subsample of "
        "frac(w) of them once more (1 = once, 0.5 = half, 2 = twice)",
    )
    p.add_argument(
        "--format", choices=["auto", "messages", "llava", "sharegpt"], help="sample layout (default auto)"
    )
    p.add_argument(
        "--image-root", type=Path, help="folder relative image paths start from (default: data file's)"
    )
    p.add_argument("--out", type=Path, help="output folder (a previous pack output there is replaced)")
    p.add_argument("--packing-length", type=int, help="LM tokens per buffer")
    p.add_argument(
        "--max-vision-patches", type=int, help="vision patches per buffer (default: no vision budget)"
    )
    p.add_argument("--window", type=int, help="pack windows of W samples (default: everything at once)")
    p.add_argument("--seed", type=int, help="seed of the mixing subsample and pack order (default 0)")
    p.add_argument(
        "--workers",
        type=int,
        help="length-pass worker processes (0 = in process; default: auto by data size)",
    )
    p.add_argument(
        "--on-bad-sample", choices=["error", "skip"], help="stop at a bad sample (default) or skip it"
    )
    p.add_argument("--overlong", choices=list(OVERLONG_POLICIES), help=f"default {DEFAULT_CLI_OVERLONG}")
    p.add_argument("--cache-dir", type=Path, help="length cache folder (default: <out>.cache)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the length cache")
    p.add_argument("--verify-images", action="store_true", help="check image data (Pillow verify, no decode)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary table")
    return p


def _materialize_demo_data(recipe: Any) -> None:
    """data.demo: true with data.train[0].path absent -> write the demo set there (as training would)."""
    if not recipe.data.demo:
        return
    train = Path(recipe.data.train[0].path)
    if train.exists():
        return
    if train.name != "train.jsonl":
        raise DataFormatError(
            f"data.demo is true but data.train[0].path {train} is not named train.jsonl; the demo generator "
            "writes DIR/train.jsonl, so point the path at one"
        )
    from data_tools.demo_data import generate_demo_data

    generate_demo_data(train.parent)


def _settings_from_args(args: argparse.Namespace) -> tuple[list[DatasetSpec], PackSettings]:
    """Datasets and settings from the flags, or from --recipe with the flags on top."""
    base: dict[str, Any] = {
        "model": None,
        "specs": None,
        "out": None,
        "packing_length": None,
        "max_vision_patches": None,
        "window": None,
        "seed": 0,
        "workers": None,
        "on_bad_sample": "error",
        "overlong": DEFAULT_CLI_OVERLONG,
    }
    if args.recipe is not None:
        from vlmtune.config import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        _materialize_demo_data(recipe)
        if not Path(recipe.model.path).exists():
            raise DataFormatError(
                f"model.path {recipe.model.path} does not exist (model.preset={recipe.model.preset!r}); the pack "
                "needs its tokenizer and preprocessor_config.json: create the model folder first"
            )
        base.update(
            model=recipe.model.path,
            specs=[
                DatasetSpec(
                    Path(d.path), d.weight, d.format, Path(d.image_root) if d.image_root else None, d.split
                )
                for d in recipe.data.train
            ],
            out=recipe.packing.pack_dir or Path(recipe.train.output_dir) / "packs",
            packing_length=recipe.packing.packing_length,
            max_vision_patches=recipe.packing.max_vision_patches,
            window=recipe.packing.window,
            seed=recipe.packing.seed,
            workers=recipe.data.num_workers,
            on_bad_sample=recipe.data.on_bad_sample,
            overlong=recipe.data.overlong,
        )
        if args.data:
            raise DataFormatError(
                "pass the datasets either in the recipe (data.train) or with --data, not both"
            )
    elif args.overrides:
        raise DataFormatError(f"dotted overrides {args.overrides} need --recipe")
    if args.data:
        weights = args.weight or [1.0] * len(args.data)
        if len(weights) != len(args.data):
            raise DataFormatError(
                f"{len(args.data)} --data but {len(weights)} --weight; give one weight per --data"
            )
        base["specs"] = [
            DatasetSpec(path, weight, args.format or "auto", args.image_root)
            for path, weight in zip(args.data, weights)
        ]
    elif args.weight or args.format or args.image_root:
        if args.recipe is not None:
            raise DataFormatError(
                "--weight/--format/--image-root apply to --data; set them in data.train of the recipe"
            )
    for flag, key in (
        ("model", "model"),
        ("out", "out"),
        ("packing_length", "packing_length"),
        ("max_vision_patches", "max_vision_patches"),
        ("window", "window"),
        ("seed", "seed"),
        ("workers", "workers"),
        ("on_bad_sample", "on_bad_sample"),
        ("overlong", "overlong"),
    ):
        value = getattr(args, flag)
        if value is not None:
            base[key] = value
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "out", "packing_length") if base[k] is None]
    if base["specs"] is None:
        missing.insert(1, "--data")
    if missing:
        raise DataFormatError(f"missing {', '.join(missing)} (or pass --recipe R.yaml)")
    out = Path(base["out"])
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir(out))
    settings = PackSettings(
        model_dir=Path(base["model"]),
        out=out,
        packing_length=int(base["packing_length"]),
        max_vision_patches=base["max_vision_patches"],
        window=base["window"],
        seed=int(base["seed"]),
        overlong=base["overlong"],
        on_bad_sample=base["on_bad_sample"],
        workers=None if base["workers"] is None else int(base["workers"]),
        cache_dir=cache,
        verify_images=args.verify_images,
        progress=not args.quiet,
    )
    return base["specs"], settings


def main(argv: list[str]) -> int:
    """`vlmtune pack ...`; returns the exit code (0 ok, 1 the data stopped the run, 2 bad arguments)."""
    args = _parser().parse_args(argv)
    try:
        specs, settings = _settings_from_args(args)
    except (DataFormatError, ValueError) as err:
        print(f"vlmtune pack: error: {err}", file=sys.stderr)
        return 2
    try:
        build_pack(specs, settings)
    except (IngestError, DataFormatError, FileExistsError, FileNotFoundError) as err:
        print(f"vlmtune pack: error: {err}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------- inspect


def _runs(mask: np.ndarray) -> str:
    """Run-length form of a 0/1 mask: '-x12 +x5 -x3' (- unsupervised, + supervised)."""
    if len(mask) == 0:
        return ""
    change = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(mask)]])
    return " ".join(f"{'+' if mask[s] else '-'}{e - s}" for s, e in zip(starts, ends))


def describe_pack(
    reader: PackReader, index: int, tokenizer: Any = None, excerpt: int = 80
) -> list[dict[str, Any]]:
    """Per sample of buffer `index`: positions in the buffer, ids, images, spans, label mask runs, text."""
    rows = []
    position = 0
    for record in reader.pack(index):
        ids, mask = reader.sample_tokens(record.index)
        row = {
            "index": record.index,
            "id": record.sample_id,
            "where": record.where(),
            "source": record.source,
            "location": record.location,
            "positions": (position, position + len(ids)),
            "tokens": record.num_tokens,
            "patches": record.num_patches,
            "supervised": int(mask.sum()),
            "truncated": record.truncated,
            "grids": [im.grid_hw for im in record.images],
            "image_spans": [(position + s, position + e) for s, e in record.image_spans],
            "label_runs": _runs(mask),
        }
        if tokenizer is not None:
            row["text"] = _excerpt(ids, record.image_spans, record.images, tokenizer, excerpt)
            row["supervised_text"] = _clip(
                compact_text(tokenizer.decode([int(t) for t in ids[mask]])), excerpt
            )
        rows.append(row)
        position += len(ids)
    return rows


def _clip(text: str, n: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


# Template control tokens shown compactly: "S: ... | U: <image 8x6> what color? | A: red |".
_COMPACT = (
    ("<|im_system|>system<|im_middle|>", "S: "),
    ("<|im_user|>user<|im_middle|>", "U: "),
    ("<|im_assistant|>assistant<|im_middle|>", "A: "),
    ("<|im_end|>", " | "),
)


def compact_text(text: str) -> str:
    """A decoded sample with the template's role headers and <|im_end|> written as S:/U:/A: and ' | '."""
    for long, short in _COMPACT:
        text = text.replace(long, short)
    return text.strip()


def _excerpt(ids: np.ndarray, spans: Any, images: Any, tokenizer: Any, n: int) -> str:
    """Decoded text with each image's block (media wrapper + pad run) collapsed to <image hxw>."""
    pieces, cursor = [], 0
    for (s, e), image in zip(spans, images):
        pieces.append(tokenizer.decode([int(t) for t in ids[cursor:s]]))
        pieces.append(f"<image {image.grid_hw[0]}x{image.grid_hw[1]}>")
        cursor = e
    pieces.append(tokenizer.decode([int(t) for t in ids[cursor:]]))
    text = "".join(pieces)
    text = text.replace("<|media_start|>image<|media_content|>", "").replace("<|media_end|>", "")
    return _clip(compact_text(text), n)


def inspect_main(argv: list[str]) -> int:
    """`vlmtune inspect-pack DIR --pack N [--model DIR] [--width W]`: one buffer as a table."""
    p = argparse.ArgumentParser(
        prog="vlmtune inspect-pack", description="Show one packed buffer of a pack output."
    )
    p.add_argument("dir", type=Path, help="pack output folder")
    p.add_argument("--pack", type=int, default=0, help="buffer index (default 0)")
    p.add_argument(
        "--model", type=Path, help="tokenizer folder for decoded text (default: the one packed with)"
    )
    p.add_argument("--no-text", action="store_true", help="do not decode text")
    p.add_argument("--width", type=int, default=160, help="characters of decoded text per sample")
    args = p.parse_args(argv)
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    try:
        reader = PackReader(args.dir)
        if not -len(reader) <= args.pack < len(reader):
            raise PackFormatError(f"--pack {args.pack} out of range: {args.dir} holds {len(reader)} packs")
    except PackFormatError as err:
        print(f"vlmtune inspect-pack: error: {err}", file=sys.stderr)
        return 2
    tokenizer = None
    if not args.no_text:
        model_dir = args.model or Path(reader.settings["model_dir"])
        try:
            from vlmtune.models.kimi_vl.tokenization import KimiTokenizer

            tokenizer = KimiTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as err:
            print(
                f"(no decoded text: cannot load the tokenizer from {model_dir}: {err}; pass --model)",
                file=sys.stderr,
            )
    info = reader.pack_info(args.pack)
    console = Console(width=max(200, Console().width))
    L, P = reader.packing_length, reader.settings.get("max_vision_patches")
    console.print(
        f"pack {args.pack} of {len(reader)}: {len(info['samples'])} samples, {info['tokens']} / {L} tokens "
        f"({info['tokens'] / L:.1%}), {info['patches']} patches" + (f" / {P}" if P else "")
    )
    table = Table(show_lines=True)
    columns = (
        "#",
        "sample",
        "source",
        "positions",
        "tok",
        "patches",
        "images (h x w)",
        "image spans",
        "labels",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    table.add_column("text (S/U/A = system/user/assistant, | = <|im_end|>)", overflow="fold", min_width=48)
    for k, row in enumerate(describe_pack(reader, args.pack, tokenizer, args.width)):
        text = escape(row.get("text", ""))
        if "supervised_text" in row:
            text += f"\n[green]supervised:[/green] {escape(row['supervised_text'])}"
        table.add_row(
            str(k),
            escape(f"{row['id']} (#{row['index']})")
            + (" [yellow]truncated[/yellow]" if row["truncated"] else ""),
            escape(f"{Path(row['source']).name}:{row['location']}"),
            escape(f"[{row['positions'][0]}, {row['positions'][1]})"),
            str(row["tokens"]),
            str(row["patches"]),
            " ".join(f"{h}x{w}" for h, w in row["grids"]) or "-",
            escape(" ".join(f"[{s},{e})" for s, e in row["image_spans"])) or "-",
            f"{row['supervised']} sup: {row['label_runs']}",
            text,
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
