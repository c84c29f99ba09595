"""Fine-tuning modes: LoRA adapters (peft) on top of the freeze settings.

LoRA never silently attaches to nothing: every target must match at least one module, and the adapters on routed
experts are counted and reported (``experts.E.{gate,up,down}_proj``), since an expert LoRA that attaches to no expert
is a trap other toolkits fell into.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)
_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


class LoraError(ValueError):
    """A LoRA setting that would not do what it says."""


def apply_lora(model: nn.Module, lora: Any, seed: int = 0) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on ``lora.targets``; base weights keep their requires_grad.

    Args:
        model: the VLM, already frozen as the recipe says (model.freeze).
        lora: the recipe's ``model.lora`` section (r, alpha, dropout, targets).
        seed: adapters are initialised under this seed (same on every rank).

    Returns:
        the peft model. Its ``vlmtune_lora_report`` attribute holds adapter counts per target and on experts.
    """
    from peft import LoraConfig, get_peft_model

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [t for t in lora.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise LoraError(f"model.lora.targets {unmatched} match no linear module of the model; valid names include "
                        "q_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj, gate_proj, up_proj, "
                        "down_proj, wqkv, wo, fc0, fc1, linear_1, linear_2")
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
                     bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
    # peft freezes every base weight; restore what model.freeze left trainable.
    for n, p in peft_model.named_parameters():
        base = n.replace("base_model.model.", "", 1).replace(".base_layer.", ".")
        if "lora_" not in n and base in trainable_before:
            p.requires_grad_(True)
    report = {"adapters": 0, "expert_adapters": 0}
    for n, _m in peft_model.named_modules():
        if n.endswith(".lora_A.default"):
            report["adapters"] += 1
            if _EXPERT.search(n):
                report["expert_adapters"] += 1
    n_experts_linear = sum(1 for n in names if _EXPERT.search("." + n + ".") or _EXPERT.search(n + "."))
    targets_experts = any(t in ("gate_proj", "up_proj", "down_proj") for t in lora.targets)
    if targets_experts and n_experts_linear and report["expert_adapters"] == 0:
        raise LoraError("LoRA targets include expert projections but no routed expert got an adapter")
    peft_model.vlmtune_lora_report = report
    logger.info("LoRA: %d adapters (%d on routed experts), r=%d alpha=%s", report["adapters"],
                report["expert_adapters"], lora.r, lora.alpha)
    return peft_model
