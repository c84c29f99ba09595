"""Autoregressive decoding for Kimi-VL with an MLA KV cache (batch size 1).

What is cached. MLA compresses every token's keys and values into one latent ``c_kv`` (kv_lora_rank) plus one rope key
``k_rope`` (Drope) shared by all heads; the heads' ``k_nope`` and ``v`` are a linear map of the latent (``kv_b_proj``).
:class:`MLAKVCache` stores exactly that, per layer::

    c_kv    (1, T, kv_lora_rank)   after kv_a_layernorm           A3B: 512
    k_rope  (1, T, Drope)          RoPE already applied            A3B:  64  -> 576 numbers per token and layer
    (expanded k and v would be H * (Dnope + Drope + Dv) = 16 * 320 = 5120: 8.9x more)

Each step re-expands the cached latents with ``KimiVLAttention._expand_kv`` (the same code the training forward runs),
then attends. Absorbing ``kv_b_proj`` into the query (DeepSeek's inference trick) would skip that expansion, but it
needs the effective ``kv_b_proj`` weight, which a LoRA-wrapped module does not expose as one matrix; re-expanding
keeps one copy of the maths and works on a peft model unchanged.

How a reply is decoded (:func:`generate_ids`)::

    prefill   embeds = model.embed(prompt ids, pixel_values, image_grid_hws)   images replace <|media_pad|>
              decoder padded reference forward over the whole prompt, kv_cache empty -> latents stored, logits[-1]
    decode    one token at a time: decoder forward on (1, 1) with position_ids = T_cached, kv_cache -> logits
    choose    greedy argmax, or sampling: logits / temperature -> softmax -> top-p (nucleus) -> multinomial with a
              torch.Generator seeded per call (same seed, same tokens)
    stop      at any stop id (<|im_end|>, [EOS]); the stop token is not part of the reply

``use_cache=False`` decodes with no cache at all: every step re-runs the VLM's full padded ``forward`` (vision tower
included) on prompt + reply so far. It is the reference the cached path is tested against (same tokens; per-step
logits equal to ~1e-12 in float64).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import KimiVLAttention, compute_dtype
from .image_processing import grid_tokens


class GenerationError(ValueError):
    """A generation request that cannot run as asked (the message names the argument and the fix)."""


# ----------------------------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------------------------
class MLAKVCache:
    """Per-layer MLA cache of the normalised latent ``c_kv`` and the rotated shared ``k_rope``.

    ``KimiVLAttention.forward(..., kv_cache=cache)`` calls :meth:`get_seq_length` and :meth:`update`; nothing else
    touches it.

    Args:
        num_layers: decoder layers (``text_config.num_hidden_layers``).
    """

    def __init__(self, num_layers: int) -> None:
        self.c_kv: list[torch.Tensor | None] = [None] * num_layers
        self.k_rope: list[torch.Tensor | None] = [None] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for ``layer_idx`` (layer 0 is updated first, so before a forward all layers agree)."""
        c = self.c_kv[layer_idx]
        return 0 if c is None else int(c.shape[1])

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append T new tokens of ``layer_idx`` and return everything cached for it.

        Args:
            c_kv: (B, T, kv_lora_rank). k_rope: (B, T, Drope).

        Returns:
            (c_kv (B, past + T, kv_lora_rank), k_rope (B, past + T, Drope)).
        """
        if self.c_kv[layer_idx] is None:
            self.c_kv[layer_idx], self.k_rope[layer_idx] = c_kv, k_rope
        else:
            self.c_kv[layer_idx] = torch.cat([self.c_kv[layer_idx], c_kv], dim=1)  # (B, past + T, r)
            self.k_rope[layer_idx] = torch.cat([self.k_rope[layer_idx], k_rope], dim=1)  # (B, past + T, Drope)
        return self.c_kv[layer_idx], self.k_rope[layer_idx]

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in (*self.c_kv, *self.k_rope) if t is not None)


# ----------------------------------------------------------------------------------------------------------------
# token choice
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Attributes:
        max_new_tokens: reply length limit (>= 1).
        do_sample: False = greedy argmax (temperature and top_p unused); True = sampling.
        temperature: logits are divided by it before the softmax (> 0 when sampling).
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose mass reaches top_p (0 < top_p <= 1).
        seed: seed of the sampling generator (one per call: the same seed gives the same tokens).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens!r}: give an integer >= 1")
        if self.do_sample and not self.temperature > 0:
            raise GenerationError(f"temperature={self.temperature!r}: sampling needs temperature > 0 (use greedy "
                                  "decoding, do_sample=False, for a deterministic argmax)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p!r}: give 0 < top_p <= 1 (1 = no nucleus filtering)")


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from the last position's logits.

    Args:
        logits: (V,) logits of the last position.
        params: greedy or sampling settings.
        generator: the seeded generator sampling draws from (unused when greedy).

    Returns:
        the chosen token id.
    """
    if not params.do_sample:
        return int(torch.argmax(logits))
    scaled = logits.to(compute_dtype(logits.dtype)) / params.temperature  # (V,)
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)  # (V,), (V,)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # (V,) mass of the more likely tokens
        keep = mass_before < params.top_p  # the most likely token is always kept (mass before it = 0)
        filtered = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])  # (V,)
        probs = filtered / filtered.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


# ----------------------------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """One decoded reply.

    Attributes:
        token_ids: the reply's ids, without the stop token.
        stop_reason: ``"stop_token"`` or ``"max_new_tokens"``.
        stop_token_id: the stop id that ended the reply (None when the length limit did).
        step_logits: with ``return_logits``, the (V,) last-position logits of every step (the step that produced the
            stop token included), in the model's dtype.
    """

    token_ids: list[int]
    stop_reason: str
    stop_token_id: int | None = None
    step_logits: list[torch.Tensor] = field(default_factory=list)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``KimiVLForConditionalGeneration`` inside a DeepSpeed engine and / or a peft wrapper.

    Raises:
        GenerationError: not a Kimi-VL model, or one whose attention forwards were swapped by ``apply_rmpad`` (the
            varlen path takes no cache: load the model afresh with ``from_pretrained`` for generation).
    """
    from .vlm import KimiVLForConditionalGeneration

    inner = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(inner, "get_base_model"):  # peft: the LoRA layers stay in place, only the wrapper is skipped
        inner = inner.get_base_model()
    if not isinstance(inner, KimiVLForConditionalGeneration):
        raise GenerationError(f"generation needs a KimiVLForConditionalGeneration, got {type(model).__name__}")
    patched = [n for n, m in inner.named_modules() if isinstance(m, KimiVLAttention) and "forward" in m.__dict__]
    if patched:
        raise GenerationError(f"{len(patched)} attention modules carry an instance forward (apply_rmpad), e.g. "
                              f"{patched[0]}: the varlen path takes no KV cache; generate from a model loaded with "
                              "from_pretrained (or an exported directory)")
    return inner


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid_hws: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    stop_token_ids: Iterable[int] = (),
    use_cache: bool = True,
    return_logits: bool = False,
) -> GenerationResult:
    """Decode a reply to a prompt of token ids (batch size 1).

    Args:
        model: a ``KimiVLForConditionalGeneration`` (or a peft / DeepSpeed wrapper of one); run in eval mode for the
            call, its training flag restored afterwards.
        input_ids: (1, T) or (T,) prompt ids, ending with the generation prompt.
        pixel_values: (P, 3, 14, 14) patches of the prompt's images, in order (None: no image).
        image_grid_hws: (I, 2) patch grids of the images.
        params: max_new_tokens, greedy / sampling, temperature, top_p, seed (default: 64 greedy tokens).
        stop_token_ids: ids that end the reply (e.g. <|im_end|> and [EOS]); the stop token is not returned.
        use_cache: True = MLA KV cache (prefill once, then one token per step); False = re-run the full padded
            forward on the whole sequence every step (the reference).
        return_logits: keep every step's last-position logits in the result.

    Returns:
        GenerationResult.
    """
    params = params or SamplingParams()
    vlm = unwrap_model(model)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]  # (T,) -> (1, T)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise GenerationError(f"input_ids must be (1, T) or (T,): batch size 1, got {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise GenerationError("input_ids is empty: give a prompt (apply_chat_template(..., add_generation_prompt=True))")
    device = vlm.device
    input_ids = input_ids.to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
        image_grid_hws = None if image_grid_hws is None else image_grid_hws.to(device)
    stop_ids = frozenset(int(i) for i in stop_token_ids)
    generator = None
    if params.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)

    was_training = model.training
    model.eval()
    try:
        step = _cached_steps(vlm, input_ids, pixel_values, image_grid_hws) if use_cache else \
            _uncached_steps(vlm, input_ids, pixel_values, image_grid_hws)
        logits = next(step)  # (V,) after the prompt
        result = GenerationResult(token_ids=[], stop_reason="max_new_tokens")
        for i in range(params.max_new_tokens):
            if return_logits:
                result.step_logits.append(logits)
            token = choose_token(logits, params, generator)
            if token in stop_ids:
                result.stop_reason, result.stop_token_id = "stop_token", token
                break
            result.token_ids.append(token)
            if i + 1 < params.max_new_tokens:
                logits = step.send(token)
        step.close()
        return result
    finally:
        model.train(was_training)


def _cached_steps(vlm: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                  image_grid_hws: torch.Tensor | None) -> Any:
    """Generator: yields the (V,) next-token logits; receives the chosen token. Prefill once, then cached steps."""
    decoder = vlm.language_model.model
    lm_head = vlm.language_model.lm_head
    cache = MLAKVCache(len(decoder.layers))
    embeds = vlm.embed(input_ids, pixel_values, image_grid_hws)  # (1, T, D), images in place of the placeholders
    hidden, _ = decoder(inputs_embeds=embeds, kv_cache=cache)  # (1, T, D): padded reference forward, latents cached
    while True:
        token = yield lm_head(hidden[0, -1])  # (V,)
        ids = torch.tensor([[token]], device=input_ids.device)  # (1, 1)
        pos = torch.tensor([[cache.get_seq_length()]], device=input_ids.device)  # (1, 1) the next cache position
        hidden, _ = decoder(input_ids=ids, position_ids=pos, kv_cache=cache)  # (1, 1, D)


def _uncached_steps(vlm: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                    image_grid_hws: torch.Tensor | None) -> Any:
    """Generator: the reference. Every step runs the VLM's full padded forward on prompt + reply so far."""
    ids = input_ids
    while True:
        out = vlm(input_ids=ids, pixel_values=pixel_values, image_grid_hws=image_grid_hws)
        token = yield out.logits[0, -1]  # (V,)
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)  # (1, T + 1)


# ----------------------------------------------------------------------------------------------------------------
# prompts: chat template + images
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PromptInputs:
    """A templated prompt ready for :func:`generate_ids`.

    Attributes:
        input_ids: (1, T) ids, ending with ``<|im_assistant|>assistant<|im_middle|>``.
        pixel_values: (P, 3, 14, 14) patches, or None without images.
        image_grid_hws: (I, 2), or None without images.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_hws: torch.Tensor | None


def _load_image(image: Any, k: int) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise GenerationError(f"images[{k}]: {path} is not a file")
        with Image.open(path) as img:
            img.load()
            return img.copy()
    raise GenerationError(f"images[{k}] is a {type(image).__name__}; give a PIL image or a file path")


def _count_image_blocks(messages: Sequence[dict[str, Any]]) -> int:
    n = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            n += sum(1 for b in content if isinstance(b, dict) and b.get("type") in ("image", "image_url"))
    return n


def build_prompt(tokenizer: Any, processor: Any, messages_or_prompt: str | Sequence[dict[str, Any]],
                 images: Sequence[Any] = ()) -> PromptInputs:
    """Template a prompt with its images the way training data is templated.

    Args:
        tokenizer: a ``KimiTokenizer``.
        processor: a ``KimiVLImageProcessor``.
        messages_or_prompt: a user prompt string (the images come first in the user turn, then the text), or an
            OpenAI-style message list whose image blocks (``{"type": "image"}``) match ``images`` in order.
        images: PIL images or file paths.

    Returns:
        PromptInputs with the generation prompt appended.
    """
    from vlmtune.data.chat_template import apply_chat_template

    pil = [_load_image(img, k) for k, img in enumerate(images)]
    if isinstance(messages_or_prompt, str):
        content = [{"type": "image"} for _ in pil] + [{"type": "text", "text": messages_or_prompt}]
        messages: Sequence[dict[str, Any]] = [{"role": "user", "content": content}]
    else:
        messages = messages_or_prompt
        blocks = _count_image_blocks(messages)
        if blocks != len(pil):
            raise GenerationError(f"the messages hold {blocks} image blocks but {len(pil)} images were given; give one "
                                  "image per {'type': 'image'} block, in order")
    if pil:
        vision = processor(pil)
        pixel_values, grids = vision["pixel_values"], vision["image_grid_hws"]  # (P, 3, 14, 14), (I, 2)
        counts = [grid_tokens(g, processor.merge_kernel_size) for g in grids.tolist()]
    else:
        pixel_values, grids, counts = None, None, []
    templated = apply_chat_template(messages, tokenizer, counts, add_generation_prompt=True)
    input_ids = torch.tensor([templated.input_ids], dtype=torch.long)  # (1, T)
    return PromptInputs(input_ids=input_ids, pixel_values=pixel_values, image_grid_hws=grids)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a Kimi-VL reply: ``<|im_end|>`` (end of the assistant turn) and ``[EOS]``."""
    return sorted({tokenizer.im_end_id, tokenizer.eos_id})
