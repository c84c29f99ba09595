"""apply_rmpad: the instance-level patch (what it touches, idempotence, loud failures, peft, checkpointing, logging)
and the patched padded call == the unpatched padded call (logits on real tokens, zeros on padding, loss, gradients).

Tolerances: fp64 1e-8, fp32 1e-5 (reached: ~1e-15 in fp64).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from tests.patches.test_packed_equivalence import _assert_grads_close
from vlmtune.data.batch import SampleTensors, collate_samples
from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration, kimi_vl_tiny
from vlmtune.models.kimi_vl.attention import KimiVLAttention
from vlmtune.models.kimi_vl.decoder import KimiVLTextModel
from vlmtune.models.kimi_vl.vit import MoonViTBlock
from vlmtune.ops import attention as attn_mod
from vlmtune.ops.attention import AttentionBackendError
from vlmtune.patches import rmpad
from vlmtune.patches.rmpad import RmpadError, apply_rmpad, is_rmpad_applied, rmpad_backend

TOL = {torch.float64: dict(atol=1e-8, rtol=1e-8), torch.float32: dict(atol=1e-5, rtol=1e-5)}
CFG = kimi_vl_tiny()
PH = CFG.media_placeholder_token_id
LORA_TARGETS = ["q_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(dtype: torch.dtype = torch.float64) -> KimiVLForConditionalGeneration:
    torch.manual_seed(0)
    return KimiVLForConditionalGeneration(CFG).to(dtype).train()


def _targets(model: nn.Module) -> list[nn.Module]:
    """Every module rmpad must patch: the VLM, the decoder, each decoder attention, each vision block."""
    vlm = next(m for m in model.modules() if isinstance(m, KimiVLForConditionalGeneration))
    return [vlm, vlm.language_model.model,
            *(m for m in vlm.modules() if isinstance(m, KimiVLAttention)),
            *vlm.vision_tower.encoder.blocks]


def _padded_batch(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Three rows: an image row (right padding), a text row (left padding), a full-length row with two images."""
    g = torch.Generator().manual_seed(7)
    B, T = 3, 14
    ids = torch.randint(0, 1700, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 10:] = 0  # right padding
    mask[1, :5] = 0  # left padding
    ids[0, 2:4] = PH  # row 0: one 2x4 image (2 tokens)
    ids[2, 1:5] = PH  # row 2: a 4x4 image (4 tokens) ...
    ids[2, 6] = PH  # ... and a 2x2 image (1 token)
    ids[mask == 0] = CFG.text_config.pad_token_id
    labels = ids.masked_fill((ids == PH) | (mask == 0), -100)
    labels[:, :2] = -100
    grids = torch.tensor([[2, 4], [4, 4], [2, 2]])
    pixels = torch.randn(8 + 16 + 4, 3, 14, 14, generator=g, dtype=torch.float64).to(dtype)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels, image_grid_hws=grids)


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _packed_inputs(dtype: torch.dtype) -> dict:
    """The real tokens of :func:`_padded_batch`, packed into one (1, N) buffer (same images)."""
    b = _padded_batch(dtype)
    rows = []
    for r in range(3):
        keep = b["attention_mask"][r].bool()
        rows.append(SampleTensors(b["input_ids"][r][keep], b["labels"][r][keep] != -100))
    batch = collate_samples(rows)
    return {**batch.to_model_inputs(), "pixel_values": b["pixel_values"], "image_grid_hws": b["image_grid_hws"]}


# ------------------------------------------------------------------------------------------- patched == unpatched
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patched_padded_call_equals_unpatched(dtype: torch.dtype) -> None:
    ref = _model(dtype)
    patched = apply_rmpad(copy.deepcopy(ref))
    batch = _padded_batch(dtype)
    mask = batch["attention_mask"].bool()

    out_ref = ref(**batch)
    out_ref.loss.backward()
    out = patched(**batch)
    out.loss.backward()

    assert out.logits.shape == out_ref.logits.shape == (3, 14, CFG.text_config.vocab_size)
    torch.testing.assert_close(out.logits[mask], out_ref.logits[mask], **TOL[dtype])
    assert torch.count_nonzero(out.logits[~mask]) == 0  # re-padded with exact zeros
    torch.testing.assert_close(out.loss, out_ref.loss, **TOL[dtype])
    # Row 1 is left-padded and its first real token keeps a label: a padding position must not predict it (the
    # reference used to, from position 4). Supervised = labels whose previous position is a real token.
    expected = int(((batch["labels"][:, 1:] != -100) & mask[:, :-1]).sum())
    assert expected == int((batch["labels"][:, 1:] != -100).sum()) - 1
    assert out.num_supervised_tokens == out_ref.num_supervised_tokens == expected
    torch.testing.assert_close(out.aux_loss, out_ref.aux_loss, **TOL[dtype])
    assert out.num_sequences == out_ref.num_sequences == 3
    _assert_grads_close(_grads(patched), _grads(ref), **TOL[dtype])


def test_all_padding_row_and_step_denominators_match() -> None:
    # A row with no real token is an empty segment; with step denominators the loss share matches too.
    ref = _model()
    patched = apply_rmpad(copy.deepcopy(ref))
    batch = _padded_batch(torch.float64)
    batch["attention_mask"][1] = 0
    batch["labels"][1] = -100
    for kw in ({}, {"loss_reduction": "sample", "loss_denominators": (40, 4, 9.0)}):
        a, b = ref(**batch, **kw), patched(**batch, **kw)
        torch.testing.assert_close(b.loss, a.loss, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(b.aux_loss, a.aux_loss, atol=1e-12, rtol=1e-12)
        assert a.num_sequences == b.num_sequences == 2


# ------------------------------------------------------------------------------------------------- the patch
def test_patch_is_on_the_instance_only() -> None:
    class_forwards = {cls: cls.__dict__["forward"] for cls in
                      (KimiVLForConditionalGeneration, KimiVLTextModel, KimiVLAttention, MoonViTBlock)}
    model, other = _model(), _model()
    assert not is_rmpad_applied(model) and rmpad_backend(model) is None
    assert apply_rmpad(model) is model
    assert is_rmpad_applied(model) and rmpad_backend(model) == "sdpa_varlen"
    targets = _targets(model)
    assert len(targets) == 2 + CFG.text_config.num_hidden_layers + CFG.vision_config.num_hidden_layers
    for m in targets:
        assert "forward" in m.__dict__ and m.forward.__self__ is m
        assert m.attn_backend == "sdpa_varlen"
    assert model.forward.__func__ is KimiVLForConditionalGeneration.forward_varlen
    assert model.language_model.model.layers[1].self_attn.forward.__func__ is KimiVLAttention.forward_varlen
    # classes untouched, the other instance untouched
    for cls, fn in class_forwards.items():
        assert cls.__dict__["forward"] is fn
    assert not is_rmpad_applied(other)
    assert all("forward" not in m.__dict__ for m in _targets(other))
    assert other.vision_tower.encoder.blocks[0].attn_backend == "sdpa_masked"
    # the unpatched instance still refuses a packed call loudly instead of attending across samples
    with pytest.raises(TypeError, match="cu_seqlens"):
        other(**_packed_inputs(torch.float64))


def test_idempotent_and_backend_switch(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    apply_rmpad(model)
    bound = [m.__dict__["forward"] for m in _targets(model)]
    with caplog.at_level(logging.INFO, logger="vlmtune.patches.rmpad"):
        apply_rmpad(model)
        apply_rmpad(model, attention="sdpa_varlen")
    assert [m.__dict__["forward"] for m in _targets(model)] == bound  # untouched
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    with torch.no_grad():
        before = model(**_packed_inputs(torch.float64)).logits
        apply_rmpad(model, attention="sdpa_masked")
        after = model(**_packed_inputs(torch.float64)).logits
    assert rmpad_backend(model) == "sdpa_masked" and is_rmpad_applied(model)
    assert {m.attn_backend for m in _targets(model)} == {"sdpa_masked"}
    torch.testing.assert_close(after, before, atol=1e-12, rtol=0)
    model.vision_tower.encoder.blocks[0].attn_backend = "sdpa_varlen"  # changed by hand: a re-application repairs it
    apply_rmpad(model, attention="sdpa_masked")
    assert model.vision_tower.encoder.blocks[0].attn_backend == "sdpa_masked"


def test_missing_method_raises_naming_the_module_and_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    monkeypatch.delattr(KimiVLAttention, "forward_varlen")
    with pytest.raises(RmpadError, match=r"`language_model\.model\.layers\.0\.self_attn` \(KimiVLAttention\) has no "
                                         r"forward_varlen\(\).*nothing was patched"):
        apply_rmpad(model)
    assert all("forward" not in m.__dict__ for m in _targets(model))
    assert not is_rmpad_applied(model)


def test_swap_that_does_not_take_raises_and_rolls_back() -> None:
    class Refuses(KimiVLAttention):
        """An attention class that silently ignores assignments to ``forward`` (as some wrappers do)."""

        def __setattr__(self, name: str, value: object) -> None:
            if name != "forward":
                super().__setattr__(name, value)

    model = _model()
    model.language_model.model.layers[1].self_attn.__class__ = Refuses
    with pytest.raises(RmpadError, match=r"did not take on \['language_model\.model\.layers\.1\.self_attn'\]"):
        apply_rmpad(model)
    assert all("forward" not in m.__dict__ and not hasattr(m, rmpad._FLAG) for m in _targets(model))
    assert model.language_model.model.layers[0].self_attn.attn_backend == "sdpa_varlen"
    assert model.vision_tower.encoder.blocks[0].attn_backend == "sdpa_masked"  # restored
    assert not hasattr(model, "attn_backend")


def test_is_rmpad_applied_checks_the_binding() -> None:
    model = _model()
    apply_rmpad(model)
    copied = copy.deepcopy(model)  # deepcopy rebinds the instance forwards to the copies
    assert is_rmpad_applied(copied)
    assert copied.language_model.model.layers[0].self_attn.forward.__self__ is copied.language_model.model.layers[0].self_attn
    layers = model.language_model.model.layers
    layers[0].self_attn.forward = layers[1].self_attn.forward  # right function, wrong instance
    assert not is_rmpad_applied(model)
    del layers[0].self_attn.forward
    assert not is_rmpad_applied(model)
    assert not is_rmpad_applied(nn.Linear(2, 2))
    with pytest.raises(RmpadError, match="no KimiVLForConditionalGeneration inside Linear"):
        apply_rmpad(nn.Linear(2, 2))


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_backend_on_cpu_is_an_actionable_error(backend: str) -> None:
    model = _model()
    with pytest.raises(AttentionBackendError, match=f"{backend} needs CUDA; use sdpa_varlen on CPU"):
        apply_rmpad(model, attention=backend)
    assert not is_rmpad_applied(model)
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'flash'"):
        apply_rmpad(model, attention="flash")


def test_auto_backend_choice_logged_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "_LOGGED", set())
    a, b = _model(), _model()
    with caplog.at_level(logging.INFO):
        apply_rmpad(a)
        apply_rmpad(a)
        apply_rmpad(b, attention="auto")
    msgs = [r.getMessage() for r in caplog.records]
    assert [m for m in msgs if "auto ->" in m] == ["attention backend: auto -> sdpa_varlen (device cpu)"]
    applied = [m for m in msgs if m.startswith("rmpad applied")]
    assert applied == ["rmpad applied: 7 modules patched (VLM, decoder, 3 decoder attentions, 2 vision blocks), "
                       "attention backend sdpa_varlen"] * 2  # a and b once each; the repeat on a is silent


# ------------------------------------------------------------------------------------------- wrappers, checkpointing
def test_peft_lora_model_patched_equals_unpatched() -> None:
    from peft import LoraConfig, get_peft_model

    ref = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                              init_lora_weights=False))  # random B: adapters change the output
    n_expert_adapters = sum(1 for n, _ in ref.named_modules() if ".experts." in n and n.endswith("lora_A.default"))
    assert n_expert_adapters == 8 * 3 * (CFG.text_config.num_hidden_layers - 1)  # E experts x 3 projections x MoE layers
    patched = copy.deepcopy(ref)
    assert apply_rmpad(patched) is patched
    assert is_rmpad_applied(patched) and not is_rmpad_applied(ref)
    batch = _padded_batch(torch.float64)
    mask = batch["attention_mask"].bool()
    a, b = ref(**batch), patched(**batch)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.logits[mask], a.logits[mask], **TOL[torch.float64])
    torch.testing.assert_close(b.loss, a.loss, **TOL[torch.float64])
    lora = {n: g for n, g in _grads(patched).items() if "lora_" in n}
    assert lora and all(g is not None for g in lora.values())
    _assert_grads_close(_grads(patched), _grads(ref), **TOL[torch.float64])
    # the packed call goes through the peft wrapper too and gives the same per-token logits
    packed = patched(**_packed_inputs(torch.float64))
    torch.testing.assert_close(packed.logits[0], b.logits[mask], **TOL[torch.float64])


@pytest.mark.parametrize("order", ["patch_then_checkpointing", "checkpointing_then_patch"])
def test_survives_gradient_checkpointing(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmtune.models.kimi_vl.decoder as decoder_mod
    import vlmtune.models.kimi_vl.vit as vit_mod

    plain = apply_rmpad(_model())
    ckpt = copy.deepcopy(plain) if order == "patch_then_checkpointing" else _model()
    if order == "patch_then_checkpointing":
        ckpt.gradient_checkpointing_enable()
    else:
        ckpt.gradient_checkpointing_enable()
        apply_rmpad(ckpt)
    assert is_rmpad_applied(ckpt)
    calls = {"decoder": 0, "vision": 0}

    def counting(name: str, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(decoder_mod, "checkpoint", counting("decoder", decoder_mod.checkpoint))
    monkeypatch.setattr(vit_mod, "checkpoint", counting("vision", vit_mod.checkpoint))
    inputs = _packed_inputs(torch.float64)
    a = plain(**inputs)
    a.loss.backward()
    assert calls == {"decoder": 0, "vision": 0}
    b = ckpt(**inputs)
    b.loss.backward()
    assert calls == {"decoder": CFG.text_config.num_hidden_layers, "vision": CFG.vision_config.num_hidden_layers}
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    _assert_grads_close(_grads(ckpt), _grads(plain), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- rejections
def test_use_cache_and_bad_packed_calls_are_rejected() -> None:
    model = apply_rmpad(_model())
    batch = _padded_batch(torch.float64)
    packed = _packed_inputs(torch.float64)
    with pytest.raises(ValueError, match="use_cache=True is not supported"):
        model(**batch, use_cache=True)
    with pytest.raises(ValueError, match="use_cache=True is not supported"):
        model(**packed, use_cache=True)
    with pytest.raises(ValueError, match="use_cache=True is not supported"):
        _model()(**batch, use_cache=True)  # the unpatched reference too
    n = packed["input_ids"].shape[1]
    with pytest.raises(ValueError, match="takes no attention_mask: padding is a segment"):
        model(**packed, attention_mask=torch.ones(1, n, dtype=torch.long))
    with pytest.raises(ValueError, match=r"a packed call takes input_ids \(1, N\)"):
        model(**{**packed, "input_ids": packed["input_ids"].expand(2, n)})
    with pytest.raises(ValueError, match="needs max_seqlen as a host int"):
        model(**{**packed, "max_seqlen": None})
    with pytest.raises(ValueError, match=f"cu_seqlens ends at {n - 1} but the pack holds {n} tokens"):
        cu = packed["cu_seqlens"].clone()
        cu[-1] -= 1
        model(**{**packed, "cu_seqlens": cu})
    with pytest.raises(TypeError, match=r"unexpected arguments \['output_attentions'\]"):
        model(**packed, output_attentions=True)
