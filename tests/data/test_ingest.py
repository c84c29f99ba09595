"""Length pass: overlong policies, mixing weights, accounting, cache, and the bad-input corpus end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlmtune.data.formats import DatasetSpec
from vlmtune.data.ingest import (
    FileResult,
    IngestError,
    Measured,
    Rejected,
    apply_overlong,
    load_cache,
    mixing_multiplicity,
    save_cache,
    select_samples,
    truncate_text,
)

# ----------------------------------------------------------------------------------------------- synthetic samples


def _sample(layout: list[tuple[str, int]], location: int = 1) -> Measured:
    """A Measured sample from a layout like [("t", 5), ("i", 4), ("a", 3)]: text, image (its wrapper is
    one token either side, the pad run inside), assistant (supervised) text."""
    ids, mask, spans, protected = [], [], [], []
    grids = []
    for kind, n in layout:
        start = len(ids)
        if kind == "i":
            ids += [900] + [999] * n + [901]
            mask += [0] * (n + 2)
            spans.append((start + 1, start + 1 + n))
            protected.append((start, start + n + 2))
            grids.append((2, 2 * n))
        else:
            ids += list(range(start + 1, start + 1 + n))
            mask += [int(kind == "a")] * n
    return Measured(
        location=location,
        sample_id=f"s{location}",
        input_ids=np.array(ids, dtype=np.int32),
        label_mask=np.array(mask, dtype=np.uint8),
        image_refs=[{"path": f"/img{k}.png"} for k in range(len(grids))],
        grids=grids,
        image_spans=spans,
        protected=protected,
    )


def test_truncate_text_keeps_images_and_first_text_tokens() -> None:
    s = _sample([("t", 5), ("i", 4), ("t", 3), ("a", 6), ("i", 2), ("a", 4)])
    # 5 + 6 + 3 + 6 + 4 + 4 = 28 tokens; image blocks 6 + 4 = 10; budget 20 keeps 10 text tokens.
    assert s.num_tokens == 28
    out, outcome = truncate_text(s, 20)
    assert outcome == "truncated" and out is not None and out.truncated
    assert out.num_tokens == 20
    expected_ids = (
        list(range(1, 6)) + [900, 999, 999, 999, 999, 901] + [12, 13, 14] + [15, 16] + [900, 999, 999, 901]
    )
    assert out.input_ids.tolist() == expected_ids
    assert out.label_mask.tolist() == [0] * 5 + [0] * 6 + [0] * 3 + [1, 1] + [0] * 4
    assert out.image_spans == [(6, 10), (17, 19)] and out.protected == [(5, 11), (16, 20)]
    for (a, b), (c, d) in zip(out.image_spans, s.image_spans):  # the pad runs survive whole
        assert out.input_ids[a:b].tolist() == s.input_ids[c:d].tolist()
    assert out.grids == s.grids and out.image_refs == s.image_refs


def test_truncate_text_label_mask_stays_aligned_with_tokens() -> None:
    rng = np.random.default_rng(0)
    for trial in range(50):
        layout = [
            (str(rng.choice(["t", "a", "i"])), int(rng.integers(1, 9)))
            for _ in range(int(rng.integers(2, 9)))
        ]
        layout.append(("a", 3))
        s = _sample(layout)
        budget = int(rng.integers(sum(e - b for b, e in s.protected) + 1, s.num_tokens + 5))
        out, outcome = apply_overlong(s, budget, None, "truncate_text")
        if s.num_tokens <= budget:
            assert outcome == "ok" and out is s
            continue
        if outcome == "no_labels_after_truncation":
            continue
        assert out is not None and out.num_tokens == budget, trial
        # Each kept token carries the mask bit it had before: (id, mask) pairs are a subsequence.
        before = list(zip(s.input_ids.tolist(), s.label_mask.tolist()))
        after = list(zip(out.input_ids.tolist(), out.label_mask.tolist()))
        it = iter(before)
        assert all(pair in it for pair in after), trial
        assert sum(e - b for b, e in out.protected) == sum(e - b for b, e in s.protected)


def test_overlong_policies_and_image_budget() -> None:
    s = _sample([("t", 10), ("i", 8), ("a", 10)])  # 30 tokens, image block 10, 2x16 = 32 patches
    assert apply_overlong(s, 30, None, "error") == (s, "ok")
    assert apply_overlong(s, 29, None, "drop") == (None, "overlong")
    with pytest.raises(IngestError, match="29"):
        apply_overlong(s, 29, None, "error")
    for policy in ("drop", "error", "truncate_text"):
        assert apply_overlong(s, 10, None, policy) == (None, "images_exceed_budget")  # images alone fill it
        assert apply_overlong(s, 100, 31, policy) == (None, "images_exceed_budget")  # too many patches
    assert apply_overlong(s, 100, 32, "error")[1] == "ok"
    out, outcome = apply_overlong(s, 25, None, "truncate_text")
    assert outcome == "truncated" and out.label_mask.sum() == 5
    # Budget 20: the 10 text tokens kept are all prompt, no label survives.
    assert apply_overlong(s, 20, None, "truncate_text") == (None, "no_labels_after_truncation")


def test_mixing_multiplicity_epoch_semantics() -> None:
    assert mixing_multiplicity(10, 1.0, 0, 0).tolist() == [1] * 10
    assert mixing_multiplicity(10, 2.0, 0, 0).tolist() == [2] * 10
    half = mixing_multiplicity(10, 0.5, 0, 0)
    assert sorted(half.tolist()) == [0] * 5 + [1] * 5
    more = mixing_multiplicity(10, 2.3, 0, 0)
    assert sorted(more.tolist()) == [2] * 7 + [3] * 3 and more.sum() == 23
    assert mixing_multiplicity(10, 0.5, 0, 0).tolist() == half.tolist()  # seeded
    assert mixing_multiplicity(10, 0.5, 1, 0).tolist() != half.tolist() or True  # another seed may coincide
    others = {tuple(mixing_multiplicity(10, 0.5, seed, 0).tolist()) for seed in range(20)}
    assert len(others) > 5
    assert mixing_multiplicity(0, 0.5, 0, 0).tolist() == []


def _results() -> list[FileResult]:
    a = FileResult(
        0,
        "/d/a.jsonl",
        "line",
        [
            _sample([("t", 4), ("a", 4)], 1),
            Rejected(2, "blank_line", "blank line"),
            _sample([("t", 20), ("a", 20)], 3),  # overlong at L=32
            _sample([("i", 40), ("a", 2)], 4),  # images exceed
            Rejected(5, "missing_image", "nope"),
            _sample([("t", 2), ("a", 2)], 6),
        ],
    )
    b = FileResult(1, "/d/b.jsonl", "line", [_sample([("t", 3), ("a", 3)], k) for k in range(1, 11)])
    return [a, b]


@pytest.mark.parametrize("overlong", ["truncate_text", "drop"])
def test_select_samples_accounting(overlong: str) -> None:
    specs = [DatasetSpec(Path("/d/a.jsonl")), DatasetSpec(Path("/d/b.jsonl"), weight=1.5)]
    selected, accs, examples = select_samples(
        _results(), specs, 32, None, overlong, seed=0, on_bad_sample="skip"
    )
    a, b = accs
    assert a.read == 6 and dict(a.skipped) == {"blank_line": 1, "missing_image": 1}
    if overlong == "drop":
        assert (
            dict(a.dropped) == {"overlong": 1, "images_exceed_budget": 1}
            and a.packed == 2
            and a.truncated == 0
        )
    else:
        assert dict(a.dropped) == {"images_exceed_budget": 1} and a.packed == 3 and a.truncated == 1
    assert b.read == 10 and b.packed == 10 and b.entries == 15 and not b.dropped
    assert sorted(s.multiplicity for s in selected if s.dataset == 1) == [1] * 5 + [2] * 5
    for acc in accs:
        assert acc.read == acc.packed + sum(acc.skipped.values()) + sum(acc.dropped.values())
    assert examples["missing_image"] == ["/d/a.jsonl:line 5: nope"]
    specs[1] = DatasetSpec(Path("/d/b.jsonl"), weight=0.3)
    _, accs, _ = select_samples(_results(), specs, 32, None, overlong, seed=0, on_bad_sample="skip")
    assert accs[1].packed == 3 and dict(accs[1].dropped) == {"weight_subsample": 7} and accs[1].entries == 3


def test_select_samples_error_policies() -> None:
    specs = [DatasetSpec(Path("/d/a.jsonl")), DatasetSpec(Path("/d/b.jsonl"))]
    with pytest.raises(IngestError, match=r"/d/a.jsonl:line 2: bad sample \(blank_line\)"):
        select_samples(_results(), specs, 32, None, "drop", seed=0, on_bad_sample="error")
    results = _results()
    results[0].items = [it for it in results[0].items if not isinstance(it, Rejected)]
    with pytest.raises(IngestError, match=r"/d/a.jsonl:line 3: .*40 tokens > packing_length 32"):
        select_samples(results, specs, 32, None, "error", seed=0, on_bad_sample="error")


def test_cache_round_trip_and_invalidation(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"1234")
    result = _results()[0]
    result.touched = [str(image), str(tmp_path / "missing.png")]
    save_cache(tmp_path / "cache" / "k1", result, "k1")
    back = load_cache(tmp_path / "cache" / "k1", 0, "k1")
    assert back is not None and back.from_cache and len(back.items) == len(result.items)
    for a, b in zip(result.items, back.items):
        assert type(a) is type(b) and a.location == b.location
        if isinstance(a, Measured):
            assert (
                a.input_ids.tolist() == b.input_ids.tolist()
                and a.label_mask.tolist() == b.label_mask.tolist()
            )
            assert (a.image_refs, a.grids, a.image_spans, a.protected) == (
                b.image_refs,
                b.grids,
                b.image_spans,
                b.protected,
            )
        else:
            assert (a.reason, a.message) == (b.reason, b.message)
    assert load_cache(tmp_path / "cache" / "k1", 0, "other-key") is None
    image.write_bytes(b"12345")  # an image changed: the entry is stale
    assert load_cache(tmp_path / "cache" / "k1", 0, "k1") is None
    save_cache(tmp_path / "cache" / "k1", result, "k1")
    (tmp_path / "missing.png").write_bytes(b"now here")  # a missing image appeared: stale too
    assert load_cache(tmp_path / "cache" / "k1", 0, "k1") is None


# ----------------------------------------------------------------------------------------------- the bad-input corpus


def _corpus_helpers():  # noqa: ANN202 - conftest is not importable as a module under importlib mode
    import importlib.util

    spec = importlib.util.spec_from_file_location("_data_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CORPUS = _corpus_helpers()


def _length_pass(path: Path, model_dir: Path, on_bad_sample: str = "skip", **kw: object) -> list[FileResult]:
    from vlmtune.data.ingest import LengthPassSettings, run_length_pass

    options = {"workers": 0, "progress": False, **kw}
    settings = LengthPassSettings(model_dir, on_bad_sample=on_bad_sample, **options)
    return run_length_pass([DatasetSpec(path)], settings)


@pytest.mark.parametrize("overlong", ["drop", "truncate_text"])
def test_bad_corpus_fully_accounted_in_skip_mode(
    bad_corpus: Path, tiny_model_dir: Path, overlong: str
) -> None:
    [result] = _length_pass(bad_corpus, tiny_model_dir)
    reasons = [it.reason if isinstance(it, Rejected) else None for it in result.items]
    assert reasons == CORPUS.BAD_CORPUS_REASONS  # every line, in order, with its exact reason
    assert [it.location for it in result.items] == list(range(1, len(CORPUS.BAD_CORPUS_REASONS) + 1))
    selected, [acc], examples = select_samples(
        [result],
        [DatasetSpec(bad_corpus)],
        CORPUS.BAD_CORPUS_LENGTH,
        None,
        overlong,
        seed=0,
        on_bad_sample="skip",
    )
    expected_skips = {r: 1 for r in CORPUS.BAD_CORPUS_REASONS if r is not None}
    assert acc.read == 18 and dict(acc.skipped) == expected_skips
    if overlong == "drop":
        assert dict(acc.dropped) == {"overlong": 1, "images_exceed_budget": 1}
        assert acc.packed == 3 and acc.truncated == 0
        assert [s.sample.location for s in selected] == [1, 15, 16]
    else:
        assert dict(acc.dropped) == {"images_exceed_budget": 1}
        assert acc.packed == 4 and acc.truncated == 1
        assert [s.sample.location for s in selected] == [1, 15, 16, 17]
        assert selected[-1].sample.num_tokens == CORPUS.BAD_CORPUS_LENGTH and selected[-1].sample.truncated
    assert acc.read == acc.packed + sum(acc.skipped.values()) + sum(acc.dropped.values())
    assert examples["missing_image"][0].startswith(f"{bad_corpus}:line 4: image file ")


@pytest.mark.parametrize("line", [k + 1 for k, r in enumerate(CORPUS.BAD_CORPUS_REASONS) if r is not None])
def test_bad_sample_error_mode_names_file_line_and_reason(
    tmp_path: Path, tiny_model_dir: Path, line: int
) -> None:
    full = CORPUS.build_bad_corpus(tmp_path / "corpus")
    lines = full.read_bytes().split(b"\n")
    path = full.with_name("one.jsonl")
    path.write_bytes(lines[0] + b"\n" + lines[line - 1] + b"\n")  # a good line, then the bad one
    reason = CORPUS.BAD_CORPUS_REASONS[line - 1]
    with pytest.raises(IngestError, match=rf"{path}:line 2: bad sample \({reason}\): .*--on-bad-sample skip"):
        _length_pass(path, tiny_model_dir, on_bad_sample="error")
    [result] = _length_pass(path, tiny_model_dir, on_bad_sample="skip")
    assert [getattr(it, "reason", None) for it in result.items] == [None, reason]


def test_overlong_error_mode_names_the_sample(bad_corpus: Path, tiny_model_dir: Path) -> None:
    [result] = _length_pass(bad_corpus, tiny_model_dir)
    with pytest.raises(IngestError, match=rf"{bad_corpus}:line 17: .*tokens > packing_length 200"):
        select_samples([result], [DatasetSpec(bad_corpus)], 200, None, "error", seed=0, on_bad_sample="skip")


def test_measured_sample_matches_the_chat_template(demo_data_dir: Path, tiny_model_dir: Path) -> None:
    import json

    from PIL import Image

    from vlmtune.data.chat_template import apply_chat_template
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.tokenization import KimiTokenizer

    path = demo_data_dir / "train.jsonl"
    [result] = _length_pass(path, tiny_model_dir, on_bad_sample="error")
    tokenizer = KimiTokenizer.from_pretrained(tiny_model_dir)
    processor = KimiVLImageProcessor.from_pretrained(tiny_model_dir)
    media_pad = tokenizer.special_tokens["<|media_pad|>"]
    lines = path.read_text().splitlines()
    assert len(result.items) == len(lines) == 60
    for item, line in zip(result.items, lines):
        obj = json.loads(line)
        assert isinstance(item, Measured) and item.sample_id == obj["id"]
        blocks = [b for m in obj["messages"] if isinstance(m["content"], list) for b in m["content"]]
        paths = [b["image"] for b in blocks if b["type"] == "image"]
        sizes = [Image.open(demo_data_dir / p).size for p in paths]
        assert item.grids == [processor.grid_hw(w, h) for w, h in sizes]
        assert item.image_refs == [{"path": str(demo_data_dir / p)} for p in paths]
        out = apply_chat_template(
            obj["messages"], tokenizer, [processor.num_image_tokens(w, h) for w, h in sizes]
        )
        assert item.input_ids.tolist() == out.input_ids  # token for token what training will see
        assert item.label_mask.astype(bool).tolist() == out.label_mask
        assert item.image_spans == out.image_spans
        for (s, e), (lo, hi) in zip(item.image_spans, item.protected):
            assert set(item.input_ids[s:e].tolist()) == {media_pad}
            assert item.input_ids[lo] == tokenizer.special_tokens["<|media_start|>"]
            assert item.input_ids[hi - 1] == tokenizer.special_tokens["<|media_end|>"]
            assert item.input_ids[s - 1] == tokenizer.special_tokens["<|media_content|>"]


def test_workers_give_identical_results(bad_corpus: Path, tiny_model_dir: Path) -> None:
    serial = _length_pass(bad_corpus, tiny_model_dir)[0].items
    parallel = _length_pass(bad_corpus, tiny_model_dir, workers=2, chunk_size=3)[0].items
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        assert type(a) is type(b) and a.location == b.location
        if isinstance(a, Measured):
            assert a.input_ids.tolist() == b.input_ids.tolist() and a.grids == b.grids
        else:
            assert (a.reason, a.message) == (b.reason, b.message)
