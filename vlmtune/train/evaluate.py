"""Evaluation: eval loss and closed-set answer accuracy.

Answer scoring over a closed answer set: for a sample whose final assistant answer has a known set of candidates
(``meta.choices`` on the sample, or ``answer_sets[meta.qtype]`` in a ``metadata.json`` beside the data file, as the
demo data writes), every candidate replaces the final answer, and the candidate whose tokens (answer + closing
``<|im_end|>``) get the highest total log-likelihood is the model's answer. This measures what the model believes
without a decoding heuristic, and it is exactly comparable with the blind baseline (the most frequent answer of each
question type)::

    prompt (system, user turns, images, earlier answers)  |  candidate answer  <|im_end|>
    ---------------------- context ----------------------  |  ----- scored: sum log p -----

The eval loss is the token mean of the cross-entropy over every supervised token of the eval samples (all assistant
turns), the same definition as the training loss. Every rank evaluates the same samples (no collective needed, and
ZeRO-3's parameter gathering stays in lock-step); eval sets are meant to be small.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmtune.data.chat_template import apply_chat_template
from vlmtune.train.loss import IGNORE_INDEX


def load_eval_samples(path: Path, max_samples: int | None = None) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Messages-format JSONL samples and the closed answer sets (from metadata.json beside the file, if any)."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                samples.append(json.loads(line))
            if max_samples is not None and len(samples) >= max_samples:
                break
    meta_file = path.parent / "metadata.json"
    answer_sets = json.loads(meta_file.read_text()).get("answer_sets", {}) if meta_file.is_file() else {}
    return samples, answer_sets


def _images_of(messages: list[dict[str, Any]], root: Path) -> list[Image.Image]:
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            for block in m["content"]:
                if block.get("type") in ("image", "image_url"):
                    ref = block.get("image") or block.get("image_url")
                    if isinstance(ref, dict):
                        ref = ref.get("url")
                    out.append(Image.open(root / ref).convert("RGB"))
    return out


def _with_final_answer(messages: list[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
    msgs = [dict(m) for m in messages]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    msgs[last] = {"role": "assistant", "content": answer}
    return msgs[: last + 1]


def _final_turn_mask(label_mask: list[bool]) -> list[bool]:
    """Keep only the last run of supervised tokens (the final assistant answer + its <|im_end|>)."""
    out = [False] * len(label_mask)
    i = len(label_mask) - 1
    while i >= 0 and not label_mask[i]:
        i -= 1
    while i >= 0 and label_mask[i]:
        out[i] = True
        i -= 1
    return out


@torch.no_grad()
def _forward_rows(model: Any, rows: list[tuple[list[int], list[bool]]], pixel_values: torch.Tensor | None,
                  grids: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-likelihood of the masked tokens and their counts (padded batch, images per row)."""
    T = max(len(ids) for ids, _ in rows)
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    lab = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for r, (x, m) in enumerate(rows):
        ids[r, : len(x)] = torch.tensor(x)
        att[r, : len(x)] = 1
        lab[r, : len(x)] = torch.where(torch.tensor(m), torch.tensor(x), IGNORE_INDEX)
    pv = None
    if pixel_values is not None:
        pv = pixel_values.repeat(B, 1, 1, 1)  # every row carries the same images
        grids = grids.repeat(B, 1)
    out = model(input_ids=ids.to(device), attention_mask=att.to(device), pixel_values=None if pv is None
                else pv.to(device), image_grid_hws=None if grids is None else grids.to(device))
    logp = torch.log_softmax(out.logits[:, :-1].double(), dim=-1)  # (B, T-1, V)
    tgt = lab[:, 1:].to(device)
    picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != IGNORE_INDEX)
    return picked.sum(-1).cpu(), (tgt != IGNORE_INDEX).sum(-1).cpu()


def evaluate(model: Any, tokenizer: Any, processor: Any, eval_file: Path, *, max_samples: int | None = None,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Eval loss and closed-set accuracy of ``model`` (a KimiVLForConditionalGeneration, rmpad-patched or not).

    Returns:
        {"eval_loss", "eval_tokens", "accuracy", "accuracy_by_qtype", "accuracy_image_questions", "scored",
         "chance_accuracy", "chance_by_qtype", "answers": Counter of predicted answers}.
    """
    samples, answer_sets = load_eval_samples(Path(eval_file), max_samples)
    root = Path(eval_file).parent
    was_training = model.training
    model.eval()
    nll_sum, nll_tokens = 0.0, 0
    correct: dict[str, list[int]] = defaultdict(list)
    image_q: list[int] = []
    image_qtypes: set[str] = set()
    golds: dict[str, Counter] = defaultdict(Counter)
    predicted: Counter = Counter()
    try:
        for s in samples:
            msgs = s["messages"]
            images = _images_of(msgs, root)
            pv = grids = None
            counts: list[int] = []
            if images:
                proc = processor(images)
                pv, grids = proc["pixel_values"].to(dtype), proc["image_grid_hws"]
                counts = [int(h * w) // 4 for h, w in grids.tolist()]
            gold = apply_chat_template(msgs, tokenizer, counts)
            meta = s.get("meta", {})
            qtype, answer = meta.get("qtype"), meta.get("answer")
            choices = meta.get("choices") or answer_sets.get(qtype)
            rows = [(gold.input_ids, list(gold.label_mask))]
            if choices and answer is not None:
                for c in choices:
                    out = apply_chat_template(_with_final_answer(msgs, c), tokenizer, counts)
                    rows.append((out.input_ids, _final_turn_mask(list(out.label_mask))))
            ll, n = _forward_rows(model, rows, pv, grids, torch.device(device))
            nll_sum += float(-ll[0])
            nll_tokens += int(n[0])
            if len(rows) > 1:
                pick = choices[int(torch.argmax(ll[1:]))]
                ok = int(pick == answer)
                correct[qtype].append(ok)
                golds[qtype][answer] += 1
                predicted[pick] += 1
                if images:
                    image_q.append(ok)
                    image_qtypes.add(qtype)
    finally:
        model.train(was_training)
    scored = sum(len(v) for v in correct.values())
    chance_by = {q: max(c.values()) / sum(c.values()) for q, c in golds.items()}
    return {
        "eval_loss": nll_sum / max(nll_tokens, 1),
        "eval_tokens": nll_tokens,
        "scored": scored,
        "accuracy": sum(sum(v) for v in correct.values()) / scored if scored else None,
        "accuracy_by_qtype": {q: sum(v) / len(v) for q, v in sorted(correct.items())},
        "accuracy_image_questions": sum(image_q) / len(image_q) if image_q else None,
        "chance_accuracy": (sum(max(c.values()) for c in golds.values()) / scored) if scored else None,
        "chance_by_qtype": dict(sorted(chance_by.items())),
        "chance_image_questions": (sum(max(golds[q].values()) for q in image_qtypes)
                                   / sum(sum(golds[q].values()) for q in image_qtypes)) if image_qtypes else None,
        "answers": dict(predicted),
    }
