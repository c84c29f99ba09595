"""`make bench`: run every benchmark side by side, each writing runs/bench/<name>.json, then print one table.

Each benchmark measures ours against a baseline in the same run and prints the ratio; nothing here asserts time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ["packing", "lengths", "moe_dispatch", "loader", "throughput", "memory"]


def main() -> int:
    out_dir = ROOT / "runs" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    rows = []
    for name in BENCHES:
        script = ROOT / "benchmarks" / f"{name}.py"
        if not script.is_file():
            rows.append((name, "missing", ""))
            continue
        t0 = time.time()
        out = out_dir / f"{name}.json"
        rc = subprocess.call([sys.executable, str(script), "--json", str(out)], cwd=ROOT)
        rows.append((name, "ok" if rc == 0 else f"exit {rc}", f"{time.time() - t0:.0f} s"))
        if rc != 0:
            failed.append(name)
    print("\nbenchmark        status   time   json")
    for name, status, dt in rows:
        print(f"{name:<16} {status:<8} {dt:>6}   runs/bench/{name}.json")
    if failed:
        print(f"failed: {failed}")
    summary = {name: json.loads((out_dir / f"{name}.json").read_text())
               for name, status, _ in rows if status == "ok" and (out_dir / f"{name}.json").is_file()}
    (out_dir / "all.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
