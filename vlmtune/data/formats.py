"""Sample formats: read users' image+text files into one normalised conversation form.

Supported inputs (one dataset = one file, or one `datasets.save_to_disk` folder):

    container            how it is read                                   location of a sample
    *.jsonl              line by line AS BYTES: one broken line is one     line number (1-based)
                         counted bad sample, never a failed file
    *.json               one JSON array of samples (LLaVA style)          row (0-based array index)
    *.parquet            `datasets` streaming reader, images not decoded  row (0-based)
    *.arrow / save_to_disk folder   `datasets.Dataset.from_file` / `load_from_disk` (memory-mapped)   row

Sample schemas (`format: auto` picks by key: ``messages`` -> messages, ``conversations`` -> llava/sharegpt):

- messages (OpenAI style): ``{"messages": [{"role": "user", "content": [{"type": "image", "image":
  "a.png"}, {"type": "text", "text": "what is it?"}]}, {"role": "assistant", "content": "a cat"}]}``.
  Content is a string or a list of blocks: ``text``; ``image`` (``"image": path`` or no payload, then
  the next entry of the sample's top-level ``images`` list is used); ``image_url`` (``{"url": path}`` or
  ``file://`` URL). A string content holds ``<image>`` markers only when the sample has a top-level
  ``images``/``image`` field.
- llava: ``{"image": "a.png" | "images": [...], "conversations": [{"from": "human", "value": "<image>\\nQ"},
  {"from": "gpt", "value": "A"}]}``; every ``<image>`` marker takes the next image; the number of markers
  must equal the number of images.
- sharegpt: like llava (``from``/``value`` or ``role``/``content`` turns, ``human``/``gpt``/``system``
  roles), plus an optional top-level ``system`` string.

Images are paths relative to the data file's folder, or to ``image_root`` when given; a path that leaves
that root (``..``, an absolute path elsewhere) is rejected. Symlinks inside the root are followed (the check
is lexical). In parquet/arrow files an image is a ``{"bytes", "path"}`` struct (the `datasets.Image`
feature), raw bytes, or a path string.

Every problem with a sample raises `BadSample` with a stable reason code (see `BAD_REASONS`); ingestion
counts them per reason or stops, naming file, line/row and reason.

Image sizes come from the header only (`read_image_size`): Pillow's `Image.open` parses the header and
never decodes pixels until asked. EXIF orientation is honoured the same way at count time and at load time
(`open_image`), so the token count of a rotated JPEG matches the pixels the loader produces.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

# ----------------------------------------------------------------------------------------------- reasons

# Stable reason codes (the keys of stats.json's samples_skipped). Each has a test in tests/data/test_ingest.py.
BAD_REASONS: dict[str, str] = {
    "blank_line": "an empty or whitespace-only JSONL line",
    "non_utf8": "the line is not valid UTF-8",
    "malformed_json": "the line/row is not valid JSON, or not a JSON object",
    "invalid_sample": "the sample misses its messages/conversations or has fields of the wrong type",
    "unknown_role": "a turn's role is not system/user/assistant (or human/gpt)",
    "unknown_content_type": "a content block type other than text/image/image_url",
    "image_placeholder_mismatch": "the number of <image> markers / image blocks differs from the images given",
    "no_assistant_turn": "the conversation has no assistant turn to learn from",
    "empty_assistant_text": "an assistant turn has no text",
    "unsupported_image_source": "an image given as a remote URL or inline data (download/convert it first)",
    "image_outside_root": "an image path that escapes the image root",
    "missing_image": "an image file that does not exist",
    "corrupt_image": "image bytes that Pillow cannot identify",
    "decompression_bomb": "an image header claiming more pixels than Pillow's MAX_IMAGE_PIXELS",
    "image_too_small": "an image side below the processor's min_image_side",
    "image_too_large": "an image whose patch grid would reach the 512-patches-per-side limit",
}

FORMATS = ("auto", "messages", "llava", "sharegpt")
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}
IMAGE_MARKER = "<image>"


class BadSample(Exception):
    """One unusable sample. `reason` is a key of `BAD_REASONS`; the message says what and how to fix it."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in BAD_REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; add it to BAD_REASONS")
        super().__init__(message)
        self.reason = reason
        self.message = message


class DataFormatError(ValueError):
    """A whole data file that cannot be read (missing, unknown extension, a .json that is not an array)."""


# ----------------------------------------------------------------------------------------------- structures


@dataclass(frozen=True)
class DatasetSpec:
    """One input dataset.

    Attributes:
        path: a .jsonl / .json / .parquet / .arrow file or a `datasets.save_to_disk` folder.
        weight: epoch mixing weight: each good sample appears floor(w) times per epoch, plus once more for a
            seeded subsample of round(frac(w) * n_good) of them (w = 0.5 keeps half, w = 2 repeats twice).
        format: "auto" (by key), "messages", "llava" or "sharegpt".
        image_root: folder that relative image paths start from (default: the data file's folder).
        split: the split to read from a `datasets.save_to_disk` folder holding a DatasetDict (None for files).
    """

    path: Path
    weight: float = 1.0
    format: str = "auto"
    image_root: Path | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataFormatError(f"{self.path}: format {self.format!r} unknown; expected one of {FORMATS}")
        if not (self.weight >= 0.0) or self.weight == float("inf"):
            raise DataFormatError(f"{self.path}: weight {self.weight!r} must be a finite number >= 0")
        if self.split is not None and not Path(self.path).is_dir():
            raise DataFormatError(
                f"{self.path}: split={self.split!r} applies to `datasets.save_to_disk` folders only; remove it"
            )

    @property
    def root(self) -> Path:
        """The folder relative image paths are resolved against (absolute)."""
        base = self.image_root if self.image_root is not None else Path(self.path).parent
        return Path(os.path.abspath(base))


@dataclass
class RawItem:
    """One unparsed sample as read from a file: the unit sent to worker processes.

    Attributes:
        dataset: index of the dataset in the run's list.
        file: absolute path of the data file.
        location: 1-based line number (JSONL) or 0-based row (JSON array, parquet, arrow).
        kind: "line" or "row".
        payload: the line's raw bytes (JSONL) or the row's decoded object (others).
    """

    dataset: int
    file: str
    location: int
    kind: str
    payload: Any

    def where(self) -> str:
        """`file:line N` / `file:row N`, for messages."""
        return f"{self.file}:{self.kind} {self.location}"


@dataclass
class ImageSource:
    """Where one image's bytes are, and the JSON-able reference that re-opens it later (`open_image`).

    Attributes:
        ref: {"path": absolute path} or {"file": data file, "row": r, "column": c, "index": k} for bytes stored
            in a parquet/arrow column ("index" is -1 when the column holds a single image).
        data: the bytes, for images stored in the data file (None for paths).
    """

    ref: dict[str, Any]
    data: bytes | None = None


@dataclass
class ParsedSample:
    """A sample in normalised form.

    Attributes:
        sample_id: the sample's "id" field, or "FILE:LOCATION".
        messages: OpenAI-style messages, role in ROLES, content a list of {"type": "text", "text"} and
            {"type": "image"} blocks (the k-th image block is images[k]).
        images: one ImageSource per image block, in order.
    """

    sample_id: str
    messages: list[dict[str, Any]]
    images: list[ImageSource] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- reading files


def container_of(path: Path) -> str:
    """The container kind of a data path: "jsonl", "json", "parquet", "arrow" or "arrow_dir"."""
    path = Path(path)
    if path.is_dir():
        if any((path / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json")):
            return "arrow_dir"
        raise DataFormatError(
            f"{path} is a folder but not a `datasets.save_to_disk` folder (no state.json / dataset_dict.json)"
        )
    suffix = path.suffix.lower()
    kinds = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
    if suffix not in kinds:
        raise DataFormatError(
            f"{path}: unknown data file extension {suffix!r}; expected .jsonl, .json, .parquet, .arrow "
            "or a `datasets.save_to_disk` folder"
        )
    return kinds[suffix]


def content_hash(path: Path) -> str:
    """sha256 of a data file's bytes (of every file, in name order, for a folder), streamed in 1 MiB blocks."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def count_items(path: Path, split: str | None = None) -> int:
    """Number of raw items a file yields (JSONL: lines, including a last line without newline)."""
    kind = container_of(path)
    if kind == "jsonl":
        lines, last = 0, b"\n"
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                lines += block.count(b"\n")
                last = block[-1:]
        return lines + (last != b"\n")
    if kind == "json":
        return len(_load_json_array(Path(path)))
    return (
        len(_open_arrow_dataset(Path(path), kind, split)) if kind != "parquet" else _parquet_rows(Path(path))
    )


def iter_raw_items(path: Path, dataset: int = 0, split: str | None = None) -> Iterator[RawItem]:
    """Yield every raw item of a data file in order; never raises for one bad sample.

    Raises:
        DataFormatError: when the file itself cannot be read (missing, unknown type, .json not an array).
    """
    path = Path(os.path.abspath(path))
    if not path.exists():
        raise DataFormatError(f"data file {path} does not exist; check --data / data.train[].path")
    kind = container_of(path)
    file = str(path)
    if kind == "jsonl":
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                yield RawItem(dataset, file, number, "line", line)
    elif kind == "json":
        for row, obj in enumerate(_load_json_array(path)):
            yield RawItem(dataset, file, row, "row", obj)
    elif kind == "parquet":
        yield from _iter_parquet(path, dataset)
    else:
        ds = _open_arrow_dataset(path, kind, split).with_format("arrow")
        row = 0
        for table in ds.iter(batch_size=256):
            for obj in table.to_pylist():
                yield RawItem(dataset, file, row, "row", obj)
                row += 1


def _load_json_array(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataFormatError(
            f"{path}: not valid JSON ({err}); a .json data file must be one JSON array of samples. "
            "Convert it to JSONL (one sample per line) so that a broken sample costs one line, not the file"
        ) from err
    if not isinstance(data, list):
        raise DataFormatError(
            f"{path}: a .json data file must hold a JSON array of samples, got {type(data).__name__}"
        )
    return data


def _quiet_datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _iter_parquet(path: Path, dataset: int) -> Iterator[RawItem]:
    datasets = _quiet_datasets()
    # Streaming: no arrow copy in the HF cache; decode(False) keeps Image features as {"bytes", "path"}.
    stream = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True).decode(
        False
    )
    for row, obj in enumerate(stream):
        yield RawItem(dataset, str(path), row, "row", obj)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _open_arrow_dataset(path: Path, kind: str, split: str | None = None) -> Any:
    """A memory-mapped `datasets.Dataset` (one split of a saved DatasetDict when `split` is given)."""
    datasets = _quiet_datasets()
    if kind != "arrow_dir":
        return datasets.Dataset.from_file(str(path))
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise DataFormatError(
                f"{path} holds the splits {sorted(ds)}; choose one with data.train[].split ({split!r} given)"
            )
        return ds[split]
    if split is not None:
        raise DataFormatError(f"{path} holds a single dataset, not splits; remove split={split!r}")
    return ds


# ----------------------------------------------------------------------------------------------- parsing


def decode_payload(item: RawItem) -> dict[str, Any]:
    """The item as a JSON object: decode and parse JSONL bytes; rows are objects already.

    Raises:
        BadSample: blank_line, non_utf8 or malformed_json.
    """
    if item.kind != "line":
        if not isinstance(item.payload, dict):
            raise BadSample(
                "malformed_json", f"row is a {type(item.payload).__name__}, expected a JSON object"
            )
        return item.payload
    raw: bytes = item.payload
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample("non_utf8", f"line is not valid UTF-8 ({err}); re-encode the file as UTF-8") from err
    if item.location == 1 and text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark at the start of the file
    if not text.strip():
        raise BadSample("blank_line", "blank line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadSample("malformed_json", f"line is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise BadSample("malformed_json", f"line is a JSON {type(obj).__name__}, expected an object")
    return obj


def parse_item(item: RawItem, spec: DatasetSpec) -> ParsedSample:
    """Parse one raw item into a `ParsedSample` (no image is opened here).

    Args:
        item: the raw line/row.
        spec: its dataset (format and image root).

    Raises:
        BadSample: with the reason code of the first problem found.
    """
    obj = decode_payload(item)
    fmt = spec.format
    if fmt == "auto":
        if "messages" in obj:
            fmt = "messages"
        elif "conversations" in obj:
            fmt = "sharegpt"
        else:
            raise BadSample(
                "invalid_sample",
                f"sample has neither 'messages' nor 'conversations' (keys: {sorted(obj)[:8]})",
            )
    sample_id = obj.get("id")
    sample_id = str(sample_id) if sample_id is not None else f"{Path(item.file).name}:{item.location}"
    top_images = _top_level_images(obj, item, spec)
    if fmt == "messages":
        messages, images = _parse_messages(obj, top_images, item, spec)
    else:
        messages, images = _parse_conversations(obj, top_images, fmt)
    _check_turns(messages)
    return ParsedSample(sample_id, messages, images)


def _top_level_images(obj: dict[str, Any], item: RawItem, spec: DatasetSpec) -> list[ImageSource] | None:
    """The sample's `images` (list) or `image` (one) field as sources; None when neither is present."""
    if obj.get("images") is not None:
        column, values = "images", obj["images"]
        if not isinstance(values, list):
            values = [values]
            single = True
        else:
            single = False
    elif obj.get("image") is not None:
        column, values, single = "image", obj["image"], True
        if isinstance(values, list):
            single = False
        else:
            values = [values]
    else:
        return None
    return [
        image_source(v, item, spec, column=column, index=-1 if single else k) for k, v in enumerate(values)
    ]


def image_source(
    value: Any, item: RawItem, spec: DatasetSpec, column: str = "", index: int = -1
) -> ImageSource:
    """An image value (path string, bytes, {"bytes", "path"} struct, image_url dict) as an `ImageSource`.

    Raises:
        BadSample: unsupported_image_source, image_outside_root or invalid_sample.
    """
    if isinstance(value, dict) and "url" in value:
        value = value["url"]
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            value = value["bytes"]
        else:
            value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if item.kind == "line" or column == "messages":
            raise BadSample(
                "unsupported_image_source",
                "image bytes inside a JSONL line or inside the messages are not supported; store them in an "
                "'images' column (list of {bytes, path}) and use {'type': 'image'} blocks without payload",
            )
        ref = {"file": item.file, "row": item.location, "column": column, "index": index}
        if spec.split is not None:
            ref["split"] = spec.split
        return ImageSource(ref, bytes(value))
    if not isinstance(value, str) or not value:
        raise BadSample("invalid_sample", f"image value {str(value)[:60]!r} is not a path, bytes or URL")
    if value.startswith("file://"):
        value = value[len("file://") :]
    elif value.startswith(("http://", "https://", "data:", "s3://", "gs://")):
        raise BadSample(
            "unsupported_image_source",
            f"image {value[:60]!r}: remote URLs and inline data are not read; download the images and use "
            "paths relative to the data file (or --image-root)",
        )
    return ImageSource({"path": resolve_image_path(value, spec.root)})


def resolve_image_path(value: str, root: Path) -> str:
    """Absolute path of `value` (relative to `root`, or absolute); rejects paths that leave `root`.

    The check is lexical (normpath), so `..` escapes are caught and symlinks placed inside the root by the
    user are allowed.

    Raises:
        BadSample: image_outside_root.
    """
    root_str = os.path.normpath(str(root))
    full = os.path.normpath(os.path.join(root_str, value))
    if os.path.commonpath([root_str, full]) != root_str:
        raise BadSample(
            "image_outside_root",
            f"image path {value!r} resolves to {full}, outside the image root {root_str}; move the image under "
            "the root or pass --image-root / data.train[].image_root",
        )
    return full


def _text_and_images(text: str, split_markers: bool) -> list[dict[str, Any]]:
    """Content blocks of a string: text pieces, and {"type": "image"} at each <image> marker when asked."""
    if not split_markers:
        return [{"type": "text", "text": text}] if text else []
    blocks: list[dict[str, Any]] = []
    for k, piece in enumerate(text.split(IMAGE_MARKER)):
        if k:
            blocks.append({"type": "image"})
        if piece:
            blocks.append({"type": "text", "text": piece})
    return blocks


def _role(value: Any) -> str:
    role = _ROLE_ALIASES.get(value) if isinstance(value, str) else None
    if role is None:
        raise BadSample(
            "unknown_role",
            f"role {value!r} unknown; expected system/user/assistant (or human/gpt in conversations)",
        )
    return role


def _parse_messages(
    obj: dict[str, Any], top_images: list[ImageSource] | None, item: RawItem, spec: DatasetSpec
) -> tuple[list[dict[str, Any]], list[ImageSource]]:
    raw = obj.get("messages")
    if isinstance(raw, str):  # parquet rows often store messages as a JSON string
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise BadSample("malformed_json", f"'messages' string is not valid JSON: {err}") from err
    if not isinstance(raw, list) or not raw:
        raise BadSample("invalid_sample", "'messages' must be a non-empty list of {role, content}")
    pending = list(top_images or [])
    images: list[ImageSource] = []
    messages = []
    for turn, message in enumerate(raw):
        if not isinstance(message, dict) or "role" not in message:
            raise BadSample("invalid_sample", f"messages[{turn}] is not an object with 'role' and 'content'")
        role = _role(message["role"])
        content = message.get("content")
        blocks: list[dict[str, Any]] = []
        if content is None:
            content = ""
        if isinstance(content, str):
            blocks = _text_and_images(content, split_markers=top_images is not None)
            for block in blocks:
                if block["type"] == "image":
                    images.append(_take(pending, top_images, turn))
        elif isinstance(content, list):
            for part, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise BadSample(
                        "invalid_sample", f"messages[{turn}].content[{part}] has no string 'type'"
                    )
                kind = block["type"]
                if kind == "text":
                    text = block.get("text")
                    if not isinstance(text, str):
                        raise BadSample(
                            "invalid_sample", f"messages[{turn}].content[{part}].text is not a string"
                        )
                    if text:
                        blocks.append({"type": "text", "text": text})
                elif kind in ("image", "image_url"):
                    payload = block.get(kind)
                    if payload is None and kind == "image":
                        payload = block.get("image_url", block.get("path"))
                    if payload is None:
                        images.append(_take(pending, top_images, turn))
                    else:
                        images.append(image_source(payload, item, spec, column="messages", index=len(images)))
                    blocks.append({"type": "image"})
                else:
                    raise BadSample(
                        "unknown_content_type",
                        f"messages[{turn}].content[{part}] has type {kind!r}; supported: text, image, image_url",
                    )
        else:
            raise BadSample("invalid_sample", f"messages[{turn}].content is a {type(content).__name__}")
        messages.append({"role": role, "content": blocks})
    if pending:
        raise BadSample(
            "image_placeholder_mismatch",
            f"{len(top_images or [])} images given but only {len(top_images or []) - len(pending)} image "
            "blocks / <image> markers in the messages",
        )
    return messages, images


def _take(pending: list[ImageSource], top_images: list[ImageSource] | None, turn: int) -> ImageSource:
    if not pending:
        given = len(top_images or [])
        raise BadSample(
            "image_placeholder_mismatch",
            f"messages[{turn}] has more image blocks / <image> markers than the {given} images given",
        )
    return pending.pop(0)


def _parse_conversations(
    obj: dict[str, Any], top_images: list[ImageSource] | None, fmt: str
) -> tuple[list[dict[str, Any]], list[ImageSource]]:
    raw = obj.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise BadSample("invalid_sample", "'conversations' must be a non-empty list of {from, value}")
    messages: list[dict[str, Any]] = []
    system = obj.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    given = list(top_images or [])
    markers = 0
    for turn, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise BadSample("invalid_sample", f"conversations[{turn}] is not an object")
        role_value = entry.get("from", entry.get("role"))
        value = entry.get("value", entry.get("content"))
        if not isinstance(value, str):
            raise BadSample("invalid_sample", f"conversations[{turn}] has no string 'value'")
        blocks = _text_and_images(value, split_markers=True)
        markers += sum(b["type"] == "image" for b in blocks)
        messages.append({"role": _role(role_value), "content": blocks})
    if markers != len(given):
        raise BadSample(
            "image_placeholder_mismatch",
            f"{markers} <image> markers in the conversation but {len(given)} images in 'image'/'images' ({fmt})",
        )
    return messages, given


def _check_turns(messages: list[dict[str, Any]]) -> None:
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise BadSample("no_assistant_turn", "no assistant turn: nothing to learn from this sample")
    for m in assistants:
        text = "".join(b.get("text", "") for b in m["content"] if b["type"] == "text")
        if not text.strip():
            raise BadSample("empty_assistant_text", "an assistant turn has no text")


# ----------------------------------------------------------------------------------------------- images

# EXIF orientation -> the transpose that shows the image upright (PIL.ImageOps.exif_transpose's table).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> int:
    """EXIF orientation read from header data only (info["exif"]); never triggers a pixel decode."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # a broken EXIF block only loses the orientation  # noqa: BLE001
        return 1
    value = exif.get(0x0112, 1)
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _open_header(source: ImageSource) -> Image.Image:
    """Image.open on the path or bytes, with Pillow's bomb warning promoted to an error."""
    target: Any = io.BytesIO(source.data) if source.data is not None else source.ref["path"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(target)


def read_image_size(source: ImageSource, verify: bool = False) -> tuple[int, int]:
    """(width, height) of an image as the model will see it, from the header only (EXIF rotation applied).

    Args:
        source: the image's path or bytes.
        verify: also run Pillow's `verify()` (PNG: chunk CRCs; no pixel decode) to catch damaged files early.

    Raises:
        BadSample: missing_image, corrupt_image or decompression_bomb.
    """
    where = (
        source.ref.get("path")
        or f"{source.ref['file']} row {source.ref['row']} column {source.ref['column']}"
    )
    try:
        image = _open_header(source)
    except FileNotFoundError as err:
        raise BadSample("missing_image", f"image file {where} does not exist") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample(
            "decompression_bomb",
            f"image {where}: {err} Raise PIL.Image.MAX_IMAGE_PIXELS only for trusted data",
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSample("corrupt_image", f"image {where} cannot be read: {err}") from err
    with image:
        width, height = image.size
        orientation = _orientation(image)
        if verify:
            try:
                image.verify()
            except Exception as err:  # noqa: BLE001 - Pillow raises many types for damaged data
                raise BadSample("corrupt_image", f"image {where} fails verification: {err}") from err
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


class ImageOpener:
    """Re-opens images from the JSON references stored in a pack (paths or parquet/arrow byte cells).

    Keeps opened parquet files / arrow datasets so that many images of one file cost one open. One instance
    per process (DataLoader workers each make their own).
    """

    def __init__(self) -> None:
        self._arrow: dict[str, Any] = {}
        self._parquet: dict[str, Any] = {}
        self._row_group: tuple[str, int, Any] | None = None

    def read_bytes(self, ref: dict[str, Any]) -> bytes:
        """The encoded bytes an image reference points at."""
        if "path" in ref:
            return Path(ref["path"]).read_bytes()
        value = self._cell(ref["file"], int(ref["row"]), ref["column"], ref.get("split"))
        if ref["column"] == "messages":
            raise ValueError(f"image reference {ref} points into a messages column; not supported")
        if int(ref.get("index", -1)) >= 0:
            value = value[int(ref["index"])]
        if isinstance(value, dict):
            if value.get("bytes") is None:
                raise ValueError(f"image reference {ref}: the cell holds no bytes ({value.get('path')!r})")
            value = value["bytes"]
        return bytes(value)

    def open(self, ref: dict[str, Any]) -> Image.Image:
        """The image as an RGB PIL image, EXIF orientation applied exactly as `read_image_size` counted it."""
        if "path" in ref:
            source = ImageSource(ref)
        else:
            source = ImageSource(ref, self.read_bytes(ref))
        image = _open_header(source)
        orientation = _orientation(image)
        image.load()
        if orientation != 1:
            image = image.transpose(_ORIENTATION_TRANSPOSE[orientation])
        return image.convert("RGB") if image.mode != "RGB" else image

    def _cell(self, file: str, row: int, column: str, split: str | None = None) -> Any:
        path = Path(file)
        kind = container_of(path)
        if kind == "parquet":
            return self._parquet_cell(file, row, column)
        key = f"{file}\0{split}"
        if key not in self._arrow:
            self._arrow[key] = _open_arrow_dataset(path, kind, split).with_format("arrow")
        return self._arrow[key][row : row + 1].column(column).to_pylist()[0]

    def _parquet_cell(self, file: str, row: int, column: str) -> Any:
        import pyarrow.parquet as pq

        if file not in self._parquet:
            self._parquet[file] = pq.ParquetFile(file)
        handle = self._parquet[file]
        start = 0
        for group in range(handle.metadata.num_row_groups):
            rows = handle.metadata.row_group(group).num_rows
            if row < start + rows:
                cached = self._row_group
                if cached is None or cached[0] != file or cached[1] != group:
                    cached = (file, group, handle.read_row_group(group, columns=[column]))
                    self._row_group = cached
                return cached[2].column(column)[row - start].as_py()
            start += rows
        raise IndexError(f"{file}: row {row} out of range ({start} rows)")


def open_image(ref: dict[str, Any]) -> Image.Image:
    """Open one image reference (a fresh `ImageOpener`; keep one instance when opening many)."""
    return ImageOpener().open(ref)
