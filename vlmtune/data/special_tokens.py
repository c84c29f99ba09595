"""The Kimi tokenizer's data: pre-tokenisation regex, reserved special-token slots, special-token names.

Everything here is data, kept in ONE place; the tokenizer (``vlmtune.models.kimi_vl.tokenization``), the chat
template (``vlmtune.data.chat_template``) and the tiny config builders read it from here.

Sources reproduced (no code copied):

- ``pat_str`` and ``num_reserved_special_tokens = 256`` come from the published ``TikTokenTokenizer`` in
  ``tokenization_moonshot.py`` (Moonlight / Kimi-VL-A3B) and ``tokenization_kimi.py`` (Kimi-K2, Kimi-Linear),
  identical across the line. Special ids are ``num_base_tokens + offset``; a slot that the checkpoint's
  ``tokenizer_config.json`` (``added_tokens_decoder``) does not name is called ``<|reserved_token_{id}|>``.
- The names and offsets below are those of Kimi-VL-A3B (num_base_tokens = 163584, vocab 163840):
  [BOS] 163584, [EOS] 163585, <|im_end|> 163586, <|im_user|> 163587, <|im_assistant|> 163588,
  <|start_header_id|> 163590, <|end_header_id|> 163591, [EOT] 163593, <|im_system|> 163594, <|im_middle|> 163601
  (tokenization_moonshot.py's defaults and the Kimi family's added_tokens_decoder); the media tokens
  <|media_start|> 163602, <|media_content|> 163603, <|media_end|> 163604, <|media_pad|> 163605 as SGLang's
  ``kimi_vl`` multimodal processor hard-codes them and config.json's ``media_placeholder_token_id`` (163605)
  confirms for the pad; [UNK] 163838 and [PAD] 163839 (config.json pad_token_id 163839).
- ◁think▷ / ◁/think▷ (Kimi-VL-Thinking) are NOT special tokens: they are ordinary text inside assistant content.
"""

from __future__ import annotations

# Pre-tokenisation regex of tokenization_moonshot.py / tokenization_kimi.py (``TikTokenTokenizer.pat_str``).
# Character-class intersections (``&&``) need the Rust regex syntax that tiktoken uses; Python's ``regex`` module
# reads them only in VERSION1 mode (see ``KIMI_PAT_FLAGS_PY``).
KIMI_PAT_STR: str = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Number of special-token slots after the BPE ranks (tokenization_moonshot.py ``num_reserved_special_tokens``).
NUM_RESERVED_SPECIAL_TOKENS: int = 256

# The reference encodes text in slices of at most this many characters (tiktoken panics on longer inputs) ...
TIKTOKEN_MAX_ENCODE_CHARS: int = 400_000
# ... and cuts runs of more than this many consecutive whitespace / non-whitespace characters
# (https://github.com/openai/tiktoken/issues/195). Both change tokenisation of huge inputs, so we reproduce them.
MAX_NO_WHITESPACES_CHARS: int = 25_000

# Special-token names.
BOS = "[BOS]"
EOS = "[EOS]"
IM_END = "<|im_end|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "[EOT]"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
MEDIA_START = "<|media_start|>"
MEDIA_CONTENT = "<|media_content|>"
MEDIA_END = "<|media_end|>"
MEDIA_PAD = "<|media_pad|>"
UNK = "[UNK]"
PAD = "[PAD]"

# offset (id - num_base_tokens) -> name, for the slots Kimi-VL names. Every other slot is reserved.
KIMI_VL_SPECIAL_TOKENS: dict[int, str] = {
    0: BOS,
    1: EOS,
    2: IM_END,
    3: IM_USER,
    4: IM_ASSISTANT,
    6: START_HEADER,
    7: END_HEADER,
    9: EOT,
    10: IM_SYSTEM,
    17: IM_MIDDLE,
    18: MEDIA_START,
    19: MEDIA_CONTENT,
    20: MEDIA_END,
    21: MEDIA_PAD,
    254: UNK,
    255: PAD,
}

# Name -> offset, the inverse table (e.g. KIMI_VL_SPECIAL_OFFSETS[MEDIA_PAD] == 21).
KIMI_VL_SPECIAL_OFFSETS: dict[str, int] = {name: offset for offset, name in KIMI_VL_SPECIAL_TOKENS.items()}

# Role -> the special token that opens its turn in the chat template.
ROLE_TOKENS: dict[str, str] = {"system": IM_SYSTEM, "user": IM_USER, "assistant": IM_ASSISTANT}

# Kimi-VL-Thinking reasoning markers (ordinary text, supervised like the rest of the assistant content).
THINK_OPEN = "◁think▷"
THINK_CLOSE = "◁/think▷"

# The Kimi-VL chat template's default system prompt.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"


def reserved_token_name(token_id: int) -> str:
    """Name of an unnamed special slot, as tokenization_moonshot.py spells it (absolute id)."""
    return f"<|reserved_token_{token_id}|>"


def special_token_table(num_base_tokens: int, named: dict[int, str] | None = None) -> dict[str, int]:
    """All 256 special tokens of a tokenizer with ``num_base_tokens`` BPE ranks, name -> id.

    Args:
        num_base_tokens: number of BPE ranks (163584 for Kimi-VL); special ids follow them.
        named: absolute id -> name for the named slots (a checkpoint's ``added_tokens_decoder``); defaults to
            Kimi-VL's table (``KIMI_VL_SPECIAL_TOKENS`` shifted by ``num_base_tokens``).

    Raises:
        ValueError: a named id outside ``[num_base_tokens, num_base_tokens + 256)`` or a name used twice.
    """
    if named is None:
        named = {num_base_tokens + offset: name for offset, name in KIMI_VL_SPECIAL_TOKENS.items()}
    end = num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS
    for token_id, name in named.items():
        if not num_base_tokens <= token_id < end:
            raise ValueError(
                f"special token {name!r} has id {token_id}, outside the {NUM_RESERVED_SPECIAL_TOKENS} special slots "
                f"[{num_base_tokens}, {end}) that follow the {num_base_tokens} BPE ranks"
            )
    table = {named.get(i, reserved_token_name(i)): i for i in range(num_base_tokens, end)}
    if len(table) != NUM_RESERVED_SPECIAL_TOKENS:
        names = list(named.values())
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"special token names must be unique; repeated: {dupes}")
    return table
