"""MoonViT + projector parity against transformers' kimi_k25 (Kimi_K25VisionModel + Kimi_K25MultimodalProjection).

The oracle is used as published, with ``attn_implementation="sdpa"``: its non-flash path splits q/k/v by cu_seqlens and
runs one SDPA per image (block-diagonal by construction), and SDPA keeps fp64 (its "eager" path computes the softmax in
fp32). Still images are fed as ``grid_thw`` rows ``(1, h, w)``: t = 1 selects the zero row of its temporal table, and its
``pooler_output`` is the 2x2-merged (P // 4, 4, D) tensor (it merges in the vision model, not in the projector).

State dicts are mapped by hand (never through transformers' checkpoint conversion):

* ``wqkv`` (3D, D) -> ``attn.{q,k,v}_proj``; q and k rows permuted per head from interleaved pairs (2j, 2j+1) to
  rotate-half halves (j, j + Dh/2): ``view(H, Dh/2, 2, ...).transpose(1, 2)``. The oracle's ``recomposition_frequencies``
  puts ``w*f_i, h*f_i`` at rotate-half slot 2i, 2i+1, i.e. original pair 2i rotates with the column x: the same 2-D RoPE.
* norm0/norm1 -> norm1/norm2, mlp.fc0/fc1 -> mlp.fc1/fc2, wo -> attn.proj, pos_emb.weight -> pos_emb.position_embeddings,
  encoder.blocks -> layers, encoder.final_layernorm -> final_layernorm; projector linear_1/linear_2 -> in_proj/out_proj.

The oracle computes a few things in fp32 whatever the model dtype (RoPE angles and rotation, bicubic tap weights, the
merge's index_add), so fp64 agreement is ~4e-7. ``test_parity_fp64_lifted`` swaps exactly those fp32 casts for fp64 (same
formulas) and then agrees to ~1e-15, showing the residual is the oracle's rounding, not a difference in behaviour.
"""

from __future__ import annotations

import pytest
import torch

kimi_k25 = pytest.importorskip("transformers.models.kimi_k25.modeling_kimi_k25")
from transformers import vision_utils  # noqa: E402
from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config, Kimi_K25VisionConfig  # noqa: E402

from vlmtune.models.kimi_vl.configuration import KimiVLConfig, MoonViTConfig  # noqa: E402
from vlmtune.models.kimi_vl.projector import KimiVLMultiModalProjector  # noqa: E402
from vlmtune.models.kimi_vl.vit import MoonViT  # noqa: E402

D, H, LAYERS, FFN, TEXT_D, POS = 64, 4, 3, 96, 48, 8
# pos table 8x8: (4, 6) and (2, 10) shrink rows, (8, 8) is the native size, (2, 10) and (12, 4) enlarge an axis.
GRIDS = [(4, 6), (8, 8), (2, 10), (12, 4)]


def _randomise(module: torch.nn.Module) -> None:
    """Random weights everywhere, norms and biases included, so no term of the forward can hide."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "pos_emb" in name:
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.1)


def _ours() -> tuple[MoonViT, KimiVLMultiModalProjector]:
    vcfg = MoonViTConfig(init_pos_emb_height=POS, init_pos_emb_width=POS, num_attention_heads=H,
                         num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=FFN)
    cfg = KimiVLConfig(vision_config=vcfg.to_save_dict(), text_config=dict(hidden_size=TEXT_D))
    vit, proj = MoonViT(vcfg).double(), KimiVLMultiModalProjector(cfg).double()
    _randomise(vit)
    _randomise(proj)
    return vit, proj


def _permute_rope_rows(w: torch.Tensor) -> torch.Tensor:
    """(D, ...) q or k rows: per head, interleaved pairs (2j, 2j+1) -> rotate-half positions (j, j + Dh/2)."""
    dh = D // H
    return w.view(H, dh // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (H, Dh/2, 2, ..) -> (D, ..)


def _oracle_vision_state(vit: MoonViT) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in vit.state_dict().items():
        k = (key.replace("encoder.blocks.", "layers.").replace("encoder.final_layernorm", "final_layernorm")
             .replace("pos_emb.weight", "pos_emb.position_embeddings"))
        if ".wqkv." in k:
            base, suffix = k.split(".wqkv.")
            q, kk, v = value.chunk(3, dim=0)  # (3D, ...) -> 3 x (D, ...), [q | k | v]
            out[f"{base}.attn.q_proj.{suffix}"] = _permute_rope_rows(q)
            out[f"{base}.attn.k_proj.{suffix}"] = _permute_rope_rows(kk)
            out[f"{base}.attn.v_proj.{suffix}"] = v
            continue
        k = (k.replace(".wo.", ".attn.proj.").replace(".norm1.", ".norm2.").replace(".norm0.", ".norm1.")
             .replace("mlp.fc1.", "mlp.fc2.").replace("mlp.fc0.", "mlp.fc1."))
        out[k] = value
    return out


def _oracle(vit: MoonViT, proj: KimiVLMultiModalProjector):
    vcfg = Kimi_K25VisionConfig(patch_size=14, pos_emb_height=POS, pos_emb_width=POS, num_attention_heads=H,
                                num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=FFN,
                                hidden_act="gelu_pytorch_tanh",
                                rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    vcfg._attn_implementation = "sdpa"
    cfg = Kimi_K25Config(vision_config=vcfg.to_dict(), projection_hidden_size=D,
                         text_config={"model_type": "deepseek_v3", "hidden_size": TEXT_D})
    o_vit = kimi_k25.Kimi_K25VisionModel(vcfg).double().eval()
    o_proj = kimi_k25.Kimi_K25MultimodalProjection(cfg).double().eval()
    assert o_vit.config._attn_implementation == "sdpa"
    o_vit.load_state_dict(_oracle_vision_state(vit), strict=True)
    o_proj.load_state_dict({k.replace("linear_1", "in_proj").replace("linear_2", "out_proj"): v
                            for k, v in proj.state_dict().items()}, strict=True)
    return o_vit, o_proj


def _run_both(backend: str = "sdpa_masked") -> dict[str, float]:
    torch.manual_seed(0)
    vit, proj = _ours()
    for block in vit.encoder.blocks:
        block.attn_backend = backend
    o_vit, o_proj = _oracle(vit, proj)
    grid = torch.tensor(GRIDS)
    pixels = torch.randn(sum(h * w for h, w in GRIDS), 3, 14, 14, dtype=torch.float64)
    with torch.no_grad():
        feats = vit(pixels, grid)  # (P/4, 4, D)
        tokens = proj(feats)  # (P/4, TEXT_D)
        ref = o_vit(pixels, torch.cat([torch.ones(len(GRIDS), 1, dtype=torch.long), grid], dim=1))
        ref_tokens = o_proj(ref.pooler_output).squeeze(1)  # (P/4, 1, TEXT_D) -> (P/4, TEXT_D)
    assert feats.shape == ref.pooler_output.shape == (sum(h * w for h, w in GRIDS) // 4, 4, D)
    assert tokens.shape == ref_tokens.shape
    assert feats.abs().max() > 1 and tokens.abs().max() > 1  # outputs of size O(1): the bound below is meaningful
    return {"vit": (feats - ref.pooler_output).abs().max().item(), "proj": (tokens - ref_tokens).abs().max().item()}


@pytest.mark.parametrize("backend", ["sdpa_masked", "sdpa_varlen"])
def test_parity_with_kimi_k25(backend: str) -> None:
    diffs = _run_both(backend)
    print(f"kimi_k25 parity ({backend}): {diffs}")
    assert diffs["vit"] <= 1e-6, diffs
    assert diffs["proj"] <= 1e-6, diffs


def _lift_oracle_to_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the oracle's hard fp32 casts with fp64; the formulas are the oracle's own."""

    def rotary_forward(self, x, position_ids):  # oracle: position_ids.float() * inv_freq.float()
        spatial = D // H // 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, spatial, 2, dtype=torch.float64) / spatial))
        freqs = position_ids[..., None].double() * inv_freq
        return self.recomposition_frequencies(freqs.cos()), self.recomposition_frequencies(freqs.sin())

    def apply_rope(q, k, cos, sin):  # oracle: q.float(), k.float()
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return q * cos + kimi_k25.rotate_half(q) * sin, k * cos + kimi_k25.rotate_half(k) * sin

    def taps(index, size, side, mode, align_corners, padding="border"):  # oracle: index.to(torch.float32)
        assert mode == "bicubic" and not align_corners
        src = (index.double() + 0.5) * side / size - 0.5
        floor = torch.floor(src)
        offsets = torch.arange(-1, 3)
        distance = (src[:, None] - floor[:, None] - offsets).abs()
        a = -0.75
        near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
        far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
        return (floor.long()[:, None] + offsets).clamp(0, side - 1), torch.where(distance <= 1, near, far)

    def temporal_merge(self, hidden_states, grid_thw, kh, kw, kwargs=None):  # oracle: index_add_ in fp32
        dest, weight, n = kimi_k25.get_vision_temporal_merge_index(grid_thw, kh, kw, kwargs=kwargs)
        out = hidden_states.new_zeros(n * kh * kw, hidden_states.shape[-1])
        out.index_add_(0, dest, hidden_states * weight[:, None].to(hidden_states.dtype))
        return out.view(n, kh * kw, -1)  # (P/4 * 4, D) -> (P/4, 4, D)

    monkeypatch.setattr(kimi_k25.Kimi_K25VisionRotaryEmbedding, "forward", rotary_forward)
    monkeypatch.setattr(kimi_k25, "apply_rotary_pos_emb_vision", apply_rope)
    monkeypatch.setattr(vision_utils, "_interpolation_axis_taps_weights", taps)
    monkeypatch.setattr(kimi_k25.Kimi_K25VisionModel, "temporal_merge", temporal_merge)


def test_parity_fp64_lifted(monkeypatch: pytest.MonkeyPatch) -> None:
    _lift_oracle_to_fp64(monkeypatch)
    diffs = _run_both()
    print(f"kimi_k25 parity, oracle fp32 casts lifted to fp64: {diffs}")
    assert diffs["vit"] <= 1e-12, diffs
    assert diffs["proj"] <= 1e-12, diffs
