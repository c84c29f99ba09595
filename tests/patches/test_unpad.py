"""_unpad_input / pad_input: exact round trip, counts, gradients."""

from __future__ import annotations

import torch

from vlmtune.patches.rmpad import _unpad_input, pad_input


def test_unpad_pad_round_trip() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    x = torch.arange(3 * 4 * 2, dtype=torch.float64).view(3, 4, 2)
    rows, idx, cu, mx = _unpad_input(x, mask)
    assert rows.shape == (5, 2)
    assert idx.tolist() == [0, 1, 2, 4, 5]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 5]
    assert mx == 3 and isinstance(mx, int)
    back = pad_input(rows, idx, 3, 4)
    torch.testing.assert_close(back, x * mask[..., None])


def test_unpad_ids_and_grad_flows() -> None:
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    ids = torch.tensor([[9, 1, 2], [3, 4, 5]])
    rows, idx, cu, mx = _unpad_input(ids.unsqueeze(-1), mask)
    assert rows.squeeze(-1).tolist() == [1, 2, 3, 4, 5] and cu.tolist() == [0, 2, 5] and mx == 3
    h = torch.randn(5, 4, requires_grad=True)
    pad_input(h, idx, 2, 3).sum().backward()
    assert torch.equal(h.grad, torch.ones(5, 4))
