"""The packed batch contract: labels, positions, segments, padding, images."""

from __future__ import annotations

import pytest
import torch

from vlmtune.data.batch import IGNORE_INDEX, SampleTensors, collate_samples


def _s(ids, mask, sid, grid=None):
    pv = None
    if grid is not None:
        pv = torch.randn(sum(h * w for h, w in grid), 3, 14, 14)
        grid = torch.tensor(grid)
    return SampleTensors(ids, mask, pv, grid, sid)


def test_collate_matches_the_docstring_picture() -> None:
    a = _s([1, 2, 9, 3, 4], [0, 0, 0, 1, 1], 10, grid=[(2, 2)])
    b = _s([1, 2, 5, 6], [0, 0, 1, 1], 11)
    batch = collate_samples([a, b], pad_to=12, pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 9, 3, 4, 1, 2, 5, 6, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert batch.labels.tolist() == [[-100, -100, -100, 3, 4, -100, -100, 5, 6, -100, -100, -100]]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 5, 9, 12]
    assert batch.max_seqlen == 5 and isinstance(batch.max_seqlen, int)
    assert batch.sample_ids == [10, 11] and batch.num_padding == 3 and batch.num_supervised == 4
    assert batch.pixel_values.shape == (4, 3, 14, 14) and batch.image_grid_hws.tolist() == [[2, 2]]
    assert batch.segment_ids().tolist() == [0] * 5 + [1] * 4 + [2] * 3
    kw = batch.to_model_inputs()
    assert set(kw) == {"input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen", "pixel_values",
                       "image_grid_hws", "num_padding"}


def test_first_token_never_supervised_even_if_masked() -> None:
    batch = collate_samples([_s([7, 8], [1, 1], 0), _s([5, 6], [1, 1], 1)])
    assert batch.labels.tolist() == [[IGNORE_INDEX, 8, IGNORE_INDEX, 6]]
    assert batch.num_padding == 0 and batch.cu_seqlens.tolist() == [0, 2, 4]


def test_collate_errors() -> None:
    with pytest.raises(ValueError, match="more than the buffer length"):
        collate_samples([_s([1, 2, 3], [0, 1, 1], 0)], pad_to=2)
    with pytest.raises(ValueError, match="label_mask has 2 entries for 3 tokens"):
        collate_samples([_s([1, 2, 3], [0, 1], 0)])
    bad = _s([1, 2], [0, 1], 3, grid=[(2, 2)])
    bad.image_grid_hws = torch.tensor([[2, 4]])
    with pytest.raises(ValueError, match="gives 8 patches, pixel_values has 4"):
        collate_samples([bad])
