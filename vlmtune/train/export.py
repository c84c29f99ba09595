"""`vlmtune export CKPT_DIR --out DIR [--merge-lora | --adapter-only]`: a trainer checkpoint -> a usable HF model folder.

    vlmtune export runs/tiny_cpu/checkpoints/step-00000060 --out runs/tiny_cpu/export
    vlmtune export runs/tiny_cpu --out export_lora --merge-lora       # a run folder: its latest checkpoint
    vlmtune export runs/lora/checkpoints --out adapter --adapter-only

Where the weights come from (``<ckpt>/engine/state``, written by DeepSpeed's ``save_checkpoint(tag="state")``)::

    ZeRO 0/1/2   mp_rank_00_model_states.pt["module"]     the engine module's full weights, in the training dtype
                 read with torch.load(weights_only=True): plain tensors and containers, nothing unpickled
    ZeRO-3       zero_pp_rank_R_mp_rank_00_*.pt (+ optim)  each rank holds a shard: gathered into one fp32 state dict
                 by deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint (offline, CPU)

DeepSpeed's ZeRO-3 reader unpickles its files (``torch.load(weights_only=False)``), and so do we as a fallback for a
ZeRO 0/1/2 file that the safe loader refuses. That is only done for files inside a directory that is verifiably a
vlmtune checkpoint (``trainer_state.json`` next to ``engine/state``): our own training output, never a downloaded file.
Do not export checkpoints you did not produce.

Keys are mapped to the published Kimi-VL names by stripping the wrappers' prefixes (DeepSpeed ``module.``,
``torch.compile``'s ``_orig_mod.``, the trainer's loss wrapper ``model.``, peft's ``base_model.model.`` and
``.base_layer``); LoRA tensors are
``<module>.lora_A|lora_B.default.weight``. Tensors are written in the recipe's ``model.dtype`` (router parameters stay at
least float32, as the loader keeps them), i.e. the weights the trained engine ran with.

Modes:

* ``full`` (default): the model, all weights; a checkpoint with LoRA adapters must pick one of the two modes below.
* ``merge_lora``: ``W + (alpha / r) * B @ A`` for every adapted linear (computed in float32 or wider, cast once), written
  as a plain model.
* ``adapter_only``: a peft adapter folder (adapter_config.json + adapter_model.safetensors) that loads with
  ``PeftModel.from_pretrained(KimiVLForConditionalGeneration.from_pretrained(base), DIR)``. Base weights that training
  changed outside the adapters (e.g. an unfrozen vision tower or projector) are saved as peft ``modules_to_save``
  (whole ``vision_tower`` / ``multi_modal_projector``, else the owning module), found by comparing the checkpoint with
  the base model folder; a base weight under an adapter that changed cannot be expressed and is an error.

Every export folder also gets the base model folder's tokenizer files (tiktoken.model, tokenizer_config.json),
preprocessor_config.json, chat template and generation_config.json (the base is ``model.path`` of the recipe stored in
trainer_state.json), plus ``vlmtune_export.json`` (checkpoint, step, mode, ZeRO stage). The folder is written next to
its destination and renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

logger = logging.getLogger(__name__)

MODES = ("full", "merge_lora", "adapter_only")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
ENGINE_TAG = "state"  # the trainer's engine.save_checkpoint(..., tag="state")
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0/1/2
ZERO3_MODEL_STATES_GLOB = "zero_pp_rank_*_mp_rank_00_model_states.pt"
# Files of the base folder that an export must carry so the result is usable (tokenizer, processor).
REQUIRED_ASSETS = ("tiktoken.model", "tokenizer_config.json", "preprocessor_config.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Never copied from the base folder: weights and what the export writes itself.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "adapter_config.json", "vlmtune_export.json"}
# Wrapper prefixes: DeepSpeed, torch.compile, peft, and the trainer's loss wrapper (``model.``). No published key starts
# with any of them (the top-level parts are vision_tower, multi_modal_projector, language_model).
_PREFIXES = ("module.", "_orig_mod.", "base_model.model.", "model.")
_LORA_PARTS = (".lora_A.", ".lora_B.")


class ExportError(RuntimeError):
    """An export that cannot be done as asked (the message names the file or key and the fix)."""


# ----------------------------------------------------------------------------------------------------------------
# the checkpoint
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    """What an export needs to know about a trainer checkpoint.

    Attributes:
        path: the ``step-XXXXXXXX`` folder. step: its optimizer step. recipe: the run's recipe (``Recipe``).
        base_dir: the base model folder (``model.path``). zero_stage: DeepSpeed ZeRO stage of the run.
        dtype: the training dtype (``model.dtype``).
    """

    path: Path
    step: int
    recipe: Any
    base_dir: Path
    zero_stage: int
    dtype: torch.dtype


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step-XXXXXXXX`` folder from itself, a ``checkpoints`` folder or a run folder (their latest checkpoint)."""
    from vlmtune.train.checkpointing import latest_checkpoint

    p = Path(path)
    if (p / "trainer_state.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise ExportError(f"{p}: not a vlmtune checkpoint (no trainer_state.json), nor a run / checkpoints folder holding "
                      "one; give <train.output_dir>/checkpoints/step-XXXXXXXX")


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Validate a trainer checkpoint folder and read its recipe (JSON + YAML only: nothing is unpickled here)."""
    from vlmtune.config import RecipeError, recipe_from_dict

    ckpt = resolve_checkpoint(path)
    state_file = ckpt / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        recipe_text = state["recipe"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ExportError(f"{state_file}: unreadable or without the recipe ({err}); was it written by vlmtune train?") from err
    try:
        recipe = recipe_from_dict(yaml.safe_load(recipe_text), world_size=int(state.get("world_size", 1)),
                                  source=f"{state_file}:recipe")
    except RecipeError as err:
        raise ExportError(f"{state_file}: the stored recipe does not validate with this vlmtune version:\n{err}") from err
    if not (ckpt / "engine" / ENGINE_TAG).is_dir():
        raise ExportError(f"{ckpt}: no engine/{ENGINE_TAG} folder (DeepSpeed state); the checkpoint is incomplete")
    base = Path(recipe.model.path)
    if not (base / "config.json").is_file():
        raise ExportError(f"{ckpt} was trained from model.path={base}, which has no config.json any more; the export "
                          "takes the config, tokenizer and processor files from there: restore that folder")
    return CheckpointInfo(path=ckpt, step=int(state.get("step", 0)), recipe=recipe, base_dir=base,
                          zero_stage=int(recipe.deepspeed.zero_stage), dtype=DTYPES[recipe.model.dtype])


def _load_pt(file: Path) -> Any:
    """torch.load a DeepSpeed file of a verified vlmtune checkpoint: the safe loader first, unpickling as a fallback."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        logger.info("%s holds objects the weights-only loader refuses; loading it fully (a vlmtune checkpoint file)",
                    file)
        return torch.load(file, map_location="cpu", weights_only=False)  # noqa: S614 - our own checkpoint, see docstring


def load_engine_state(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The engine module's weights and buffers, under the engine's own key names (peft prefixes included).

    ZeRO 0/1/2: the module state of ``mp_rank_00_model_states.pt``. ZeRO-3: the shards gathered into fp32 by
    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (frozen parameters and buffers included).
    """
    state_dir = info.path / "engine" / ENGINE_TAG
    plain = state_dir / MODEL_STATES
    zero3 = sorted(state_dir.glob(ZERO3_MODEL_STATES_GLOB))
    if info.zero_stage == 3:
        if not zero3:
            raise ExportError(f"{state_dir}: the recipe says ZeRO-3 but there is no {ZERO3_MODEL_STATES_GLOB}")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep stdout for our result
            state = get_fp32_state_dict_from_zero_checkpoint(str(info.path / "engine"), tag=ENGINE_TAG)
        return dict(state)
    if not plain.is_file():
        raise ExportError(f"{state_dir}: no {MODEL_STATES} for a ZeRO-{info.zero_stage} checkpoint")
    states = _load_pt(plain)
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict) or not module:
        raise ExportError(f"{plain}: no 'module' weights inside (is it a DeepSpeed model-states file?)")
    empty = [k for k, v in module.items() if torch.is_tensor(v) and v.numel() == 0]
    if empty:
        raise ExportError(f"{plain}: {len(empty)} empty (partitioned) tensors, e.g. {empty[0]}: a ZeRO-3 checkpoint? "
                          "its recipe says ZeRO-{info.zero_stage}")
    return dict(module)


# ----------------------------------------------------------------------------------------------------------------
# key mapping
# ----------------------------------------------------------------------------------------------------------------
def published_name(key: str) -> str:
    """Engine key -> published Kimi-VL name (LoRA keys become ``<module>.lora_A.weight``)."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    key = key.replace(".base_layer.", ".")
    for part in _LORA_PARTS:
        if part in key:
            head, _, tail = key.partition(part)
            adapter, _, rest = tail.partition(".")
            if adapter != "default" or rest != "weight":
                raise ExportError(f"LoRA tensor {key}: only the 'default' adapter's weight is supported (got adapter "
                                  f"{adapter!r}, {rest!r})")
            return f"{head}{part}weight"
    if "lora_" in key:
        raise ExportError(f"{key}: a peft tensor other than lora_A / lora_B (DoRA magnitude, embedding LoRA?) is not "
                          "supported by vlmtune export")
    return key


def split_state(raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Engine state -> (base weights by published name, {adapted module: (lora_A (r, in), lora_B (out, r))})."""
    base: dict[str, torch.Tensor] = {}
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if not torch.is_tensor(tensor):
            continue
        name = published_name(key)
        if name.endswith(".lora_A.weight"):
            a[name[: -len(".lora_A.weight")]] = tensor
        elif name.endswith(".lora_B.weight"):
            b[name[: -len(".lora_B.weight")]] = tensor
        elif name in base:
            raise ExportError(f"two checkpoint tensors map to {name} (one of them {key})")
        else:
            base[name] = tensor
    if set(a) != set(b):
        raise ExportError(f"LoRA pairs incomplete: lora_A without lora_B on {sorted(set(a) - set(b))[:3]}, lora_B "
                          f"without lora_A on {sorted(set(b) - set(a))[:3]}")
    return base, {m: (a[m], b[m]) for m in sorted(a)}


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from vlmtune.models.kimi_vl.checkpoint import FP32_KEYS

    if not tensor.is_floating_point():
        return tensor
    if FP32_KEYS.match(name):  # router: at least float32
        return tensor.to(torch.promote_types(dtype, torch.float32))
    return tensor.to(dtype)


def _meta_model(base_dir: Path) -> Any:
    from vlmtune.models.kimi_vl import KimiVLConfig, KimiVLForConditionalGeneration

    config = KimiVLConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    model.name_or_path = str(base_dir)
    return model


def _check_against_model(state: dict[str, torch.Tensor], model: Any, where: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{where}: the checkpoint's weights do not match the base model config: missing "
                          f"{len(missing)} (e.g. {missing[:3]}), unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
    bad = [(k, tuple(v.shape), expected[k]) for k, v in state.items() if tuple(v.shape) != expected[k]]
    if bad:
        raise ExportError(f"{where}: {len(bad)} tensors have another shape than the config says, e.g. {bad[0]}")


# ----------------------------------------------------------------------------------------------------------------
# the three modes
# ----------------------------------------------------------------------------------------------------------------
def merge_lora(base: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int,
               alpha: float) -> dict[str, torch.Tensor]:
    """``W + (alpha / r) * B @ A`` for every adapted module (in promote(dtype, float32), cast back once)."""
    out = dict(base)
    scaling = alpha / r  # peft LoRA without rslora, as vlmtune.train.modes.apply_lora configures it
    for module, (a, b) in lora.items():
        key = f"{module}.weight"
        if key not in out:
            raise ExportError(f"LoRA adapter on {module} but no base weight {key}")
        w = out[key]
        if a.shape[0] != r or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ExportError(f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit rank {r} and "
                              f"the weight {tuple(w.shape)}")
        ct = torch.promote_types(w.dtype, torch.float32)
        out[key] = (w.to(ct) + (b.to(ct) @ a.to(ct)) * scaling).to(w.dtype)  # (out, r) @ (r, in) -> (out, in)
    return out


def _modules_to_save(changed: list[str], adapted: set[str]) -> list[str]:
    """The modules whose trained weights an adapter-only export must carry (see the module docstring)."""
    under_adapter = sorted(k for k in changed if k.rsplit(".", 1)[0] in adapted)
    if under_adapter:
        raise ExportError(f"{len(under_adapter)} base weights under LoRA adapters changed in training (e.g. "
                          f"{under_adapter[0]}): an adapter-only export cannot hold them; use --merge-lora")
    modules: set[str] = set()
    for key in changed:
        top = key.split(".", 1)[0]
        modules.add(top if top in ("vision_tower", "multi_modal_projector") else key.rsplit(".", 1)[0])
    clash = sorted(m for m in adapted for s in modules if m.startswith(s + "."))
    if clash:
        raise ExportError(f"LoRA adapters sit inside trained modules saved whole (e.g. {clash[0]}): an adapter-only "
                          "export cannot hold both; use --merge-lora")
    return sorted(modules)


def _write_adapter(out: Path, info: CheckpointInfo, base_ckpt: dict[str, torch.Tensor],
                   lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from vlmtune.models.kimi_vl.checkpoint import read_state_dict

    lcfg = info.recipe.model.lora
    dtype = info.dtype
    base_files = read_state_dict(info.base_dir)
    changed = sorted(k for k, v in base_ckpt.items()
                     if k not in base_files or not torch.equal(_cast(k, v, dtype), _cast(k, base_files[k], dtype)))
    unknown = [k for k in changed if k not in base_files]
    if unknown:
        raise ExportError(f"{info.base_dir} lacks {len(unknown)} tensors of the checkpoint (e.g. {unknown[0]}): is it "
                          "the base model the run was trained from?")
    save_modules = _modules_to_save(changed, set(lora))
    model = _meta_model(info.base_dir)
    config = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=list(lcfg.targets),
                        bias="none", modules_to_save=save_modules or None)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(info.base_dir.resolve())
    state: dict[str, torch.Tensor] = {}
    for key in peft_model.state_dict():
        name = published_name(key.replace(".modules_to_save.default.", "."))
        if ".lora_A." in name or ".lora_B." in name:
            module, part = name.rsplit(".lora_", 1)
            if module not in lora:
                raise ExportError(f"peft would put an adapter on {module} (targets {list(lcfg.targets)}) but the "
                                  "checkpoint has none there: the recipe's model.lora does not match the checkpoint")
            state[key] = lora[module][0 if part.startswith("A") else 1].to(dtype).contiguous()
        elif ".modules_to_save.default." in key:
            state[key] = _cast(name, base_ckpt[name], dtype).contiguous()
    n_adapted = sum(1 for k in state if ".lora_A." in k)
    if n_adapted != len(lora):
        raise ExportError(f"peft placed {n_adapted} adapters from model.lora.targets, the checkpoint holds {len(lora)}")
    peft_model.save_pretrained(str(out), state_dict=state, safe_serialization=True, save_embedding_layers=False)
    return {"adapters": len(lora), "modules_to_save": save_modules, "tensors": len(state)}


def _copy_assets(base: Path, out: Path) -> list[str]:
    """Tokenizer, processor, chat template and generation config of the base folder (see the module docstring)."""
    missing = [name for name in REQUIRED_ASSETS if not (base / name).is_file()]
    if missing:
        raise ExportError(f"base model folder {base} lacks {missing}: an export without them is not usable; add them "
                          "(e.g. `vlmtune init-model` writes all of them)")
    copied = []
    for src in sorted(base.iterdir()):
        if not src.is_file() or src.name in _NOT_COPIED or src.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(src, out / src.name)  # generation_config.json from the base replaces save_pretrained's
        copied.append(src.name)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    if not (out / CHAT_TEMPLATE_FILE).is_file() and not tok_cfg.get("chat_template"):
        from vlmtune.data.chat_template import KIMI_VL_CHAT_TEMPLATE

        (out / CHAT_TEMPLATE_FILE).write_text(KIMI_VL_CHAT_TEMPLATE, encoding="utf-8")
        copied.append(f"{CHAT_TEMPLATE_FILE} (written: the base has no chat template)")
    return copied


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, mode: str = "full", overwrite: bool = False,
                      max_shard_size: int = 5 * 1024**3) -> Path:
    """Write a trainer checkpoint as an HF-format model folder (or a peft adapter folder).

    Args:
        ckpt_dir: a ``step-XXXXXXXX`` checkpoint (or a run / checkpoints folder: its latest checkpoint).
        out_dir: the folder to create; it must be absent, empty or a previous export (replaced) unless ``overwrite``.
        mode: ``full``, ``merge_lora`` or ``adapter_only`` (see the module docstring).
        overwrite: replace an existing non-empty ``out_dir``.
        max_shard_size: safetensors shard size in bytes (full / merge_lora).

    Returns:
        ``out_dir``.
    """
    if mode not in MODES:
        raise ExportError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not (out / "vlmtune_export.json").is_file():
        raise ExportError(f"--out {out} exists, is not empty and is not a previous vlmtune export; pick another folder "
                          "or pass --overwrite")
    info = read_checkpoint_info(ckpt_dir)
    lora_enabled = bool(info.recipe.model.lora.enabled)
    if mode == "full" and lora_enabled:
        raise ExportError(f"{info.path} was trained with LoRA adapters: export with --merge-lora (a plain model) or "
                          "--adapter-only (a peft adapter folder)")
    if mode != "full" and not lora_enabled:
        raise ExportError(f"{info.path} has no LoRA adapters (model.lora.enabled is false): --merge-lora / "
                          "--adapter-only do not apply; export without them")
    base, lora = split_state(load_engine_state(info))
    if lora_enabled and not lora:
        raise ExportError(f"{info.path}: the recipe enables LoRA but the checkpoint holds no lora_A / lora_B tensors")
    if not lora_enabled and lora:
        raise ExportError(f"{info.path}: LoRA tensors in a checkpoint whose recipe has model.lora.enabled false")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-export-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta: dict[str, Any] = {"checkpoint": str(info.path.resolve()), "step": info.step, "mode": mode,
                                "zero_stage": info.zero_stage, "base_model": str(info.base_dir.resolve()),
                                "dtype": info.recipe.model.dtype}
        if mode == "adapter_only":
            meta.update(_write_adapter(tmp, info, base, lora))
        else:
            model = _meta_model(info.base_dir)
            if mode == "merge_lora":
                base = merge_lora(base, lora, info.recipe.model.lora.r, info.recipe.model.lora.alpha)
                meta["merged_adapters"] = len(lora)
            _check_against_model(base, model, info.path)
            state = {k: _cast(k, v, info.dtype) for k, v in base.items()}
            model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
            config = json.loads((tmp / "config.json").read_text())
            config["torch_dtype"] = info.recipe.model.dtype  # the dtype the weights are stored in
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            meta["tensors"] = len(state)
        meta["copied"] = _copy_assets(info.base_dir, tmp)
        (tmp / "vlmtune_export.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str]) -> int:
    """`vlmtune export CKPT_DIR --out DIR [--merge-lora | --adapter-only] [--overwrite]`."""
    parser = argparse.ArgumentParser(prog="vlmtune export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a step-XXXXXXXX checkpoint, or a run / checkpoints folder")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the base weights")
    group.add_argument("--adapter-only", action="store_true", help="write a peft adapter folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out folder (a previous export is always replaced)")
    args = parser.parse_args(argv)
    mode = "merge_lora" if args.merge_lora else "adapter_only" if args.adapter_only else "full"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        out = export_checkpoint(args.checkpoint, args.out, mode, overwrite=args.overwrite)
    except ExportError as err:
        print(f"vlmtune export: error: {err}", file=sys.stderr)
        return 1
    meta = json.loads((out / "vlmtune_export.json").read_text())
    print(f"exported {meta['checkpoint']} (step {meta['step']}, ZeRO-{meta['zero_stage']}, {mode}) -> {out}")
    return 0
