"""Fine-tuning modes through the real trainer (``vlmtune.train.trainer.train`` in this process, one rank, ZeRO-2):

1. LoRA (``vlmtune.train.modes.apply_lora``, peft) wraps exactly the MLA projections, the dense first-layer MLP, the
   shared experts and every routed expert of the tiny model, and the first backward reaches every adapter that the
   routing says it must reach, and no other.
2. ``model.freeze``: the frozen parts' weights in the saved checkpoint are bit-identical to the initial weights, every
   trainable tensor moved.
3. Per-part learning rates (``train.vision_lr``, ``train.projector_lr``) under the schedule, and weight decay only on
   matrices: read from the optimizer state DeepSpeed saves at every step, and checked on the weights it updated.

Measured (fp32, one core, ``python -m pytest -q tests/train/test_modes.py``): 7 tests in 11 s (7.6 s of it building
the session's tiny model, demo set and packs). LoRA: 69 adapters, 48 on routed experts; with one expert per MoE layer
blocked, the other 7 of each layer received tokens that reach the loss, so 63 of 69 lora_B got a gradient, lora_A none.
The step-1 weights equal AdamW on DeepSpeed's own gradients with the expected lr / weight_decay within 7.5e-9.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.train.conftest import (
    Assets,
    deepspeed_first_step_grads,
    deepspeed_optim_state,
    make_recipe,
    run_in_process,
)

IGNORE_INDEX = -100
# Independent of vlmtune.train.optim: the part of a Kimi-VL parameter, from its checkpoint name.
ROUTER = re.compile(r"^language_model\.model\.layers\.\d+\.mlp\.gate\.weight$")
ROUTER_BIAS = re.compile(r"^language_model\.model\.layers\.\d+\.mlp\.gate\.e_score_correction_bias$")
PART_PREFIXES = {"vision_tower": "vision_tower.", "projector": "multi_modal_projector.", "decoder": "language_model."}


def part(name: str) -> str:
    """vision_tower / projector / decoder / router / router_bias of a published parameter or buffer name."""
    if ROUTER.match(name):
        return "router"
    if ROUTER_BIAS.match(name):
        return "router_bias"
    for p, prefix in PART_PREFIXES.items():
        if name.startswith(prefix):
            return p
    raise AssertionError(f"{name}: no part")


def initial_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The base model's tensors straight from its safetensors shards (published names)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(shard))
    assert out, f"no safetensors in {model_dir}"
    return out


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The engine's weights in a trainer checkpoint, by published name (through vlmtune.train.export's reader)."""
    from vlmtune.train.export import load_engine_state, read_checkpoint_info, split_state

    base, lora = split_state(load_engine_state(read_checkpoint_info(ckpt)))
    assert not lora
    return base


# ----------------------------------------------------------------------------------------------------------------
# 1. LoRA placement and the first backward
# ----------------------------------------------------------------------------------------------------------------
LORA_TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What those targets must wrap in Kimi-VL, written out from the architecture (not from peft's matching rule).
ADAPTED = re.compile(r"^language_model\.model\.layers\.\d+\.(self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                     r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj)$")
ROUTED = re.compile(r"^language_model\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj$")
# One routed expert per MoE layer made unreachable through its correction bias (it only chooses experts): no token
# goes there, so its adapters must get an exact-zero gradient. {layer index: expert}
BLOCKED = {1: 5, 2: 2}


def _active_tokens(labels: torch.Tensor, cu_seqlens: torch.Tensor, last_layer: bool) -> torch.Tensor:
    """(N,) bool: tokens whose MoE output at a layer reaches the loss.

    Last layer: its output only feeds the token's own logits, so exactly the tokens with a supervised next-token
    target. Earlier MoE layers: every token (the later layers' routers read its hidden state, and their sequence aux
    loss has a gradient through the router scores whether the router weight is frozen or not).
    """
    from vlmtune.train.loss import shift_labels

    targets = shift_labels(labels.reshape(-1), cu_seqlens)  # (N,)
    return targets != IGNORE_INDEX if last_layer else torch.ones_like(targets, dtype=torch.bool)


@pytest.fixture(scope="module")
def lora_step(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One trainer step of one micro-batch with LoRA on the default targets (decoder and vision tower frozen), with
    hooks that record the routing of every MoE layer, the micro-batch, and each adapter weight's first gradient."""
    from peft.tuners.lora import LoraLayer

    from vlmtune.models.kimi_vl.moe import KimiVLTopkRouter
    from vlmtune.train import ds_config, trainer

    root = tmp_path_factory.mktemp("lora")
    recipe, _ = make_recipe(
        assets, root, "lora",
        model={"freeze": {"decoder": True, "vision_tower": True},
               "lora": {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.05, "targets": LORA_TARGETS}},
        train={"max_steps": 1, "global_batch_size": 1})
    rec: dict[str, Any] = {"routes": {}, "grads": {}, "inputs": []}

    def _record_route(layer: int) -> Any:
        def hook(_module: nn.Module, _args: Any, out: tuple[torch.Tensor, ...]) -> None:
            rec["routes"].setdefault(layer, out[1].detach().clone())  # topk_idx (N, K) of the first forward
        return hook

    def _record_grad(name: str) -> Any:
        def hook(grad: torch.Tensor) -> None:
            rec["grads"].setdefault(name, grad.detach().clone())  # the first backward's gradient
        return hook

    def build(recipe_: Any, dist: Any) -> tuple[nn.Module, nn.Module]:
        model, vlm = original_build(recipe_, dist)
        rec["wrapped"] = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                                if isinstance(m, LoraLayer))
        rec["report"] = dict(model.vlmtune_lora_report)
        rec["num_layers"] = vlm.config.text_config.num_hidden_layers
        rec["aux_loss_alpha"] = vlm.language_model.model.layers[1].mlp.aux_loss_alpha
        layers = vlm.language_model.model.layers
        for layer, expert in BLOCKED.items():
            layers[layer].mlp.gate.e_score_correction_bias[expert] = -100.0  # sigmoid scores are in (0, 1)
        for name, mod in vlm.named_modules():
            if isinstance(mod, KimiVLTopkRouter):
                mod.register_forward_hook(_record_route(int(name.split(".")[3])))
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.register_hook(_record_grad(name))
        rec["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        return model, vlm

    class RecordingForward(ds_config.LossForward):
        def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
            rec["inputs"].append({k: inputs[k].detach().clone() for k in ("labels", "cu_seqlens")}
                                 | {"num_padding": inputs["num_padding"]})
            return super().forward(**inputs)

    original_build = trainer.build_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "build_model", build)
        mp.setattr(ds_config, "LossForward", RecordingForward)
        (step,) = run_in_process(recipe)
    rec["step"] = step
    return rec


def test_lora_wraps_attention_dense_shared_and_routed_experts(assets: Assets, lora_step: dict[str, Any]) -> None:
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration

    fresh = KimiVLForConditionalGeneration.from_pretrained(assets.model)
    cfg = fresh.config.text_config
    want = sorted(n for n, m in fresh.named_modules() if isinstance(m, nn.Linear) and ADAPTED.match(n))
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    per_moe = (cfg.n_routed_experts + 1) * 3  # every routed expert + the (one) shared-experts MLP, 3 projections each
    assert len(want) == cfg.num_hidden_layers * 4 + cfg.first_k_dense_replace * 3 + n_moe * per_moe == 69
    assert lora_step["wrapped"] == want
    routed = [n for n in want if ROUTED.match(n)]
    assert len(routed) == n_moe * cfg.n_routed_experts * 3 == 48
    assert lora_step["report"] == {"adapters": 69, "expert_adapters": 48}
    # Trainable: the adapters and the projector (not frozen), nothing of the decoder or the vision tower.
    trainable = lora_step["trainable"]
    adapters = [n for n in trainable if ".lora_" in n]
    assert len(adapters) == 2 * 69
    others = sorted({n.removeprefix("base_model.model.") for n in trainable if ".lora_" not in n})
    assert others == sorted(n for n, _ in fresh.multi_modal_projector.named_parameters(prefix="multi_modal_projector"))


def test_lora_first_backward_reaches_the_routed_adapters(lora_step: dict[str, Any]) -> None:
    """lora_B starts at zero, so the first backward gives lora_A an exact-zero gradient (dL/dA = B^T ...) and lora_B a
    non-zero one wherever the adapter's output reaches the loss; routed experts exactly where the router sent tokens
    that reach the loss."""
    (batch,) = lora_step["inputs"]
    assert batch["num_padding"] == 0
    grads = lora_step["grads"]
    wrapped = lora_step["wrapped"]
    assert sorted(grads) == [n for n in lora_step["trainable"] if ".lora_" in n]  # every adapter is in the graph

    def module(param: str) -> str:  # base_model.model.X.lora_B.default.weight -> X
        return param.removeprefix("base_model.model.").split(".lora_")[0]

    a_grads = {module(n): g for n, g in grads.items() if ".lora_A." in n}
    b_grads = {module(n): g for n, g in grads.items() if ".lora_B." in n}
    assert sorted(a_grads) == sorted(b_grads) == wrapped
    assert all(torch.count_nonzero(g) == 0 for g in a_grads.values())
    with_grad = {m for m, g in b_grads.items() if torch.count_nonzero(g) > 0}

    routes = lora_step["routes"]
    moe_layers = sorted(routes)
    assert moe_layers == [1, 2] and lora_step["num_layers"] == 3  # the last MoE layer is the last decoder layer
    assert lora_step["aux_loss_alpha"] > 0  # the earlier MoE layer's tokens all reach the next layer's aux loss
    received: dict[int, set[int]] = {}
    reaching: dict[int, set[int]] = {}
    for layer in moe_layers:
        idx = routes[layer]  # (N, K)
        assert idx.shape[0] == batch["labels"].numel()
        active = _active_tokens(batch["labels"], batch["cu_seqlens"], last_layer=layer == moe_layers[-1])
        received[layer] = set(idx.unique().tolist())
        reaching[layer] = set(idx[active].unique().tolist())
        assert BLOCKED[layer] not in received[layer]
    want = {m for m in wrapped if not ROUTED.match(m)}
    want |= {m for m in wrapped if (r := ROUTED.match(m)) and int(r[2]) in reaching[int(r[1])]}
    assert with_grad == want
    print(f"\nexperts that received tokens {received}, that reach the loss {reaching}; "
          f"adapters with a lora_B gradient {len(with_grad)} of {len(wrapped)}")


# ----------------------------------------------------------------------------------------------------------------
# 2. Freezing
# ----------------------------------------------------------------------------------------------------------------
# model.freeze settings -> the parts that must stay bit-identical. The router follows the decoder unless told
# otherwise; its correction bias is a buffer no optimizer touches (router_bias_update_rate is 0), always unchanged.
FREEZES = {
    "vision_projector": ({"vision_tower": True, "projector": True}, {"vision_tower", "projector"}),
    "decoder": ({"decoder": True}, {"decoder", "router"}),
    "routers_alone": ({"vision_tower": True, "decoder": True, "router": False}, {"vision_tower", "decoder"}),
}
ALL_PARTS = {"vision_tower", "projector", "decoder", "router"}


@pytest.mark.parametrize("case", list(FREEZES))
def test_frozen_parts_are_bit_identical(assets: Assets, tmp_path: Path, case: str) -> None:
    freeze, frozen = FREEZES[case]
    recipe, _ = make_recipe(assets, tmp_path, case, model={"freeze": freeze},
                            train={"max_steps": 2, "global_batch_size": 2})
    steps = run_in_process(recipe)
    assert [r["step"] for r in steps] == [1, 2]
    before = initial_weights(assets.model)
    after = checkpoint_weights(Path(recipe.train.output_dir) / "checkpoints" / "step-00000002")
    assert sorted(after) == sorted(before)
    by_part: dict[str, list[str]] = {}
    for name in before:
        by_part.setdefault(part(name), []).append(name)
    assert set(by_part) == ALL_PARTS | {"router_bias"}
    for p, names in by_part.items():
        for name in names:
            if p in frozen or p == "router_bias":
                assert torch.equal(after[name], before[name]), f"{case}: frozen {name} changed"
            else:
                assert not torch.equal(after[name], before[name]), f"{case}: trainable {name} did not change"


# ----------------------------------------------------------------------------------------------------------------
# 3. Per-part learning rates and weight decay
# ----------------------------------------------------------------------------------------------------------------
LR, VISION_LR, PROJECTOR_LR, WD = 1e-2, 2e-3, 5e-3, 0.1
BETAS, EPS = (0.9, 0.95), 1e-8
PEAK = {"vision_tower": VISION_LR, "projector": PROJECTOR_LR, "decoder": LR, "router": LR}
GROUP_PART = {"vision_tower": "vision_tower", "multi_modal_projector": "projector", "language_model": "decoder",
              "router": "router"}


@pytest.fixture(scope="module")
def lr_run(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """3 steps, cosine after 2 warmup steps down to 0.1 x peak, per-part peaks, weight decay 0.1; a checkpoint at
    every step (each holds the optimizer state DeepSpeed stepped with)."""
    recipe, _ = make_recipe(
        assets, tmp_path_factory.mktemp("lr"), "lr",
        train={"max_steps": 3, "global_batch_size": 2, "learning_rate": LR, "vision_lr": VISION_LR,
               "projector_lr": PROJECTOR_LR, "weight_decay": WD, "schedule": "cosine", "warmup": 2,
               "min_lr_ratio": 0.1, "save_every": 1, "keep_last": None})
    run_in_process(recipe)
    return recipe, Path(recipe.train.output_dir)


def _groups_by_name(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Published parameter name -> the hyperparameters of the AdamW group DeepSpeed stepped it in."""
    groups = state["base_optimizer_state"]["param_groups"]
    assert len(groups) == len(state["param_slice_mappings"])
    out: dict[str, dict[str, Any]] = {}
    for group, mapping in zip(groups, state["param_slice_mappings"], strict=True):
        for name in mapping:
            out[name.removeprefix("model.")] = {k: v for k, v in group.items() if k != "params"}
    return out


def test_part_learning_rates_follow_the_schedule(assets: Assets, lr_run: tuple[Any, Path]) -> None:
    """Every group's lr at steps 1-3 = its part's peak x the schedule's multiplier (0.5 warming up, 1.0, then 0.55:
    the single decay step is half way down the cosine to the 0.1 floor); every parameter sits in a group of its own
    part; metrics.jsonl logs the decoder's lr."""
    from tests.train.conftest import read_steps
    from vlmtune.train.schedule import lr_multiplier

    recipe, run_dir = lr_run
    assert recipe.train.warmup_steps == 2
    mults = [lr_multiplier(s, schedule="cosine", max_steps=3, warmup=2, min_lr_ratio=0.1) for s in range(3)]
    assert mults == pytest.approx([0.5, 1.0, 0.55], abs=1e-15)  # the one decay step: half way to the 0.1 floor
    names = sorted(initial_weights(assets.model))
    params = [n for n in names if not ROUTER_BIAS.match(n)]  # the correction bias is a buffer
    for step, mult in enumerate(mults, start=1):
        groups = _groups_by_name(deepspeed_optim_state(run_dir, step))
        assert sorted(groups) == params  # nothing frozen: every parameter, each in one group
        seen = set()
        for name, g in groups.items():
            p = part(name)
            assert GROUP_PART[g["name"].split("/")[0]] == p, (name, g["name"])
            assert g["lr"] == pytest.approx(PEAK[p] * mult, rel=1e-12), (step, name)
            seen.add((p, g["lr"]))
        assert len(seen) == 4
    logged = [r["lr"] for r in read_steps(run_dir)]
    assert logged == pytest.approx([LR * m for m in mults], rel=1e-12)


# Named parameters of each kind (a few per part), and the kind of every parameter from its shape alone.
NO_DECAY_NAMED = [
    "vision_tower.patch_embed.pos_emb.weight",  # (16, 16, 64): a table, not a matrix, despite its 3 dimensions
    "vision_tower.patch_embed.proj.bias", "vision_tower.encoder.blocks.0.norm0.weight",
    "vision_tower.encoder.blocks.1.wqkv.bias", "vision_tower.encoder.final_layernorm.bias",
    "multi_modal_projector.pre_norm.weight", "multi_modal_projector.linear_2.bias",
    "language_model.model.layers.0.input_layernorm.weight", "language_model.model.layers.2.self_attn.kv_a_layernorm.weight",
    "language_model.model.layers.1.post_attention_layernorm.weight", "language_model.model.norm.weight",
]
DECAY_NAMED = [
    "vision_tower.patch_embed.proj.weight", "vision_tower.encoder.blocks.0.wqkv.weight",
    "vision_tower.encoder.blocks.1.mlp.fc1.weight", "multi_modal_projector.linear_1.weight",
    "language_model.model.embed_tokens.weight", "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.1.self_attn.kv_b_proj.weight", "language_model.model.layers.0.mlp.down_proj.weight",
    "language_model.model.layers.2.mlp.experts.7.up_proj.weight",
    "language_model.model.layers.1.mlp.shared_experts.gate_proj.weight", "language_model.model.layers.1.mlp.gate.weight",
    "language_model.lm_head.weight",
]


def test_weight_decay_only_on_matrices(assets: Assets, lr_run: tuple[Any, Path]) -> None:
    """weight_decay is 0 exactly on norms, biases and the position table and WD on every matrix (router included), in
    the groups DeepSpeed stepped; and the step-1 weights are AdamW with those lr / weight_decay on DeepSpeed's own
    gradients (exp_avg = (1 - beta1) g after one step), where the decay term is 30x the tolerance or more."""
    _, run_dir = lr_run
    before = initial_weights(assets.model)
    state = deepspeed_optim_state(run_dir, 1)
    groups = _groups_by_name(state)
    for name in NO_DECAY_NAMED:
        assert groups[name]["weight_decay"] == 0.0, name
    for name in DECAY_NAMED:
        assert groups[name]["weight_decay"] == WD, name
    no_decay = sorted(n for n, g in groups.items() if g["weight_decay"] == 0.0)
    assert no_decay == sorted([n for n in groups if before[n].dim() == 1] + ["vision_tower.patch_embed.pos_emb.weight"])
    assert all(groups[n]["weight_decay"] == WD for n in groups if n not in no_decay)

    grads = {n: g.view_as(before[n]) for n, g in deepspeed_first_step_grads(run_dir, BETAS[0]).items()}
    after = checkpoint_weights(run_dir / "checkpoints" / "step-00000001")
    tol = 1e-7  # measured: 7.5e-9 at most
    visible = set()  # where a wrong weight_decay (0 <-> WD) would move the weight by 30x tol or more
    for name, grad in grads.items():
        hp = groups[name]
        p = nn.Parameter(before[name].clone())
        p.grad = grad.clone()
        torch.optim.AdamW([p], lr=hp["lr"], betas=BETAS, eps=EPS, weight_decay=hp["weight_decay"],
                          foreach=False).step()
        assert (after[name] - p.detach()).abs().max() <= tol, name
        if hp["lr"] * WD * before[name].abs().max() >= 30 * tol:
            visible.add(name)
    zero_init = {n for n in NO_DECAY_NAMED if not before[n].any()}  # biases start at 0: decay cannot show there
    assert zero_init == {n for n in NO_DECAY_NAMED if n.endswith(".bias")}
    assert set(DECAY_NAMED) | (set(NO_DECAY_NAMED) - zero_init) <= visible
