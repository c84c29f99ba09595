"""`vlmtune train RECIPE [overrides]`: one explicit training loop, read top to bottom.

    setup     distributed -> run folder + resolved recipe -> assets (tiny model / demo data on first use)
              -> model (freeze, LoRA, rmpad, checkpointing, ZeRO-3 leaves) -> packs -> loader
              -> optimizer groups -> DeepSpeed engine -> resume
    train     for each optimizer step: this rank's micro-batches, each loss already a share of the
              step's global token-mean (denominators from the loader) -> backward -> step -> metrics
              -> checkpoint every save_every -> eval every eval_every
    cleanup   final checkpoint, summary table, loss.png, barrier, destroy the process group

The maths lives in the library (vlmtune.train.loss, vlmtune.data.loader); this file only calls it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmtune.config import Recipe, check_files, dump_recipe, load_recipe, save_resolved
from vlmtune.train import checkpointing as ckpt
from vlmtune.train.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from vlmtune.train.metrics import MetricsLogger
from vlmtune.train.schedule import lr_multiplier, set_lr

logger = logging.getLogger("vlmtune.train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Recipe fields that do not change what a run computes: a resume may change them freely.
RESUME_NEUTRAL = ("train.output_dir", "train.resume", "train.resume_ignore_changes", "train.save_every",
                  "train.keep_last", "train.eval_every", "train.eval_samples", "train.max_steps", "logging",
                  "launch", "data.loader_workers", "data.num_workers", "data.demo", "model.path", "model.preset",
                  "packing.pack_dir")


def model_dtype_of(recipe: Recipe) -> torch.dtype:
    return DTYPES[recipe.model.dtype]


class TrainError(RuntimeError):
    """A run that cannot start or continue, with the fix in the message."""


# ----------------------------------------------------------------------------------------------------------------
# setup helpers
# ----------------------------------------------------------------------------------------------------------------
def ensure_assets(recipe: Recipe) -> None:
    """Generate the tiny model and the demo data on first use (rank 0 only; others wait at a barrier)."""
    mp = Path(recipe.model.path)
    if recipe.model.preset and not (mp / "config.json").is_file():
        from vlmtune.models.kimi_vl.init_model import init_model

        logger.info("model.preset=%s: generating the model into %s", recipe.model.preset, mp)
        init_model(mp, preset=recipe.model.preset, seed=0)
    if recipe.data.demo:
        train_file = Path(recipe.data.train[0].path)
        if not train_file.is_file():
            from data_tools.demo_data import generate_demo_data

            logger.info("data.demo: generating the demo data into %s", train_file.parent)
            generate_demo_data(train_file.parent, seed=0)


def run_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe without the fields a resume may change (see RESUME_NEUTRAL)."""
    data = json.loads(recipe.model_dump_json())

    def drop(d: dict, dotted: str) -> None:
        head, _, rest = dotted.partition(".")
        if head in d:
            if rest:
                if isinstance(d[head], dict):
                    drop(d[head], rest)
            else:
                del d[head]

    for key in RESUME_NEUTRAL:
        drop(data, key)
    return data


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def build_model(recipe: Recipe, dist: DistInfo) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Load, freeze / LoRA, rmpad, checkpointing. Returns (model to train (maybe peft-wrapped), the inner VLM)."""
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration
    from vlmtune.train.modes import apply_lora
    from vlmtune.train.optim import apply_freeze

    m = recipe.model
    model = KimiVLForConditionalGeneration.from_pretrained(m.path, dtype=DTYPES[m.dtype])
    model.to(dist.device)
    vlm = model
    fz = m.freeze
    counts = apply_freeze(model, vision_tower=fz.vision_tower, projector=fz.projector, decoder=fz.decoder,
                          router=fz.router_frozen)
    logger.info("trainable parameters per part: %s", counts)
    if m.lora.enabled:
        model = apply_lora(model, m.lora, seed=recipe.train.seed)
    if m.rmpad:
        from vlmtune.patches.rmpad import apply_rmpad, rmpad_backend

        apply_rmpad(model, attention=m.attention)
        logger.info("rmpad: varlen forward installed, attention backend %s", rmpad_backend(model))
    gc = m.gradient_checkpointing
    if gc.vision and not any(p.requires_grad for p in vlm.vision_tower.parameters()):
        raise TrainError("model.gradient_checkpointing.vision is true but nothing in the vision tower trains (frozen, "
                         "no LoRA target in it): it runs under no_grad; set model.gradient_checkpointing.vision: false")
    vlm.gradient_checkpointing_enable(decoder=gc.decoder, vision=gc.vision, every_k=gc.every_k)
    # Every rank runs the vision tower in every micro-step (a dummy image on text-only packs, contributing an
    # exact zero), decided by the world size alone: ZeRO-3 gathers its parameters collectively.
    vlm.run_vision_on_text_only = dist.world_size > 1 or recipe.deepspeed.zero_stage == 3
    vlm.ce_chunk_size = recipe.train.ce_chunk_size
    return model, vlm


def build_source(recipe: Recipe, dist: DistInfo) -> Any:
    """The pack source: the offline pack folder (built on first use) or the on-the-fly packer."""
    from vlmtune.data.formats import DatasetSpec

    specs = [DatasetSpec(Path(d.path), d.weight, d.format, Path(d.image_root) if d.image_root else None)
             for d in recipe.data.train]
    p = recipe.packing
    if p.mode == "on_the_fly":
        from vlmtune.data.on_the_fly import OnTheFlySource

        return OnTheFlySource.from_datasets(
            specs, recipe.model.path, packing_length=p.packing_length, max_vision_patches=p.max_vision_patches,
            window=p.window, overlong=recipe.data.overlong, on_bad_sample=recipe.data.on_bad_sample,
            mixing_seed=p.seed, workers=recipe.data.num_workers, progress=dist.is_main,
            cache_dir=Path(recipe.train.output_dir) / "length_cache")
    from vlmtune.data.loader import OfflinePackSource
    from vlmtune.data.pack_cli import PackSettings, build_pack, default_cache_dir

    pack_dir = Path(p.pack_dir)
    if dist.is_main and not (pack_dir / "manifest.json").is_file():
        logger.info("packing the training data into %s", pack_dir)
        build_pack(specs, PackSettings(
            model_dir=Path(recipe.model.path), out=pack_dir, packing_length=p.packing_length,
            max_vision_patches=p.max_vision_patches, window=p.window, seed=p.seed, overlong=recipe.data.overlong,
            on_bad_sample=recipe.data.on_bad_sample, workers=recipe.data.num_workers,
            cache_dir=default_cache_dir(pack_dir), progress=True))
    barrier()
    source = OfflinePackSource(pack_dir)
    if source.packing_length != p.packing_length:
        raise TrainError(f"{pack_dir} was packed with packing_length {source.packing_length}, the recipe says "
                         f"{p.packing_length}: delete the folder or point packing.pack_dir elsewhere")
    return source


@dataclass
class RunState:
    step: int = 0


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------
def train(recipe: Recipe) -> dict[str, Any]:
    """Run a recipe to ``train.max_steps``. Returns the summary (rank 0; {} elsewhere)."""
    dist = init_distributed(recipe.launch.collective_timeout_s)
    linear = torch.nn.functional.linear
    try:
        return _train(recipe, dist)
    finally:
        # ZeRO-3 swaps torch.nn.functional.linear for its memory-efficient version process-wide ("persists unless
        # manually reset"); it saves frozen weights for backward too. Put torch's back for whatever runs next in
        # this process (export, evaluation, generation, another run).
        torch.nn.functional.linear = linear
        cleanup()


def _train(recipe: Recipe, dist: DistInfo) -> dict[str, Any]:
    import deepspeed

    from vlmtune.data.loader import PackedLoader
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.train.ds_config import (
        LossForward,
        build_ds_config,
        register_zero3_leaf_modules,
        zero3_single_dtype,
    )
    from vlmtune.train.flops import training_flops
    from vlmtune.train.optim import build_param_groups, make_optimizer

    t, ds = recipe.train, recipe.deepspeed
    out = Path(t.output_dir)
    ckpt_root = out / "checkpoints"
    world = dist.world_size
    accum = recipe.grad_accum_steps(world)

    # --- resume decision (before anything is written: a refused resume leaves the run folder as it was) ----------
    resume_from = _resume_path(recipe, ckpt_root)
    if resume_from is not None:
        _check_resumable(resume_from, recipe, dist)

    # --- run folder, assets --------------------------------------------------------------------------------------
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        removed = ckpt.clean_stale_tmp(ckpt_root)  # checkpoints killed mid-save: never resumed from
        if removed:
            logger.info("removed checkpoints killed mid-save: %s", ", ".join(removed))
        save_resolved(recipe, out)
        ensure_assets(recipe)
    barrier()
    missing = check_files(recipe)
    if missing:
        raise TrainError("cannot start:\n  " + "\n  ".join(missing))
    torch.manual_seed(t.seed)

    # --- model, data, optimizer, engine --------------------------------------------------------------------------
    model, vlm = build_model(recipe, dist)
    if ds.zero_stage == 3:
        n = register_zero3_leaf_modules(vlm)
        logger.info("ZeRO-3: %d MoE blocks registered as leaf modules", n)
        if model_dtype_of(recipe) != torch.float32:
            n = zero3_single_dtype(vlm, model_dtype_of(recipe))
            logger.info("ZeRO-3: %d router weights stored in %s (fp32 master copy in the optimizer, fp32 routing)",
                        n, recipe.model.dtype)
    source = build_source(recipe, dist)
    processor = KimiVLImageProcessor.from_pretrained(recipe.model.path)
    loader = PackedLoader(
        source, micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size, world_size=world,
        rank=dist.rank, seed=t.seed, pad_to_length=recipe.packing.packing_length if recipe.packing.pad_to_length
        else None, pad_token_id=vlm.config.text_config.pad_token_id, num_workers=recipe.data.loader_workers,
        balance=recipe.packing.balance_steps, image_processor=processor)
    groups = build_param_groups(model, lr=t.learning_rate, weight_decay=t.weight_decay,
                                part_lr={"vision_tower": t.vision_lr, "multi_modal_projector": t.projector_lr})
    try:
        optimizer = make_optimizer(groups, betas=tuple(t.adam_betas), eps=t.adam_eps, torch_adam=ds.torch_adam,
                                   offload_optimizer=ds.offload_optimizer == "cpu",
                                   device_type=dist.device.type)
    except ValueError as e:
        raise TrainError(str(e)) from None
    ds_cfg = build_ds_config(
        zero_stage=ds.zero_stage, micro_batch_size=t.micro_batch_size, grad_accum=accum, world_size=world,
        precision=recipe.precision, grad_clip=t.grad_clip, offload_optimizer=ds.offload_optimizer,
        offload_param=ds.offload_param, overlap_comm=ds.overlap_comm, reduce_bucket_size=ds.reduce_bucket_size,
        extra=ds.extra)
    if dist.is_main:
        (out / "deepspeed.json").write_text(json.dumps(ds_cfg, indent=2, sort_keys=True) + "\n")
    step_model = LossForward(model, vlm.get_output_embeddings().weight)
    if ds.zero_stage == 3:
        step_model.register_zero3()
    engine, optimizer, _, _ = deepspeed.initialize(model=step_model, optimizer=optimizer, config=ds_cfg)

    # --- resume -------------------------------------------------------------------------------------------------
    state = RunState()
    if resume_from is not None:
        # The optimizer state brings back the checkpoint's hyperparameters (base_lr, weight_decay, betas, eps); a
        # resume that was allowed to change them (train.resume_ignore_changes) must run with the recipe's.
        recipe_hparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = _load_checkpoint(resume_from, engine, loader, recipe, dist)
        for group, hparams in zip(optimizer.param_groups, recipe_hparams, strict=True):
            if group.get("name") != hparams.get("name"):
                raise TrainError(f"{resume_from}: optimizer group {group.get('name')} where the recipe builds "
                                 f"{hparams.get('name')}; the trainable parts changed, start a new train.output_dir")
            group.update(hparams)
        logger.info("resumed from %s at step %d", resume_from, state.step)

    metrics = MetricsLogger(out, enabled=dist.is_main, max_steps=t.max_steps, start_step=state.step,
                            tensorboard=recipe.logging.tensorboard, wandb=recipe.logging.wandb.model_dump(),
                            log_every=recipe.logging.log_every, plots=recipe.logging.plots,
                            show_progress=sys.stderr.isatty() or os.environ.get("VLMTUNE_PROGRESS") == "1")
    aux_coef = vlm.config.text_config.aux_loss_alpha if t.aux_loss_coef is None else t.aux_loss_coef
    for _, moe in vlm.language_model.model.moe_layers():
        moe.aux_loss_alpha = aux_coef  # the model's aux_loss_sum already carries this coefficient
    # DeepSpeed records the pre-clipping norm in its ZeRO and bf16 optimizers only: stage 0 in fp32/fp64 measures here.
    own_norm = ds.zero_stage == 0 and recipe.precision != "bf16"
    warmup = t.warmup_steps
    model_dtype = DTYPES[recipe.model.dtype]
    engine.train()

    # --- train --------------------------------------------------------------------------------------------------
    data_iter = _steps(loader)
    while state.step < t.max_steps:
        t0 = time.time()
        micro_batches, info = next(data_iter)
        if len(micro_batches) != accum:
            raise TrainError(f"loader gave {len(micro_batches)} micro-batches for accumulation {accum}")
        mult = lr_multiplier(state.step, schedule=t.schedule, max_steps=t.max_steps, warmup=warmup,
                             min_lr_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)
        lrs = set_lr(optimizer, mult)
        loss_share, aux_share = 0.0, 0.0
        local_tokens = local_padding = 0
        for mb in micro_batches:
            mb = mb.to(dist.device, dtype=model_dtype)
            out_ = engine(**_model_inputs(mb, recipe.model.rmpad), return_logits=False,
                          loss_reduction=t.loss_reduction, loss_denominators=info.denominators)
            # The aux loss: a mean over the global batch's sequences (aux_loss_sum carries the coefficient).
            aux = out_["aux_loss_sum"] / max(info.num_packed_samples, 1)
            engine.backward((out_["loss"] + aux) * world, scale_wrt_gas=False)
            if own_norm and engine.is_gradient_accumulation_boundary():
                grad_norm = _grad_norm(engine.module)  # grads already all-reduced, not yet clipped
            engine.step()
            loss_share += float(out_["loss"].detach())
            aux_share += float(aux.detach())
            local_tokens += mb.num_tokens - mb.num_padding
            local_padding += mb.num_padding
        if t.router_bias_update_rate > 0:
            vlm.language_model.model.update_router_bias(t.router_bias_update_rate)
        loss, aux_total, tokens, padding = all_reduce_sum([loss_share, aux_share, local_tokens, local_padding],
                                                          dist.device)
        state.step += 1
        dt = time.time() - t0
        if not own_norm:
            grad_norm = engine.get_global_grad_norm()
        load = vlm.language_model.model.expert_load()
        flops = _step_flops(vlm.config, info, training_flops)
        record = {
            "step": state.step, "loss": loss, "lr": lrs[0], "grad_norm": _as_float(grad_norm),
            "tokens": int(tokens), "supervised_tokens": info.num_supervised_tokens,
            "samples": info.num_packed_samples, "tokens_per_s": tokens / dt,
            "padding_fraction": padding / max(tokens + padding, 1), "aux_loss": aux_total,
            "expert_load_max_mean": load.get("moe/load_max_over_mean"), "step_time_s": dt, "tflops": flops / dt / 1e12,
            "mfu": _mfu(flops / dt, dist.device, world), "imbalance": info.imbalance, "epoch": info.epoch,
        }
        if recipe.data.eval and (state.step == t.max_steps or (t.eval_every and state.step % t.eval_every == 0)):
            record.update(run_eval(recipe, vlm, dist, model_dtype))
        metrics.log_step(record)
        if not math.isfinite(loss):
            raise TrainError(f"step {state.step}: loss is {loss}; lower train.learning_rate or check the data")
        if state.step % t.save_every == 0 or state.step == t.max_steps:
            _save_checkpoint(engine, loader, recipe, state, dist, ckpt_root)

    # --- cleanup ------------------------------------------------------------------------------------------------
    summary = metrics.summary({"world_size": world, "zero_stage": ds.zero_stage,
                               "checkpoint": str(ckpt.latest_checkpoint(ckpt_root))}) if dist.is_main else {}
    metrics.close()
    if dist.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def run_eval(recipe: Recipe, vlm: torch.nn.Module, dist: DistInfo, dtype: torch.dtype) -> dict[str, Any]:
    """Eval loss and closed-set accuracy on data.eval (every rank evaluates the same samples)."""
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.tokenization import KimiTokenizer
    from vlmtune.train.evaluate import evaluate

    tok = KimiTokenizer.from_pretrained(recipe.model.path)
    proc = KimiVLImageProcessor.from_pretrained(recipe.model.path)
    out: dict[str, Any] = {}
    for i, spec in enumerate(recipe.data.eval or []):
        r = evaluate(vlm, tok, proc, Path(spec.path), max_samples=recipe.train.eval_samples, device=dist.device,
                     dtype=dtype)
        sfx = "" if i == 0 else f"_{i}"
        out.update({f"eval_loss{sfx}": r["eval_loss"], f"eval_accuracy{sfx}": r["accuracy"],
                    f"eval_accuracy_image{sfx}": r["accuracy_image_questions"],
                    f"eval_chance{sfx}": r["chance_accuracy"]})
    return out


def _steps(loader: Any):
    while True:
        yielded = False
        for item in loader:
            yielded = True
            yield item
        if not yielded:
            raise TrainError("the loader produced no step: fewer packs than train.global_batch_size?")


def _model_inputs(mb: Any, rmpad: bool) -> dict[str, Any]:
    return mb.to_model_inputs() if rmpad else mb.to_padded()


def _grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the (replicated, ZeRO-0) gradients, accumulated in float64 like DeepSpeed's ZeRO norm."""
    sq = sum(float(torch.linalg.vector_norm(p.grad, dtype=torch.float64)) ** 2
             for p in module.parameters() if p.grad is not None)
    return math.sqrt(sq)


def _as_float(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def _step_flops(config: Any, info: Any, fn: Any) -> float:
    seqlens = getattr(info, "seqlens", None)
    grids = getattr(info, "grids", None)
    if seqlens is None or grids is None:
        # StepInfo carries totals only: estimate with one segment per sample of the mean length.
        n = max(info.num_packed_samples, 1)
        mean = info.num_tokens / n
        return fn(config, [int(mean)] * n, []) + _vision_flops(config, info.num_patches, fn)
    return fn(config, seqlens, grids)


def _vision_flops(config: Any, patches: int, fn: Any) -> float:
    # Linear part of the vision tower (per patch); attention terms need per-image grids.
    from vlmtune.train.flops import projector_params, vision_params_per_patch

    return 3.0 * 2.0 * (vision_params_per_patch(config) + projector_params(config) / 4) * patches


_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _mfu(flops_per_s: float, device: torch.device, world: int) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_TFLOPS.items():
        if key in name:
            return flops_per_s * world / (peak * 1e12 * world)
    return None


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------
def _resume_path(recipe: Recipe, root: Path) -> Path | None:
    r = recipe.train.resume
    if str(r) == "never":
        if ckpt.list_checkpoints(root):
            raise TrainError(f"train.resume=never but {root} holds checkpoints: use train.resume=auto, a path, "
                             "or another train.output_dir")
        return None
    if str(r) == "auto":
        return ckpt.latest_checkpoint(root)
    path = Path(r)
    if not (path / "trainer_state.json").is_file():
        raise TrainError(f"train.resume={path}: not a complete vlmtune checkpoint (no trainer_state.json)")
    return path


def _save_checkpoint(engine: Any, loader: Any, recipe: Recipe, state: RunState, dist: DistInfo,
                     root: Path) -> None:
    tmp = ckpt.tmp_dir_for(root, state.step)
    if dist.is_main:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp / "engine"), tag="state", save_latest=False)
    ckpt.save_rng(tmp / f"rng-rank{dist.rank:05d}.pt")
    barrier()
    if dist.is_main:
        fp = run_fingerprint(recipe)
        ckpt.write_json_atomic(tmp / "trainer_state.json", {
            "step": state.step, "world_size": dist.world_size, "loader": loader.state_dict(),
            "fingerprint": fp, "fingerprint_sha": hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest(),
            "recipe": dump_recipe(recipe)})
        ckpt.finalize(root, state.step, recipe.train.keep_last or 0)
    barrier()


def _check_resumable(path: Path, recipe: Recipe, dist: DistInfo) -> None:
    """Refuse (TrainError) a resume whose recipe changed in a run-affecting field (a world-size change is allowed:
    the checkpoint is resharded, see vlmtune/train/reshard.py)."""
    st = json.loads((path / "trainer_state.json").read_text())
    changed = _diff(st["fingerprint"], run_fingerprint(recipe))
    if changed and not recipe.train.resume_ignore_changes:
        raise TrainError(f"{path}: the recipe changed since this checkpoint in fields that alter the run:\n  "
                         + "\n  ".join(changed) + "\nrevert them, start a new train.output_dir, or set "
                         "train.resume_ignore_changes=true")


def _load_checkpoint(path: Path, engine: Any, loader: Any, recipe: Recipe, dist: DistInfo) -> RunState:
    st = json.loads((path / "trainer_state.json").read_text())
    resharded = st["world_size"] != dist.world_size
    if resharded:
        # Another world size: consolidate the ZeRO partitions (DeepSpeed universal format) and take this rank's share.
        from vlmtune.train.reshard import ReshardError, load_resharded

        try:
            info = load_resharded(engine, path, is_main=dist.is_main, barrier=barrier)
        except ReshardError as e:
            raise TrainError(str(e)) from None
        logger.info("resumed a %d-rank checkpoint on %d ranks: %s", st["world_size"], dist.world_size, info)
    else:
        load_path, _ = engine.load_checkpoint(str(path / "engine"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise TrainError(f"{path}: DeepSpeed found no engine state to load")
    loader.load_state_dict(st["loader"])
    rng = path / f"rng-rank{dist.rank:05d}.pt"
    if rng.is_file():
        ckpt.load_rng(rng)
    elif resharded:
        logger.info("rank %d did not exist in the %d-rank run: its random state starts from the seed",
                    dist.rank, st["world_size"])
    else:
        raise TrainError(f"{path}: no {rng.name}, so rank {dist.rank} cannot restore its random state; the checkpoint "
                         "is incomplete, resume from an earlier one (train.resume=PATH)")
    return RunState(step=int(st["step"]))


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def _user_errors() -> tuple[type[Exception], ...]:
    """The library's errors that describe a fix for the user (each message names the file, sample or key)."""
    from vlmtune.data.chat_template import ChatTemplateError
    from vlmtune.data.formats import DataFormatError
    from vlmtune.data.ingest import IngestError
    from vlmtune.data.loader import LoaderError
    from vlmtune.data.pack_output import PackFormatError
    from vlmtune.models.kimi_vl.checkpoint import CheckpointError
    from vlmtune.models.kimi_vl.tokenization import TokenizerFileError
    from vlmtune.ops.attention import AttentionBackendError
    from vlmtune.patches.rmpad import RmpadError
    from vlmtune.train.modes import LoraError

    return (TrainError, LoaderError, PackFormatError, IngestError, DataFormatError, ChatTemplateError, CheckpointError,
            TokenizerFileError, AttentionBackendError, RmpadError, LoraError)


def main(argv: list[str]) -> int:
    """`vlmtune train RECIPE [key=value ...]`."""
    import argparse

    from vlmtune.cli import parse_with_overrides
    from vlmtune.config import RecipeError

    parser = argparse.ArgumentParser(prog="vlmtune train", description="Train a recipe (DeepSpeed ZeRO).")
    parser.add_argument("recipe", type=Path, help="the recipe YAML")
    args, overrides = parse_with_overrides(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    user_errors = _user_errors()
    try:
        recipe = load_recipe(args.recipe, overrides, world_size=world)
    except RecipeError as e:
        for line in getattr(e, "problems", [str(e)]):
            print(f"error: {line}", file=sys.stderr)
        return 2
    try:
        summary = train(recipe)
    except user_errors as e:  # a problem with the recipe, data, checkpoint or model files: one line, no traceback
        print(f"vlmtune train: error: {e}", file=sys.stderr)
        return 1
    if summary:
        print(json.dumps(summary, sort_keys=True))
    return 0
