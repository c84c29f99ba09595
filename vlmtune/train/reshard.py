"""Resume a checkpoint on another world size (or ZeRO stage): consolidate, then re-partition.

DeepSpeed's ZeRO checkpoints are partitioned: rank r of W holds 1/W of the flat fp32 master weights and of the Adam
moments (``zero_pp_rank_{r}_mp_rank_00_optim_states.pt``), so ``engine.load_checkpoint`` refuses another W. The
change of world size goes through one world-size-free layout, DeepSpeed's *universal checkpoint*::

    step-00000020/engine/state/        the checkpoint as written (W partitions)
        |  convert_to_universal(): DeepSpeed's ds_to_universal, in a subprocess, rank 0 only, once
        v
    step-00000020/engine/universal/zero/<param name>/{fp32,exp_avg,exp_avg_sq}.pt   one full tensor each
        |  restore_from_universal(): on the new engine (any W', any ZeRO stage), every rank
        v
    safe_set_full_fp32_param / safe_set_full_optimizer_state (DeepSpeed's public API) -> this rank's partition
    + the module's own weights (the copy the forward uses) + Adam's step count + buffers (router bias)

Why not DeepSpeed's own ``checkpoint.load_universal``: measured with DeepSpeed 0.19.8 on the tiny model, its ZeRO-3
path restores the weights (the first resumed step's loss is exact) but not the optimizer update (the second resumed
step's loss is off by 6e-3), and it copies param group 0's hyper-parameters (lr, base_lr, weight_decay) onto every
group, which would erase vlmtune's per-part learning rates and no-decay groups. The public per-parameter setters used
here leave the param groups alone, and the tests check the whole resumed loss curve.

Frozen parameters are not in the optimizer: the trainer reloads them from model.path, unchanged by training.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENGINE_DIR = "engine"
STATE_TAG = "state"
UNIVERSAL_TAG = "universal"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class ReshardError(RuntimeError):
    """A checkpoint that cannot be re-partitioned, with the reason and the fix."""


def universal_dir(checkpoint: Path) -> Path:
    """Where the consolidated (universal) form of a vlmtune checkpoint lives."""
    return Path(checkpoint) / ENGINE_DIR / UNIVERSAL_TAG


def is_partitioned(checkpoint: Path) -> bool:
    """True when the checkpoint's optimizer state is split per rank (ZeRO >= 1, or DeepSpeed's bf16 optimizer).

    A ZeRO-0 fp32 checkpoint keeps the whole optimizer in ``mp_rank_00_model_states.pt`` and loads on any world size.
    """
    return any((Path(checkpoint) / ENGINE_DIR / STATE_TAG).glob("*_optim_states.pt"))


def convert_to_universal(checkpoint: Path, workers: int = 1, timeout_s: float | None = None) -> Path:
    """Consolidate a checkpoint's ZeRO partitions into one full tensor per parameter (once; later calls reuse it).

    Runs DeepSpeed's converter (``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state``) in a
    subprocess: it forks worker pools, which must not inherit a process group or a CUDA context. The result is
    written to a temporary folder and renamed into place, so a killed conversion leaves nothing half-written.

    Args:
        checkpoint: a vlmtune checkpoint folder (``step-XXXXXXXX``).
        workers: extraction processes (memory grows with them: each holds one rank's partition file).
        timeout_s: give up after this long (None = no limit).

    Returns:
        The universal folder (``<checkpoint>/engine/universal``).

    Raises:
        ReshardError: no partitioned DeepSpeed state in the checkpoint, or the converter failed (its output quoted).
    """
    checkpoint = Path(checkpoint)
    out = universal_dir(checkpoint)
    if (out / "zero").is_dir():
        return out
    state = checkpoint / ENGINE_DIR / STATE_TAG
    if not is_partitioned(checkpoint):
        raise ReshardError(f"{state} holds no partitioned ZeRO optimizer state (*_optim_states.pt); nothing to "
                           "consolidate (a ZeRO-0 checkpoint loads on any world size as it is)")
    tmp = out.with_name(f".tmp-{UNIVERSAL_TAG}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(state),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2))]
    logger.info("consolidating %s for a world-size change: %s", state, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not (tmp / "zero").is_dir():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ReshardError(f"consolidating {state} failed (ds_to_universal exit code {proc.returncode}):\n{tail}")
    tmp.rename(out)
    return out


def _tensor(path: Path) -> torch.Tensor:
    obj = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's own files: {"param": T, ...} or T
    return obj["param"] if isinstance(obj, dict) else obj


def _adam_step(zero_dir: Path, some_param: str) -> float:
    """Adam's step count in a universal folder (ZeRO-1/2: per-parameter step.pt; ZeRO-3: optimizer_state.pt)."""
    per_param = zero_dir / some_param / "step.pt"
    if per_param.is_file():
        return float(_tensor(per_param))
    common = zero_dir / "optimizer_state.pt"
    if common.is_file():
        sd = torch.load(common, map_location="cpu", weights_only=False)
        states = sd.get("optimizer_state_dict", {}).get("state", {})
        for st in states.values():
            if "step" in st:
                return float(st["step"])
    raise ReshardError(f"{zero_dir}: no Adam step count (neither {per_param.name} nor optimizer_state.pt holds one)")


def _model_states_file(state_dir: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (state_dir / name).is_file():
            return state_dir / name
    raise ReshardError(f"{state_dir}: no DeepSpeed model states file (mp_rank_00_model_states.pt)")


def _ensure_adam_state(zero_optimizer: Any, step: float) -> None:
    """Create Adam's state for every flat fp32 partition that has none yet, and link it to the parameters.

    ZeRO-1/2 create the torch optimizer's state lazily, at the first step, and only then link each parameter to its
    fragment of ``exp_avg`` / ``exp_avg_sq``; ``safe_set_full_optimizer_state`` needs that link, so a resume before
    the first step creates the state (the torch AdamW layout: step, exp_avg, exp_avg_sq) and links it here. ZeRO-3
    keeps its flat partitions out of the param groups between steps (``fp32_partitioned_groups_flat``) and reads
    the state by partition, so creating it is enough there.
    """
    base = zero_optimizer.optimizer
    flats = [flat for group in base.param_groups for flat in group["params"]]
    flats += list(getattr(zero_optimizer, "fp32_partitioned_groups_flat", []))
    created = False
    for flat in flats:
        if flat.numel() and not base.state.get(flat):
            base.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
            created = True
    if created and hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._lazy_init_hp_params_optimizer_state()  # DeepSpeed >= 0.10, ZeRO-1/2


def _set_module_weight(param: torch.nn.Parameter, full: torch.Tensor, zero_stage: int) -> None:
    """Write the full value into the weight the forward uses (ZeRO-3: gathered, then re-partitioned)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(full.view(param.shape).to(device=param.device, dtype=param.dtype))
    else:
        param.data.copy_(full.view(param.shape).to(device=param.device, dtype=param.dtype))


def restore_from_universal(engine: Any, universal: Path) -> dict[str, Any]:
    """Load a universal checkpoint into a freshly initialised DeepSpeed engine, partitioned for its own world size.

    For every trainable parameter: fp32 master weight, Adam ``exp_avg`` and ``exp_avg_sq`` (this rank's share, via
    DeepSpeed's ``safe_set_full_*`` API) and the module weight; then Adam's step count, the engine's step counters
    and the module buffers (e.g. the MoE router's ``e_score_correction_bias``). The optimizer's param groups (per-part
    learning rates, weight decay) are left as the recipe built them.

    Args:
        engine: the engine from ``deepspeed.initialize`` (ZeRO stage 1-3, any world size), before any step.
        universal: the folder :func:`convert_to_universal` returned.

    Returns:
        ``{"parameters": n restored, "adam_step": step, "global_steps": engine steps}``.

    Raises:
        ReshardError: a trainable parameter missing from the checkpoint, or of another shape (different model or
            LoRA settings), naming the parameter.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero_dir = Path(universal) / "zero"
    stage = int(engine.zero_optimization_stage())
    if stage == 0:
        raise ReshardError("restore_from_universal needs a ZeRO engine (stage 1-3); a ZeRO-0 run loads the "
                           "checkpoint with engine.load_checkpoint on any world size")
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    missing = [n for n, _ in trainable if not (zero_dir / n / "fp32.pt").is_file()]
    if missing:
        raise ReshardError(f"{universal} does not match this model: {len(missing)} trainable parameter(s) are not in "
                           "it:\n  " + "\n  ".join(missing[:10]) + "\nresume with the model and LoRA settings of the "
                           "run that wrote it")
    step = _adam_step(zero_dir, trainable[0][0]) if trainable else 0.0
    _ensure_adam_state(engine.optimizer, step)
    for name, p in trainable:
        shape = tuple(getattr(p, "ds_shape", p.shape))
        fp32 = _tensor(zero_dir / name / "fp32.pt")
        if fp32.numel() != math.prod(shape):
            raise ReshardError(f"{universal}: {name} has {fp32.numel()} elements in the checkpoint, shape {shape} in "
                               "this model; resume with the model of the run that wrote it")
        fp32 = fp32.reshape(shape)  # ZeRO-3 checkpoints store parameters flat
        safe_set_full_fp32_param(p, fp32)
        for key in ADAM_KEYS:
            safe_set_full_optimizer_state(p, _tensor(zero_dir / name / f"{key}.pt").reshape(shape), key)
        _set_module_weight(p, fp32, stage)

    base = engine.optimizer.optimizer  # the torch optimizer inside DeepSpeed's ZeRO wrapper
    for st in base.state.values():
        if "step" in st:
            st["step"] = torch.tensor(step, dtype=torch.float32) if torch.is_tensor(st["step"]) else int(step)

    states = torch.load(_model_states_file(Path(universal)), map_location="cpu", weights_only=False)
    buffers = dict(engine.module.named_buffers())
    for name in states.get("buffer_names") or []:
        if name in buffers and name in states["module"]:
            buffers[name].data.copy_(states["module"][name].to(buffers[name].dtype))
    engine.global_steps = int(states.get("global_steps", 0))
    engine.global_samples = int(states.get("global_samples", 0))
    return {"parameters": len(trainable), "adam_step": step, "global_steps": engine.global_steps}


def load_resharded(engine: Any, checkpoint: Path, *, is_main: bool, barrier: Callable[[], None],
                   workers: int = 1) -> dict[str, Any]:
    """Resume ``engine`` from a checkpoint written with another world size (the trainer's entry point).

    Rank 0 consolidates the checkpoint once (:func:`convert_to_universal`) while the other ranks wait at
    ``barrier``; then every rank takes its share (:func:`restore_from_universal`). A ZeRO-0 fp32 checkpoint is not
    partitioned and goes through ``engine.load_checkpoint`` unchanged.

    Args:
        engine: the new engine, initialised for the new world size, before any step.
        checkpoint: the vlmtune checkpoint folder (``step-XXXXXXXX``).
        is_main: True on global rank 0.
        barrier: the trainer's barrier (under the collective timeout: a very large model converts offline first,
            with ``python -m vlmtune.train.reshard CHECKPOINT``).
        workers: extraction processes for the conversion.

    Returns:
        What was restored (see :func:`restore_from_universal`).
    """
    checkpoint = Path(checkpoint)
    if not is_partitioned(checkpoint):
        path, _ = engine.load_checkpoint(str(checkpoint / ENGINE_DIR), tag=STATE_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise ReshardError(f"{checkpoint}: DeepSpeed found no engine state to load")
        return {"parameters": None, "adam_step": None, "global_steps": engine.global_steps}
    error: Exception | None = None
    if is_main:
        try:
            convert_to_universal(checkpoint, workers=workers)
        except Exception as exc:  # noqa: BLE001 - re-raised after the barrier, so the other ranks do not hang
            error = exc
    barrier()
    if error is not None:
        raise error
    if not (universal_dir(checkpoint) / "zero").is_dir():
        raise ReshardError(f"{universal_dir(checkpoint)} is missing after rank 0 converted it: the nodes must share "
                           "the checkpoint folder (or convert it beforehand on each node)")
    return restore_from_universal(engine, universal_dir(checkpoint))


def main(argv: list[str] | None = None) -> int:
    """``python -m vlmtune.train.reshard CHECKPOINT [--workers N]``: consolidate ahead of a world-size change."""
    import argparse

    parser = argparse.ArgumentParser(prog="vlmtune reshard", description="Consolidate a checkpoint's ZeRO partitions "
                                     "(DeepSpeed universal format) so it can resume on another world size.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder, e.g. runs/x/checkpoints/step-00000100")
    parser.add_argument("--workers", type=int, default=4, help="extraction processes (default 4)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = convert_to_universal(args.checkpoint, workers=args.workers)
    except ReshardError as exc:
        print(f"vlmtune reshard: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
