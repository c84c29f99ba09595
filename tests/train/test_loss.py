"""The one loss definition: label shift, reductions, chunked cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmtune.train.loss import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    count_supervision,
    segment_ids_from_cu_seqlens,
    shift_labels,
    token_weights,
)


def test_shift_labels_rows_and_segment_ends() -> None:
    labels = torch.tensor([[-100, 5, 6, -100, 7, 8]])
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    t = shift_labels(labels, cu)
    # position 2 (last of sample 0) would predict sample 1's first token: -100 already, and forced anyway.
    assert t.tolist() == [[5, 6, -100, 7, 8, -100]]
    # even if a caller forgot -100 on a sample's first token, the boundary is never supervised
    bad = torch.tensor([[-100, 5, 6, 99, 7, 8]])
    assert shift_labels(bad, cu).tolist() == [[5, 6, -100, 7, 8, -100]]
    assert shift_labels(torch.tensor([[1, 2, 3], [4, 5, 6]])).tolist() == [[2, 3, -100], [5, 6, -100]]


def test_segment_ids() -> None:
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    assert segment_ids_from_cu_seqlens(cu, 5).tolist() == [0, 0, 2, 2, 2]


def test_reductions_match_their_formulas() -> None:
    torch.manual_seed(0)
    targets = torch.tensor([1, 2, -100, 3, -100, 4, 5, 6, -100])
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    n_s = {0: 2, 1: 1, 2: 3}
    l = torch.rand(9, dtype=torch.float64)
    sup = targets != IGNORE_INDEX
    for red in ("token", "sample", "sqrt"):
        w = token_weights(targets, seg, red)
        got = float((w * l).sum())
        if red == "token":
            want = float(l[sup].sum() / sup.sum())
        elif red == "sample":
            want = sum(float(l[(seg == s) & sup].sum()) / n for s, n in n_s.items()) / 3
        else:
            want = sum(float(l[(seg == s) & sup].sum()) / math.sqrt(n) for s, n in n_s.items()) / sum(
                math.sqrt(n) for n in n_s.values())
        assert got == pytest.approx(want, rel=1e-12), red
    assert count_supervision(targets, seg) == (6, 3, pytest.approx(math.sqrt(2) + 1 + math.sqrt(3)))


def test_step_denominators_make_microbatch_split_invariant() -> None:
    """Two micro-batches weighted with the step's denominators sum to the loss of the whole step at once."""
    torch.manual_seed(1)
    targets = torch.tensor([1, 2, 3, -100, 4, 5, 6, 7, -100, 8])
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    l = torch.rand(10, dtype=torch.float64)
    for red in ("token", "sample", "sqrt"):
        whole = float((token_weights(targets, seg, red) * l).sum())
        den = count_supervision(targets, seg)
        a, b = slice(0, 5), slice(5, 10)
        parts = sum(float((token_weights(targets[s], seg[s], red, den) * l[s]).sum()) for s in (a, b))
        assert parts == pytest.approx(whole, rel=1e-12), red


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_ce_equals_full_ce_and_grads(chunk: int) -> None:
    torch.manual_seed(0)
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 17, (10,))
    t[[0, 4]] = IGNORE_INDEX
    got = chunked_cross_entropy(h, w, t, None, chunk_size=chunk) / 8
    want = F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(got, (h, w))
    g2 = torch.autograd.grad(want, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_no_supervised_token_is_exact_zero_and_connected() -> None:
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    loss = chunked_cross_entropy(h, w, torch.full((4,), IGNORE_INDEX))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert h.grad is not None and w.grad is not None
    assert h.grad.abs().sum().item() == 0.0


def test_bf16_loss_computed_in_fp32() -> None:
    h = torch.randn(6, 8, dtype=torch.bfloat16)
    w = torch.randn(5, 8, dtype=torch.bfloat16)
    t = torch.randint(0, 5, (6,))
    assert chunked_cross_entropy(h, w, t).dtype == torch.float32
