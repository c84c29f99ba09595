"""On-the-fly packing: raw data -> exact lengths -> windowed best-fit packing in the loader -> the same batches.

``packing.mode: on_the_fly`` skips the pack folder: packs are built while training, with the functions that
`vlmtune pack` uses, and go through the same `PackedLoader` (same `PackedBatch`, sharding, balancing, resume)::

    recipe datasets --ingest.run_length_pass----> exact tokens + label masks (chat template, image headers; cached)
                    --ingest.select_samples-----> overlong policy, mixing weights: sample k enters each epoch
                                                  multiplicity[k] times ("entries")
    epoch e         entries in default_rng(seed + e).permutation order, fed `window` at a time to a
                    packing.StreamingPacker (open packs carried between windows); flushed at the epoch's end
    pack stream     closed packs in emission order, tagged with their epoch -> steps of G packs (PackedLoader)
    workers         tokens from memory (never re-tokenized), images re-opened from their references, processed

Same samples as offline: sample index k is the k-th selected sample in reading order, which is also the record
index `vlmtune pack` gives it with the same datasets, settings and seed (``mixing_seed``), and every epoch holds
every entry exactly once, i.e. the multiset of sample ids of an epoch equals that of one offline epoch. What
differs: which samples share a pack (windowed instead of global best fit) and the order (an epoch's packs come in
the packer's closing order, not shuffled again; a window's packs tend to start with its longest samples).

The packer is flushed at every epoch's end, so no pack mixes two epochs; ``tail`` (carry | drop) then applies to
the pack stream exactly as offline. Everything buffered is part of the resume state: the packer's open packs and
partial window, the closed packs not yet in a step, the position in the epoch's permutation.
"""

from __future__ import annotations

import functools
import hashlib
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmtune.data.batch import SampleTensors
from vlmtune.data.ingest import Accounting, Selected
from vlmtune.data.loader import LoaderError, SampleMeta, StepPlan, check_grids, process_images
from vlmtune.data.packing import StreamingPacker

#: the recipe's default window for on-the-fly packing (vlmtune.config.schema.DEFAULT_ON_THE_FLY_WINDOW).
DEFAULT_WINDOW = 2048
STATE_VERSION = 1


class OnTheFlySource:
    """A `vlmtune.data.loader.PackSource` that packs selected samples while training.

    Args:
        samples: the selected samples, in reading order (``ingest.select_samples``); sample index k = samples[k].
        packing_length: LM tokens per pack.
        max_vision_patches: vision patches per pack (None = no vision budget).
        window: samples sorted and best-fit together (``packing.window``).
        max_open: packs left open between windows (None: the packer's default).
        accounting: the ingest counts (read = packed + skipped + dropped), kept for the trainer's report.

    Raises:
        LoaderError: a sample that cannot fit a pack alone (apply the overlong policy first), or no sample.
    """

    def __init__(
        self,
        samples: Sequence[Selected],
        *,
        packing_length: int,
        max_vision_patches: int | None = None,
        window: int = DEFAULT_WINDOW,
        max_open: int | None = None,
        accounting: Accounting | None = None,
    ) -> None:
        self.samples = list(samples)
        if not self.samples:
            raise LoaderError("no sample to pack on the fly; check the datasets and the skip/drop counts")
        self.packing_length = int(packing_length)
        self.max_vision_patches = max_vision_patches
        self.window = int(window)
        extra = {} if max_open is None else {"max_open": max_open}
        self.max_open = StreamingPacker(self.packing_length, max_vision_patches, self.window, **extra).max_open
        self.accounting = accounting
        self.tokens = np.array([s.sample.num_tokens for s in self.samples], dtype=np.int64)
        self.patches = np.array([s.sample.num_patches for s in self.samples], dtype=np.int64)
        self.supervised = np.array([int(np.asarray(s.sample.label_mask)[1:].sum()) for s in self.samples], np.int64)
        for k, s in enumerate(self.samples):
            if self.tokens[k] > self.packing_length or (
                max_vision_patches is not None and self.patches[k] > max_vision_patches
            ):
                raise LoaderError(
                    f"{s.file}:{s.kind} {s.sample.location}: sample {k} has {self.tokens[k]} tokens / "
                    f"{self.patches[k]} patches, more than a pack holds ({self.packing_length} / "
                    f"{max_vision_patches}); select samples with ingest.select_samples (the overlong policy)"
                )
            if s.multiplicity < 1:
                raise LoaderError(f"sample {k}: multiplicity {s.multiplicity} < 1 (select_samples drops those)")
        # One entry per occurrence, in reading order (as `vlmtune pack`).
        self.entries = np.repeat(np.arange(len(self.samples)), [s.multiplicity for s in self.samples])
        self._opener: Any = None

    @classmethod
    def from_datasets(
        cls,
        specs: Sequence[Any],
        model_dir: Path | str,
        *,
        packing_length: int,
        max_vision_patches: int | None = None,
        window: int | None = None,
        overlong: str = "error",
        on_bad_sample: str = "error",
        mixing_seed: int = 0,
        workers: int = 0,
        cache_dir: Path | None = None,
        progress: bool = False,
    ) -> OnTheFlySource:
        """Run the length pass and the sample selection of `vlmtune pack` over raw datasets.

        Args:
            specs: `vlmtune.data.formats.DatasetSpec` per dataset (path, weight, format, image root).
            model_dir: folder with the tokenizer and preprocessor_config.json.
            packing_length / max_vision_patches / window: the packing budgets and window (None: DEFAULT_WINDOW).
            overlong / on_bad_sample: the data policies (``data.overlong`` / ``data.on_bad_sample``).
            mixing_seed: seed of the mixing-weight subsample (``packing.seed``, as `vlmtune pack`).
            workers / cache_dir / progress: the length pass's worker processes, cache folder and progress bar.

        Raises:
            IngestError: a bad sample with on_bad_sample=error, an overlong one with overlong=error.
        """
        from vlmtune.data.ingest import LengthPassSettings, run_length_pass, select_samples

        results = run_length_pass(
            list(specs),
            LengthPassSettings(
                model_dir=Path(model_dir), workers=workers, cache_dir=cache_dir, on_bad_sample=on_bad_sample,
                progress=progress,
            ),
        )
        selected, per_dataset, _ = select_samples(
            results, list(specs), packing_length, max_vision_patches, overlong, mixing_seed, on_bad_sample
        )
        total = Accounting()
        for acc in per_dataset:
            total.add(acc)
        total.check()
        return cls(
            selected, packing_length=packing_length, max_vision_patches=max_vision_patches,
            window=window or DEFAULT_WINDOW, accounting=total,
        )

    # -- PackSource
    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def max_pack_tokens(self) -> int:
        return self.packing_length

    def sample_meta(self, index: int) -> SampleMeta:
        s = self.samples[index].sample
        return SampleMeta(index, int(self.tokens[index]), int(self.supervised[index]), tuple(tuple(g) for g in s.grids))

    def load_sample(self, index: int, image_processor: Any) -> SampleTensors:
        """Tokens from memory (as measured, never re-tokenized) and the images opened and processed now."""
        sel = self.samples[index]
        s = sel.sample
        pixel_values = grids = None
        if s.image_refs:
            if self._opener is None:  # one per process: DataLoader workers each open their own files
                from vlmtune.data.formats import ImageOpener

                self._opener = ImageOpener()
            images = [self._opener.open(ref) for ref in s.image_refs]
            pixel_values, grids = process_images(image_processor, images)
            check_grids(f"sample {index} ({sel.file}:{sel.kind} {s.location})", s.grids, grids)
        return SampleTensors(
            np.asarray(s.input_ids), np.asarray(s.label_mask, dtype=bool), pixel_values, grids, sample_id=index
        )

    def schedule(self, seed: int, global_batch_size: int, tail: str) -> StreamSchedule:
        return StreamSchedule(self, seed, global_batch_size, tail)

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.tokens.tobytes() + self.patches.tobytes() + self.entries.tobytes())
        return {
            "kind": "on_the_fly",
            "num_samples": self.num_samples,
            "num_entries": int(len(self.entries)),
            "lengths_sha256": digest.hexdigest()[:16],
            "packing_length": self.packing_length,
            "max_vision_patches": self.max_vision_patches,
            "window": self.window,
            "max_open": self.max_open,
        }

    def new_packer(self) -> StreamingPacker:
        return StreamingPacker(self.packing_length, self.max_vision_patches, self.window, self.max_open)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_opener"] = None  # open files stay in the process that opened them
        return state


class StreamSchedule:
    """Steps over the on-the-fly pack stream (see the module docstring); resumable at every step boundary.

    The stream state changes at two events: a refill (one window of entries fed to the packer, the packs it
    closes queued) and a step (G packs taken from the queue). A snapshot is taken at each refill; the state before
    any step is that snapshot minus the packs consumed since, so many planned steps share one snapshot and the
    dictionary is only built when a checkpoint asks for it.
    """

    def __init__(self, source: OnTheFlySource, seed: int, global_batch_size: int, tail: str) -> None:
        self.source = source
        self.seed = seed
        self.G = global_batch_size
        self.tail = tail
        self.packer = source.new_packer()
        self.epoch = 0  # epoch being fed to the packer
        self.fed = 0  # entries of that epoch fed so far
        self.queue: deque[tuple[int, int, tuple[int, ...]]] = deque()  # (pack id, epoch, sample indices)
        self.next_pack_id = 0
        self.step = 0
        self.last_epoch = -1  # epoch of the last step planned
        self.step_in_epoch = 0  # of the next step, if it stays in last_epoch
        self._perm: tuple[int, np.ndarray] | None = None
        self._snapshot()

    # -- stream
    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(self.seed + epoch).permutation(len(self.source.entries)))
        return self._perm[1]

    def _refill(self) -> None:
        """Feed the next window of entries (flushing at the epoch's end); queue the packs it closes."""
        src = self.source
        chunk = self._order(self.epoch)[self.fed : self.fed + src.window]
        ids = src.entries[chunk]
        closed = self.packer.add(src.tokens[ids], src.patches[ids], ids=ids)
        self.fed += len(chunk)
        epoch = self.epoch
        if self.fed == len(src.entries):
            closed += self.packer.flush()
            self.epoch, self.fed = self.epoch + 1, 0
        lost = self.packer.take_unpackable()
        if lost:
            raise LoaderError(f"samples {lost[:5]} do not fit a pack alone; select samples with the overlong policy")
        for pack in closed:
            self.queue.append((self.next_pack_id, epoch, tuple(int(i) for i in pack)))
            self.next_pack_id += 1
        self._snapshot()

    def _snapshot(self) -> None:
        self._base = {
            "epoch": self.epoch,
            "fed": self.fed,
            "packer": self.packer.state_dict(),
            "queue": [[pid, e, list(p)] for pid, e, p in self.queue],
            "next_pack_id": self.next_pack_id,
        }
        self._consumed = 0

    def _pop(self) -> tuple[int, int, tuple[int, ...]]:
        self._consumed += 1
        return self.queue.popleft()

    def _head_count(self) -> int:
        """Queued packs of the head pack's epoch (they sit at the front)."""
        e0, n = self.queue[0][1], 0
        for _, e, _ in self.queue:
            if e != e0:
                break
            n += 1
        return n

    # -- Schedule
    def next_plan(self) -> StepPlan:
        before = functools.partial(
            _state_at, self._base, self._consumed, self.step, self.last_epoch, self.step_in_epoch
        )
        if self.tail == "carry":
            while len(self.queue) < self.G:
                self._refill()
        else:
            while True:
                if self.queue and self._head_count() >= self.G:
                    break
                if self.queue and self.epoch > self.queue[0][1]:  # the head's epoch is complete: drop its tail
                    e0 = self.queue[0][1]
                    if self.last_epoch != e0:
                        raise LoaderError(
                            f"tail='drop': epoch {e0} packs into {self._head_count()} packs < "
                            f"train.global_batch_size {self.G}, no full step; lower the global batch size or use "
                            "tail='carry'"
                        )
                    for _ in range(self._head_count()):
                        self._pop()
                    continue
                self._refill()
        taken = [self._pop() for _ in range(self.G)]
        epoch = taken[0][1]
        in_epoch = self.step_in_epoch if epoch == self.last_epoch else 0
        plan = StepPlan(
            step=self.step,
            epoch=epoch,
            step_in_epoch=in_epoch,
            packs=tuple(p for _, _, p in taken),
            pack_ids=tuple(pid for pid, _, _ in taken),
            state_before=before,
        )
        self.step += 1
        self.last_epoch, self.step_in_epoch = epoch, in_epoch + 1
        return plan

    def state_dict(self) -> dict[str, Any]:
        return _state_at(self._base, self._consumed, self.step, self.last_epoch, self.step_in_epoch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != "on_the_fly":
            raise LoaderError(
                f"on-the-fly loader state kind {state.get('kind')!r} version {state.get('version')!r}; expected "
                f"'on_the_fly' version {STATE_VERSION} (was the checkpoint made with packing.mode: offline?)"
            )
        self.packer.load_state_dict(state["packer"])
        self.epoch, self.fed = int(state["epoch"]), int(state["fed"])
        self.queue = deque((int(pid), int(e), tuple(int(i) for i in p)) for pid, e, p in state["queue"])
        self.next_pack_id = int(state["next_pack_id"])
        self.step, self.last_epoch = int(state["step"]), int(state["last_epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self._snapshot()


def _state_at(base: dict[str, Any], consumed: int, step: int, last_epoch: int, step_in_epoch: int) -> dict[str, Any]:
    """The stream state `consumed` packs after the snapshot `base`, before global step `step`."""
    return {
        "kind": "on_the_fly",
        "version": STATE_VERSION,
        "step": step,
        "last_epoch": last_epoch,
        "step_in_epoch": step_in_epoch,
        "epoch": base["epoch"],
        "fed": base["fed"],
        "packer": base["packer"],
        "queue": base["queue"][consumed:],
        "next_pack_id": base["next_pack_id"],
    }
