"""Freezing, per-part learning rates and weight-decay groups.

Parts are the three boxes of the model (``vision_tower``, ``multi_modal_projector``, ``language_model``) plus the
MoE ``router`` (``...mlp.gate.weight``). Each trainable parameter lands in exactly one group keyed by (part, decay):
no weight decay on norms, biases, the position table and the router bias; the router bias is never trainable (it is
an aux-loss-free balancing term updated by a sign rule outside the optimizer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

PARTS = ("vision_tower", "multi_modal_projector", "language_model")
_ROUTER = re.compile(r"(^|\.)mlp\.gate\.weight$")
_NO_DECAY = re.compile(r"(norm|bias$|pos_emb\.weight$|e_score_correction_bias$)")


def part_of(name: str) -> str:
    """Which part a parameter name belongs to (works through peft/DeepSpeed prefixes)."""
    if _ROUTER.search(name):
        return "router"
    for part in PARTS:
        if name.startswith(part + ".") or f".{part}." in name:
            return part
    raise ValueError(f"parameter {name} belongs to no known part ({', '.join(PARTS)})")


def apply_freeze(model: nn.Module, *, vision_tower: bool = False, projector: bool = False, decoder: bool = False,
                 router: bool | None = None) -> dict[str, int]:
    """Set requires_grad=False on the frozen parts. Returns trainable parameter counts per part after freezing.

    ``router`` is the MoE router gates' own flag, as ``model.freeze.router`` (``Freeze.router_frozen``): None follows
    ``decoder``; False trains the gates even under a frozen decoder (the routers alone), True freezes them.
    """
    frozen = {"vision_tower": vision_tower, "multi_modal_projector": projector, "language_model": decoder,
              "router": decoder if router is None else router}
    counts = dict.fromkeys((*PARTS, "router"), 0)
    for name, p in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            p.requires_grad_(False)
            continue
        part = part_of(name)
        if frozen[part]:
            p.requires_grad_(False)
        if p.requires_grad:
            counts[part] += p.numel()
    return counts


@dataclass
class GroupSpec:
    part: str
    decay: bool
    lr: float
    weight_decay: float


def build_param_groups(model: nn.Module, *, lr: float, weight_decay: float,
                       part_lr: dict[str, float | None] | None = None) -> list[dict]:
    """AdamW param groups: one per (part, decay) with a trainable parameter.

    Args:
        lr: the default peak learning rate. weight_decay: applied to matrices only.
        part_lr: absolute peak LR per part (``vision_tower``, ``multi_modal_projector``, ``language_model``,
            ``router``); None or missing = ``lr``.

    Returns:
        groups with keys params, lr, base_lr, weight_decay, name (e.g. ``vision_tower/decay``).
    """
    part_lr = part_lr or {}
    # One group per (part, decay, dtype): the router stays fp32 in a bf16 model, and ZeRO flattens each group into
    # one buffer, which must hold a single dtype.
    buckets: dict[tuple[str, bool, str], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = part_of(name)
        decay = p.dim() >= 2 and not _NO_DECAY.search(name)
        buckets.setdefault((part, decay, str(p.dtype).removeprefix("torch.")), []).append(p)
    groups = []
    for (part, decay, dtype), params in sorted(buckets.items()):
        group_lr = part_lr.get(part) or lr
        groups.append({"params": params, "lr": group_lr, "base_lr": group_lr,
                       "weight_decay": weight_decay if decay else 0.0,
                       "name": f"{part}/{'decay' if decay else 'no_decay'}/{dtype}"})
    if not groups:
        raise ValueError("no trainable parameters: every part is frozen (check model.freeze and model.lora)")
    return groups


def make_optimizer(groups: list[dict], *, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                   torch_adam: bool = True, offload_optimizer: bool = False,
                   device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) over ``groups``.

    Args:
        torch_adam: torch's AdamW (no DeepSpeed op to build; CPU, GPU and ZeRO offload). False selects DeepSpeed's
            own Adam in AdamW mode: ``DeepSpeedCPUAdam`` with ``offload_optimizer`` (the step runs on the host), else
            ``FusedAdam``, which needs CUDA. Both are C++/CUDA extensions DeepSpeed builds on first use.
        offload_optimizer: ZeRO's optimizer states live in host memory (deepspeed.offload_optimizer=cpu).
        device_type: where the parameters train (``cpu`` or ``cuda``).

    Raises:
        ValueError: torch_adam=False with neither offload nor CUDA (no DeepSpeed Adam can run there).
    """
    if torch_adam:
        return torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=False)
    if offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=betas, eps=eps, adamw_mode=True)
    if device_type != "cuda":
        raise ValueError(
            f"deepspeed.torch_adam=false selects DeepSpeed's FusedAdam, which needs CUDA, but the model trains on "
            f"{device_type}; set deepspeed.torch_adam=true (torch's AdamW), or deepspeed.offload_optimizer=cpu for "
            "DeepSpeedCPUAdam"
        )
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, betas=betas, eps=eps, adam_w_mode=True)
