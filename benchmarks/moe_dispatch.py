"""MoE expert dispatch, forward + backward, side by side: our grouped dispatch vs a naive dense-mask loop.

    python benchmarks/moe_dispatch.py [--experts 64] [--top-k 6] [--hidden 256] [--intermediate 128]
                                      [--tokens 4096] [--repeats 3] [--threads 1] [--json OUT]

One :class:`vlmtune.models.kimi_vl.moe.KimiVLMoE` (same weights, same inputs for every row), timed on
``loss = sum(out * g)`` forward + backward:

* ``naive dense-mask``: every expert on ALL tokens, multiplied by a masked routing weight (0 where not chosen): what
  a "loop over experts with masks" implementation computes, E/K times the necessary expert FLOPs.
* ``grouped loop``: ours, ``expert_backend="loop"`` (tokens sorted by expert, each expert once on its contiguous slice,
  index_add_ back). The default.
* ``grouped grouped_mm``: ours, ``expert_backend="grouped_mm"`` (torch.nn.functional.grouped_mm on the stacked expert
  weights), in fp32 and again in bf16 next to the bf16 loop.

Router and shared experts are the same module calls in every row. Outputs and input gradients are checked against the
naive row. Exit status 1 when the target is missed: naive / grouped loop >= 3 (fp32).

``--sweep`` also times the expert compute alone (loop vs grouped_mm) at larger sizes, up to the A3B expert size.

Finding (torch 2.13 CPU, one thread, a shared 2-core machine; naive / grouped loop 6.7-7.8x over several runs):
grouped_mm runs on CPU for fp32/bf16/fp16 (not fp64; row strides must be multiples of 16 bytes; its backward rejects
zero-stride gradients, which our graph never produces). It is 1.0-1.2x faster than the loop at the default size, level
at D 512 / I 256, and about 3x SLOWER at the A3B expert size (D 2048, I 1408, 512 tokens: loop 3.0 s vs 8.1 s fp32,
0.88 s vs 2.7 s bf16), because the 3 x E expert weights must be re-stacked from the ModuleList every call (and their
gradients split back), and the stacked copy is kept for backward. The loop stays the default; it is also the only
path for fp64 and for peft-wrapped (LoRA) experts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _common import Target, add_json_argument, check_targets, print_table, targets_json, write_json

from vlmtune.models.kimi_vl.configuration import KimiVLTextConfig
from vlmtune.models.kimi_vl.moe import KimiVLMoE


def build(args: argparse.Namespace, dtype: torch.dtype) -> tuple[KimiVLMoE, torch.Tensor, torch.Tensor]:
    cfg = KimiVLTextConfig(hidden_size=args.hidden, moe_intermediate_size=args.intermediate, n_routed_experts=args.experts,
                           num_experts_per_tok=args.top_k, n_shared_experts=1, n_group=1, topk_group=1,
                           aux_loss_alpha=0.0, num_hidden_layers=2, vocab_size=64)
    torch.manual_seed(args.seed)
    moe = KimiVLMoE(cfg)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0, 0.5 if name.startswith("gate.") else 0.05)
    moe = moe.to(dtype).eval()
    x = torch.randn(args.tokens, args.hidden).to(dtype)
    g = torch.randn(args.tokens, args.hidden).to(dtype)
    return moe, x, g


def naive_forward(moe: KimiVLMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token times a masked weight (N, E) with zeros where the expert was not chosen."""
    _, idx, w = moe.gate(x)
    dense_w = torch.zeros(x.shape[0], moe.num_experts, dtype=w.dtype).scatter_(1, idx, w)  # (N, E)
    out = moe.shared_experts(x)
    for e, expert in enumerate(moe.experts):
        out = out + (expert(x).to(w.dtype) * dense_w[:, e : e + 1]).to(x.dtype)
    return out


def grouped_forward(backend: str) -> Callable[[KimiVLMoE, torch.Tensor], torch.Tensor]:
    def fn(moe: KimiVLMoE, x: torch.Tensor) -> torch.Tensor:
        moe.expert_backend = backend
        return moe(x)[0]

    return fn


def fwd_bwd(fn: Callable, moe: KimiVLMoE, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    moe.zero_grad(set_to_none=True)
    xr = x.detach().requires_grad_(True)
    out = fn(moe, xr)
    (out * g).sum().backward()
    return out.detach(), xr.grad


def measure_interleaved(variants: list[tuple], repeats: int) -> list[list[float]]:
    """Time every variant ``repeats`` times, round-robin (A B C A B C ...), so a noisy neighbour slows all alike."""
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for i, (_, _, fn, moe, x, g) in enumerate(variants):
            start = time.perf_counter()
            fwd_bwd(fn, moe, x, g)
            times[i].append(time.perf_counter() - start)
    return times


def expert_compute_sweep(args: argparse.Namespace, shapes: list[tuple[int, int, int]]) -> list[dict]:
    """Expert compute only (sorted tokens in, expert outputs out, fwd + bwd): loop vs grouped_mm at other sizes."""
    rows = []
    for d, inter, n in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            sub = argparse.Namespace(**{**vars(args), "hidden": d, "intermediate": inter, "tokens": n})
            moe, x, _ = build(sub, dtype)
            with torch.no_grad():
                idx = moe.gate(x)[1].reshape(-1)  # (N*K,)
            sorted_expert, order = idx.sort(stable=True)
            counts = torch.bincount(sorted_expert, minlength=args.experts)  # (E,)
            xs = x[order // args.top_k]  # (N*K, D) expert-sorted tokens
            g = torch.randn_like(xs)
            best = {}
            for name in ("loop", "grouped_mm"):
                times = []
                for _ in range(args.repeats + 1):  # the first call is a warm-up
                    moe.zero_grad(set_to_none=True)
                    xr = xs.detach().requires_grad_(True)
                    start = time.perf_counter()
                    ys = (moe._experts_loop(xr, counts.tolist()) if name == "loop"
                          else moe._experts_grouped_mm(xr, counts))  # (N*K, D)
                    (ys * g).sum().backward()
                    times.append(time.perf_counter() - start)
                best[name] = min(times[1:])
            rows.append({"D": d, "I": inter, "tokens": n, "dtype": str(dtype).replace("torch.", ""),
                         "loop_s": best["loop"], "grouped_mm_s": best["grouped_mm"],
                         "loop_over_grouped_mm": best["loop"] / best["grouped_mm"]})
    print_table(f"Expert compute only, fwd+bwd, E={args.experts}, top-{args.top_k} (min of {args.repeats})",
                ["D", "I", "tokens", "dtype", "loop s", "grouped_mm s", "loop / grouped_mm"],
                [[r["D"], r["I"], r["tokens"], r["dtype"], r["loop_s"], r["grouped_mm_s"], r["loop_over_grouped_mm"]]
                 for r in rows])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: timings on a shared machine are far steadier)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", action="store_true",
                        help="also time the expert compute alone, loop vs grouped_mm, at (256, 128, 4096), "
                             "(512, 256, 2048) and the A3B expert size (2048, 1408, 512) (D, I, tokens); needs ~3 GB")
    add_json_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    have_grouped_mm = hasattr(torch.nn.functional, "grouped_mm")

    plan = [("naive dense-mask", torch.float32, naive_forward), ("grouped loop", torch.float32, grouped_forward("loop"))]
    if have_grouped_mm:
        plan.append(("grouped grouped_mm", torch.float32, grouped_forward("grouped_mm")))
    plan.append(("grouped loop", torch.bfloat16, grouped_forward("loop")))
    if have_grouped_mm:
        plan.append(("grouped grouped_mm", torch.bfloat16, grouped_forward("grouped_mm")))
    variants = [(name, dtype, fn, *build(args, dtype)) for name, dtype, fn in plan]

    # One untimed call each (warm-up), whose outputs and input gradients are compared with the first row of the same
    # dtype (naive in fp32, the loop in bf16: bf16 inputs can route some near-tie tokens differently from fp32).
    reference: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
    results = []
    for name, dtype, fn, moe, x, g in variants:
        out, gx = fwd_bwd(fn, moe, x, g)
        ref = reference.setdefault(dtype, (out, gx))
        with torch.no_grad():
            load = torch.bincount(moe.gate(x)[1].reshape(-1), minlength=args.experts)  # (E,) tokens per expert
        results.append({"variant": name, "dtype": str(dtype).replace("torch.", ""),
                        "reference": next(v[0] for v in variants if v[1] == dtype),
                        "max_abs_diff_out": (out.float() - ref[0].float()).abs().max().item(),
                        "max_abs_diff_grad_x": (gx.float() - ref[1].float()).abs().max().item(),
                        "expert_load_max_over_mean": float(load.max()) / float(load.float().mean())})
    times = measure_interleaved(variants, args.repeats)
    seconds: dict[tuple[str, torch.dtype], float] = {}
    for r, (name, dtype, *_), t in zip(results, variants, times):
        r["seconds_min"], r["seconds_median"], r["seconds_all"] = min(t), statistics.median(t), t
        seconds[(name, dtype)] = min(t)
    naive = seconds[("naive dense-mask", torch.float32)]
    loop32 = seconds[("grouped loop", torch.float32)]
    rows = []
    for r in results:
        r["speedup_vs_naive_fp32"] = naive / r["seconds_min"]
        rows.append([r["variant"], r["dtype"], r["seconds_min"], r["seconds_median"], r["speedup_vs_naive_fp32"],
                     r["reference"], f"{r['max_abs_diff_out']:.1e}", f"{r['max_abs_diff_grad_x']:.1e}"])
    print_table(f"MoE forward+backward: {args.tokens} tokens, E={args.experts}, top-{args.top_k}, D={args.hidden}, "
                f"I={args.intermediate}, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats",
                ["variant", "dtype", "s (min)", "s (median)", "naive fp32 / this", "diffs vs", "max|out diff|",
                 "max|grad x diff|"], rows)

    ratio = naive / loop32
    print(f"\nnaive dense-mask / grouped loop (fp32): {ratio:.2f}x")
    if have_grouped_mm:
        print(f"grouped loop / grouped_mm: fp32 {seconds[('grouped loop', torch.float32)] / seconds[('grouped grouped_mm', torch.float32)]:.2f}x, "
              f"bf16 {seconds[('grouped loop', torch.bfloat16)] / seconds[('grouped grouped_mm', torch.bfloat16)]:.2f}x "
              "(> 1 means grouped_mm is faster)")
    fp32 = [r for r in results if r["dtype"] == "float32"]
    targets = [Target("naive / grouped loop (fp32)", ratio, ">=", 3.0),
               Target("max |out diff| fp32 vs naive", max(r["max_abs_diff_out"] for r in fp32), "<=", 1e-4),
               Target("max |grad x diff| fp32 vs naive", max(r["max_abs_diff_grad_x"] for r in fp32), "<=", 1e-4)]
    ok = check_targets(targets)
    sweep = []
    if args.sweep and have_grouped_mm:
        sweep = expert_compute_sweep(args, [(256, 128, 4096), (512, 256, 2048), (2048, 1408, 512)])
    write_json(args.json, {"sweep": sweep, "benchmark": "moe_dispatch", "config": vars(args) | {"json": str(args.json)},
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "grouped_mm_available": have_grouped_mm, "results": results,
                           "ratio_naive_over_grouped_loop_fp32": ratio, "targets": targets_json(targets)})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
