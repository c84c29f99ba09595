"""The DeepSpeed JSON generated from a recipe, and the ZeRO-3 set-up that cannot hang.

Loss accounting with DeepSpeed: ``engine.backward`` divides the loss by the accumulation steps and the engine averages
gradients over data-parallel ranks. vlmtune's micro-batch losses are already shares of the optimizer-step loss (their
denominators cover every micro-batch of every rank), so the trainer calls ``engine.backward(loss * world_size,
scale_wrt_gas=False)``: the summed gradient then equals plain PyTorch's gradient of the global-batch loss, and so do
``grad_norm`` and clipping (tests/train/test_trainer_grads.py compares them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def build_ds_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    precision: str,
    grad_clip: float | None,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    overlap_comm: bool = False,
    reduce_bucket_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """DeepSpeed config dict for one run (saved as ``deepspeed.json`` beside the resolved recipe).

    Args:
        zero_stage: 0-3. micro_batch_size: packs per rank per micro-step. grad_accum: micro-steps per optimizer step.
        world_size: data-parallel ranks. precision: ``fp32`` | ``bf16`` | ``fp64`` (fp64 is fp32 for DeepSpeed's
            bookkeeping: the model simply is fp64). grad_clip: max global grad norm (None/0 = off).
        offload_optimizer / offload_param: ``none`` | ``cpu`` (param offload needs stage 3).
        extra: merged last, for expert users (validated as a dict by the schema).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0-3, got {zero_stage}")
    if offload_param != "none" and zero_stage != 3:
        raise ValueError("deepspeed.offload_param needs zero_stage 3")
    if offload_optimizer != "none" and zero_stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage > 0:
        zero["overlap_comm"] = overlap_comm
        zero["contiguous_gradients"] = True
        if reduce_bucket_size:
            zero["reduce_bucket_size"] = reduce_bucket_size
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer, "pin_memory": False}
    if offload_param != "none":
        zero["offload_param"] = {"device": offload_param, "pin_memory": False}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "zero_optimization": zero,
        "gradient_clipping": float(grad_clip or 0.0),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch's AdamW works with CPU offload (no DeepSpeed op build)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if extra:
        cfg = _deep_merge(cfg, extra)
    return cfg


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def register_zero3_leaf_modules(model: nn.Module) -> int:
    """Mark every MoE block as a ZeRO-3 leaf: its experts are gathered as one unit, so ranks whose tokens route to
    different experts still fetch the same parameters in the same order (otherwise ZeRO-3 + MoE hangs).

    Returns:
        the number of MoE blocks marked (an error when the model has MoE layers and none was marked).
    """
    from deepspeed.utils import set_z3_leaf_modules

    from vlmtune.models.kimi_vl.moe import KimiVLMoE

    n = sum(isinstance(m, KimiVLMoE) for m in model.modules())
    if n:
        set_z3_leaf_modules(model, [KimiVLMoE])
        marked = sum(bool(getattr(m, "_z3_leaf", False)) for m in model.modules() if isinstance(m, KimiVLMoE))
        if marked != n:
            raise RuntimeError(f"ZeRO-3: marked {marked} of {n} MoE blocks as leaf modules; refusing to run (would hang)")
    return n


class LossForward(nn.Module):
    """What DeepSpeed wraps: the model's training forward, returning a dict of tensors ``{"loss", "aux_loss_sum"}``.

    ZeRO-3 gathers a module's parameters in hooks on the module's forward and on the tensors it returns (the backward
    hooks). Two things defeat that for the VLM: its output is a dataclass, whose tensors DeepSpeed cannot see, and the
    chunked cross-entropy reads ``lm_head.weight`` directly and recomputes the logits from it inside backward, outside
    any ``lm_head`` hook. This adapter returns a plain dict and registers ``lm_head.weight`` as an external parameter of
    itself, so the weight is gathered for the forward and again when the backward starts (before the recompute and
    before its gradient is accumulated). Harmless below stage 3.

    Args:
        model: the model to train (maybe peft-wrapped). lm_head_weight: the output projection it reads directly.
    """

    def __init__(self, model: nn.Module, lm_head_weight: nn.Parameter) -> None:
        super().__init__()
        self.model = model
        self._lm_head_weight = [lm_head_weight]  # a list: not a parameter of this module, no state-dict entry

    def register_zero3(self) -> None:
        """Register ``lm_head.weight`` with ZeRO-3 (call before ``deepspeed.initialize`` with stage 3)."""
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(self, self._lm_head_weight[0])

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        out = self.model(**inputs)
        return {"loss": out.loss, "aux_loss_sum": out.aux_loss_sum}


def zero3_single_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """ZeRO-3 flattens every parameter into one buffer of one dtype, so the fp32 router weight of a bf16 model must be
    stored in bf16 too. Precision is kept where it matters: the optimizer holds fp32 master weights, the router
    computes its logits in fp32, and ``e_score_correction_bias`` is a buffer that stays fp32 (not partitioned).

    Returns:
        the number of router weights converted.
    """
    from vlmtune.models.kimi_vl.moe import KimiVLTopkRouter

    n = 0
    for m in model.modules():
        if isinstance(m, KimiVLTopkRouter) and m.weight.dtype != dtype:
            m.keep_fp32 = False
            m.weight.data = m.weight.data.to(dtype)
            n += 1
    return n
