"""`make demo`: prove on a CPU, in minutes, that fine-tuning teaches the tiny Kimi-VL to SEE.

    1. demo data      data_tools.demo_data -> .cache/demo_data (train + held-out eval, answers need the image)
    2. tiny model     vlmtune init-model --preset tiny -> .cache/tiny_model (random weights, local tokenizer)
    3. before         closed-set answer accuracy on the held-out split (and the blind baseline: the most frequent
                      answer of each question type, the best a model that ignores images can do)
    4. train          recipes/tiny_cpu.yaml: pack -> ZeRO-2 + rmpad + gradient checkpointing, eval along the way
    5. export         HF-format model dir (published key names, tokenizer, processor, chat template)
    6. after          accuracy of the EXPORTED model on the held-out split
    7. generate       answers for a few held-out images, greedy, with the KV cache
    8. report         runs/demo/summary.json, runs/demo/loss.png, runs/demo/accuracy.png

Re-runnable: runs/demo is replaced on every run; the cached data and model are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny_cpu.yaml"


def _accuracy_plot(before: dict[str, Any], after: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qtypes = sorted(after["accuracy_by_qtype"])
    x = range(len(qtypes))
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.27
    ax.bar([i - w for i in x], [after["chance_by_qtype"][q] for q in qtypes], w, label="blind baseline",
           color="tab:gray")
    ax.bar(list(x), [before["accuracy_by_qtype"].get(q, 0) for q in qtypes], w, label="before", color="tab:orange")
    ax.bar([i + w for i in x], [after["accuracy_by_qtype"][q] for q in qtypes], w, label="after", color="tab:blue")
    ax.set_xticks(list(x))
    ax.set_xticklabels(qtypes)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("tiny Kimi-VL on the demo VQA set: closed-set answer accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run(overrides: list[str], out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Run the whole demo; returns the summary (also written to out_dir/summary.json)."""
    import torch

    from vlmtune.config import load_recipe
    from vlmtune.generate import generate
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.tokenization import KimiTokenizer
    from vlmtune.train.evaluate import evaluate, load_eval_samples
    from vlmtune.train.export import export_checkpoint
    from vlmtune.train.trainer import ensure_assets, train

    t0 = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    recipe = load_recipe(RECIPE, [f"train.output_dir={out_dir}", "train.resume=never", *overrides])
    ensure_assets(recipe)  # demo data + tiny model, generated on first use
    eval_file = Path(recipe.data.eval[0].path) if recipe.data.eval else Path(recipe.data.train[0].path).with_name(
        "eval.jsonl")
    eval_n = recipe.train.eval_samples
    tok = KimiTokenizer.from_pretrained(recipe.model.path)
    proc = KimiVLImageProcessor.from_pretrained(recipe.model.path)

    print("[demo] accuracy before training ...", flush=True)
    base = KimiVLForConditionalGeneration.from_pretrained(recipe.model.path)
    before = evaluate(base, tok, proc, eval_file, max_samples=eval_n)
    del base

    print("[demo] training recipes/tiny_cpu.yaml ...", flush=True)
    summary_train = train(recipe)
    ckpt_dir = Path(summary_train["checkpoint"])

    print("[demo] exporting ...", flush=True)
    export_dir = export_checkpoint(ckpt_dir, out_dir / "export", mode="full")

    print("[demo] accuracy after training (exported model) ...", flush=True)
    model = KimiVLForConditionalGeneration.from_pretrained(export_dir)
    after = evaluate(model, tok, proc, eval_file, max_samples=eval_n)

    print("[demo] generating answers for held-out images ...", flush=True)
    samples, _ = load_eval_samples(eval_file, 40)
    gens = []
    for s in [s for s in samples if any(isinstance(m["content"], list) and any(
            b.get("type") == "image" for b in m["content"]) for m in s["messages"])][: (3 if quick else 6)]:
        first_user = next(m for m in s["messages"] if m["role"] == "user")
        text = " ".join(b["text"] for b in first_user["content"] if b.get("type") == "text")
        images = [str(eval_file.parent / b["image"]) for b in first_user["content"] if b.get("type") == "image"]
        answer = generate(model, tok, proc, text, images, max_new_tokens=4)
        expected = s["meta"]["turns"][0]["answer"] if "turns" in s["meta"] else s["meta"]["answer"]
        gens.append({"id": s["id"], "question": text, "images": images, "generated": answer.strip(),
                     "expected": expected})

    _accuracy_plot(before, after, out_dir / "accuracy.png")
    summary = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "chance_accuracy": after["chance_accuracy"],
        "accuracy_image_questions_before": before["accuracy_image_questions"],
        "accuracy_image_questions_after": after["accuracy_image_questions"],
        "chance_image_questions": after["chance_image_questions"],
        "accuracy_by_qtype_before": before["accuracy_by_qtype"],
        "accuracy_by_qtype_after": after["accuracy_by_qtype"],
        "chance_by_qtype": after["chance_by_qtype"],
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
        "eval_samples_scored": after["scored"],
        "steps": summary_train["steps"],
        "final_loss": summary_train["final_loss"],
        "first_loss": summary_train["first_loss"],
        "export_dir": str(export_dir),
        "generations": gens,
        "wall_s": round(time.time() - t0, 1),
        "target_met": bool(after["accuracy"] >= after["chance_accuracy"] + 0.20
                           and after["accuracy"] > before["accuracy"]),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _print_report(summary)
    return summary


def _print_report(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vlmtune demo: held-out closed-set accuracy")
    table.add_column("")
    table.add_column("all questions", justify="right")
    table.add_column("image questions", justify="right")
    table.add_row("blind baseline", f"{s['chance_accuracy']:.3f}", f"{s['chance_image_questions']:.3f}")
    table.add_row("before training", f"{s['accuracy_before']:.3f}", f"{s['accuracy_image_questions_before']:.3f}")
    table.add_row("after training", f"{s['accuracy_after']:.3f}", f"{s['accuracy_image_questions_after']:.3f}")
    c = Console()
    c.print(table)
    for g in s["generations"]:
        c.print(f"  {g['id']}: {g['question']!r} -> generated {g['generated']!r} (expected {g['expected']!r})")
    c.print(f"steps {s['steps']}, loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}, wall {s['wall_s']:.0f} s, "
            f"target (after >= chance + 0.20 and > before) {'MET' if s['target_met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmtune.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    summary = run(args.overrides, args.out)
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
