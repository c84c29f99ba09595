"""The traps of shared/reference/lessons.md that no other test file pinned down, each asserted on numbers.

The other lessons already have tests elsewhere (the lesson -> test audit is in the message of the commit that added
this file); the tests here close the gaps that audit found:

* ZeRO-3 + non-reentrant checkpointing with frozen parameters in the checkpointed blocks (LoRA on both towers, a
  frozen tower, the routers alone): no CheckpointError, losses bit-identical to checkpointing off, the checkpoint
  calls land exactly on the blocks with a trainable parameter, frozen weights bit-identical, MoE blocks ZeRO-3 leaves.
* ``train.aux_loss_coef`` reaches the gradients (router weights), and 0 is exactly no aux loss: the trainer's
  gradients equal plain PyTorch's at each coefficient.
* A pack with no supervised token: loss exactly 0, every trainable parameter gets a gradient TENSOR (zeros), and it
  adds exactly nothing to a step's gradient.
* A text-only pack with the vision tower forced to run (ZeRO-3 / several ranks): bit-identical loss and logits, the
  tower's gradients are zeros, not None.
* Training-mode routing is noaux_tc as published (no greedy fallback); LoRA targets that match nothing are errors.
* Packing never decodes pixels; training decodes each image once per use and never re-tokenizes (offline packs and
  on-the-fly packing, two epochs).
* ``train.resume``: a path resumes from that checkpoint, auto resumes from the newest one; the minimal recipe (every
  default) trains; ``deepspeed.extra`` is deep-merged.
* Every recipe field is read by some library code ("flags that silently do nothing"), and the three that were not
  (deepspeed.torch_adam, logging.plots, logging.log_every; found by this file, fixed since) checked by their effect.

Whole file: about 30 s on one core (the ZeRO-3 cases are the longest, ~3-9 s each).

Measured (fp32, one core, torch 2.13 CPU): ZeRO-3 with checkpointing on vs off gives bit-identical losses, grad norms
and weights in all three cases; the trainer's gradients equal plain PyTorch's within 1e-5 of each tensor's largest
gradient at aux coefficients 0 and 0.1, while the router gradients of the two runs differ by 1.58x and 1.16x their
largest element (layers 1 and 2); the training-mode router picks other experts than greedy routing for 51 of 60 tokens.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.train.conftest import (
    TRAIN_SAMPLES,
    Assets,
    build_tiny_model,
    deepspeed_first_step_grads,
    make_recipe,
    pack_data,
    run_in_process,
    write_recipe,
)
from tests.train.test_modes import initial_weights
from vlmtune.config import RecipeError

REPO = Path(__file__).resolve().parents[1]
BETAS = (0.9, 0.95)  # the AdamW betas the test recipes use (the schema default)
GRAD_RTOL = 1e-5  # trainer vs plain PyTorch, relative to each tensor's largest gradient (as test_trainer_grads.py)
DECODER_TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_TARGETS = ["wqkv", "wo", "fc0", "fc1"]
ROUTER = re.compile(r"^language_model\.model\.layers\.\d+\.mlp\.gate\.weight$")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """The trainer tests' assets (tests/train/conftest.py, whose fixture is not visible from here): the tiny model
    (256 patches per image at most), the 48-sample demo set and its 512-token packs."""
    from data_tools.demo_data import generate_demo_data

    root = tmp_path_factory.mktemp("lessons_assets")
    model = build_tiny_model(root / "model")
    generate_demo_data(root / "demo", samples=TRAIN_SAMPLES, eval_samples=6, seed=0)
    train_file = root / "demo" / "train.jsonl"
    return Assets(model, train_file, pack_data(model, train_file, root / "packs"))


def _zero3_weights(output_dir: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(base weights by published name, LoRA (A, B) by module) of a ZeRO-3 trainer checkpoint, gathered to fp32.

    Read with DeepSpeed's own gatherer, independent of `vlmtune export`'s reader."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vlmtune.train.export import split_state

    engine = output_dir / "checkpoints" / f"step-{step:08d}" / "engine"
    with contextlib.redirect_stdout(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(engine), tag="state")
    return split_state(state)


def _assert_grads_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for name, ref in want.items():
        ref = ref.flatten()
        assert (got[name] - ref).abs().max() <= GRAD_RTOL * ref.abs().max() + 1e-12, f"{what}: {name}"


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _tiny_loader(assets: Assets, **kw: Any) -> Any:
    from vlmtune.data.loader import OfflinePackSource, PackedLoader
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor

    args: dict[str, Any] = dict(micro_batch_size=1, global_batch_size=4, seed=0, balance=True,
                                image_processor=KimiVLImageProcessor.from_pretrained(assets.model))
    args.update(kw)
    return PackedLoader(OfflinePackSource(assets.packs), **args)


def _rmpad_model(assets: Assets, dtype: torch.dtype = torch.float32) -> nn.Module:
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration
    from vlmtune.patches.rmpad import apply_rmpad

    model = KimiVLForConditionalGeneration.from_pretrained(assets.model, dtype=dtype)
    apply_rmpad(model, attention="sdpa_varlen")
    return model.train()


def _set_aux_alpha(model: nn.Module, alpha: float) -> None:
    for _, moe in model.language_model.model.moe_layers():
        moe.aux_loss_alpha = alpha


# ----------------------------------------------------------------------------------------------------------------
# MoE / DeepSpeed: ZeRO-3 + non-reentrant checkpointing with frozen parameters
# ----------------------------------------------------------------------------------------------------------------
# name -> (model sections, vision checkpointing switch, trainable decoder layers, vision blocks, frozen parts). kimi_vl_tiny: 3 decoder layers (0 dense, 1-2 MoE), 2 vision blocks.
ZERO3_CASES: dict[str, tuple[dict[str, Any], bool, int, int, set[str]]] = {
    # Every base weight frozen, LoRA adapters in every decoder layer AND every vision block: each checkpointed block
    # holds frozen parameters next to trainable ones, in both towers. The schema accepts vision checkpointing with
    # model.freeze.vision_tower here because LoRA targets put adapters in the tower (see the schema test below).
    "lora_both_towers": ({"freeze": {"vision_tower": True, "decoder": True},
                          "lora": {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0,
                                   "targets": DECODER_TARGETS + VISION_TARGETS}},
                         True, 3, 2, {"vision_tower", "decoder", "router"}),
    # A fully frozen tower (vision checkpointing off: the schema and the trainer refuse it, see
    # test_vision_checkpointing_of_a_frozen_tower_is_refused): the tower runs under no_grad and keeps no activations.
    "frozen_tower": ({"freeze": {"vision_tower": True}}, False, 3, 0, {"vision_tower"}),
    # The routers alone in a frozen decoder, both switches on (a recipe the schema accepts): MoE layers hold frozen
    # attention and experts next to a trainable router; the dense layer 0 has nothing trainable, so it is not
    # checkpointed.
    "routers_alone": ({"freeze": {"decoder": True, "router": False}}, True, 2, 2, {"decoder"}),
}


def _part(name: str) -> str:
    if ROUTER.match(name):
        return "router"
    if name.endswith("e_score_correction_bias"):
        return "router_bias"
    for part, prefix in (("vision_tower", "vision_tower."), ("projector", "multi_modal_projector."),
                         ("decoder", "language_model.")):
        if name.startswith(prefix):
            return part
    raise AssertionError(name)


def _zero3_run(assets: Assets, root: Path, case: str, checkpointing: bool) -> dict[str, Any]:
    """Two ZeRO-3 steps of 2 micro-batches; counts the decoder / vision checkpoint calls and keeps the model."""
    import vlmtune.models.kimi_vl.decoder as decoder_mod
    import vlmtune.models.kimi_vl.vit as vit_mod
    from vlmtune.train import trainer

    sections, vision_ckpt, _, _, _ = ZERO3_CASES[case]
    model = {"path": str(assets.model), "dtype": "float32", "attention": "sdpa_varlen", **sections,
             "gradient_checkpointing": {"decoder": checkpointing, "vision": checkpointing and vision_ckpt}}
    recipe, _ = make_recipe(assets, root, f"{case}_{'gc' if checkpointing else 'nogc'}", model=model,
                            deepspeed={"zero_stage": 3}, train={"max_steps": 2, "global_batch_size": 2})
    rec: dict[str, Any] = {"calls": {"decoder": 0, "vision": 0}, "tower_records_graph": []}

    def counting(region: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            assert kwargs.get("use_reentrant") is False
            rec["calls"][region] += 1
            return fn(*args, **kwargs)
        return wrapped

    original_build = trainer.build_model

    def build(recipe_: Any, dist: Any) -> tuple[nn.Module, nn.Module]:
        model_, vlm = original_build(recipe_, dist)
        rec["vlm"] = vlm
        # Whether autograd keeps the tower's activations: its output (P/4, 4, D) carries a graph.
        vlm.vision_tower.register_forward_hook(lambda _m, _a, out: rec["tower_records_graph"].append(out.requires_grad))
        return model_, vlm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decoder_mod, "checkpoint", counting("decoder", decoder_mod.checkpoint))
        mp.setattr(vit_mod, "checkpoint", counting("vision", vit_mod.checkpoint))
        mp.setattr(trainer, "build_model", build)
        rec["steps"] = run_in_process(recipe)
    rec["base"], rec["lora"] = _zero3_weights(Path(recipe.train.output_dir), 2)
    return rec


@pytest.mark.parametrize("case", list(ZERO3_CASES))
def test_zero3_checkpointing_with_frozen_parameters(assets: Assets, tmp_path: Path, case: str) -> None:
    from vlmtune.models.kimi_vl.moe import KimiVLMoE

    _, _, decoder_blocks, vision_blocks, frozen = ZERO3_CASES[case]
    on = _zero3_run(assets, tmp_path, case, checkpointing=True)
    off = _zero3_run(assets, tmp_path, case, checkpointing=False)
    forwards = 2 * 2  # steps x micro-batches; ZeRO-3 runs the vision tower in every one (a dummy image if text-only)
    assert on["calls"] == {"decoder": forwards * decoder_blocks, "vision": forwards * vision_blocks}
    assert off["calls"] == {"decoder": 0, "vision": 0}
    assert on["tower_records_graph"] == [vision_blocks > 0] * forwards  # a frozen tower runs under no_grad
    vlm = on["vlm"]
    trainable_layers = sum(any(p.requires_grad for p in layer.parameters()) for layer in vlm.language_model.model.layers)
    tower_trains = any(p.requires_grad for p in vlm.vision_tower.parameters())
    assert (trainable_layers, tower_trains) == (decoder_blocks, vision_blocks > 0)
    moe_blocks = [m for m in vlm.modules() if isinstance(m, KimiVLMoE)]
    assert len(moe_blocks) == 2 and all(getattr(m, "_z3_leaf", False) for m in moe_blocks)

    # Recomputation changes nothing (measured: bit-identical losses, grad norms and weights).
    for a, b in zip(on["steps"], off["steps"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    assert all(torch.equal(on["base"][k], off["base"][k]) for k in on["base"])

    before = initial_weights(assets.model)
    after = on["base"]
    assert sorted(after) == sorted(before)
    for name, w in before.items():
        part = _part(name)
        if part in frozen or part == "router_bias":
            assert torch.equal(after[name], w), f"{case}: frozen {name} changed"
        else:
            assert not torch.equal(after[name], w), f"{case}: trainable {name} did not move"
    if case == "lora_both_towers":
        moved = {m for m, (_, lora_b) in on["lora"].items() if lora_b.abs().max() > 0}
        vision = {m for m in on["lora"] if m.startswith("vision_tower.")}
        attention = {m for m in on["lora"] if ".self_attn." in m}
        assert len(vision) == 2 * 4 and len(attention) == 3 * 4
        assert vision | attention <= moved  # the adapters inside the checkpointed blocks did train


def test_vision_checkpointing_of_a_frozen_tower_is_refused(assets: Assets, tmp_path: Path) -> None:
    """A fully frozen tower (no adapter in it) runs under no_grad: vision checkpointing would do nothing, so the schema
    refuses it, and the trainer refuses it too when an API user switches it on past the schema."""
    from vlmtune.train.trainer import TrainError

    model = {"path": str(assets.model), "freeze": {"vision_tower": True},
             "gradient_checkpointing": {"decoder": True, "vision": True}}
    with pytest.raises(RecipeError, match="a frozen tower runs under no_grad"):
        make_recipe(assets, tmp_path, "refused", model=model)
    model["gradient_checkpointing"] = {"decoder": True, "vision": False}
    recipe, _ = make_recipe(assets, tmp_path, "forced", model=model, train={"max_steps": 1})
    recipe.model.gradient_checkpointing.vision = True
    with pytest.raises(TrainError, match="nothing in the vision tower trains"):
        run_in_process(recipe)


def test_lora_on_a_frozen_tower_may_be_checkpointed() -> None:
    """model.freeze.vision_tower + LoRA adapters in the tower: the tower trains (its adapters), does not run under
    no_grad, and checkpointing it is exact under ZeRO-3 (``lora_both_towers`` above), so the schema accepts
    model.gradient_checkpointing.vision there (it refuses it for a frozen tower without adapters)."""
    from vlmtune.config import recipe_from_dict

    tree = {"model": {"path": "m", "freeze": {"vision_tower": True, "decoder": True},
                      "lora": {"enabled": True, "targets": DECODER_TARGETS + VISION_TARGETS},
                      "gradient_checkpointing": {"decoder": True, "vision": True}},
            "data": {"train": [{"path": "a.jsonl"}]},
            "train": {"output_dir": "out", "max_steps": 1, "global_batch_size": 1}}
    recipe = recipe_from_dict(tree)
    assert recipe.model.gradient_checkpointing.vision is True and recipe.model.lora.targets[-1] == "fc1"


def test_schema_knows_the_vision_towers_lora_targets() -> None:
    """The schema's VISION_LORA_MODULES (it decides whether LoRA targets make a frozen tower trainable, without
    building a model) are exactly the linear layers of MoonViT's blocks."""
    from vlmtune.config.schema import VISION_LORA_MODULES
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration, kimi_vl_tiny

    with torch.device("meta"):
        vision = KimiVLForConditionalGeneration(kimi_vl_tiny()).vision_tower
    linear = {name.rsplit(".", 1)[-1] for name, m in vision.named_modules() if isinstance(m, nn.Linear)}
    assert VISION_LORA_MODULES == linear == set(VISION_TARGETS)


def test_register_zero3_leaf_modules_marks_exactly_the_moe_blocks() -> None:
    """The ZeRO-3 leaf flag sits on every MoE block and on nothing else, also through a peft wrapper."""
    from peft import LoraConfig, get_peft_model

    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration, kimi_vl_tiny
    from vlmtune.models.kimi_vl.moe import KimiVLMoE
    from vlmtune.train.ds_config import register_zero3_leaf_modules

    for wrap in (False, True):
        model: nn.Module = KimiVLForConditionalGeneration(kimi_vl_tiny())
        if wrap:
            model = get_peft_model(model, LoraConfig(r=2, target_modules=["gate_proj"]))
        assert register_zero3_leaf_modules(model) == 2
        marked = [n for n, m in model.named_modules() if getattr(m, "_z3_leaf", False)]
        assert len(marked) == 2 and all(isinstance(model.get_submodule(n), KimiVLMoE) for n in marked)


# ----------------------------------------------------------------------------------------------------------------
# MoE aux loss: the recipe coefficient reaches the gradients; 0 is exactly no aux loss
# ----------------------------------------------------------------------------------------------------------------
AUX_COEF = 0.1


@pytest.fixture(scope="module")
def aux_runs(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> dict[float, dict[str, Any]]:
    """Per coefficient: plain PyTorch on step 1's global batch (one packed call, loss + aux_loss at that alpha) and the
    trainer's step 1 (ZeRO-2, one micro-batch of 4 packs, train.aux_loss_coef) with DeepSpeed's gradients."""
    root = tmp_path_factory.mktemp("aux")
    (batch,), info = next(iter(_tiny_loader(assets, micro_batch_size=4)))
    out: dict[float, dict[str, Any]] = {}
    for coef in (0.0, AUX_COEF):
        model = _rmpad_model(assets)
        _set_aux_alpha(model, coef)
        ref = model(**batch.to_model_inputs(), return_logits=False)
        assert ref.num_sequences == info.num_packed_samples
        (ref.loss + ref.aux_loss).backward()
        recipe, _ = make_recipe(assets, root, f"coef{coef}",
                                train={"max_steps": 1, "micro_batch_size": 4, "aux_loss_coef": coef})
        (rec,) = run_in_process(recipe)
        out[coef] = {"ref_loss": ref.loss.item(), "ref_aux": ref.aux_loss.item(),
                     "ref_grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                     "record": rec, "grads": deepspeed_first_step_grads(Path(recipe.train.output_dir), BETAS[0])}
    return out


def test_aux_loss_coef_zero_is_exactly_no_aux_loss(aux_runs: dict[float, dict[str, Any]]) -> None:
    run = aux_runs[0.0]
    assert run["record"]["aux_loss"] == 0.0 and run["ref_aux"] == 0.0
    assert run["record"]["loss"] == pytest.approx(run["ref_loss"], rel=1e-6)
    _assert_grads_match(run["grads"], run["ref_grads"], "aux_loss_coef=0 vs cross-entropy alone")


def test_aux_loss_coef_reaches_the_router_gradients(aux_runs: dict[float, dict[str, Any]]) -> None:
    off, on = aux_runs[0.0], aux_runs[AUX_COEF]
    assert on["record"]["aux_loss"] == pytest.approx(on["ref_aux"], rel=1e-5) and on["ref_aux"] > 0
    assert on["record"]["loss"] == off["record"]["loss"]  # the forward (routing, cross-entropy) is the same
    _assert_grads_match(on["grads"], on["ref_grads"], f"aux_loss_coef={AUX_COEF} vs plain PyTorch")
    routers = [n for n in on["grads"] if ROUTER.match(n)]
    assert len(routers) == 2
    for name in routers:
        ratio = float((on["grads"][name] - off["grads"][name]).abs().max() / off["grads"][name].abs().max())
        print(f"\n{name}: aux_loss_coef {AUX_COEF} moves the gradient by {ratio:.3g} of its largest element")
        assert ratio > 0.1, name  # four orders of magnitude above the 1e-5 agreement with the references
    # The aux loss reads the router scores only: the output projection sees the cross-entropy alone.
    head = "language_model.lm_head.weight"
    assert (on["grads"][head] - off["grads"][head]).abs().max() <= GRAD_RTOL * off["grads"][head].abs().max()


# ----------------------------------------------------------------------------------------------------------------
# Loss: a pack with no supervised token
# ----------------------------------------------------------------------------------------------------------------
def test_pack_without_supervised_tokens_is_an_exact_zero_with_every_gradient(assets: Assets) -> None:
    from vlmtune.train.loss import IGNORE_INDEX, count_supervision, shift_labels

    (a, b), _ = next(iter(_tiny_loader(assets, global_batch_size=2)))
    assert a.num_patches > 0 and b.num_patches > 0 and a.num_supervised > 0  # both packs run the vision tower
    b.labels.fill_(IGNORE_INDEX)
    den = count_supervision(shift_labels(a.labels.reshape(-1), a.cu_seqlens), a.segment_ids())
    model = _rmpad_model(assets)
    _set_aux_alpha(model, 0.0)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def step(*batches: Any, denominators: Any = den) -> list[Any]:
        model.zero_grad(set_to_none=True)
        outs = []
        for mb in batches:
            out = model(**mb.to_model_inputs(), return_logits=False, loss_denominators=denominators)
            (out.loss + out.aux_loss_sum).backward()
            outs.append(out)
        return outs

    for denominators in (den, None):  # the trainer's step share, and the plain mean of the call
        (out,) = step(b, denominators=denominators)
        assert out.loss.item() == 0.0 and out.num_supervised_tokens == 0
        grads = _grads(model)
        assert [n for n in params if grads[n] is None] == []  # every rank's graph reaches every parameter
        assert [n for n in params if torch.count_nonzero(grads[n])] == []
    (alone,) = step(a)
    want = _grads(model)
    _, empty = step(a, b)
    assert empty.loss.item() == 0.0
    got = _grads(model)
    assert all(torch.equal(got[n], want[n]) for n in params)  # it adds exactly nothing to the step
    # With the aux loss on, the empty pack still trains the routers (balance is a property of every token).
    _set_aux_alpha(model, 0.001)
    (out,) = step(b)
    assert out.loss.item() == 0.0 and out.aux_loss_sum.item() > 0
    grads = _grads(model)
    assert all(grads[n] is not None for n in params)
    assert all(torch.count_nonzero(grads[n]) > 0 for n in params if ROUTER.match(n))


# ----------------------------------------------------------------------------------------------------------------
# ZeRO-3 + VLM: a text-only pack still runs the vision tower, for an exact zero
# ----------------------------------------------------------------------------------------------------------------
def test_text_only_pack_runs_the_vision_tower_for_an_exact_zero() -> None:
    import copy

    from vlmtune.data.batch import SampleTensors, collate_samples
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration, kimi_vl_tiny
    from vlmtune.patches.rmpad import apply_rmpad

    torch.manual_seed(0)
    plain = apply_rmpad(KimiVLForConditionalGeneration(kimi_vl_tiny()).double().train())
    forced = copy.deepcopy(plain)
    forced.run_vision_on_text_only = True
    calls = {"plain": 0, "forced": 0}
    plain.vision_tower.register_forward_pre_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    forced.vision_tower.register_forward_pre_hook(lambda *_: calls.__setitem__("forced", calls["forced"] + 1))
    g = torch.Generator().manual_seed(5)
    samples = [SampleTensors(torch.randint(0, 1700, (n,), generator=g), torch.arange(n) >= 3, sample_id=i)
               for i, n in enumerate((9, 6, 12))]
    inputs = collate_samples(samples).to_model_inputs()
    outs = {}
    for name, model in (("plain", plain), ("forced", forced)):
        out = model(**inputs)
        (out.loss + out.aux_loss).backward()
        outs[name] = out
    assert calls == {"plain": 0, "forced": 1}
    assert torch.equal(outs["plain"].logits, outs["forced"].logits) and torch.equal(outs["plain"].loss,
                                                                                      outs["forced"].loss)
    assert torch.equal(outs["plain"].aux_loss, outs["forced"].aux_loss)
    pg, fg = _grads(plain), _grads(forced)
    for name, grad in fg.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            assert pg[name] is None and grad is not None and torch.count_nonzero(grad) == 0, name
        else:
            assert torch.equal(grad, pg[name]), name


# ----------------------------------------------------------------------------------------------------------------
# Kimi-VL routing trains as published; LoRA never attaches to nothing
# ----------------------------------------------------------------------------------------------------------------
def test_training_mode_routes_with_the_bias_like_the_published_router() -> None:
    """A training-mode MoE (aux loss live) routes with noaux_tc exactly as in eval and as transformers' DeepseekV3MoE:
    no switch to greedy routing, which would drop the correction bias and fire other experts."""
    from tests.models import _oracles as oracles
    from tests.models.test_decoder_parity import CONFIGS, PUBLISHED_TOL, _randomise, _text_config
    from vlmtune.models.kimi_vl.configuration import KimiVLTextConfig
    from vlmtune.models.kimi_vl.moe import KimiVLMoE

    cfg = _text_config(**CONFIGS["noq_g2"])
    ours = KimiVLMoE(cfg).double()
    _randomise(ours)
    with torch.no_grad():
        ours.gate.e_score_correction_bias.mul_(10.0)  # a bias large enough to change the choice of many tokens
    oracle = oracles.dsv3.DeepseekV3MoE(oracles.hf_deepseek_config(cfg)).double().eval()
    oracle.load_state_dict(oracles.oracle_decoder_state(ours.state_dict()), strict=True)
    x = torch.randn(3, 20, cfg.hidden_size, dtype=torch.float64)
    out_train, aux = ours.train()(x)
    out_eval, _ = ours.eval()(x)
    assert aux.item() > 0
    assert torch.equal(out_train, out_eval)
    want = oracle(x)
    assert (out_train - want).abs().max() <= PUBLISHED_TOL * max(1.0, want.abs().max().item())
    flat = x.view(-1, cfg.hidden_size)
    scores, idx, _ = ours.train().gate(flat)
    greedy = scores.topk(cfg.num_experts_per_tok, dim=-1).indices  # what the ports' "greedy" fallback picks
    differs = (idx.sort(-1).values != greedy.sort(-1).values).any(-1)
    assert int(differs.sum()) >= 10  # the bias really decides (measured: 51 of 60 tokens)
    with pytest.raises(NotImplementedError, match="noaux_tc"):
        KimiVLTextConfig(topk_method="greedy")


def test_lora_target_that_matches_nothing_is_an_error() -> None:
    from vlmtune.config.schema import Lora
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration, kimi_vl_tiny
    from vlmtune.train.modes import LoraError, apply_lora

    model = KimiVLForConditionalGeneration(kimi_vl_tiny())
    with pytest.raises(LoraError, match=r"\['expert_proj'\] match no linear module"):
        apply_lora(model, Lora(enabled=True, targets=["q_proj", "expert_proj"]))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # nothing was attached
    wrapped = apply_lora(model, Lora(enabled=True, r=2, targets=["gate_proj"]))
    # 1 dense MLP + per MoE layer (8 routed experts + 1 shared MLP), 2 MoE layers
    assert wrapped.vlmtune_lora_report == {"adapters": 1 + 2 * (8 + 1), "expert_adapters": 2 * 8}


# ----------------------------------------------------------------------------------------------------------------
# Packing: pixels are never decoded to count, decoded once per use to train, tokens never recomputed
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _counting_decodes(counter: dict[str, int]) -> Any:
    """Count real pixel decodes: ImageFile.load calls on an image whose tiles are not decoded yet."""
    from PIL import ImageFile

    original = ImageFile.ImageFile.load

    def load(self: Any) -> Any:
        if self.tile:
            counter["decodes"] += 1
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageFile.ImageFile, "load", load)
        yield


@contextlib.contextmanager
def _no_tokenizing() -> Any:
    from vlmtune.data.ingest import SampleMeasurer
    from vlmtune.models.kimi_vl.tokenization import KimiTokenizer

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("tokenized or measured again during training")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KimiTokenizer, "encode", refuse)
        mp.setattr(SampleMeasurer, "measure", refuse)
        yield


def _epochs(loader: Any, epochs: int) -> list[int]:
    """Images per epoch in the batches the loader yields."""
    per_epoch = []
    for _ in range(epochs):
        per_epoch.append(sum(0 if b.image_grid_hws is None else int(b.image_grid_hws.shape[0])
                             for batches, _ in loader for b in batches))
    return per_epoch


def test_packing_decodes_no_pixels_and_training_decodes_each_image_once(assets: Assets, tmp_path: Path) -> None:
    from vlmtune.data.formats import DatasetSpec
    from vlmtune.data.loader import PackedLoader
    from vlmtune.data.on_the_fly import OnTheFlySource
    from vlmtune.data.pack_cli import PackSettings, build_pack
    from vlmtune.data.pack_output import PackReader
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor

    counter = {"decodes": 0}
    spec = DatasetSpec(assets.train_file, 1.0, "auto", None)
    with _counting_decodes(counter):
        build_pack([spec], PackSettings(model_dir=assets.model, out=tmp_path / "packs", packing_length=512,
                                        cache_dir=None, progress=False))
        assert counter["decodes"] == 0  # sizes from the headers; no pixel decoded to count tokens
        reader = PackReader(tmp_path / "packs")
        images = sum(len(reader.sample(i).images) for p in range(len(reader)) for i in reader.pack_indices(p))
        assert images >= 40  # the demo samples carry images (48 samples)
        source = OnTheFlySource.from_datasets([spec], assets.model, packing_length=512, window=16,
                                              cache_dir=tmp_path / "otf_cache")
        assert counter["decodes"] == 0
        processor = KimiVLImageProcessor.from_pretrained(assets.model)
        for name, src in (("offline", tmp_path / "packs"), ("on_the_fly", source)):
            loader = PackedLoader(src, micro_batch_size=1, global_batch_size=1, seed=0, image_processor=processor)
            counter["decodes"] = 0
            with _no_tokenizing():
                per_epoch = _epochs(loader, 2)
            assert per_epoch == [images, images], name  # every image of every sample, in each epoch
            assert counter["decodes"] == 2 * images, name  # decoded exactly once per use


# ----------------------------------------------------------------------------------------------------------------
# UX: resume is explicit, the defaults train, nested settings merge deeply
# ----------------------------------------------------------------------------------------------------------------
def test_resume_from_a_path_and_auto_from_the_newest(assets: Assets, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from vlmtune.train.trainer import TrainError

    first, _ = make_recipe(assets, tmp_path, "first", train={"max_steps": 4, "save_every": 2, "keep_last": None})
    straight = [r["loss"] for r in run_in_process(first)]
    ckpts = Path(first.train.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-00000002", "step-00000004"]

    # A path: another run folder continues from step 2 of the first run, exactly.
    with caplog.at_level(logging.INFO, logger="vlmtune.train"):
        second, _ = make_recipe(assets, tmp_path, "second", [f"train.resume={ckpts / 'step-00000002'}"],
                                train={"max_steps": 4})
        steps = run_in_process(second)
    assert [r["step"] for r in steps] == [3, 4]
    assert [r["loss"] for r in steps] == straight[2:]  # bit-identical
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in caplog.text

    # auto (the default) with checkpoints present resumes from the newest one, never refuses.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlmtune.train"):
        again, _ = make_recipe(assets, tmp_path, "first", train={"max_steps": 5, "save_every": 2, "keep_last": None})
        assert str(again.train.resume) == "auto"
        steps = run_in_process(again)
    assert f"resumed from {ckpts / 'step-00000004'} at step 4" in caplog.text
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in steps[:4]] == straight

    not_a_checkpoint, _ = make_recipe(assets, tmp_path, "third", [f"train.resume={tmp_path}"], train={"max_steps": 2})
    with pytest.raises(TrainError, match="not a complete vlmtune checkpoint"):
        run_in_process(not_a_checkpoint)
    assert not (tmp_path / "third").exists()  # a refused resume writes nothing


def test_minimal_recipe_trains_with_every_default(assets: Assets, tmp_path: Path) -> None:
    """Only the required keys: bf16 weights, ZeRO-2, 4096-token packs built into the run folder, cosine schedule."""
    from vlmtune.config import load_recipe
    from vlmtune.data.pack_output import PackReader
    from vlmtune.train.schedule import lr_multiplier

    out = tmp_path / "run"
    path = write_recipe(tmp_path / "minimal.yaml", {
        "model": {"path": str(assets.model)}, "data": {"train": [{"path": str(assets.train_file)}]},
        "train": {"output_dir": str(out), "max_steps": 2, "global_batch_size": 1}})
    recipe = load_recipe(path, [], world_size=1)
    assert (recipe.model.dtype, recipe.precision, recipe.deepspeed.zero_stage) == ("bfloat16", "bf16", 2)
    steps = run_in_process(recipe)
    assert [r["step"] for r in steps] == [1, 2]
    lrs = [1e-5 * lr_multiplier(s, schedule="cosine", max_steps=2, warmup=0) for s in range(2)]
    assert [r["lr"] for r in steps] == pytest.approx(lrs, rel=1e-12)
    assert steps[0]["loss"] == pytest.approx(7.15, abs=0.25)  # random init: about log(vocab 1280) = 7.15 nats
    reader = PackReader(out / "packs")
    # The 48 demo samples (2245 tokens) fit one 4096-token pack: each step is one epoch over it.
    assert (reader.packing_length, reader.num_samples, len(reader)) == (4096, 48, 1)
    tokens = int(reader.manifest["packs"][0]["tokens"])
    assert [(r["tokens"], r["samples"], r["epoch"]) for r in steps] == [(tokens, 48, 0), (tokens, 48, 1)]
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 1.0


def test_deepspeed_extra_is_merged_deeply() -> None:
    from vlmtune.config import recipe_from_dict
    from vlmtune.train.ds_config import build_ds_config

    kw = dict(zero_stage=3, micro_batch_size=1, grad_accum=2, world_size=1, precision="fp32", grad_clip=1.0,
              overlap_comm=True, reduce_bucket_size=1000)
    plain = build_ds_config(**kw)
    merged = build_ds_config(**kw, extra={"zero_optimization": {"stage3_max_live_parameters": 100},
                                          "activation_checkpointing": {"partition_activations": False}})
    assert merged["zero_optimization"] == {**plain["zero_optimization"], "stage3_max_live_parameters": 100}
    assert merged["zero_optimization"]["stage"] == 3 and merged["zero_optimization"]["overlap_comm"] is True
    assert merged["activation_checkpointing"] == {"partition_activations": False}
    assert {k: v for k, v in merged.items() if k != "activation_checkpointing"} | {
        "zero_optimization": plain["zero_optimization"]} == plain
    tree = {"model": {"path": "m"}, "data": {"train": [{"path": "a.jsonl"}]},
            "train": {"output_dir": "o", "max_steps": 1, "global_batch_size": 1},
            "deepspeed": {"extra": {"zero_optimization": {"stage": 1}}}}
    with pytest.raises(RecipeError, match=r"deepspeed.extra.zero_optimization.stage is set by the recipe"):
        recipe_from_dict(tree)


# ----------------------------------------------------------------------------------------------------------------
# Flags that silently do nothing
# ----------------------------------------------------------------------------------------------------------------
def _library_sources() -> dict[Path, str]:
    """Every library file outside vlmtune/config (where the schema itself names every field)."""
    return {p: p.read_text() for p in sorted((REPO / "vlmtune").rglob("*.py")) if "config" not in p.parts}


def _leaf_fields() -> list[str]:
    from vlmtune.config import iter_fields

    return [f.key for f in iter_fields() if f.type != "section"]


# Fields the library reads through a derived property of the schema rather than by their own name.
DERIVED = {"train.warmup": "warmup_steps"}
# Recipe fields no library code reads (found by this test); each is a bug in the library, not fixed here.


@pytest.mark.parametrize("key", _leaf_fields())
def test_every_recipe_field_is_read_by_the_library(key: str) -> None:
    """A lower bound on "every requested feature is applied": the field's name (or the property derived from it) is
    read somewhere in the library (``.name``, ``["name"]`` or ``.get("name")``). A field never read cannot act."""
    name = DERIVED.get(key, key.split(".")[-1])
    pattern = re.compile(rf"\.{re.escape(name)}\b|\[\s*['\"]{re.escape(name)}['\"]\s*\]|get\(\s*['\"]{re.escape(name)}['\"]")
    readers = [str(p.relative_to(REPO)) for p, text in _library_sources().items() if pattern.search(text)]
    assert readers, f"recipe field {key} is read nowhere in vlmtune/ outside vlmtune/config"


def test_logging_plots_false_writes_no_plot(assets: Assets, tmp_path: Path) -> None:
    recipe, _ = make_recipe(assets, tmp_path, "noplots", logging={"plots": False}, train={"max_steps": 1})
    run_in_process(recipe)
    out = Path(recipe.train.output_dir)
    assert (out / "summary.json").is_file() and json.loads((out / "summary.json").read_text())["steps"] == 1
    assert sorted(p.name for p in out.glob("*.png")) == []


def test_torch_adam_false_is_applied_or_refused(assets: Assets, tmp_path: Path) -> None:
    """deepspeed.torch_adam=false asks for DeepSpeed's Adam: the run must use it or stop with an error that says so."""
    import deepspeed

    from vlmtune.train.trainer import TrainError

    seen: list[Any] = []
    original = deepspeed.initialize

    def initialize(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("optimizer"))
        return original(*args, **kwargs)

    try:
        recipe, _ = make_recipe(assets, tmp_path, "fused", ["deepspeed.torch_adam=false"], train={"max_steps": 1})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(deepspeed, "initialize", initialize)
            run_in_process(recipe)
    except (RecipeError, TrainError) as err:
        assert "torch_adam" in str(err)
        return
    assert len(seen) == 1 and type(seen[0]) is not torch.optim.AdamW



def test_make_optimizer_selects_deepspeeds_adam_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """deepspeed.torch_adam=false: DeepSpeedCPUAdam with an offloaded optimizer, FusedAdam on CUDA, an error naming
    the fix on a CPU run without offload (the real classes build extensions, so stand-ins record the call)."""
    import deepspeed.ops.adam as ds_adam

    from vlmtune.train.optim import make_optimizer

    made: list[tuple[str, dict[str, Any]]] = []

    def stand_in(name: str) -> type:
        class Recorder:
            def __init__(self, groups: list[dict], **kwargs: Any) -> None:
                made.append((name, kwargs))
        return Recorder

    monkeypatch.setattr(ds_adam, "DeepSpeedCPUAdam", stand_in("cpu"))
    monkeypatch.setattr(ds_adam, "FusedAdam", stand_in("fused"))
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
    assert type(make_optimizer(groups, betas=(0.9, 0.99), eps=1e-6)) is torch.optim.AdamW
    make_optimizer(groups, betas=(0.9, 0.99), eps=1e-6, torch_adam=False, offload_optimizer=True)
    make_optimizer(groups, betas=(0.9, 0.99), eps=1e-6, torch_adam=False, device_type="cuda")
    assert made == [("cpu", {"betas": (0.9, 0.99), "eps": 1e-6, "adamw_mode": True}),
                    ("fused", {"betas": (0.9, 0.99), "eps": 1e-6, "adam_w_mode": True})]
    with pytest.raises(ValueError, match=r"deepspeed.torch_adam=false .* needs CUDA.*set deepspeed.torch_adam=true"):
        make_optimizer(groups, torch_adam=False, device_type="cpu")


def test_log_every_thins_the_console_and_tensorboard_not_the_metrics(tmp_path: Path) -> None:
    """logging.log_every=2 over 5 steps: console lines and TensorBoard scalars at steps 2, 4 and the last (5);
    metrics.jsonl keeps all 5 (resume and the curves read it); plots=False writes no PNG."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlmtune.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True, max_steps=5, log_every=2, plots=False, show_progress=False)
    logger.console.file = io.StringIO()
    for step in range(1, 6):
        logger.log_step({"step": step, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 10.0})
    summary = logger.summary()
    logger.close()
    lines = [ln for ln in logger.console.file.getvalue().splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/5", "4/5", "5/5"]
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 5]
    assert summary["steps"] == 5 and not list(tmp_path.glob("*.png"))
    with pytest.raises(ValueError, match="log_every=0"):
        MetricsLogger(tmp_path, enabled=False, max_steps=5, log_every=0)


def test_zero3_leaves_torch_linear_as_it_was(assets: Assets, tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3 replaces torch.nn.functional.linear process-wide and never restores it; the trainer does, so
    what runs after it in the same process (the demo's export, eval and generation; a planner measurement) sees
    torch's own linear (its saved-tensor bytes for a frozen weight differ: the wrapper saves the weight)."""
    linear = torch.nn.functional.linear
    recipe, _ = make_recipe(assets, tmp_path, "z3", deepspeed={"zero_stage": 3}, train={"max_steps": 1})
    run_in_process(recipe)
    assert torch.nn.functional.linear is linear
