"""Shared helpers of the benchmarks: ``--json OUT``, timing, a table (rich when installed), targets, demo samples.

Usage in a benchmark script (run as ``python benchmarks/NAME.py``, so this module is importable)::

    from _common import Target, add_json_argument, check_targets, print_table, timed, write_json

    parser = argparse.ArgumentParser(); add_json_argument(parser); args = parser.parse_args()
    result, seconds = timed(fn, *fn_args)
    print_table("title", ["name", "ratio"], [["ours", 1.0]])
    ok = check_targets([Target("ours ratio", 1.0, "<=", 1.002)])
    write_json(args.json, {"benchmark": "name", "results": ..., "targets": ...})

Demo data: :func:`demo_samples` (the demo VQA set through the tiny model folder, as tensors) and
:func:`token_distribution` / :func:`format_distribution` (tokens per sample and per image, to print what was measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--json OUT``: where to write the measured figures (nothing written when absent)."""
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="write the results as JSON to OUT"
    )


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
    }


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write `payload` plus ``environment`` to `path` (indented, keys in insertion order); no-op for None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "environment": environment()}, indent=2) + "\n")
    print(f"wrote {path}")


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """(fn(*args, **kwargs), wall seconds)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table: rich when installed, aligned plain text otherwise. Floats get 5 decimals (< 10) or 2."""
    cells = [[_cell(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [
            max(len(c), *(len(r[k]) for r in cells)) if cells else len(c) for k, c in enumerate(columns)
        ]
        print(f"\n{title}")
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        return
    table = Table(title=title)
    for k, column in enumerate(columns):
        table.add_column(column, justify="left" if k == 0 else "right", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    # Wide enough for the widest cell of each column (header or value) plus the borders: never wrap.
    width = sum(max(len(c), *(len(r[k]) for r in cells)) if cells else len(c) for k, c in enumerate(columns))
    Console(width=max(width + 3 * len(columns) + 1, len(title))).print(table)


@dataclass
class Target:
    """A figure and the bound it must meet, e.g. Target("packs / lower bound", 1.0003, "<=", 1.002)."""

    name: str
    value: float
    op: str
    bound: float

    @property
    def met(self) -> bool:
        if self.op == "<=":
            return self.value <= self.bound
        if self.op == ">=":
            return self.value >= self.bound
        raise ValueError(f"Target {self.name!r}: op must be '<=' or '>=', got {self.op!r}")


def check_targets(targets: Sequence[Target]) -> bool:
    """Print each target as MET/MISSED; True when all are met."""
    print("\nTargets")
    for t in targets:
        print(f"  {'MET   ' if t.met else 'MISSED'}  {t.name}: {_cell(t.value)} {t.op} {_cell(t.bound)}")
    return all(t.met for t in targets)


def targets_json(targets: Sequence[Target]) -> list[dict[str, Any]]:
    """Targets as JSON rows (with ``met``)."""
    return [{**asdict(t), "met": t.met} for t in targets]


# ------------------------------------------------------------------------------------------------ demo data
#: the varied-resolution demo set (`generate_demo_data(..., max_side=900)`): sides 56..900 px, the range of real
#: native-resolution VLM data; the speed benchmarks measure on it by default (the generator's own default, 112 px,
#: is sized for the CPU demo's learning speed, not for measuring)
BENCH_MAX_SIDE = 900


def demo_samples(root: Path, n: int, *, max_side: int) -> tuple[list[Any], Path, dict[str, Any]]:
    """Demo VQA samples through the tiny model folder's tokenizer, chat template and image processor.

    Writes the demo set (`data_tools.demo_data.generate_demo_data`, seed 0, at least 6 samples) under
    ``root / "demo"`` and the model folder of `vlmtune init-model --preset tiny` (seed 0; its image processor has
    in_token_limit 1024: at most 1024 patches, 256 LM tokens, per image) under ``root / "model"``, then tokenizes
    the first ``n`` samples exactly as training does (`OnTheFlySource.from_datasets` + `load_sample`).

    Args:
        root: an empty work folder.
        n: samples wanted (the first n of the set, in its order).
        max_side: the demo images' longest side in px (`generate_demo_data`'s max_side: 112 = the CPU demo's small
            images, :data:`BENCH_MAX_SIDE` = 900 = varied native resolutions).

    Returns:
        (samples as `SampleTensors`, the model folder, info: source description, max_side, merge_kernel_size).
    """
    from data_tools.demo_data import generate_demo_data
    from vlmtune.data.formats import DatasetSpec
    from vlmtune.data.on_the_fly import OnTheFlySource
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.init_model import init_model

    generate_demo_data(root / "demo", samples=max(n, 6), eval_samples=6, seed=0, max_side=max_side)
    model_dir = init_model(root / "model", preset="tiny", seed=0)
    processor = KimiVLImageProcessor.from_pretrained(model_dir)
    source = OnTheFlySource.from_datasets([DatasetSpec(root / "demo" / "train.jsonl")], model_dir,
                                          packing_length=1 << 20)
    samples = [source.load_sample(i, processor) for i in range(min(n, source.num_samples))]
    return samples, model_dir, {
        "source": f"demo VQA set (images 56..{max_side} px) through the tiny model folder (vlmtune init-model: "
                  "tokenizer, chat template, image processor in_token_limit 1024)",
        "max_side": max_side, "merge_kernel_size": list(processor.merge_kernel_size)}


def _summary(values: Sequence[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "min": None, "median": None, "max": None, "mean": None}
    return {"count": len(values), "min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": statistics.fmean(values)}


def token_distribution(samples: Iterable[tuple[int, Sequence[tuple[int, int]]]],
                       merge_kernel_size: Sequence[int] = (2, 2)) -> dict[str, Any]:
    """LM tokens per sample and per image (count, min, median, max, mean), and images per sample.

    Args:
        samples: (LM tokens of the sample, image tokens included; (h, w) patch grid of each of its images).
        merge_kernel_size: (kh, kw) of the patch merger: an image of h x w patches is (h // kh) * (w // kw) tokens.
    """
    from vlmtune.models.kimi_vl.image_processing import grid_tokens

    per_sample, per_image, images = [], [], []
    for tokens, grids in samples:
        per_sample.append(int(tokens))
        per_image += [grid_tokens(g, merge_kernel_size) for g in grids]
        images.append(len(grids))
    image_tokens = sum(per_image)
    return {"tokens_per_sample": _summary(per_sample), "tokens_per_image": _summary(per_image),
            "images_per_sample": _summary(images),
            "image_token_share": image_tokens / max(sum(per_sample), 1)}


def format_distribution(dist: dict[str, Any]) -> str:
    """One line: ``tokens per sample min/median/max ...; per image ...; ... image tokens``."""
    s, i = dist["tokens_per_sample"], dist["tokens_per_image"]

    def mmm(d: dict[str, Any]) -> str:
        return "-" if not d["count"] else f"{d['min']}/{d['median']:g}/{d['max']} (mean {d['mean']:.0f})"

    return (f"LM tokens min/median/max per sample {mmm(s)} over {s['count']} samples; per image {mmm(i)} over "
            f"{i['count']} images; image tokens {dist['image_token_share']:.1%} of all")
