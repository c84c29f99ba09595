"""Training throughput, side by side: padded batches vs packing + rmpad; and the varlen attention backends.

    python benchmarks/throughput.py [--json OUT] [--samples 192] [--batch-size 8] [--data demo|synthetic]
                                    [--max-side 900] [--device cpu|cuda] [--dtype fp32|bf16] [--attention auto,...]

1. Samples. ``demo`` (default): the first --samples of the demo VQA set drawn at varied native resolutions
   (`data_tools.demo_data.generate_demo_data(..., max_side=900)`: image sides 56..900 px; ``--max-side`` picks
   another, recorded in the JSON; 112 = the CPU demo's small images) through the tiny model folder of
   `vlmtune init-model --preset tiny` (`_common.demo_samples`: its tokenizer and chat template, its image processor
   with in_token_limit 1024, which caps an image near 1024 patches): exact tokens and label masks from the length
   pass (`OnTheFlySource.from_datasets`) and the processed images (`load_sample`). Measured at the defaults (seeded:
   the same every run, printed by every run): 192 samples with 0-3 images, 275 images; LM tokens per sample
   min/median/max 23/177.5/859 (mean 205), per image 9/70/289 (mean 121); 85% of the tokens are image tokens. A
   long-tailed mix: most images are small, a few take ~290 tokens; a padded batch of 8 holds 2.9k to 8.7k patches,
   and the dense mask's attention work (sum of squared patches per batch) is 7.2x the per-image work. 192 samples
   (24 padded batches; it was 96): the padded peak memory is that of the batch with the most patches, so a short
   run's figures depend on where the few large images fall. ``synthetic``: lognormal text lengths, half the samples
   with one or two random-size images (no tokenizer, no image files; `kimi_vl_tiny()`).
2. Training, the tiny model (loaded from that folder; fp32 on CPU, AdamW, forward + backward + optimizer step per
   batch), the SAME samples in the SAME shuffled order:
     (a) padded: batches of B consecutive samples padded to their longest, the unpatched model's padded forward
         (its vision tower attends all the batch's patches at once through the dense block-diagonal reference mask);
         and again with only the vision tower switched to per-image sdpa_varlen, to separate the text padding's
         share of the gain from the vision tower's;
     (b) packed: the samples best-fit packed (`vlmtune.data.packing.pack_best_fit`) into packs of L tokens, L = the
         padded batches' mean allocation (B x their longest, averaged, rounded up to 64), `apply_rmpad` + the packed
         call (one (1, N) row per pack, no padding token).
   Figures: supervised tokens per second of wall time, and per CPU-second of the process (steadier on a machine
   shared with other jobs; the same supervised tokens in every mode: checked), padding fraction (tokens
   computed that are padding), pack fill, peak memory. Each mode runs in its own subprocess (a fresh allocator),
   the first batch once untimed as a warm-up (on CUDA all in this process, see `spawn`). Peak memory: CPU = peak resident set size during the timed steps
   above the RSS just before them (a thread samples /proc/self/statm every 2 ms; tracemalloc cannot see torch's
   allocations); CUDA = torch.cuda.max_memory_allocated above the allocation before the steps.
3. Attention at N = 8192 (8 segments of 1024, causal, H=4, Dh=32; on CUDA also MLA-sized H=16, q/k 192, v 128):
   forward + backward of `varlen_attention` per backend (CPU: sdpa_varlen vs sdpa_masked; CUDA adds torch_varlen
   and flash_attn when installed), time (median) and peak memory as above, each backend in its own subprocess.

Ratios printed: packed / padded supervised tokens/s and peak memory; sdpa_masked / sdpa_varlen time and memory.
Runs in ~2 minutes on 2 CPU cores with the defaults, most of it the padded runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_MAX_SIDE,
    add_json_argument,
    demo_samples,
    format_distribution,
    print_table,
    token_distribution,
    write_json,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTN_N, ATTN_SEGMENTS = 8192, 8


# ------------------------------------------------------------------------------------------------ memory probes
class PeakMemory:
    """Peak memory of a region: CUDA allocator peak on GPU, sampled resident set size on CPU (bytes above start)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS) is the best we have
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ samples
def synthetic_samples(n: int, seed: int = 0) -> tuple[list[Any], None, dict[str, Any]]:
    """Lognormal text lengths; half the samples carry one or two images of random even patch grids."""
    import numpy as np

    from vlmtune.data.batch import SampleTensors
    from vlmtune.data.special_tokens import KIMI_VL_SPECIAL_TOKENS

    base = 1792
    media = base + next(o for o, name in KIMI_VL_SPECIAL_TOKENS.items() if name == "<|media_pad|>")
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        text = int(min(max(rng.lognormal(4.5, 0.8), 16), 1200))
        grids = [(2 * int(rng.integers(2, 17)), 2 * int(rng.integers(2, 17))) for _ in range(int(rng.integers(1, 3)))
                 ] if rng.random() < 0.5 else []
        n_img = sum(h * w // 4 for h, w in grids)
        ids = torch.randint(0, base, (text + n_img,), generator=g)
        ids[4:4 + n_img] = media
        mask = torch.zeros(text + n_img, dtype=torch.bool)
        mask[-max(text // 3, 2):] = True  # the answer: the last third of the text
        pv = torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=g) if grids else None
        samples.append(SampleTensors(ids, mask, pv, torch.tensor(grids) if grids else None, i))
    return samples, None, {"source": "synthetic lognormal text + random images (kimi_vl_tiny, 1792 ranks)"}


def plan_batches(samples: list[Any], batch_size: int, seed: int) -> dict[str, Any]:
    """The shuffled order, the padded batches and the packs (indices into ``samples``) over the same samples."""
    import numpy as np

    from vlmtune.data.packing import pack_best_fit

    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    lengths = [len(s.input_ids) for s in samples]
    patches = [0 if s.pixel_values is None else int(s.pixel_values.shape[0]) for s in samples]
    padded = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    allocated = [len(b) * max(lengths[j] for j in b) for b in padded]
    budget = max(max(lengths), 64 * math.ceil(statistics.mean(allocated) / 64))
    result = pack_best_fit(np.asarray([lengths[j] for j in order]), np.asarray([patches[j] for j in order]), budget,
                           seed=seed)
    packs = [[order[j] for j in pack] for pack in result.packs]
    real = sum(lengths)
    return {"order": order, "padded": padded, "packs": packs, "packing_length": budget,
            "real_tokens": real, "padded_tokens": sum(allocated),
            "lengths": {"min": min(lengths), "median": int(statistics.median(lengths)), "max": max(lengths),
                        "mean": statistics.mean(lengths)},
            "images": sum(0 if s.image_grid_hws is None else len(s.image_grid_hws) for s in samples)}


# ------------------------------------------------------------------------------------------------ workers
def _model(model_dir: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    """The tiny model: from the init-model folder (demo data), or ``kimi_vl_tiny()`` (synthetic data)."""
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration, kimi_vl_tiny

    torch.manual_seed(0)
    if model_dir is None:
        model = KimiVLForConditionalGeneration(kimi_vl_tiny())
    else:
        model = KimiVLForConditionalGeneration.from_pretrained(model_dir)
    return model.to(device, dtype).train()


def train_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One mode (padded | packed:<backend>) over all batches; returns its figures."""
    from vlmtune.data.batch import collate_samples
    from vlmtune.patches.rmpad import apply_rmpad, rmpad_backend

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    blob = torch.load(args.samples_file, weights_only=False)
    samples, plan = blob["samples"], blob["plan"]
    model = _model(blob["model_dir"], device, dtype)
    mode, _, backend = args.worker_mode.partition(":")
    if mode == "packed":
        apply_rmpad(model, attention=backend)
    elif backend:  # padded decoder, but the vision tower's attention per image instead of its dense reference mask
        for block in model.vision_tower.encoder.blocks:
            block.attn_backend = backend
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)

    batches = []  # built before timing: collation is the loader's work
    for group in plan["padded" if mode == "padded" else "packs"]:
        b = collate_samples([samples[i] for i in group]).to(device, dtype=dtype)
        batches.append(b.to_padded() if mode == "padded" else b.to_model_inputs())
    computed = sum(int(b["input_ids"].numel()) for b in batches)

    def step(inputs: dict[str, Any]) -> int:
        out = model(**inputs, return_logits=False)
        out.loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return out.num_supervised_tokens

    step(batches[0])  # warm-up (kernels, allocator, AdamW state)
    _sync(device)
    supervised = 0
    with PeakMemory(device) as mem:
        start, cpu_start = time.perf_counter(), time.process_time()
        for inputs in batches:
            supervised += step(inputs)
        _sync(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    attention = rmpad_backend(model) if mode == "packed" else f"padded ref, ViT {backend or 'sdpa_masked'}"
    return {"mode": args.worker_mode, "attention": attention,
            "steps": len(batches), "seconds": seconds, "supervised_tokens": supervised,
            "supervised_tokens_per_s": supervised / seconds, "cpu_seconds": cpu_seconds,
            "supervised_tokens_per_cpu_s": supervised / cpu_seconds, "computed_tokens": computed,
            "padding_fraction": 1 - plan["real_tokens"] / computed, "peak_memory_mb": mem.delta_mb,
            "threads": torch.get_num_threads()}


def attention_worker(args: argparse.Namespace) -> dict[str, Any]:
    """varlen_attention forward + backward at N = 8192 for one backend and shape."""
    from vlmtune.ops.attention import varlen_attention

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    heads, dqk, dv = (int(x) for x in args.attn_shape.split(","))
    seg = ATTN_N // ATTN_SEGMENTS
    cu = torch.arange(0, ATTN_N + 1, seg, dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(ATTN_N, heads, dqk, generator=g, device=device, dtype=dtype).requires_grad_() for _ in "qk")
    v = torch.randn(ATTN_N, heads, dv, generator=g, device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(ATTN_N, heads, dv, generator=g, device=device, dtype=dtype)

    def run() -> None:
        out = varlen_attention(q, k, v, cu, cu, seg, seg, causal=True, softmax_scale=dqk**-0.5,
                               backend=args.worker_mode)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    warmup, iters = (3, 10) if device.type == "cuda" else (1, 3)
    for _ in range(warmup):
        run()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(iters):
            _sync(device)
            t = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - t)
    return {"backend": args.worker_mode, "shape": f"N={ATTN_N} ({ATTN_SEGMENTS}x{seg}) H={heads} Dqk={dqk} Dv={dv}",
            "dtype": args.dtype, "median_ms": 1e3 * statistics.median(times), "peak_memory_mb": mem.delta_mb}


def spawn(kind: str, mode: str, args: argparse.Namespace, tmp: Path, **extra: str) -> dict[str, Any]:
    """Run one measurement in a fresh Python process (CPU: a clean RSS) and read back its JSON.

    On CUDA the measurement runs in this process: the allocator's own peak counter is reset per measurement, and a
    CUDA start-up per measurement would cost more than the measurements themselves.
    """
    if torch.device(args.device).type == "cuda":
        import gc

        worker_args = argparse.Namespace(**{**vars(args), "worker_mode": mode, "samples_file": tmp / "samples.pt",
                                            **extra})
        result = (train_worker if kind == "train" else attention_worker)(worker_args)
        gc.collect()
        torch.cuda.empty_cache()
        return result
    out = tmp / f"{kind}-{mode.replace(':', '_')}-{len(list(tmp.iterdir()))}.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--worker-mode", mode, "--result-file", str(out),
           "--device", args.device, "--dtype", args.dtype, "--samples-file", str(tmp / "samples.pt"),
           "--threads", str(args.threads)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", value]
    # explicit thread count: the in-process length pass sets OMP_NUM_THREADS=1 in os.environ, children inherit it
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=192, help="samples trained on in each mode (default 192)")
    parser.add_argument("--batch-size", type=int, default=8, help="B, samples per padded batch (default 8)")
    parser.add_argument("--data", choices=("demo", "synthetic"), default="demo")
    parser.add_argument("--max-side", type=int, default=None,
                        help=f"--data demo: the demo images' longest side in px, 112..2048 (default {BENCH_MAX_SIDE}: "
                             "sides 56..900, varied native resolutions; 112 = the CPU demo's small images)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--attention", default=None,
                        help="comma-separated rmpad backends of the packed runs (default: auto; on CUDA auto,sdpa_varlen)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of every measurement (default 1: steadier on a shared machine)")
    add_json_argument(parser)
    # internal: worker processes
    parser.add_argument("--worker", choices=("train", "attention"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-mode", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--samples-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--attn-shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_side is not None and args.data != "demo":
        parser.error(f"--max-side sets the demo images' size; it has no effect with --data {args.data}")
    if args.max_side is None:
        args.max_side = BENCH_MAX_SIDE
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")

    torch.set_num_threads(args.threads)
    if args.worker:
        result = (train_worker if args.worker == "train" else attention_worker)(args)
        args.result_file.write_text(json.dumps(result))
        return 0

    backends = (args.attention or ("auto,sdpa_varlen" if cuda else "auto")).split(",")
    payload: dict[str, Any] = {"benchmark": "throughput", "device": args.device, "dtype": args.dtype,
                               "torch": torch.__version__, "threads": args.threads}
    if cuda:
        payload["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_train:
            t0 = time.perf_counter()
            samples, model_dir, info = (demo_samples(tmp, args.samples, max_side=args.max_side)
                                        if args.data == "demo" else synthetic_samples(args.samples, args.seed))
            plan = plan_batches(samples, args.batch_size, args.seed)
            dist = token_distribution(((len(s.input_ids), [] if s.image_grid_hws is None else s.image_grid_hws.tolist())
                                       for s in samples), info.get("merge_kernel_size", (2, 2)))
            torch.save({"samples": samples, "plan": plan, "model_dir": None if model_dir is None else str(model_dir)},
                       tmp / "samples.pt")
            print(f"{len(samples)} samples ({info['source']}), {plan['images']} images; {format_distribution(dist)}; "
                  f"{len(plan['padded'])} padded batches of B={args.batch_size} vs {len(plan['packs'])} packs of "
                  f"L={plan['packing_length']} tokens (prepared in {time.perf_counter() - t0:.1f} s)")
            runs = [spawn("train", "padded", args, tmp), spawn("train", "padded:sdpa_varlen", args, tmp)]
            runs += [spawn("train", f"packed:{b}", args, tmp) for b in backends]
            sup = {r["supervised_tokens"] for r in runs}
            if len(sup) != 1:
                raise RuntimeError(f"the modes trained on different supervised token counts {sup}: not the same samples")
            fill = plan["real_tokens"] / (len(plan["packs"]) * plan["packing_length"])
            base = runs[0]
            rows = [[r["mode"], r["attention"], r["steps"], r["computed_tokens"], r["padding_fraction"],
                     r["supervised_tokens_per_s"], r["supervised_tokens_per_s"] / base["supervised_tokens_per_s"],
                     r["peak_memory_mb"], r["peak_memory_mb"] / max(base["peak_memory_mb"], 1e-9)] for r in runs]
            print_table(f"Training the tiny model ({args.dtype}, {args.device}): padded vs packing + rmpad, "
                        f"same {len(samples)} samples, {base['supervised_tokens']} supervised tokens",
                        ["mode", "attention", "steps", "tokens computed", "padding", "sup. tok/s", "tok/s x padded",
                         "peak MB", "mem x padded"], rows)
            print(f"pack fill {fill:.3f}; padded batches waste {base['padding_fraction']:.1%} of their tokens")
            for r in runs[1:]:
                print(f"RATIO {r['mode']} / padded: {r['supervised_tokens_per_s'] / base['supervised_tokens_per_s']:.2f}x "
                      f"supervised tokens/s ({r['supervised_tokens_per_cpu_s'] / base['supervised_tokens_per_cpu_s']:.2f}x "
                      f"per CPU-second), {r['peak_memory_mb'] / max(base['peak_memory_mb'], 1e-9):.2f}x peak memory")
            payload["train"] = {"data": info, "token_distribution": dist, "batch_size": args.batch_size, "plan": {
                k: plan[k] for k in ("packing_length", "real_tokens", "padded_tokens", "lengths", "images")},
                "packs": len(plan["packs"]), "padded_batches": len(plan["padded"]), "pack_fill": fill, "runs": runs,
                "ratios": {r["mode"]: {"supervised_tokens_per_s": r["supervised_tokens_per_s"]
                                       / base["supervised_tokens_per_s"],
                                       "supervised_tokens_per_cpu_s": r["supervised_tokens_per_cpu_s"]
                                       / base["supervised_tokens_per_cpu_s"],
                                       "peak_memory": r["peak_memory_mb"] / max(base["peak_memory_mb"], 1e-9)}
                           for r in runs[1:]}}
        if not args.skip_attention:
            attn_backends = ["sdpa_varlen", "sdpa_masked"]
            if cuda:
                from vlmtune.ops.attention import flash_attn_available, torch_varlen_available

                attn_backends = (["torch_varlen"] if torch_varlen_available() else []) + attn_backends
                attn_backends += ["flash_attn"] if flash_attn_available() else []
            shapes = ["4,32,32"] + (["16,192,128"] if cuda else [])
            results = [spawn("attention", b, args, tmp, attn_shape=s) for s in shapes for b in attn_backends]
            rows = []
            for r in results:
                ref = next(x for x in results if x["shape"] == r["shape"] and x["backend"] == "sdpa_varlen")
                rows.append([r["shape"], r["backend"], r["median_ms"], r["median_ms"] / ref["median_ms"],
                             r["peak_memory_mb"], r["peak_memory_mb"] / max(ref["peak_memory_mb"], 1e-9)])
                if r["backend"] != "sdpa_varlen":
                    print(f"RATIO {r['backend']} / sdpa_varlen ({r['shape']}): {rows[-1][3]:.2f}x time, "
                          f"{rows[-1][5]:.2f}x peak memory")
            print_table(f"varlen_attention forward + backward, causal, {args.dtype} on {args.device}",
                        ["shape", "backend", "median ms", "x sdpa_varlen", "peak MB", "x sdpa_varlen"], rows)
            payload["attention"] = results
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
