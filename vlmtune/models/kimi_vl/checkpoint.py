"""HF-compatible checkpoint IO: sharded safetensors + index under the published Kimi-VL key names.

Loading is a table, not a converter: our attribute names are the checkpoint keys. The only keys skipped are the
``rotary_emb.inv_freq`` buffers of the published files (they carry no learned state). Safetensors only; nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
# Router parameters are kept in at least float32 whatever the stored dtype (shared/reference/kimi_vl.md).
FP32_KEYS = re.compile(r".*\.mlp\.gate\.(weight|e_score_correction_bias)$")


class CheckpointError(RuntimeError):
    """A checkpoint directory does not match the model (missing / unexpected tensors, bad shapes)."""


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (from the index when there is one)."""
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    bins = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    hint = " (found pickle files: vlmtune never unpickles; convert them to safetensors)" if bins else ""
    raise CheckpointError(f"{path}: no model.safetensors or {WEIGHTS_INDEX_NAME}{hint}")


def read_state_dict(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a model directory, by key, in their stored dtypes (inv_freq keys dropped)."""
    out: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if IGNORED_KEYS.match(key):
                    continue
                if key in out:
                    raise CheckpointError(f"{file}: tensor {key} appears in two shards")
                out[key] = f.get_tensor(key)
    return out


def load_model_weights(model: nn.Module, path: Path, device: torch.device | str = "cpu") -> None:
    """Fill ``model`` (possibly on the meta device) from ``path``; strict, with errors naming each bad key."""
    state = read_state_dict(path, device)
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        lines = [f"{path}: checkpoint does not match the model config"]
        if missing:
            lines.append(f"  missing {len(missing)} tensors, e.g. {missing[:5]}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} tensors, e.g. {unexpected[:5]}")
        raise CheckpointError("\n".join(lines))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the config expects "
                                  f"{tuple(expected[key].shape)}")
        if FP32_KEYS.match(key):  # at least fp32: bf16 goes up, an fp64 checkpoint stays fp64 (casts only go up)
            state[key] = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
    model.load_state_dict(state, strict=True, assign=True)


def save_model_weights(state_dict: dict[str, torch.Tensor], path: Path, max_shard_size: int = 5 * 1024**3) -> None:
    """Write ``state_dict`` as safetensors shards of at most ``max_shard_size`` bytes, plus an index when sharded."""
    path.mkdir(parents=True, exist_ok=True)
    for old in list(path.glob("model*.safetensors")) + [path / WEIGHTS_INDEX_NAME]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / WEIGHTS_NAME), metadata=meta)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=meta)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
