"""Loss accounting: the trainer's step equals plain PyTorch on the whole global batch.

The reference is built by hand: a fresh model, the same 4 packs (the loader's step 1), ONE forward over all of them
concatenated, whose ``.loss`` is the plain token mean of the global batch and whose ``.aux_loss`` is the mean
per-sequence balance loss; backward; the total gradient norm; one ``torch.optim.AdamW`` step. The trainer runs the
same step through DeepSpeed ZeRO-2 with accumulation 1 (one micro-batch of 4 packs) and 4 (four of 1), where each
micro-batch's loss is only its share of the step and DeepSpeed's 1/accumulation scaling is undone.

Measured (fp32): every gradient element within 3.4e-6 of its tensor's largest gradient; weights after the AdamW
step within 1.7e-8 of the reference's wherever |g| > 1e-6, and of AdamW on DeepSpeed's own gradients everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train.conftest import Assets, deepspeed_first_step_grads, make_recipe, run_in_process

LR, BETAS, EPS = 1e-3, (0.9, 0.95), 1e-8


@pytest.fixture(scope="module")
def reference(assets: Assets) -> dict:
    """Plain PyTorch on step 1's global batch: loss, grad norm and the weights after one AdamW step."""
    from vlmtune.data.loader import OfflinePackSource, PackedLoader
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.patches.rmpad import apply_rmpad

    model = KimiVLForConditionalGeneration.from_pretrained(assets.model, dtype=torch.float32)
    apply_rmpad(model, attention="sdpa_varlen")
    model.train()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loader = PackedLoader(OfflinePackSource(assets.packs), micro_batch_size=4, global_batch_size=4, seed=0,
                          balance=True, image_processor=KimiVLImageProcessor.from_pretrained(assets.model))
    (batch,), info = next(iter(loader))  # the whole global batch as one packed call
    out = model(**batch.to_model_inputs(), return_logits=False)
    assert out.num_supervised_tokens == info.num_supervised_tokens
    assert out.num_sequences == info.num_packed_samples
    total = out.loss + out.aux_loss
    total.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in params)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0).step()
    return {"loss": out.loss.item(), "aux": out.aux_loss.item(), "grad_norm": norm,
            "initial": initial,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}, "grads": grads,
            "supervised": info.num_supervised_tokens}


@pytest.mark.parametrize("accum", [1, 4])
def test_step_equals_plain_pytorch(assets: Assets, reference: dict, tmp_path: Path, accum: int) -> None:
    recipe, _ = make_recipe(assets, tmp_path, f"accum{accum}",
                            train={"max_steps": 1, "micro_batch_size": 4 // accum})
    (rec,) = run_in_process(recipe)
    out = Path(recipe.train.output_dir)
    assert json.loads((out / "deepspeed.json").read_text())["gradient_accumulation_steps"] == accum
    assert rec["supervised_tokens"] == reference["supervised"]
    assert rec["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert rec["aux_loss"] == pytest.approx(reference["aux"], rel=1e-5)
    assert rec["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)

    # Every gradient element: ZeRO-2's AdamW state after one step holds exp_avg = (1 - beta1) * g in flat fp32
    # partitions, one per param group, each parameter at the offset DeepSpeed records in param_slice_mappings.
    ds_grads = {}
    for name, g in deepspeed_first_step_grads(out, BETAS[0]).items():
        ref = reference["grads"][name].flatten()
        assert (g - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-12, name
        ds_grads[name] = g.view_as(reference["grads"][name])
    assert sorted(ds_grads) == sorted(reference["grads"])

    # The weights after the step. (1) Where |g| >> eps (1e-8) AdamW's first step is lr * g / |g|: equal to the
    # reference's to float32 rounding. (2) Everywhere: equal to torch.optim.AdamW applied to the initial weights with
    # DeepSpeed's own gradients (where |g| is near eps, lr * g / (|g| + eps) turns the float32 noise of a 1e-10
    # gradient into up to 4% of lr, so those elements are compared on the same gradient).
    state_dir = out / "checkpoints" / "step-00000001" / "engine" / "state"
    states = torch.load(state_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    got = {k.removeprefix("model."): v for k, v in states.items()}
    want = reference["weights"]
    assert sorted(got) == sorted(want)
    params = {n: torch.nn.Parameter(reference["initial"][n].clone()) for n in ds_grads}
    for n, p in params.items():
        p.grad = ds_grads[n].clone()
    torch.optim.AdamW(list(params.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0).step()
    for name, w in want.items():
        if name not in params:  # a buffer
            assert torch.equal(got[name], w), name
            continue
        clear = reference["grads"][name].abs() > 100 * EPS
        assert not clear.any() or (got[name] - w).abs()[clear].max() <= 5e-7, name
        assert (got[name] - params[name].detach()).abs().max() <= 5e-7, name
    # The router correction bias is a buffer: no optimizer touches it (router_bias_update_rate is 0 here).
    for k, v in got.items():
        if k.endswith("e_score_correction_bias"):
            assert v.dtype == torch.float32 and torch.equal(v, torch.zeros_like(v))


def test_optimizer_groups_leave_out_the_router_bias(assets: Assets) -> None:
    """Every trainable parameter is in exactly one AdamW group; the router bias is in none and stays fp32."""
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration
    from vlmtune.train.optim import apply_freeze, build_param_groups

    model = KimiVLForConditionalGeneration.from_pretrained(assets.model, dtype=torch.float32)
    apply_freeze(model)
    groups = build_param_groups(model, lr=LR, weight_decay=0.1)
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)) == sum(p.requires_grad for p in model.parameters())
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(biases) == model.config.text_config.num_hidden_layers - 1  # every MoE layer (layer 0 is dense)
    assert all(b.dtype == torch.float32 and id(b) not in in_groups for b in biases)
    model.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
