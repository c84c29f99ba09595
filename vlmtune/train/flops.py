"""A FLOP model of Kimi-VL training that counts the vision tower too (for MFU and the planner).

Training FLOPs = 3 x forward (backward is twice the forward). Forward FLOPs of a matmul with P parameters on one row
is 2P. Per pack::

    decoder   2 * active_params * N            active = attention + dense MLP + (router + shared + K experts) + lm_head
            + layers * sum_i 2 * L_i^2 * H * (Dqk + Dv) / 2   causal attention scores and values, half the square
    vision    2 * vision_params_per_patch * P + blocks * sum_images 2 * (h w)^2 * H * 2 Dh   full attention per image
    projector 2 * projector_params * P / 4
"""

from __future__ import annotations

from collections.abc import Sequence

from vlmtune.models.kimi_vl.configuration import KimiVLConfig


def decoder_active_params(config: KimiVLConfig) -> int:
    """Parameters a text token touches in one forward (embedding lookup excluded, lm_head included)."""
    t = config.text_config
    D, H = t.hidden_size, t.num_attention_heads
    if t.q_lora_rank is None:
        q = D * H * t.qk_head_dim
    else:
        q = D * t.q_lora_rank + t.q_lora_rank * H * t.qk_head_dim
    kv = D * (t.kv_lora_rank + t.qk_rope_head_dim) + t.kv_lora_rank * H * (t.qk_nope_head_dim + t.v_head_dim)
    attn = q + kv + H * t.v_head_dim * D
    total = 0
    for i in range(t.num_hidden_layers):
        if t.is_moe_layer(i):
            experts = t.num_experts_per_tok + (t.n_shared_experts or 0)
            mlp = experts * 3 * D * t.moe_intermediate_size + t.n_routed_experts * D
        else:
            mlp = 3 * D * t.intermediate_size
        total += attn + mlp
    return total + D * t.vocab_size


def vision_params_per_patch(config: KimiVLConfig) -> int:
    v = config.vision_config
    D = v.hidden_size
    block = 4 * D * D + 2 * D * v.intermediate_size
    return 3 * v.patch_size**2 * D + v.num_hidden_layers * block


def projector_params(config: KimiVLConfig) -> int:
    dv, dt = config.vision_config.hidden_size, config.text_config.hidden_size
    return 16 * dv * dv + 4 * dv * dt


def training_flops(config: KimiVLConfig, seqlens: Sequence[int], image_grid_hws: Sequence[Sequence[int]]) -> float:
    """FLOPs of one forward + backward over a pack (or a whole step: pass all its segments and images)."""
    t, v = config.text_config, config.vision_config
    n = sum(seqlens)
    fwd = 2.0 * decoder_active_params(config) * n
    fwd += t.num_hidden_layers * sum(2.0 * L * L * t.num_attention_heads * (t.qk_head_dim + t.v_head_dim) / 2
                                     for L in seqlens)
    patches = sum(h * w for h, w in image_grid_hws)
    fwd += 2.0 * vision_params_per_patch(config) * patches
    fwd += v.num_hidden_layers * sum(2.0 * (h * w) ** 2 * v.num_attention_heads * 2 * v.head_dim
                                     for h, w in image_grid_hws)
    fwd += 2.0 * projector_params(config) * patches / 4
    return 3.0 * fwd
