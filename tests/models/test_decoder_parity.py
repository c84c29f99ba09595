"""Decoder parity against transformers' DeepseekV3 (attention, MoE, decoder layer, full causal LM) + layout invariants.

The oracle is used as published (``attn_implementation="sdpa"``, ``experts_implementation="eager"``, ``rope_interleave``
True, eval mode: it computes no aux loss) on tiny random fp64 configs with randomised norms and router bias, covering
q_lora_rank null AND set, n_group 1 AND > 1 (topk_group < n_group).

State dicts are mapped by hand (tests/models/_oracles.py, shared with the whole-model test): our keys are the checkpoint keys (``language_model.`` stripped, as DeepseekV3ForCausalLM
has no such prefix); the oracle stores the experts fused, ``experts.gate_up_proj (E, 2I, D)`` = per expert
``cat([gate_proj.weight, up_proj.weight])`` (its forward does ``linear(x, gate_up_proj[e]).chunk(2)`` -> gate, up) and
``experts.down_proj (E, D, I)``.

The oracle computes three things in fp32 whatever the model dtype: RMSNorm (``hidden_states.to(torch.float32)``), the
router logits (``.type(torch.float32)``) and the RoPE angles (``position_ids.float() * inv_freq``, with inv_freq built
in fp32). As published, fp64 agreement is therefore ~1e-7 per module and ~1e-6 on logits of magnitude ~4 after three
layers (asserted <= 1e-6 x max(1, max |oracle output|)). The ``lifted`` variants swap exactly
those casts for ``promote_types(dtype, float32)`` (same formulas, monkeypatched on the oracle classes) and then agree
to ~1e-15, which shows that the residual is the oracle's rounding and not a difference in behaviour.
"""

from __future__ import annotations

import types

import pytest
import torch

from tests.models import _oracles as oracles  # the independent references
from vlmtune.models.kimi_vl import decoder as decoder_mod
from vlmtune.models.kimi_vl.attention import KimiVLAttention
from vlmtune.models.kimi_vl.configuration import KimiVLTextConfig, kimi_vl_a3b, kimi_vl_tiny
from vlmtune.models.kimi_vl.decoder import KimiVLDecoderLayer, KimiVLLanguageModel, KimiVLTextModel
from vlmtune.models.kimi_vl.moe import KimiVLMoE

dsv3 = oracles.dsv3
_hf_config = oracles.hf_deepseek_config
_oracle_state = oracles.oracle_decoder_state

PUBLISHED_TOL = 1e-6  # vs the oracle as published (its fp32 casts), relative to max(1, max |oracle output|)
LIFTED_TOL = 1e-12  # absolute, vs the oracle with its fp32 casts lifted to fp64

# name -> text-config overrides. All: 3 layers (dense layer 0, MoE 1-2), shared experts, top-k > 1.
CONFIGS = {
    "noq_g2": dict(q_lora_rank=None, n_group=2, topk_group=1, n_routed_experts=8, num_experts_per_tok=2),
    "qlora_g1": dict(q_lora_rank=24, n_group=1, topk_group=1, n_routed_experts=8, num_experts_per_tok=3),
    "qlora_g4": dict(q_lora_rank=24, n_group=4, topk_group=2, n_routed_experts=16, num_experts_per_tok=3,
                     n_shared_experts=2),
}


def _text_config(**overrides: object) -> KimiVLTextConfig:
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.446,
                kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, moe_layer_freq=1,
                norm_topk_prob=True, aux_loss_alpha=0.001, seq_aux=True, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=512, pad_token_id=319, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return KimiVLTextConfig(**base)


@torch.no_grad()
def _randomise(module: torch.nn.Module) -> None:
    """Random weights everywhere, norms and router bias included, so no term can hide."""
    for name, p in module.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.3 * torch.randn_like(p))
        elif name.endswith("gate.weight"):
            p.normal_(0, 0.3)
        else:
            p.normal_(0, 0.12)
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn_like(b))


@pytest.fixture(params=["published", "lifted"])
def oracle_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "lifted":
        oracles.lift_deepseek_to_fp64(monkeypatch)
    return request.param


def _tol(mode: str, reference: torch.Tensor | None = None) -> float:
    """Absolute bound for a comparison against ``reference`` (the oracle's output)."""
    if mode == "lifted":
        return LIFTED_TOL
    scale = 1.0 if reference is None else max(1.0, reference.abs().max().item())
    return PUBLISHED_TOL * scale


def _report(name: str, diff: float) -> None:
    print(f"PARITY {name}: max abs diff {diff:.3e}")


def _padded_batch(vocab: int, lengths: list[int], t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and a RIGHT-padded (B, T) 0/1 mask with the given real lengths."""
    ids = torch.randint(3, vocab - 1, (len(lengths), t))
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _oracle_4d_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 -> (B, 1, T, T) boolean causal & key-padding mask for the oracle's sdpa attention."""
    t = mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return (causal[None] & mask.bool()[:, None, :])[:, None]


# ------------------------------------------------------------------------------------------------------------------
# module parity
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_parity(name: str, oracle_mode: str) -> None:
    cfg = _text_config(**CONFIGS[name])
    hf_cfg = _hf_config(cfg)
    ours = KimiVLAttention(cfg, layer_idx=1).double().eval()
    _randomise(ours)
    oracle = dsv3.DeepseekV3Attention(hf_cfg, layer_idx=1).double().eval()
    oracle.load_state_dict(_oracle_state(ours.state_dict()), strict=True)
    rotary = dsv3.DeepseekV3RotaryEmbedding(hf_cfg).double()

    lengths, t = [9, 6, 3], 9
    _, mask = _padded_batch(cfg.vocab_size, lengths, t)
    x = torch.randn(len(lengths), t, cfg.hidden_size, dtype=torch.float64)
    pos = _positions(mask)
    got = ours(x, position_ids=pos, attention_mask=mask)  # (B, T, D)
    want, _ = oracle(x, position_embeddings=rotary(x, pos), attention_mask=_oracle_4d_mask(mask))
    real = mask.bool()
    diff = (got[real] - want[real]).abs().max().item()
    _report(f"attention[{name},{oracle_mode}]", diff)
    assert diff <= _tol(oracle_mode, want)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_parity(name: str, oracle_mode: str) -> None:
    cfg = _text_config(**CONFIGS[name])
    ours = KimiVLMoE(cfg).double().eval()
    _randomise(ours)
    oracle = dsv3.DeepseekV3MoE(_hf_config(cfg)).double().eval()
    oracle.load_state_dict(_oracle_state(ours.state_dict()), strict=True)
    x = torch.randn(3, 20, cfg.hidden_size, dtype=torch.float64)
    got, aux = ours(x)
    want = oracle(x)
    diff = (got - want).abs().max().item()
    _report(f"moe[{name},{oracle_mode}]", diff)
    assert diff <= _tol(oracle_mode, want)
    assert aux.item() == 0.0  # eval: no aux loss, like the oracle
    # Our routing picks the same experts as the oracle's router on every token.
    _, idx, w = ours.gate(x.view(-1, cfg.hidden_size))
    _, w_o, idx_o = oracle.gate(x)
    o_sorted, perm = idx_o.sort(-1)
    assert torch.equal(idx.sort(-1).values, o_sorted)
    assert torch.allclose(w.gather(1, idx.sort(-1).indices), w_o.gather(1, perm).double(), atol=_tol(oracle_mode), rtol=0)


@pytest.mark.parametrize("layer_idx", [0, 1])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_layer_parity(name: str, layer_idx: int, oracle_mode: str) -> None:
    cfg = _text_config(**CONFIGS[name])
    hf_cfg = _hf_config(cfg)
    ours = KimiVLDecoderLayer(cfg, layer_idx).double().eval()
    _randomise(ours)
    oracle = dsv3.DeepseekV3DecoderLayer(hf_cfg, layer_idx).double().eval()
    oracle.load_state_dict(_oracle_state(ours.state_dict()), strict=True)
    rotary = dsv3.DeepseekV3RotaryEmbedding(hf_cfg).double()
    lengths, t = [11, 7], 11
    _, mask = _padded_batch(cfg.vocab_size, lengths, t)
    x = torch.randn(len(lengths), t, cfg.hidden_size, dtype=torch.float64)
    pos = _positions(mask)
    seg = torch.where(mask.bool(), torch.arange(2)[:, None], -1).reshape(-1)
    got, aux = ours(x, pos, seg, 2, attention_mask=mask)
    want = oracle(x, attention_mask=_oracle_4d_mask(mask), position_ids=pos, position_embeddings=rotary(x, pos))
    real = mask.bool()
    diff = (got[real] - want[real]).abs().max().item()
    _report(f"decoder_layer{layer_idx}[{name},{oracle_mode}]", diff)
    assert diff <= _tol(oracle_mode, want)
    assert aux.item() == 0.0


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal_lm_parity(name: str, padding: str, oracle_mode: str) -> None:
    """Full logits on a padded batch (compared on real tokens; positions count real tokens) and an unpadded batch."""
    cfg = _text_config(**CONFIGS[name])
    ours = KimiVLLanguageModel(cfg).double().eval()
    _randomise(ours)
    oracle = dsv3.DeepseekV3ForCausalLM(_hf_config(cfg)).double().eval()
    oracle.load_state_dict(_oracle_state(ours.state_dict()), strict=True)

    ids, mask = _padded_batch(cfg.vocab_size, [13, 8, 5], 13)
    if padding == "left":
        mask = mask.flip(-1)
    got, aux = ours(ids, attention_mask=mask)
    want = oracle(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    real = mask.bool()
    diff = (got[real] - want[real]).abs().max().item()
    full = ids[:, :8]
    want_unpadded = oracle(input_ids=full).logits
    diff_unpadded = (ours(full)[0] - want_unpadded).abs().max().item()
    _report(f"causal_lm {padding}-padded[{name},{oracle_mode}]", diff)
    _report(f"causal_lm unpadded[{name},{oracle_mode}]", diff_unpadded)
    assert diff <= _tol(oracle_mode, want)
    assert diff_unpadded <= _tol(oracle_mode, want_unpadded)
    assert aux.item() == 0.0
    assert torch.isfinite(got).all()


# ------------------------------------------------------------------------------------------------------------------
# our own invariants (tighter than the oracle bound)
# ------------------------------------------------------------------------------------------------------------------
def _tiny_lm() -> KimiVLLanguageModel:
    lm = KimiVLLanguageModel(kimi_vl_tiny().text_config).double()
    _randomise(lm)
    return lm


def _set_attn_backend(model: KimiVLTextModel, backend: str) -> None:
    for layer in model.layers:
        layer.self_attn.attn_backend = backend


def test_varlen_equals_padded_and_each_sequence_alone() -> None:
    """Same tokens: padded rows (right, left, an empty row) == one packed varlen call == each sequence alone."""
    lm = _tiny_lm().train()  # train mode: the aux loss is live and must agree too
    model = lm.model
    lengths, t = [9, 5, 0], 9
    ids, mask = _padded_batch(lm.config.vocab_size, lengths, t)
    real = mask.bool()
    h_pad, aux_pad = model(input_ids=ids, attention_mask=mask)  # (B, T, D)
    assert torch.isfinite(h_pad).all()  # the fully padded row and padded queries stay finite

    left_ids = torch.stack([row.roll(t - n) for row, n in zip(ids, lengths)])
    h_left, aux_left = model(input_ids=left_ids, attention_mask=mask.flip(-1))
    assert (h_left[mask.flip(-1).bool()] - h_pad[real]).abs().max().item() <= 1e-12
    assert abs(aux_left.item() - aux_pad.item()) <= 1e-15

    packed = ids[real]  # (N,) the real tokens, row-major
    cu = torch.tensor([0, 9, 14, 14], dtype=torch.int32)
    for backend in ("sdpa_varlen", "sdpa_masked"):
        _set_attn_backend(model, backend)
        h_var, aux_var = model.forward_varlen(inputs_embeds=model.embed_tokens(packed), cu_seqlens=cu, max_seqlen=9)
        diff = (h_var - h_pad[real]).abs().max().item()
        _report(f"varlen[{backend}] vs padded hidden", diff)
        assert diff <= 1e-10
        assert abs(aux_var.item() - aux_pad.item()) <= 1e-15 and aux_pad.item() > 0
    _set_attn_backend(model, "sdpa_varlen")

    alone = [model(input_ids=ids[i : i + 1, :n])[0][0] for i, n in enumerate(lengths[:2])]
    assert (torch.cat(alone) - h_pad[real]).abs().max().item() <= 1e-10
    aux_alone = sum(model(input_ids=ids[i : i + 1, :n])[1] for i, n in enumerate(lengths[:2]))
    assert abs(aux_alone.item() - aux_pad.item()) <= 1e-15

    # Gradients agree as well (loss on real tokens + aux).
    g = torch.randn_like(h_pad[real])
    params = [p for p in lm.parameters() if p.requires_grad]
    grads_pad = torch.autograd.grad((h_pad[real] * g).sum() + aux_pad, params, allow_unused=True)
    h_var, aux_var = model.forward_varlen(input_ids=packed, cu_seqlens=cu, max_seqlen=9)
    grads_var = torch.autograd.grad((h_var * g).sum() + aux_var, params, allow_unused=True)
    worst = max((a - b).abs().max().item() for a, b in zip(grads_pad, grads_var) if a is not None)
    assert worst <= 1e-10


def test_trailing_padding_segment_adds_no_aux_loss_or_load() -> None:
    lm = _tiny_lm().train()
    model = lm.model
    ids = torch.randint(3, lm.config.vocab_size - 1, (14,))
    cu = torch.tensor([0, 9, 14], dtype=torch.int32)
    h, aux = model.forward_varlen(input_ids=ids, cu_seqlens=cu, max_seqlen=9)
    loads = [moe.last_expert_load.clone() for _, moe in model.moe_layers()]
    padded_ids = torch.cat([ids, torch.full((4,), lm.config.pad_token_id)])
    cu_pad = torch.tensor([0, 9, 14, 18], dtype=torch.int32)
    h_pad, aux_pad = model.forward_varlen(input_ids=padded_ids, cu_seqlens=cu_pad, max_seqlen=9, num_padding=4)
    assert (h_pad[:14] - h).abs().max().item() <= 1e-12
    assert abs(aux_pad.item() - aux.item()) <= 1e-15
    assert all(torch.equal(moe.last_expert_load, load) for (_, moe), load in zip(model.moe_layers(), loads))
    _, aux_counted = model.forward_varlen(input_ids=padded_ids, cu_seqlens=cu_pad, max_seqlen=9)
    assert aux_counted.item() > aux.item()  # without num_padding the padding is a sequence like any other
    with pytest.raises(ValueError, match="num_padding"):
        model(input_ids=padded_ids[None], num_padding=4)


def test_rmpad_style_instance_swap() -> None:
    """rmpad installs forward_varlen as forward on the instances; the layers pass the kwargs through untouched."""
    lm = _tiny_lm().eval()
    model = lm.model
    ids, mask = _padded_batch(lm.config.vocab_size, [6, 4], 6)
    h_pad, _ = model(input_ids=ids, attention_mask=mask)
    for layer in model.layers:
        layer.self_attn.forward = types.MethodType(KimiVLAttention.forward_varlen, layer.self_attn)
    model.forward = types.MethodType(KimiVLTextModel.forward_varlen, model)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    h, _ = model(inputs_embeds=model.embed_tokens(ids[mask.bool()])[None], position_ids=pos[None], cu_seqlens=cu,
                 max_seqlen=6)  # (1, N, D) as at the VLM boundary
    assert h.shape == (1, 10, lm.config.hidden_size)
    assert (h[0] - h_pad[mask.bool()]).abs().max().item() <= 1e-10
    with pytest.raises(TypeError, match="attention_mask"):  # a padded call into a swapped attention fails loudly
        model.layers[0](h_pad, position_ids=pos, segment_ids=pos, num_segments=2, attention_mask=mask)


def test_gradient_checkpointing_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = _tiny_lm().train()
    model = lm.model
    ids, mask = _padded_batch(lm.config.vocab_size, [10, 7], 10)
    params = [p for p in lm.parameters() if p.requires_grad]
    calls = []
    real_checkpoint = decoder_mod.checkpoint

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn.layer_idx)
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(decoder_mod, "checkpoint", counting_checkpoint)

    def run(enabled: bool, every_k: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.gradient_checkpointing, model.checkpoint_every_k = enabled, every_k
        for _, moe in model.moe_layers():
            moe._load_since_update = None
        logits, aux = lm(ids, attention_mask=mask)
        loss = (logits.square() * mask[..., None]).sum() / mask.sum() + aux
        return loss, list(torch.autograd.grad(loss, params))

    loss0, grads0 = run(False)
    assert calls == []
    for every_k, expected_calls in ((1, [0, 1, 2]), (2, [0, 2])):
        calls.clear()
        loss, grads = run(True, every_k)
        assert calls == expected_calls
        assert torch.equal(loss, loss0)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads0))
        # The recompute inside backward does not count the expert load a second time.
        for _, moe in model.moe_layers():
            assert torch.equal(moe._load_since_update, moe.last_expert_load)
    # Only layers with a trainable parameter are checkpointed; nothing under no_grad.
    for p in model.layers[0].parameters():
        p.requires_grad_(False)
    calls.clear()
    model.gradient_checkpointing, model.checkpoint_every_k = True, 1
    lm(ids, attention_mask=mask)
    assert calls == [1, 2]
    calls.clear()
    with torch.no_grad():
        lm(ids, attention_mask=mask)
    assert calls == []


def test_gradients_reach_every_trainable_parameter() -> None:
    lm = _tiny_lm().train()
    ids, mask = _padded_batch(lm.config.vocab_size, [12, 9], 12)
    logits, aux = lm(ids, attention_mask=mask)
    ((logits.square() * mask[..., None]).sum() + aux).backward()
    loads = {i: moe.last_expert_load for i, moe in lm.model.moe_layers()}
    assert "model.layers.1.mlp.gate.e_score_correction_bias" not in dict(lm.named_parameters())
    n_experts_checked = 0
    for name, p in lm.named_parameters():
        assert p.grad is not None, name  # every expert is in the graph, used or not
        if ".experts." in name:
            layer, expert = int(name.split(".")[2]), int(name.split(".")[5])
            assert bool(p.grad.abs().sum() > 0) == bool(loads[layer][expert] > 0), name
            n_experts_checked += int(loads[layer][expert] > 0)
        else:
            assert p.grad.abs().sum() > 0, name
    assert n_experts_checked >= 3 * 8  # most experts received tokens: the check is not vacuous
    for _, moe in lm.model.moe_layers():
        assert moe.gate.e_score_correction_bias.grad is None


def test_bf16_model_keeps_router_fp32() -> None:
    lm = KimiVLLanguageModel(kimi_vl_tiny().text_config).to(torch.bfloat16).train()
    for _, moe in lm.model.moe_layers():
        assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    assert lm.lm_head.weight.dtype == torch.bfloat16
    state = lm.state_dict()
    assert state["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    ids, mask = _padded_batch(lm.config.vocab_size, [8, 5], 8)
    logits, aux = lm(ids, attention_mask=mask)
    assert logits.dtype == torch.bfloat16 and aux.dtype == torch.float32 and torch.isfinite(logits).all()
    # bf16 output tracks the fp32 model (same weights) to bf16 precision.
    ref = KimiVLLanguageModel(kimi_vl_tiny().text_config).train()
    ref.load_state_dict({k: v.float() for k, v in state.items()})
    want, _ = ref(ids, attention_mask=mask)
    assert (logits.float() - want)[mask.bool()].abs().max().item() < 0.05 * want.abs().max().item()


def test_init_weights_deterministic() -> None:
    cfg = kimi_vl_tiny().text_config
    torch.manual_seed(3)
    a = KimiVLLanguageModel(cfg)
    torch.manual_seed(3)
    b = KimiVLLanguageModel(cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(4)
    b.init_weights()
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    torch.manual_seed(4)
    a.init_weights()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert torch.equal(sa["model.norm.weight"], torch.ones(cfg.hidden_size))
    assert torch.equal(sa["model.layers.0.self_attn.kv_a_layernorm.weight"], torch.ones(cfg.kv_lora_rank))
    assert torch.count_nonzero(sa["model.layers.2.mlp.gate.e_score_correction_bias"]) == 0
    assert torch.count_nonzero(sa["model.embed_tokens.weight"][cfg.pad_token_id]) == 0
    assert abs(sa["lm_head.weight"].std().item() - 0.02) < 0.001
    assert not any("inv_freq" in k or "rotary" in k for k in sa)


def _published_decoder_shapes() -> dict[str, tuple[int, ...]]:
    """language_model.* tensors of Kimi-VL-A3B (shared/reference/kimi_vl.md), without the prefix and inv_freq keys."""
    d, v, h, layers, e = 2048, 163840, 16, 27, 64
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
                                          "lm_head.weight": (v, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (h * (128 + 64), d),
                   p + "self_attn.kv_a_proj_with_mqa.weight": (512 + 64, d),
                   p + "self_attn.kv_a_layernorm.weight": (512,),
                   p + "self_attn.kv_b_proj.weight": (h * (128 + 128), 512),
                   p + "self_attn.o_proj.weight": (d, h * 128)}
        if i == 0:
            shapes |= {p + "mlp.gate_proj.weight": (11264, d), p + "mlp.up_proj.weight": (11264, d),
                       p + "mlp.down_proj.weight": (d, 11264)}
            continue
        shapes |= {p + "mlp.gate.weight": (e, d), p + "mlp.gate.e_score_correction_bias": (e,),
                   p + "mlp.shared_experts.gate_proj.weight": (2816, d),
                   p + "mlp.shared_experts.up_proj.weight": (2816, d),
                   p + "mlp.shared_experts.down_proj.weight": (d, 2816)}
        for j in range(e):
            shapes |= {p + f"mlp.experts.{j}.gate_proj.weight": (1408, d), p + f"mlp.experts.{j}.up_proj.weight": (1408, d),
                       p + f"mlp.experts.{j}.down_proj.weight": (d, 1408)}
    return shapes


def test_a3b_on_meta_matches_published_names_shapes_and_size() -> None:
    with torch.device("meta"):
        lm = KimiVLLanguageModel(kimi_vl_a3b().text_config)
    state = lm.state_dict()
    assert all(t.device.type == "meta" for t in state.values())
    assert {k: tuple(t.shape) for k, t in state.items()} == _published_decoder_shapes()
    assert len(state) == 5317  # 5,652 model tensors - 329 vision tower - 6 projector
    total = sum(t.numel() for t in state.values())
    assert abs(total / 15.96e9 - 1) < 1e-3, total
    assert state["model.layers.5.mlp.gate.weight"].dtype == torch.float32


def test_layout_errors_are_loud() -> None:
    lm = _tiny_lm()
    attn = lm.model.layers[0].self_attn
    x = torch.randn(5, lm.config.hidden_size, dtype=torch.float64)
    with pytest.raises(ValueError, match="forward_varlen"):
        attn(x, position_ids=torch.arange(5))
    with pytest.raises(TypeError, match="unexpected"):
        attn(x[None], position_ids=torch.arange(5)[None], cache=None)
    with pytest.raises(ValueError, match="cu_seqlens ends at 4"):
        lm.model.forward_varlen(inputs_embeds=x, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), max_seqlen=4)
    with pytest.raises(ValueError, match="exactly one"):
        lm.model(input_ids=torch.zeros(1, 3, dtype=torch.long), inputs_embeds=x[None, :3])
