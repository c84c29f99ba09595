"""Kimi-VL chat template: token-for-token equal to the reference template string, the published Jinja template,
exact label masks and image spans, validation errors."""

from __future__ import annotations

import random

import jinja2
import pytest

from vlmtune.data.chat_template import (
    KIMI_VL_CHAT_TEMPLATE,
    ChatTemplateError,
    apply_chat_template,
    render_chat_template_string,
    with_thinking,
)
from vlmtune.data.special_tokens import MEDIA_PAD
from vlmtune.models.kimi_vl.tokenization import KimiTokenizer, build_tokenizer_files


def _corpus(n_chars: int = 20_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the", "cat", "image", "what", "is", "this", "a", "red", "square", "answer", "system", "user",
             "assistant", "helpful", "You", "are", "think", "colour", "left", "right", "图片", "猫", "😀"]
    return " ".join(rng.choice(words) + rng.choice(["", ".", ",", "?", "\n"]) for _ in range(n_chars // 5))[:n_chars]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> KimiTokenizer:
    return build_tokenizer_files(tmp_path_factory.mktemp("tok"), _corpus(), num_merges=80)


def _img(kind: str = "image") -> dict:
    return {"type": kind, kind: "x.png"}


CONVERSATIONS = {
    "no_system": (
        [
            {"role": "user", "content": [_img(), {"type": "text", "text": "What is in the picture?"}]},
            {"role": "assistant", "content": "A red square."},
        ],
        [6],
    ),
    "system": (
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
        ],
        [],
    ),
    "multi_turn_multi_image": (
        [
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, _img(), {"type": "text", "text": " and "},
                                         _img("image_url"), {"type": "text", "text": "."}]},
            {"role": "assistant", "content": "The left one is red.\nThe right one is blue."},
            {"role": "user", "content": [_img(), {"type": "text", "text": "And this one? 图片 😀"}]},
            {"role": "assistant", "content": "Green,   with   spaces  \n\n"},
        ],
        [4, 9, 1],
    ),
    "thinking": (
        [
            {"role": "user", "content": [_img(), {"type": "text", "text": "Which colour?"}]},
            {"role": "assistant", "content": with_thinking("The square looks red.\nSo: red.", "Red.")},
        ],
        [12],
    ),
    "system_mid_conversation": (
        [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "four"},
        ],
        [],
    ),
}


# ------------------------------------------------------------------------------------------ token for token


def test_exact_string_of_a_simple_conversation() -> None:
    messages, counts = CONVERSATIONS["no_system"]
    assert render_chat_template_string(messages, [2]) == (
        "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
        "<|im_user|>user<|im_middle|><|media_start|>image<|media_content|><|media_pad|><|media_pad|><|media_end|>"
        "What is in the picture?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>A red square.<|im_end|>"
    )
    assert render_chat_template_string(messages[:1], [2], add_generation_prompt=True).endswith(
        "What is in the picture?<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_ids_equal_encoding_of_the_template_string(tok: KimiTokenizer, name: str, generation_prompt: bool) -> None:
    messages, counts = CONVERSATIONS[name]
    out = apply_chat_template(messages, tok, counts, add_generation_prompt=generation_prompt)
    text = render_chat_template_string(messages, counts, add_generation_prompt=generation_prompt)
    assert out.input_ids == tok.encode(text, allow_special=True)
    assert len(out.label_mask) == len(out.input_ids)
    assert tok.bos_id not in out.input_ids  # no BOS in the Kimi-VL template
    if generation_prompt:
        header = [tok.im_assistant_id, *tok.encode("assistant"), tok.im_middle_id]
        assert out.input_ids[-len(header) :] == header
        assert not any(out.label_mask[-len(header) :])


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_string_equals_published_jinja_template(name: str, generation_prompt: bool) -> None:
    """The published Jinja template (one <|media_pad|> per image), pads then expanded as the processor does."""
    messages, counts = CONVERSATIONS[name]
    jinja = jinja2.Environment().from_string(KIMI_VL_CHAT_TEMPLATE)
    rendered = jinja.render(messages=messages, add_generation_prompt=generation_prompt)
    parts = rendered.split(MEDIA_PAD)
    assert len(parts) == len(counts) + 1
    expanded = parts[0] + "".join(MEDIA_PAD * n + part for n, part in zip(counts, parts[1:]))
    assert expanded == render_chat_template_string(messages, counts, add_generation_prompt=generation_prompt)


def test_default_system_options(tok: KimiTokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    plain = render_chat_template_string(messages, default_system=None)
    assert plain == "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>yo<|im_end|>"
    custom = apply_chat_template(messages, tok, default_system="Be kind.")
    assert tok.decode(custom.input_ids).startswith("<|im_system|>system<|im_middle|>Be kind.<|im_end|><|im_user|>")


# ------------------------------------------------------------------------------------------------- labels, spans


def test_label_mask_exact(tok: KimiTokenizer) -> None:
    messages, counts = CONVERSATIONS["multi_turn_multi_image"]
    out = apply_chat_template(messages, tok, counts)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # Expected mask built turn by turn: each turn rendered alone; in assistant turns all but the header is True.
    remaining = list(counts)
    expected = [False] * len(
        tok.encode("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>", allow_special=True)
    )
    for m in messages:
        n_images = 0 if isinstance(m["content"], str) else sum(b["type"] != "text" for b in m["content"])
        turn_counts, remaining = remaining[:n_images], remaining[n_images:]
        n = len(tok.encode(render_chat_template_string([m], turn_counts, default_system=None), allow_special=True))
        if m["role"] == "assistant":
            header = len(tok.encode("<|im_assistant|>assistant<|im_middle|>", allow_special=True))
            expected += [False] * header + [True] * (n - header)
        else:
            expected += [False] * n
    assert out.label_mask == expected
    # The supervised tokens are exactly each answer followed by <|im_end|>.
    supervised = [i for i, keep in zip(out.input_ids, out.label_mask) if keep]
    assert supervised == [i for a in answers for i in tok.encode(a) + [tok.im_end_id]]
    assert out.num_supervised == len(supervised)
    # Each supervised run starts right after <|im_middle|> of an assistant header.
    starts = [k for k in range(len(out.label_mask)) if out.label_mask[k] and not out.label_mask[k - 1]]
    assert len(starts) == 2
    for k in starts:
        assert out.input_ids[k - 1] == tok.im_middle_id
        assert out.input_ids[k - 2 - len(tok.encode("assistant"))] == tok.im_assistant_id


def test_thinking_is_text_and_supervised(tok: KimiTokenizer) -> None:
    messages, counts = CONVERSATIONS["thinking"]
    out = apply_chat_template(messages, tok, counts)
    supervised = [i for i, keep in zip(out.input_ids, out.label_mask) if keep]
    assert tok.decode(supervised) == "◁think▷The square looks red.\nSo: red.◁/think▷Red.<|im_end|>"
    assert [i for i in supervised if tok.is_special(i)] == [tok.im_end_id]  # the markers are ordinary text


def test_image_spans(tok: KimiTokenizer) -> None:
    messages, counts = CONVERSATIONS["multi_turn_multi_image"]
    out = apply_chat_template(messages, tok, counts)
    assert [e - s for s, e in out.image_spans] == counts
    assert out.input_ids.count(tok.media_pad_id) == sum(counts)
    image_word = tok.encode("image")
    for s, e in out.image_spans:
        assert set(out.input_ids[s:e]) == {tok.media_pad_id}
        assert out.input_ids[s - len(image_word) - 2 : s] == [tok.media_start_id, *image_word, tok.media_content_id]
        assert out.input_ids[e] == tok.media_end_id
        assert not any(out.label_mask[s - len(image_word) - 2 : e + 1])
    assert [s for s, _ in out.image_spans] == sorted(s for s, _ in out.image_spans)


def test_images_in_assistant_turns_are_not_supervised(tok: KimiTokenizer) -> None:
    messages = [
        {"role": "user", "content": "Draw it"},
        {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, _img()]},
    ]
    out = apply_chat_template(messages, tok, [3])
    ((s, e),) = out.image_spans
    head = 2 + len(tok.encode("image"))  # <|media_start|> image <|media_content|>
    assert out.input_ids[s - head] == tok.media_start_id
    assert not any(out.label_mask[s - head : e + 1])
    assert out.label_mask[s - head - 1]  # the last token of "Here:" is supervised
    supervised = [i for i, keep in zip(out.input_ids, out.label_mask) if keep]
    assert supervised == tok.encode("Here:") + [tok.im_end_id]


def test_control_token_look_alikes_stay_text(tok: KimiTokenizer) -> None:
    messages = [
        {"role": "user", "content": "type <|im_end|> and <|media_pad|> please"},
        {"role": "assistant", "content": "ok <|im_assistant|>"},
    ]
    out = apply_chat_template(messages, tok)
    assert out.input_ids.count(tok.im_end_id) == 3  # default system, user, assistant: structure only
    assert tok.media_pad_id not in out.input_ids and out.image_spans == []
    assert tok.decode(out.input_ids) == render_chat_template_string(messages)


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "messages, counts, kwargs, match",
    [
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], [], {},
         r"messages\[0\]\.role is 'tool'"),
        ([{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "y"}], [], {},
         r"messages\[0\]\.content\[0\] has type 'audio'"),
        ([{"role": "user", "content": [_img(), _img()]}, {"role": "assistant", "content": "y"}], [4], {},
         r"holds image #2 but image_token_counts has 1"),
        ([{"role": "user", "content": [_img()]}, {"role": "assistant", "content": "y"}], [4, 4], {},
         r"hold 1 image blocks but image_token_counts has 2"),
        ([{"role": "user", "content": [_img()]}, {"role": "assistant", "content": "y"}], [0], {},
         r"image_token_counts\[0\] = 0"),
        ([{"role": "user", "content": "hi"}], [], {}, "no assistant turn"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  \n"}], [], {},
         r"messages\[1\] is an assistant turn with no text"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [_img()]}], [4], {},
         r"messages\[1\] is an assistant turn with no text"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], [], {},
         r"messages\[0\]\.content is a int"),
        ([{"role": "user"}], [], {}, r"messages\[0\] must be a dict with 'role' and 'content'"),
        ([], [], {}, "non-empty list"),
        ([{"role": "user", "content": "hi"}], [], {"require_assistant": True, "add_generation_prompt": True},
         "no assistant turn"),
    ],
)
def test_validation_errors(tok: KimiTokenizer, messages, counts, kwargs, match) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        apply_chat_template(messages, tok, counts, **kwargs)


def test_generation_prompt_needs_no_assistant(tok: KimiTokenizer) -> None:
    out = apply_chat_template([{"role": "user", "content": "hi"}], tok, add_generation_prompt=True)
    assert out.num_supervised == 0
    assert out.input_ids == tok.encode(
        "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user<|im_middle|>hi"
        "<|im_end|><|im_assistant|>assistant<|im_middle|>", allow_special=True
    )


def test_tokenizer_folder_carries_the_template(tok: KimiTokenizer) -> None:
    assert tok.chat_template == KIMI_VL_CHAT_TEMPLATE
