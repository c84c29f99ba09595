"""Fixtures for the data tests: small images written with Pillow, crafted bad images, a tiny model folder.

No binary fixture is stored in the repository: every image is generated here.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image


def make_png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A real RGB PNG of the given size."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    """A real JPEG, optionally with an EXIF orientation tag (6 = rotate 90 degrees clockwise to view)."""
    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), (20, 120, 220))
    if orientation is None:
        image.save(buffer, format="JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def make_header_only_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but carries one tiny IDAT: a decompression-bomb stand-in.

    Only the header is ever parsed by the length pass, so the claimed size is what Pillow's guard sees.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0"))
        + _chunk(b"IEND", b"")
    )


@pytest.fixture
def png() -> Callable[..., bytes]:
    """make_png(width, height, color=...)."""
    return make_png


@pytest.fixture
def jpeg() -> Callable[..., bytes]:
    """make_jpeg(width, height, orientation=None)."""
    return make_jpeg


@pytest.fixture
def bomb_png() -> Callable[[int, int], bytes]:
    """make_header_only_png(width, height)."""
    return make_header_only_png


@pytest.fixture
def write_jsonl() -> Callable[[Path, list[Any]], Path]:
    """write_jsonl(path, rows): rows are dicts (dumped as JSON) or raw bytes (written as the line)."""

    def write(path: Path, rows: list[Any]) -> Path:
        lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path

    return write


# ----------------------------------------------------------------------------------------------- model folder

TINY_IN_TOKEN_LIMIT = 256  # small images -> at most 256 patches (64 LM tokens) per image, fast tests


def build_tiny_model_dir(out_dir: Path, in_token_limit: int = TINY_IN_TOKEN_LIMIT) -> Path:
    """A model folder with just what the data pipeline reads: a tiny Kimi tokenizer (tiktoken.model +
    tokenizer_config.json, BPE trained on the demo vocabulary) and a preprocessor_config.json (Kimi-VL-A3B
    values, pad_input true, with a lower in_token_limit)."""
    from data_tools.demo_data import QUESTION_TEMPLATES, _vocabulary
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.tokenization import build_tokenizer_files

    corpus = " ".join(_vocabulary()) + " system user assistant image You are a helpful assistant "
    corpus += " ".join(QUESTION_TEMPLATES.values())
    build_tokenizer_files(out_dir, corpus * 3, num_merges=100)
    KimiVLImageProcessor.kimi_vl_a3b(in_token_limit=in_token_limit).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tiny model folder (tokenizer + preprocessor_config.json); do not modify it."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo VQA set with 60 train / 6 eval samples (train.jsonl, images/); do not modify it."""
    from data_tools.demo_data import generate_demo_data

    out = tmp_path_factory.mktemp("demo")
    generate_demo_data(out, samples=60, eval_samples=6, seed=0)
    return out


# ----------------------------------------------------------------------------------------------- bad-input corpus

# One JSONL line per case, in this order; the value is the reason it is skipped with (None = good).
BAD_CORPUS_REASONS: list[str | None] = [
    None,  # 1 good messages sample with one image
    "blank_line",  # 2
    "corrupt_image",  # 3
    "missing_image",  # 4
    "image_outside_root",  # 5
    "image_placeholder_mismatch",  # 6 LLaVA: an image but no <image> marker
    "no_assistant_turn",  # 7
    "empty_assistant_text",  # 8
    "malformed_json",  # 9
    "non_utf8",  # 10
    "unknown_content_type",  # 11
    "image_too_small",  # 12 5x5 px < min_image_side 14
    "decompression_bomb",  # 13 header claims 100000 x 100000
    "image_too_large",  # 14 header claims 14 x 100000: the grid would reach 1352 patches per side
    None,  # 15 good LLaVA sample
    None,  # 16 good ShareGPT text-only sample
    None,  # 17 long text: overlong at packing_length 200 (dropped or truncated by policy)
    None,  # 18 four 300x300 images (64 tokens each): the images alone exceed packing_length 200
]
BAD_CORPUS_LENGTH = 200  # packing_length the corpus is designed for


def build_bad_corpus(root: Path) -> Path:
    """Write root/data.jsonl (the lines of BAD_CORPUS_REASONS) and root/images/; returns the JSONL path."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    (images / "good.png").write_bytes(make_png(100, 80))
    (images / "big.png").write_bytes(make_png(300, 300))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")
    (images / "tiny.png").write_bytes(make_png(5, 5))
    (images / "bomb.png").write_bytes(make_header_only_png(100_000, 100_000))
    (images / "tall.png").write_bytes(make_header_only_png(14, 100_000))
    (root.parent / "outside.png").write_bytes(make_png(64, 64))

    def sample(image: str | None, question: str = "what color is the shape?", answer: Any = "red") -> dict:
        content: list[dict] = [{"type": "image", "image": image}] if image else []
        content.append({"type": "text", "text": question})
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}

    long_answer = " ".join(["red green blue yellow"] * 60)
    rows: list[Any] = [
        sample("images/good.png"),
        b"",
        sample("images/corrupt.png"),
        sample("images/missing.png"),
        sample("../outside.png"),
        {
            "image": "images/good.png",
            "conversations": [{"from": "human", "value": "no marker"}, {"from": "gpt", "value": "x"}],
        },
        {"messages": [{"role": "user", "content": "anyone?"}]},
        sample("images/good.png", answer="   "),
        b'{"messages": [{"role": "user", "content": "unterminated',
        b'{"messages": "\xff\xfe\xfd"}',
        {
            "messages": [
                {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        sample("images/tiny.png"),
        sample("images/bomb.png"),
        sample("images/tall.png"),
        {
            "image": "images/good.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat shape is it?"},
                {"from": "gpt", "value": "circle"},
            ],
        },
        {
            "system": "be brief",
            "conversations": [
                {"from": "human", "value": "repeat the word: cat"},
                {"from": "gpt", "value": "cat"},
            ],
        },
        sample(None, question="repeat the words", answer=long_answer),
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": "images/big.png"}] * 4
                    + [{"type": "text", "text": "which image has the red shape?"}],
                },
                {"role": "assistant", "content": "first"},
            ]
        },
    ]
    assert len(rows) == len(BAD_CORPUS_REASONS)
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path = root / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def bad_corpus(tmp_path: Path) -> Path:
    """build_bad_corpus(tmp_path / "corpus"): the JSONL path."""
    return build_bad_corpus(tmp_path / "corpus")
