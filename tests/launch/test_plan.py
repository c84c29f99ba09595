"""`vlmtune plan`: its estimates against what PyTorch and DeepSpeed really hold.

* Activations: on a wider tiny model (hidden 256, vision hidden 256; 512 packed tokens, two 16x16-patch images) the
  estimate vs the bytes saved for backward, measured with ``torch.autograd.graph.saved_tensors_hooks`` (unique
  storages, parameters excluded), with and without checkpointing, full / frozen-part / LoRA training; the vision
  tower separately (full run minus the run with the tower frozen). Measured relative errors (fp32): 0.01-0.02% without
  checkpointing, +1.7% with it (the 2-D RoPE tables, which checkpoint frames keep alive outside the hooks' view).
* Model states: after one AdamW step on the tiny model, parameter, gradient and Adam bytes equal the estimate exactly
  (full, frozen vision tower, LoRA).
* A3B: parameter counts of the reference; state figures vs DeepSpeed's estimators (0.19.8) at 8 and 32 GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlmtune.launch.plan import (
    GiB,
    LoraSpec,
    _largest_fitting,
    activation_bytes,
    count_parameters,
    main,
    make_plan,
    state_bytes,
)
from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration
from vlmtune.models.kimi_vl.configuration import KimiVLConfig, kimi_vl_a3b, kimi_vl_tiny
from vlmtune.train.loss import IGNORE_INDEX, shift_labels
from vlmtune.train.optim import apply_freeze

REPO = Path(__file__).resolve().parents[2]
PLACEHOLDER = 1813
LORA_TARGETS = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def wide_config() -> KimiVLConfig:
    """A tiny Kimi-VL with realistic proportions: hidden 256 (text and vision), MLA, 8 experts top-2 + 1 shared."""
    return KimiVLConfig(
        vision_config=dict(patch_size=14, init_pos_emb_height=16, init_pos_emb_width=16, num_attention_heads=4,
                           num_hidden_layers=2, hidden_size=256, intermediate_size=512),
        text_config=dict(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                         kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
                         n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                         max_position_embeddings=4096, bos_token_id=1792, eos_token_id=1793, pad_token_id=2047),
        media_placeholder_token_id=PLACEHOLDER)


def _pack() -> dict[str, torch.Tensor | int]:
    """512 tokens in 4 samples of 128; two 16x16-patch images (64 tokens each) in the first two samples."""
    g = torch.Generator().manual_seed(0)
    n = 512
    ids = torch.randint(0, 1700, (1, n), generator=g)
    ids[0, 10:74] = PLACEHOLDER
    ids[0, 140:204] = PLACEHOLDER
    cu = torch.tensor([0, 128, 256, 384, 512], dtype=torch.int32)
    seg = torch.bucketize(torch.arange(n), cu[1:].long(), right=True)
    labels = ids.clone()
    labels[ids == PLACEHOLDER] = IGNORE_INDEX
    labels[0, cu[:-1].long()] = IGNORE_INDEX
    return {"input_ids": ids, "position_ids": (torch.arange(n) - cu.long()[seg])[None], "labels": labels,
            "cu_seqlens": cu, "max_seqlen": 128, "pixel_values": torch.randn(512, 3, 14, 14, generator=g),
            "image_grid_hws": torch.tensor([[16, 16], [16, 16]])}


def saved_bytes(model: torch.nn.Module, inputs: dict) -> int:
    """Bytes autograd keeps for backward during one forward: unique storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs, return_logits=False)
    assert out.loss.requires_grad
    return sum(seen.values())


def _freeze_ns(freeze: dict[str, bool]) -> SimpleNamespace:
    return SimpleNamespace(vision_tower=freeze.get("vision_tower", False), projector=freeze.get("projector", False),
                           decoder=freeze.get("decoder", False),
                           router_frozen=freeze.get("router", freeze.get("decoder", False)))


def measure_and_estimate(freeze: dict[str, bool], lora: LoraSpec | None, ckpt: bool) -> tuple[int, float, object]:
    from vlmtune.patches.rmpad import apply_rmpad
    from vlmtune.train.modes import apply_lora

    config = wide_config()
    torch.manual_seed(0)
    model = KimiVLForConditionalGeneration(config)
    apply_freeze(model, vision_tower=freeze.get("vision_tower", False), projector=freeze.get("projector", False),
                 decoder=freeze.get("decoder", False), router=freeze.get("router"))
    vlm = model
    if lora is not None:
        model = apply_lora(model, SimpleNamespace(r=lora.r, alpha=2.0 * lora.r, dropout=lora.dropout,
                                                  targets=list(lora.targets)))
    apply_rmpad(model, attention="sdpa_varlen")
    vlm.gradient_checkpointing_enable(decoder=ckpt, vision=ckpt)
    model.train()
    inputs = _pack()
    measured = saved_bytes(model, inputs)
    supervised = int((shift_labels(inputs["labels"].reshape(-1), inputs["cu_seqlens"]) != IGNORE_INDEX).sum())
    counts = count_parameters(config, _freeze_ns(freeze), lora)
    est = activation_bytes(config, counts, tokens=512, patches=512, supervised=supervised, seqlens=[128] * 4,
                           dtype="float32", device="cpu", ckpt_decoder=ckpt, ckpt_vision=ckpt, lora=lora)
    return measured, est.saved, est


VARIANTS = {
    "full": ({}, None),
    "vision_frozen": ({"vision_tower": True}, None),
    "projector_only": ({"vision_tower": True, "decoder": True}, None),
    "lora_dropout": ({"vision_tower": True, "decoder": True}, LoraSpec(r=8, dropout=0.05, targets=LORA_TARGETS)),
    "lora_no_dropout": ({"vision_tower": True, "decoder": True}, LoraSpec(r=8, dropout=0.0, targets=LORA_TARGETS)),
}


@pytest.mark.parametrize("ckpt", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_activation_estimate_matches_saved_tensors(variant: str, ckpt: bool) -> None:
    freeze, lora = VARIANTS[variant]
    measured, estimate, _ = measure_and_estimate(freeze, lora, ckpt)
    assert abs(estimate - measured) / measured < 0.03, (measured, estimate, estimate / measured)


@pytest.mark.parametrize("ckpt", [False, True], ids=["no_ckpt", "ckpt"])
def test_decoder_and_vision_estimates_separately(ckpt: bool) -> None:
    full, _, est_full = measure_and_estimate({}, None, ckpt)
    no_vision, _, est_no_vision = measure_and_estimate({"vision_tower": True}, None, ckpt)
    vision_measured = full - no_vision  # the tower's own activations (the projector runs either way)
    assert est_no_vision.vision == 0
    assert abs(est_full.vision - vision_measured) / vision_measured < 0.12, (vision_measured, est_full.vision)
    decoder_measured = no_vision - est_no_vision.projector - est_no_vision.head
    assert abs(est_full.decoder - decoder_measured) / decoder_measured < 0.03, (decoder_measured, est_full.decoder)
    if not ckpt:  # checkpointing keeps a fraction of it
        ckpt_full = measure_and_estimate({}, None, True)[0]
        assert ckpt_full < 0.2 * full


# ------------------------------------------------------------------------------------------------ model states


def _count_after_adamw_step(model: torch.nn.Module) -> dict[str, int]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    optimizer.step()
    return {
        "params": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in trainable),
        "optimizer": sum(st[k].numel() * st[k].element_size() for st in optimizer.state.values()
                         for k in ("exp_avg", "exp_avg_sq")),
    }


@pytest.mark.parametrize("variant", ["full", "vision_frozen", "lora_dropout"])
def test_state_estimate_equals_adamw_bytes(variant: str) -> None:
    from vlmtune.train.modes import apply_lora

    freeze, lora = VARIANTS[variant]
    config = kimi_vl_tiny()
    model = KimiVLForConditionalGeneration(config)
    apply_freeze(model, vision_tower=freeze.get("vision_tower", False), decoder=freeze.get("decoder", False),
                 router=freeze.get("decoder", False))
    if lora is not None:
        model = apply_lora(model, SimpleNamespace(r=lora.r, alpha=16.0, dropout=lora.dropout,
                                                  targets=list(lora.targets)))
    real = _count_after_adamw_step(model)
    counts = count_parameters(config, _freeze_ns(freeze), lora)
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = state_bytes(total=counts.total, trainable=counts.trainable, world=1, stage=0, precision="fp32")
    assert (est.params, est.grads, est.optimizer, est.step_buffers) == (
        real["params"], real["grads"], real["optimizer"], 0)


def test_zero_partitioning_arithmetic() -> None:
    """bf16 bytes per parameter: 2 weights + 2 grads + 12 optimizer + 4 fp32 grads at the step, split by stage."""
    phi, psi, n = 1_000_000, 250_000, 4
    s = {stage: state_bytes(total=phi, trainable=psi, world=n, stage=stage, reduce_bucket_size=1, largest_unit=10)
         for stage in range(4)}
    assert (s[0].params, s[0].grads, s[0].optimizer, s[0].step_buffers) == (2 * phi, 2 * psi, 12 * psi, 4 * psi)
    assert (s[1].params, s[1].grads, s[1].optimizer, s[1].step_buffers) == (2 * phi, 2 * psi, 3 * psi, psi + 2)
    assert (s[2].params, s[2].grads, s[2].optimizer, s[2].step_buffers) == (2 * phi, psi / 2, 3 * psi, psi + 2)
    assert (s[3].params, s[3].grads, s[3].optimizer, s[3].step_buffers) == (phi / 2, psi / 2, 3 * psi, psi + 40)
    off = state_bytes(total=phi, trainable=psi, world=n, stage=3, offload_optimizer=True, offload_params=True,
                      largest_unit=10)
    assert (off.gpu, off.host) == (40, 2 * phi / n + psi / 2 + 4 * psi)


# ---------------------------------------------------------------------------------------------------------- A3B


def test_a3b_parameter_counts() -> None:
    counts = count_parameters(kimi_vl_a3b())
    assert round(counts.total / 1e9, 2) == 16.41 and counts.trainable == counts.total
    parts = {k: v[0] for k, v in counts.parts.items()}
    assert round(parts["language_model"] / 1e9, 2) == 15.96
    assert round(parts["vision_tower"] / 1e6, 1) == 416.9 and round(parts["multi_modal_projector"] / 1e6, 1) == 30.7
    # 26 MoE layers x 64 experts x 3 x 2048 x 1408
    assert counts.experts[0] == 26 * 64 * 3 * 2048 * 1408
    # ZeRO-3 gathers an MoE block whole: 64 experts + 2 shared experts' worth + the router
    assert counts.largest_unit_name == "language_model.model.layers.1.mlp"
    assert counts.largest_unit == 64 * 3 * 2048 * 1408 + 3 * 2048 * 2816 + 64 * 2048


@pytest.mark.parametrize("gpus", [8, 32])
def test_a3b_states_agree_with_deepspeed_estimators(gpus: int) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = count_parameters(kimi_vl_a3b())
    phi, unit = counts.total, counts.largest_unit
    nodes, per_node = gpus // 8, 8

    def ours(stage: int, opt: bool = False, par: bool = False) -> float:
        return state_bytes(total=phi, trainable=phi, world=gpus, stage=stage, offload_optimizer=opt,
                           offload_params=par, largest_unit=unit, reduce_bucket_size=0).gpu

    def z2(offload: bool) -> float:
        return estimate_zero2_model_states_mem_needs(phi, per_node, nodes, cpu_offload=offload)[1]

    def z3(opt: bool, par: bool) -> float:
        return estimate_zero3_model_states_mem_needs(phi, unit, per_node, nodes, cpu_offload=opt,
                                                     cpu_offload_params=par)[1]

    close = lambda a, b: abs(a - b) / b < 0.05  # noqa: E731
    assert ours(2) == pytest.approx(z2(False), rel=1e-9)  # 2 Phi + 18 Phi / N: identical accounting
    assert close(ours(2, opt=True), z2(True))
    assert ours(3, opt=True) == pytest.approx(z3(True, False), rel=1e-9)  # 4 x unit + 2 Phi / N
    assert ours(3, opt=True, par=True) == pytest.approx(z3(True, True), rel=1e-9)  # 4 x unit
    if gpus == 8:
        assert close(ours(3), z3(False, False))  # the fp32 gradients of one 1e9-element sub-group at the step
    else:
        # with a partition below sub_group_size, we also count the bf16 gradient partition buffer
        # (stage3's grad_partitions_flat_buffer), which DeepSpeed's 18 Phi / N leaves out
        assert ours(3) - z3(False, False) == pytest.approx(2 * phi / gpus, rel=1e-6)
    # ZeRO-1 keeps the whole bf16 gradient: ZeRO-2 plus 2 Psi (1 - 1/N)
    assert ours(1) - ours(2) == pytest.approx(2 * phi * (1 - 1 / gpus), rel=1e-9)


# ------------------------------------------------------------------------------------------------- the command


@pytest.mark.parametrize("name", ["full_zero3", "lora_zero2", "vision_projector", "4node_full", "long_context"])
def test_plan_a3b_recipes(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = REPO / "recipes" / f"kimi_vl_a3b_{name}.yaml"
    out = tmp_path / "plan.json"
    assert main([str(recipe), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Kimi-VL-A3B sizes" in text and "Per GPU (GiB)" in text
    plan = json.loads(out.read_text())
    chosen = [r for r in plan["rows"] if (r["stage"], r["offload"]) == tuple(plan["recipe_row"])]
    assert len(chosen) == 1 and chosen[0]["fits"], chosen  # every shipped recipe fits its 80 GB GPUs
    assert chosen[0]["max_packing_length"] >= plan["packing_length"]


def test_plan_preset_and_gpus_flags(tmp_path: Path) -> None:
    recipe = REPO / "recipes" / "tiny_cpu.yaml"
    out = tmp_path / "plan.json"
    assert main([str(recipe), "--preset", "tiny", "--gpus", "2", "--gpu-mem", "1", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["gpus"] == 2 and plan["source"] == "preset tiny" and plan["gpu_mem"] == 1 * GiB
    assert plan["counts"]["total"] == count_parameters(kimi_vl_tiny(num_base_tokens=1024)).total


def test_largest_fitting_length_is_the_boundary() -> None:
    from vlmtune.config import load_recipe

    recipe = load_recipe(REPO / "recipes" / "kimi_vl_a3b_full_zero3.yaml")
    plan = make_plan(recipe, gpu_mem_gib=80)
    row = next(r for r in plan.rows if r.stage == 3 and r.offload == "none")
    assert row.fits and row.max_packing_length % 256 == 0 and row.max_packing_length > 8192
    assert _largest_fitting(lambda n: 10 * n, 2560) == 256
    assert _largest_fitting(lambda n: 10 * n, 2559) == 0
