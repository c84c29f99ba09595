"""The Kimi-VL language model: a DeepSeek-V3 decoder (MLA attention, dense first layer, then MoE layers).

Attribute names equal the checkpoint keys under ``language_model.`` (shared/reference/kimi_vl.md)::

    language_model.model.embed_tokens                         KimiVLTextModel.embed_tokens
    language_model.model.layers.N.input_layernorm             KimiVLDecoderLayer (RMSNorm, rms_norm_eps)
    language_model.model.layers.N.self_attn.*                 KimiVLAttention (attention.py)
    language_model.model.layers.N.post_attention_layernorm
    language_model.model.layers.N.mlp.*                       KimiVLMLP (dense layers) or KimiVLMoE (moe.py)
    language_model.model.norm
    language_model.lm_head                                    untied

Two layouts go through ONE stack of layers (:meth:`KimiVLTextModel._run_layers`):

* padded reference ``forward``: ``(B, T, D)`` + ``attention_mask (B, T)``; the sequences are the rows (padding gets
  segment id -1 and is left out of the MoE aux loss and expert load);
* packed ``forward_varlen``: ``(N, D)`` + ``cu_seqlens (S+1,)``; the sequences are the segments::

      tokens        a0 a1 a2 | b0 b1 | pad pad     N = 7
      cu_seqlens    0 3 5 7                        S = 3 (padding up to the buffer is a segment of its own)
      position_ids  0 1 2 0 1 0 1
      segment_ids   0 0 0 1 1 2 2                  which sequence each token is in (MoE aux loss per sequence);
                    0 0 0 1 1 -1 -1                with num_padding=2: the padding leaves the aux loss and the load

The attention module picks the layout from its inputs (``attention_mask`` vs ``cu_seqlens``; ``apply_rmpad`` installs
``forward_varlen`` as ``forward`` on each instance); the MLP and MoE work on flattened tokens either way. Every forward
returns ``aux_sum``, the SUM over sequences and layers of the per-sequence MoE balance loss (the caller normalises).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import KimiVLAttention, KimiVLRMSNorm, compute_dtype
from .configuration import KimiVLTextConfig
from .moe import KimiVLMLP, KimiVLMoE, KimiVLTopkRouter

__all__ = ["KimiVLRMSNorm", "KimiVLMLP", "KimiVLDecoderLayer", "KimiVLTextModel", "KimiVLLanguageModel",
           "init_decoder_weights"]


@torch.no_grad()
def init_decoder_weights(module: nn.Module, std: float, padding_idx: int | None = None) -> None:
    """Deterministic (under ``torch.manual_seed``) initialisation of every parameter below ``module``.

    Linear and Embedding weights and the router weight ~ N(0, std), Linear biases 0, the embedding's padding row 0,
    RMSNorm weights 1, router correction bias 0. Modules are visited in registration order.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if padding_idx is not None:
                m.weight[padding_idx].zero_()
        elif isinstance(m, KimiVLRMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, KimiVLTopkRouter):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            m.e_score_correction_bias.zero_()


class KimiVLDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + self_attn(input_layernorm(x))``, ``out = h + mlp(post_attention_layernorm(h))``."""

    def __init__(self, config: KimiVLTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.self_attn = KimiVLAttention(config, layer_idx)
        self.mlp: nn.Module = (KimiVLMoE(config) if self.is_moe
                               else KimiVLMLP(config.hidden_size, config.intermediate_size))
        self.input_layernorm = KimiVLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = KimiVLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        num_segments: int,
        **attn_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer on either layout.

        Args:
            hidden_states: (B, T, D) padded or (N, D) packed.
            position_ids: (B, T) or (N,).
            segment_ids: (B*T,) or (N,) long, the sequence of each token (-1 = padding), for the MoE aux loss.
            num_segments: S, the number of sequences.
            **attn_kwargs: passed untouched to ``self_attn``: ``attention_mask`` (padded) or ``cu_seqlens`` and
                ``max_seqlen`` (packed).

        Returns:
            (hidden_states of the input's shape, aux_sum 0-dim: this layer's summed per-sequence aux loss, 0 if dense).
        """
        residual = hidden_states
        h = self.self_attn(self.input_layernorm(hidden_states), position_ids=position_ids, **attn_kwargs)
        h = residual + h
        x = self.post_attention_layernorm(h).reshape(-1, h.shape[-1])  # (B, T, D) or (N, D) -> (N, D)
        if self.is_moe:
            y, aux = self.mlp(x, segment_ids, num_segments)
        else:
            y = self.mlp(x)
            aux = h.new_zeros((), dtype=compute_dtype(h.dtype))
        return h + y.view(h.shape), aux  # (N, D) -> (B, T, D) or (N, D)


class KimiVLTextModel(nn.Module):
    """``language_model.model``: embeddings, decoder layers, final norm.

    Attributes:
        gradient_checkpointing: checkpoint layers (non-reentrant) that have a trainable parameter, when autograd records.
        checkpoint_every_k: with checkpointing on, checkpoint layers 0, k, 2k, ...
    """

    def __init__(self, config: KimiVLTextConfig) -> None:
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        self.padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=self.padding_idx)
        self.layers = nn.ModuleList([KimiVLDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = KimiVLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.checkpoint_every_k = 1
        self.init_weights()

    def init_weights(self, std: float | None = None) -> None:
        """Re-initialise every parameter (see :func:`init_decoder_weights`); std defaults to ``initializer_range``."""
        init_decoder_weights(self, self.config.initializer_range if std is None else std, self.padding_idx)

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("KimiVLTextModel: give exactly one of input_ids or inputs_embeds")
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    # ------------------------------------------------------------------------------------------------------------
    # the one stack of layers
    # ------------------------------------------------------------------------------------------------------------
    def _run_layers(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        num_segments: int,
        attn_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers then the final norm; activation checkpointing as configured. Returns (hidden, aux_sum)."""
        every_k = self.checkpoint_every_k if self.gradient_checkpointing else 0
        if self.gradient_checkpointing and every_k < 1:
            raise ValueError(f"KimiVLTextModel: checkpoint_every_k must be >= 1 with gradient checkpointing, got "
                             f"{every_k}")
        h = hidden_states
        aux_sum = h.new_zeros((), dtype=compute_dtype(h.dtype))
        for i, layer in enumerate(self.layers):
            use_ckpt = (every_k > 0 and i % every_k == 0 and torch.is_grad_enabled()
                        and any(p.requires_grad for p in layer.parameters()))
            if use_ckpt:
                h, aux = checkpoint(layer, h, position_ids, segment_ids, num_segments, use_reentrant=False,
                                    **attn_kwargs)
            else:
                h, aux = layer(h, position_ids, segment_ids, num_segments, **attn_kwargs)
            aux_sum = aux_sum + aux
        return self.norm(h), aux_sum

    # ------------------------------------------------------------------------------------------------------------
    # padded reference forward
    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        num_padding: int = 0,
        kv_cache: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded reference forward (a call with ``cu_seqlens`` is handed to :meth:`forward_varlen`).

        Args:
            input_ids: (B, T) or inputs_embeds: (B, T, D).
            attention_mask: (B, T) 1 = real token (None = all real). Each row is one sequence.
            position_ids: (B, T); default ``cumsum(attention_mask) - 1`` clamped at 0 (positions count real tokens),
                or with a kv_cache ``past + 0 .. past + T - 1``.
            cu_seqlens, max_seqlen, num_padding: a packed call, see :meth:`forward_varlen`.
            kv_cache: generation only (``vlmtune.models.kimi_vl.generation.MLAKVCache``): every attention layer
                appends the T new tokens to it and attends to all cached tokens. No padding, no autograd.

        Returns:
            (hidden (B, T, D) after the final norm, aux_sum 0-dim: the MoE aux loss summed over rows and layers).
        """
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("KimiVLTextModel: a packed call (cu_seqlens) takes no attention_mask")
            if kv_cache is not None:
                raise ValueError("KimiVLTextModel: a packed call (cu_seqlens) takes no kv_cache (it would mix samples)")
            return self.forward_varlen(inputs_embeds=inputs_embeds, position_ids=position_ids, cu_seqlens=cu_seqlens,
                                       max_seqlen=max_seqlen, input_ids=input_ids, num_padding=num_padding)
        if num_padding:
            raise ValueError("KimiVLTextModel: num_padding is for packed calls (cu_seqlens); a padded batch marks "
                             "padding with attention_mask")
        if kv_cache is not None and torch.is_grad_enabled():
            raise ValueError("KimiVLTextModel: kv_cache is for generation; run it under torch.no_grad() (a recomputed "
                             "checkpointed layer would append to the cache twice)")
        h = self._embed(input_ids, inputs_embeds)  # (B, T, D)
        if h.dim() != 3:
            raise ValueError(f"KimiVLTextModel.forward (padded) takes (B, T) ids or (B, T, D) embeddings, got "
                             f"{tuple(h.shape)}; packed tokens need cu_seqlens")
        b, t, _ = h.shape
        mask = torch.ones(b, t, dtype=torch.long, device=h.device) if attention_mask is None else attention_mask
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match the inputs (B, T) = {(b, t)}")
        if position_ids is None and kv_cache is not None:
            position_ids = kv_cache.get_seq_length() + torch.arange(t, device=h.device).expand(b, t)  # (B, T)
        if position_ids is None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        rows = torch.arange(b, device=h.device)[:, None].expand(b, t)  # (B, T) sequence = row
        segment_ids = torch.where(mask.bool(), rows, -1).reshape(-1)  # (B*T,), -1 on padding
        attn_kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        if kv_cache is not None:
            attn_kwargs["kv_cache"] = kv_cache
        return self._run_layers(h, position_ids, segment_ids, b, attn_kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # packed (varlen) forward
    # ------------------------------------------------------------------------------------------------------------
    def forward_varlen(
        self,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        input_ids: torch.Tensor | None = None,
        num_padding: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed forward: segments never see each other; positions restart per segment.

        Args:
            inputs_embeds: (N, D) packed embeddings (or (1, N, D)); or input_ids (N,) / (1, N).
            position_ids: (N,) or (1, N); default restarts at 0 at every segment start.
            cu_seqlens: (S+1,) int32 segment boundaries, ending at N.
            max_seqlen: the longest segment, host int (derived from cu_seqlens when None: one device sync).
            num_padding: trailing padding tokens of the buffer (``PackedBatch.num_padding``). They still run as a
                segment of their own, but get segment id -1: no MoE aux loss and no expert load from them.

        Returns:
            (hidden (N, D) after the final norm (or (1, N, D) for a (1, N, D) input), aux_sum 0-dim summed over the S
            segments and the layers).
        """
        if cu_seqlens is None:
            raise ValueError("KimiVLTextModel.forward_varlen needs cu_seqlens (S+1,) int32")
        h = self._embed(input_ids, inputs_embeds)
        batched = h.dim() == 3
        if batched:
            if h.shape[0] != 1:
                raise ValueError(f"a packed call takes (1, N, D) or (N, D) embeddings, got {tuple(h.shape)}")
            h = h[0]  # (1, N, D) -> (N, D)
        n = h.shape[0]
        cu = cu_seqlens.to(device=h.device, dtype=torch.int32)
        if int(cu[-1]) != n:
            raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but {n} packed tokens were given")
        num_segments = cu.numel() - 1
        segment_ids = torch.bucketize(torch.arange(n, device=h.device), cu[1:].long(), right=True)  # (N,)
        if not 0 <= num_padding <= n:
            raise ValueError(f"num_padding {num_padding} outside [0, {n}] (the packed tokens)")
        if num_padding:
            segment_ids[n - num_padding:] = -1  # trailing padding: left out of the aux loss and the expert load
        if position_ids is None:
            position_ids = torch.arange(n, device=h.device) - cu.long()[segment_ids]  # (N,)
        position_ids = position_ids.reshape(n)  # (1, N) -> (N,)
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max()) if num_segments else 0
        hidden, aux_sum = self._run_layers(h, position_ids, segment_ids, num_segments,
                                           {"cu_seqlens": cu, "max_seqlen": int(max_seqlen)})
        return (hidden[None] if batched else hidden), aux_sum

    # ------------------------------------------------------------------------------------------------------------
    # MoE bookkeeping
    # ------------------------------------------------------------------------------------------------------------
    def moe_layers(self) -> list[tuple[int, KimiVLMoE]]:
        """(layer index, MoE block) of every MoE layer."""
        return [(i, layer.mlp) for i, layer in enumerate(self.layers) if isinstance(layer.mlp, KimiVLMoE)]

    def expert_load(self) -> dict[str, float]:
        """Expert load of the last forward, for metrics: max/mean and min/mean token count per MoE layer.

        Returns:
            ``{"moe/load_max_over_mean/layer_{i}": .., "moe/load_min_over_mean/layer_{i}": .., "moe/load_max_over_mean":
            worst layer}``; empty before the first forward (1.0 = perfectly balanced).
        """
        out: dict[str, float] = {}
        worst = 0.0
        for i, moe in self.moe_layers():
            load = moe.last_expert_load
            if load is None or int(load.sum()) == 0:
                continue
            loadf = load.double()
            mean = float(loadf.mean())
            out[f"moe/load_max_over_mean/layer_{i}"] = float(loadf.max()) / mean
            out[f"moe/load_min_over_mean/layer_{i}"] = float(loadf.min()) / mean
            worst = max(worst, out[f"moe/load_max_over_mean/layer_{i}"])
        if out:
            out["moe/load_max_over_mean"] = worst
        return out

    def update_router_bias(self, rate: float) -> None:
        """Apply the aux-loss-free sign rule (:meth:`KimiVLMoE.update_router_bias`) in every MoE layer."""
        for _, moe in self.moe_layers():
            moe.update_router_bias(rate)


class KimiVLLanguageModel(nn.Module):
    """``language_model``: :class:`KimiVLTextModel` (``.model``) and the untied ``lm_head`` (D -> V, no bias)."""

    def __init__(self, config: KimiVLTextConfig) -> None:
        super().__init__()
        if config.tie_word_embeddings:
            raise NotImplementedError("tie_word_embeddings=true: Kimi-VL's lm_head is untied; vlmtune does not tie it")
        self.config = config
        self.model = KimiVLTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_decoder_weights(self.lm_head, config.initializer_range)

    def init_weights(self, std: float | None = None) -> None:
        """Re-initialise every parameter, deterministic under ``torch.manual_seed``."""
        std = self.config.initializer_range if std is None else std
        self.model.init_weights(std)
        init_decoder_weights(self.lm_head, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded forward for tests and evaluation: (B, T) ids -> (logits (B, T, V), aux_sum 0-dim)."""
        hidden, aux_sum = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.lm_head(hidden), aux_sum
