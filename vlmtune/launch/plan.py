"""`vlmtune plan RECIPE`: per-GPU memory of a run before it starts, from the architecture alone (no weights).

The model is built on the meta device from its config (``model.path/config.json``, else ``--preset`` /
``model.preset``, else the published A3B sizes), frozen and LoRA-wrapped as the recipe says, and counted. Two parts:

**Model states** (per GPU, bytes per parameter; Phi = all parameters, Psi = trainable ones, N = GPUs)::

                    params        grads (bf16)   optimizer (fp32 master, Adam m, v)   at the step / buffers
    ZeRO-0          2 Phi         2 Psi          12 Psi                               4 Psi fp32 grads
    ZeRO-1          2 Phi         2 Psi          12 Psi / N                           4 Psi / N fp32 grads
    ZeRO-2          2 Phi         2 Psi / N      12 Psi / N                           4 Psi / N + reduce bucket
    ZeRO-3          2 Phi / N     2 Psi / N      12 Psi / N                           4 min(sub_group, Psi / N)
                                                                                      + 4 x largest gathered unit
    offload_optimizer=cpu moves grads + optimizer to host memory; offload_param=cpu (ZeRO-3) the params too.

This is DeepSpeed's accounting: ZeRO-1 equals ``estimate_zero2_model_states_mem_needs`` (its "stage 1 and 2" figure
keeps a full bf16 gradient: 4 Phi + 16 Phi / N) and ZeRO-3 equals ``estimate_zero3_model_states_mem_needs``
(18 Phi / N + 4 x largest layer) once the fp32 gradients of a sub-group are counted at the step; ZeRO-2 partitions the
bf16 gradients as well (2 Psi / N), which DeepSpeed's shared stage-1/2 estimate does not credit. Under ZeRO-3 an MoE
block is a leaf module (gathered whole), so the largest gathered unit is a whole MoE layer. fp32/fp64 runs keep
grads and Adam states in the parameter dtype and, under ZeRO >= 1, a separate fp32 partition ("master").

**Activations** saved for backward, derived per token (decoder) and per patch (vision tower) from the architecture:
every tensor an autograd op keeps, as PyTorch keeps it (a linear keeps its input only when its weight trains; a norm
keeps its input and 1/rms, and its normalised input only when its weight trains; SwiGLU keeps three I-wide tensors
and the fourth for ``down_proj``'s weight; flash attention keeps q, k, v, out and the log-sum-exp; MoE keeps the
K-fold gathered tokens, the expert intermediates and routing indices). With activation checkpointing a layer keeps
only its input (and recomputes the rest in backward: one layer's activations come back as a transient). The test
(tests/launch/test_plan.py) measures the bytes saved for backward with ``torch.autograd.graph.saved_tensors_hooks``
and compares. The loss head adds a transient: one chunk of fp32 logits (``train.ce_chunk_size`` x vocab).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtune.config import Recipe, load_recipe
from vlmtune.models.kimi_vl.configuration import KimiVLConfig, kimi_vl_a3b, kimi_vl_tiny

GiB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "float64": 8}
#: The packing lengths the activation table always shows (besides the recipe's).
STANDARD_LENGTHS = (4096, 8192, 16384, 32768)
#: DeepSpeed defaults the state figures use (zero_optimization.sub_group_size / reduce_bucket_size).
DS_SUB_GROUP_SIZE = 1_000_000_000
LINEAR_LIKE = (nn.Linear, nn.Conv2d)


class PlanError(ValueError):
    """A plan that cannot be made (no config to read, an unknown preset), with the fix."""


# ------------------------------------------------------------------------------------------------- the model


def load_config(recipe: Recipe | None, preset: str | None = None) -> tuple[KimiVLConfig, str]:
    """The config to plan for, and where it came from.

    Order: ``--preset`` when given; ``model.path/config.json`` when it exists; ``model.preset``; the A3B sizes.
    """
    if preset is not None:
        return _preset_config(preset), f"preset {preset}"
    if recipe is not None:
        cfg_file = Path(recipe.model.path) / "config.json"
        if cfg_file.is_file():
            return KimiVLConfig.from_pretrained(cfg_file.parent), str(cfg_file)
        if recipe.model.preset is not None:
            return _preset_config(recipe.model.preset), f"model.preset {recipe.model.preset}"
    return kimi_vl_a3b(), "the published Kimi-VL-A3B sizes (no config.json at model.path)"


def _preset_config(name: str) -> KimiVLConfig:
    if name == "a3b":
        return kimi_vl_a3b()
    if name == "tiny":
        from vlmtune.models.kimi_vl.init_model import TINY_NUM_BASE_TOKENS

        return kimi_vl_tiny(num_base_tokens=TINY_NUM_BASE_TOKENS)
    raise PlanError(f"unknown preset {name!r}; choose a3b or tiny")


_META_CACHE: dict[str, nn.Module] = {}


def meta_model(config: KimiVLConfig) -> nn.Module:
    """The model with every tensor on the meta device: shapes and names, no memory (built once per config: the A3B
    takes seconds to construct even without memory)."""
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration

    key = config.to_json_string()
    if key not in _META_CACHE:
        with torch.device("meta"):
            _META_CACHE[key] = KimiVLForConditionalGeneration(config)
    return _META_CACHE[key]


def _group(name: str) -> str:
    """The unit a module belongs to for checkpointing: a decoder layer, a vision block, else its top-level part."""
    parts = name.split(".")
    for prefix in (("language_model", "model", "layers"), ("vision_tower", "encoder", "blocks")):
        if tuple(parts[:3]) == prefix and len(parts) > 3:
            return ".".join(parts[:4])
    return parts[0]


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA settings that change memory: rank, dropout, target module suffixes."""

    r: int
    dropout: float
    targets: tuple[str, ...]

    def matches(self, module_name: str) -> bool:
        return any(module_name == t or module_name.endswith("." + t) for t in self.targets)


@dataclass
class ParamCounts:
    """Parameter counts of a (meta) model after freezing and LoRA.

    Attributes:
        total: every parameter, adapters included (Phi). trainable: those the optimizer updates (Psi).
        parts: {part: (total, trainable)} for vision_tower, multi_modal_projector, language_model, lora.
        experts: routed-expert parameters (total, trainable). largest_unit: parameters of the largest module ZeRO-3
            gathers at once (an MoE block counts whole: it is registered as a leaf module).
        trains: {module name: bool} whether each linear-like module keeps its input for backward (its weight
            trains, or it carries a LoRA adapter that reads it directly); norms: whether their weight trains.
        has_trainable: {unit: True} for every decoder layer (``language_model.model.layers.3``), vision block and
            top-level part holding a trainable parameter or a LoRA adapter (what decides activation checkpointing and
            whether autograd records a part at all).
    """

    total: int = 0
    trainable: int = 0
    parts: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    experts: list[int] = field(default_factory=lambda: [0, 0])
    largest_unit: int = 0
    largest_unit_name: str = ""
    trains: dict[str, bool] = field(default_factory=dict)
    has_trainable: dict[str, bool] = field(default_factory=dict)


_PARTS = ("vision_tower", "multi_modal_projector", "language_model")


def count_parameters(config: KimiVLConfig, freeze: Any = None, lora: LoraSpec | None = None) -> ParamCounts:
    """Count parameters on the meta device with the recipe's freezing (``model.freeze``) and LoRA applied.

    LoRA adapters are counted analytically (peft adds ``lora_A`` (r x in) and ``lora_B`` (out x r) to every linear
    whose name ends with a target), which is exact for peft's LoRA without bias.
    """
    from vlmtune.models.kimi_vl.moe import KimiVLMoE
    from vlmtune.train.optim import apply_freeze

    model = meta_model(config)
    for p in model.parameters():  # the cached model may carry another recipe's freezing
        p.requires_grad_(True)
    if freeze is not None:
        apply_freeze(model, vision_tower=freeze.vision_tower, projector=freeze.projector, decoder=freeze.decoder,
                     router=freeze.router_frozen)
    out = ParamCounts()
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        n = p.numel()
        out.total += n
        out.parts[part][0] += n
        if p.requires_grad:
            out.trainable += n
            out.parts[part][1] += n
        if ".mlp.experts." in name:
            out.experts[0] += n
            out.experts[1] += n if p.requires_grad else 0
    moe_blocks = [n for n, m in model.named_modules() if isinstance(m, KimiVLMoE)]
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        adapted = lora is not None and isinstance(module, nn.Linear) and lora.matches(name)
        if isinstance(module, LINEAR_LIKE):
            # an adapted linear keeps its input through lora_A, unless lora_A reads a dropout copy instead
            out.trains[name] = bool(module.weight.requires_grad) or (adapted and lora.dropout == 0)
        elif isinstance(getattr(module, "weight", None), nn.Parameter):
            out.trains[name] = bool(module.weight.requires_grad)  # norms, embeddings, the router gate
        if adapted or any(p.requires_grad for p in own):
            for unit_name in {_group(name), name.split(".", 1)[0]}:
                out.has_trainable[unit_name] = True
        if adapted:
            n = lora.r * (module.in_features + module.out_features)
            out.total += n
            out.trainable += n
            out.parts["lora"][0] += n
            out.parts["lora"][1] += n
        # ZeRO-3 gathers a module's own parameters at once, an MoE block (a leaf module) all of its parameters
        if isinstance(module, KimiVLMoE):
            unit = sum(p.numel() for p in module.parameters())
        elif any(name.startswith(m + ".") for m in moe_blocks):
            continue
        else:
            unit = sum(p.numel() for p in own)
        if unit > out.largest_unit:
            out.largest_unit, out.largest_unit_name = unit, name
    if lora is not None:
        missing = [t for t in lora.targets if not any(lora.matches(n) for n, m in model.named_modules()
                                                      if isinstance(m, nn.Linear))]
        if missing:
            raise PlanError(f"model.lora.targets {missing} match no linear module of the model")
    return out


# ------------------------------------------------------------------------------------------------ model states


@dataclass
class StateBytes:
    """Per-GPU (and per-rank host) bytes of the model states for one ZeRO stage and offload choice."""

    stage: int
    offload: str  # none | optim | optim+params
    params: float
    grads: float
    optimizer: float
    step_buffers: float  # fp32 gradients at the optimizer step, reduce buckets, ZeRO-3 gathered parameters
    host: float  # per rank, in CPU memory (offload)

    @property
    def gpu(self) -> float:
        return self.params + self.grads + self.optimizer + self.step_buffers


def state_bytes(
    *,
    total: int,
    trainable: int,
    world: int,
    stage: int,
    precision: str = "bf16",
    offload_optimizer: bool = False,
    offload_params: bool = False,
    largest_unit: int = 0,
    reduce_bucket_size: int = 500_000_000,
    sub_group_size: int = DS_SUB_GROUP_SIZE,
) -> StateBytes:
    """Model-state bytes per GPU (see the module docstring for the table).

    Args:
        total: Phi, all parameters. trainable: Psi. world: data-parallel GPUs N. stage: ZeRO stage 0-3.
        precision: ``bf16`` (bf16 weights, fp32 master + Adam) or ``fp32`` / ``fp64`` (one dtype everywhere).
        offload_optimizer: fp32 states and gradients in host memory (stage >= 1). offload_params: stage 3 params too.
        largest_unit: parameters of the largest module ZeRO-3 gathers at once (4 bytes each: bf16 weight + grad).
        reduce_bucket_size: elements of the ZeRO-1/2 gradient reduce bucket (deepspeed.reduce_bucket_size).
        sub_group_size: elements ZeRO-3 steps at once (its fp32 gradient copy is this large at most).
    """
    if stage not in (0, 1, 2, 3):
        raise PlanError(f"ZeRO stage must be 0-3, got {stage}")
    if offload_params and stage != 3:
        raise PlanError("parameter offload needs ZeRO-3")
    if offload_optimizer and stage == 0:
        raise PlanError("optimizer offload needs ZeRO >= 1")
    p = {"bf16": 2, "fp32": 4, "fp64": 8}[precision]
    mixed = precision == "bf16"
    master = 4 if mixed or stage >= 1 else 0  # DeepSpeed keeps a separate fp32 partition under ZeRO >= 1
    master = 8 if precision == "fp64" and master else master
    adam = 8 if precision != "fp64" else 16
    step_grad = 4 if mixed else 0  # fp32 copy of the bf16 gradients, made at the optimizer step
    phi, psi, n = float(total), float(trainable), float(world)
    opt_share = psi if stage == 0 else psi / n
    params = p * phi / n if stage == 3 else p * phi
    grads = p * psi if stage <= 1 else p * psi / n
    optimizer = (master + adam) * opt_share
    if stage == 3:
        fp32_grads = step_grad * min(float(sub_group_size), psi / n)
    else:
        fp32_grads = step_grad * opt_share
    buffers = 0.0
    if stage in (1, 2):
        buffers += p * min(float(reduce_bucket_size), psi)
    if stage == 3:
        buffers += 2 * p * largest_unit  # one gathered unit: its weights and their gradient
    host = 0.0
    if offload_optimizer:
        host += optimizer + step_grad * opt_share + grads
        optimizer = 0.0
        fp32_grads = 0.0
        grads = 0.0
        if stage in (1, 2):
            buffers = p * min(float(reduce_bucket_size), psi)  # the bucket is still reduced on the GPU
    if offload_params:
        host += params
        params = 0.0
    offload = "optim+params" if offload_params else ("optim" if offload_optimizer else "none")
    return StateBytes(stage=stage, offload=offload, params=params, grads=grads, optimizer=optimizer,
                      step_buffers=fp32_grads + buffers, host=host)


# -------------------------------------------------------------------------------------------------- activations


@dataclass
class Activations:
    """Activation bytes of one forward (all packs of a micro-batch), split by part.

    Attributes:
        decoder, vision, projector, head: bytes saved for backward (``head`` = embeddings, final norm, loss inputs).
        recompute: with checkpointing, the largest layer/block's activations, back during its backward (transient).
        loss_chunk: one chunk of logits of the chunked cross-entropy, alive during its backward (transient).
        terms: per-token (decoder) and per-patch (vision) bytes of every named term, for reading the estimate.
    """

    decoder: float = 0.0
    vision: float = 0.0
    projector: float = 0.0
    head: float = 0.0
    recompute: float = 0.0
    loss_chunk: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def saved(self) -> float:
        return self.decoder + self.vision + self.projector + self.head

    @property
    def peak(self) -> float:
        return self.saved + max(self.recompute, self.loss_chunk)


class _Terms:
    """Named per-unit byte terms (one decoder token, one vision patch), summed."""

    def __init__(self) -> None:
        self.items: dict[str, float] = {}

    def add(self, name: str, nbytes: float, when: bool = True) -> None:
        if when and nbytes:
            self.items[name] = self.items.get(name, 0.0) + float(nbytes)

    @property
    def total(self) -> float:
        return sum(self.items.values())


def _flag(trains: dict[str, bool], name: str) -> bool:
    if name not in trains:
        raise PlanError(f"internal: no module {name} in the model (planner out of date with the architecture?)")
    return trains[name]


def _lora_extra(t: _Terms, tag: str, module: str, in_features: int, b: int, lora: LoraSpec | None,
                device: str, times: int = 1) -> None:
    """An adapted linear: lora_B keeps lora_A's (r-wide) output; with dropout > 0 lora_A keeps dropout(x), and the
    dropout its mask (bool on CUDA, the input dtype on CPU). ``times``: rows per token (K for routed experts)."""
    if lora is None or not lora.matches(module):
        return
    t.add(f"{tag}.lora_rank", times * lora.r * b)
    if lora.dropout > 0:
        t.add(f"{tag}.lora_dropout", times * in_features * (b + (1 if device == "cuda" else b)))


def decoder_layer_terms(config: KimiVLConfig, layer: int, trains: dict[str, bool], *, b: int, device: str,
                        mean_segment: float, lora: LoraSpec | None = None, aux_loss: bool = True) -> _Terms:
    """Bytes one token keeps in one decoder layer (no checkpointing).

    Args:
        config: the model config. layer: the layer index (dense or MoE, as the config says).
        trains: :attr:`ParamCounts.trains`. b: activation dtype bytes.
        device: ``cuda`` (flash-attn varlen) or ``cpu`` (per-segment SDPA; its math path for MLA, whose q/k and v
            head dims differ, keeps the H x L probabilities of each segment).
        mean_segment: sum(L_i^2) / N over the pack's segments (only the CPU math path depends on it).
        lora: LoRA settings (extra terms for adapted linears). aux_loss: the MoE aux loss is on (training, alpha > 0).
    """
    tc = config.text_config
    D, H = tc.hidden_size, tc.num_attention_heads
    Dn, Dr, Dv, R = tc.qk_nope_head_dim, tc.qk_rope_head_dim, tc.v_head_dim, tc.kv_lora_rank
    Dqk = Dn + Dr
    c = max(b, 4)  # norms, RoPE, router and softmax statistics run in at least fp32
    pre = f"language_model.model.layers.{layer}"
    f = lambda suffix: _flag(trains, f"{pre}.{suffix}")  # noqa: E731 - a local lookup
    t = _Terms()

    def rms_norm(tag: str, width: int, weight: str, out_kept: bool, input_storage: float | None = None) -> None:
        t.add(f"{tag}.input", width * c if input_storage is None else input_storage)  # x (or its fp32 copy), by pow
        t.add(f"{tag}.rstd", c)
        t.add(f"{tag}.normed", width * c, f(weight))  # kept by weight * x_hat when the weight trains
        t.add(f"{tag}.out", width * b, out_kept)  # kept by the linear(s) that read it

    # --- attention (MLA) ---------------------------------------------------------------------------------------
    q_names = ["self_attn.q_proj"] if tc.q_lora_rank is None else ["self_attn.q_a_proj"]
    rms_norm("attn_norm", D, "input_layernorm", any(f(n) for n in [*q_names, "self_attn.kv_a_proj_with_mqa"]))
    for n in [*q_names, "self_attn.kv_a_proj_with_mqa"]:
        _lora_extra(t, f"attn.{n.split('.')[-1]}", f"{pre}.{n}", D, b, lora, device)
    if tc.q_lora_rank is not None:
        rms_norm("q_norm", tc.q_lora_rank, "self_attn.q_a_layernorm", f("self_attn.q_b_proj"))
        _lora_extra(t, "attn.q_b_proj", f"{pre}.self_attn.q_b_proj", tc.q_lora_rank, b, lora, device)
    # c_kv is a view of kv_a_proj's output: in the compute dtype the norm keeps that whole storage
    rms_norm("kv_norm", R, "self_attn.kv_a_layernorm", f("self_attn.kv_b_proj"),
             input_storage=(R + Dr) * c if b == c else R * c)
    _lora_extra(t, "attn.kv_b_proj", f"{pre}.self_attn.kv_b_proj", R, b, lora, device)
    t.add("rope.cos_sin", Dr * c)
    o_kept = f("self_attn.o_proj")
    if device == "cuda":  # flash-attn varlen: q, k, v (zero-padded to Dqk), out (Dqk), log-sum-exp
        t.add("attn.q", H * Dqk * b)
        t.add("attn.k", H * Dqk * b)
        t.add("attn.v", H * Dqk * b if Dv < Dqk else H * (Dn + Dv) * b)
        t.add("attn.out", H * Dqk * b)
        t.add("attn.lse", H * 4)
        t.add("attn.o_proj_input", H * Dv * b, o_kept and Dv < Dqk)  # out[..., :Dv] reshaped: a copy
    else:
        dt = c  # CPU SDPA runs in >= fp32
        t.add("attn.kv", H * (Dn + Dv) * b if b == dt else H * Dv * dt)  # v: a view of kv_b_proj's output
        if Dqk == Dv:  # the fused CPU kernel
            t.add("attn.q", H * Dqk * dt)
            t.add("attn.k", H * Dqk * dt)
            t.add("attn.out", H * Dv * dt)
            t.add("attn.lse", H * 4)
        else:  # the math path: scaled q and k copies and the softmax probabilities of each segment
            t.add("attn.q", H * Dqk * dt)
            t.add("attn.k", H * Dqk * dt)
            t.add("attn.probs", H * mean_segment * dt)
        t.add("attn.o_proj_input", H * Dv * b, o_kept)
    _lora_extra(t, "attn.o_proj", f"{pre}.self_attn.o_proj", H * Dv, b, lora, device)

    # --- MLP ---------------------------------------------------------------------------------------------------
    if tc.is_moe_layer(layer):
        E, K, I = tc.n_routed_experts, tc.num_experts_per_tok, tc.moe_intermediate_size
        Is = I * (tc.n_shared_experts or 0)
        router = f("mlp.gate")
        shared_in = Is > 0 and (f("mlp.shared_experts.gate_proj") or f("mlp.shared_experts.up_proj"))
        rms_norm("mlp_norm", D, "post_attention_layernorm", shared_in or (router and b == c))
        t.add("router.input_fp32", D * 4, router and b < c)  # F.linear(x.to(fp32)) keeps the fp32 copy
        t.add("router.scores", E * c)  # sigmoid output
        t.add("router.topk_index", K * 8)  # gather index
        t.add("router.weights", K * c + c)  # normalisation: weights and their sum
        e = lambda suffix: f(f"mlp.experts.0.{suffix}")  # noqa: E731 - every expert trains alike
        t.add("experts.index", 2 * K * 8)  # token of each (token, k) pair, and the sort order
        t.add("experts.input", K * D * b, e("gate_proj") or e("up_proj"))  # the K-fold gathered tokens
        t.add("experts.swiglu", 3 * K * I * b)  # gate out (silu input), silu out, up out
        t.add("experts.down_input", K * I * b, e("down_proj"))
        t.add("experts.output", K * D * (c + b))  # expert outputs (x weights, in >= fp32) and the weighted sum
        t.add("experts.weights", K * c)
        for n, width in (("gate_proj", D), ("up_proj", D), ("down_proj", I)):
            _lora_extra(t, f"experts.{n}", f"{pre}.mlp.experts.0.{n}", width, b, lora, device, times=K)
        if Is:
            t.add("shared.swiglu", 3 * Is * b)
            t.add("shared.down_input", Is * b, f("mlp.shared_experts.down_proj"))
            for n, width in (("gate_proj", D), ("up_proj", D), ("down_proj", Is)):
                _lora_extra(t, f"shared.{n}", f"{pre}.mlp.shared_experts.{n}", width, b, lora, device)
        if aux_loss:
            t.add("aux_loss", 2 * E * c + 8 + 1)  # normalised scores (and their copy), segment index, mask
    else:
        I = tc.intermediate_size
        rms_norm("mlp_norm", D, "post_attention_layernorm", f("mlp.gate_proj") or f("mlp.up_proj"))
        t.add("mlp.swiglu", 3 * I * b)
        t.add("mlp.down_input", I * b, f("mlp.down_proj"))
        for n, width in (("gate_proj", D), ("up_proj", D), ("down_proj", I)):
            _lora_extra(t, f"mlp.{n}", f"{pre}.mlp.{n}", width, b, lora, device)
    return t


def vision_block_terms(config: KimiVLConfig, block: int, trains: dict[str, bool], *, b: int, device: str,
                       lora: LoraSpec | None = None) -> _Terms:
    """Bytes one patch keeps in one MoonViT block (no checkpointing)."""
    vc = config.vision_config
    Dv, Hv, Iv = vc.hidden_size, vc.num_attention_heads, vc.intermediate_size
    c = max(b, 4)
    pre = f"vision_tower.encoder.blocks.{block}"
    f = lambda suffix: _flag(trains, f"{pre}.{suffix}")  # noqa: E731
    t = _Terms()
    t.add("norm0.input_stats", Dv * c + 2 * c)  # layer_norm keeps x (or its fp32 copy), mean, rstd
    t.add("norm0.out", Dv * b, f("wqkv"))
    _lora_extra(t, "v.wqkv", f"{pre}.wqkv", Dv, b, lora, device)
    t.add("attn.q_k_rotated", 2 * Dv * b)
    t.add("attn.qkv", 3 * Dv * b)  # v is a view of wqkv's output: its whole storage stays
    t.add("attn.out", Dv * b)
    t.add("attn.lse", Hv * 4)
    t.add("attn.wo_input", Dv * b, f("wo") and device != "cuda")  # CPU: the per-image outputs concatenated
    _lora_extra(t, "v.wo", f"{pre}.wo", Dv, b, lora, device)
    t.add("norm1.input_stats", Dv * c + 2 * c)
    t.add("norm1.out", Dv * b, f("mlp.fc0"))
    _lora_extra(t, "v.fc0", f"{pre}.mlp.fc0", Dv, b, lora, device)
    t.add("mlp.fc0_out", Iv * b)  # GELU input
    t.add("mlp.gelu_out", Iv * b, f("mlp.fc1"))
    _lora_extra(t, "v.fc1", f"{pre}.mlp.fc1", Iv, b, lora, device)
    return t


def activation_bytes(
    config: KimiVLConfig,
    counts: ParamCounts,
    *,
    tokens: int,
    patches: int,
    supervised: int | None = None,
    seqlens: Sequence[int] | None = None,
    dtype: str = "bfloat16",
    device: str = "cuda",
    ckpt_decoder: bool = True,
    ckpt_vision: bool = True,
    every_k: int = 1,
    lora: LoraSpec | None = None,
    aux_loss: bool = True,
    ce_chunk_size: int = 4096,
) -> Activations:
    """Activation memory of one forward over ``tokens`` packed tokens with ``patches`` image patches.

    Args:
        config: model config. counts: :func:`count_parameters` (which modules train).
        tokens: N, text + image tokens of the micro-batch. patches: P, MoonViT patches (4 per image token).
        supervised: tokens with a label (None = all of them: the loss head is then an upper bound).
        seqlens: segment lengths (only the CPU attention math path depends on them; None = one segment of N).
        dtype: model dtype. device: ``cuda`` (flash attention) or ``cpu`` (the CPU SDPA paths).
        ckpt_decoder, ckpt_vision, every_k: model.gradient_checkpointing (applied to layers/blocks that train).
        lora: LoRA settings. aux_loss: MoE aux loss on. ce_chunk_size: train.ce_chunk_size.
    """
    tc, vc = config.text_config, config.vision_config
    b = DTYPE_BYTES[dtype]
    c = max(b, 4)
    D = tc.hidden_size
    trains, has = counts.trains, counts.has_trainable
    supervised = tokens if supervised is None else supervised
    seqlens = [tokens] if seqlens is None else list(seqlens)
    mean_segment = sum(L * L for L in seqlens) / max(tokens, 1)
    act = Activations()

    vision_graph = has.get("vision_tower", False)
    projector_graph = vision_graph or has.get("multi_modal_projector", False)
    decoder_trains = has.get("language_model", False)
    if not (decoder_trains or projector_graph):
        raise PlanError("nothing trains: every part is frozen and no LoRA adapter is attached")

    # --- decoder ---------------------------------------------------------------------------------------------
    layer_bytes, ckpt_layers, peak_layer = 0.0, 0, 0.0
    for i in range(tc.num_hidden_layers):
        terms = decoder_layer_terms(config, i, trains, b=b, device=device, mean_segment=mean_segment, lora=lora,
                                    aux_loss=aux_loss)
        layer_trains = has.get(f"language_model.model.layers.{i}", False)
        if ckpt_decoder and layer_trains and i % every_k == 0:
            layer_bytes += D * b  # the layer input, kept by the checkpoint
            ckpt_layers += 1
            peak_layer = max(peak_layer, terms.total)
        else:
            layer_bytes += terms.total
        for k, v in terms.items.items():
            act.terms[f"decoder.{k}"] = act.terms.get(f"decoder.{k}", 0.0) + v
    if ckpt_layers:
        layer_bytes += 16  # position ids and segment ids, kept once for every checkpointed layer
    act.decoder = layer_bytes * tokens
    act.recompute = peak_layer * tokens

    # --- embeddings, final norm, loss head -------------------------------------------------------------------
    head = 8.0 * trains.get("language_model.model.embed_tokens", False)  # token ids kept by the embedding
    head += 1.0 if projector_graph and patches else 0.0  # the image-token mask of masked_scatter
    head += D * c + c + D * c * trains["language_model.model.norm"]  # final norm: x, rstd (, x_hat)
    act.head = head * tokens + supervised * (D * b + 24)  # supervised hidden rows, targets, weights, their index
    # the recomputed chunk in backward: logits (b), their fp32 copy, log-softmax, its gradient (fp32) and in b
    act.loss_chunk = min(ce_chunk_size, supervised) * tc.vocab_size * (2 * b + 12)

    # --- vision tower and projector ----------------------------------------------------------------------------
    if patches and vision_graph:
        per_patch, ckpt_blocks, peak_block = 0.0, 0, 0.0
        for j in range(vc.num_hidden_layers):
            terms = vision_block_terms(config, j, trains, b=b, device=device, lora=lora)
            block_trains = has.get(f"vision_tower.encoder.blocks.{j}", False)
            if ckpt_vision and block_trains and j % every_k == 0:
                per_patch += vc.hidden_size * b
                ckpt_blocks += 1
                peak_block = max(peak_block, terms.total)
            else:
                per_patch += terms.total
            for k, v in terms.items.items():
                act.terms[f"vision.{k}"] = act.terms.get(f"vision.{k}", 0.0) + v
        per_patch += vc.head_dim * c  # 2-D RoPE cos/sin, shared by all blocks
        per_patch += 3 * vc.patch_size**2 * b * trains["vision_tower.patch_embed.proj"]  # pixels, by the conv
        per_patch += vc.hidden_size * c + 2 * c  # final layer norm: x, mean, rstd (its output is copied by the merger)
        act.vision = per_patch * patches
        act.recompute = max(act.recompute, peak_block * patches)
    if patches and projector_graph:
        Dv = vc.hidden_size
        proj = Dv * c + 2 * c  # pre_norm: merged patches (or their fp32 copy), mean, rstd
        proj += Dv * b * trains["multi_modal_projector.linear_1"]  # pre_norm output, by linear_1
        proj += Dv * b  # linear_1 output (GELU input): 4 Dv per merged token = Dv per patch
        proj += Dv * b * trains["multi_modal_projector.linear_2"]  # GELU output
        act.projector = proj * patches
    return act


# --------------------------------------------------------------------------------------------------- the plan


@dataclass
class PlanRow:
    """One ZeRO stage / offload choice."""

    stage: int
    offload: str
    states: StateBytes
    activations: float
    total: float
    fits: bool
    max_packing_length: int
    host_per_node: float


@dataclass
class Plan:
    """Everything `vlmtune plan` prints (and writes with --json)."""

    source: str
    gpus: int
    gpus_per_node: int
    gpu_mem: float
    reserve: float
    dtype: str
    packing_length: int
    micro_batch_size: int
    patches_per_pack: int
    counts: dict[str, Any]
    activation_rows: list[dict[str, Any]]
    rows: list[PlanRow]
    recipe_row: tuple[int, str]
    moe: dict[str, float]
    flops_per_token: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _lora_spec(recipe: Recipe) -> LoraSpec | None:
    lo = recipe.model.lora
    return LoraSpec(r=lo.r, dropout=lo.dropout, targets=tuple(lo.targets)) if lo.enabled else None


def _patches(recipe: Recipe, length: int, image_fraction: float) -> int:
    """Patches of one pack: the worst case packing.max_vision_patches allows (at most 4 per token) when it is set,
    else 4 per image token with ``image_fraction`` of the tokens being image tokens."""
    cap = recipe.packing.max_vision_patches
    return min(cap, 4 * length) if cap is not None else int(4 * image_fraction * length)


def _largest_fitting(memory: Any, budget: float, step: int = 256, limit: int = 1 << 20) -> int:
    """The largest multiple of ``step`` up to ``limit`` whose ``memory(length)`` fits ``budget`` (0 if none does);
    memory grows with the length, so a bisection finds it."""
    lo, hi = 0, limit // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory(mid * step) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def make_plan(recipe: Recipe, *, gpus: int | None = None, gpu_mem_gib: float = 80.0, reserve_gib: float = 4.0,
              image_fraction: float = 0.5, preset: str | None = None, device: str = "cuda") -> Plan:
    """Plan a recipe: model states per ZeRO stage and offload, activations per packing_length, what fits.

    Args:
        recipe: the validated recipe. gpus: GPUs in the run (None = launch.nproc_per_node x launch.nnodes).
        gpu_mem_gib: memory per GPU. reserve_gib: kept free for the CUDA context, NCCL and fragmentation.
        image_fraction: share of a pack's tokens that are image tokens (4 patches each) when
            packing.max_vision_patches does not bound them.
        preset: plan for this model preset instead of the recipe's config (``a3b`` or ``tiny``).
        device: ``cuda`` (flash attention activations) or ``cpu``.
    """
    from vlmtune.train.flops import training_flops

    config, source = load_config(recipe, preset)
    lora = _lora_spec(recipe)
    counts = count_parameters(config, recipe.model.freeze, lora)
    world = gpus or recipe.launch.world_size
    per_node = min(world, recipe.launch.nproc_per_node)
    gc = recipe.model.gradient_checkpointing
    dtype = recipe.model.dtype
    precision = {"bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}[dtype]
    L = recipe.packing.packing_length
    micro = recipe.train.micro_batch_size
    aux = (recipe.train.aux_loss_coef if recipe.train.aux_loss_coef is not None
           else config.text_config.aux_loss_alpha) > 0

    def acts(length: int, ckpt_d: bool, ckpt_v: bool) -> Activations:
        tokens = length * micro
        return activation_bytes(config, counts, tokens=tokens, patches=_patches(recipe, length, image_fraction) * micro,
                                dtype=dtype, device=device, ckpt_decoder=ckpt_d, ckpt_vision=ckpt_v,
                                every_k=gc.every_k, lora=lora, aux_loss=aux, ce_chunk_size=recipe.train.ce_chunk_size,
                                seqlens=[length] * micro)

    lengths = sorted({L, *STANDARD_LENGTHS})
    activation_rows = []
    for length in lengths:
        off, on, conf = acts(length, False, False), acts(length, True, True), acts(length, gc.decoder, gc.vision)
        activation_rows.append({
            "packing_length": length, "patches": _patches(recipe, length, image_fraction) * micro,
            "decoder": off.decoder, "decoder_ckpt": on.decoder, "vision": off.vision, "vision_ckpt": on.vision,
            "projector_head": off.projector + off.head, "as_configured_peak": conf.peak})

    configured = acts(L, gc.decoder, gc.vision)
    budget = gpu_mem_gib * GiB - reserve_gib * GiB
    rows: list[PlanRow] = []
    for stage, off_opt, off_par in ((0, False, False), (1, False, False), (1, True, False), (2, False, False),
                                    (2, True, False), (3, False, False), (3, True, False), (3, True, True)):
        st = state_bytes(total=counts.total, trainable=counts.trainable, world=world, stage=stage,
                         precision=precision, offload_optimizer=off_opt, offload_params=off_par,
                         largest_unit=counts.largest_unit, reduce_bucket_size=recipe.deepspeed.reduce_bucket_size)
        total = st.gpu + configured.peak
        max_len = _largest_fitting(lambda length, s=st.gpu: s + acts(length, gc.decoder, gc.vision).peak, budget)
        rows.append(PlanRow(stage=stage, offload=st.offload, states=st, activations=configured.peak, total=total,
                            fits=total <= budget, max_packing_length=max_len, host_per_node=st.host * per_node))
    ds = recipe.deepspeed
    recipe_offload = ("optim+params" if ds.offload_param != "none" else
                      "optim" if ds.offload_optimizer != "none" else "none")
    tc = config.text_config
    expert_params = counts.experts[0]
    moe_layers = sum(tc.is_moe_layer(i) for i in range(tc.num_hidden_layers))
    image_tokens = _patches(recipe, L, image_fraction) // 4
    grid = int(math.isqrt(max(image_tokens * 4, 4)))
    grid -= grid % 2
    flops = training_flops(config, [L], [(grid, grid)] if image_tokens else []) / L
    return Plan(
        source=source, gpus=world, gpus_per_node=per_node, gpu_mem=gpu_mem_gib * GiB, reserve=reserve_gib * GiB,
        dtype=dtype, packing_length=L, micro_batch_size=micro, patches_per_pack=_patches(recipe, L, image_fraction),
        counts={"total": counts.total, "trainable": counts.trainable,
                "parts": {k: list(v) for k, v in counts.parts.items()}, "experts": list(counts.experts),
                "largest_unit": counts.largest_unit, "largest_unit_name": counts.largest_unit_name},
        activation_rows=activation_rows, rows=rows, recipe_row=(ds.zero_stage, recipe_offload),
        moe={"expert_params": expert_params, "expert_share": expert_params / max(counts.total, 1),
             "moe_layers": moe_layers, "gathered_unit_bytes": 2 * DTYPE_BYTES[dtype] * counts.largest_unit},
        flops_per_token=flops)


# ---------------------------------------------------------------------------------------------------- output


def _gib(x: float) -> str:
    return f"{x / GiB:,.1f}"


def _billions(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def render(plan: Plan, recipe_path: str, tflops: float = 989.0, mfu: float = 0.4) -> None:
    """Print the plan as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(130, Console().width))
    c = plan.counts
    parts = ", ".join(f"{k} {_billions(v[0])}" for k, v in c["parts"].items())
    console.print(f"[bold]vlmtune plan[/bold] {recipe_path}: config from {plan.source}")
    console.print(f"parameters {_billions(c['total'])} ({parts}); trainable {_billions(c['trainable'])}; "
                  f"{plan.dtype}; {plan.gpus} GPU(s) x {plan.gpu_mem / GiB:.0f} GiB, {plan.reserve / GiB:.0f} GiB "
                  "reserved (CUDA context, NCCL, fragmentation)")
    console.print(f"packs: packing_length {plan.packing_length} x micro_batch_size {plan.micro_batch_size}, "
                  f"{plan.patches_per_pack} vision patches per pack")

    at = Table(title="Activations per GPU (GiB), one micro-batch", title_justify="left")
    for col in ("packing_length", "patches", "decoder", "decoder ckpt", "vision", "vision ckpt", "projector+head",
                "as configured (peak)"):
        at.add_column(col, justify="right")
    for r in plan.activation_rows:
        at.add_row(str(r["packing_length"]), str(r["patches"]), _gib(r["decoder"]), _gib(r["decoder_ckpt"]),
                   _gib(r["vision"]), _gib(r["vision_ckpt"]), _gib(r["projector_head"]), _gib(r["as_configured_peak"]))
    console.print(at)

    t = Table(title=f"Per GPU (GiB) at packing_length {plan.packing_length}; * = the recipe's choice; step/buf = fp32 "
              "grads at the step + reduce bucket / ZeRO-3 gathered unit; acts = activations as configured (peak); "
              "max L = largest packing_length that fits",
              title_justify="left")
    for col in ("ZeRO", "offload", "params", "grads", "optimizer", "step/buf", "states", "acts", "total", "fits",
                "max L", "host/node"):
        t.add_column(col, justify="right")
    for r in plan.rows:
        mark = "*" if (r.stage, r.offload) == plan.recipe_row else ""
        s = r.states
        t.add_row(f"{r.stage}{mark}", r.offload, _gib(s.params), _gib(s.grads), _gib(s.optimizer),
                  _gib(s.step_buffers), _gib(s.gpu), _gib(r.activations), _gib(r.total),
                  "yes" if r.fits else "[red]no[/red]", f"{r.max_packing_length:,}", _gib(r.host_per_node))
    console.print(t)
    m = plan.moe
    console.print(f"MoE: routed experts {_billions(m['expert_params'])} parameters ({100 * m['expert_share']:.0f}% of "
                  f"the model) in {m['moe_layers']} layers; ZeRO-3 gathers the largest unit, "
                  f"{c['largest_unit_name'] or '-'} ({_billions(c['largest_unit'])}), at once: "
                  f"{_gib(m['gathered_unit_bytes'])} GiB with its gradient")
    step_s = plan.flops_per_token * plan.packing_length * plan.micro_batch_size / (tflops * 1e12 * mfu)
    console.print(f"Throughput: {plan.flops_per_token / 1e9:,.1f} GFLOPs per token (fwd+bwd, vision included); at "
                  f"{100 * mfu:.0f}% of {tflops:,.0f} TFLOPS a micro-batch takes ~{step_s:.2f} s per GPU "
                  f"(~{plan.packing_length * plan.micro_batch_size / step_s:,.0f} tokens/s per GPU)")


def main(argv: list[str]) -> int:
    """``vlmtune plan RECIPE [--gpus N] [--gpu-mem GiB] [--preset a3b|tiny] [--json OUT] [key=value ...]``."""
    from vlmtune.cli import parse_with_overrides

    parser = argparse.ArgumentParser(prog="vlmtune plan", description="Per-GPU memory of a recipe for every ZeRO "
                                     "stage and offload choice, activations per packing_length, what fits. No weights "
                                     "needed. key=value overrides may come anywhere.")
    parser.add_argument("recipe", help="the YAML recipe")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs in the run (default: launch section)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--reserve", type=float, default=4.0, help="GiB kept free per GPU (default 4)")
    parser.add_argument("--image-fraction", type=float, default=0.5,
                        help="share of image tokens in a pack when packing.max_vision_patches is unset (default 0.5); "
                        "with it set, the plan assumes packs full up to that budget")
    parser.add_argument("--preset", choices=("a3b", "tiny"), default=None,
                        help="plan for this model preset instead of model.path/config.json")
    parser.add_argument("--tflops", type=float, default=989.0, help="peak TFLOPS per GPU for the time estimate")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")
    args, overrides = parse_with_overrides(parser, argv)
    if args.gpus is not None and args.gpus < 1:
        parser.error(f"--gpus must be >= 1, got {args.gpus}")
    if not 0 <= args.image_fraction <= 1:
        parser.error(f"--image-fraction must be in [0, 1], got {args.image_fraction}")
    recipe = load_recipe(args.recipe, overrides, world_size=args.gpus)
    try:
        plan = make_plan(recipe, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, reserve_gib=args.reserve,
                         image_fraction=args.image_fraction, preset=args.preset)
    except PlanError as exc:
        print(f"vlmtune plan: error: {exc}", file=sys.stderr)
        return 1
    render(plan, args.recipe, tflops=args.tflops, mfu=args.mfu)
    if args.json is not None:
        args.json.write_text(json.dumps(plan.to_json(), indent=2, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
