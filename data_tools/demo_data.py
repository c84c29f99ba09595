"""Deterministic visual question-answering demo set: `vlmtune demo-data --out DIR [--max-side PX]`.

The set is small enough to train a tiny VLM on a CPU in minutes and hard enough that the model must look
at the images: every image question has a small closed answer set, answers are balanced within each
question type, so a model blind to the images cannot beat the majority answer (recorded in metadata.json
as `blind_baseline_accuracy`).

Sized for `make demo` (the tiny Kimi-VL learns to see in ~300 optimizer steps on 2 CPU cores), from
measurements on that model (see recipes/tiny_cpu.yaml):

- Small images by default, sides 56..112 px (native resolution, nine aspect ratios): at most 8x8 patches,
  i.e. at most 16 LM tokens per image, ~20 samples per 1024-token pack. Learning to look is a matter of
  optimizer steps over many distinct samples: with 600 samples of up to 900 px the model only learned the
  answer format and the text prior in the time budget (held-out accuracy at the blind baseline).
- Large shapes (60-90% of the short side), so most image tokens carry the shape's colour.
- 5000 train samples (a few seconds to draw), so ~300 steps see each sample ~5 times, not ~45 times.
- Kind weights lean on the questions a tiny model learns in minutes (colour, find-red, brightness);
  `shape` (telling circle / square / triangle apart at 2-3 merged tokens across) stays at its blind
  baseline in the demo budget, so it weighs 24% of the scored questions, not 34%.

Varied native resolutions: `--max-side 900` (`generate_demo_data(..., max_side=900)`) draws sides from 56 to
900 px, the range real VLM data spans (Kimi-VL-A3B's processor keeps up to 4096 patches, ~896 px square, at
native resolution): the short side is log-uniform on [56, 900 / ratio], so small and large images both occur
(a square image is <= 112 px a quarter of the time, >= 400 px 29% of the time) and one image costs 4 to ~1100
LM tokens through that processor. Use it for packing, loader and throughput measurements, not for `make demo`.
max_side takes 112..2048 (112: the 2:1 ratios need a long side of 2 x 56). It changes only the pixels: for a
given seed the JSONL files (questions, answers, image paths) are byte-identical whatever max_side, so the same
samples can be measured at both resolutions. metadata.json records the range as `image_side_range`.

Layout written under DIR:

    train.jsonl       one sample per line (OpenAI messages; image paths relative to DIR)
    eval.jsonl        held-out split: its own RNG stream, no image shared with train (names nor bytes)
    images/*.png      `images/{split}-{index:05d}-{k}.png`, drawn with Pillow, no metadata chunks
    metadata.json     seed, counts, answer sets and distributions, blind baseline, templates, vocabulary

One line (keys sorted, compact separators):

    {"id":"train-00000","messages":[{"content":[{"image":"images/train-00000-0.png","type":"image"},
     {"text":"what color is the shape?","type":"text"}],"role":"user"},{"content":"red","role":"assistant"}],
     "meta":{"answer":"red","qtype":"color","turns":[{"answer":"red","qtype":"color"}]}}

`meta.qtype` / `meta.answer` describe the sample's FINAL assistant turn, which is what the evaluator
scores; `meta.turns` lists every assistant turn in order (multi-turn samples have two).

Sample kinds (images per sample -> question types):

    kind           images  turns                      answers
    color          1       color                      red green blue yellow
    shape          1       shape                      circle square triangle
    color_shape    1       color, then shape          (multi-turn: two question/answer rounds)
    brighter       2       brighter                   first second
    find_red       3       find_red                   first second third
    repeat         0       repeat                     cat dog fish bird (answer is in the text)

Same seed -> byte-identical files (fixed Pillow PNG options, sorted JSON); every random draw comes from
`random.Random` streams keyed by (generator version, seed, split[, sample index]).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageStat

GENERATOR = "data_tools.demo_data"
GENERATOR_VERSION = "1.1.0"

DEFAULT_SAMPLES = 5000
DEFAULT_EVAL_SAMPLES = 200

# Image geometry: every side lies in [MIN_SIDE, max_side]; aspect ratios are width:height. MAX_SIDE is the default
# max_side (the `make demo` set); `--max-side` raises it up to MAX_SIDE_LIMIT for the varied-resolution set.
MIN_SIDE = 56
MAX_SIDE = 112
MAX_SIDE_LIMIT = 2048
ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1),
    (4, 3),
    (3, 4),
    (3, 2),
    (2, 3),
    (16, 9),
    (9, 16),
    (2, 1),
    (1, 2),
)
# The widest aspect ratio (2:1) needs a long side of 2 * MIN_SIDE: the smallest max_side that holds every ratio.
MIN_MAX_SIDE = math.ceil(MIN_SIDE * max(max(w, h) / min(w, h) for w, h in ASPECT_RATIOS))
# The shape's bounding square is this fraction of the image's short side (the brief asks >= 0.35).
SHAPE_FRACTION = (0.6, 0.9)

# Answer colours are saturated (max - min channel >= 140) and backgrounds are greys (max - min <= 8),
# so a colour can never be mistaken for the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
COLOR_JITTER = 12
BACKGROUND_LEVELS = (96, 160)
BACKGROUND_TINT = 4
# Brightness pairs: grey levels at least BRIGHTNESS_GAP apart; each image holds a faint shape
# (+-BRIGHTNESS_SHAPE_DELTA) and the drawn pair must differ by >= BRIGHTNESS_MIN_MEAN_GAP in mean luminance.
BRIGHTNESS_LEVELS = (35, 220)
BRIGHTNESS_GAP = 60
BRIGHTNESS_SHAPE_DELTA = 30
BRIGHTNESS_MIN_MEAN_GAP = 20.0

SHAPES = ("circle", "square", "triangle")
ORDINALS = ("first", "second", "third")
REPEAT_WORDS = ("cat", "dog", "fish", "bird")

QUESTION_TEMPLATES: dict[str, str] = {
    "color": "what color is the shape?",
    "shape": "what shape is it?",
    "brighter": "which image is brighter?",
    "find_red": "which image has the red shape?",
    "repeat": "repeat the word: {word}",
}
ANSWER_SETS: dict[str, list[str]] = {
    "color": list(PALETTE),
    "shape": list(SHAPES),
    "brighter": list(ORDINALS[:2]),
    "find_red": list(ORDINALS),
    "repeat": list(REPEAT_WORDS),
}
QTYPE_NEEDS_IMAGE = {"color": True, "shape": True, "brighter": True, "find_red": True, "repeat": False}


@dataclass(frozen=True)
class Kind:
    """One kind of sample: how many images it shows and the question type of each assistant turn."""

    name: str
    images: int
    turns: tuple[str, ...]
    weight: float  # share of each split


KINDS: tuple[Kind, ...] = (
    Kind("color", 1, ("color",), 0.30),
    Kind("shape", 1, ("shape",), 0.12),
    Kind("brighter", 2, ("brighter",), 0.18),
    Kind("find_red", 3, ("find_red",), 0.18),
    Kind("color_shape", 1, ("color", "shape"), 0.12),
    Kind("repeat", 0, ("repeat",), 0.10),
)
SPLITS = ("train", "eval")
VOCAB_PATTERN = r"[a-z]+|[^a-z\s]"
_IMAGE_NAME = re.compile(r"^(train|eval)-\d{5}-\d\.png$")


# ----------------------------------------------------------------------------------------------- randomness


def _rng(*key: object) -> random.Random:
    """A `random.Random` keyed by (version, *key); sha256 makes the seed stable across Python builds."""
    text = "/".join(str(k) for k in ("vlmtune-demo-data", GENERATOR_VERSION, *key))
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


def _plan_kinds(n: int, rng: random.Random) -> list[Kind]:
    """Kinds of the n samples of one split: every kind at least once, the rest by largest remainder."""
    extra = n - len(KINDS)
    quotas = [k.weight * extra for k in KINDS]
    counts = [1 + math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(KINDS)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    plan = [kind for kind, count in zip(KINDS, counts) for _ in range(count)]
    rng.shuffle(plan)
    return plan


def _balanced(answers: list[str], count: int, rng: random.Random) -> list[str]:
    """`count` answers cycling over the set (counts differ by at most 1), then shuffled."""
    out = [answers[i % len(answers)] for i in range(count)]
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------- drawing


def _image_size(rng: random.Random, max_side: int) -> tuple[int, int]:
    """(width, height) with a random aspect ratio and both sides in [MIN_SIDE, max_side].

    The short side is log-uniform on [MIN_SIDE, max_side / ratio], so every octave of sizes is equally common
    (at max_side 900 a square image is <= 112 px a quarter of the time and >= 400 px 29% of the time); the long
    side is short * ratio, clipped to max_side where rounding overshoots. max_side >= MIN_MAX_SIDE keeps the
    short side's range non-empty for the widest ratio.
    """
    rw, rh = rng.choice(ASPECT_RATIOS)
    ratio = max(rw, rh) / min(rw, rh)
    short = round(math.exp(rng.uniform(math.log(MIN_SIDE), math.log(max_side / ratio))))
    long = min(max_side, round(short * ratio))
    return (long, short) if rw >= rh else (short, long)


def _jitter(rgb: tuple[int, int, int], amount: int, rng: random.Random) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
    return (r, g, b)


def _draw_shape(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], shape: str, fill: Any, rng: random.Random
) -> None:
    """Draw a large axis-aligned shape fully inside the image (no anti-aliasing: pixels are exact colours)."""
    w, h = size
    side = round(min(w, h) * rng.uniform(*SHAPE_FRACTION))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    x1, y1 = x0 + side - 1, y0 + side - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _shape_image(rng: random.Random, shape: str, color: str, max_side: int) -> Image.Image:
    """A coloured shape on a random grey background."""
    size = _image_size(rng, max_side)
    grey = rng.randint(*BACKGROUND_LEVELS)
    image = Image.new("RGB", size, _jitter((grey, grey, grey), BACKGROUND_TINT, rng))
    _draw_shape(ImageDraw.Draw(image), size, shape, _jitter(PALETTE[color], COLOR_JITTER, rng), rng)
    return image


def _grey_image(rng: random.Random, level: int, max_side: int) -> Image.Image:
    """A grey image at `level` with a faint lighter or darker shape, for the brightness question."""
    size = _image_size(rng, max_side)
    image = Image.new("RGB", size, (level, level, level))
    shape_level = min(255, max(0, level + rng.choice((-1, 1)) * BRIGHTNESS_SHAPE_DELTA))
    _draw_shape(ImageDraw.Draw(image), size, rng.choice(SHAPES), (shape_level,) * 3, rng)
    return image


def mean_luminance(image: Image.Image) -> float:
    """Mean of Pillow's ITU-R 601 luma ("L" mode) over all pixels, the brightness the answers follow."""
    return float(ImageStat.Stat(image.convert("L")).mean[0])


def _brightness_pair(rng: random.Random, answer: str, max_side: int) -> list[Image.Image]:
    """Two grey images whose mean luminances differ clearly; the brighter one sits at position `answer`."""
    while True:
        low, high = sorted(rng.randint(*BRIGHTNESS_LEVELS) for _ in range(2))
        if high - low < BRIGHTNESS_GAP:
            continue
        dark, bright = _grey_image(rng, low, max_side), _grey_image(rng, high, max_side)
        if mean_luminance(bright) - mean_luminance(dark) >= BRIGHTNESS_MIN_MEAN_GAP:
            return [bright, dark] if answer == "first" else [dark, bright]


def _png_bytes(image: Image.Image) -> bytes:
    """PNG bytes with fixed options; Pillow writes no time or text chunks unless asked, so bytes are stable."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- samples


def _user(image_paths: list[str], text: str) -> dict[str, Any]:
    content: list[dict[str, str]] = [{"type": "image", "image": p} for p in image_paths]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _draw_sample(
    kind: Kind, answers: list[str], rng: random.Random, max_side: int
) -> tuple[list[Image.Image], list[str]]:
    """The images and the question text of each turn of one sample whose turn answers are `answers`."""
    if kind.name in ("color", "shape", "color_shape"):
        color = answers[0] if kind.turns[0] == "color" else rng.choice(ANSWER_SETS["color"])
        shape = answers[-1] if kind.turns[-1] == "shape" else rng.choice(SHAPES)
        return [_shape_image(rng, shape, color, max_side)], [QUESTION_TEMPLATES[q] for q in kind.turns]
    if kind.name == "brighter":
        return _brightness_pair(rng, answers[0], max_side), [QUESTION_TEMPLATES["brighter"]]
    if kind.name == "find_red":
        others = [c for c in PALETTE if c != "red"]
        colors = [rng.choice(others) for _ in ORDINALS]
        colors[ORDINALS.index(answers[0])] = "red"
        images = [_shape_image(rng, rng.choice(SHAPES), c, max_side) for c in colors]
        return images, [QUESTION_TEMPLATES["find_red"]]
    if kind.name == "repeat":
        return [], [QUESTION_TEMPLATES["repeat"].format(word=answers[0])]
    raise ValueError(f"unknown sample kind {kind.name!r}")


def _write_split(
    out_dir: Path, split: str, n: int, seed: int, seen: set[bytes], max_side: int
) -> tuple[list[dict[str, Any]], int]:
    """Generate and write one split; returns its samples and the bytes of PNG written.

    `seen` holds the sha256 of every PNG written so far (both splits): a sample that would repeat an image
    is redrawn from its own RNG stream, so train and eval never share an image.
    """
    plan_rng = _rng(seed, split, "plan")
    kinds = _plan_kinds(n, plan_rng)
    # One balanced answer list per (position of the turn, qtype): final turns, which the evaluator scores,
    # share one list per qtype, so each qtype's scored answers are balanced across all kinds.
    final_counts = Counter(k.turns[-1] for k in kinds)
    finals = {q: _balanced(ANSWER_SETS[q], c, plan_rng) for q, c in sorted(final_counts.items())}
    first_counts = Counter(k.turns[0] for k in kinds if len(k.turns) > 1)
    firsts = {q: _balanced(ANSWER_SETS[q], c, plan_rng) for q, c in sorted(first_counts.items())}

    samples, png_bytes = [], 0
    lines = []
    for index, kind in enumerate(kinds):
        answers = [firsts[kind.turns[0]].pop()] if len(kind.turns) > 1 else []
        answers.append(finals[kind.turns[-1]].pop())
        rng = _rng(seed, split, index)
        for _attempt in range(100):
            images, questions = _draw_sample(kind, answers, rng, max_side)
            blobs = [_png_bytes(im) for im in images]
            digests = [hashlib.sha256(b).digest() for b in blobs]
            if len(set(digests)) == len(digests) and not seen.intersection(digests):
                break
        else:
            raise RuntimeError(f"{split} sample {index}: could not draw unique images in 100 attempts")
        seen.update(digests)

        sample_id = f"{split}-{index:05d}"
        paths = [f"images/{sample_id}-{k}.png" for k in range(len(blobs))]
        for path, blob in zip(paths, blobs):
            (out_dir / path).write_bytes(blob)
            png_bytes += len(blob)
        messages: list[dict[str, Any]] = []
        for turn, (question, answer) in enumerate(zip(questions, answers)):
            messages.append(_user(paths if turn == 0 else [], question))
            messages.append({"role": "assistant", "content": answer})
        meta = {
            "qtype": kind.turns[-1],
            "answer": answers[-1],
            "turns": [{"qtype": q, "answer": a} for q, a in zip(kind.turns, answers)],
        }
        sample = {"id": sample_id, "messages": messages, "meta": meta}
        samples.append(sample)
        lines.append(json.dumps(sample, sort_keys=True, separators=(",", ":")))
    (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return samples, png_bytes


# ----------------------------------------------------------------------------------------------- metadata


def _num_images(sample: dict[str, Any]) -> int:
    return sum(
        part["type"] == "image"
        for message in sample["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
    )


def _split_counts(samples: list[dict[str, Any]]) -> dict[str, Any]:
    turns = [len(s["meta"]["turns"]) for s in samples]
    images = [_num_images(s) for s in samples]
    return {
        "samples": len(samples),
        "images": sum(images),
        "assistant_turns": sum(turns),
        "multi_turn": sum(t > 1 for t in turns),
        "text_only": sum(i == 0 for i in images),
        "by_num_images": {str(k): images.count(k) for k in range(4)},
        "by_qtype": {q: sum(s["meta"]["qtype"] == q for s in samples) for q in ANSWER_SETS},
    }


def _answer_distribution(samples: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Counts of each scored (final-turn) answer per qtype, zeros included."""
    out = {q: dict.fromkeys(answers, 0) for q, answers in ANSWER_SETS.items()}
    for s in samples:
        out[s["meta"]["qtype"]][s["meta"]["answer"]] += 1
    return out


def blind_baseline(distribution: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Accuracy of always answering each qtype's majority answer (per qtype and weighted overall).

    Args:
        distribution: qtype -> answer -> count, as in metadata["answer_distributions"]["eval"].

    Returns:
        {"per_qtype": {qtype: rate}, "overall": rate over all samples, "image_qtypes": rate over samples whose
        qtype needs the image (the text-only `repeat` answer is in its question, so no baseline applies).}
    """
    per_qtype, hits, total, image_hits, image_total = {}, 0, 0, 0, 0
    for q, counts in distribution.items():
        n, majority = sum(counts.values()), max(counts.values(), default=0)
        if n:
            per_qtype[q] = majority / n
        hits, total = hits + majority, total + n
        if QTYPE_NEEDS_IMAGE[q]:
            image_hits, image_total = image_hits + majority, image_total + n
    return {
        "per_qtype": per_qtype,
        "overall": hits / total if total else 0.0,
        "image_qtypes": image_hits / image_total if image_total else 0.0,
    }


def _vocabulary() -> list[str]:
    texts = [t.format(word=w) for t in QUESTION_TEMPLATES.values() for w in REPEAT_WORDS]
    texts += [a for answers in ANSWER_SETS.values() for a in answers]
    return sorted({tok for text in texts for tok in re.findall(VOCAB_PATTERN, text)})


def _build_metadata(
    seed: int, splits: dict[str, list[dict[str, Any]]], png_bytes: int, images_total: int, max_side: int
) -> dict[str, Any]:
    distributions = {split: _answer_distribution(s) for split, s in splits.items()}
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "files": {"train": "train.jsonl", "eval": "eval.jsonl", "images": "images"},
        "counts": {split: _split_counts(s) for split, s in splits.items()},
        "sample_kinds": {
            k.name: {"images": k.images, "turns": list(k.turns), "weight": k.weight} for k in KINDS
        },
        "qtypes": {
            q: {
                "template": QUESTION_TEMPLATES[q],
                "answers": ANSWER_SETS[q],
                "needs_image": QTYPE_NEEDS_IMAGE[q],
            }
            for q in ANSWER_SETS
        },
        "question_templates": QUESTION_TEMPLATES,
        "answer_sets": ANSWER_SETS,
        "answer_distributions": distributions,
        "scoring": "each sample's final assistant turn: meta.answer among answer_sets[meta.qtype]",
        "blind_baseline_accuracy": blind_baseline(distributions["eval"]),
        "image_side_range": [MIN_SIDE, max_side],
        "aspect_ratios": [f"{w}:{h}" for w, h in ASPECT_RATIOS],
        "png_bytes_total": png_bytes,
        "images_total": images_total,
        "vocabulary": _vocabulary(),
        "vocabulary_pattern": VOCAB_PATTERN,
    }


# ----------------------------------------------------------------------------------------------- entry points


def _prepare_out_dir(out_dir: Path) -> None:
    """Create DIR, or clear a previous demo set in it; refuse to touch a folder holding anything else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; pass a directory path")
    if out_dir.exists() and any(out_dir.iterdir()):
        meta_path = out_dir / "metadata.json"
        ours = {"train.jsonl", "eval.jsonl", "metadata.json", "images"}
        entries = {p.name for p in out_dir.iterdir()}
        images = out_dir / "images"
        foreign = sorted(entries - ours)
        if images.is_dir():
            foreign += [f"images/{p.name}" for p in sorted(images.iterdir()) if not _IMAGE_NAME.match(p.name)]
        is_demo = False
        if meta_path.is_file():
            try:
                is_demo = json.loads(meta_path.read_text(encoding="utf-8")).get("generator") == GENERATOR
            except (json.JSONDecodeError, AttributeError):
                is_demo = False
        if not is_demo or foreign:
            raise FileExistsError(
                f"--out {out_dir} is not empty and is not a demo data set written by {GENERATOR} "
                f"(unexpected entries: {foreign[:5] or 'no metadata.json with generator key'}); "
                "pass an empty or new directory"
            )
        for name in ("train.jsonl", "eval.jsonl", "metadata.json"):
            (out_dir / name).unlink(missing_ok=True)
        if images.exists():
            shutil.rmtree(images)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)


def _check_max_side(max_side: object) -> int:
    """`max_side` itself when it is an int in [MIN_MAX_SIDE, MAX_SIDE_LIMIT]; a ValueError naming --max-side else."""
    if (
        isinstance(max_side, bool)
        or not isinstance(max_side, int)
        or not MIN_MAX_SIDE <= max_side <= MAX_SIDE_LIMIT
    ):
        raise ValueError(
            f"max_side={max_side!r} (--max-side): need an integer in [{MIN_MAX_SIDE}, {MAX_SIDE_LIMIT}] px. "
            f"Below {MIN_MAX_SIDE} the 2:1 aspect ratios cannot keep their short side >= {MIN_SIDE} px; above "
            f"{MAX_SIDE_LIMIT} the images only get slower to draw (Kimi-VL-A3B's processor already scales "
            f"anything over 4096 patches, ~896 px square, down). Default {MAX_SIDE} (the make-demo set); "
            "900 gives the varied native resolutions"
        )
    return max_side


def generate_demo_data(
    out_dir: Path | str,
    samples: int = DEFAULT_SAMPLES,
    eval_samples: int = DEFAULT_EVAL_SAMPLES,
    seed: int = 0,
    max_side: int = MAX_SIDE,
) -> dict[str, Any]:
    """Write the demo VQA set (train.jsonl, eval.jsonl, images/, metadata.json) under `out_dir`.

    A folder that already holds a demo set from this generator is replaced; any other non-empty folder
    is refused.

    Args:
        out_dir: destination directory (created if missing).
        samples: number of train samples (>= 6, one per sample kind at least).
        eval_samples: number of held-out eval samples (>= 6).
        seed: base seed; the same seed gives byte-identical files, another seed different data.
        max_side: longest image side in px, an int in [MIN_MAX_SIDE, MAX_SIDE_LIMIT] = [112, 2048]; sides lie in
            [MIN_SIDE, max_side]. It changes the pixels only: for a given seed the JSONL files (questions,
            answers, image paths) are byte-identical whatever max_side.

    Returns:
        The metadata written to metadata.json.
    """
    for name, value in (("samples", samples), ("eval_samples", eval_samples)):
        if not isinstance(value, int) or value < len(KINDS):
            raise ValueError(
                f"{name}={value!r}: need an integer >= {len(KINDS)} so every sample kind "
                f"({', '.join(k.name for k in KINDS)}) appears in the split"
            )
    if not isinstance(seed, int):
        raise TypeError(f"seed={seed!r}: expected an int")
    max_side = _check_max_side(max_side)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    seen: set[bytes] = set()
    splits, png_bytes = {}, 0
    for split, n in zip(SPLITS, (samples, eval_samples)):
        splits[split], written = _write_split(out_dir, split, n, seed, seen, max_side)
        png_bytes += written
    metadata = _build_metadata(seed, splits, png_bytes, len(seen), max_side)
    (out_dir / "metadata.json").write_text(
        json.dumps(metadata, sort_keys=True, indent=2, separators=(",", ": ")) + "\n", encoding="utf-8"
    )
    return metadata


def main(argv: list[str] | None = None) -> int:
    """`vlmtune demo-data --out DIR [--samples N] [--eval-samples M] [--seed S] [--max-side PX]`."""
    parser = argparse.ArgumentParser(
        prog="vlmtune demo-data",
        description="Write the deterministic visual question-answering demo set (JSONL + PNG).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="train samples")
    parser.add_argument(
        "--eval-samples", type=int, default=DEFAULT_EVAL_SAMPLES, help="held-out eval samples"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed (same seed -> identical bytes)")
    parser.add_argument(
        "--max-side",
        type=int,
        default=MAX_SIDE,
        help=f"longest image side in px, {MIN_MAX_SIDE}..{MAX_SIDE_LIMIT} (default {MAX_SIDE}, the make-demo set; "
        f"900 gives varied native resolutions, sides {MIN_SIDE}..900)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    try:
        meta = generate_demo_data(
            args.out, args.samples, args.eval_samples, args.seed, max_side=args.max_side
        )
    except (ValueError, FileExistsError, NotADirectoryError) as err:
        print(f"demo-data: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    counts, baseline = meta["counts"], meta["blind_baseline_accuracy"]
    print(
        f"wrote {counts['train']['samples']} train / {counts['eval']['samples']} eval samples, "
        f"{meta['images_total']} images ({meta['png_bytes_total'] / 1e6:.1f} MB, sides "
        f"{meta['image_side_range'][0]}..{meta['image_side_range'][1]} px) to {args.out} in {seconds:.1f} s"
    )
    per_qtype = ", ".join(f"{q} {r:.3f}" for q, r in baseline["per_qtype"].items())
    print(
        f"blind baseline (eval, majority answer): overall {baseline['overall']:.3f}, "
        f"image questions {baseline['image_qtypes']:.3f} ({per_qtype})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
