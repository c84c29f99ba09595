"""Shared helpers of the benchmarks: ``--json OUT``, timing, a table (rich when installed) and targets.

Usage in a benchmark script (run as ``python benchmarks/NAME.py``, so this module is importable)::

    from _common import Target, add_json_argument, check_targets, print_table, timed, write_json

    parser = argparse.ArgumentParser(); add_json_argument(parser); args = parser.parse_args()
    result, seconds = timed(fn, *fn_args)
    print_table("title", ["name", "ratio"], [["ours", 1.0]])
    ok = check_targets([Target("ours ratio", 1.0, "<=", 1.002)])
    write_json(args.json, {"benchmark": "name", "results": ..., "targets": ...})
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
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
