"""Multi-head Latent Attention (MLA), the DeepSeek-V3 attention of the Kimi-VL decoder, plus its RMSNorm.

Attribute names equal the checkpoint keys under ``language_model.model.layers.N.self_attn.`` (shared/reference/kimi_vl.md).
The behaviour reproduced is DeepSeek-V3's ``DeepseekV3Attention`` (the published remote code, and transformers'
``models/deepseek_v3`` with ``rope_interleave=True``, our test oracle)::

    q      = q_proj(x)                                  or q_b_proj(q_a_layernorm(q_a_proj(x))) when q_lora_rank is set
             -> (.., H, Dnope + Drope) = [q_nope | q_rope]
    c, kr  = kv_a_proj_with_mqa(x) = [c_kv (kv_lora_rank) | k_rope (Drope, ONE head shared by all heads)]
    kv     = kv_b_proj(kv_a_layernorm(c))  -> (.., H, Dnope + Dv) = [k_nope | v]
    q_rope, k_rope rotated by RoPE (theta = rope_theta) at the token's position
    attn   = softmax(q . k / sqrt(Dnope + Drope)) v  with q = [q_nope | q_rope], k = [k_nope | k_rope]  (causal)
    out    = o_proj(attn)                           (.., H * Dv) -> (.., D)

RoPE dims are stored interleaved (pairs (2i, 2i+1) share frequency i): we de-interleave them into rotate-half halves
and rotate, which gives the same dot products as rotating the interleaved pairs in place (transformers'
``apply_rotary_pos_emb_interleave``, which also returns the de-interleaved layout).

Two forwards share :meth:`KimiVLAttention._project` (projections + RoPE):

* ``forward``: padded reference, hidden (B, T, D) + attention_mask (B, T), one dense SDPA with a causal and key-padding mask.
* ``forward_varlen``: packed tokens (N, D) + cu_seqlens, through :func:`vlmtune.ops.attention.varlen_attention` with
  ``self.attn_backend``. ``apply_rmpad`` installs it as ``forward`` on the instance.

Generation threads a KV cache through the padded ``forward`` (``kv_cache=``): MLA caches the compressed state, the
normalised latent ``c_kv`` (kv_lora_rank) and the rotated shared ``k_rope`` (Drope) per token and layer, 576 numbers
per token in A3B instead of H * (Dqk + Dv) = 5120 for expanded keys and values; each step re-expands them with
:meth:`KimiVLAttention._expand_kv`, the same code as training (see ``generation.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.ops.attention import varlen_attention

from .configuration import KimiVLTextConfig

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm class default, NOT rms_norm_eps


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision for norms, router, RoPE and softmax: ``promote_types(dtype, float32)`` (casts only go up)."""
    return torch.promote_types(dtype, torch.float32)


class KimiVLRMSNorm(nn.Module):
    """RMSNorm computed in ``promote_types(dtype, float32)``; key ``weight`` (DeepseekV3RMSNorm / LlamaRMSNorm).

    ``y = weight * x / sqrt(mean(x^2) + eps)``. The original normalises in fp32, casts back to the input dtype, then
    multiplies by the weight; we multiply in the compute dtype and cast once (identical in fp32/fp64; for bf16 inputs
    it rounds once instead of twice).
    """

    def __init__(self, hidden_size: int, eps: float = LATENT_NORM_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(compute_dtype(x.dtype), self.weight.dtype)
        h = x.to(ct)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(ct) * h).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rope_cos_sin(position_ids: torch.Tensor, rope_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the 1-D RoPE angles, computed on the fly from positions (no inv_freq buffer, no table).

    Args:
        position_ids: (...) integer positions (any leading shape: (B, T) or (N,)).
        rope_dim: Drope, even.
        theta: the RoPE base (``rope_theta``).
        dtype: the module dtype; angles are computed in ``promote_types(dtype, float32)``.

    Returns:
        (cos, sin), each (..., Drope/2): pair i rotates by ``position * theta ** (-2i / Drope)``.
    """
    ct = compute_dtype(dtype)
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=ct, device=position_ids.device) / rope_dim))
    angles = position_ids.to(ct)[..., None] * inv_freq  # (..., Drope/2)
    return angles.cos(), angles.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of ``x`` by angle i; output in de-interleaved (rotate-half) layout.

    Args:
        x: (..., Hx, Drope) with pairs interleaved, as stored in the checkpoint (Hx = H, or 1 for the shared k_rope).
        cos, sin: (..., Drope/2) from :func:`rope_cos_sin` (leading dims = x's without the head dim).

    Returns:
        (..., Hx, Drope) = [x_even * cos - x_odd * sin | x_odd * cos + x_even * sin], in x's dtype (rotation done in
        ``promote_types(x.dtype, cos.dtype)``).
    """
    ct = torch.promote_types(x.dtype, cos.dtype)
    x1, x2 = x[..., 0::2].to(ct), x[..., 1::2].to(ct)  # (..., Hx, Drope/2) each
    c, s = cos.unsqueeze(-2).to(ct), sin.unsqueeze(-2).to(ct)  # (..., 1, Drope/2)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)  # (..., Hx, Drope)


def _sdpa_dtype(x: torch.Tensor) -> torch.dtype:
    # CPU SDPA in bf16 is slow and inexact: softmax in at least fp32 there. CUDA kernels accumulate in fp32 already.
    return compute_dtype(x.dtype) if x.device.type == "cpu" else x.dtype


class KimiVLAttention(nn.Module):
    """MLA self-attention (``self_attn``). See the module docstring for the maths and the two forwards.

    Attributes:
        attn_backend: the varlen backend :meth:`forward_varlen` uses (``sdpa_varlen`` by default; ``apply_rmpad`` sets
            it from the recipe).
    """

    def __init__(self, config: KimiVLTextConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_theta = float(config.rope_theta)
        self.softmax_scale = self.qk_head_dim**-0.5  # rope_scaling (yarn mscale) is rejected by the config
        self.attn_backend = "sdpa_varlen"
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        d, h, bias = config.hidden_size, self.num_heads, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = KimiVLRMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = KimiVLRMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_head_dim, d, bias=bias)

    # ------------------------------------------------------------------------------------------------------------
    # shared projection + RoPE
    # ------------------------------------------------------------------------------------------------------------
    def _project_latent(self, x: torch.Tensor, position_ids: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (RoPE applied) and the compressed per-token key/value state MLA caches.

        Args:
            x: (..., D) hidden states, any leading shape ((B, T) or (N,)).
            position_ids: (...) the same leading shape.

        Returns:
            q (..., H, Dnope + Drope); c_kv (..., kv_lora_rank), the latent AFTER kv_a_layernorm; k_rope (..., Drope),
            the one shared rope key, rotated. All in x's dtype.
        """
        lead = x.shape[:-1]
        if tuple(position_ids.shape) != tuple(lead):
            raise ValueError(f"KimiVLAttention (layer {self.layer_idx}): position_ids {tuple(position_ids.shape)} do not "
                             f"match the hidden states' leading shape {tuple(lead)}")
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(*lead, self.num_heads, self.qk_head_dim)  # (..., H*Dqk) -> (..., H, Dqk)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)  # (..., H, Dnope|Drope)

        # (..., kv_lora_rank + Drope) -> latent c_kv (..., kv_lora_rank) and the shared k_rope (..., Drope)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)

        cos, sin = rope_cos_sin(position_ids, self.qk_rope_head_dim, self.rope_theta, x.dtype)  # (..., Drope/2)
        q_rope = apply_rope_interleaved(q_rope, cos, sin)  # (..., H, Drope)
        k_rope = apply_rope_interleaved(k_rope.unsqueeze(-2), cos, sin).squeeze(-2)  # (..., 1, Drope) -> (..., Drope)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (..., H, Dqk)
        return q, c_kv, k_rope

    def _expand_kv(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values from the latent state of :meth:`_project_latent` (or of a KV cache).

        Args:
            c_kv: (..., kv_lora_rank) normalised latent. k_rope: (..., Drope) rotated shared rope key.

        Returns:
            k (..., H, Dnope + Drope), v (..., H, Dv).
        """
        lead = c_kv.shape[:-1]
        kv = self.kv_b_proj(c_kv)
        kv = kv.view(*lead, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)  # (..., H, Dnope + Dv)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # (..., H, Dnope), (..., H, Dv)
        k_rope = k_rope.unsqueeze(-2).expand(*lead, self.num_heads, self.qk_rope_head_dim)  # (..., H, Drope): shared
        return torch.cat([k_nope, k_rope], dim=-1), v  # (..., H, Dqk), (..., H, Dv)

    def _project(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of every token, RoPE applied.

        Args:
            x: (..., D) hidden states, any leading shape ((B, T) or (N,)).
            position_ids: (...) the same leading shape.

        Returns:
            q (..., H, Dnope + Drope), k (..., H, Dnope + Drope), v (..., H, Dv), in x's dtype.
        """
        q, c_kv, k_rope = self._project_latent(x, position_ids)
        k, v = self._expand_kv(c_kv, k_rope)
        return q, k, v

    # ------------------------------------------------------------------------------------------------------------
    # padded reference path
    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Padded reference attention: one dense SDPA with a causal and key-padding mask.

        Args:
            hidden_states: (B, T, D).
            position_ids: (B, T).
            attention_mask: (B, T), 1 = real token, 0 = padding (any placement); None = all real.
            kv_cache: generation only (:class:`vlmtune.models.kimi_vl.generation.MLAKVCache`): the T new tokens'
                latents (c_kv, k_rope) are appended to the cache and the queries attend to every cached token
                (query i sits at cache position past + i). Needs attention_mask None (rows without padding).
            **kwargs: ``cu_seqlens`` and ``max_seqlen`` route an (N, D) call to :meth:`forward_varlen` (packed
                inputs can only be attended correctly by the varlen path); anything else is an error.

        Returns:
            (B, T, D). Padded query rows attend to themselves only, so they stay finite (their values are junk).
        """
        if "cu_seqlens" in kwargs:
            return self.forward_varlen(hidden_states, position_ids, **kwargs)
        if kwargs:
            raise TypeError(f"KimiVLAttention.forward got unexpected arguments {sorted(kwargs)}")
        if hidden_states.dim() != 3:
            raise ValueError(f"KimiVLAttention.forward (padded path) takes hidden_states (B, T, D), got "
                             f"{tuple(hidden_states.shape)}; packed (N, D) tokens need cu_seqlens (forward_varlen)")
        b, t, _ = hidden_states.shape
        past = 0
        if kv_cache is None:
            q, k, v = self._project(hidden_states, position_ids)  # (B, T, H, Dqk) x 2, (B, T, H, Dv)
        else:
            if attention_mask is not None:
                raise ValueError("KimiVLAttention.forward: a kv_cache takes rows without padding (attention_mask None)")
            q, c_kv, k_rope = self._project_latent(hidden_states, position_ids)  # (B, T, H, Dqk), (B, T, r), (B, T, Dr)
            past = kv_cache.get_seq_length(self.layer_idx)
            c_kv, k_rope = kv_cache.update(self.layer_idx, c_kv, k_rope)  # (B, past + T, r), (B, past + T, Drope)
            k, v = self._expand_kv(c_kv, k_rope)  # (B, past + T, H, Dqk), (B, past + T, H, Dv)
        dt = _sdpa_dtype(q)
        q, k, v = (z.transpose(1, 2).to(dt) for z in (q, k, v))  # (B, H, T, Dh); keys/values (B, H, past + T, Dh)
        if past:
            # new query i is cache position past + i: it sees keys 0 .. past + i
            visible = torch.arange(past + t, device=q.device)[None, :] <= past + torch.arange(t, device=q.device)[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.softmax_scale)  # (T, past+T)
        elif attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            if tuple(attention_mask.shape) != (b, t):
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match hidden states (B, T) = "
                                 f"{(b, t)}")
            idx = torch.arange(t, device=q.device)
            causal = idx[None, :] <= idx[:, None]  # (T, T) key j visible from query i
            mask = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, T)
            mask = mask | torch.eye(t, dtype=torch.bool, device=q.device)[None]  # a padded query sees itself: no NaN
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.softmax_scale)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.v_head_dim)  # (B, H, T, Dv) -> (B, T, H*Dv)
        return self.o_proj(out.to(hidden_states.dtype))

    # ------------------------------------------------------------------------------------------------------------
    # packed (varlen) path
    # ------------------------------------------------------------------------------------------------------------
    def forward_varlen(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Causal attention inside each packed segment; no token sees another segment.

        Args:
            hidden_states: (N, D) packed tokens.
            position_ids: (N,) restarting at 0 in every segment.
            cu_seqlens: (S+1,) int32 segment boundaries (required).
            max_seqlen: the longest segment, a host int (required).
            **kwargs: must be empty (an ``attention_mask`` here would mean a padded call on the packed path).

        Returns:
            (N, D).
        """
        if kwargs:
            raise TypeError(f"KimiVLAttention.forward_varlen got unexpected arguments {sorted(kwargs)} (the packed path "
                            "takes no attention_mask: padding is a segment of its own)")
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError("KimiVLAttention.forward_varlen needs cu_seqlens (S+1,) int32 and max_seqlen (host int)")
        if hidden_states.dim() != 2:
            raise ValueError(f"KimiVLAttention.forward_varlen takes hidden_states (N, D), got "
                             f"{tuple(hidden_states.shape)}")
        n = hidden_states.shape[0]
        q, k, v = self._project(hidden_states, position_ids)  # (N, H, Dqk) x 2, (N, H, Dv)
        out = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, int(max_seqlen), int(max_seqlen), causal=True,
                               softmax_scale=self.softmax_scale, backend=self.attn_backend)  # (N, H, Dv)
        return self.o_proj(out.reshape(n, self.num_heads * self.v_head_dim).to(hidden_states.dtype))  # (N, D)
