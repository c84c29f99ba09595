"""The packed batch: the one structure that goes from the loader to the model.

A pack of three samples (two with an image) and one padding segment up to ``packing_length`` = 16::

    token        S  u  I  I  a  a  E | S  u  a  E | S  u  I  a  E | P
    input_ids    s  u  m  m  x  y  e | s  u  z  e | s  u  m  w  e | p      m = <|media_pad|>, p = [PAD]
    position_ids 0  1  2  3  4  5  6 | 0  1  2  3 | 0  1  2  3  4 | 0      restart at 0 in every segment
    labels       -  -  -  -  x  y  e | -  -  z  e | -  -  -  w  e | -      HF-aligned: the model shifts by one;
                                                                            -100 (-) on each segment's first token,
                                                                            on non-assistant tokens and on padding
    segment      0  0  0  0  0  0  0 | 1  1  1  1 | 2  2  2  2  2 | 3
    cu_seqlens   0 7 11 16 17   (S+1,) int32, padding is one more segment; max_seqlen = 7 (host int)
    images       image 0 -> tokens 2..3 of sample 0; image 1 -> token 2 of sample 2
                 pixel_values (P, 3, 14, 14) in that order, image_grid_hws (I, 2), P = sum h*w, tokens = sum h*w/4

Several packs in one micro-batch (``train.micro_batch_size`` > 1) are concatenated into one flat row: the model
only ever sees (1, N) plus segment boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class SampleTensors:
    """One tokenized sample, ready to pack.

    Attributes:
        input_ids: (L,) token ids from the chat template (image tokens already expanded).
        label_mask: (L,) True on supervised tokens (assistant content and its closing <|im_end|>).
        pixel_values: (P_i, 3, 14, 14) patches of the sample's images, or None.
        image_grid_hws: (I_i, 2) patch grid of each image, or None.
        sample_id: global id of the sample (for accounting and resume checks).
    """

    input_ids: np.ndarray | torch.Tensor | Sequence[int]
    label_mask: np.ndarray | torch.Tensor | Sequence[bool]
    pixel_values: torch.Tensor | None = None
    image_grid_hws: torch.Tensor | None = None
    sample_id: int = -1


@dataclass
class PackedBatch:
    """One flat packed batch (see the module docstring for the picture). Batch dimension 1 at the model boundary.

    Attributes:
        input_ids: (1, N) long. labels: (1, N) long. position_ids: (1, N) long.
        cu_seqlens: (S+1,) int32 segment boundaries (padding, when present, is the last segment).
        max_seqlen: longest segment, host int (no device sync per layer).
        pixel_values: (P, 3, 14, 14) or None. image_grid_hws: (I, 2) long or None.
        sample_ids: global ids of the real samples, in order (the padding segment has none).
        num_padding: padding tokens at the end.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pixel_values: torch.Tensor | None = None
    image_grid_hws: torch.Tensor | None = None
    sample_ids: list[int] = field(default_factory=list)
    num_padding: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def num_patches(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def num_supervised(self) -> int:
        """Supervised next-token targets (labels != -100; each is predicted from the previous position)."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def seqlens(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PackedBatch:
        """Move tensors to ``device``; ``dtype`` applies to pixel_values only."""
        pv = self.pixel_values
        if pv is not None:
            pv = pv.to(device=device, dtype=dtype or pv.dtype, non_blocking=True)
        return PackedBatch(
            input_ids=self.input_ids.to(device, non_blocking=True), labels=self.labels.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=True), max_seqlen=self.max_seqlen,
            pixel_values=pv,
            image_grid_hws=None if self.image_grid_hws is None else self.image_grid_hws.to(device),
            sample_ids=list(self.sample_ids), num_padding=self.num_padding)

    def to_model_inputs(self) -> dict[str, Any]:
        """Exactly the keyword arguments of the model's packed call (after ``apply_rmpad``)."""
        return dict(input_ids=self.input_ids, labels=self.labels, position_ids=self.position_ids,
                    cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen, pixel_values=self.pixel_values,
                    image_grid_hws=self.image_grid_hws, num_padding=self.num_padding)

    def to_padded(self) -> dict[str, Any]:
        """The same real samples as a padded 2-D batch for the reference forward (``model.rmpad: false``).

        Returns keyword arguments: input_ids (S, T), attention_mask (S, T), labels (S, T), pixel_values,
        image_grid_hws; one row per real sample (the padding segment is dropped), T = longest sample.
        """
        bounds = self.cu_seqlens.tolist()
        segs = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)][: self.num_samples]
        T = max(e - s for s, e in segs)
        S = len(segs)
        ids = torch.zeros(S, T, dtype=torch.long, device=self.input_ids.device)
        labels = torch.full((S, T), IGNORE_INDEX, dtype=torch.long, device=self.input_ids.device)
        mask = torch.zeros(S, T, dtype=torch.long, device=self.input_ids.device)
        for r, (s, e) in enumerate(segs):
            ids[r, : e - s] = self.input_ids[0, s:e]
            labels[r, : e - s] = self.labels[0, s:e]
            mask[r, : e - s] = 1
        return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=self.pixel_values,
                    image_grid_hws=self.image_grid_hws)

    def segment_ids(self) -> torch.Tensor:
        """(N,) index of the segment each token belongs to."""
        n = self.num_tokens
        return torch.bucketize(torch.arange(n, device=self.cu_seqlens.device), self.cu_seqlens[1:].long(), right=True)


def collate_samples(
    samples: Sequence[SampleTensors],
    pad_to: int | None = None,
    pad_token_id: int = 0,
) -> PackedBatch:
    """Concatenate samples into one :class:`PackedBatch`.

    Args:
        samples: the samples of one micro-batch (one or several packs), in order.
        pad_to: when set, append one padding segment so the batch holds exactly ``pad_to`` tokens
            (stable memory); error if the samples already exceed it.
        pad_token_id: id used for padding tokens (their labels are -100).
    """
    ids, labels, pos, lens = [], [], [], []
    pvs, grids, sample_ids = [], [], []
    for s in samples:
        x = torch.as_tensor(np.asarray(s.input_ids), dtype=torch.long).reshape(-1)  # (L,)
        m = torch.as_tensor(np.asarray(s.label_mask), dtype=torch.bool).reshape(-1)  # (L,)
        if x.numel() == 0:
            raise ValueError(f"sample {s.sample_id} has no tokens")
        if m.shape != x.shape:
            raise ValueError(f"sample {s.sample_id}: label_mask has {m.numel()} entries for {x.numel()} tokens")
        lab = torch.where(m, x, torch.full_like(x, IGNORE_INDEX))
        lab[0] = IGNORE_INDEX  # never train a sample's first token (it would be predicted from the previous sample)
        ids.append(x)
        labels.append(lab)
        pos.append(torch.arange(x.numel()))
        lens.append(x.numel())
        sample_ids.append(int(s.sample_id))
        if s.pixel_values is not None and s.pixel_values.numel():
            if s.image_grid_hws is None:
                raise ValueError(f"sample {s.sample_id}: pixel_values without image_grid_hws")
            g = torch.as_tensor(s.image_grid_hws, dtype=torch.long).reshape(-1, 2)
            if int(g.prod(-1).sum()) != s.pixel_values.shape[0]:
                raise ValueError(f"sample {s.sample_id}: image_grid_hws {g.tolist()} gives {int(g.prod(-1).sum())} "
                                 f"patches, pixel_values has {s.pixel_values.shape[0]}")
            pvs.append(s.pixel_values)
            grids.append(g)
    n = sum(lens)
    num_padding = 0
    if pad_to is not None:
        if n > pad_to:
            raise ValueError(f"packed samples hold {n} tokens, more than the buffer length {pad_to}")
        num_padding = pad_to - n
        if num_padding:
            ids.append(torch.full((num_padding,), pad_token_id, dtype=torch.long))
            labels.append(torch.full((num_padding,), IGNORE_INDEX, dtype=torch.long))
            pos.append(torch.arange(num_padding))
            lens.append(num_padding)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    return PackedBatch(
        input_ids=torch.cat(ids)[None], labels=torch.cat(labels)[None], position_ids=torch.cat(pos)[None],
        cu_seqlens=cu, max_seqlen=max(lens),
        pixel_values=torch.cat(pvs) if pvs else None, image_grid_hws=torch.cat(grids) if grids else None,
        sample_ids=sample_ids, num_padding=num_padding)
