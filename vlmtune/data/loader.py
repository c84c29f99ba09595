"""The packed loader: packs -> optimizer steps of micro-batches, sharded over ranks, balanced, exactly resumable.

One optimizer step takes ``global_batch_size`` (G) packs. Every rank computes the same plan locally (no
collective): which packs form step k, and which rank and micro-step each of them goes to::

    pack stream      | p7 p2 p9 p0 p4 p6 p1 p8 | p5 p3 .. | ...      epoch e = permutation of the packs, seed + e
    step k           G consecutive packs of the stream (G = 8 here: micro 1 x world 2 x accum 4)
    assignment       out[r][j] = rank r's micro-batch j (`micro_batch_size` packs)
                     contiguous:  rank 0 <- p7 p2 p9 p0   rank 1 <- p4 p6 p1 p8      (balance=False)
                     balanced:    by `CostModel` cost, similar packs side by side in one micro-step (LPT over
                                  ranks), heaviest share to the least loaded rank, heaviest micro-step first
                                  (`assign_packs`)
    rank r           accum micro-batches, each = its packs concatenated by `collate_samples`

So the set of packs of step k does not depend on the world size, ranks take disjoint shares of it, and every
rank runs exactly accum = G / (micro x world) micro-batches per step. Because the plan is counted in global
steps, a run saved at step k resumes at step k on any world size with the same G.

Epoch tail (``tail``):
    "carry" (default)  the stream is the concatenation of the epochs' permutations; a step may straddle two
                       epochs, nothing is dropped. A step belongs to the epoch of its first pack, so epoch e has
                       ceil((e+1) N / G) - ceil(e N / G) steps (N packs per epoch).
    "drop"             each epoch's last N mod G packs (a different set every epoch) are left out; every epoch
                       has N // G steps. Needs N >= G.

Iteration: ``for micro_batches, info in loader:`` yields the rest of the current epoch, one optimizer step at a
time (this rank's `PackedBatch` list and a `StepInfo`); the next ``iter()`` continues with the next epoch. Breaking
out of the loop and iterating again continues with the first step not yet yielded.

At the start of an epoch the loader plans all of its remaining steps from metadata (pack ids, lengths, grids,
label-mask counts: no image) and hands this rank's micro-batches to a `torch.utils.data.DataLoader`, whose worker
processes (``num_workers``, restarted every epoch) open and process the images. Every micro-batch is a pure
function of its index in the plan, so 0 and 2 workers give identical batches, and workers hold no state to save. `state_dict()` records the first
step not yet yielded (and, for on-the-fly sources, the packer state at that point): `load_state_dict` resumes with
exactly the batches that were still to come.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlmtune.data.batch import PackedBatch, SampleTensors, collate_samples

STATE_FORMAT = "vlmtune-packed-loader"
STATE_VERSION = 1
TAIL_POLICIES = ("carry", "drop")


class LoaderError(ValueError):
    """A loader setting or a resume state that cannot work, with the fix in the message."""


# ----------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class SampleMeta:
    """What the main process knows about a sample without opening its images.

    Attributes:
        index: global sample index (row of the shards; `PackedBatch.sample_ids` entry).
        num_tokens: LM tokens, image tokens included.
        num_supervised: supervised next-token targets once packed (label mask minus its first token).
        grids: (h, w) patches of each image, in token order.
    """

    index: int
    num_tokens: int
    num_supervised: int
    grids: tuple[tuple[int, int], ...]

    @property
    def num_patches(self) -> int:
        return sum(h * w for h, w in self.grids)


@dataclass(frozen=True)
class CostModel:
    """Compute of a pack in LM-token equivalents (one decoder token's linear FLOPs = 1).

    cost = token * N + patch * P + attention * sum_i L_i^2 + vision_attention * sum_images (h w)^2

    with N real tokens, P vision patches, L_i the samples' lengths and (h, w) each image's patch grid. Defaults are
    Kimi-VL-A3B's training FLOPs (`from_config(kimi_vl_a3b())`, the `vlmtune.train.flops` terms, attention over
    all layers) divided by the decoder's linear FLOPs per token (2 x 2.58e9 active parameters):

        patch             (2 x 4.12e8 ViT params per patch + 2 x 3.07e7 projector params / 4) / 5.16e9 = 0.163
        attention         27 layers x 16 heads x (192 + 128) (causal: half the square) / 5.16e9  = 2.68e-5
        vision_attention  27 blocks x 2 x 16 heads x 2 x 72 (full square per image) / 5.16e9    = 2.41e-5

    so a 4096-token segment adds 11% to its linear cost and a 1089-patch image costs 177 + 29 token equivalents.
    Padding (``pad_to_length``) is counted as tokens, not as an attention segment.
    """

    token: float = 1.0
    patch: float = 0.163
    attention: float = 2.68e-5
    vision_attention: float = 2.41e-5

    @classmethod
    def from_config(cls, config: Any) -> CostModel:
        """Coefficients of a `KimiVLConfig` (the same terms as `vlmtune.train.flops.training_flops`)."""
        from vlmtune.train import flops

        t, v = config.text_config, config.vision_config
        per_token = 2.0 * flops.decoder_active_params(config)
        patch = 2.0 * flops.vision_params_per_patch(config) + 2.0 * flops.projector_params(config) / 4
        attention = t.num_hidden_layers * t.num_attention_heads * (t.qk_head_dim + t.v_head_dim)
        vision = v.num_hidden_layers * 2.0 * v.num_attention_heads * 2 * v.head_dim
        return cls(1.0, patch / per_token, attention / per_token, vision / per_token)

    def cost(self, seqlens: Sequence[int], grids: Sequence[tuple[int, int]], padding: int = 0) -> float:
        """Cost of one pack (or of any set of segments and images)."""
        n = sum(seqlens) + padding
        patches = sum(h * w for h, w in grids)
        quad = sum(L * L for L in seqlens)
        vquad = sum((h * w) ** 2 for h, w in grids)
        return self.token * n + self.patch * patches + self.attention * quad + self.vision_attention * vquad


@dataclass(frozen=True)
class StepInfo:
    """Facts about one optimizer step's WHOLE global batch (all ranks, all micro-batches), known on every rank.

    The loss denominators (`denominators`) come from the stored label masks, so no collective is needed; they
    equal `vlmtune.train.loss.count_supervision` summed over every rank's micro-batches.

    Attributes:
        step: global optimizer step (0-based, counted from the start of training).
        epoch: epoch of the step's first pack. step_in_epoch: its index within that epoch.
        num_supervised_tokens: supervised next-token targets of the global batch.
        num_samples: samples with at least one supervised target. num_packed_samples: all samples.
        sum_sqrt_supervised: sum over samples of sqrt(n_s), n_s = supervised targets of sample s.
        num_tokens: real tokens (padding excluded). num_padding: padding tokens. num_patches: vision patches.
        pack_ids: the global batch's packs, in step order (manifest index offline, stream position on the fly).
        rank_pack_ids: this rank's micro-batches, each a tuple of pack ids.
        rank_costs: `CostModel` cost of each rank's share.
        imbalance: max / mean of rank_costs (1.0 = perfectly even).
        microstep_imbalance: sum_j max_r c[r, j] / sum_j mean_r c[r, j], the straggler figure when ranks
            synchronise at every micro-step (ZeRO-2/3).
        balanced: whether the assignment was balanced (``balance=True``) or contiguous.
    """

    step: int
    epoch: int
    step_in_epoch: int
    num_supervised_tokens: int
    num_samples: int
    num_packed_samples: int
    sum_sqrt_supervised: float
    num_tokens: int
    num_padding: int
    num_patches: int
    pack_ids: tuple[int, ...]
    rank_pack_ids: tuple[tuple[int, ...], ...]
    rank_costs: tuple[float, ...]
    imbalance: float
    microstep_imbalance: float
    balanced: bool

    @property
    def denominators(self) -> tuple[int, int, float]:
        """(supervised tokens, samples, sum sqrt(n_s)): the ``denominators`` of `vlmtune.train.loss.token_weights`."""
        return self.num_supervised_tokens, self.num_samples, self.sum_sqrt_supervised


# ----------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class StepPlan:
    """The packs of one global step, as a schedule emits them.

    Attributes:
        step: global step index. epoch / step_in_epoch: see `StepInfo`.
        packs: G packs, each the global sample indices in buffer order.
        pack_ids: one id per pack (manifest index, or position in an on-the-fly pack stream).
        state_before: returns the schedule state from which this step is the next one (what a resume needs;
            a function so that a schedule can share one snapshot between many steps and build the dict on demand).
    """

    step: int
    epoch: int
    step_in_epoch: int
    packs: tuple[tuple[int, ...], ...]
    pack_ids: tuple[int, ...]
    state_before: Callable[[], dict[str, Any]]


class Schedule(Protocol):
    """An ordered supply of `StepPlan`s with a resumable position."""

    def next_plan(self) -> StepPlan: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PackSource(Protocol):
    """Where packs come from: the offline pack output (`OfflinePackSource`) or packing on the fly
    (`vlmtune.data.on_the_fly.OnTheFlySource`)."""

    packing_length: int

    def sample_meta(self, index: int) -> SampleMeta: ...

    def load_sample(self, index: int, image_processor: Any) -> SampleTensors: ...

    def schedule(self, seed: int, global_batch_size: int, tail: str) -> Schedule: ...

    def fingerprint(self) -> dict[str, Any]: ...


def process_images(image_processor: Any, images: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the image processor on a sample's PIL images.

    Returns:
        pixel_values (P, 3, 14, 14) and image_grid_hws (I, 2) long.
    """
    if image_processor is None:
        raise LoaderError(
            "this data holds images but the loader has no image_processor; pass "
            "image_processor=KimiVLImageProcessor.from_pretrained(MODEL_DIR)"
        )
    out = image_processor(images)
    pixel_values = torch.as_tensor(out["pixel_values"])
    grids = torch.as_tensor(out["image_grid_hws"], dtype=torch.long).reshape(-1, 2)  # (I, 2)
    return pixel_values, grids


def check_grids(where: str, stored: Sequence[tuple[int, int]], processed: torch.Tensor) -> None:
    """The processor must reproduce the grids counted when packing; otherwise token counts are wrong."""
    got = [tuple(int(x) for x in g) for g in processed.tolist()]
    want = [tuple(int(x) for x in g) for g in stored]
    if got != want:
        raise LoaderError(
            f"{where}: the image processor gives patch grids {got} but the packs were counted with {want}; the "
            "image settings (preprocessor_config.json) changed since packing. Re-run `vlmtune pack` with this model "
            "folder, or load the processor the packs were made with"
        )


class OfflinePackSource:
    """Packs from a `vlmtune pack` output folder (`PackReader`): tokens from the shards, images re-opened.

    Args:
        pack: the pack output folder, or an open `PackReader`.
    """

    def __init__(self, pack: Any) -> None:
        from vlmtune.data.pack_output import PackReader

        self.reader = pack if isinstance(pack, PackReader) else PackReader(Path(pack))
        self.packing_length = self.reader.packing_length
        self._supervised = np.full(self.reader.num_samples, -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.reader)

    def pack_samples(self, pack: int) -> tuple[int, ...]:
        """Global sample indices of buffer ``pack``."""
        return tuple(self.reader.pack_indices(pack))

    def max_pack_tokens(self) -> int:
        return max((int(p["tokens"]) for p in self.reader.manifest["packs"]), default=0)

    def sample_meta(self, index: int) -> SampleMeta:
        record = self.reader.sample(index)
        if self._supervised[index] < 0:
            _, mask = self.reader.sample_tokens(index)
            self._supervised[index] = int(mask[1:].sum())  # a sample's first token is never a target
        return SampleMeta(
            index, record.num_tokens, int(self._supervised[index]), tuple(im.grid_hw for im in record.images)
        )

    def load_sample(self, index: int, image_processor: Any) -> SampleTensors:
        """Tokens from the shards (never re-tokenized) and the sample's images processed now."""
        record = self.reader.sample(index)
        input_ids, label_mask = self.reader.sample_tokens(index)
        if len(input_ids) != record.num_tokens:
            raise LoaderError(
                f"{self.reader.path}: sample {index} ({record.where()}) has {len(input_ids)} tokens in the shards "
                f"but {record.num_tokens} in samples.jsonl; the pack output is damaged, re-run `vlmtune pack`"
            )
        pixel_values = grids = None
        if record.images:
            images = [self.reader.open_image(im.ref) for im in record.images]
            pixel_values, grids = process_images(image_processor, images)
            check_grids(f"sample {index} ({record.where()})", [im.grid_hw for im in record.images], grids)
            for (s, e), (h, w) in zip(record.image_spans, (im.grid_hw for im in record.images)):
                if e - s != h * w // 4:
                    raise LoaderError(
                        f"sample {index} ({record.where()}): image span [{s}, {e}) holds {e - s} tokens for a "
                        f"{h}x{w} grid ({h * w // 4} tokens); re-run `vlmtune pack`"
                    )
        return SampleTensors(input_ids, label_mask, pixel_values, grids, sample_id=index)

    def schedule(self, seed: int, global_batch_size: int, tail: str) -> EpochPermutationSchedule:
        return EpochPermutationSchedule(self, seed, global_batch_size, tail)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "offline",
            "num_packs": len(self),
            "num_samples": self.reader.num_samples,
            "packing_length": self.packing_length,
        }


class EpochPermutationSchedule:
    """Steps over a fixed list of packs: epoch e is ``default_rng(seed + e).permutation(N)`` (see `tail`).

    Stateless apart from the next step index, so a plan is a pure function of (seed, G, tail, step).
    """

    def __init__(self, source: Any, seed: int, global_batch_size: int, tail: str) -> None:
        self.source = source
        self.n = len(source)
        self.seed = seed
        self.G = global_batch_size
        self.tail = tail
        if self.n == 0:
            raise LoaderError("the pack source holds no packs; check the pack output's stats.json accounting")
        if tail == "drop" and self.n < self.G:
            raise LoaderError(
                f"tail='drop' with {self.n} packs < train.global_batch_size {self.G}: no full step; lower the "
                "global batch size or use tail='carry'"
            )
        self.next_step = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng(self.seed + epoch).permutation(self.n)
        return self._perms[epoch]

    def first_step(self, epoch: int) -> int:
        """First global step of ``epoch``."""
        if self.tail == "drop":
            return epoch * (self.n // self.G)
        return -(-epoch * self.n // self.G)  # ceil(e N / G)

    def epoch_of(self, step: int) -> int:
        if self.tail == "drop":
            return step // (self.n // self.G)
        return step * self.G // self.n

    def plan(self, step: int) -> StepPlan:
        epoch = self.epoch_of(step)
        if self.tail == "drop":
            i = step - self.first_step(epoch)
            ids = self._perm(epoch)[i * self.G : (i + 1) * self.G].tolist()
        else:
            ids = []
            for p in range(step * self.G, (step + 1) * self.G):
                ids.append(int(self._perm(p // self.n)[p % self.n]))
        return StepPlan(
            step=step,
            epoch=epoch,
            step_in_epoch=step - self.first_step(epoch),
            packs=tuple(self.source.pack_samples(i) for i in ids),
            pack_ids=tuple(int(i) for i in ids),
            state_before=functools.partial(dict, step=step),
        )

    def next_plan(self) -> StepPlan:
        plan = self.plan(self.next_step)
        self.next_step += 1
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = int(state["step"])


# ----------------------------------------------------------------------------------------------- assignment


def assign_packs(
    costs: Sequence[float], world_size: int, micro_batch_size: int, balance: bool
) -> list[list[list[int]]]:
    """Split a global step's packs into ranks x micro-steps.

    Args:
        costs: cost of each of the step's G packs.
        world_size: ranks. micro_batch_size: packs per micro-batch.
        balance: False = contiguous shares in step order (rank r takes packs [r G/world, (r+1) G/world)).
            True = packs sorted by decreasing cost (ties: step order); micro-step j takes the next
            world x micro of them, split over ``world`` bins of ``micro`` packs by longest-processing-time
            first; the heaviest bin goes to the rank with the least total so far. Every micro-step (a sync
            point under ZeRO-2/3) and every rank's total get near-equal compute. Deterministic: every rank
            computes the same assignment.

    Returns:
        out[r][j] = indices (into ``costs``, ascending) of rank r's micro-batch j.
    """
    G = len(costs)
    per_rank = G // world_size
    accum = per_rank // micro_batch_size
    if accum * micro_batch_size * world_size != G or accum == 0:
        raise LoaderError(f"{G} packs do not split into {world_size} ranks x micro-batches of {micro_batch_size}")
    if not balance:
        return [
            [
                list(range(r * per_rank + j * micro_batch_size, r * per_rank + (j + 1) * micro_batch_size))
                for j in range(accum)
            ]
            for r in range(world_size)
        ]
    order = sorted(range(G), key=lambda i: (-costs[i], i))
    width = world_size * micro_batch_size
    out: list[list[list[int]]] = [[[] for _ in range(accum)] for _ in range(world_size)]
    rank_total = [0.0] * world_size
    for j in range(accum):
        # Micro-step j takes the next `width` packs by decreasing cost: packs of similar cost run side by side.
        bins: list[list[int]] = [[] for _ in range(world_size)]
        loads = [0.0] * world_size
        heap = [(0.0, b) for b in range(world_size)]
        for i in order[j * width : (j + 1) * width]:  # LPT: least loaded bin that is not full
            load, b = heapq.heappop(heap)
            bins[b].append(i)
            loads[b] = load + costs[i]
            if len(bins[b]) < micro_batch_size:
                heapq.heappush(heap, (loads[b], b))
        # The heaviest bin goes to the rank with the least compute so far (running totals stay even).
        by_load = sorted(range(world_size), key=lambda b: (-loads[b], b))
        by_total = sorted(range(world_size), key=lambda r: (rank_total[r], r))
        for b, r in zip(by_load, by_total):
            out[r][j] = sorted(bins[b])
            rank_total[r] += loads[b]
    return out


def imbalance_figures(costs: Sequence[float], assignment: list[list[list[int]]]) -> tuple[list[float], float, float]:
    """(per-rank cost, max/mean over ranks, micro-step imbalance) of an `assign_packs` result."""
    per = [[sum(costs[i] for i in micro) for micro in rank] for rank in assignment]  # [r][j]
    totals = [sum(r) for r in per]
    mean = sum(totals) / len(totals)
    imbalance = max(totals) / mean if mean > 0 else 1.0
    accum = len(per[0])
    worst = sum(max(per[r][j] for r in range(len(per))) for j in range(accum))
    microstep = worst * len(per) / sum(totals) if mean > 0 else 1.0
    return totals, imbalance, microstep


# ----------------------------------------------------------------------------------------------- workers


def _identity(batch: PackedBatch) -> PackedBatch:
    return batch


class MicroBatchDataset(Dataset):
    """Item k = micro-batch k of a precomputed plan: its samples loaded (images processed here, in the worker)
    and collated into one `PackedBatch`.

    Args:
        source: the `PackSource`.
        micro_batches: per micro-batch, its global sample indices in order.
        pad_to: collate padding target (None = no padding).
        pad_token_id: id of padding tokens.
        image_processor: turns PIL images into patches (called in the worker).
    """

    def __init__(
        self,
        source: PackSource,
        micro_batches: Sequence[Sequence[int]],
        pad_to: int | None,
        pad_token_id: int,
        image_processor: Any,
    ) -> None:
        self.source = source
        self.micro_batches = [tuple(m) for m in micro_batches]
        self.pad_to = pad_to
        self.pad_token_id = pad_token_id
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, k: int) -> PackedBatch:
        samples = [self.source.load_sample(i, self.image_processor) for i in self.micro_batches[k]]
        return collate_samples(samples, pad_to=self.pad_to, pad_token_id=self.pad_token_id)


# ----------------------------------------------------------------------------------------------- the loader


class PackedLoader:
    """Optimizer steps of packed micro-batches for one rank (see the module docstring).

    Args:
        source: an `OfflinePackSource`, an on-the-fly source, or a pack output folder (path).
        micro_batch_size: packs per micro-batch (``train.micro_batch_size``).
        global_batch_size: packs per optimizer step over all ranks (``train.global_batch_size``).
        world_size: data-parallel ranks. rank: this rank.
        seed: epoch e shuffles with seed + e (``train.seed``).
        pad_to_length: tokens per pack for stable memory (``packing.packing_length`` when
            ``packing.pad_to_length``): every micro-batch is padded at its end to exactly micro_batch_size x
            pad_to_length tokens, the padding being one final segment with labels -100; None = no padding.
        pad_token_id: id of padding tokens (labels -100).
        num_workers: DataLoader worker processes that open and process images (``data.loader_workers``).
        balance: balance compute across ranks and micro-steps (``packing.balance_steps``).
        image_processor: the model's image processor, called in the workers as ``image_processor(images)`` ->
            {"pixel_values", "image_grid_hws"} (`KimiVLImageProcessor`).
        tail: "carry" or "drop" (module docstring).
        cost_model: the balancing cost (default: Kimi-VL-A3B coefficients).
        prefetch_factor: micro-batches each worker prepares ahead.
    """

    def __init__(
        self,
        source: PackSource | str | Path,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        pad_to_length: int | None = None,
        pad_token_id: int = 0,
        num_workers: int = 0,
        balance: bool = False,
        image_processor: Any = None,
        tail: str = "carry",
        cost_model: CostModel | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        if isinstance(source, (str, Path)):
            source = OfflinePackSource(source)
        if micro_batch_size < 1 or global_batch_size < 1 or world_size < 1:
            raise LoaderError(
                f"micro_batch_size={micro_batch_size}, global_batch_size={global_batch_size} and "
                f"world_size={world_size} must all be >= 1"
            )
        if global_batch_size % (micro_batch_size * world_size):
            raise LoaderError(
                f"train.global_batch_size={global_batch_size} is not a multiple of train.micro_batch_size "
                f"{micro_batch_size} x world size {world_size}; every rank must run the same number of micro-batches. "
                f"Pick a global batch size divisible by {micro_batch_size * world_size}"
            )
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank={rank} outside [0, world_size={world_size})")
        if seed < 0:
            raise LoaderError(f"train.seed={seed} must be >= 0 (epoch e shuffles with seed + e)")
        if tail not in TAIL_POLICIES:
            raise LoaderError(f"tail={tail!r}; expected one of {TAIL_POLICIES}")
        if num_workers < 0:
            raise LoaderError(f"data.loader_workers={num_workers} must be >= 0")
        if pad_to_length is not None:
            longest = source.max_pack_tokens() if hasattr(source, "max_pack_tokens") else source.packing_length
            if pad_to_length < longest:
                raise LoaderError(
                    f"pad_to_length={pad_to_length} is shorter than the longest pack ({longest} tokens); pad to the "
                    f"packing length ({source.packing_length}) or disable packing.pad_to_length"
                )
        self.source = source
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.pad_to_length = pad_to_length
        self.pad_token_id = pad_token_id
        self.num_workers = num_workers
        self.balance = balance
        self.image_processor = image_processor
        self.tail = tail
        self.cost_model = cost_model or CostModel()
        self.prefetch_factor = prefetch_factor
        self.accum_steps = global_batch_size // (micro_batch_size * world_size)
        self._schedule = source.schedule(seed, global_batch_size, tail)
        self._ahead: deque[StepPlan] = deque()  # planned, not yet yielded

    # -- position
    def _peek_epoch(self) -> list[StepPlan]:
        """Plans of the rest of the current epoch (pulled into the look-ahead)."""
        if not self._ahead:
            self._ahead.append(self._schedule.next_plan())
        epoch = self._ahead[0].epoch
        while self._ahead[-1].epoch == epoch:
            self._ahead.append(self._schedule.next_plan())
        return [p for p in self._ahead if p.epoch == epoch]

    @property
    def epoch(self) -> int:
        """Epoch of the next step."""
        return self._peek_epoch()[0].epoch

    @property
    def step(self) -> int:
        """Global index of the next step."""
        return self._peek_epoch()[0].step

    def __len__(self) -> int:
        """Steps the next ``iter()`` yields: the rest of the current epoch."""
        return len(self._peek_epoch())

    def steps_per_epoch(self) -> int:
        """Total steps of the current epoch."""
        plans = self._peek_epoch()
        return plans[0].step_in_epoch + len(plans)

    # -- planning
    def pack_cost(self, samples: Sequence[int]) -> float:
        """`CostModel` cost of one pack (global sample indices)."""
        metas = [self.source.sample_meta(i) for i in samples]
        padding = 0
        if self.pad_to_length is not None:
            padding = self.pad_to_length - sum(m.num_tokens for m in metas)
        return self.cost_model.cost(
            [m.num_tokens for m in metas], [g for m in metas for g in m.grids], padding=padding
        )

    def assignment(self, plan: StepPlan) -> tuple[list[list[list[int]]], list[float]]:
        """(``assign_packs`` result, pack costs) of a step: the same on every rank."""
        costs = [self.pack_cost(p) for p in plan.packs]
        return assign_packs(costs, self.world_size, self.micro_batch_size, self.balance), costs

    def step_info(self, plan: StepPlan, assignment: list[list[list[int]]], costs: list[float]) -> StepInfo:
        """The `StepInfo` of a planned step (whole global batch, from metadata only)."""
        supervised = samples = packed = tokens = padding = patches = 0
        sqrt_sum = 0.0
        for pack in plan.packs:
            pack_tokens = 0
            for i in pack:
                m = self.source.sample_meta(i)
                supervised += m.num_supervised
                samples += m.num_supervised > 0
                sqrt_sum += math.sqrt(m.num_supervised)
                packed += 1
                pack_tokens += m.num_tokens
                patches += m.num_patches
            tokens += pack_tokens
        if self.pad_to_length is not None:
            padding = self.pad_to_length * len(plan.packs) - tokens
        totals, imbalance, microstep = imbalance_figures(costs, assignment)
        return StepInfo(
            step=plan.step,
            epoch=plan.epoch,
            step_in_epoch=plan.step_in_epoch,
            num_supervised_tokens=supervised,
            num_samples=samples,
            num_packed_samples=packed,
            sum_sqrt_supervised=sqrt_sum,
            num_tokens=tokens,
            num_padding=padding,
            num_patches=patches,
            pack_ids=plan.pack_ids,
            rank_pack_ids=tuple(tuple(plan.pack_ids[i] for i in m) for m in assignment[self.rank]),
            rank_costs=tuple(totals),
            imbalance=imbalance,
            microstep_imbalance=microstep,
            balanced=self.balance,
        )

    def epoch_infos(self) -> list[StepInfo]:
        """The `StepInfo` of every step the next ``iter()`` yields (the rest of the epoch), from metadata only:
        no image is opened and the position does not move (a dry run for logging or planning)."""
        return [self.step_info(plan, *self.assignment(plan)) for plan in self._peek_epoch()]

    def _micro_samples(self, plan: StepPlan, assignment: list[list[list[int]]]) -> list[tuple[int, ...]]:
        """This rank's micro-batches of a step, each as its global sample indices in order."""
        return [tuple(s for i in micro for s in plan.packs[i]) for micro in assignment[self.rank]]

    # -- iteration
    def __iter__(self) -> Iterator[tuple[list[PackedBatch], StepInfo]]:
        plans = self._peek_epoch()
        infos, micro = [], []
        for plan in plans:
            assignment, costs = self.assignment(plan)
            infos.append(self.step_info(plan, assignment, costs))
            micro.extend(self._micro_samples(plan, assignment))
        pad_to = None if self.pad_to_length is None else self.pad_to_length * self.micro_batch_size
        dataset = MicroBatchDataset(self.source, micro, pad_to, self.pad_token_id, self.image_processor)
        loader = DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_identity,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,
        )
        return self._steps(iter(loader), plans, infos)

    def _steps(
        self, batches: Iterator[PackedBatch], plans: list[StepPlan], infos: list[StepInfo]
    ) -> Iterator[tuple[list[PackedBatch], StepInfo]]:
        try:
            for plan, info in zip(plans, infos):
                micro_batches = [next(batches) for _ in range(self.accum_steps)]
                if not self._ahead or self._ahead[0].step != plan.step:
                    raise RuntimeError(
                        f"loader position moved (load_state_dict?) while iterating; step {plan.step} is no longer "
                        "next. Start a new `for ... in loader` after load_state_dict"
                    )
                self._ahead.popleft()  # consumed: state_dict() now points past this step
                yield micro_batches, info
        finally:
            shutdown: Callable[[], None] | None = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        """The position: the first step not yet yielded (plus the schedule state there)."""
        plans = self._peek_epoch()
        first = plans[0]
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "tail": self.tail,
            "step": first.step,
            "epoch": first.epoch,
            "step_in_epoch": first.step_in_epoch,
            "schedule": first.state_before(),
            "source": self.source.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (any world size, micro-batch size or worker count).

        Raises:
            LoaderError: the state comes from another format version, seed, global batch size, tail policy or
                pack source.
        """
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise LoaderError(
                f"loader state has format {state.get('format')!r} version {state.get('version')!r}; this vlmtune "
                f"reads {STATE_FORMAT!r} version {STATE_VERSION}"
            )
        for key, mine, name in (
            ("seed", self.seed, "train.seed"),
            ("global_batch_size", self.global_batch_size, "train.global_batch_size"),
            ("tail", self.tail, "the tail policy"),
        ):
            if state[key] != mine:
                raise LoaderError(
                    f"the checkpoint's loader was made with {name}={state[key]!r}, this run has {mine!r}; the step "
                    f"plan depends on it, so resume with {name}={state[key]!r} (or start a new run)"
                )
        if state["source"] != self.source.fingerprint():
            raise LoaderError(
                f"the checkpoint's loader read packs {state['source']}, this run reads {self.source.fingerprint()}; "
                "resume on the same pack output (or start a new run)"
            )
        self._schedule.load_state_dict(state["schedule"])
        self._ahead.clear()
        if self.step != state["step"]:
            raise LoaderError(f"loader state inconsistent: schedule resumes at step {self.step}, state says "
                              f"{state['step']}")
