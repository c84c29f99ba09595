"""Header-only image lengths vs a full decode + processing of the same images, side by side in one run.

    python benchmarks/lengths.py [--images 300] [--json OUT] [--demo-samples 600] [--max-side 900]

1. Writes `--images` PNG and JPEG files of varied sizes and aspect ratios (56 to 2400 px a side) to a temp dir.
2. Header pass (what `vlmtune pack` does): `formats.read_image_size` (PIL.Image.open parses the header only)
   + `KimiVLImageProcessor.num_image_tokens`.
3. Full pass (what a naive packer does): open + decode + convert to RGB + the processor's resize / pad /
   normalise / patchify, tokens = patches / 4.
4. Asserts both give the same token count for every image, prints the time of each (one core each, best of
   `--repeats`) and the ratio (target >= 10x).
5. With `--demo-samples N` (default 600, 0 to skip): times `vlmtune pack` end to end on the demo data (cold,
   then again with the length cache), its images 56..`--max-side` px (default 900, the varied-resolution set;
   recorded in the JSON). The pack reads image headers only, so the image size barely moves this timing: it changes
   the token counts, hence the packs, not the work per image (600 samples: 0.84 s cold at 900 px, 0.80 s at 112).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import BENCH_MAX_SIDE
from PIL import Image, ImageDraw


def write_images(out: Path, n: int, seed: int = 0) -> list[Path]:
    """n images, alternately PNG and JPEG, random sizes (log-uniform short side, varied aspect ratios)."""
    rng = random.Random(seed)
    paths = []
    for k in range(n):
        ratio = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3.0])
        short = round(math.exp(rng.uniform(math.log(56), math.log(1400))))
        long = min(2400, round(short * ratio))
        size = (long, short) if rng.random() < 0.5 else (short, long)
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(8):  # some structure so the codecs do real work
            x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
            draw.ellipse(
                (x0, y0, x0 + size[0] // 4, y0 + size[1] // 4),
                fill=tuple(rng.randrange(256) for _ in range(3)),
            )
        buffer = io.BytesIO()
        if k % 2:
            path = out / f"img{k:04d}.jpg"
            image.save(buffer, format="JPEG", quality=90)
        else:
            path = out / f"img{k:04d}.png"
            image.save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def header_pass(paths: list[Path], processor: Any) -> list[int]:
    from vlmtune.data.formats import ImageSource, read_image_size

    return [processor.num_image_tokens(*read_image_size(ImageSource({"path": str(p)}))) for p in paths]


def full_pass(paths: list[Path], processor: Any) -> list[int]:
    from vlmtune.data.formats import ImageOpener

    opener = ImageOpener()
    tokens = []
    for p in paths:
        image = opener.open({"path": str(p)})  # decode + RGB
        out = processor([image])  # resize / pad / normalise / patchify
        tokens.append(int(out["pixel_values"].shape[0]) // 4)
    return tokens


def pack_demo(samples: int, workdir: Path, max_side: int) -> dict[str, Any]:
    """`vlmtune pack` on the demo data (images 56..max_side px): cold (no cache), then warm (cache hit); stats."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "data"))
    from conftest import build_tiny_model_dir  # the tests' tiny model folder (tokenizer + processor config)

    from data_tools.demo_data import generate_demo_data
    from vlmtune.data.pack_cli import main

    model = build_tiny_model_dir(workdir / "model", in_token_limit=4096)
    generate_demo_data(workdir / "demo", samples=samples, eval_samples=6, seed=0, max_side=max_side)
    argv = [
        "--model",
        str(model),
        "--data",
        str(workdir / "demo" / "train.jsonl"),
        "--out",
        str(workdir / "packs"),
        "--packing-length",
        "8192",
        "--workers",
        "0",
        "--quiet",
    ]
    result: dict[str, Any] = {"samples": samples, "max_side": max_side}
    for name in ("cold", "warm"):
        start = time.perf_counter()
        if main(argv) != 0:
            raise RuntimeError("vlmtune pack failed on the demo data")
        result[f"{name}_seconds"] = round(time.perf_counter() - start, 3)
    stats = json.loads((workdir / "packs" / "stats.json").read_text())
    result.update(
        packs=stats["packs"],
        lower_bound_packs=stats["lower_bound_packs"],
        fill_ratio=stats["fill_ratio"],
        warm_files_from_cache=stats["cache"]["files_from_cache"],
        seconds_breakdown_warm=stats["seconds"],
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="best of R timings for each pass")
    parser.add_argument("--demo-samples", type=int, default=600, help="0 = skip the vlmtune pack timing")
    parser.add_argument("--max-side", type=int, default=None,
                        help=f"longest side (px) of the demo images of the `vlmtune pack` timing, 112..2048 "
                             f"(default {BENCH_MAX_SIDE})")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.max_side is not None and not args.demo_samples:
        parser.error("--max-side sizes the demo images of the `vlmtune pack` timing; it has no effect with "
                     "--demo-samples 0")
    if args.max_side is None:
        args.max_side = BENCH_MAX_SIDE

    import torch

    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor

    torch.set_num_threads(1)  # both passes on one core: a per-core comparison, stable on a shared machine

    processor = KimiVLImageProcessor.kimi_vl_a3b()  # in_token_limit 4096, pad_input true
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images)
        header_s, full_s = math.inf, math.inf
        for _ in range(args.repeats):
            start = time.perf_counter()
            header_tokens = header_pass(paths, processor)
            header_s = min(header_s, time.perf_counter() - start)
            start = time.perf_counter()
            full_tokens = full_pass(paths, processor)
            full_s = min(full_s, time.perf_counter() - start)
        if header_tokens != full_tokens:
            bad = [(p.name, a, b) for p, a, b in zip(paths, header_tokens, full_tokens) if a != b][:5]
            raise AssertionError(f"header and full passes disagree on token counts: {bad}")
        result: dict[str, Any] = {
            "images": len(paths),
            "total_image_tokens": sum(header_tokens),
            "header_seconds": round(header_s, 4),
            "full_decode_seconds": round(full_s, 4),
            "header_images_per_s": round(len(paths) / header_s, 1),
            "full_images_per_s": round(len(paths) / full_s, 1),
            "speedup": round(full_s / header_s, 1),
            "target_speedup": 10.0,
        }
        print(
            f"{len(paths)} images ({sum(header_tokens)} LM tokens, counts identical): header-only {header_s * 1e3:.1f} ms, "
            f"full decode + processing {full_s * 1e3:.1f} ms -> header pass {result['speedup']:.1f}x faster (target >= 10x)"
        )
        if args.demo_samples:
            demo = pack_demo(args.demo_samples, Path(tmp), args.max_side)
            result["vlmtune_pack_demo"] = demo
            print(
                f"vlmtune pack on the demo data ({demo['samples']} samples, images 56..{demo['max_side']} px): "
                f"{demo['cold_seconds']:.2f} s cold, "
                f"{demo['warm_seconds']:.2f} s with the length cache; {demo['packs']} packs "
                f"(lower bound {demo['lower_bound_packs']}), fill {demo['fill_ratio']:.4f}"
            )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["speedup"] >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
