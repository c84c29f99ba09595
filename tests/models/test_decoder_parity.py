"""Decoder parity against transformers' DeepseekV3 (attention, MoE, decoder layer, full causal LM) + layout invariants.

The oracle is used as published (``attn_implementation="sdpa"``, ``experts_implementation="eager"``, ``rope_interleave``
True, eval mode: it computes no aux loss) on tiny random fp64 configs with randomised norms and router bias, covering
q_lora_rank null AND set, n_group 1 AND > 1 (topk_group < n_group).

State dicts are mapped by hand: our keys are the checkpoint keys (``language_model.`` stripped, as DeepseekV3ForCausalLM
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

import re

import pytest
import torch

dsv3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
from transformers import DeepseekV3Config  # noqa: E402

from vlmtune.models.kimi_vl.attention import KimiVLAttention  # noqa: E402
from vlmtune.models.kimi_vl.configuration import KimiVLTextConfig, kimi_vl_a3b, kimi_vl_tiny  # noqa: E402
from vlmtune.models.kimi_vl.decoder import KimiVLDecoderLayer, KimiVLLanguageModel  # noqa: E402
from vlmtune.models.kimi_vl.moe import KimiVLMoE  # noqa: E402

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


def _hf_config(cfg: KimiVLTextConfig) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_group, topk_group=cfg.topk_group, num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace, norm_topk_prob=cfg.norm_topk_prob,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rope_interleave=True,
        attention_bias=False, tie_word_embeddings=False, pad_token_id=cfg.pad_token_id, bos_token_id=1,
        eos_token_id=2, attn_implementation="sdpa", experts_implementation="eager")


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


def _oracle_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the oracle's: routed experts fused, every other key unchanged."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        m = re.match(r"^(|.*\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if m is None:
            out[key] = value
            continue
        experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
    for prefix, per_expert in experts.items():
        order = sorted(per_expert)
        out[f"{prefix}experts.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[e]["gate_proj"], per_expert[e]["up_proj"]]) for e in order])  # (E, 2I, D)
        out[f"{prefix}experts.down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in order])  # (E, D, I)
    return out


# ------------------------------------------------------------------------------------------------------------------
# the oracle's fp32 casts, lifted (same formulas in promote_types(dtype, float32))
# ------------------------------------------------------------------------------------------------------------------
def _lifted_rmsnorm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    ct = torch.promote_types(hidden_states.dtype, torch.float32)
    h = hidden_states.to(ct)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.to(hidden_states.dtype)


def _lifted_router(self, hidden_states: torch.Tensor):
    ct = torch.promote_types(hidden_states.dtype, torch.float32)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = torch.nn.functional.linear(hidden_states.to(ct), self.weight.to(ct))
    scores = router_logits.sigmoid()
    scores_for_choice = scores + self.e_score_correction_bias
    group_scores = scores_for_choice.view(-1, self.num_group, self.num_experts // self.num_group).topk(2, dim=-1)[0]
    group_idx = torch.topk(group_scores.sum(dim=-1), k=self.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores.sum(dim=-1)).scatter_(1, group_idx, 1)
    score_mask = (group_mask.unsqueeze(-1).expand(-1, self.num_group, self.num_experts // self.num_group)
                  .reshape(-1, self.num_experts))
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if self.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return router_logits, topk_weights * self.routed_scaling_factor, topk_indices


def _lifted_rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
    ct = torch.promote_types(x.dtype, torch.float32)
    dim = self.config.qk_rope_head_dim
    inv_freq = 1.0 / (self.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=ct) / dim))
    freqs = position_ids[..., None].to(ct) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@pytest.fixture(params=["published", "lifted"])
def oracle_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "lifted":
        monkeypatch.setattr(dsv3.DeepseekV3RMSNorm, "forward", _lifted_rmsnorm)
        monkeypatch.setattr(dsv3.DeepseekV3TopkRouter, "forward", _lifted_router)
        monkeypatch.setattr(dsv3.DeepseekV3RotaryEmbedding, "forward", _lifted_rotary)
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
