"""KimiTokenizer: the Kimi file format, special ids at their published offsets, exact encodings, round trips,
special tokens only when allowed, the reference's long-input splitting, BPE training."""

from __future__ import annotations

import base64
import itertools
import json
import random
import time

import pytest

from vlmtune.data.special_tokens import (
    KIMI_VL_SPECIAL_TOKENS,
    MAX_NO_WHITESPACES_CHARS,
    special_token_table,
)
from vlmtune.models.kimi_vl.tokenization import (
    KimiTokenizer,
    TokenizerFileError,
    _split_runs,
    build_tokenizer_files,
    pretokenize,
    read_ranks_file,
    train_bpe_ranks,
)


def make_corpus(n_chars: int = 50_000, seed: int = 0) -> str:
    """Deterministic mixed text: pseudo-words, numbers, punctuation, CJK, emoji, whitespace runs."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "tra", "sen", "gor", "pe", "qui", "th", "ar", "ing", "ed", "str", "oo", "ux", "bre", "nd"]
    cjk = "图片中有一只猫这是什么颜色红色蓝色的大小形状左右上下"
    emoji = "😀🐱🎨✅🚀"
    out, total = [], 0
    while total < n_chars:
        r = rng.random()
        if r < 0.75:
            words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(3, 12))]
            s = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", " -", ":", "'s", "'ll"])
        elif r < 0.85:
            s = str(rng.randint(0, 10**6)) + rng.choice([" px", "%", " items", "", "x"])
        elif r < 0.93:
            s = "".join(rng.choice(cjk) for _ in range(rng.randint(2, 8))) + "。"
        else:
            s = rng.choice(emoji) * rng.randint(1, 3) + rng.choice(["  ", "\n", "\t", "\n\n", "   \n"])
        out.append(s)
        total += len(s) + 1
    return " ".join(out)[:n_chars]


MIXED_TEXTS = [
    "Hello, world! It's 2025; we'll see.",
    "digits 0 7 42 123 4567 89012345 and 3.14159e-10",
    "punct: !!! ??? ... --- (a) [b] {c} <d> @#$%^&*_+=|\\/~`",
    "tabs\tand\t\tspaces    and trailing   ",
    "line1\nline2\r\nline3\n\n\n   \n\tindented",
    "中文文本：这是一个测试。图片里有一只猫！",
    "日本語のテキストとカタカナ、한국어 텍스트",
    "emoji 😀🐱🎨 ZWJ 👩‍👩‍👧 flags 🇫🇷 skin 👍🏽",
    "combining é (e\u0301), RTL עברית العربية, Cyrillic Привет, Greek Ωμέγα",
    "UPPER lower MixedCase CamelCaseWord HTTPServer don'T I'M",
    "◁think▷ reasoning ◁/think▷ answer",
    "look-alikes: <|im_end|> [BOS] <|media_pad|> <|reserved_token_5|>",
    "",
    " ",
    "\x00\x01 control \x7f and U+FFFD \ufffd",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> KimiTokenizer:
    return build_tokenizer_files(tmp_path_factory.mktemp("tok"), make_corpus(), num_merges=1536)


def _write_hand_tokenizer(folder, extra_tokens: list[bytes], named: dict[int, str] | None = None) -> None:
    ranks = [bytes([b]) for b in range(256)] + extra_tokens
    lines = [f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(ranks)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(ranks)
    if named is None:
        named = {n + off: name for off, name in KIMI_VL_SPECIAL_TOKENS.items()}
    decoder = {str(i): {"content": name, "special": True} for i, name in named.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder, "auto_map": {"x": 1}}))


# ----------------------------------------------------------------------------------------------- loading, ids


def test_hand_built_ranks_exact_ids(tmp_path) -> None:
    _write_hand_tokenizer(tmp_path, [b"ab", b"abc", b" ab"])
    tok = KimiTokenizer.from_pretrained(tmp_path)
    assert tok.num_base_tokens == 259 and tok.vocab_size == 259 + 256
    # "abcab" is one pre-token: a b c a b -> (ab) c (ab) -> (abc) (ab)
    assert tok.encode("abcab") == [257, 256]
    # " ab" merges the space in: pre-tokens "x", " ab"
    assert tok.encode("x ab") == [ord("x"), 258]
    assert tok.encode("a b") == [ord("a"), ord(" "), ord("b")]
    assert tok.decode([257, 256]) == "abcab"
    # Special ids = number of ranks + published offset.
    assert tok.bos_id == 259 and tok.eos_id == 260 and tok.im_end_id == 261
    assert tok.im_user_id == 262 and tok.im_assistant_id == 263 and tok.im_system_id == 269
    assert tok.im_middle_id == 276 and tok.media_start_id == 277 and tok.media_content_id == 278
    assert tok.media_end_id == 279 and tok.media_pad_id == 280 and tok.unk_id == 513 and tok.pad_id == 514
    assert tok.id_to_token(264) == "<|reserved_token_264|>"  # an unnamed slot
    assert tok.is_special(259) and tok.is_special(514) and not tok.is_special(258)


def test_published_ids_at_real_size(tmp_path) -> None:
    """A ranks file as large as Kimi-VL's (163584 ranks) gives the published special ids."""
    extra = [bytes([a, b]) for a in range(256) for b in range(256)]
    triples = (bytes([a, b, c]) for a in range(256) for b in range(256) for c in range(256))
    extra += list(itertools.islice(triples, 163584 - 256 - len(extra)))
    named = {  # the real file names only some slots; the others become <|reserved_token_N|>
        163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163587: "<|im_user|>", 163588: "<|im_assistant|>",
        163594: "<|im_system|>", 163601: "<|im_middle|>", 163602: "<|media_start|>", 163603: "<|media_content|>",
        163604: "<|media_end|>", 163605: "<|media_pad|>", 163838: "[UNK]", 163839: "[PAD]",
    }
    _write_hand_tokenizer(tmp_path, extra, named)
    tok = KimiTokenizer.from_pretrained(tmp_path)
    assert tok.num_base_tokens == 163584 and tok.vocab_size == 163840
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (163584, 163585, 163839)  # config.json bos/eos/pad
    assert tok.media_pad_id == 163605  # config.json media_placeholder_token_id
    assert (tok.im_end_id, tok.im_user_id, tok.im_assistant_id) == (163586, 163587, 163588)
    assert (tok.im_system_id, tok.im_middle_id) == (163594, 163601)
    assert (tok.media_start_id, tok.media_content_id, tok.media_end_id) == (163602, 163603, 163604)
    assert tok.token_to_id("<|reserved_token_163589|>") == 163589
    assert tok.encode("<|im_end|><|media_pad|>", allow_special=True) == [163586, 163605]
    # The table as data agrees.
    table = special_token_table(163584)
    assert all(table[name] == tok.special_tokens[name] for name in named.values())


def test_trained_tokenizer_special_ids(trained: KimiTokenizer) -> None:
    n = trained.num_base_tokens
    assert n == 256 + 1536 and trained.vocab_size == n + 256 == 2048
    for offset, name in KIMI_VL_SPECIAL_TOKENS.items():
        assert trained.token_to_id(name) == n + offset
        assert trained.id_to_token(n + offset) == name
    assert (trained.bos_id, trained.media_pad_id, trained.pad_id) == (1792, 1813, 2047)
    assert len(trained.special_tokens) == 256


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_round_trip_mixed_text(trained: KimiTokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert all(0 <= i < trained.num_base_tokens for i in ids)  # no special id without allow_special
    assert trained.decode(trained.encode(text, allow_special=True)) == text


def test_round_trip_random_unicode(trained: KimiTokenizer) -> None:
    rng = random.Random(1)
    pools = ["abcXYZ019 .,!?'\n\t", "中文字符图片", "😀🐱👩‍👧🇫🇷", "éüßøΩЖ", "\u0301\u200d\u00a0\u3000"]
    for _ in range(200):
        text = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 60)))
        assert trained.decode(trained.encode(text)) == text


def test_long_runs_split_like_the_reference(trained: KimiTokenizer) -> None:
    pieces = list(_split_runs("a" * 60_000, MAX_NO_WHITESPACES_CHARS))
    assert [len(p) for p in pieces] == [25_000, 25_000, 10_000]
    text = "x" * 30_000 + " " * 26_000 + "yz" * 3
    pieces = list(_split_runs(text, MAX_NO_WHITESPACES_CHARS))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [25_000, 5_000 + 25_000, 1_000 + 6]
    ids = trained.encode(text)
    assert ids == [i for p in pieces for i in trained.model.encode_ordinary(p)]
    assert trained.decode(ids) == text


# ---------------------------------------------------------------------------------------------- special tokens


def test_specials_encode_only_when_allowed(trained: KimiTokenizer) -> None:
    text = "hi<|im_end|>there<|media_pad|>[BOS]"
    plain = trained.encode(text)
    assert not any(trained.is_special(i) for i in plain) and trained.decode(plain) == text
    allowed = trained.encode(text, allow_special=True)
    specials = [i for i in allowed if trained.is_special(i)]
    assert specials == [trained.im_end_id, trained.media_pad_id, trained.bos_id]
    assert allowed == trained.encode("hi") + [trained.im_end_id] + trained.encode("there") + [
        trained.media_pad_id, trained.bos_id
    ]
    assert trained.decode(allowed) == text
    assert trained.encode("<|im_end|>", allow_special=True) == [trained.im_end_id]


def test_token_strings_round_trip(trained: KimiTokenizer) -> None:
    for i in range(trained.vocab_size):
        assert trained.token_to_id(trained.id_to_token(i)) == i
    assert trained.id_to_token(ord(" ")) == "Ġ" and trained.id_to_token(ord("\n")) == "Ċ"
    assert trained.id_to_bytes(trained.bos_id) == b"[BOS]"
    with pytest.raises(KeyError, match="neither a special token"):
        trained.token_to_id("<|not_a_token|>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode([1, 2, trained.vocab_size])
    with pytest.raises(TypeError):
        trained.encode(b"bytes")  # type: ignore[arg-type]


def test_pretokenizer_agrees_with_tiktoken(trained: KimiTokenizer) -> None:
    """The Python split used for training is the split tiktoken applies (``&&`` classes need regex V1)."""
    texts = MIXED_TEXTS + [make_corpus(3000, seed=s) for s in range(5)]
    for text in texts:
        chunks = pretokenize(text)
        assert "".join(chunks) == text
        assert trained.model.encode_ordinary(text) == [i for c in chunks for i in trained.model.encode_ordinary(c)]
        # Every token lies inside one chunk.
        bounds = {0}
        pos = 0
        for c in chunks:
            pos += len(c.encode())
            bounds.add(pos)
        pos = 0
        for i in trained.model.encode_ordinary(text):
            start, pos = pos, pos + len(trained.id_to_bytes(i))
            assert not any(start < b < pos for b in bounds), text
    assert pretokenize("Hello World你好 HELLOthere it's") == ["Hello", " World", "你好", " HELLOthere", " it's"]


# ------------------------------------------------------------------------------------------------ BPE training


def test_train_exact_merges() -> None:
    # pre-tokens "ab", " ab", " ab", " cd": (a,b) x3 -> "ab"; (" ", ab) x2 -> " ab"; then a tie (" ", c) / (c, d)
    # broken by the smaller pair of ids -> " c", then " cd".
    ranks = train_bpe_ranks("ab ab ab cd", 4)
    merged = sorted((r, t) for t, r in ranks.items() if r >= 256)
    assert merged == [(256, b"ab"), (257, b" ab"), (258, b" c"), (259, b" cd")]
    with pytest.raises(ValueError, match="supports only 4 merges, 5 were asked"):
        train_bpe_ranks("ab ab ab cd", 5)


def test_train_deterministic_and_valid(tmp_path) -> None:
    corpus = make_corpus(50_000)
    start = time.perf_counter()
    build_tokenizer_files(tmp_path / "a", corpus, 1500)
    seconds = time.perf_counter() - start
    print(f"BPE training: 50k characters, 1500 merges in {seconds:.2f} s")  # printed, not asserted
    build_tokenizer_files(tmp_path / "b", corpus, 1500)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    ranks = read_ranks_file(tmp_path / "a" / "tiktoken.model")
    assert len(ranks) == 1756
    by_rank = sorted(ranks, key=ranks.get)
    assert by_rank[:256] == [bytes([b]) for b in range(256)]
    for r, token in enumerate(by_rank[256:], start=256):  # each merge joins two earlier tokens
        assert any(ranks.get(token[:k], r) < r and ranks.get(token[k:], r) < r for k in range(1, len(token)))
    # Merges compress: the corpus takes far fewer tokens than bytes.
    tok = KimiTokenizer.from_pretrained(tmp_path / "a")
    assert len(tok.encode(corpus)) < 0.45 * len(corpus.encode())


# ------------------------------------------------------------------------------------------------ files, errors


def test_save_pretrained_round_trip(tmp_path, trained: KimiTokenizer) -> None:
    _write_hand_tokenizer(tmp_path / "src", [b"ab", b"abc"])
    tok = KimiTokenizer.from_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "dst")
    assert (tmp_path / "dst" / "tiktoken.model").read_bytes() == (tmp_path / "src" / "tiktoken.model").read_bytes()
    again = KimiTokenizer.from_pretrained(tmp_path / "dst")
    assert again.special_tokens == tok.special_tokens
    assert again.config["auto_map"] == {"x": 1}  # unknown config fields are kept
    trained.save_pretrained(tmp_path / "trained")
    reloaded = KimiTokenizer.from_pretrained(tmp_path / "trained")
    text = " ".join(MIXED_TEXTS)
    assert reloaded.encode(text) == trained.encode(text)
    assert reloaded.chat_template == trained.chat_template is not None


def test_file_errors(tmp_path) -> None:
    with pytest.raises(TokenizerFileError, match="tiktoken.model not found"):
        KimiTokenizer.from_pretrained(tmp_path)
    _write_hand_tokenizer(tmp_path, [b"ab"])
    good = (tmp_path / "tiktoken.model").read_text()

    (tmp_path / "tiktoken.model").write_text(good + "not-base64-and-no-rank\n")
    with pytest.raises(TokenizerFileError, match=r"tiktoken.model:258: expected"):
        KimiTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text(good + f"{base64.b64encode(b'zz').decode()} 300\n")
    with pytest.raises(TokenizerFileError, match=r"ranks must be exactly 0..257"):
        KimiTokenizer.from_pretrained(tmp_path)
    lines = good.splitlines()
    (tmp_path / "tiktoken.model").write_text("\n".join([f"{base64.b64encode(b'zz').decode()} 0"] + lines[1:]) + "\n")
    with pytest.raises(TokenizerFileError, match="single bytes have no rank"):
        KimiTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text(good)

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"5": {"content": "[BOS]"}}}))
    with pytest.raises(TokenizerFileError, match=r"'\[BOS\]' has id 5, outside the 256 special slots \[257, 513\)"):
        KimiTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[BOS]"}))
    with pytest.raises(TokenizerFileError, match="added_tokens_decoder"):
        KimiTokenizer.from_pretrained(tmp_path)
    # A tokenizer whose config names no media tokens fails by name when they are asked for.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"257": {"content": "[BOS]"}}}))
    tok = KimiTokenizer.from_pretrained(tmp_path)
    assert tok.bos_id == 257
    with pytest.raises(KeyError, match="media_pad"):
        _ = tok.media_pad_id
