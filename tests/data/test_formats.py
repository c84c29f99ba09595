"""Sample formats: parsing of messages / LLaVA / ShareGPT, containers, image references and header reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtune.data.formats import (
    BAD_REASONS,
    BadSample,
    DataFormatError,
    DatasetSpec,
    ImageOpener,
    ImageSource,
    RawItem,
    content_hash,
    count_items,
    iter_raw_items,
    parse_item,
    read_image_size,
    resolve_image_path,
)


def _item(obj: object, file: Path, location: int = 1) -> RawItem:
    payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return RawItem(0, str(file), location, "line", payload)


def _reason(obj: object, spec: DatasetSpec) -> str:
    with pytest.raises(BadSample) as info:
        parse_item(_item(obj, spec.path), spec)
    assert info.value.reason in BAD_REASONS
    return info.value.reason


def _texts(messages: list[dict]) -> list[list[str]]:
    return [[b["text"] if b["type"] == "text" else "<IMG>" for b in m["content"]] for m in messages]


# ----------------------------------------------------------------------------------------------- messages


def test_messages_blocks_and_image_paths(tmp_path: Path) -> None:
    spec = DatasetSpec(tmp_path / "d" / "train.jsonl")
    obj = {
        "id": "s1",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "images/a.png"},
                    {"type": "image_url", "image_url": {"url": "file://images/b.png"}},
                    {"type": "text", "text": "compare"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "same"}]},
        ],
    }
    sample = parse_item(_item(obj, spec.path), spec)
    assert sample.sample_id == "s1"
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant"]
    assert _texts(sample.messages) == [["be brief"], ["<IMG>", "<IMG>", "compare"], ["same"]]
    root = tmp_path / "d"
    assert [s.ref for s in sample.images] == [
        {"path": str(root / "images/a.png")},
        {"path": str(root / "images/b.png")},
    ]


def test_messages_top_level_images_fill_blocks_and_markers(tmp_path: Path) -> None:
    spec = DatasetSpec(tmp_path / "t.jsonl")
    obj = {
        "images": ["x.png", "y.png", "z.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and <image> then"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "<image>"},
            {"role": "assistant", "content": "fine"},
        ],
    }
    # A text BLOCK keeps "<image>" literally; only string contents are split on markers: 2 slots, 3 images.
    assert _reason(obj, spec) == "image_placeholder_mismatch"
    obj["messages"][2]["content"] = "<image><image>"
    sample = parse_item(_item(obj, spec.path), spec)
    assert _texts(sample.messages) == [["<IMG>", "and <image> then"], ["ok"], ["<IMG>", "<IMG>"], ["fine"]]
    assert [Path(s.ref["path"]).name for s in sample.images] == ["x.png", "y.png", "z.png"]


def test_messages_string_content_without_images_keeps_marker_text(tmp_path: Path) -> None:
    spec = DatasetSpec(tmp_path / "t.jsonl")
    obj = {
        "messages": [
            {"role": "user", "content": "what is <image>?"},
            {"role": "assistant", "content": "a tag"},
        ]
    }
    sample = parse_item(_item(obj, spec.path), spec)
    assert _texts(sample.messages) == [["what is <image>?"], ["a tag"]]
    assert sample.images == [] and sample.sample_id == "t.jsonl:1"


# ----------------------------------------------------------------------------------------------- llava / sharegpt


def test_llava_single_image_and_list(tmp_path: Path) -> None:
    spec = DatasetSpec(tmp_path / "llava.json", format="llava")
    obj = {
        "id": "000123",
        "image": "coco/1.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A bus."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    sample = parse_item(_item(obj, spec.path), spec)
    assert _texts(sample.messages) == [["<IMG>", "\nWhat is shown?"], ["A bus."], ["Colour?"], ["Red."]]
    assert [m["role"] for m in sample.messages] == ["user", "assistant", "user", "assistant"]
    assert sample.images[0].ref == {"path": str(tmp_path / "coco/1.jpg")}
    obj2 = {
        "images": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image><image>diff?"},
            {"from": "gpt", "value": "none"},
        ],
    }
    assert len(parse_item(_item(obj2, spec.path), spec).images) == 2


def test_sharegpt_system_field_and_role_content_turns(tmp_path: Path) -> None:
    spec = DatasetSpec(tmp_path / "sg.jsonl")  # auto: 'conversations' -> sharegpt
    obj = {
        "system": "you are terse",
        "conversations": [{"role": "user", "content": "hi"}, {"from": "assistant", "value": "hello"}],
    }
    sample = parse_item(_item(obj, spec.path), spec)
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant"]
    assert _texts(sample.messages) == [["you are terse"], ["hi"], ["hello"]]


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (
            {
                "image": "a.png",
                "conversations": [{"from": "human", "value": "no marker"}, {"from": "gpt", "value": "x"}],
            },
            "image_placeholder_mismatch",
        ),
        (
            {"conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "x"}]},
            "image_placeholder_mismatch",
        ),
        (
            {
                "images": ["a.png"],
                "conversations": [
                    {"from": "human", "value": "<image><image>"},
                    {"from": "gpt", "value": "x"},
                ],
            },
            "image_placeholder_mismatch",
        ),
        ({"conversations": [{"from": "human", "value": "q"}]}, "no_assistant_turn"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
            "empty_assistant_text",
        ),
        ({"conversations": [{"from": "tool", "value": "q"}, {"from": "gpt", "value": "a"}]}, "unknown_role"),
        ({"conversations": "nope"}, "invalid_sample"),
        ({"text": "no conversation"}, "invalid_sample"),
    ],
)
def test_conversation_bad_samples(tmp_path: Path, obj: dict, reason: str) -> None:
    assert _reason(obj, DatasetSpec(tmp_path / "x.jsonl")) == reason


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "video", "video": "v.mp4"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "unknown_content_type",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "image_placeholder_mismatch",
        ),
        (
            {
                "images": ["a.png", "b.png"],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}]},
                    {"role": "assistant", "content": "a"},
                ],
            },
            "image_placeholder_mismatch",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": [{"type": "text", "text": ""}]},
                ]
            },
            "empty_assistant_text",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
            "empty_assistant_text",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": "https://x.org/a.png"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "unsupported_image_source",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": "../outside.png"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "image_outside_root",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": "/etc/passwd"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "image_outside_root",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": "ok/../../x.png"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "image_outside_root",
        ),
        ({"messages": []}, "invalid_sample"),
        (
            {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]},
            "unknown_role",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
            "invalid_sample",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"text": "no type"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "invalid_sample",
        ),
    ],
)
def test_messages_bad_samples(tmp_path: Path, obj: dict, reason: str) -> None:
    assert _reason(obj, DatasetSpec(tmp_path / "x.jsonl")) == reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "blank_line"),
        (b"   \t\r", "blank_line"),
        (b'{"messages": [', "malformed_json"),
        (b"[1, 2]", "malformed_json"),
        (b'{"id": "\xff\xfe"}', "non_utf8"),
    ],
)
def test_line_level_bad_samples(tmp_path: Path, payload: bytes, reason: str) -> None:
    assert _reason(payload, DatasetSpec(tmp_path / "x.jsonl")) == reason


def test_image_root_and_escape_checks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert resolve_image_path("a/b.png", root) == str(root / "a/b.png")
    assert resolve_image_path(str(root / "c.png"), root) == str(root / "c.png")  # absolute but inside
    assert resolve_image_path("a/../c.png", root) == str(root / "c.png")
    for bad in ("../c.png", "/tmp/c.png", "a/../../c.png"):
        with pytest.raises(BadSample) as info:
            resolve_image_path(bad, root)
        assert info.value.reason == "image_outside_root"
    spec = DatasetSpec(tmp_path / "data" / "t.jsonl", image_root=tmp_path / "imgs")
    obj = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "a.png"}]},
            {"role": "assistant", "content": "x"},
        ]
    }
    assert parse_item(_item(obj, spec.path), spec).images[0].ref == {"path": str(tmp_path / "imgs" / "a.png")}


# ----------------------------------------------------------------------------------------------- containers


def test_jsonl_read_as_bytes_every_line_counted(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    good = json.dumps(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ).encode()
    path.write_bytes(
        good + b"\n\n\xff\xfe broken\n{not json\n" + good
    )  # no trailing newline on the last line
    items = list(iter_raw_items(path, dataset=3))
    assert [i.location for i in items] == [1, 2, 3, 4, 5] and count_items(path) == 5
    assert all(i.kind == "line" and i.dataset == 3 and i.file == str(path) for i in items)
    reasons = []
    for item in items:
        try:
            parse_item(item, DatasetSpec(path))
            reasons.append("ok")
        except BadSample as err:
            reasons.append(err.reason)
    assert reasons == ["ok", "blank_line", "non_utf8", "malformed_json", "ok"]
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # a byte-order mark before the first line is tolerated
    assert parse_item(next(iter_raw_items(path)), DatasetSpec(path)).messages[1]["role"] == "assistant"


def test_json_array_and_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "llava.json"
    rows = [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": str(k)}]}
        for k in range(3)
    ]
    path.write_text(json.dumps(rows))
    items = list(iter_raw_items(path))
    assert [(i.kind, i.location) for i in items] == [("row", 0), ("row", 1), ("row", 2)] and count_items(
        path
    ) == 3
    assert _texts(parse_item(items[2], DatasetSpec(path)).messages)[1] == ["2"]
    path.write_text('{"not": "a list"}')
    with pytest.raises(DataFormatError, match="JSON array"):
        list(iter_raw_items(path))
    path.write_text("[{broken")
    with pytest.raises(DataFormatError, match="Convert it to JSONL"):
        list(iter_raw_items(path))
    with pytest.raises(DataFormatError, match="does not exist"):
        list(iter_raw_items(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataFormatError, match="unknown data file extension"):
        list(iter_raw_items(tmp_path / "x.csv"))


def _image_dataset(png, n: int = 5):  # noqa: ANN001, ANN202
    import datasets

    features = datasets.Features(
        {
            "messages": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
        }
    )
    rows = {"messages": [], "images": []}
    for k in range(n):
        messages = [
            {"role": "user", "content": "<image>" * (k % 2 + 1) + f"q{k}"},
            {"role": "assistant", "content": f"a{k}"},
        ]
        rows["messages"].append(json.dumps(messages))
        rows["images"].append([{"bytes": png(28 + 14 * k, 56 + j), "path": None} for j in range(k % 2 + 1)])
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.mark.parametrize("container", ["parquet", "arrow", "arrow_dir"])
def test_parquet_and_arrow_with_image_bytes(tmp_path: Path, png, container: str) -> None:  # noqa: ANN001
    ds = _image_dataset(png)
    if container == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path), batch_size=2)  # several row groups: the opener must find the right one
    elif container == "arrow_dir":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    else:
        ds.save_to_disk(str(tmp_path / "saved"))
        path = tmp_path / "saved" / "data-00000-of-00001.arrow"
    items = list(iter_raw_items(path))
    assert [i.location for i in items] == list(range(5)) and count_items(path) == 5
    opener = ImageOpener()
    for k, item in enumerate(items):
        sample = parse_item(item, DatasetSpec(path))
        assert len(sample.images) == k % 2 + 1
        for j, source in enumerate(sample.images):
            assert source.ref == {"file": str(path), "row": k, "column": "images", "index": j}
            assert read_image_size(source) == (28 + 14 * k, 56 + j)
            image = opener.open(source.ref)  # re-open from the reference alone, as the loader will
            assert image.size == (28 + 14 * k, 56 + j) and image.mode == "RGB"
            assert image.getpixel((0, 0)) == (200, 30, 30)


def test_content_hash_tracks_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"x" * (3 << 20))
    first = content_hash(path)
    assert first == content_hash(path)
    path.write_bytes(b"x" * ((3 << 20) - 1) + b"y")
    assert content_hash(path) != first


# ----------------------------------------------------------------------------------------------- images


def test_read_image_size_header_only_and_errors(tmp_path: Path, png, bomb_png) -> None:  # noqa: ANN001
    (tmp_path / "ok.png").write_bytes(png(50, 30))
    assert read_image_size(ImageSource({"path": str(tmp_path / "ok.png")})) == (50, 30)
    # A header claiming 30000 x 20000 with no pixel data: the size is read without decoding anything.
    assert read_image_size(ImageSource({"path": "x"}, bomb_png(300, 200))) == (300, 200)
    cases = {
        "missing_image": ImageSource({"path": str(tmp_path / "nope.png")}),
        "corrupt_image": ImageSource({"file": "f", "row": 0, "column": "c"}, b"definitely not an image"),
        "decompression_bomb": ImageSource({"path": "x"}, bomb_png(100_000, 100_000)),
    }
    for reason, source in cases.items():
        with pytest.raises(BadSample) as info:
            read_image_size(source)
        assert info.value.reason == reason
    # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; we treat the warning as an error too.
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 10
    with pytest.raises(BadSample) as info:
        read_image_size(ImageSource({"path": "x"}, bomb_png(side, side)))
    assert info.value.reason == "decompression_bomb"


def test_verify_catches_damaged_png_that_header_read_accepts(tmp_path: Path, png) -> None:  # noqa: ANN001
    data = bytearray(png(64, 64))
    data[-20] ^= 0xFF  # flip a byte in the last chunks: the header still parses
    source = ImageSource({"path": "x"}, bytes(data))
    assert read_image_size(source) == (64, 64)
    with pytest.raises(BadSample) as info:
        read_image_size(source, verify=True)
    assert info.value.reason == "corrupt_image"


def test_exif_orientation_counted_and_applied_alike(tmp_path: Path, jpeg) -> None:  # noqa: ANN001
    path = tmp_path / "rot.jpg"
    path.write_bytes(jpeg(40, 20, orientation=6))
    ref = {"path": str(path)}
    assert read_image_size(ImageSource(ref)) == (20, 40)
    image = ImageOpener().open(ref)
    assert image.size == (20, 40) and image.mode == "RGB"
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(jpeg(40, 20))
    assert read_image_size(ImageSource({"path": str(plain)})) == (40, 20)


def test_opener_converts_modes(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    buffer = io.BytesIO()
    Image.new("LA", (30, 16), (128, 255)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    image = ImageOpener().open({"path": str(path)})
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [128, 128, 128]


def test_saved_dataset_dict_needs_a_split(tmp_path: Path, png) -> None:  # noqa: ANN001
    import datasets

    ds = _image_dataset(png, n=3)
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataFormatError, match=r"holds the splits \['test', 'train'\]"):
        list(iter_raw_items(tmp_path / "dd"))
    items = list(iter_raw_items(tmp_path / "dd", split="test"))
    assert len(items) == 1 and count_items(tmp_path / "dd", "test") == 1
    spec = DatasetSpec(tmp_path / "dd", split="test")
    [source] = parse_item(items[0], spec).images
    assert source.ref == {
        "file": str(tmp_path / "dd"),
        "row": 0,
        "column": "images",
        "index": 0,
        "split": "test",
    }
    assert ImageOpener().open(source.ref).size == (28 + 14 * 2, 56)
    with pytest.raises(DataFormatError, match="folders only"):
        DatasetSpec(tmp_path / "x.jsonl", split="train")
