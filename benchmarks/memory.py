"""Activation memory and step time with and without gradient checkpointing, decoder and vision tower separately.

    python benchmarks/memory.py [--json OUT] [--packing-length 4096] [--repeats 3] [--quick] [--seed 0]

What runs: one pack of ``--packing-length`` tokens (default 4096) filled from the demo VQA set
(`data_tools.demo_data.generate_demo_data` through the tiny model folder's tokenizer, chat template and image
processor: `_common.demo_samples`), real images (about 1.5 per sample, up to 8x8 patches each), labels on the
assistant text, the rest of the buffer one padding segment. The model is a wider tiny Kimi-VL (:func:`wide_config`:
the structure of ``kimi_vl_tiny()`` -- a dense layer then 2 MoE layers, 8 experts top-2 + 1 shared, MLA; 2 MoonViT
blocks -- at hidden 256 in the decoder and the vision tower), fp32 on CPU, ``apply_rmpad`` (the packed varlen path)
and checkpointing switched on by the library call the trainer uses,
``KimiVLForConditionalGeneration.gradient_checkpointing_enable(decoder=..., vision=...)``, in four settings:

    setting   decoder layers   vision blocks
    none      -                -
    decoder   checkpointed     -
    vision    -                checkpointed
    both      checkpointed     checkpointed

Figures per setting, each setting in a fresh subprocess with one torch thread (a clean RSS):

* activation memory: the bytes autograd keeps for backward during one forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameters excluded), split by the module that
  was running when the tensor was saved (vision tower, projector, decoder = layers + final norm, other = embedding,
  image scatter, loss head); plus what checkpoint frames keep alive outside the hooks' view (tensors nested in the
  arguments of a checkpointed block, e.g. the vision tower's 2-D RoPE tables; non-reentrant checkpointing saves the
  block's direct tensor arguments through autograd, so the hooks see those). :func:`measure_saved` does this; the
  same counting lives in tests/launch/test_plan.py (``saved_bytes``), which the library does not export.
* peak RSS of the process (``ru_maxrss``), and its rise above the RSS just before the first step;
* step time: forward + backward (loss + MoE aux loss), after one untimed step, median of ``--repeats`` (5); wall and
  CPU seconds (one thread: CPU time is the compute, steadier on a shared machine).

Every setting must compute the same loss and gradients (checked: the run fails otherwise), so the ratios compare the
same computation. Ratios are against ``none``. Targets: activation bytes with both parts checkpointed at most half
of none's, each part's own bytes at most half when that part is checkpointed, and step time (CPU) at most 1.4x in
every checkpointed setting. ``--quick`` (512 tokens, 1 repeat) is for a smoke run.

What checkpointing leaves (measured at 4096 tokens, both parts checkpointed, 70 MiB of none's 463 MiB): each
checkpointed block's input (3 decoder layers, 2 vision blocks), the final norms' inputs, the patch embedding's input
pixels (the conv keeps them for its weight gradient), the projector (not checkpointed: 21 MiB) and the RoPE tables
held by the checkpoint frames. The peak RSS falls less than the saved bytes: it is reached in backward, where the
recomputed block's activations, the loss head's logits chunk and the gradients come on top. Runs in ~2 minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Target,
    add_json_argument,
    check_targets,
    demo_samples,
    print_table,
    targets_json,
    write_json,
)

from vlmtune.data.batch import PackedBatch, collate_samples  # noqa: E402
from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration  # noqa: E402
from vlmtune.models.kimi_vl.configuration import KimiVLConfig, MoonViTConfig, kimi_vl_tiny  # noqa: E402
from vlmtune.models.kimi_vl.init_model import TINY_NUM_BASE_TOKENS  # noqa: E402
from vlmtune.patches.rmpad import apply_rmpad, rmpad_backend  # noqa: E402

#: setting -> (checkpoint the decoder layers, checkpoint the vision blocks)
SETTINGS: dict[str, tuple[bool, bool]] = {
    "none": (False, False), "decoder": (True, False), "vision": (False, True), "both": (True, True)}
#: where a saved tensor is attributed: the module running when autograd saved it
REGIONS = ("vision", "projector", "decoder", "other")
#: the wider tiny model: kimi_vl_tiny()'s structure at hidden 256 (the planner test's proportions)
WIDE_TEXT = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, kv_lora_rank=64,
                 qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32)
WIDE_VISION = dict(hidden_size=256, intermediate_size=512)
DEFAULT_LENGTH, QUICK_LENGTH = 4096, 512
MiB = 2**20


# ------------------------------------------------------------------------------------------------ model and pack
def wide_config() -> KimiVLConfig:
    """kimi_vl_tiny() with the tiny tokenizer's vocabulary, widened to hidden 256 (decoder and vision tower)."""
    config = kimi_vl_tiny(num_base_tokens=TINY_NUM_BASE_TOKENS, **WIDE_TEXT)
    config.vision_config = MoonViTConfig(**{**config.vision_config.to_save_dict(), **WIDE_VISION})
    return config


def build_pack(root: Path, packing_length: int) -> tuple[PackedBatch, dict[str, Any]]:
    """One pack of exactly ``packing_length`` tokens from the demo VQA set, in its order; padding segment at the end.

    Samples are added while they fit (first fit in the set's order), so the pack stops at the first sample that does
    not fit only when the next ones do not fit either. Raises when the pack is filled below 90%. The demo set and the
    tiny model folder are written under ``root`` with seed 0 (deterministic: the same pack every run).
    """
    # ~47 tokens per demo sample: ask for 1 sample per 16 tokens, plenty to fill the buffer. max_side 112 (the demo
    # generator's default, sides 56..112 px): the figures above and in tests/test_bench_memory.py were measured on it
    samples, model_dir, info = demo_samples(root, max(64, packing_length // 16), max_side=112)
    config = wide_config()
    folder = KimiVLConfig.from_pretrained(model_dir)
    if (folder.text_config.vocab_size, folder.media_placeholder_token_id) != (
            config.text_config.vocab_size, config.media_placeholder_token_id):
        raise RuntimeError(f"wide_config() no longer matches the tiny model folder's tokenizer: vocab / placeholder "
                           f"{config.text_config.vocab_size} / {config.media_placeholder_token_id} vs "
                           f"{folder.text_config.vocab_size} / {folder.media_placeholder_token_id}; build it from "
                           f"kimi_vl_tiny(num_base_tokens=...) as init_model does")
    chosen, used = [], 0
    for s in samples:
        n = len(s.input_ids)
        if used + n <= packing_length:
            chosen.append(s)
            used += n
    if used < 0.9 * packing_length:
        raise RuntimeError(f"only {used} of {packing_length} tokens filled from {len(samples)} demo samples; "
                           "ask demo_samples for more")
    pack = collate_samples(chosen, pad_to=packing_length, pad_token_id=config.text_config.pad_token_id)
    n_images = 0 if pack.image_grid_hws is None else int(pack.image_grid_hws.shape[0])
    if n_images < 2:
        raise RuntimeError(f"the pack holds {n_images} images: the vision tower would not be exercised")
    return pack, {"source": info["source"], "packing_length": packing_length, "samples": pack.num_samples,
                  "real_tokens": used, "padding_tokens": pack.num_padding, "supervised_tokens": pack.num_supervised,
                  "images": n_images, "patches": pack.num_patches,
                  "image_tokens": pack.num_patches // 4, "max_seqlen": pack.max_seqlen}


def build_model(config: KimiVLConfig, setting: str, seed: int = 0) -> KimiVLForConditionalGeneration:
    """The model of one setting: same seeded weights, rmpad, checkpointing as the trainer switches it on."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    decoder, vision = SETTINGS[setting]
    torch.manual_seed(seed)
    model = KimiVLForConditionalGeneration(config)
    apply_rmpad(model, attention="auto")
    model.gradient_checkpointing_enable(decoder=decoder, vision=vision)
    return model.train()


def step_loss(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The training objective of one pack: token-mean LM loss + MoE aux loss (mean over the pack's sequences)."""
    out = model(**inputs, return_logits=False)
    return out.loss + out.aux_loss


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class SavedBytes:
    """Bytes kept for backward by one forward.

    Attributes:
        saved: unique storages autograd saved (``saved_tensors_hooks``), parameters excluded.
        by_region: ``saved`` split by the module running when autograd saved the tensor (:data:`REGIONS`).
        frame: storages the checkpoint frames keep alive that autograd never saw (not in ``saved``).
    """

    saved: int
    by_region: dict[str, int]
    frame: int

    @property
    def total(self) -> int:
        return self.saved + self.frame


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tuple / list / dict of call arguments."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def measure_saved(model: KimiVLForConditionalGeneration, inputs: dict[str, Any]) -> tuple[SavedBytes, torch.Tensor]:
    """One forward of ``step_loss`` counting what it keeps for backward (see :class:`SavedBytes`).

    Returns (the counts, the loss: call ``backward`` on it to finish the step).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    region = ["other"]
    saved: dict[int, tuple[int, str]] = {}  # storage pointer -> (bytes, region)
    frame: dict[int, int] = {}  # storage pointer -> bytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), (storage.nbytes(), region[0]))
        return t

    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            region[0] = name
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        region[0] = "other"

    def frame_args(module: nn.Module, args: Any, kwargs: Any) -> None:
        for t in _tensors((args, kwargs)):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                frame.setdefault(storage.data_ptr(), storage.nbytes())

    handles = []
    for name, module in (("vision", model.vision_tower), ("projector", model.multi_modal_projector),
                         ("decoder", model.language_model.model)):
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    # the blocks checkpoint wraps: their arguments live in the checkpoint frame until backward
    blocks = ([*model.language_model.model.layers] if model.language_model.model.gradient_checkpointing else []) + (
        [*model.vision_tower.encoder.blocks] if model.vision_tower.gradient_checkpointing else [])
    handles += [b.register_forward_pre_hook(frame_args, with_kwargs=True) for b in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step_loss(model, inputs)
    finally:
        for h in handles:
            h.remove()
    if not loss.requires_grad:
        raise RuntimeError("the loss does not require grad: nothing was recorded for backward")
    by_region = dict.fromkeys(REGIONS, 0)
    for nbytes, name in saved.values():
        by_region[name] += nbytes
    only_frame = sum(nbytes for ptr, nbytes in frame.items() if ptr not in saved)
    return SavedBytes(sum(by_region.values()), by_region, only_frame), loss


def grad_summary(model: nn.Module) -> dict[str, float]:
    """Loss-independent fingerprints of the gradients: global L2 norm and the sum of all entries."""
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    return {"grad_norm": float(torch.sqrt(sum((g * g).sum() for g in grads))),
            "grad_sum": float(sum(g.sum() for g in grads))}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class SettingResult:
    """Everything measured for one setting (one subprocess)."""

    setting: str
    checkpoint_decoder: bool
    checkpoint_vision: bool
    saved: dict[str, Any]
    loss: float
    grads: dict[str, float]
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    rss_before_mib: float = 0.0
    peak_rss_mib: float = 0.0
    attention: str | None = None
    threads: int = 1


def run_setting(setting: str, pack_file: Path, repeats: int, seed: int) -> SettingResult:
    """Build the setting's model, count its saved bytes (the untimed first step), then time ``repeats`` steps."""
    blob = torch.load(pack_file, weights_only=False)
    inputs = blob["inputs"]
    model = build_model(KimiVLConfig.from_dict(blob["config"]), setting, seed)
    rss_before = _rss_bytes()
    counts, loss = measure_saved(model, inputs)
    loss.backward()
    loss = loss.detach()
    decoder, vision = SETTINGS[setting]
    result = SettingResult(setting, decoder, vision,
                           {**asdict(counts), "total": counts.total}, loss.item(), grad_summary(model),
                           attention=rmpad_backend(model), threads=torch.get_num_threads())
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.process_time()
        step_loss(model, inputs).backward()
        result.wall_s.append(time.perf_counter() - wall)
        result.cpu_s.append(time.process_time() - cpu)
    result.rss_before_mib = rss_before / MiB
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB  # KiB on Linux
    return result


def spawn(setting: str, pack_file: Path, repeats: int, seed: int, tmp: Path) -> dict[str, Any]:
    """:func:`run_setting` in a fresh Python process with one thread; its result as a dict."""
    out = tmp / f"result-{setting}.json"
    cmd = [sys.executable, __file__, "--worker", setting, "--pack-file", str(pack_file), "--result-file", str(out),
           "--repeats", str(repeats), "--seed", str(seed)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ report
def _check_same_computation(runs: list[dict[str, Any]]) -> None:
    """Every setting must give none's loss and gradients: checkpointing only changes when activations are computed."""
    ref = runs[0]
    for r in runs[1:]:
        for key, a, b in (("loss", r["loss"], ref["loss"]), ("grad_norm", r["grads"]["grad_norm"],
                                                              ref["grads"]["grad_norm"])):
            if abs(a - b) > 1e-5 * abs(b):
                raise RuntimeError(f"setting {r['setting']}: {key} {a!r} differs from none's {b!r}: the settings do "
                                   "not compute the same thing, their memory and time are not comparable")


def report(runs: list[dict[str, Any]], info: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    """Print the tables and ratios; return (ratios per setting, targets)."""
    base = runs[0]
    base_t = base["saved"]["total"]
    ratios: dict[str, dict[str, float]] = {}
    mem_rows, time_rows = [], []
    for r in runs:
        s = r["saved"]
        wall, cpu = statistics.median(r["wall_s"]), statistics.median(r["cpu_s"])
        base_wall, base_cpu = statistics.median(base["wall_s"]), statistics.median(base["cpu_s"])
        rise = r["peak_rss_mib"] - r["rss_before_mib"]
        base_rise = base["peak_rss_mib"] - base["rss_before_mib"]
        ratios[r["setting"]] = {
            "activation_bytes": s["total"] / base_t,
            **{f"{k}_bytes": s["by_region"][k] / max(base["saved"]["by_region"][k], 1) for k in REGIONS},
            "peak_rss": r["peak_rss_mib"] / base["peak_rss_mib"], "step_rss_rise": rise / base_rise,
            "step_wall_s": wall / base_wall, "step_cpu_s": cpu / base_cpu}
        ratio = ratios[r["setting"]]
        mem_rows.append([r["setting"], s["total"] / MiB, ratio["activation_bytes"],
                         *(s["by_region"][k] / MiB for k in REGIONS), s["frame"] / MiB,
                         r["peak_rss_mib"], ratio["peak_rss"], rise, ratio["step_rss_rise"]])
        time_rows.append([r["setting"], wall, ratio["step_wall_s"], cpu, ratio["step_cpu_s"], r["loss"]])
    print_table(f"Kept for backward, one pack of {info['packing_length']} tokens ({info['samples']} samples, "
                f"{info['images']} images, {info['patches']} patches), wider tiny Kimi-VL, fp32 CPU (MiB)",
                ["setting", "activations", "x none", *REGIONS, "frame-only", "peak RSS", "x none", "step RSS rise",
                 "x none"], mem_rows)
    print_table(f"Step time (forward + backward), median of {len(base['wall_s'])}, one thread",
                ["setting", "wall s", "x none", "CPU s", "x none", "loss"], time_rows)
    for r in runs[1:]:
        x = ratios[r["setting"]]
        print(f"RATIO {r['setting']} / none: {x['activation_bytes']:.3f}x activation bytes "
              f"(decoder {x['decoder_bytes']:.3f}x, vision {x['vision_bytes']:.3f}x), {x['peak_rss']:.3f}x peak RSS, "
              f"{x['step_cpu_s']:.3f}x step CPU time ({x['step_wall_s']:.3f}x wall)")
    targets = [Target("both / none activation bytes", ratios["both"]["activation_bytes"], "<=", 0.5),
               Target("decoder / none decoder bytes", ratios["decoder"]["decoder_bytes"], "<=", 0.5),
               Target("vision / none vision-tower bytes", ratios["vision"]["vision_bytes"], "<=", 0.5)]
    targets += [Target(f"{name} / none step CPU time", ratios[name]["step_cpu_s"], "<=", 1.4)
                for name in ("decoder", "vision", "both")]
    return ratios, targets


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packing-length", type=int, default=None,
                        help=f"tokens in the pack (default {DEFAULT_LENGTH}; {QUICK_LENGTH} with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per setting (default 5; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: packing length {QUICK_LENGTH}, 1 repeat (unless given)")
    parser.add_argument("--seed", type=int, default=0,
                        help="weight initialisation seed (default 0); the data is the demo set of seed 0")
    add_json_argument(parser)
    # internal: worker processes
    parser.add_argument("--worker", choices=tuple(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--pack-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    length = args.packing_length or (QUICK_LENGTH if args.quick else DEFAULT_LENGTH)
    repeats = args.repeats or (1 if args.quick else 5)
    if repeats < 1 or length < 64:
        parser.error(f"need --repeats >= 1 and --packing-length >= 64, got {repeats} and {length}")

    torch.set_num_threads(1)
    if args.worker:
        result = run_setting(args.worker, args.pack_file, repeats, args.seed)
        args.result_file.write_text(json.dumps(asdict(result)))
        return 0

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        pack, info = build_pack(tmp / "data", length)
        config = wide_config()
        torch.save({"inputs": pack.to_model_inputs(), "config": config.to_save_dict()}, tmp / "pack.pt")
        print(f"pack: {info['samples']} demo samples, {info['real_tokens']} tokens + {info['padding_tokens']} padding, "
              f"{info['supervised_tokens']} supervised, {info['images']} images ({info['patches']} patches -> "
              f"{info['image_tokens']} LM tokens) (prepared in {time.perf_counter() - t0:.1f} s)")
        runs = []
        for setting in SETTINGS:
            t0 = time.perf_counter()
            runs.append(spawn(setting, tmp / "pack.pt", repeats, args.seed, tmp))
            print(f"  {setting}: {time.perf_counter() - t0:.1f} s")
    _check_same_computation(runs)
    ratios, targets = report(runs, info)
    met = check_targets(targets)
    n_params = sum(p.numel() for p in KimiVLForConditionalGeneration(config).parameters())
    write_json(args.json, {
        "benchmark": "memory", "device": "cpu", "dtype": "fp32", "torch": torch.__version__, "threads": 1,
        "model": {"config": "kimi_vl_tiny() widened", "text": WIDE_TEXT, "vision": WIDE_VISION,
                  "parameters": n_params},
        "pack": info, "repeats": repeats, "settings": {k: dict(zip(("decoder", "vision"), v))
                                                       for k, v in SETTINGS.items()},
        "runs": runs, "ratios": ratios, "targets": targets_json(targets), "all_targets_met": met})
    return 0


if __name__ == "__main__":
    sys.exit(main())
