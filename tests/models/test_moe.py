"""MoE invariants: router selection vs weights, group-limited routing, aux loss by hand and per sequence, grouped dispatch
== dense reference, grouped_mm vs loop, fp32 router under bf16, gradients, sign-rule bias update, peft LoRA on experts."""

from __future__ import annotations

import pytest
import torch

from vlmtune.models.kimi_vl.configuration import KimiVLTextConfig
from vlmtune.models.kimi_vl.moe import KimiVLMoE, KimiVLTopkRouter, sequence_aux_loss

D = 32


def _cfg(**overrides: object) -> KimiVLTextConfig:
    base = dict(vocab_size=64, hidden_size=D, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.446,
                kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=1, topk_group=1,
                num_experts_per_tok=2, norm_topk_prob=True, aux_loss_alpha=0.01, seq_aux=True, pad_token_id=0)
    base.update(overrides)
    return KimiVLTextConfig(**base)


def _moe(dtype: torch.dtype = torch.float64, **overrides: object) -> KimiVLMoE:
    moe = KimiVLMoE(_cfg(**overrides))
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0, 0.5 if name.startswith("gate.") else 0.15)
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return moe.to(dtype)


def _manual_route(router: KimiVLTopkRouter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and 'choice' scores (biased) computed independently of the module."""
    scores = torch.sigmoid(x.double() @ router.weight.double().T)  # (N, E)
    return scores, scores + router.e_score_correction_bias.double()


# ------------------------------------------------------------------------------------------------------------------
# router
# ------------------------------------------------------------------------------------------------------------------
def test_bias_selects_and_weights_stay_unbiased() -> None:
    moe = _moe()
    router = moe.gate
    x = torch.randn(40, D, dtype=torch.float64)
    scores, choice = _manual_route(router, x)
    _, idx, w = router(x)
    # Selection = top-k of the BIASED scores.
    assert torch.equal(idx.sort(-1).values, choice.topk(2, -1).indices.sort(-1).values)
    # Weights = UNBIASED scores of the chosen experts, normalised, times the scaling factor.
    s = scores.gather(1, idx)
    torch.testing.assert_close(w, s / (s.sum(-1, keepdim=True) + 1e-20) * 2.446, rtol=0, atol=1e-15)

    # A bias change flips which experts fire: push expert 5 far up -> every token picks it.
    before = idx.clone()
    with torch.no_grad():
        router.e_score_correction_bias[5] = 10.0
    _, idx2, w2 = router(x)
    assert bool((idx2 == 5).any(-1).all())
    assert not bool((before == 5).any(-1).all())
    # ... and the bias still does not enter the weights: same selection -> same weights as the unbiased formula.
    s2 = scores.gather(1, idx2)
    torch.testing.assert_close(w2, s2 / s2.sum(-1, keepdim=True) * 2.446, rtol=0, atol=1e-15)
    # A uniform shift of the bias changes nothing at all (neither selection nor weights).
    with torch.no_grad():
        router.e_score_correction_bias.add_(3.0)
    _, idx3, w3 = router(x)
    assert torch.equal(idx3, idx2) and torch.equal(w3, w2)


def test_norm_topk_prob_false_keeps_raw_scores() -> None:
    moe = _moe(norm_topk_prob=False)
    x = torch.randn(10, D, dtype=torch.float64)
    scores, _ = _manual_route(moe.gate, x)
    _, idx, w = moe.gate(x)
    torch.testing.assert_close(w, scores.gather(1, idx) * 2.446, rtol=0, atol=1e-15)


def test_group_limited_selection_stays_in_kept_groups() -> None:
    e, groups, keep, k = 16, 4, 2, 3
    moe = _moe(n_routed_experts=e, n_group=groups, topk_group=keep, num_experts_per_tok=k)
    x = torch.randn(300, D, dtype=torch.float64)
    _, choice = _manual_route(moe.gate, x)
    group_score = choice.view(-1, groups, e // groups).topk(2, -1).values.sum(-1)  # (N, G) sum of top-2 per group
    kept = group_score.topk(keep, -1).indices  # (N, keep)
    _, idx, _ = moe.gate(x)
    idx_group = idx // (e // groups)  # (N, K) group of each chosen expert
    assert bool((idx_group[:, :, None] == kept[:, None, :]).any(-1).all()), "an expert outside the kept groups fired"
    # Within the kept groups the choice is the plain top-k.
    masked = choice.clone()
    allowed = torch.zeros(len(x), groups, dtype=torch.bool).scatter_(1, kept, True).repeat_interleave(e // groups, -1)
    masked[~allowed] = float("-inf")
    assert torch.equal(idx.sort(-1).values, masked.topk(k, -1).indices.sort(-1).values)
    # The test is meaningful: ungrouped top-k would have picked an expert outside the kept groups for some tokens.
    free = choice.topk(k, -1).indices // (e // groups)
    assert not bool((free[:, :, None] == kept[:, None, :]).any(-1).all())


def test_router_rejects_unusable_groups() -> None:
    with pytest.raises(ValueError, match="expert per group"):
        KimiVLMoE(_cfg(n_routed_experts=4, n_group=4, topk_group=2))


# ------------------------------------------------------------------------------------------------------------------
# aux loss
# ------------------------------------------------------------------------------------------------------------------
def test_aux_loss_hand_computed() -> None:
    # E = 4 experts, K = 2, one sequence of T = 3 tokens (+ one padding token that must not count).
    scores = torch.tensor([[0.8, 0.4, 0.2, 0.6],
                           [0.1, 0.9, 0.5, 0.5],
                           [0.3, 0.3, 0.7, 0.7],
                           [0.9, 0.9, 0.9, 0.9]], dtype=torch.float64)
    idx = torch.tensor([[0, 3], [1, 2], [2, 3], [0, 1]])
    seg = torch.tensor([0, 0, 0, -1])
    # f_i = E/(K T) * count_i = 4/6 * [1, 1, 2, 2]      (token 0 -> 0, 3; token 1 -> 1, 2; token 2 -> 2, 3)
    # P_i = mean_t s_it / sum_j s_jt; every real row sums to 2.0: P = [1.2, 1.6, 1.4, 1.8] / 2 / 3
    # L = alpha * sum_i f_i P_i = 0.01 * 4/6 * (1.2 + 1.6 + 2 * 1.4 + 2 * 1.8) / 6 = 0.01 * 4/6 * 9.2/6
    expected = 0.01 * 4 / 6 * 9.2 / 6
    got = sequence_aux_loss(scores, idx, seg, 1, alpha=0.01)
    assert got.item() == pytest.approx(expected, abs=1e-16)
    # Two segments: the sum of each alone.
    seg2 = torch.tensor([0, 1, 1, 0])
    a = sequence_aux_loss(scores[[0, 3]], idx[[0, 3]], torch.zeros(2, dtype=torch.long), 1, 0.01)
    b = sequence_aux_loss(scores[[1, 2]], idx[[1, 2]], torch.zeros(2, dtype=torch.long), 1, 0.01)
    assert sequence_aux_loss(scores, idx, seg2, 2, 0.01).item() == pytest.approx((a + b).item(), abs=1e-16)


def test_moe_aux_matches_formula_and_is_per_sequence() -> None:
    moe = _moe().train()
    xa, xb = torch.randn(5, D, dtype=torch.float64), torch.randn(7, D, dtype=torch.float64)
    _, aux_a = moe(xa, torch.zeros(5, dtype=torch.long), 1)
    _, aux_b = moe(xb, torch.zeros(7, dtype=torch.long), 1)
    packed = torch.cat([xa, xb])
    seg = torch.tensor([0] * 5 + [1] * 7)
    out, aux = moe(packed, seg, 2)
    torch.testing.assert_close(aux, aux_a + aux_b, rtol=0, atol=1e-16)
    # Padding tokens (segment -1) change neither the aux loss nor the load.
    junk = torch.randn(4, D, dtype=torch.float64)
    _, aux_pad = moe(torch.cat([packed, junk]), torch.cat([seg, torch.full((4,), -1)]), 2)
    torch.testing.assert_close(aux_pad, aux, rtol=0, atol=1e-16)
    assert int(moe.last_expert_load.sum()) == 12 * 2
    # The module's value is the paper's formula on its own router outputs.
    scores, idx, _ = moe.gate(xa)
    e, k, t = 8, 2, 5
    f = torch.bincount(idx.reshape(-1), minlength=e).double() * e / (k * t)
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    torch.testing.assert_close(aux_a, 0.01 * (f * p).sum(), rtol=0, atol=1e-16)
    # The gradient of the aux loss reaches the router weight.
    aux.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_aux_zero_and_connected_when_off() -> None:
    for moe in (_moe(aux_loss_alpha=0.0).train(), _moe().eval()):
        x = torch.randn(6, D, dtype=torch.float64)
        out, aux = moe(x, torch.zeros(6, dtype=torch.long), 1)
        assert aux.item() == 0.0 and aux.dim() == 0
        assert aux.requires_grad  # connected to the graph
        (out.sum() * 0 + aux).backward()
        assert torch.count_nonzero(moe.gate.weight.grad) == 0


def test_seq_aux_false_fails_loudly() -> None:
    moe = _moe(seq_aux=False).train()
    with pytest.raises(NotImplementedError, match="seq_aux"):
        moe(torch.randn(3, D, dtype=torch.float64), torch.zeros(3, dtype=torch.long), 1)


# ------------------------------------------------------------------------------------------------------------------
# expert compute
# ------------------------------------------------------------------------------------------------------------------
def _dense_reference(moe: KimiVLMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, multiplied by a masked routing weight (0 where not chosen)."""
    _, idx, w = moe.gate(x)
    dense_w = torch.zeros(x.shape[0], moe.num_experts, dtype=w.dtype).scatter_(1, idx, w)  # (N, E)
    out = moe.shared_experts(x)
    for e, expert in enumerate(moe.experts):
        out = out + (expert(x) * dense_w[:, e : e + 1]).to(x.dtype)
    return out


def test_grouped_dispatch_equals_dense_reference() -> None:
    moe = _moe().eval()
    x = torch.randn(50, D, dtype=torch.float64, requires_grad=True)
    out, _ = moe(x)
    ref = _dense_reference(moe, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *moe.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [x, *moe.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_every_expert_in_graph_zero_grad_when_unused() -> None:
    moe = _moe().train()
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([5.0, 5.0] + [-5.0] * 6, dtype=torch.float64))
    out, aux = moe(torch.randn(10, D, dtype=torch.float64), torch.zeros(10, dtype=torch.long), 1)
    (out.square().sum() + aux).backward()
    assert moe.last_expert_load.tolist() == [10, 10, 0, 0, 0, 0, 0, 0]
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
        used = not name.startswith("experts.") or name.split(".")[1] in ("0", "1")
        assert (p.grad.abs().sum() > 0) == used, name


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without grouped_mm")
def test_grouped_mm_matches_loop_fp32() -> None:
    moe = _moe(torch.float32).train()
    x = torch.randn(64, D, requires_grad=True)
    seg = torch.zeros(64, dtype=torch.long)
    outs, grads = [], []
    for backend in ("loop", "grouped_mm"):
        moe.expert_backend = backend
        moe.zero_grad()
        out, aux = moe(x, seg, 1)
        gx, *gp = torch.autograd.grad(out.square().sum() + aux, [x, *moe.parameters()])
        outs.append(out)
        grads.append([gx, *gp])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_grouped_mm_refuses_what_it_cannot_run() -> None:
    moe = _moe(torch.float64)
    moe.expert_backend = "grouped_mm"
    with pytest.raises(RuntimeError, match="fp32/bf16/fp16"):
        moe(torch.randn(4, D, dtype=torch.float64))
    moe.expert_backend = "fast"
    with pytest.raises(ValueError, match="unknown expert_backend"):
        moe(torch.randn(4, D, dtype=torch.float64))


def test_peft_lora_wraps_experts_and_trains_them() -> None:
    peft = pytest.importorskip("peft")
    moe = _moe(torch.float32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*experts\.\d+\.(gate_proj|up_proj|down_proj)",
                           init_lora_weights=False)
    model = peft.get_peft_model(moe, lora)
    wrapped = [n for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))
               and hasattr(m, "lora_A")]
    assert len(wrapped) == 8 * 3  # every routed expert projection, not the shared experts
    inner = model.base_model.model
    x = torch.randn(40, D)
    out, _ = inner(x, torch.zeros(40, dtype=torch.long), 1)
    merged_ref = _moe(torch.float32)  # the LoRA changes the output: compare against the same base without adapters
    merged_ref.load_state_dict({k.replace("base_layer.", ""): v for k, v in inner.state_dict().items()
                                if "lora_" not in k})
    assert not torch.allclose(out, merged_ref(x)[0])
    out.square().sum().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora_grads) == 8 * 3 * 2 and all(g is not None for g in lora_grads)
    inner.expert_backend = "grouped_mm"  # stacking .weight would skip the adapters: refused
    with pytest.raises(RuntimeError, match="LoRA|plain nn.Linear"):
        inner(x)


# ------------------------------------------------------------------------------------------------------------------
# dtypes, load, bias update
# ------------------------------------------------------------------------------------------------------------------
def test_router_stays_fp32_under_bf16_and_bias_gets_no_grad() -> None:
    moe = _moe(torch.float32)
    w32 = moe.gate.weight.detach().clone()
    b32 = moe.gate.e_score_correction_bias.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.bfloat16(), lambda m: m.half().to(torch.bfloat16)):
        cast(moe)
        assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(moe.gate.weight.detach(), w32) and torch.equal(moe.gate.e_score_correction_bias, b32)
        assert moe.experts[0].gate_proj.weight.dtype == torch.bfloat16
    assert "e_score_correction_bias" in moe.gate.state_dict() and not moe.gate.e_score_correction_bias.requires_grad
    assert "e_score_correction_bias" not in dict(moe.named_parameters())
    moe.train()
    x = torch.randn(12, D, dtype=torch.bfloat16)
    out, aux = moe(x, torch.zeros(12, dtype=torch.long), 1)
    assert out.dtype == torch.bfloat16 and aux.dtype == torch.float32
    (out.float().square().sum() + aux).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.dtype == torch.float32
    assert moe.gate.e_score_correction_bias.grad is None
    moe.double()  # fp64 casts apply (exact fp64 tests)
    assert moe.gate.weight.dtype == torch.float64


def test_update_router_bias_sign_rule() -> None:
    moe = _moe().train()
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
    x = torch.randn(30, D, dtype=torch.float64)
    moe(x, torch.zeros(30, dtype=torch.long), 1)
    load1 = moe.last_expert_load.clone()
    moe(x[:10], torch.zeros(10, dtype=torch.long), 1)
    load = load1 + moe.last_expert_load
    moe.eval()
    moe(torch.randn(50, D, dtype=torch.float64))  # eval forwards are not accumulated
    sign = moe.update_router_bias(0.01)
    expected = torch.sign(load.double().mean() - load.double())
    assert torch.equal(sign, expected)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, 0.01 * expected, rtol=0, atol=0)
    assert (expected > 0).any() and (expected < 0).any()
    # The accumulator was reset: a second call without new training tokens does nothing.
    assert torch.count_nonzero(moe.update_router_bias(0.01)) == 0
    torch.testing.assert_close(moe.gate.e_score_correction_bias, 0.01 * expected, rtol=0, atol=0)
