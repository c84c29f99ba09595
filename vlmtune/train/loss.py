"""The one definition of the language-model loss: label shift, reductions, chunked cross-entropy.

The model's ``.loss`` and the trainer both call these functions; nothing else computes a cross-entropy.

Reductions (``train.loss_reduction``), over every supervised token t of an optimizer step, t in sample s with n_s
supervised tokens, S samples in the step::

    token   sum_t l_t / sum_s n_s                      every token weighs the same (default)
    sample  sum_t l_t / n_s / S                        every sample weighs the same
    sqrt    sum_t l_t / sqrt(n_s) / sum_s sqrt(n_s)    in between: a sample weighs sqrt(n_s)

The denominators are over the WHOLE optimizer step (all micro-batches, all ranks), counted before the step, so the
gradient does not depend on how samples were packed or split across micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
REDUCTIONS = ("token", "sample", "sqrt")


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """HF alignment -> next-token targets: ``targets[t] = labels[t + 1]``; the last position of a row gets -100.

    Args:
        labels: (B, T) padded rows, or (1, N) / (N,) packed tokens.
        cu_seqlens: (S+1,) segment boundaries for a packed row. When given, the last token of every segment is also
            set to -100 so that no sample is ever trained to predict the next sample's first token, whatever the
            labels say (labels are already -100 on every sample's first token; this is the second guard).

    Returns:
        targets with the shape of ``labels``.
    """
    flat = labels.dim() == 1
    lab = labels[None] if flat else labels
    targets = torch.full_like(lab, IGNORE_INDEX)
    targets[:, :-1] = lab[:, 1:]
    if cu_seqlens is not None:
        if lab.shape[0] != 1:
            raise ValueError("cu_seqlens describes one packed row; labels must be (1, N) or (N,)")
        ends = cu_seqlens[1:].long() - 1
        ends = ends[ends >= 0]
        targets[0, ends] = IGNORE_INDEX
    return targets[0] if flat else targets


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) long: which segment each packed token belongs to."""
    return torch.bucketize(torch.arange(n, device=cu_seqlens.device), cu_seqlens[1:].long(), right=True)


@dataclass
class LossWeights:
    """Per-token loss weights of one micro-batch and the step-level quantities they were built from."""

    weights: torch.Tensor  # (N,) weight of each token's loss; 0 where not supervised
    supervised_tokens: int
    samples: int
    sqrt_sum: float


def count_supervision(targets: torch.Tensor, segment_ids: torch.Tensor) -> tuple[int, int, float]:
    """Supervised tokens, supervised samples and sum_s sqrt(n_s) of one micro-batch (for the step denominators).

    Args:
        targets: (N,) shifted targets. segment_ids: (N,) sample index of each token.
    """
    sup = targets != IGNORE_INDEX
    if not bool(sup.any()):
        return 0, 0, 0.0
    counts = torch.bincount(segment_ids[sup])
    counts = counts[counts > 0]
    return int(sup.sum()), int(counts.numel()), float(counts.double().sqrt().sum())


def token_weights(
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    reduction: str,
    denominators: tuple[int, int, float] | None = None,
) -> torch.Tensor:
    """Per-token weights so that ``sum_t w_t * l_t`` is this micro-batch's share of the step loss.

    Args:
        targets: (N,) shifted targets (-100 = not supervised).
        segment_ids: (N,) sample index of each token.
        reduction: token | sample | sqrt.
        denominators: (supervised tokens, samples, sum sqrt(n_s)) of the WHOLE optimizer step; None = this micro-batch
            alone (then the result is the plain mean of the call, as the model's ``.loss``).

    Returns:
        (N,) float64 weights (cast by the caller to the loss dtype).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    sup = targets != IGNORE_INDEX
    n_tok, n_samp, sqrt_sum = denominators if denominators is not None else count_supervision(targets, segment_ids)
    w = torch.zeros(targets.shape, dtype=torch.float64, device=targets.device)
    if n_tok == 0 or not bool(sup.any()):
        return w
    if reduction == "token":
        w[sup] = 1.0 / n_tok
        return w
    per_seg = torch.bincount(segment_ids[sup], minlength=int(segment_ids.max()) + 1).double()  # (S,)
    n_s = per_seg[segment_ids[sup]]  # (n_sup,) supervised tokens of each token's sample
    if reduction == "sample":
        w[sup] = 1.0 / (n_s * n_samp)
    else:
        w[sup] = 1.0 / (n_s.sqrt() * sqrt_sum)
    return w


def _ce_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()  # (n, V)
    dt = torch.promote_types(logits.dtype, torch.float32)
    nll = F.cross_entropy(logits.to(dt), targets, reduction="none")  # (n,)
    return (nll * w.to(dt)).sum()


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Weighted next-token cross-entropy without ever holding N x V logits.

    Only supervised positions are projected to the vocabulary, ``chunk_size`` rows at a time; each chunk is
    recomputed in backward (non-reentrant checkpoint), so at most one chunk of logits is alive.

    Args:
        hidden: (N, D) final hidden states. lm_head_weight: (V, D).
        targets: (N,) shifted targets, -100 where not supervised.
        weights: (N,) per-token weights (see :func:`token_weights`); None = plain sum.
        chunk_size: rows of logits computed at once.

    Returns:
        0-dim loss in promote_types(dtype, float32). With no supervised token: an exact zero that is still connected
        to ``hidden`` and ``lm_head_weight`` (every rank's graph stays connected, no hang).
    """
    sup = (targets != IGNORE_INDEX).nonzero(as_tuple=True)[0]  # (n_sup,)
    dt = torch.promote_types(hidden.dtype, torch.float32)
    if sup.numel() == 0:
        return (hidden.sum() * 0 + lm_head_weight.sum() * 0).to(dt)
    h = hidden.index_select(0, sup)  # (n_sup, D)
    t = targets.index_select(0, sup)
    w = weights.index_select(0, sup) if weights is not None else torch.ones_like(t, dtype=torch.float64)
    total = hidden.new_zeros((), dtype=dt)
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad):
            total = total + checkpoint(_ce_chunk, h[sl], lm_head_weight, t[sl], w[sl], use_reentrant=False)
        else:
            total = total + _ce_chunk(h[sl], lm_head_weight, t[sl], w[sl])
    return total
