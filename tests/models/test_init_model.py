"""`vlmtune init-model`: byte-identical directories per seed, every file loading with its from_pretrained, a tokenizer
whose special ids match config.json and whose demo words are single tokens, a demo sample through template + processor
+ the tiny model (padded and packed), the weightless A3B directory, the CLI, and no half-written directory on failure."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_tools.demo_data import (
    ANSWER_SETS,
    QUESTION_TEMPLATES,
    REPEAT_WORDS,
    VOCAB_PATTERN,
    generate_demo_data,
)
from vlmtune.data.chat_template import KIMI_VL_CHAT_TEMPLATE, apply_chat_template
from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration, kimi_vl_a3b, kimi_vl_tiny
from vlmtune.models.kimi_vl import init_model as init_module
from vlmtune.models.kimi_vl.checkpoint import CheckpointError, checkpoint_files
from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
from vlmtune.models.kimi_vl.init_model import InitModelError, init_model, main
from vlmtune.models.kimi_vl.tokenization import KimiTokenizer, TokenizerFileError
from vlmtune.patches.rmpad import apply_rmpad

TINY_FILES = {"config.json", "model.safetensors", "generation_config.json", "tiktoken.model", "tokenizer_config.json",
              "chat_template.jinja", "preprocessor_config.json"}
A3B_META_FILES = {"config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
                  "preprocessor_config.json"}


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("init") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo_data(out, samples=24, eval_samples=6, seed=0)
    return out


# ------------------------------------------------------------------------------------------------------------------
# determinism and loading
# ------------------------------------------------------------------------------------------------------------------
def test_same_seed_same_bytes(tmp_path: Path, tiny_dir: Path) -> None:
    rng = torch.get_rng_state()
    again = init_model(tmp_path / "again", seed=0)
    other = init_model(tmp_path / "other", seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    a, b, c = _digests(tiny_dir), _digests(again), _digests(other)
    assert set(a) == TINY_FILES
    assert a == b  # every file, byte for byte
    assert {name for name in a if a[name] != c[name]} == {"model.safetensors"}  # a seed changes only the weights


def test_directory_loads_with_consistent_ids(tiny_dir: Path) -> None:
    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir)
    tokenizer = KimiTokenizer.from_pretrained(tiny_dir)
    processor = KimiVLImageProcessor.from_pretrained(tiny_dir)

    config = model.config
    assert config.to_save_dict() == kimi_vl_tiny(num_base_tokens=1024).to_save_dict()
    expected = KimiVLForConditionalGeneration(config)
    expected.init_weights(seed=0)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())  # init_weights(seed), nothing else
    assert all(t.dtype == torch.float32 for t in got.values())
    assert sum(t.numel() for t in model.parameters()) == 833_824

    assert tokenizer.num_base_tokens == 1024 and tokenizer.vocab_size == config.text_config.vocab_size == 1280
    assert tokenizer.media_pad_id == config.media_placeholder_token_id == 1024 + 21
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1024, 1025, 1279) == (
        config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id)
    assert tokenizer.im_end_id == 1026 and tokenizer.im_middle_id == 1024 + 17
    assert tokenizer.chat_template == KIMI_VL_CHAT_TEMPLATE == (tiny_dir / "chat_template.jinja").read_text()
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1024, "eos_token_id": 1025, "pad_token_id": 1279}

    assert processor.defaults_applied == ()
    assert (processor.in_token_limit, processor.pad_input, processor.patch_size) == (1024, True, 14)
    assert processor.image_mean == processor.image_std == (0.5, 0.5, 0.5)


def test_demo_words_are_single_tokens(tiny_dir: Path) -> None:
    tokenizer = KimiTokenizer.from_pretrained(tiny_dir)
    for answers in ANSWER_SETS.values():  # assistant content: bare words
        for answer in answers:
            assert len(tokenizer.encode(answer)) == 1, answer
    for template in QUESTION_TEMPLATES.values():  # questions: one token per word or punctuation mark
        for word in REPEAT_WORDS:
            question = template.format(word=word)
            assert len(tokenizer.encode(question)) == len(re.findall(VOCAB_PATTERN, question)), question
    for word in ("system", "user", "assistant", "image"):  # the template's own text
        assert len(tokenizer.encode(word)) == 1
    assert len(tokenizer.encode("You are a helpful assistant")) == 5


# ------------------------------------------------------------------------------------------------------------------
# a demo sample through template + processor + model
# ------------------------------------------------------------------------------------------------------------------
def _encode_sample(sample: dict, root: Path, tokenizer: KimiTokenizer, processor: KimiVLImageProcessor
                   ) -> tuple[list[int], list[int], dict[str, torch.Tensor] | None]:
    paths = [root / block["image"] for m in sample["messages"] if isinstance(m["content"], list)
             for block in m["content"] if block["type"] == "image"]
    header_counts = []
    for p in paths:  # header only: Image.open reads the size without decoding pixels
        with Image.open(p) as im:
            header_counts.append(processor.num_image_tokens(*im.size))
    images = None
    if paths:
        images = processor([Image.open(p) for p in paths])
        grids = images["image_grid_hws"]
        assert header_counts == (grids[:, 0] // 2 * (grids[:, 1] // 2)).tolist()  # exact, per image
    out = apply_chat_template(sample["messages"], tokenizer, header_counts)
    labels = [t if keep else -100 for t, keep in zip(out.input_ids, out.label_mask)]
    return out.input_ids, labels, images


def test_demo_samples_through_template_processor_and_model(tiny_dir: Path, demo_dir: Path) -> None:
    tokenizer = KimiTokenizer.from_pretrained(tiny_dir)
    processor = KimiVLImageProcessor.from_pretrained(tiny_dir)
    samples = [json.loads(line) for line in (demo_dir / "train.jsonl").read_text().splitlines()]
    chosen = [next(s for s in samples if s["meta"]["qtype"] == q) for q in ("find_red", "repeat", "color")]
    encoded = [_encode_sample(s, demo_dir, tokenizer, processor) for s in chosen]
    assert [len(e[2]["image_grid_hws"]) if e[2] else 0 for e in encoded] == [3, 0, 1]
    assert [sum(t != -100 for t in e[1]) for e in encoded] == [2, 2, 2]  # the answer word and <|im_end|>
    # The supervised answer decodes to the demo answer.
    for sample, (_, labels, _) in zip(chosen, encoded):
        assert tokenizer.decode([t for t in labels if t != -100]) == sample["meta"]["answer"] + "<|im_end|>"

    model = KimiVLForConditionalGeneration.from_pretrained(tiny_dir).eval()
    lengths = [len(e[0]) for e in encoded]
    t = max(lengths)
    ids = torch.full((3, t), tokenizer.pad_id)
    labels = torch.full((3, t), -100)
    mask = torch.zeros(3, t, dtype=torch.long)
    for b, (row_ids, row_labels, _) in enumerate(encoded):
        ids[b, :len(row_ids)] = torch.tensor(row_ids)
        labels[b, :len(row_labels)] = torch.tensor(row_labels)
        mask[b, :len(row_ids)] = 1
    pixel_values = torch.cat([e[2]["pixel_values"] for e in encoded if e[2]])
    grids = torch.cat([e[2]["image_grid_hws"] for e in encoded if e[2]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixel_values,
                       image_grid_hws=grids)
    assert padded.num_supervised_tokens == 6
    # Random init (std 0.02): near-uniform predictions, so the loss sits near ln(vocab).
    assert torch.isfinite(padded.loss) and abs(padded.loss.item() - math.log(1280)) < 0.05, padded.loss.item()

    apply_rmpad(model, attention="sdpa_varlen")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(input_ids=ids[mask.bool()][None], labels=labels[mask.bool()][None], cu_seqlens=cu,
                       max_seqlen=t, pixel_values=pixel_values, image_grid_hws=grids)
    assert packed.num_supervised_tokens == 6
    assert abs(packed.loss.item() - padded.loss.item()) < 1e-5
    assert (packed.logits[0] - padded.logits[mask.bool()]).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------------------------------
# A3B without weights
# ------------------------------------------------------------------------------------------------------------------
def test_a3b_meta_directory(tmp_path: Path) -> None:
    out = init_model(tmp_path / "a3b", preset="a3b", meta=True)
    assert {f.name for f in out.iterdir()} == A3B_META_FILES
    config = json.loads((out / "config.json").read_text())
    assert config == kimi_vl_a3b().to_save_dict()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    names = {int(i): entry["content"] for i, entry in tok_config["added_tokens_decoder"].items()}
    assert {163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163587: "<|im_user|>", 163588: "<|im_assistant|>",
            163594: "<|im_system|>", 163601: "<|im_middle|>", 163605: "<|media_pad|>", 163839: "[PAD]"}.items() <= (
        names.items())
    assert names[163605] == "<|media_pad|>" and config["media_placeholder_token_id"] == 163605
    assert tok_config["chat_template"] == KIMI_VL_CHAT_TEMPLATE
    processor = KimiVLImageProcessor.from_pretrained(out)
    assert processor.in_token_limit == 4096 and processor.num_image_tokens(1024, 1024) == 1089
    with pytest.raises(TokenizerFileError, match="tiktoken.model not found"):
        KimiTokenizer.from_pretrained(out)
    with pytest.raises(CheckpointError, match="no model.safetensors"):  # (what from_pretrained raises, after
        checkpoint_files(out)  # building the 16 B model on the meta device for 6 s)
    with pytest.raises(InitModelError, match="pass --meta"):
        init_model(tmp_path / "no", preset="a3b")
    assert not (tmp_path / "no").exists()


# ------------------------------------------------------------------------------------------------------------------
# CLI and failure modes
# ------------------------------------------------------------------------------------------------------------------
def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_dir: Path) -> None:
    out = tmp_path / "m"
    assert main(["--preset", "tiny", "--out", str(out), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "parameters 833,824" in printed and "vocab 1280" in printed and "media placeholder 1045" in printed
    assert _digests(out) == _digests(tiny_dir)

    assert main(["--out", str(out), "--seed", "5"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert _digests(out) == _digests(tiny_dir)  # untouched
    assert main(["--out", str(out), "--seed", "5", "--overwrite"]) == 0
    assert _digests(out)["model.safetensors"] != _digests(tiny_dir)["model.safetensors"]

    assert main(["--preset", "tiny", "--out", str(tmp_path / "meta"), "--meta"]) == 0
    assert {f.name for f in (tmp_path / "meta").iterdir()} == TINY_FILES - {"model.safetensors"}
    assert main(["--preset", "a3b", "--out", str(tmp_path / "a3b")]) == 2
    assert "pass --meta" in capsys.readouterr().err


def test_failure_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_written(folder: Path, seed: int, meta: bool) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(init_module, "_write_tiny", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        init_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        init_model(tmp_path / "empty")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and not any((tmp_path / "empty").iterdir())
    with pytest.raises(InitModelError, match="seed must be an integer"):
        init_model(tmp_path / "x", seed="1")  # type: ignore[arg-type]
    with pytest.raises(InitModelError, match="unknown preset"):
        init_model(tmp_path / "x", preset="huge")
