"""MoonViT and projector properties: packing, block-diagonality, backends, RoPE orientation, dtypes, gradients,
checkpointing, meta construction and the published A3B names/shapes/sizes."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from vlmtune.models.kimi_vl import vit as vit_module
from vlmtune.models.kimi_vl.configuration import KimiVLConfig, MoonViTConfig, kimi_vl_a3b, kimi_vl_tiny
from vlmtune.models.kimi_vl.projector import KimiVLMultiModalProjector
from vlmtune.models.kimi_vl.vit import MoonViT, MoonViTBlock, apply_rope_2d, rope_cos_sin

GRIDS = [(4, 6), (8, 8), (2, 10)]
CFG = MoonViTConfig(init_pos_emb_height=8, init_pos_emb_width=8, num_attention_heads=4, num_hidden_layers=3,
                    hidden_size=64, intermediate_size=96)


def _model(dtype: torch.dtype = torch.float64, config: MoonViTConfig = CFG) -> MoonViT:
    torch.manual_seed(0)
    model = MoonViT(config).double()  # randomised in fp64, then cast: every dtype gets the same weights
    with torch.no_grad():  # random norms and biases too, so every term is exercised
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias") or "pos_emb" in name:
                p.normal_(0, 0.2)
            else:
                p.normal_(0, 0.1)
    return model.to(dtype)


def _pixels(grids: list[tuple[int, int]], dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=g, dtype=torch.float64).to(dtype)


def _tokens(grids: list[tuple[int, int]]) -> list[int]:
    return [h * w // 4 for h, w in grids]


def _set_backend(model: MoonViT, backend: str) -> None:
    for block in model.encoder.blocks:
        block.attn_backend = backend


# ----------------------------------------------------------------------------------------------------------------
# packing and isolation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sdpa_masked", "sdpa_varlen"])
def test_packed_equals_each_image_alone(backend: str) -> None:
    model = _model()
    _set_backend(model, backend)
    pixels = _pixels(GRIDS)
    with torch.no_grad():
        packed = model(pixels, torch.tensor(GRIDS))  # (P/4, 4, D)
        alone = [model(px, torch.tensor([hw])) for px, hw in zip(pixels.split([h * w for h, w in GRIDS]), GRIDS)]
    assert packed.shape == (sum(_tokens(GRIDS)), 4, CFG.hidden_size)
    diff = (packed - torch.cat(alone)).abs().max().item()
    assert diff <= 1e-10, diff


@pytest.mark.parametrize("backend", ["sdpa_masked", "sdpa_varlen"])
def test_block_diagonal_other_image_cannot_leak(backend: str) -> None:
    model = _model()
    _set_backend(model, backend)
    pixels = _pixels(GRIDS)
    changed = pixels.clone()
    n0, n1 = 24, 64
    changed[n0:n0 + n1] = torch.randn(n1, 3, 14, 14, dtype=torch.float64) * 5  # image 2 (index 1) only
    with torch.no_grad():
        a = model(pixels, torch.tensor(GRIDS))
        b = model(changed, torch.tensor(GRIDS))
    t0, t1, _ = _tokens(GRIDS)
    assert torch.equal(a[:t0], b[:t0])  # image 1: bit-identical
    assert torch.equal(a[t0 + t1:], b[t0 + t1:])  # image 3: bit-identical
    assert (a[t0:t0 + t1] - b[t0:t0 + t1]).abs().max() > 1e-2  # image 2 did change


def test_explicit_cu_seqlens_equals_derived() -> None:
    model = _model()
    pixels, grid = _pixels(GRIDS), torch.tensor(GRIDS)
    with torch.no_grad():
        derived = model(pixels, grid)
        given = model(pixels, grid, cu_seqlens=torch.tensor([0, 24, 88, 108], dtype=torch.int32), max_seqlen=64)
    assert torch.equal(derived, given)


def test_backends_agree_outputs_and_grads() -> None:
    """sdpa_masked (dense reference) vs sdpa_varlen installed the way apply_rmpad does (forward swapped on the
    instance + attn_backend)."""
    pixels, grid = _pixels(GRIDS), torch.tensor(GRIDS)
    results = []
    for backend in ("sdpa_masked", "sdpa_varlen"):
        model = _model()
        if backend == "sdpa_varlen":
            for block in model.encoder.blocks:
                block.forward = types.MethodType(MoonViTBlock.forward, block)
                block.attn_backend = backend
        out = model(pixels, grid)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert (out_a - out_b).abs().max().item() <= 1e-10
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        diff = (grads_a[name] - grads_b[name]).abs().max().item()
        assert diff <= 1e-10, (name, diff)


# ----------------------------------------------------------------------------------------------------------------
# RoPE, position table, merger
# ----------------------------------------------------------------------------------------------------------------
def test_rope_orientation_dims_01_follow_column_dims_23_follow_row() -> None:
    h, w, dh = 4, 6, 16
    cos, sin = rope_cos_sin([(h, w)], dh, torch.float64, "cpu")
    assert cos.shape == sin.shape == (h * w, dh // 2)
    ones = torch.tensor([1.0, 0.0], dtype=torch.float64).repeat(dh // 2).view(1, 1, dh).expand(h * w, 1, dh)
    out = apply_rope_2d(ones, cos, sin)  # (P, 1, Dh): each pair (1, 0) becomes (cos a, sin a)
    freq1 = 10000.0 ** (-4 / dh)  # = 0.1
    assert freq1 == pytest.approx(0.1, abs=1e-15)
    for r in range(h):
        for c in range(w):
            p = r * w + c  # row-major patch index
            expected = torch.tensor([c, r, c * freq1, r * freq1], dtype=torch.float64)  # angles of pairs 0..3
            got = torch.atan2(out[p, 0, 1:8:2], out[p, 0, 0:8:2])  # (sin, cos) of pairs 0..3
            torch.testing.assert_close(torch.cos(got), torch.cos(expected), atol=1e-14, rtol=0)
            torch.testing.assert_close(torch.sin(got), torch.sin(expected), atol=1e-14, rtol=0)
    # Patch (row 1, col 2): dims (0, 1) rotated by 2 rad (the column), dims (2, 3) by 1 rad (the row).
    p = 1 * w + 2
    torch.testing.assert_close(out[p, 0, :4], torch.tensor([math.cos(2), math.sin(2), math.cos(1), math.sin(1)],
                                                           dtype=torch.float64), atol=1e-15, rtol=0)
    # Counter-clockwise (complex multiply): (0, 1) rotated by 2 rad -> (-sin 2, cos 2).
    e1 = torch.zeros(h * w, 1, dh, dtype=torch.float64)
    e1[..., 1] = 1.0
    rot = apply_rope_2d(e1, cos, sin)
    torch.testing.assert_close(rot[p, 0, :2], torch.tensor([-math.sin(2), math.cos(2)], dtype=torch.float64),
                               atol=1e-15, rtol=0)


def test_rope_positions_restart_per_image_and_promote_dtype() -> None:
    cos, sin = rope_cos_sin([(2, 4), (4, 2)], 16, torch.bfloat16, "cpu")
    assert cos.dtype == torch.float32  # promote_types(bf16, fp32): never computed in bf16
    assert torch.equal(cos[8], torch.ones(8)) and torch.equal(sin[8], torch.zeros(8))  # image 2 starts at (0, 0)
    cos64, _ = rope_cos_sin([(2, 4)], 16, torch.float64, "cpu")
    assert cos64.dtype == torch.float64
    x = torch.randn(8, 2, 16, dtype=torch.bfloat16)
    assert apply_rope_2d(x, cos[:8], sin[:8]).dtype == torch.bfloat16


def test_position_table_interpolation_and_native_size() -> None:
    model = _model()
    table = model.patch_embed.pos_emb.weight  # (8, 8, D)
    with torch.no_grad():
        native = model.patch_embed.pos_emb([(8, 8)])
        resized = model.patch_embed.pos_emb([(4, 12)])
        # Bicubic at scale 1 is the identity, so skipping it at the native size (as the original does) changes nothing.
        same = F.interpolate(table.permute(2, 0, 1)[None], size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.equal(native, table.flatten(0, 1))
    assert torch.equal(same[0].permute(1, 2, 0).flatten(0, 1), native)
    ref = F.interpolate(table.detach().permute(2, 0, 1)[None], size=(4, 12), mode="bicubic", align_corners=False)
    assert torch.equal(resized, ref[0].permute(1, 2, 0).reshape(48, -1))  # (1, D, 4, 12) -> (48, D) row-major


def test_merger_order() -> None:
    d = 3
    x = torch.arange(4 * 6 * d, dtype=torch.float64).view(4 * 6, d)  # (P, D), patch p has values p*d ..
    merged = vit_module.merge_patches(x, [(4, 6)])
    assert merged.shape == (6, 4, d)
    # merged token 4 = block row 1, block col 1 -> patches (2,2) (2,3) (3,2) (3,3) = 14, 15, 20, 21
    assert merged[4, :, 0].tolist() == [14 * d, 15 * d, 20 * d, 21 * d]
    assert merged[0, :, 0].tolist() == [0, 1 * d, 6 * d, 7 * d]


# ----------------------------------------------------------------------------------------------------------------
# dtypes and gradients
# ----------------------------------------------------------------------------------------------------------------
def test_fp32_and_bf16_keep_dtype_and_track_fp64() -> None:
    pixels, grid = _pixels(GRIDS), torch.tensor(GRIDS)
    with torch.no_grad():
        ref = _model(torch.float64)(pixels, grid)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.05)):
            model = _model(dtype)
            out = model(pixels.to(dtype), grid)
            assert out.dtype == dtype
            assert torch.isfinite(out).all()
            rel = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            print(f"{dtype} vs fp64: max abs diff / max abs = {rel:.2e}")
            assert rel <= tol, (dtype, rel)
            proj = KimiVLMultiModalProjector(kimi_vl_tiny()).to(dtype)
            assert proj(out).dtype == dtype


def test_gradient_reaches_every_parameter() -> None:
    model = _model(torch.float32)
    proj = KimiVLMultiModalProjector(
        KimiVLConfig(vision_config=CFG.to_save_dict(), text_config=dict(hidden_size=32)))
    out = proj(model(_pixels(GRIDS, torch.float32), torch.tensor(GRIDS)))
    (out * torch.randn_like(out)).sum().backward()
    params = list(model.named_parameters()) + [("proj." + n, p) for n, p in proj.named_parameters()]
    assert len(params) == 2 + 1 + 3 * 12 + 2 + 6
    for name, p in params:
        assert p.grad is not None, name
        assert p.grad.abs().max() > 0, name


def _loss_and_grads(model: MoonViT, pixels: torch.Tensor, grid: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(pixels, grid)
    (out.square().sum() + out.sum()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every_k", [1, 2])
def test_gradient_checkpointing_is_exact(every_k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    pixels, grid = _pixels(GRIDS), torch.tensor(GRIDS)
    out_ref, grads_ref = _loss_and_grads(model, pixels, grid)

    calls = []
    real_checkpoint = vit_module.checkpoint

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        assert kwargs.get("use_reentrant") is False
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(vit_module, "checkpoint", counting_checkpoint)
    model.gradient_checkpointing, model.checkpoint_every_k = True, every_k
    out_ck, grads_ck = _loss_and_grads(model, pixels, grid)
    assert len(calls) == (3 if every_k == 1 else 2)  # blocks 0,1,2 or blocks 0,2
    assert torch.equal(out_ref, out_ck)
    assert grads_ref.keys() == grads_ck.keys()
    for name in grads_ref:
        assert torch.equal(grads_ref[name], grads_ck[name]), name

    # A frozen block is never checkpointed (it has no activations to save for backward).
    calls.clear()
    model.checkpoint_every_k = 1
    for p in model.encoder.blocks[0].parameters():
        p.requires_grad_(False)
    _loss_and_grads(model, pixels, grid)
    assert calls == [model.encoder.blocks[1], model.encoder.blocks[2]]


# ----------------------------------------------------------------------------------------------------------------
# construction, names, sizes, init
# ----------------------------------------------------------------------------------------------------------------
def _published_vision_shapes(n_layers: int = 27, d: int = 1152, ffn: int = 4304) -> dict[str, tuple[int, ...]]:
    """Key -> shape under ``vision_tower.`` as listed in shared/reference/kimi_vl.md for Kimi-VL-A3B."""
    shapes = {"patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,),
              "patch_embed.pos_emb.weight": (64, 64, d),
              "encoder.final_layernorm.weight": (d,), "encoder.final_layernorm.bias": (d,)}
    for i in range(n_layers):
        b = f"encoder.blocks.{i}"
        shapes.update({f"{b}.norm0.weight": (d,), f"{b}.norm0.bias": (d,), f"{b}.norm1.weight": (d,),
                       f"{b}.norm1.bias": (d,), f"{b}.wqkv.weight": (3 * d, d), f"{b}.wqkv.bias": (3 * d,),
                       f"{b}.wo.weight": (d, d), f"{b}.wo.bias": (d,), f"{b}.mlp.fc0.weight": (ffn, d),
                       f"{b}.mlp.fc0.bias": (ffn,), f"{b}.mlp.fc1.weight": (d, ffn), f"{b}.mlp.fc1.bias": (d,)})
    return shapes


def test_meta_construction_a3b_names_shapes_and_sizes() -> None:
    cfg = kimi_vl_a3b()
    with torch.device("meta"):
        tower = MoonViT(cfg.vision_config)
        proj = KimiVLMultiModalProjector(cfg)
    state = tower.state_dict()
    assert all(t.device.type == "meta" for t in state.values())
    assert {k: tuple(v.shape) for k, v in state.items()} == _published_vision_shapes()
    assert len(state) == 5 + 27 * 12  # no RoPE table or other buffer in the state
    assert list(tower.buffers()) == []
    n_vit = sum(p.numel() for p in tower.parameters())
    assert n_vit == 416_866_032
    assert abs(n_vit / 416.9e6 - 1) < 1e-3
    assert {k: tuple(v.shape) for k, v in proj.state_dict().items()} == {
        "pre_norm.weight": (1152,), "pre_norm.bias": (1152,), "linear_1.weight": (4608, 4608),
        "linear_1.bias": (4608,), "linear_2.weight": (2048, 4608), "linear_2.bias": (2048,)}
    n_proj = sum(p.numel() for p in proj.parameters())
    assert n_proj == 30_679_808
    assert abs(n_proj / 30.7e6 - 1) < 1e-3


def test_init_is_deterministic_and_sensible() -> None:
    torch.manual_seed(123)
    a = MoonViT(CFG)
    torch.manual_seed(123)
    b = MoonViT(CFG)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    sd = a.state_dict()
    assert torch.equal(sd["encoder.blocks.0.norm0.weight"], torch.ones(64))
    assert torch.equal(sd["encoder.blocks.1.wqkv.bias"], torch.zeros(192))
    assert torch.equal(sd["patch_embed.proj.bias"], torch.zeros(64))
    assert sd["encoder.blocks.2.mlp.fc0.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert sd["patch_embed.pos_emb.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    torch.manual_seed(5)
    a.init_weights()
    torch.manual_seed(5)
    b.init_weights()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    torch.manual_seed(7)
    proj = KimiVLMultiModalProjector(kimi_vl_tiny())
    assert torch.equal(proj.linear_2.bias, torch.zeros_like(proj.linear_2.bias))
    assert proj.linear_1.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_tiny_builder_runs_end_to_end() -> None:
    cfg = kimi_vl_tiny()
    tower, proj = MoonViT(cfg.vision_config), KimiVLMultiModalProjector(cfg)
    out = proj(tower(torch.randn(4 * 6 + 16, 3, 14, 14), torch.tensor([[4, 6], [4, 4]])))
    assert out.shape == (6 + 4, cfg.text_config.hidden_size)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------
def test_clear_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"even h and w.*\(1, \(3, 4\)\)"):
        model(_pixels([(2, 2), (3, 4)]), torch.tensor([[2, 2], [3, 4]]))
    with pytest.raises(ValueError, match="describe 16 patches but pixel_values holds 12"):
        model(_pixels([(2, 6)]), torch.tensor([[4, 4]]))
    with pytest.raises(ValueError, match=r"pixel_values must be \(P, 3, 14, 14\)"):
        model(torch.zeros(4, 3, 16, 16, dtype=torch.float64), torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match=r"image_grid_hws must be \(I, 2\)"):
        model(_pixels([(2, 2)]), torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="cu_seqlens has 3 entries for 1 images"):
        model(_pixels([(2, 2)]), torch.tensor([[2, 2]]), cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expected \(L, 4, 64\)"):
        KimiVLMultiModalProjector(kimi_vl_tiny())(torch.zeros(3, 64))
