"""The whole Kimi-VL model: logits against independent references through the published checkpoint layout, gradients,
image/placeholder accounting, text-only batches, and the A3B tensor names and sizes.

Whole-model parity: a checkpoint is written BY HAND in the published layout (config.json with unknown extra fields,
three safetensors shards with an index, ``rotary_emb.inv_freq`` keys as in the 27 of the A3B files), loaded with
``KimiVLForConditionalGeneration.from_pretrained``, and compared with transformers' kimi_k25 vision tower + projector
whose features replace the placeholder embeddings of transformers' ``DeepseekV3ForCausalLM`` (tests/models/_oracles.py),
reading the same files. As published the oracles round a few steps in fp32 (bound 1e-6 x max |logit|); with those casts
lifted to fp64 the two agree to ~1e-14.

Not repeated here, covered elsewhere: router selection uses the bias and weights do not
(test_moe.py::test_bias_selects_and_weights_stay_unbiased); the vision tower's packed output equals one image at a time
(test_vit.py::test_packed_equals_each_image_alone).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.models import _oracles as oracles  # the independent references
from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration, kimi_vl_a3b, kimi_vl_tiny
from vlmtune.models.kimi_vl.configuration import KimiVLConfig

NUM_BASE = 256  # tiny vocab: 256 ranks + 256 special slots
CONFIG = kimi_vl_tiny(num_base_tokens=NUM_BASE)
PAD_ID = CONFIG.media_placeholder_token_id
# Three images of different grids; the vision position table is 16x16, so (20, 2) enlarges one axis.
GRIDS = [(4, 6), (20, 2), (6, 8)]
PUBLISHED_TOL = 1e-6  # relative to max(1, max |reference logit|)
LIFTED_TOL = 1e-11  # absolute


@torch.no_grad()
def _randomise(model: KimiVLForConditionalGeneration) -> None:
    """Random values everywhere (norms, biases, position table, router weight and bias), so no term can hide."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.normal_(0, 0.1)
        elif "pos_emb" in name:
            p.normal_(0, 0.5)
        elif name.endswith("gate.weight"):
            p.normal_(0, 0.3)
        else:
            p.normal_(0, 0.1 if name.startswith("vision_tower") else 0.12)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn_like(b))


def _random_model(config: KimiVLConfig = CONFIG, dtype: torch.dtype = torch.float64) -> KimiVLForConditionalGeneration:
    model = KimiVLForConditionalGeneration(config).to(dtype)
    _randomise(model)
    return model


def _text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, NUM_BASE, (n,), generator=gen).tolist()  # ordinary BPE ids, never a special id


def _batch(grids: list[tuple[int, int]], padding: str = "right", seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows: row 0 holds images 0 and 1 between text, row 1 holds image 2; the shorter row is padded."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [h * w // 4 for h, w in grids]
    rows = [_text(3, gen) + [PAD_ID] * tokens[0] + _text(4, gen) + [PAD_ID] * tokens[1] + _text(2, gen),
            _text(5, gen) + [PAD_ID] * tokens[2] + _text(3, gen)]
    t = max(map(len, rows))
    ids = torch.full((2, t), CONFIG.text_config.pad_token_id)
    mask = torch.zeros(2, t, dtype=torch.long)
    for b, row in enumerate(rows):
        sl = slice(0, len(row)) if padding == "right" else slice(t - len(row), t)
        ids[b, sl] = torch.tensor(row)
        mask[b, sl] = 1
    pixels = torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=gen, dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_hws": torch.tensor(grids)}


def _write_published_layout(model: KimiVLForConditionalGeneration, path: Path) -> dict[str, torch.Tensor]:
    """config.json + 3 safetensors shards + index, under the published names, with inv_freq keys, written by hand.

    Returns every tensor written (by key).
    """
    path.mkdir(parents=True)
    config = model.config.to_save_dict()
    config.update(  # fields of the published config.json that vlmtune does not model: must be accepted
        auto_map={"AutoConfig": "configuration_kimi_vl.KimiVLConfig",
                  "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration"},
        transformers_version="4.50.3")
    config["text_config"].update(ep_size=1, num_key_value_heads=config["text_config"]["num_attention_heads"],
                                 attention_dropout=0.0, use_cache=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))

    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    rope_dim = model.config.text_config.qk_rope_head_dim
    inv_freq = 1.0 / (model.config.text_config.rope_theta ** (torch.arange(0, rope_dim, 2).float() / rope_dim))
    for i in range(model.config.text_config.num_hidden_layers):
        tensors[f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    shard_of = {k: (1 if k.startswith(("vision_tower.", "multi_modal_projector.")) else
                    2 if ".layers.0." in k or ".layers.1." in k else 3) for k in tensors}
    weight_map = {}
    for shard in (1, 2, 3):
        name = f"model-{shard:05d}-of-00003.safetensors"
        save_file({k: v for k, v in tensors.items() if shard_of[k] == shard}, str(path / name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors if shard_of[k] == shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return tensors


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, straight from the files (inv_freq included)."""
    files = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    out = {}
    for name in sorted(files):
        with safe_open(str(path / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ------------------------------------------------------------------------------------------------------------------
# whole-model parity through the published layout
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["published", "lifted"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_equal_reference_through_published_checkpoint(tmp_path: Path, padding: str, mode: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    written = _write_published_layout(_random_model(), tmp_path / "ckpt")
    assert sum(k.endswith("rotary_emb.inv_freq") for k in written) == CONFIG.text_config.num_hidden_layers
    model = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    assert model.config.text_config.ep_size == 1 and "AutoModel" in model.config.auto_map  # extras kept
    assert model.language_model.model.layers[1].mlp.gate.weight.dtype == torch.float64  # fp64 stays fp64

    if mode == "lifted":
        oracles.lift_all_to_fp64(monkeypatch)
    reference = oracles.ReferenceKimiVL(model.config, _read_all(tmp_path / "ckpt"))
    batch = _batch(GRIDS, padding)
    assert int((batch["input_ids"] == PAD_ID).sum()) == sum(h * w // 4 for h, w in GRIDS) == 28
    with torch.no_grad():
        got = model(**batch).logits  # (B, T, V)
    want = reference.logits(**batch)
    real = batch["attention_mask"].bool()
    diff = (got[real] - want[real]).abs().max().item()
    scale = want[real].abs().max().item()
    print(f"PARITY whole model [{padding}-padded, oracle {mode}]: max abs diff {diff:.3e} (max |logit| {scale:.2f})")
    assert scale > 1  # logits of size O(1) or more: the bound below is meaningful
    assert diff <= (PUBLISHED_TOL * scale if mode == "published" else LIFTED_TOL), diff

    # The images matter: changing the pixels of image 1 changes row 0 from its first placeholder on, and nothing else.
    other = dict(batch, pixel_values=batch["pixel_values"].clone())
    n0 = GRIDS[0][0] * GRIDS[0][1]
    other["pixel_values"][n0:n0 + GRIDS[1][0] * GRIDS[1][1]] += 1.0
    with torch.no_grad():
        moved = model(**other).logits
    first_pad_of_image1 = int((batch["input_ids"][0] == PAD_ID).nonzero()[GRIDS[0][0] * GRIDS[0][1] // 4])
    # (not bit-equal: the grouped expert matmuls see other row counts, which changes BLAS blocking at ~1e-16)
    print("untouched row / prefix:", (moved[1] - got[1]).abs().max().item(),
          (moved[0, :first_pad_of_image1] - got[0, :first_pad_of_image1]).abs().max().item())
    assert (moved[1] - got[1]).abs().max() <= 1e-12
    assert (moved[0, :first_pad_of_image1] - got[0, :first_pad_of_image1]).abs().max() <= 1e-12
    assert (moved[0, first_pad_of_image1:] - got[0, first_pad_of_image1:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# gradients, image accounting, text-only batches
# ------------------------------------------------------------------------------------------------------------------
def test_gradients_reach_every_trainable_parameter() -> None:
    """One backward on a batch with images reaches every parameter; the batch is big enough that every routed expert
    of every MoE layer receives tokens, so every gradient must be nonzero."""
    model = KimiVLForConditionalGeneration(CONFIG).double().train()
    model.init_weights(seed=0)
    batch = _batch([(8, 8), (6, 10), (10, 6)])
    # Every real token supervised: in the last layer an expert gets a gradient only from tokens whose logits enter
    # the loss, so leaving placeholder targets out could starve an expert that did receive tokens.
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.num_supervised_tokens == int(batch["attention_mask"].sum()) - 2  # every real token but each row's first
    assert out.aux_loss.item() > 0  # training: the sequence-level balance loss is live
    (out.loss + out.aux_loss).backward()

    loads = {i: moe.last_expert_load for i, moe in model.language_model.model.moe_layers()}
    assert len(loads) == 2 and all(bool((load > 0).all()) for load in loads.values()), loads
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    no_grad = [n for n, p in params.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert no_grad == []
    by_part = {part: sum(n.startswith(part) for n in params)
               for part in ("vision_tower.", "multi_modal_projector.", "language_model.")}
    # vision: patch proj w+b, pos table, 2 blocks x 12, final norm w+b; LM: embed, norm, head, 3 layers x 7 attention
    # tensors, dense MLP 3, 2 MoE layers x (router weight + shared 3 + 8 experts x 3) (the router bias is a buffer).
    assert by_part == {"vision_tower.": 3 + 2 * 12 + 2, "multi_modal_projector.": 6,
                       "language_model.": 3 + 3 * 7 + 3 + 2 * (1 + 3 + 8 * 3)}
    for _, moe in model.language_model.model.moe_layers():
        assert moe.gate.e_score_correction_bias.grad is None


@pytest.mark.parametrize("rmpad", [False, True])
def test_placeholder_count_mismatch_names_both_counts(rmpad: bool) -> None:
    model = _random_model()
    if rmpad:
        from vlmtune.patches.rmpad import apply_rmpad

        apply_rmpad(model, attention="sdpa_varlen")
    batch = _batch(GRIDS)
    ids = batch["input_ids"].clone()
    ids[0, int((ids[0] == PAD_ID).nonzero()[0])] = 5  # one placeholder fewer than the images give
    with pytest.raises(ValueError, match=r"27 placeholder tokens .* but 28 image tokens"):
        model(**dict(batch, input_ids=ids))
    with pytest.raises(ValueError, match=r"27 placeholder tokens .* but 6 image tokens"):  # images fewer than text
        model(**dict(batch, input_ids=ids, pixel_values=batch["pixel_values"][:24],
                      image_grid_hws=torch.tensor(GRIDS[:1])))
    with pytest.raises(ValueError, match=r"28 image placeholder tokens .* no pixel_values"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_text_only_batch_needs_no_pixels() -> None:
    model = _random_model().eval()
    calls = []
    model.vision_tower.register_forward_pre_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, NUM_BASE, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        lm_logits, _ = model.language_model(ids, attention_mask=mask)
    assert calls == []  # the vision tower never ran
    assert torch.equal(out.logits, lm_logits)  # exactly the language model on its own
    assert out.num_supervised_tokens == 10 + 6
    assert torch.isfinite(out.loss) and out.loss.item() > 0


# ------------------------------------------------------------------------------------------------------------------
# A3B: published tensor names and sizes, on the meta device
# ------------------------------------------------------------------------------------------------------------------
def published_a3b_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of Kimi-VL-A3B except the 27 inv_freq buffers, from shared/reference/kimi_vl.md."""
    v_d, v_ffn, v_layers, d, vocab, h, layers, e = 1152, 4304, 27, 2048, 163840, 16, 27, 64
    s: dict[str, tuple[int, ...]] = {
        "vision_tower.patch_embed.proj.weight": (v_d, 3, 14, 14), "vision_tower.patch_embed.proj.bias": (v_d,),
        "vision_tower.patch_embed.pos_emb.weight": (64, 64, v_d),
        "vision_tower.encoder.final_layernorm.weight": (v_d,), "vision_tower.encoder.final_layernorm.bias": (v_d,)}
    for i in range(v_layers):
        p = f"vision_tower.encoder.blocks.{i}."
        for name, out_in in (("norm0", (v_d,)), ("norm1", (v_d,)), ("wqkv", (3 * v_d, v_d)), ("wo", (v_d, v_d)),
                             ("mlp.fc0", (v_ffn, v_d)), ("mlp.fc1", (v_d, v_ffn))):
            s[p + name + ".weight"] = out_in
            s[p + name + ".bias"] = out_in[:1]
    s |= {"multi_modal_projector.pre_norm.weight": (v_d,), "multi_modal_projector.pre_norm.bias": (v_d,),
          "multi_modal_projector.linear_1.weight": (4 * v_d, 4 * v_d), "multi_modal_projector.linear_1.bias": (4 * v_d,),
          "multi_modal_projector.linear_2.weight": (d, 4 * v_d), "multi_modal_projector.linear_2.bias": (d,)}
    s |= {"language_model.model.embed_tokens.weight": (vocab, d), "language_model.model.norm.weight": (d,),
          "language_model.lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        s |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
              p + "self_attn.q_proj.weight": (h * (128 + 64), d), p + "self_attn.kv_a_proj_with_mqa.weight": (512 + 64, d),
              p + "self_attn.kv_a_layernorm.weight": (512,), p + "self_attn.kv_b_proj.weight": (h * (128 + 128), 512),
              p + "self_attn.o_proj.weight": (d, h * 128)}
        mlps = [("mlp.", 11264)] if i == 0 else [("mlp.shared_experts.", 2 * 1408)] + [
            (f"mlp.experts.{j}.", 1408) for j in range(e)]
        for prefix, ffn in mlps:
            s |= {p + prefix + "gate_proj.weight": (ffn, d), p + prefix + "up_proj.weight": (ffn, d),
                  p + prefix + "down_proj.weight": (d, ffn)}
        if i > 0:
            s |= {p + "mlp.gate.weight": (e, d), p + "mlp.gate.e_score_correction_bias": (e,)}
    return s


def test_a3b_on_meta_has_the_published_tensors_and_sizes() -> None:
    expected = published_a3b_shapes()
    assert len(expected) == 5679 - 27 == 5652
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(kimi_vl_a3b())
    state = model.state_dict()
    assert all(t.device.type == "meta" for t in state.values())
    assert {k: tuple(t.shape) for k, t in state.items()} == expected
    assert not any("inv_freq" in k for k in state)
    sizes = {part: sum(t.numel() for k, t in state.items() if k.startswith(part))
             for part in ("vision_tower.", "multi_modal_projector.", "language_model.")}
    total = sum(sizes.values())
    print(f"A3B parameters: total {total:,}, {sizes}")
    for got, published in ((total, 16.41e9), (sizes["language_model."], 15.96e9),
                           (sizes["vision_tower."], 416.9e6), (sizes["multi_modal_projector."], 30.7e6)):
        assert abs(got / published - 1) < 1e-3, (got, published)
    assert sizes == {"vision_tower.": 416_866_032, "multi_modal_projector.": 30_679_808,
                     "language_model.": sizes["language_model."]}
    assert state["language_model.model.layers.1.mlp.gate.weight"].dtype == torch.float32


def test_output_is_a_dict_that_zero3_hooks_can_walk() -> None:
    """DeepSpeed ZeRO-3 wraps every module's outputs with apply_to_tensors_only, which sees tensors in tuples, lists
    and dicts only: our output must be one of those (it warned "unknown inputs or outputs type" as a dataclass)."""
    from deepspeed.runtime.zero.utils import apply_to_tensors_only

    from vlmtune.models.kimi_vl import KimiVLOutput

    loss, logits = torch.tensor(2.0), torch.ones(1, 3, 5)
    out = KimiVLOutput(loss=loss, num_sequences=2)
    out.logits = logits
    assert out["logits"] is logits and out.loss is loss and out.aux_loss is None and out.num_supervised_tokens == 0
    touched = apply_to_tensors_only(lambda t: t * 3, out)
    assert touched is out and float(out.loss) == 6.0 and torch.equal(out.logits, logits * 3) and out.num_sequences == 2
    with pytest.raises(AttributeError, match="no field 'los'"):
        out.los = loss
    with pytest.raises(AttributeError, match="no field 'hidden'"):
        _ = out.hidden
