"""Generation: the MLA KV cache path equals the uncached reference, seeded sampling, top-p, stop tokens, the CLI.

The reference (``use_cache=False``) re-runs the VLM's full padded forward, vision tower included, on the whole
sequence at every step; the cached path prefills once and then feeds one token per step through the cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.generate import generate, load_for_generation
from vlmtune.generate import main as generate_main
from vlmtune.models.kimi_vl.generation import (
    GenerationError,
    MLAKVCache,
    SamplingParams,
    build_prompt,
    choose_token,
    generate_ids,
    stop_token_ids,
)

STEPS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmtune.models.kimi_vl.init_model import init_model

    return init_model(tmp_path_factory.mktemp("gen") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def images(model_dir: Path) -> list[Path]:
    """Two images of different grids (4x6 and 4x4 patches after padding): 10 image tokens."""
    paths = []
    for k, (size, color) in enumerate((((60, 40), (200, 30, 30)), ((30, 50), (20, 200, 30)))):
        path = model_dir.parent / f"img{k}.png"
        Image.new("RGB", size, color).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def fp64(model_dir: Path):
    return load_for_generation(model_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def prompt(fp64, images: list[Path]):
    _, tok, proc = fp64
    return build_prompt(tok, proc, "What colour is the shape?", images)


def _run(model, prompt, params: SamplingParams, use_cache: bool, stop=()):
    return generate_ids(model, prompt.input_ids, prompt.pixel_values, prompt.image_grid_hws, params, stop,
                        use_cache=use_cache, return_logits=True)


def test_prompt_holds_the_images(fp64, prompt) -> None:
    _, tok, _ = fp64
    assert prompt.image_grid_hws.tolist() == [[4, 6], [4, 4]]
    assert prompt.pixel_values.shape == (40, 3, 14, 14)
    ids = prompt.input_ids[0].tolist()
    assert ids.count(tok.media_pad_id) == 2 * 3 + 2 * 2
    assert ids[-3:] == [tok.im_assistant_id, *tok.encode("assistant"), tok.im_middle_id]


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=STEPS),
    SamplingParams(max_new_tokens=STEPS, do_sample=True, temperature=0.8, top_p=0.9, seed=5),
], ids=["greedy", "sampling"])
def test_cached_equals_uncached(fp64, prompt, params: SamplingParams) -> None:
    model, _, _ = fp64
    cached = _run(model, prompt, params, use_cache=True)
    ref = _run(model, prompt, params, use_cache=False)
    assert cached.token_ids == ref.token_ids
    assert len(cached.token_ids) == STEPS and cached.stop_reason == "max_new_tokens"
    assert len(cached.step_logits) == len(ref.step_logits) == STEPS
    for step, (a, b) in enumerate(zip(cached.step_logits, ref.step_logits)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, s=step: f"step {s}: {m}")


def test_cached_equals_uncached_with_lora_on_kv_b_proj(fp64, prompt) -> None:
    """The cache re-expands latents through the (LoRA-wrapped) kv_b_proj module, so adapters are honoured."""
    from peft import LoraConfig, get_peft_model

    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration

    base, _, _ = fp64
    clone = KimiVLForConditionalGeneration(base.config).to(torch.float64)
    clone.load_state_dict(base.state_dict())
    torch.manual_seed(1)
    peft_model = get_peft_model(clone, LoraConfig(r=4, lora_alpha=8, target_modules=["kv_b_proj", "q_proj"],
                                                  init_lora_weights=False))  # random B: adapters change the output
    params = SamplingParams(max_new_tokens=8)
    cached = _run(peft_model, prompt, params, use_cache=True)
    ref = _run(peft_model, prompt, params, use_cache=False)
    plain = _run(base, prompt, params, use_cache=True)
    assert cached.token_ids == ref.token_ids
    for a, b in zip(cached.step_logits, ref.step_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (cached.step_logits[0] - plain.step_logits[0]).abs().max() > 1e-3  # the adapters did act


def test_cache_holds_the_latents(fp64, prompt) -> None:
    """After a prefill the cache holds (1, T, kv_lora_rank) + (1, T, Drope) per layer, nothing per head."""
    model, _, _ = fp64
    tc = model.config.text_config
    cache = MLAKVCache(tc.num_hidden_layers)
    t = prompt.input_ids.shape[1]
    with torch.no_grad():
        embeds = model.embed(prompt.input_ids, prompt.pixel_values, prompt.image_grid_hws)
        hidden, _ = model.language_model.model(inputs_embeds=embeds, kv_cache=cache)
        ref = model(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values,
                    image_grid_hws=prompt.image_grid_hws).logits
    torch.testing.assert_close(model.language_model.lm_head(hidden), ref, rtol=0, atol=1e-12)  # prefill = reference
    assert [cache.get_seq_length(i) for i in range(tc.num_hidden_layers)] == [t] * tc.num_hidden_layers
    assert cache.c_kv[0].shape == (1, t, tc.kv_lora_rank) and cache.k_rope[0].shape == (1, t, tc.qk_rope_head_dim)
    assert cache.nbytes() == tc.num_hidden_layers * t * (tc.kv_lora_rank + tc.qk_rope_head_dim) * 8


def test_sampling_is_seeded(fp64, prompt) -> None:
    model, _, _ = fp64
    hot = dict(max_new_tokens=12, do_sample=True, temperature=2.0)
    a = _run(model, prompt, SamplingParams(**hot, seed=7), use_cache=True).token_ids
    b = _run(model, prompt, SamplingParams(**hot, seed=7), use_cache=True).token_ids
    c = _run(model, prompt, SamplingParams(**hot, seed=8), use_cache=True).token_ids
    assert a == b
    assert a != c


def test_choose_token_greedy_and_top_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).log()  # probabilities 0.5 / 0.3 / 0.15 / 0.05
    assert choose_token(logits, SamplingParams(), None) == 0
    g = torch.Generator().manual_seed(0)
    draws = [choose_token(logits, SamplingParams(do_sample=True, top_p=0.6), g) for _ in range(4000)]
    assert set(draws) == {0, 1}  # nucleus {0, 1} (mass 0.8 >= 0.6); tokens 2 and 3 are never drawn
    assert abs(draws.count(0) / len(draws) - 0.5 / 0.8) < 0.03
    assert {choose_token(logits, SamplingParams(do_sample=True, top_p=0.5), g) for _ in range(200)} == {0}
    full = [choose_token(logits, SamplingParams(do_sample=True), g) for _ in range(4000)]
    assert set(full) == {0, 1, 2, 3}
    # temperature -> 0 approaches greedy
    assert {choose_token(logits, SamplingParams(do_sample=True, temperature=1e-3), g) for _ in range(200)} == {0}


def test_stop_tokens(fp64, prompt) -> None:
    model, tok, _ = fp64
    assert stop_token_ids(tok) == sorted([tok.im_end_id, tok.eos_id])
    free = _run(model, prompt, SamplingParams(max_new_tokens=STEPS), use_cache=True).token_ids
    k = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)  # first new token from step 2 on
    stopped = _run(model, prompt, SamplingParams(max_new_tokens=STEPS), use_cache=True, stop=[free[k], 10**6])
    assert stopped.token_ids == free[:k]
    assert stopped.stop_reason == "stop_token" and stopped.stop_token_id == free[k]
    assert len(stopped.step_logits) == k + 1  # the step that produced the stop token is recorded
    short = _run(model, prompt, SamplingParams(max_new_tokens=3), use_cache=True)
    assert short.token_ids == free[:3] and short.stop_reason == "max_new_tokens"


def test_im_end_ends_the_reply(fp64, images: list[Path]) -> None:
    """Swap the lm_head rows of <|im_end|> and the token greedy decoding picks at step k: the reply stops there."""
    model, tok, proc = fp64
    question = "What colour is the shape?"
    prompt = build_prompt(tok, proc, question, images)
    free = _run(model, prompt, SamplingParams(max_new_tokens=STEPS), use_cache=True).token_ids
    k = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)
    assert tok.im_end_id not in free[: k + 1]
    head = model.language_model.lm_head.weight
    rows = [tok.im_end_id, free[k]]
    with torch.no_grad():
        head[rows] = head[rows[::-1]].clone()  # steps < k keep their winner; at step k <|im_end|> wins
    try:
        out = _run(model, prompt, SamplingParams(max_new_tokens=STEPS), use_cache=True, stop=stop_token_ids(tok))
        text = generate(model, tok, proc, question, images, max_new_tokens=STEPS)
    finally:
        with torch.no_grad():
            head[rows] = head[rows[::-1]].clone()
    assert out.token_ids == free[:k]
    assert out.stop_reason == "stop_token" and out.stop_token_id == tok.im_end_id
    assert text == tok.decode(free[:k])


def test_errors(fp64, prompt) -> None:
    model, tok, proc = fp64
    with pytest.raises(GenerationError, match="temperature"):
        SamplingParams(do_sample=True, temperature=0.0)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(GenerationError, match="image blocks"):
        build_prompt(tok, proc, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                     [Image.new("RGB", (28, 28))])
    with pytest.raises(ValueError, match="no_grad"):
        model.language_model.model(input_ids=prompt.input_ids, kv_cache=MLAKVCache(3))
    with pytest.raises(ValueError, match="use_cache"):
        model(input_ids=prompt.input_ids, use_cache=True)  # the training forward still refuses a cache


def test_rmpad_model_is_refused(model_dir: Path, prompt) -> None:
    from vlmtune.patches.rmpad import apply_rmpad

    model, _, _ = load_for_generation(model_dir)
    apply_rmpad(model, attention="sdpa_varlen")
    with pytest.raises(GenerationError, match="apply_rmpad"):
        generate_ids(model, prompt.input_ids)


def test_cli_matches_python_api(model_dir: Path, images: list[Path], capsys: pytest.CaptureFixture) -> None:
    model, tok, proc = load_for_generation(model_dir)
    question = "Which shape is red?"
    want_greedy = generate(model, tok, proc, question, images, max_new_tokens=6)
    want_sampled = generate(model, tok, proc, question, images, max_new_tokens=6, do_sample=True, temperature=0.9,
                            top_p=0.95, seed=3)
    base = [str(model_dir), "--image", str(images[0]), "--image", str(images[1]), "--prompt", question,
            "--max-new-tokens", "6"]
    assert generate_main(base) == 0
    out = capsys.readouterr()
    assert out.out == want_greedy + "\n"
    assert "6 tokens" in out.err and "stop: max-new-tokens" in out.err
    assert generate_main(base + ["--temperature", "0.9", "--top-p", "0.95", "--seed", "3"]) == 0
    assert capsys.readouterr().out == want_sampled + "\n"
    assert want_sampled != want_greedy
    with pytest.raises(SystemExit) as exc:
        generate_main(base + ["--top-p", "0.9"])  # top-p without sampling is refused, not ignored
    assert exc.value.code == 2
    assert "--temperature" in capsys.readouterr().err
