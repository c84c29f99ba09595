"""The Kimi tokenizer: a tiktoken byte-level BPE plus 256 special-token slots, loaded offline from local files.

A tokenizer folder holds the published Kimi format:

- ``tiktoken.model``: one ``<base64 token bytes> <rank>`` line per BPE token, ranks 0..n-1 (n = 163584 in
  Kimi-VL-A3B); the rank is the token id.
- ``tokenizer_config.json``: ``added_tokens_decoder`` names the special tokens by absolute id; the 256 ids
  n..n+255 are all special, unnamed ones are ``<|reserved_token_{id}|>``.

Behaviour reproduced from the published ``TikTokenTokenizer`` (Kimi-VL's ``tokenization_moonshot.py``, identical in
Kimi-K2's / Kimi-Linear's ``tokenization_kimi.py``): the same ``pat_str`` and special-token slots
(``vlmtune.data.special_tokens``), the same pre-splitting of huge inputs (400k-character slices, runs of at most
25k whitespace / non-whitespace characters) before tiktoken, and the byte-level token strings of ``id_to_token``
(GPT-2's bytes-to-unicode map, as the reference's ``decoder``). One deliberate difference: ``encode`` treats
special-token text as ordinary text unless ``allow_special=True`` (the reference's default is to allow), so that
user data can never inject a control token; the chat template inserts control tokens by id.

``build_tokenizer_files`` trains a small byte-level BPE in the same format for tests and the tiny demo model.
"""

from __future__ import annotations

import base64
import heapq
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import regex
import tiktoken

from vlmtune.data.special_tokens import (
    BOS,
    EOS,
    IM_ASSISTANT,
    IM_END,
    IM_MIDDLE,
    IM_SYSTEM,
    IM_USER,
    KIMI_PAT_STR,
    KIMI_VL_SPECIAL_TOKENS,
    MAX_NO_WHITESPACES_CHARS,
    MEDIA_CONTENT,
    MEDIA_END,
    MEDIA_PAD,
    MEDIA_START,
    NUM_RESERVED_SPECIAL_TOKENS,
    PAD,
    TIKTOKEN_MAX_ENCODE_CHARS,
    UNK,
    special_token_table,
)

RANKS_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"


class TokenizerFileError(ValueError):
    """A tokenizer folder is missing a file or holds a malformed one (the message names the file and line)."""


# ----------------------------------------------------------------------------------------------------- file IO


def read_ranks_file(path: Path | str) -> dict[bytes, int]:
    """Parses a ``tiktoken.model`` ranks file (``<base64> <rank>`` per line, blank lines skipped).

    Raises:
        TokenizerFileError: malformed line, repeated token or rank, ranks not exactly 0..n-1, or a single byte
            missing (every byte must be encodable).
    """
    path = Path(path)
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerFileError(f"{path}:{line_no}: expected '<base64 token> <rank>', got {line[:80]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except ValueError as err:
                raise TokenizerFileError(f"{path}:{line_no}: cannot parse {line[:80]!r}: {err}") from err
            if token in ranks:
                raise TokenizerFileError(f"{path}:{line_no}: token {token!r} appears twice (ranks {ranks[token]}, {rank})")
            if rank in seen_ranks:
                raise TokenizerFileError(f"{path}:{line_no}: rank {rank} appears twice")
            ranks[token] = rank
            seen_ranks.add(rank)
    n = len(ranks)
    if n == 0:
        raise TokenizerFileError(f"{path}: no ranks (empty file)")
    if min(seen_ranks) != 0 or max(seen_ranks) != n - 1:
        raise TokenizerFileError(
            f"{path}: ranks must be exactly 0..{n - 1} (special ids start at the number of ranks); "
            f"found min {min(seen_ranks)}, max {max(seen_ranks)} over {n} tokens"
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerFileError(
            f"{path}: {len(missing)} single bytes have no rank (first: {missing[:8]}); a byte-level BPE needs all 256"
        )
    return ranks


def write_ranks_file(path: Path | str, ranks: dict[bytes, int]) -> None:
    """Writes ranks in the ``tiktoken.model`` format, one line per token in rank order."""
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("".join(lines), encoding="ascii")


def _token_name(value: Any, where: str) -> str:
    """A token given as a string or as a serialised AddedToken ({"content": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerFileError(f"{where}: expected a token string or {{'content': str}}, got {value!r}")


def _named_specials(config: dict[str, Any], file: Path) -> dict[int, str]:
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict) or not decoder:
        raise TokenizerFileError(
            f"{file}: 'added_tokens_decoder' (id -> {{'content': name}}) is missing or empty; it names the special "
            f"tokens, e.g. {{\"163584\": {{\"content\": \"[BOS]\"}}}}"
        )
    named: dict[int, str] = {}
    for key, value in decoder.items():
        try:
            token_id = int(key)
        except ValueError as err:
            raise TokenizerFileError(f"{file}: added_tokens_decoder key {key!r} is not an integer id") from err
        named[token_id] = _token_name(value, f"{file}: added_tokens_decoder[{key!r}]")
    return named


def tokenizer_config_dict(num_base_tokens: int, chat_template: str | None = None) -> dict[str, Any]:
    """The ``tokenizer_config.json`` of a Kimi-VL tokenizer with ``num_base_tokens`` ranks.

    Names the Kimi-VL special tokens at their published offsets (``KIMI_VL_SPECIAL_TOKENS``) in the HF
    ``added_tokens_decoder`` form, plus bos/eos/pad/unk and the chat template.
    """
    decoder = {
        str(num_base_tokens + offset): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for offset, name in sorted(KIMI_VL_SPECIAL_TOKENS.items())
    }
    config: dict[str, Any] = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [
            IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE, MEDIA_START, MEDIA_CONTENT, MEDIA_END, MEDIA_PAD
        ],
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "TikTokenTokenizer",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


# ------------------------------------------------------------------------------------------- byte-level strings


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the reference's ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _split_runs(text: str, max_run: int) -> Iterator[str]:
    """Cuts ``text`` so that no piece holds more than ``max_run`` consecutive whitespace or non-whitespace chars.

    Reimplements the reference's ``_split_whitespaces_or_nonwhitespaces``: a run longer than ``max_run`` is cut
    every ``max_run`` characters; pieces concatenate back to ``text``.
    """
    run_len = 0
    in_space = text[0].isspace() if text else False
    start = 0
    for i, ch in enumerate(text):
        is_space = ch.isspace()
        if is_space != in_space:
            run_len = 1
            in_space = is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield text[start:i]
                start = i
                run_len = 1
    yield text[start:]


# ---------------------------------------------------------------------------------------------------- tokenizer


class KimiTokenizer:
    """Kimi's tiktoken BPE with its 256 special-token slots.

    Args:
        mergeable_ranks: BPE token bytes -> rank (= id), ranks exactly 0..n-1, all 256 single bytes present.
        named_specials: absolute id -> name for the named special slots (ids n..n+255); defaults to Kimi-VL's table.
        config: the raw ``tokenizer_config.json`` (kept and written back by ``save_pretrained``).
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        named_specials: dict[int, str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.num_base_tokens = len(mergeable_ranks)
        self.special_tokens: dict[str, int] = special_token_table(self.num_base_tokens, named_specials)
        self._special_names: dict[int, str] = {i: name for name, i in self.special_tokens.items()}
        self._ranks = mergeable_ranks
        self.config: dict[str, Any] = dict(config) if config is not None else tokenizer_config_dict(self.num_base_tokens)
        self.model = tiktoken.Encoding(
            name=f"kimi_{self.num_base_tokens}",
            pat_str=KIMI_PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS,
        )

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: Path | str) -> KimiTokenizer:
        """Loads ``tiktoken.model`` + ``tokenizer_config.json`` from a local folder (nothing is downloaded).

        Raises:
            TokenizerFileError: a missing or malformed file (the message names it).
        """
        folder = Path(path)
        ranks_file, config_file = folder / RANKS_FILE, folder / CONFIG_FILE
        for file in (ranks_file, config_file):
            if not file.is_file():
                raise TokenizerFileError(
                    f"{file} not found: a Kimi tokenizer folder holds {RANKS_FILE} (BPE ranks) and {CONFIG_FILE} "
                    f"(special tokens); build a small one with build_tokenizer_files(dir, corpus, num_merges)"
                )
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise TokenizerFileError(f"{config_file}: not valid JSON: {err}") from err
        if not isinstance(config, dict):
            raise TokenizerFileError(f"{config_file}: expected a JSON object")
        ranks = read_ranks_file(ranks_file)
        named = _named_specials(config, config_file)
        try:
            return cls(ranks, named, config)
        except ValueError as err:
            raise TokenizerFileError(f"{config_file}: {err}") from err

    def save_pretrained(self, path: Path | str) -> list[Path]:
        """Writes ``tiktoken.model`` and ``tokenizer_config.json`` (the loaded config, with the special-token
        table this tokenizer uses) into ``path``; returns the two paths."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        ranks_file, config_file = folder / RANKS_FILE, folder / CONFIG_FILE
        write_ranks_file(ranks_file, self._ranks)
        config = dict(self.config)
        decoder = dict(config.get("added_tokens_decoder") or {})
        for i, name in sorted(self._special_names.items()):
            entry = decoder.get(str(i))
            if entry is not None and _token_name(entry, str(i)) == name:
                continue
            if name.startswith("<|reserved_token_"):
                continue  # unnamed slot: the loader recreates the name
            decoder[str(i)] = {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": True}
        config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [ranks_file, config_file]

    # --------------------------------------------------------------------------------------------- encoding
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids, no BOS/EOS added.

        Args:
            text: any string.
            allow_special: when True, special-token text (e.g. ``<|im_end|>``) becomes its special id; when
                False (default) it is encoded as ordinary text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                if allow_special:
                    ids.extend(self.model.encode(piece, allowed_special="all"))
                else:
                    ids.extend(self.model.encode_ordinary(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (special ids become their names; invalid UTF-8 becomes U+FFFD).

        Raises:
            ValueError: an id outside ``[0, vocab_size)``.
        """
        ids = [int(t) for t in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(t for t in ids if t < 0 or t >= self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return self.model.decode(ids)

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's name in UTF-8)."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return self.model.decode_single_token_bytes(token_id)

    def id_to_token(self, token_id: int) -> str:
        """Token string: the name for a special id, else the byte-level string (GPT-2 bytes-to-unicode), as
        the reference's ``convert_ids_to_tokens``."""
        name = self._special_names.get(int(token_id))
        if name is not None:
            return name
        return "".join(_BYTE_TO_CHAR[b] for b in self.id_to_bytes(token_id))

    def token_to_id(self, token: str) -> int:
        """Id of a special-token name or of a byte-level token string (inverse of ``id_to_token``).

        Raises:
            KeyError: the token is not in the vocabulary.
        """
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            raw = bytes(_CHAR_TO_BYTE[c] for c in token)
        except KeyError:
            raw = None
        if raw is not None and raw in self._ranks:
            return self._ranks[raw]
        raise KeyError(
            f"{token!r} is neither a special token of this tokenizer nor a byte-level BPE token "
            f"(special tokens include {[n for n in self.special_tokens if not n.startswith('<|reserved')][:16]})"
        )

    def is_special(self, token_id: int) -> bool:
        """True for the 256 special ids (named or reserved)."""
        return self.num_base_tokens <= int(token_id) < self.vocab_size

    # ------------------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """BPE ranks + 256 special slots (163840 for Kimi-VL)."""
        return self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template stored in tokenizer_config.json, if any."""
        value = self.config.get("chat_template")
        return value if isinstance(value, str) else None

    def _configured(self, key: str, default: str) -> int:
        name = _token_name(self.config[key], key) if self.config.get(key) is not None else default
        return self.token_to_id(name)

    @property
    def bos_id(self) -> int:
        """[BOS] (or the config's ``bos_token``)."""
        return self._configured("bos_token", BOS)

    @property
    def eos_id(self) -> int:
        """[EOS] (or the config's ``eos_token``)."""
        return self._configured("eos_token", EOS)

    @property
    def pad_id(self) -> int:
        """[PAD] (or the config's ``pad_token``)."""
        return self._configured("pad_token", PAD)

    @property
    def unk_id(self) -> int:
        """[UNK] (or the config's ``unk_token``)."""
        return self._configured("unk_token", UNK)

    @property
    def im_end_id(self) -> int:
        """<|im_end|>, which closes every chat turn."""
        return self.token_to_id(IM_END)

    @property
    def im_user_id(self) -> int:
        """<|im_user|>."""
        return self.token_to_id(IM_USER)

    @property
    def im_assistant_id(self) -> int:
        """<|im_assistant|>."""
        return self.token_to_id(IM_ASSISTANT)

    @property
    def im_system_id(self) -> int:
        """<|im_system|>."""
        return self.token_to_id(IM_SYSTEM)

    @property
    def im_middle_id(self) -> int:
        """<|im_middle|>, between a turn's role name and its content."""
        return self.token_to_id(IM_MIDDLE)

    @property
    def media_start_id(self) -> int:
        """<|media_start|>."""
        return self.token_to_id(MEDIA_START)

    @property
    def media_content_id(self) -> int:
        """<|media_content|>."""
        return self.token_to_id(MEDIA_CONTENT)

    @property
    def media_end_id(self) -> int:
        """<|media_end|>."""
        return self.token_to_id(MEDIA_END)

    @property
    def media_pad_id(self) -> int:
        """<|media_pad|>: the image placeholder (config.json ``media_placeholder_token_id``)."""
        return self.token_to_id(MEDIA_PAD)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"KimiTokenizer(num_base_tokens={self.num_base_tokens}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------------------------ BPE training


def pretokenize(text: str) -> list[str]:
    """Splits text with the Kimi ``pat_str`` in Python (``regex`` VERSION1 mode reads the ``&&`` classes the
    way tiktoken's Rust engine does). Used for BPE training; encoding always goes through tiktoken."""
    return _PRETOKENIZER.findall(text)


_PRETOKENIZER = regex.compile(KIMI_PAT_STR, flags=regex.VERSION1)


def train_bpe_ranks(corpus: str, num_merges: int) -> dict[bytes, int]:
    """Learns a byte-level BPE: the 256 single bytes (ranks 0..255), then ``num_merges`` new tokens.

    The corpus is pre-split with the Kimi ``pat_str``; the most frequent adjacent pair (ties: smallest pair of
    ids) is merged each step. Pair counts are updated incrementally (only the words containing the merged pair
    are revisited; a lazy max-heap finds the next pair), so ~50k characters and ~1500 merges take ~0.2 s on one
    CPU core. Deterministic: same corpus and count, same ranks.

    Raises:
        ValueError: ``num_merges`` < 0, or the corpus runs out of pairs before ``num_merges`` new tokens.
    """
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    id_of: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    word_counts = Counter(chunk.encode("utf-8") for chunk in pretokenize(corpus))
    words: list[list[int]] = [list(w) for w in word_counts]  # bytes -> ids 0..255
    freqs: list[int] = list(word_counts.values())

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + freqs[wi]
            where.setdefault(pair, set()).add(wi)
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)

    added = 0
    while added < num_merges:
        # Pop stale heap entries until one matches the live count of its pair.
        while heap:
            neg, a, b = heap[0]
            if pair_counts.get((a, b), 0) == -neg and neg < 0:
                break
            heapq.heappop(heap)
        if not heap:
            raise ValueError(
                f"the corpus ({len(corpus)} characters) supports only {added} merges, {num_merges} were asked; "
                f"give a larger corpus or fewer merges"
            )
        _, a, b = heapq.heappop(heap)
        merged = vocab[a] + vocab[b]
        new_id = id_of.get(merged)
        if new_id is None:  # a byte string reached by two merge paths keeps one id (tiktoken ranks are unique)
            new_id = len(vocab)
            vocab.append(merged)
            id_of[merged] = new_id
            added += 1
        changed: set[tuple[int, int]] = set()
        for wi in where.pop((a, b), ()):
            word, f = words[wi], freqs[wi]
            if len(word) < 2:
                continue
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= f
                changed.add(pair)
            out: list[int] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[wi] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + f
                where.setdefault(pair, set()).add(wi)
                changed.add(pair)
        pair_counts.pop((a, b), None)
        for pair in changed:
            count = pair_counts.get(pair, 0)
            if count > 0:
                heapq.heappush(heap, (-count, pair[0], pair[1]))
    return {tok: i for i, tok in enumerate(vocab)}


def build_tokenizer_files(out_dir: Path | str, corpus: str, num_merges: int) -> KimiTokenizer:
    """Trains a small byte-level BPE on ``corpus`` and writes a Kimi-format tokenizer folder.

    Writes ``tiktoken.model`` (256 + ``num_merges`` ranks) and ``tokenizer_config.json`` naming the Kimi-VL
    special tokens at their published offsets after the ranks (vocab = ranks + 256; e.g. 1536 merges give
    1792 ranks, [BOS] = 1792, <|media_pad|> = 1813, [PAD] = 2047) and carrying the Kimi-VL chat template.

    Returns:
        The tokenizer loaded back from ``out_dir``.
    """
    from vlmtune.data.chat_template import KIMI_VL_CHAT_TEMPLATE

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = train_bpe_ranks(corpus, num_merges)
    write_ranks_file(folder / RANKS_FILE, ranks)
    config = tokenizer_config_dict(len(ranks), chat_template=KIMI_VL_CHAT_TEMPLATE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return KimiTokenizer.from_pretrained(folder)
