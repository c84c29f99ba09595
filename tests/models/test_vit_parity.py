"""MoonViT + projector parity against transformers' kimi_k25 (Kimi_K25VisionModel + Kimi_K25MultimodalProjection).

The oracle is used as published, with ``attn_implementation="sdpa"``: its non-flash path splits q/k/v by cu_seqlens and
runs one SDPA per image (block-diagonal by construction), and SDPA keeps fp64 (its "eager" path computes the softmax in
fp32). Still images are fed as ``grid_thw`` rows ``(1, h, w)``: t = 1 selects the zero row of its temporal table, and its
``pooler_output`` is the 2x2-merged (P // 4, 4, D) tensor (it merges in the vision model, not in the projector).

State dicts are mapped by hand (never through transformers' checkpoint conversion; the mapping and the oracle
construction live in tests/models/_oracles.py, shared with the whole-model test):

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

from tests.models import _oracles as oracles  # the independent references
from vlmtune.models.kimi_vl.configuration import KimiVLConfig, MoonViTConfig
from vlmtune.models.kimi_vl.projector import KimiVLMultiModalProjector
from vlmtune.models.kimi_vl.vit import MoonViT

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


def _oracle(vit: MoonViT, proj: KimiVLMultiModalProjector):
    o_vit, o_proj = oracles.k25_vision_oracle(vit.config, TEXT_D)
    o_vit.load_state_dict(oracles.oracle_vision_state(vit.state_dict(), H), strict=True)
    o_proj.load_state_dict(oracles.oracle_projector_state(proj.state_dict()), strict=True)
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
        ref = o_vit(pixels, oracles.k25_grid_thw(grid))
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


def test_parity_fp64_lifted(monkeypatch: pytest.MonkeyPatch) -> None:
    oracles.lift_k25_to_fp64(monkeypatch)
    diffs = _run_both()
    print(f"kimi_k25 parity, oracle fp32 casts lifted to fp64: {diffs}")
    assert diffs["vit"] <= 1e-12, diffs
    assert diffs["proj"] <= 1e-12, diffs
