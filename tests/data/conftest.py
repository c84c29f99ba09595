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
