"""The DeepSeek-V3 mixture of experts of the Kimi-VL decoder: sigmoid router (noaux_tc), grouped experts, aux loss.

Attribute names equal the checkpoint keys under ``language_model.model.layers.N.mlp.`` (shared/reference/kimi_vl.md):
``gate.weight (E, D)``, ``gate.e_score_correction_bias (E,)`` (both float32 whatever the model dtype),
``experts.{e}.{gate_proj,up_proj,down_proj}.weight`` (one nn.Linear each, so peft LoRA can wrap them) and
``shared_experts.{gate_proj,up_proj,down_proj}.weight``.

Routing (DeepSeek-V3 ``noaux_tc``; transformers ``DeepseekV3TopkRouter`` is the test oracle), per token::

    s      = sigmoid(x @ gate.weight.T)                       (E,) in promote_types(dtype, float32)
    choice = s + e_score_correction_bias                      the bias only CHOOSES experts
    n_group > 1: group score = sum of the top-2 choice scores of each of the n_group groups; keep the topk_group best
                 groups, mask the other experts to -inf
    idx    = topk(choice, K)                                   (K,)
    w      = s[idx] / (sum s[idx] + 1e-20) * routed_scaling_factor   (unbiased scores; normalised if norm_topk_prob)
    y      = shared_experts(x) + sum_k w_k * experts[idx_k](x)

Routing trains as is (the original remote code asserts ``not self.training`` and its ports fall back to "greedy"
routing, which drops the bias: vlmtune does neither).

Expert compute is grouped, one call per expert over a contiguous slice, never a loop over tokens::

    topk_idx (N, K)    t0 -> e2 e0 | t1 -> e1 e2 | t2 -> e0 e1            N = 3 tokens, K = 2, E = 3
    pairs    (N*K,)    t0e2 t0e0 t1e1 t1e2 t2e0 t2e1                      flattened (token, k)
    sorted by expert   t0e0 t2e0 | t1e1 t2e1 | t0e2 t1e2                  stable argsort; counts (E,) = [2, 2, 2]
    gathered x         x0 x2     | x1 x2     | x0 x1                      (N*K, D), expert e owns one slice
    out (N, D)         zeros.index_add_(0, token_of_pair, w_pair * expert_out)

Every expert is called, also on an empty slice, so every expert parameter is in the graph (zero gradient when it got no
token): data-parallel ranks then always reduce the same set of gradients.

Backends for the expert compute (``KimiVLMoE.expert_backend``):

* ``loop`` (default): the ModuleList experts applied one by one; exact in every dtype, and wraps peft LoRA layers.
* ``grouped_mm``: ``torch.nn.functional.grouped_mm`` on the expert weights stacked from the ModuleList (fp32 / bf16 /
  fp16 only, row strides multiples of 16 bytes, plain nn.Linear experts; its CPU backward also rejects zero-stride
  output gradients, which this graph never produces). Measured on CPU (torch 2.13, one thread,
  ``benchmarks/moe_dispatch.py --sweep``, expert compute fwd+bwd): about 1.1x faster than the loop at D 256 / I 128,
  even at D 512 / I 256, and about 3x SLOWER at the A3B expert size (D 2048, I 1408, 512 tokens): re-stacking the
  3 x 64 expert weights every call (and splitting their gradients back) costs more than 64 matmul launches, and the
  stacked copy stays alive for backward. So ``loop`` is the default and grouped_mm is opt-in; requesting it where it
  cannot run is an error naming the reason, never a silent fallback. (A fused (E, I, D) parameter layout would remove
  the stacking, but peft LoRA could no longer wrap the experts and the checkpoint keys would change.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .configuration import KimiVLTextConfig

EXPERT_BACKENDS = ("loop", "grouped_mm")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class KimiVLMLP(nn.Module):
    """SwiGLU feed-forward ``down_proj(silu(gate_proj(x)) * up_proj(x))``: the dense MLP, each expert, shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D) in the module dtype."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class KimiVLTopkRouter(nn.Module):
    """``gate``: sigmoid scores, bias-corrected (group-limited) top-k selection, unbiased normalised weights.

    ``weight`` (E, D) and the ``e_score_correction_bias`` (E,) buffer are kept in at least float32: casting the model to
    bf16/fp16 leaves them fp32 (see :meth:`_apply`); casting it to fp64 makes them fp64 (exact fp64 tests). The bias
    is a persistent buffer: saved in the state dict, never given a gradient, moved only by
    :meth:`KimiVLMoE.update_router_bias`.
    """

    def __init__(self, config: KimiVLTextConfig) -> None:
        super().__init__()
        self.num_experts = int(config.n_routed_experts)
        self.top_k = int(config.num_experts_per_tok)
        self.n_group = int(config.n_group)
        self.topk_group = int(config.topk_group)
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise ValueError(f"n_group {self.n_group} leaves {self.num_experts // self.n_group} expert per group; "
                             "group-limited routing scores a group by its top-2 experts (need >= 2 per group)")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"num_experts_per_tok {self.top_k} exceeds the experts of the kept groups "
                             f"({self.topk_group} x {self.num_experts // self.n_group})")
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32))  # (E, D)
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))  # (E,)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:  # type: ignore[override]
        # model.to(bf16) / .half() / .bfloat16() must not round the router: keep >= fp32, converting from the
        # ORIGINAL tensor (not from the rounded one) so no precision is lost. Device moves and fp64 casts apply as asked.
        # ``keep_fp32 = False`` lets the router weight follow the model (ZeRO-3 flattens all parameters into one
        # buffer of one dtype; the optimizer then holds the fp32 master copy and routing still computes in fp32).
        keep = getattr(self, "keep_fp32", True)

        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if not keep and isinstance(t, nn.Parameter):
                return out
            if t.is_floating_point() and out.is_floating_point() and torch.finfo(out.dtype).bits < 32:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_fp32, recurse)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route every token.

        Args:
            x: (N, D) tokens, any float dtype.

        Returns:
            scores (N, E) sigmoid affinities, topk_idx (N, K) long, topk_weights (N, K); scores and weights in
            ``promote_types(x.dtype, float32, weight.dtype)``.
        """
        ct = torch.promote_types(_compute_dtype(x.dtype), self.weight.dtype)
        logits = F.linear(x.to(ct), self.weight.to(ct))  # (N, E)
        scores = logits.sigmoid()  # (N, E)
        choice = scores.detach() + self.e_score_correction_bias.to(ct)  # (N, E), selection only: no gradient
        if self.n_group > 1:
            n = x.shape[0]
            per_group = self.num_experts // self.n_group
            grouped = choice.view(n, self.n_group, per_group)  # (N, E) -> (N, G, E/G)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # (N, G)
            expert_mask = group_mask.repeat_interleave(per_group, dim=-1)  # (N, G) -> (N, E)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        topk_idx = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(1, topk_idx)  # (N, K) unbiased scores of the chosen experts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return scores, topk_idx, weights * self.routed_scaling_factor


def sequence_aux_loss(
    scores: torch.Tensor,
    topk_idx: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    alpha: float,
) -> torch.Tensor:
    """Sum over sequences of DeepSeek-V3's sequence-wise balance loss.

    DeepSeek-V3 technical report (arXiv:2412.19437), section 2.1.2 "Complementary Sequence-Wise Auxiliary Loss",
    eqs. (17)-(20), for each sequence of T tokens::

        L   = alpha * sum_i f_i * P_i
        f_i = E / (K * T) * #{tokens t of the sequence routed to expert i}
        P_i = 1/T * sum_t s'_{i,t},   s'_{i,t} = s_{i,t} / sum_j s_{j,t}   (sigmoid scores normalised per token)

    Choice documented: "routed to i" counts the experts actually selected (with the correction bias, as the training
    forward routes; DeepSeek's own MoEGate code also counts its ``topk_idx``), where the report's formula writes
    TopK of the unbiased scores. f is a count (no gradient); the gradient flows through P to the router weight.

    Args:
        scores: (N, E) sigmoid scores (with their graph).
        topk_idx: (N, K) selected experts.
        segment_ids: (N,) long, the sequence of each token; -1 = padding, excluded from every term.
        num_segments: S; segment ids are in [0, S).
        alpha: ``aux_loss_alpha``.

    Returns:
        0-dim sum over segments of the per-segment loss (an empty segment contributes 0), in scores' dtype.
    """
    n, e = scores.shape
    k = topk_idx.shape[1]
    valid = segment_ids >= 0  # (N,)
    seg = segment_ids[valid]  # (Nv,)
    tokens = torch.bincount(seg, minlength=num_segments).to(scores.dtype)  # (S,) T per segment
    pair_seg = seg.repeat_interleave(k)  # (Nv*K,) segment of each (token, k) pair
    pair_cell = pair_seg * e + topk_idx[valid].reshape(-1)  # (Nv*K,) flat (segment, expert) cell
    counts = torch.bincount(pair_cell, minlength=num_segments * e).view(num_segments, e).to(scores.dtype)  # (S, E)
    denom = tokens.clamp(min=1)[:, None]  # (S, 1); empty segments have zero counts and zero score sums anyway
    f = counts * (e / k) / denom  # (S, E)
    s_norm = scores[valid] / scores[valid].sum(-1, keepdim=True)  # (Nv, E)
    p = scores.new_zeros(num_segments, e).index_add(0, seg, s_norm) / denom  # (S, E)
    return alpha * (f * p).sum()


class KimiVLMoE(nn.Module):
    """``mlp`` of an MoE layer: router + routed experts (grouped dispatch) + shared experts + sequence aux loss.

    Attributes:
        expert_backend: ``loop`` (default) or ``grouped_mm`` (see the module docstring).
        last_expert_load: (E,) long, detached token counts per expert of the last forward (padding excluded).
    """

    def __init__(self, config: KimiVLTextConfig) -> None:
        super().__init__()
        self.num_experts = int(config.n_routed_experts)
        self.top_k = int(config.num_experts_per_tok)
        self.aux_loss_alpha = float(config.aux_loss_alpha)
        self.seq_aux = bool(config.seq_aux)
        self.expert_backend = "loop"
        self.gate = KimiVLTopkRouter(config)
        self.experts = nn.ModuleList([KimiVLMLP(config.hidden_size, config.moe_intermediate_size)
                                      for _ in range(self.num_experts)])
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = KimiVLMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self.last_expert_load: torch.Tensor | None = None
        # Load accumulated (training forwards only) since the last update_router_bias() call. A plain attribute, not
        # a buffer: a model built on the meta device and loaded with assign=True would keep a meta buffer.
        self._load_since_update: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------------------
    # expert compute
    # ------------------------------------------------------------------------------------------------------------
    def _grouped_mm_problem(self, x: torch.Tensor) -> str | None:
        """Why the grouped_mm backend cannot run on ``x``, or None when it can."""
        if not hasattr(F, "grouped_mm"):
            return "torch.nn.functional.grouped_mm does not exist in this torch"
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"grouped_mm supports fp32/bf16/fp16, not {x.dtype} (use expert_backend='loop', exact in any dtype)"
        for i, expert in enumerate(self.experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                if type(getattr(expert, name)) is not nn.Linear:
                    return (f"experts.{i}.{name} is a {type(getattr(expert, name)).__name__}, not a plain nn.Linear "
                            "(e.g. a LoRA wrapper): stacking its .weight would skip the adapter")
        size = x.element_size()
        d, inter = self.experts[0].gate_proj.in_features, self.experts[0].gate_proj.out_features
        if (d * size) % 16 or (inter * size) % 16:
            return f"grouped_mm needs row strides that are multiples of 16 bytes (D={d}, I={inter}, {x.dtype})"
        return None

    def _experts_loop(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(N*K, D) expert-sorted tokens -> (N*K, D): expert e applied once to its slice (also when empty)."""
        chunks = xs.split(counts)  # E slices (count_e, D), contiguous
        return torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])  # (N*K, D)

    def _experts_grouped_mm(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`_experts_loop` with three grouped matmuls over the stacked expert weights."""
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's slice
        w_gate = torch.stack([e.gate_proj.weight for e in self.experts])  # (E, I, D)
        w_up = torch.stack([e.up_proj.weight for e in self.experts])  # (E, I, D)
        w_down = torch.stack([e.down_proj.weight for e in self.experts])  # (E, D, I)
        h = F.silu(F.grouped_mm(xs, w_gate.transpose(1, 2), offs=offs)) * F.grouped_mm(
            xs, w_up.transpose(1, 2), offs=offs)  # (N*K, I)
        return F.grouped_mm(h, w_down.transpose(1, 2), offs=offs)  # (N*K, D)

    def routed_experts(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the chosen experts of every token, grouped by expert (see the module docstring).

        Args:
            x: (N, D) tokens in the module dtype.
            topk_idx: (N, K) long. topk_weights: (N, K) routing weights (>= fp32).

        Returns:
            (N, D) in x's dtype.
        """
        n, k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)  # (N*K,)
        sorted_expert, order = flat_expert.sort(stable=True)  # (N*K,) pairs grouped by expert
        token_of_pair = order // k  # (N*K,)
        counts = torch.bincount(sorted_expert, minlength=self.num_experts)  # (E,)
        xs = x.index_select(0, token_of_pair)  # (N*K, D) contiguous slice per expert
        if self.expert_backend == "loop":
            ys = self._experts_loop(xs, counts.tolist())
        elif self.expert_backend == "grouped_mm":
            problem = self._grouped_mm_problem(x)
            if problem is not None:
                raise RuntimeError(f"KimiVLMoE expert_backend='grouped_mm' cannot run: {problem}")
            ys = self._experts_grouped_mm(xs, counts)
        else:
            raise ValueError(f"unknown expert_backend {self.expert_backend!r}; choose one of {EXPERT_BACKENDS}")
        w = topk_weights.reshape(-1)[order]  # (N*K,) weight of each sorted pair
        ys = (ys.to(w.dtype) * w[:, None]).to(x.dtype)  # weighting in >= fp32, result in the module dtype
        return x.new_zeros(n, x.shape[-1]).index_add_(0, token_of_pair, ys)  # (N, D)

    # ------------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        num_segments: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared + routed experts, and the summed per-sequence aux loss.

        Args:
            hidden_states: (..., D), flattened to (N, D) internally.
            segment_ids: (N,) long, the sequence of each token (-1 = padding, left out of the aux loss and the load).
                None: each row of a (B, T, D) input is a sequence; an (N, D) input is one sequence.
            num_segments: S (required with segment_ids).

        Returns:
            (out (..., D), aux_sum): aux_sum is the SUM over sequences of the per-sequence aux loss (0-dim, >= fp32;
            the caller normalises), an exact zero still connected to the graph when not training or alpha == 0.
        """
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (..., D) -> (N, D)
        n = x.shape[0]
        if segment_ids is None:
            rows = shape[0] if len(shape) == 3 else 1
            segment_ids = torch.arange(rows, device=x.device).repeat_interleave(n // rows)  # (N,)
            num_segments = rows
        elif num_segments is None:
            raise ValueError("KimiVLMoE: segment_ids given without num_segments")
        if segment_ids.shape != (n,):
            raise ValueError(f"KimiVLMoE: segment_ids {tuple(segment_ids.shape)} for {n} tokens (expected ({n},))")

        scores, topk_idx, topk_weights = self.gate(x)  # (N, E), (N, K), (N, K)
        out = self.routed_experts(x, topk_idx, topk_weights)  # (N, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        with torch.no_grad():
            valid_idx = topk_idx[segment_ids >= 0]  # (Nv, K)
            load = torch.bincount(valid_idx.reshape(-1), minlength=self.num_experts)  # (E,)
            self.last_expert_load = load
            # Count once per optimizer-visible forward: not again when activation checkpointing recomputes this
            # forward inside backward (the autograd engine then runs a graph task).
            if self.training and torch._C._current_graph_task_id() == -1:
                acc = self._load_since_update
                self._load_since_update = load.clone() if acc is None else acc.to(load.device) + load

        if self.training and self.aux_loss_alpha > 0:
            if not self.seq_aux:
                raise NotImplementedError("KimiVLMoE: seq_aux=False (a batch-level aux loss) is not implemented; set "
                                          "text_config.seq_aux=true (Kimi-VL's value) or aux_loss_alpha=0")
            aux = sequence_aux_loss(scores, topk_idx, segment_ids, int(num_segments), self.aux_loss_alpha)
        else:
            aux = scores.sum() * 0.0  # exact zero, connected to the router's graph
        return out.view(shape), aux  # (N, D) -> (..., D)

    # ------------------------------------------------------------------------------------------------------------
    # aux-loss-free balancing
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_router_bias(self, rate: float) -> torch.Tensor:
        """DeepSeek-V3's sign rule on ``gate.e_score_correction_bias`` from the load accumulated since the last call.

        Each expert's bias moves by ``+rate`` when it received fewer tokens than the mean load, ``-rate`` when more,
        and stays when exactly at the mean (DeepSeek-V3 report, section 2.1.2, "Auxiliary-Loss-Free Load Balancing").
        Under torch.distributed the loads are summed over ranks first, so every rank applies the same update. The
        accumulator is then reset.

        Args:
            rate: the bias update speed (gamma in the report), >= 0.

        Returns:
            (E,) the applied sign (+1 under-loaded, -1 over-loaded, 0 balanced or nothing accumulated).
        """
        if rate < 0:
            raise ValueError(f"update_router_bias: rate must be >= 0, got {rate}")
        bias = self.gate.e_score_correction_bias
        acc = self._load_since_update
        load = torch.zeros(self.num_experts, dtype=torch.long, device=bias.device) if acc is None else acc.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every rank must apply the same update
        if int(load.sum()) == 0:
            return torch.zeros_like(bias)
        loadf = load.to(bias.dtype)
        sign = torch.sign(loadf.mean() - loadf)  # (E,) +1 under-loaded, -1 over-loaded
        bias.add_(rate * sign.to(bias.device))
        self._load_since_update = None
        return sign
