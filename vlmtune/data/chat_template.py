"""The Kimi-VL chat template, token-exact, with the label mask and the image placeholder spans.

Reproduces the Jinja ``chat_template`` that Kimi-VL-A3B's tokenizer ships (``KIMI_VL_CHAT_TEMPLATE`` below, the
same text as the published file): no BOS, no newlines, a default system turn when the first message is not a
system message, then per message ``<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>``, an image inside content
as ``<|media_start|>image<|media_content|><|media_pad|><|media_end|>``, and the generation prompt
``<|im_assistant|>assistant<|im_middle|>``. The processor then expands each ``<|media_pad|>`` to
``(h/2)*(w/2)`` copies; here that count is given per image (``image_token_counts``)::

    <|im_system|> system <|im_middle|> You are a helpful assistant <|im_end|>
    <|im_user|> user <|im_middle|> <|media_start|> image <|media_content|> <|media_pad|> x n <|media_end|> What? <|im_end|>
    <|im_assistant|> assistant <|im_middle|> A cat. <|im_end|>
    label_mask:                            ^^^^^^ ^^^^^^^^^^  (assistant content and its closing <|im_end|>)

Text is encoded piece by piece with ``allow_special=False`` and control tokens are inserted by id, so text that
merely looks like a control token (``"<|im_end|>"`` typed by a user) stays text. For text without such look-alikes
the ids equal ``tokenizer.encode(render_chat_template_string(...), allow_special=True)`` exactly (tested).

Kimi-VL-Thinking: reasoning is plain text inside the assistant content, ``◁think▷ ... ◁/think▷ answer``
(``with_thinking``); it is tokenised as ordinary text and supervised like the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vlmtune.data.special_tokens import (
    DEFAULT_SYSTEM_PROMPT,
    IM_END,
    IM_MIDDLE,
    MEDIA_CONTENT,
    MEDIA_END,
    MEDIA_PAD,
    MEDIA_START,
    ROLE_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
)

# The Jinja template of Kimi-VL-A3B's tokenizer_config.json / chat_template.jinja (Instruct and Thinking), as
# published; whoever writes a model folder stores it there so that HF / vLLM render prompts identically.
KIMI_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{'<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>'}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{'<|im_system|>'}}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{'<|im_user|>'}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{'<|im_assistant|>'}}{%- endif -%}"
    "{{- message['role'] -}}"
    "{{'<|im_middle|>'}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{'<|media_start|>image<|media_content|><|media_pad|><|media_end|>'}}"
    "{%- else -%}"
    "{{content['text']}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{'<|im_end|>'}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<|im_assistant|>assistant<|im_middle|>'}}{%- endif -%}"
)

IMAGE_TYPES = ("image", "image_url")
IMAGE_WORD = "image"  # the text between <|media_start|> and <|media_content|>


class ChatTemplateError(ValueError):
    """A conversation the Kimi-VL template cannot render (the message names the turn and the fix)."""


class TokenizerLike(Protocol):
    """What the template needs from a tokenizer (``KimiTokenizer`` provides it)."""

    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...

    def token_to_id(self, token: str) -> int: ...


@dataclass
class TemplateOutput:
    """One rendered conversation.

    Attributes:
        input_ids: token ids (no BOS/EOS beyond what the template writes).
        label_mask: True exactly on assistant content tokens and the <|im_end|> closing each assistant turn.
        image_spans: per image, in order, ``[start, end)`` of its run of <|media_pad|> ids in ``input_ids``.
    """

    input_ids: list[int]
    label_mask: list[bool]
    image_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_supervised(self) -> int:
        """Number of True entries of ``label_mask``."""
        return sum(self.label_mask)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class _Piece:
    kind: str  # "special" (value: name) | "text" (value: str) | "image" (value: pad count)
    value: Any
    supervised: bool = False


def with_thinking(reasoning: str, answer: str) -> str:
    """Assistant content of a Kimi-VL-Thinking turn: ``◁think▷{reasoning}◁/think▷{answer}``."""
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{answer}"


def _content_blocks(content: Any, where: str) -> list[tuple[str, str]]:
    """A message's content as ("text", str) / ("image", "") blocks, adjacent text merged (as Jinja concatenates)."""
    if isinstance(content, str):
        return [("text", content)] if content else []
    if not isinstance(content, list):
        raise ChatTemplateError(
            f"{where}.content is a {type(content).__name__}; expected a string or a list of "
            f"{{'type': 'text', 'text': ...}} / {{'type': 'image', ...}} blocks"
        )
    blocks: list[tuple[str, str]] = []
    for k, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ChatTemplateError(f"{where}.content[{k}] is not a {{'type': ...}} block: {block!r:.80}")
        kind = block["type"]
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise ChatTemplateError(f"{where}.content[{k}] is a text block whose 'text' is not a string")
            if blocks and blocks[-1][0] == "text":
                blocks[-1] = ("text", blocks[-1][1] + text)
            elif text:
                blocks.append(("text", text))
        elif kind in IMAGE_TYPES:
            blocks.append(("image", ""))
        else:
            raise ChatTemplateError(
                f"{where}.content[{k}] has type {kind!r}; the Kimi-VL template supports 'text', 'image', 'image_url'"
            )
    return blocks


def _pieces(
    messages: Sequence[dict[str, Any]],
    image_token_counts: Sequence[int],
    add_generation_prompt: bool,
    default_system: str | None,
    require_assistant: bool | None,
) -> list[_Piece]:
    """Validates the conversation and lays it out as special / text / image pieces with their supervision."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} dicts")
    counts = list(image_token_counts)
    for k, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ChatTemplateError(f"image_token_counts[{k}] = {n!r}; each image needs a positive integer count")
    if require_assistant is None:
        require_assistant = not add_generation_prompt

    pieces: list[_Piece] = []
    first = messages[0]
    if default_system is not None and not (isinstance(first, dict) and first.get("role") == "system"):
        pieces += [_Piece("special", ROLE_TOKENS["system"]), _Piece("text", "system"), _Piece("special", IM_MIDDLE)]
        if default_system:
            pieces.append(_Piece("text", default_system))
        pieces.append(_Piece("special", IM_END))

    image_index = 0
    assistant_turns = 0
    for turn, message in enumerate(messages):
        where = f"messages[{turn}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatTemplateError(f"{where} must be a dict with 'role' and 'content', got {message!r:.80}")
        role = message["role"]
        if role not in ROLE_TOKENS:
            raise ChatTemplateError(
                f"{where}.role is {role!r}; the Kimi-VL template knows {sorted(ROLE_TOKENS)} "
                f"(map other roles, e.g. 'human' -> 'user', 'gpt' -> 'assistant', before templating)"
            )
        blocks = _content_blocks(message["content"], where)
        is_assistant = role == "assistant"
        if is_assistant:
            assistant_turns += 1
            text = "".join(value for kind, value in blocks if kind == "text")
            if not text.strip():
                raise ChatTemplateError(
                    f"{where} is an assistant turn with no text; drop the turn or give it an answer"
                )
        pieces += [_Piece("special", ROLE_TOKENS[role]), _Piece("text", role), _Piece("special", IM_MIDDLE)]
        for kind, value in blocks:
            if kind == "text":
                pieces.append(_Piece("text", value, supervised=is_assistant))
            else:
                if image_index >= len(counts):
                    raise ChatTemplateError(
                        f"{where} holds image #{image_index + 1} but image_token_counts has {len(counts)} entries; "
                        f"give one count per image block, in order"
                    )
                pieces.append(_Piece("image", counts[image_index]))  # image placeholders are never supervised
                image_index += 1
        pieces.append(_Piece("special", IM_END, supervised=is_assistant))
    if image_index != len(counts):
        raise ChatTemplateError(
            f"the messages hold {image_index} image blocks but image_token_counts has {len(counts)} entries"
        )
    if require_assistant and assistant_turns == 0:
        raise ChatTemplateError(
            "the conversation has no assistant turn, so nothing would be trained on; add an assistant answer, "
            "or pass require_assistant=False (e.g. for a generation prompt)"
        )
    if add_generation_prompt:
        pieces += [_Piece("special", ROLE_TOKENS["assistant"]), _Piece("text", "assistant"), _Piece("special", IM_MIDDLE)]
    return pieces


def apply_chat_template(
    messages: Sequence[dict[str, Any]],
    tokenizer: TokenizerLike,
    image_token_counts: Sequence[int] = (),
    add_generation_prompt: bool = False,
    default_system: str | None = DEFAULT_SYSTEM_PROMPT,
    require_assistant: bool | None = None,
) -> TemplateOutput:
    """Renders an OpenAI-style conversation with the Kimi-VL template, as ids with labels and image spans.

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str | [blocks]}]``; blocks are
            ``{"type": "text", "text": str}`` and ``{"type": "image" | "image_url", ...}``.
        tokenizer: a ``KimiTokenizer`` (or anything with ``encode(text, allow_special)`` and ``token_to_id``).
        image_token_counts: per image block, in order, its number of <|media_pad|> tokens ((h/2)*(w/2)).
        add_generation_prompt: append ``<|im_assistant|>assistant<|im_middle|>``.
        default_system: system prompt used when the first message is not a system message (None: none).
        require_assistant: demand at least one assistant turn (the caller wants training labels); None means
            ``not add_generation_prompt``.

    Returns:
        TemplateOutput with input_ids, label_mask and image_spans.

    Raises:
        ChatTemplateError: unknown role or content type, image count mismatch, an assistant turn without text,
            no assistant turn when one is required.
        KeyError: the tokenizer lacks one of the Kimi-VL special tokens.
    """
    pieces = _pieces(messages, image_token_counts, add_generation_prompt, default_system, require_assistant)
    special_ids: dict[str, int] = {}

    def special(name: str) -> int:
        if name not in special_ids:
            special_ids[name] = tokenizer.token_to_id(name)
        return special_ids[name]

    image_word = tokenizer.encode(IMAGE_WORD, allow_special=False)
    input_ids: list[int] = []
    label_mask: list[bool] = []
    image_spans: list[tuple[int, int]] = []
    for piece in pieces:
        if piece.kind == "special":
            ids = [special(piece.value)]
        elif piece.kind == "text":
            ids = tokenizer.encode(piece.value, allow_special=False)
        else:  # image: <|media_start|>image<|media_content|> <|media_pad|> x n <|media_end|>
            head = [special(MEDIA_START), *image_word, special(MEDIA_CONTENT)]
            start = len(input_ids) + len(head)
            image_spans.append((start, start + piece.value))
            ids = head + [special(MEDIA_PAD)] * piece.value + [special(MEDIA_END)]
        input_ids.extend(ids)
        label_mask.extend([piece.supervised] * len(ids))
    return TemplateOutput(input_ids=input_ids, label_mask=label_mask, image_spans=image_spans)


def render_chat_template_string(
    messages: Sequence[dict[str, Any]],
    image_token_counts: Sequence[int] = (),
    add_generation_prompt: bool = False,
    default_system: str | None = DEFAULT_SYSTEM_PROMPT,
    require_assistant: bool | None = False,
) -> str:
    """The template as a string with special tokens written out and each image's <|media_pad|> repeated
    ``image_token_counts[i]`` times (what the reference processor feeds its tokenizer).

    Same arguments and validation as ``apply_chat_template``, except that ``require_assistant`` defaults to False.
    """
    pieces = _pieces(messages, image_token_counts, add_generation_prompt, default_system, require_assistant)
    out: list[str] = []
    for piece in pieces:
        if piece.kind in ("special", "text"):
            out.append(piece.value)
        else:
            out.append(f"{MEDIA_START}{IMAGE_WORD}{MEDIA_CONTENT}{MEDIA_PAD * piece.value}{MEDIA_END}")
    return "".join(out)
