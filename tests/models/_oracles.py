"""Independent numerical oracles for the Kimi-VL parts, shared by the model tests.

* Vision tower + projector: transformers' ``Kimi_K25VisionModel`` + ``Kimi_K25MultimodalProjection`` (the same MoonViT
  and projector for still images).
* Language model: transformers' ``DeepseekV3ForCausalLM`` and its modules.
* Whole model: :func:`reference_vlm_logits` runs the two above on a state dict under the published Kimi-VL key names,
  merging the image features into the LM's input embeddings by hand (a plain loop over placeholder positions).

State dicts are mapped by hand, never through transformers' checkpoint conversion:

* vision: ``wqkv`` (3D, D) -> ``attn.{q,k,v}_proj``; q and k rows permuted per head from interleaved pairs (2j, 2j+1)
  to rotate-half halves (j, j + Dh/2): ``view(H, Dh/2, 2, ...).transpose(1, 2)``. The oracle's
  ``recomposition_frequencies`` puts ``w*f_i, h*f_i`` at rotate-half slot 2i, 2i+1, i.e. original pair 2i rotates with
  the column x: the same 2-D RoPE. norm0/norm1 -> norm1/norm2, mlp.fc0/fc1 -> mlp.fc1/fc2, wo -> attn.proj,
  pos_emb.weight -> pos_emb.position_embeddings, encoder.blocks -> layers, encoder.final_layernorm -> final_layernorm;
  projector linear_1/linear_2 -> in_proj/out_proj.
* decoder: our keys are the checkpoint keys (``language_model.`` stripped); the oracle stores the routed experts fused,
  ``experts.gate_up_proj (E, 2I, D)`` = per expert ``cat([gate_proj.weight, up_proj.weight])`` and
  ``experts.down_proj (E, D, I)``.

Both oracles compute a few steps in fp32 whatever the model dtype (vision: RoPE angles and rotation, bicubic tap
weights, the merge's index_add; decoder: RMSNorm, router logits, RoPE angles). :func:`lift_k25_to_fp64` and
:func:`lift_deepseek_to_fp64` swap exactly those casts for fp64 / ``promote_types(dtype, float32)`` (same formulas,
monkeypatched on the oracle classes), which shows that any residual is the oracle's rounding, not a behaviour change.

pytest runs with ``--import-mode=importlib``, so no test folder is on ``sys.path``; test files load this module with
``importlib.util.spec_from_file_location`` under the name ``vlmtune_tests_models_oracles``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

kimi_k25 = pytest.importorskip("transformers.models.kimi_k25.modeling_kimi_k25")
dsv3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
from transformers import DeepseekV3Config, vision_utils  # noqa: E402
from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config, Kimi_K25VisionConfig  # noqa: E402

from vlmtune.models.kimi_vl.configuration import KimiVLConfig, KimiVLTextConfig, MoonViTConfig  # noqa: E402

VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "multi_modal_projector."
LM_PREFIX = "language_model."


# ------------------------------------------------------------------------------------------------------------------
# vision tower + projector: transformers kimi_k25
# ------------------------------------------------------------------------------------------------------------------
def permute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """(D, ...) q or k rows: per head, interleaved pairs (2j, 2j+1) -> rotate-half positions (j, j + Dh/2)."""
    dh = w.shape[0] // heads
    return w.view(heads, dh // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (H, Dh/2, 2, ..) -> (D, ..)


def oracle_vision_state(state: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """Our MoonViT state dict (keys without ``vision_tower.``) -> Kimi_K25VisionModel's."""
    out = {}
    for key, value in state.items():
        k = (key.replace("encoder.blocks.", "layers.").replace("encoder.final_layernorm", "final_layernorm")
             .replace("pos_emb.weight", "pos_emb.position_embeddings"))
        if ".wqkv." in k:
            base, suffix = k.split(".wqkv.")
            q, kk, v = value.chunk(3, dim=0)  # (3D, ...) -> 3 x (D, ...), [q | k | v]
            out[f"{base}.attn.q_proj.{suffix}"] = permute_rope_rows(q, heads)
            out[f"{base}.attn.k_proj.{suffix}"] = permute_rope_rows(kk, heads)
            out[f"{base}.attn.v_proj.{suffix}"] = v
            continue
        k = (k.replace(".wo.", ".attn.proj.").replace(".norm1.", ".norm2.").replace(".norm0.", ".norm1.")
             .replace("mlp.fc1.", "mlp.fc2.").replace("mlp.fc0.", "mlp.fc1."))
        out[k] = value
    return out


def oracle_projector_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our projector state dict (keys without ``multi_modal_projector.``) -> Kimi_K25MultimodalProjection's."""
    return {k.replace("linear_1", "in_proj").replace("linear_2", "out_proj"): v for k, v in state.items()}


def k25_vision_oracle(vcfg: MoonViTConfig, text_hidden: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Empty fp64 eval-mode (Kimi_K25VisionModel with sdpa attention, Kimi_K25MultimodalProjection) for ``vcfg``.

    Its non-flash sdpa path splits q/k/v by cu_seqlens and runs one SDPA per image (block-diagonal by construction)
    and keeps fp64 (its "eager" path computes the softmax in fp32).
    """
    o_vcfg = Kimi_K25VisionConfig(
        patch_size=vcfg.patch_size, pos_emb_height=vcfg.init_pos_emb_height, pos_emb_width=vcfg.init_pos_emb_width,
        num_attention_heads=vcfg.num_attention_heads, num_hidden_layers=vcfg.num_hidden_layers,
        hidden_size=vcfg.hidden_size, intermediate_size=vcfg.intermediate_size, hidden_act="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    o_vcfg._attn_implementation = "sdpa"
    cfg = Kimi_K25Config(vision_config=o_vcfg.to_dict(), projection_hidden_size=vcfg.hidden_size,
                         text_config={"model_type": "deepseek_v3", "hidden_size": text_hidden})
    o_vit = kimi_k25.Kimi_K25VisionModel(o_vcfg).double().eval()
    o_proj = kimi_k25.Kimi_K25MultimodalProjection(cfg).double().eval()
    assert o_vit.config._attn_implementation == "sdpa"
    return o_vit, o_proj


def k25_grid_thw(image_grid_hws: torch.Tensor) -> torch.Tensor:
    """(I, 2) still-image grids -> the oracle's (I, 3) ``grid_thw`` rows (1, h, w) (t = 1: zero temporal row)."""
    return torch.cat([torch.ones(len(image_grid_hws), 1, dtype=torch.long), image_grid_hws.long()], dim=1)


def lift_k25_to_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace kimi_k25's hard fp32 casts with fp64; the formulas are the oracle's own."""

    def rotary_forward(self, x, position_ids):  # oracle: position_ids.float() * inv_freq.float()
        spatial = self.config.hidden_size // self.config.num_attention_heads // 2
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float64) / spatial))
        freqs = position_ids[..., None].double() * inv_freq
        return self.recomposition_frequencies(freqs.cos()), self.recomposition_frequencies(freqs.sin())

    def apply_rope(q, k, cos, sin):  # oracle: q.float(), k.float()
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return q * cos + kimi_k25.rotate_half(q) * sin, k * cos + kimi_k25.rotate_half(k) * sin

    def taps(index, size, side, mode, align_corners, padding="border"):  # oracle: index.to(torch.float32)
        assert mode == "bicubic" and not align_corners
        src = (index.double() + 0.5) * side / size - 0.5
        floor = torch.floor(src)
        offsets = torch.arange(-1, 3)
        distance = (src[:, None] - floor[:, None] - offsets).abs()
        a = -0.75
        near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
        far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
        return (floor.long()[:, None] + offsets).clamp(0, side - 1), torch.where(distance <= 1, near, far)

    def temporal_merge(self, hidden_states, grid_thw, kh, kw, kwargs=None):  # oracle: index_add_ in fp32
        dest, weight, n = kimi_k25.get_vision_temporal_merge_index(grid_thw, kh, kw, kwargs=kwargs)
        out = hidden_states.new_zeros(n * kh * kw, hidden_states.shape[-1])
        out.index_add_(0, dest, hidden_states * weight[:, None].to(hidden_states.dtype))
        return out.view(n, kh * kw, -1)  # (P/4 * 4, D) -> (P/4, 4, D)

    monkeypatch.setattr(kimi_k25.Kimi_K25VisionRotaryEmbedding, "forward", rotary_forward)
    monkeypatch.setattr(kimi_k25, "apply_rotary_pos_emb_vision", apply_rope)
    monkeypatch.setattr(vision_utils, "_interpolation_axis_taps_weights", taps)
    monkeypatch.setattr(kimi_k25.Kimi_K25VisionModel, "temporal_merge", temporal_merge)


# ------------------------------------------------------------------------------------------------------------------
# language model: transformers DeepseekV3
# ------------------------------------------------------------------------------------------------------------------
def hf_deepseek_config(cfg: KimiVLTextConfig) -> DeepseekV3Config:
    """The DeepseekV3Config of our text config (sdpa attention, eager experts, interleaved rope dims)."""
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


def oracle_decoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our decoder state dict (``language_model.`` stripped) -> the oracle's: routed experts fused, rest unchanged."""
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


def lift_deepseek_to_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace DeepseekV3's fp32 casts (RMSNorm, router logits, RoPE angles) with ``promote_types(dtype, fp32)``."""
    monkeypatch.setattr(dsv3.DeepseekV3RMSNorm, "forward", _lifted_rmsnorm)
    monkeypatch.setattr(dsv3.DeepseekV3TopkRouter, "forward", _lifted_router)
    monkeypatch.setattr(dsv3.DeepseekV3RotaryEmbedding, "forward", _lifted_rotary)


# ------------------------------------------------------------------------------------------------------------------
# whole model
# ------------------------------------------------------------------------------------------------------------------
def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class ReferenceKimiVL:
    """kimi_k25 vision tower + projector feeding DeepseekV3ForCausalLM, from a published-layout state dict.

    Args:
        config: the Kimi-VL config the state dict belongs to.
        state: tensors under the published key names (``vision_tower.*``, ``multi_modal_projector.*``,
            ``language_model.*``; ``rotary_emb.inv_freq`` keys are skipped), any float dtype (cast to fp64).
    """

    def __init__(self, config: KimiVLConfig, state: dict[str, torch.Tensor]) -> None:
        state = {k: v.double() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        known = (VISION_PREFIX, PROJECTOR_PREFIX, LM_PREFIX)
        stray = [k for k in state if not k.startswith(known)]
        assert not stray, f"tensors outside the three published parts: {stray[:5]}"
        self.config = config
        vcfg = config.vision_config
        self.vit, self.proj = k25_vision_oracle(vcfg, config.text_config.hidden_size)
        self.vit.load_state_dict(oracle_vision_state(_strip(state, VISION_PREFIX), vcfg.num_attention_heads),
                                 strict=True)
        self.proj.load_state_dict(oracle_projector_state(_strip(state, PROJECTOR_PREFIX)), strict=True)
        self.lm = dsv3.DeepseekV3ForCausalLM(hf_deepseek_config(config.text_config)).double().eval()
        self.lm.load_state_dict(oracle_decoder_state(_strip(state, LM_PREFIX)), strict=True)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> torch.Tensor:
        """(P, 3, 14, 14) -> (P/4, D_text) projected image tokens, images in order."""
        out = self.vit(pixel_values.double(), k25_grid_thw(image_grid_hws))
        return self.proj(out.pooler_output).squeeze(1)  # (P/4, 1, D) -> (P/4, D)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
               image_grid_hws: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids (right or left padded) -> (B, T, V) logits; positions count real tokens from 0 in each row."""
        embeds = self.lm.get_input_embeddings()(input_ids).clone()  # (B, T, D)
        placeholder = self.config.media_placeholder_token_id
        if pixel_values is not None:
            feats = self.image_features(pixel_values, image_grid_hws)  # (L, D)
            row = 0
            for b in range(input_ids.shape[0]):  # placeholders in reading order take the feature rows in order
                for t in range(input_ids.shape[1]):
                    if int(input_ids[b, t]) == placeholder:
                        embeds[b, t] = feats[row]
                        row += 1
            assert row == feats.shape[0], (row, feats.shape[0])
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions).logits


def lift_all_to_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both oracles with their fp32 casts lifted."""
    lift_k25_to_fp64(monkeypatch)
    lift_deepseek_to_fp64(monkeypatch)


def describe(diffs: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3e}" if isinstance(v, float) else f"{k} {v}" for k, v in diffs.items())
