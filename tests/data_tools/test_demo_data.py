"""The demo VQA set: determinism, counts, answer balance, blind baseline, and pixels that carry the answers."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data_tools.demo_data import (
    ANSWER_SETS,
    ASPECT_RATIOS,
    MAX_SIDE,
    MAX_SIDE_LIMIT,
    MIN_MAX_SIDE,
    MIN_SIDE,
    PALETTE,
    QUESTION_TEMPLATES,
    generate_demo_data,
    main,
)

# Kinds of the default 5000 / 200 split, from the kind weights (.30 .12 .18 .18 .12 .10) by largest remainder,
# worked out by hand: one of each kind, then floor(w * 4994) = 1498 599 898 898 599 499 (4991), and the 3 left go
# to the largest remainders (.92 .92 .40: brighter, find_red, repeat):
# color 1499, shape 600, brighter 900, find_red 900, color_shape 600, repeat 501 (train);
# 200 eval: 1 + floor(w * 194) = 59 24 35 35 24 20 (197), +1 brighter, find_red, repeat:
# color 59, shape 24, brighter 36, find_red 36, color_shape 24, repeat 21 (eval).
EXPECTED_BY_QTYPE = {
    "train": {"color": 1499, "shape": 600 + 600, "brighter": 900, "find_red": 900, "repeat": 501},
    "eval": {"color": 59, "shape": 24 + 24, "brighter": 36, "find_red": 36, "repeat": 21},
}
EXPECTED_IMAGES = {"train": 1499 + 600 + 600 + 2 * 900 + 3 * 900, "eval": 59 + 24 + 24 + 2 * 36 + 3 * 36}
# The 60 / 12 split the same way: 60 train = 6 + floor(w * 54) = 16 6 9 9 6 5 (51), +1 to the largest remainders
# .72 .72 .48 (brighter, find_red, then shape before color_shape by index): color 17, shape 8, brighter 11,
# find_red 11, color_shape 7, repeat 6; 12 eval = 6 + floor(w * 6) = 1 0 1 1 0 0, +1 to .8 .72 .72 (color, shape,
# color_shape): color 3, shape 2, brighter 2, find_red 2, color_shape 2, repeat 1.
SMALL_IMAGES = (17 + 8 + 7 + 2 * 11 + 3 * 11) + (3 + 2 + 2 + 2 * 2 + 3 * 2)  # 87 train + 17 eval = 104
SMALL_CHECKED = {
    "color": 17 + 7 + 3 + 2,
    "shape": 8 + 7 + 2 + 2,
    "brighter": 11 + 2,
    "find_red": 11 + 2,
    "repeat": 6 + 1,
}


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read(root: Path, split: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def _image_paths(sample: dict[str, Any]) -> list[str]:
    return [
        part["image"]
        for m in sample["messages"]
        if isinstance(m["content"], list)
        for part in m["content"]
        if part["type"] == "image"
    ]


def _pixels(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / rel) as im:
        assert im.mode == "RGB", rel
        return np.asarray(im, dtype=np.int16)  # (h, w, 3)


def _shape_colour_and_mask(px: np.ndarray) -> tuple[str, np.ndarray]:
    """Nearest palette colour of the saturated (non-grey) pixels, and their mask."""
    mask = (px.max(axis=2) - px.min(axis=2)) > 60
    assert mask.any(), "no coloured pixel"
    mean = px[mask].mean(axis=0)
    name = min(PALETTE, key=lambda c: float(((mean - np.array(PALETTE[c])) ** 2).sum()))
    return name, mask


def _shape_kind(mask: np.ndarray) -> str:
    """circle / square / triangle from how much of its bounding box the shape fills (pi/4, 1, 1/2)."""
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert abs(int(h) - int(w)) <= 1, f"shape box {w}x{h} is not square"
    fill = mask.sum() / (h * w)
    if fill > 0.95:
        return "square"
    if 0.68 < fill < 0.86:
        return "circle"
    assert 0.40 < fill < 0.62, f"fill ratio {fill} matches no shape"
    return "triangle"


def _luminance(root: Path, rel: str) -> float:
    with Image.open(root / rel) as im:
        return float(np.asarray(im.convert("L"), dtype=np.float64).mean())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("demo") / "data"
    return root, generate_demo_data(root, seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small") / "data"
    generate_demo_data(root, samples=60, eval_samples=12, seed=0)
    return root


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The `small` samples at varied native resolutions (max_side 900)."""
    root = tmp_path_factory.mktemp("varied") / "data"
    return root, generate_demo_data(root, samples=60, eval_samples=12, seed=0, max_side=900)


def test_same_seed_gives_byte_identical_files(demo, tmp_path: Path) -> None:
    root, meta = demo
    again = generate_demo_data(tmp_path / "again", seed=0)
    first, second = _hash_tree(root), _hash_tree(tmp_path / "again")
    assert len(first) == 3 + EXPECTED_IMAGES["train"] + EXPECTED_IMAGES["eval"]
    assert first == second
    assert again == meta


def test_different_seed_gives_different_data(small, tmp_path: Path) -> None:
    generate_demo_data(tmp_path / "s1", samples=60, eval_samples=12, seed=1)
    a, b = _hash_tree(small), _hash_tree(tmp_path / "s1")
    assert a.keys() != b.keys() or a != b
    for name in ("train.jsonl", "eval.jsonl"):
        assert a[name] != b[name]
    # Images are drawn from seed-keyed streams: no image is shared between the two seeds.
    assert not {h for k, h in a.items() if k.endswith(".png")} & {
        h for k, h in b.items() if k.endswith(".png")
    }


def test_counts_match_request_and_metadata(demo) -> None:
    root, meta = demo
    for split, n in (("train", 5000), ("eval", 200)):
        samples = _read(root, split)
        counts = meta["counts"][split]
        assert len(samples) == counts["samples"] == n
        assert [s["id"] for s in samples] == [f"{split}-{i:05d}" for i in range(n)]
        assert dict(Counter(s["meta"]["qtype"] for s in samples)) == EXPECTED_BY_QTYPE[split]
        assert counts["by_qtype"] == EXPECTED_BY_QTYPE[split]
        n_images = [len(_image_paths(s)) for s in samples]
        assert sum(n_images) == counts["images"] == EXPECTED_IMAGES[split]
        assert counts["by_num_images"] == {str(k): n_images.count(k) for k in range(4)}
        assert all(n_images.count(k) > 0 for k in range(4))  # 0, 1, 2 and 3 images all present
        multi = [s for s in samples if len(s["meta"]["turns"]) == 2]
        assert counts["multi_turn"] == len(multi) == {"train": 600, "eval": 24}[split]
        assert counts["text_only"] == n_images.count(0) == {"train": 501, "eval": 21}[split]
    assert meta["seed"] == 0 and meta["version"] == "1.1.0"
    assert meta["images_total"] == EXPECTED_IMAGES["train"] + EXPECTED_IMAGES["eval"]


def test_message_structure_and_canonical_json(demo) -> None:
    root, _ = demo
    for split in ("train", "eval"):
        for line in (root / f"{split}.jsonl").read_text().splitlines():
            sample = json.loads(line)
            assert line == json.dumps(sample, sort_keys=True, separators=(",", ":"))
            messages, turns = sample["messages"], sample["meta"]["turns"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * len(turns)
            assert [m["content"] for m in messages[1::2]] == [t["answer"] for t in turns]
            assert (sample["meta"]["qtype"], sample["meta"]["answer"]) == (
                turns[-1]["qtype"],
                turns[-1]["answer"],
            )
            for turn, user in zip(turns, messages[0::2]):
                texts = [p["text"] for p in user["content"] if p["type"] == "text"]
                assert len(texts) == 1 and user["content"][-1]["type"] == "text"
                template = QUESTION_TEMPLATES[turn["qtype"]]
                expected = template.format(word=turn["answer"]) if "{word}" in template else template
                assert texts[0] == expected
                assert turn["answer"] in ANSWER_SETS[turn["qtype"]]
            # Images only in the first user turn.
            assert all(p["type"] == "text" for m in messages[2::2] for p in m["content"])


def test_answers_balanced_per_qtype(demo) -> None:
    root, meta = demo
    for split in ("train", "eval"):
        samples = _read(root, split)
        for qtype, answers in ANSWER_SETS.items():
            got = Counter(s["meta"]["answer"] for s in samples if s["meta"]["qtype"] == qtype)
            counts = [got[a] for a in answers]
            assert max(counts) - min(counts) <= 1, (split, qtype, counts)
            assert meta["answer_distributions"][split][qtype] == {a: got[a] for a in answers}
        # The unscored first turn of multi-turn samples is balanced too.
        firsts = Counter(s["meta"]["turns"][0]["answer"] for s in samples if len(s["meta"]["turns"]) == 2)
        assert max(firsts.values()) - min(firsts[a] for a in ANSWER_SETS["color"]) <= 1
    # Train counts per answer: 1499 colours = 3 x 375 + 374, 1200 shapes = 3 x 400, 900 = 2 x 450 and 3 x 300,
    # 501 repeats = 3 x 125 + 126 (the shuffle decides which answer gets the short count).
    train = meta["answer_distributions"]["train"]
    assert {q: sorted(d.values()) for q, d in train.items()} == {
        "color": [374, 375, 375, 375],
        "shape": [400, 400, 400],
        "brighter": [450, 450],
        "find_red": [300, 300, 300],
        "repeat": [125, 125, 125, 126],
    }


def test_blind_baseline_is_majority_rate_on_eval(demo) -> None:
    root, meta = demo
    samples = _read(root, "eval")
    per_qtype, hits, image_hits, image_total = {}, 0, 0, 0
    for qtype in ANSWER_SETS:
        answers = [s["meta"]["answer"] for s in samples if s["meta"]["qtype"] == qtype]
        majority = Counter(answers).most_common(1)[0][1]
        per_qtype[qtype] = majority / len(answers)
        hits += majority
        if qtype != "repeat":
            image_hits, image_total = image_hits + majority, image_total + len(answers)
    baseline = meta["blind_baseline_accuracy"]
    assert baseline["per_qtype"] == per_qtype
    assert baseline["overall"] == hits / len(samples) == 67 / 200
    assert baseline["image_qtypes"] == image_hits / image_total == 61 / 179
    assert per_qtype == {
        "color": 15 / 59,
        "shape": 16 / 48,
        "brighter": 18 / 36,
        "find_red": 12 / 36,
        "repeat": 6 / 21,
    }


def _check_pixels(root: Path) -> Counter:
    """Assert that every image carries its sample's answers; returns the turns checked per qtype."""
    checked: Counter = Counter()
    for split in ("train", "eval"):
        for sample in _read(root, split):
            paths = _image_paths(sample)
            for turn in sample["meta"]["turns"]:
                qtype, answer = turn["qtype"], turn["answer"]
                if qtype in ("color", "shape"):
                    px = _pixels(root, paths[0])
                    # Flat drawing, no anti-aliasing: exactly a grey background and one shape colour.
                    with Image.open(root / paths[0]) as im:
                        assert len(im.getcolors(maxcolors=4) or []) == 2, paths[0]
                    colour, mask = _shape_colour_and_mask(px)
                    if qtype == "color":
                        assert colour == answer, (paths[0], colour, answer)
                    else:
                        assert _shape_kind(mask) == answer, (paths[0], answer)
                    background = px[~mask]
                    assert int((background.max(axis=1) - background.min(axis=1)).max()) <= 8
                    ys, _ = np.nonzero(mask)
                    # SHAPE_FRACTION[0] of the short side, rounded to whole pixels.
                    assert ys.max() - ys.min() + 1 >= 0.6 * min(px.shape[:2]) - 0.5
                elif qtype == "brighter":
                    lum = [_luminance(root, p) for p in paths]
                    brighter = "first" if lum[0] > lum[1] else "second"
                    assert brighter == answer and abs(lum[0] - lum[1]) >= 20.0, (paths, lum)
                elif qtype == "find_red":
                    colours = [_shape_colour_and_mask(_pixels(root, p))[0] for p in paths]
                    assert [c == "red" for c in colours] == [
                        o == answer for o in ("first", "second", "third")
                    ]
                elif qtype == "repeat":
                    assert paths == [] and answer in sample["messages"][0]["content"][0]["text"].split()
                checked[qtype] += 1
    return checked


def test_pixels_determine_answers(demo) -> None:
    root, _ = demo
    assert _check_pixels(root) == {
        "color": 1499 + 600 + 59 + 24,
        "shape": 1200 + 48,
        "brighter": 900 + 36,
        "find_red": 900 + 36,
        "repeat": 501 + 21,
    }


def test_images_exist_sizes_varied_and_splits_disjoint(demo) -> None:
    root, meta = demo
    referenced: dict[str, set[str]] = {}
    sizes = []
    for split in ("train", "eval"):
        referenced[split] = {p for s in _read(root, split) for p in _image_paths(s)}
        for rel in referenced[split]:
            assert rel.startswith(f"images/{split}-")
            with Image.open(root / rel) as im:
                sizes.append(im.size)
    # Every file under images/ is referenced exactly once, and nothing referenced is missing.
    on_disk = {f"images/{p.name}" for p in (root / "images").iterdir()}
    assert on_disk == referenced["train"] | referenced["eval"]
    assert len(on_disk) == meta["images_total"]
    assert not referenced["train"] & referenced["eval"]
    digests = {
        s: {hashlib.sha256((root / p).read_bytes()).digest() for p in referenced[s]} for s in referenced
    }
    assert len(digests["train"]) == len(referenced["train"]) and not digests["train"] & digests["eval"]

    sides = np.array(sizes)  # (I, 2) width, height
    assert sides.min() == MIN_SIDE == 56 and sides.max() == MAX_SIDE == 112  # the range is actually used
    # At most 8 x 8 patches of 14 px: an image is at most 16 LM tokens after the 2 x 2 merge.
    assert all(-(-w // 14) * -(-h // 14) <= 64 for w, h in sizes)
    ratios = Counter(round(w / h, 1) for w, h in sizes)
    assert (
        len([r for r, n in ratios.items() if n >= 10]) >= 7
    )  # several aspect ratios, portrait and landscape
    assert meta["png_bytes_total"] == sum((root / p).stat().st_size for p in on_disk) < 3_000_000


def test_png_holds_no_metadata_chunks(demo) -> None:
    root, _ = demo
    for path in sorted((root / "images").iterdir())[:50]:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        chunks, offset = [], 8
        while offset < len(data):
            (length,) = struct.unpack(">I", data[offset : offset + 4])
            chunks.append(data[offset + 4 : offset + 8])
            offset += 12 + length
        assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}, (path, chunks)


def test_vocabulary_covers_every_question_and_answer(demo) -> None:
    root, meta = demo
    used = set()
    for split in ("train", "eval"):
        for sample in _read(root, split):
            for message in sample["messages"]:
                content = message["content"]
                texts = (
                    [content]
                    if isinstance(content, str)
                    else [p["text"] for p in content if p["type"] == "text"]
                )
                for text in texts:
                    used.update(re.findall(meta["vocabulary_pattern"], text))
    assert meta["vocabulary"] == sorted(used)
    assert meta["vocabulary"] == [
        ":", "?", "bird", "blue", "brighter", "cat", "circle", "color", "dog", "first", "fish", "green", "has",
        "image", "is", "it", "red", "repeat", "second", "shape", "square", "the", "third", "triangle", "what",
        "which", "word", "yellow",
    ]  # fmt: skip
    assert meta["answer_sets"] == ANSWER_SETS and meta["question_templates"] == QUESTION_TEMPLATES


def test_cli_matches_api_and_rewrites_previous_set(
    small, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--samples", "300", "--eval-samples", "30", "--seed", "0"]) == 0
    assert "300 train / 30 eval samples" in capsys.readouterr().out
    # Re-running into a folder that holds a demo set replaces it: no stale images from the bigger run.
    assert main(["--out", str(out), "--samples", "60", "--eval-samples", "12", "--seed", "0"]) == 0
    assert _hash_tree(out) == _hash_tree(small)


def test_refuses_bad_arguments_and_foreign_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="samples=5: need an integer >= 6"):
        generate_demo_data(tmp_path / "a", samples=5)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo data set"):
        generate_demo_data(foreign, samples=6, eval_samples=6)
    assert main(["--out", str(foreign), "--samples", "6", "--eval-samples", "6"]) == 2
    assert "pass an empty or new directory" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------------------------- max_side


def _sizes(root: Path) -> list[tuple[int, int]]:
    sizes = []
    for path in sorted((root / "images").iterdir()):
        with Image.open(path) as im:
            sizes.append(im.size)  # (width, height)
    return sizes


def test_max_side_900_gives_varied_native_resolutions(varied) -> None:
    root, meta = varied
    sizes = _sizes(root)
    assert len(sizes) == meta["images_total"] == SMALL_IMAGES == 104
    assert meta["image_side_range"] == [MIN_SIDE, 900] == [56, 900]
    assert all(MIN_SIDE <= side <= 900 for size in sizes for side in size)
    # Log-uniform short side: images within the default range and large ones both occur. Expected shares over
    # the nine ratios: 10.5% with a long side <= 112 (~11 of 104), 35% with a long side >= 400 (~36); this
    # seed draws 12 and 29.
    assert sum(max(s) <= MAX_SIDE for s in sizes) >= 5
    assert sum(max(s) >= 400 for s in sizes) >= 10
    assert max(max(s) for s in sizes) > 700
    # Every size is one of the nine aspect ratios: long = min(max_side, round(short * ratio)), exactly.
    matched = Counter()
    for w, h in sizes:
        short, long = min(w, h), max(w, h)
        fits = [
            (rw, rh)
            for rw, rh in ASPECT_RATIOS
            if (rw >= rh) == (w >= h) and long == min(900, round(short * max(rw, rh) / min(rw, rh)))
        ]
        assert fits, (w, h)
        matched[fits[0]] += 1
    assert len(matched) >= 7 and all(n <= 30 for n in matched.values()), matched  # portrait and landscape
    # Shapes keep 60-90% of the short side, colours and brightness carry the answers at every size.
    assert _check_pixels(root) == SMALL_CHECKED


def test_max_side_changes_only_the_pixels(small, varied, tmp_path: Path) -> None:
    root, meta = varied
    generate_demo_data(tmp_path / "again", samples=60, eval_samples=12, seed=0, max_side=900)
    assert _hash_tree(tmp_path / "again") == _hash_tree(root)  # same seed -> byte-identical files
    a, b = _hash_tree(small), _hash_tree(root)
    assert a.keys() == b.keys() and len(a) == 3 + SMALL_IMAGES
    for name in ("train.jsonl", "eval.jsonl"):  # same questions, answers and image paths
        assert a[name] == b[name]
    png = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != b[k] for k in png) == SMALL_IMAGES  # every image is redrawn at its new size
    default_meta = json.loads((small / "metadata.json").read_text())
    assert default_meta["image_side_range"] == [56, 112] and meta["image_side_range"] == [56, 900]
    assert meta["png_bytes_total"] > default_meta["png_bytes_total"]
    differ = {k for k in meta if meta[k] != default_meta[k]}
    assert differ == {"image_side_range", "png_bytes_total"}


def test_default_max_side_is_112(small, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert MAX_SIDE == MIN_MAX_SIDE == 112 and MAX_SIDE_LIMIT == 2048
    generate_demo_data(tmp_path / "explicit", samples=60, eval_samples=12, seed=0, max_side=112)
    assert _hash_tree(tmp_path / "explicit") == _hash_tree(small)
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--samples", "60", "--eval-samples", "12", "--seed", "0", "--max-side", "112"]
    assert main(argv) == 0
    assert "sides 56..112 px" in capsys.readouterr().out
    assert _hash_tree(out) == _hash_tree(small)


def test_cli_max_side_matches_api(varied, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, _ = varied
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--samples", "60", "--eval-samples", "12", "--seed", "0", "--max-side", "900"]
    assert main(argv) == 0
    assert "104 images" in capsys.readouterr().out
    assert _hash_tree(out) == _hash_tree(root)


def test_max_side_limit_is_accepted(tmp_path: Path) -> None:
    meta = generate_demo_data(tmp_path / "big", samples=6, eval_samples=6, seed=0, max_side=MAX_SIDE_LIMIT)
    sizes = _sizes(tmp_path / "big")
    assert meta["image_side_range"] == [56, 2048] and len(sizes) == meta["images_total"]
    assert all(MIN_SIDE <= side <= MAX_SIDE_LIMIT for size in sizes for side in size)


@pytest.mark.parametrize("bad", [0, 55, MIN_MAX_SIDE - 1, MAX_SIDE_LIMIT + 1, 900.0, "900", True, None])
def test_bad_max_side_is_refused(bad: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"max_side=.* \(--max-side\): need an integer in \[112, 2048\] px"):
        generate_demo_data(tmp_path / "out", samples=6, eval_samples=6, max_side=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_cli_bad_max_side(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for value in ("111", "2049"):
        assert main(["--out", str(tmp_path / "out"), "--samples", "6", "--max-side", value]) == 2
        err = capsys.readouterr().err
        assert f"demo-data: error: max_side={value} (--max-side): need an integer in [112, 2048] px" in err
    assert not (tmp_path / "out").exists()
