"""MoonViT: the Kimi-VL vision tower (native resolution, 2-D RoPE, packed images, 2x2 patch merger).

Attribute names equal the checkpoint keys under ``vision_tower.`` (shared/reference/kimi_vl.md), so loading is a
table. The behaviour reproduced is the published remote code as ported by vLLM
(``vllm/model_executor/models/moonvit.py``: ``Learnable2DInterpPosEmb``, ``Rope2DPosEmb``, ``MoonVitEncoderLayer``,
``patch_merger``); transformers' ``models/kimi_k25`` (``Kimi_K25VisionModel``) is the independent test oracle.

All images of one call form ONE packed sequence; attention is block-diagonal, one block per image::

    pixel_values   (P, 3, 14, 14)  image 0: h0*w0 patches row-major | image 1: h1*w1 patches | ...
    image_grid_hws (I, 2)          [[h0, w0], [h1, w1], ...] in patches, h and w even
    cu_seqlens     (I+1,) int32    0, h0*w0, h0*w0 + h1*w1, ...
    RoPE positions (x=col, y=row)  restart at (0, 0) in every image
    output         (P // 4, 4, D)  per image: 2x2 groups in row-major group order, sub-patches
                                   (0,0) (0,1) (1,0) (1,1); images in order

Every path runs in the module's dtype (fp64 included); LayerNorm and the RoPE rotation compute in
``promote_types(dtype, float32)`` and cast back (casts only ever go up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmtune.ops.attention import varlen_attention

from .configuration import MoonViTConfig

ROPE_THETA = 10000.0  # MoonViT's 2-D RoPE base (vLLM moonvit.py Rope2DPosEmb theta_base)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the remote code uses everywhere in the tower

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (P, Dh/2) in promote_types(dtype, float32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class PromotedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm that normalises in ``promote_types(dtype, float32)`` and returns the input dtype.

    Same parameters (``weight``, ``bias``) and keys as nn.LayerNorm; fp32/fp64 inputs are unchanged, bf16 inputs are
    normalised in fp32 and cast back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(x.dtype)
        weight = self.weight.to(ct) if self.weight is not None else None
        bias = self.bias.to(ct) if self.bias is not None else None
        return F.layer_norm(x.to(ct), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Deterministic (under ``torch.manual_seed``) initialisation of every parameter below ``module``.

    Linear and Conv2d weights ~ N(0, std), their biases 0; LayerNorm weight 1, bias 0; the MoonViT position table
    ~ N(0, std). Modules are visited in registration order, so the same seed gives the same weights.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Learnable2DInterpPosEmb):
            nn.init.normal_(m.weight, mean=0.0, std=std)


# ------------------------------------------------------------------------------------------------------------------
# 2-D RoPE
# ------------------------------------------------------------------------------------------------------------------
def rope_cos_sin(
    grid_hws: list[tuple[int, int]] | list[list[int]],
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    theta: float = ROPE_THETA,
) -> Rope:
    """cos/sin of the 2-D RoPE angles of every patch of the packed images, computed on the fly (no 512x512 table).

    Interleaved real pairs, as the complex pairs of vLLM moonvit.py ``Rope2DPosEmb.precomputed_freqs_cis``: pair 2i
    (dims 4i, 4i+1) rotates by ``x * freq_i`` with x the COLUMN, pair 2i+1 (dims 4i+2, 4i+3) by ``y * freq_i`` with y
    the ROW, ``freq_i = theta ** (-4 i / Dh)``, i = 0 .. Dh/4 - 1. (The original docstring says the opposite; its code,
    which every port follows, is as here.) Positions restart at (0, 0) in every image.

    Args:
        grid_hws: (h, w) in patches of each image, host ints.
        head_dim: Dh, divisible by 4.
        dtype: the module dtype; angles are computed in ``promote_types(dtype, float32)``.
        device: where the tables live.
        theta: the RoPE base.

    Returns:
        (cos, sin), each (P, Dh/2) with P = sum(h*w), in ``promote_types(dtype, float32)``.
    """
    if head_dim % 4:
        raise ValueError(f"MoonViT 2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    ct = _compute_dtype(dtype)
    exponent = torch.arange(0, head_dim, 4, dtype=ct, device=device) / head_dim  # (Dh/4,) = 4i / Dh
    freqs = 1.0 / (theta**exponent)  # (Dh/4,)
    xs, ys = [], []
    for h, w in grid_hws:
        ys.append(torch.arange(h, dtype=ct, device=device).repeat_interleave(w))  # (h*w,) row of each patch
        xs.append(torch.arange(w, dtype=ct, device=device).repeat(h))  # (h*w,) column of each patch
    x = torch.cat(xs)  # (P,)
    y = torch.cat(ys)  # (P,)
    angles = torch.stack([x[:, None] * freqs, y[:, None] * freqs], dim=-1)  # (P, Dh/4, 2) [x*f_i, y*f_i]
    angles = angles.flatten(1)  # (P, Dh/2): pair j = 2i -> x*f_i, pair 2i+1 -> y*f_i
    return angles.cos(), angles.sin()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (dims 2j, 2j+1) of ``x`` by the angle of pair j (a complex multiply by cis(angle)).

    Args:
        x: (P, H, Dh) queries or keys.
        cos, sin: (P, Dh/2) from :func:`rope_cos_sin`.

    Returns:
        (P, H, Dh) in x's dtype; the rotation itself runs in ``promote_types(x.dtype, cos.dtype)`` (>= fp32).
    """
    ct = torch.promote_types(x.dtype, cos.dtype)
    pairs = x.to(ct).unflatten(-1, (-1, 2))  # (P, H, Dh/2, 2)
    re, im = pairs[..., 0], pairs[..., 1]  # (P, H, Dh/2) each
    c, s = cos.to(ct)[:, None, :], sin.to(ct)[:, None, :]  # (P, 1, Dh/2)
    out = torch.stack([re * c - im * s, re * s + im * c], dim=-1)  # (P, H, Dh/2, 2)
    return out.flatten(-2).to(x.dtype)  # (P, H, Dh)


# ------------------------------------------------------------------------------------------------------------------
# Patch embedding
# ------------------------------------------------------------------------------------------------------------------
class Learnable2DInterpPosEmb(nn.Module):
    """The learnable (H0, W0, D) position table, bicubic-resampled to each image's (h, w) grid.

    vLLM moonvit.py ``Learnable2DInterpPosEmb``: ``F.interpolate(mode="bicubic")`` with the default
    ``align_corners=False`` and no antialias, skipped when (h, w) == (H0, W0) (bicubic at scale 1 is the identity
    anyway: the taps' weights are exactly 0, 1, 0, 0). Computed in the table's dtype, as the original does.
    """

    def __init__(self, height: int, width: int, dim: int) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.weight = nn.Parameter(torch.empty(height, width, dim))  # (H0, W0, D)

    def forward(self, grid_hws: list[tuple[int, int]] | list[list[int]]) -> torch.Tensor:
        """(h, w) per image (host ints) -> (P, D) position embeddings, images concatenated, row-major each."""
        out = []
        for h, w in grid_hws:
            if (h, w) == (self.height, self.width):
                out.append(self.weight.flatten(0, 1))  # (h*w, D)
                continue
            table = self.weight.permute(2, 0, 1).unsqueeze(0)  # (1, D, H0, W0)
            resized = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
            out.append(resized[0].permute(1, 2, 0).flatten(0, 1))  # (h*w, D)
        return torch.cat(out)  # (P, D)


class MoonVisionPatchEmbed(nn.Module):
    """``patch_embed``: Conv2d(3, D, 14, stride 14) on each (3, 14, 14) patch, plus the interpolated position table."""

    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        ps = config.patch_size
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=ps, stride=ps)
        self.pos_emb = Learnable2DInterpPosEmb(config.init_pos_emb_height, config.init_pos_emb_width,
                                               config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, grid_hws: list[tuple[int, int]] | list[list[int]]) -> torch.Tensor:
        """(P, 3, ps, ps) patches -> (P, D) embeddings with the position table added once."""
        x = self.proj(pixel_values).view(pixel_values.shape[0], -1)  # (P, D, 1, 1) -> (P, D)
        return x + self.pos_emb(grid_hws).to(x.dtype)  # (P, D)


# ------------------------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------------------------
class MoonViTMLP(nn.Module):
    """``mlp``: fc1(gelu_tanh(fc0(x))) (vLLM moonvit.py MLP2 with ACT2FN["gelu_pytorch_tanh"])."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(dim, hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class MoonViTBlock(nn.Module):
    """One pre-norm block: ``x += wo(attn(rope(wqkv(norm0(x)))))``, ``x += mlp(norm1(x))``.

    The attention lives in :meth:`attention` and reads ``self.attn_backend`` at call time: ``sdpa_masked`` (the
    default, one dense SDPA with a block-diagonal mask: the reference) or any backend of
    :mod:`vlmtune.ops.attention`. ``apply_rmpad`` sets ``attn_backend`` and re-installs ``forward`` on the instance.
    """

    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attn_backend = "sdpa_masked"
        self.norm0 = PromotedLayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm1 = PromotedLayerNorm(d, eps=LAYER_NORM_EPS)
        self.wqkv = nn.Linear(d, 3 * d)  # output [q | k | v], each (H, Dh) with heads contiguous
        self.wo = nn.Linear(d, d)
        self.mlp = MoonViTMLP(d, config.intermediate_size)

    def attention(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, rope: Rope) -> torch.Tensor:
        """Non-causal block-diagonal self-attention with 2-D RoPE: (P, D) -> (P, D), before ``wo``."""
        p = x.shape[0]
        qkv = self.wqkv(x).view(p, 3, self.num_heads, self.head_dim)  # (P, 3D) -> (P, 3, H, Dh)
        q, k, v = qkv.unbind(dim=1)  # (P, H, Dh) each
        cos, sin = rope
        q, k = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False,
                               softmax_scale=self.head_dim**-0.5, backend=self.attn_backend)  # (P, H, Dh)
        return out.reshape(p, self.num_heads * self.head_dim)  # (P, D)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                rope: Rope) -> torch.Tensor:
        """(P, D) -> (P, D). cu_seqlens (I+1,) int32, max_seqlen a host int, rope from :func:`rope_cos_sin`."""
        x = hidden_states
        x = x + self.wo(self.attention(self.norm0(x), cu_seqlens, max_seqlen, rope))
        return x + self.mlp(self.norm1(x))


class MoonViTEncoder(nn.Module):
    """``encoder``: the blocks then ``final_layernorm``."""

    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MoonViTBlock(config) for _ in range(config.num_hidden_layers)])
        self.final_layernorm = PromotedLayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, rope: Rope,
                checkpoint_every_k: int = 0) -> torch.Tensor:
        """(P, D) -> (P, D).

        Args:
            checkpoint_every_k: 0 = no activation checkpointing; k >= 1 checkpoints blocks 0, k, 2k, ... that have a
                trainable parameter (non-reentrant), when autograd is recording.
        """
        x = hidden_states
        for i, block in enumerate(self.blocks):
            use_ckpt = (checkpoint_every_k > 0 and i % checkpoint_every_k == 0 and torch.is_grad_enabled()
                        and any(p.requires_grad for p in block.parameters()))
            if use_ckpt:
                x = checkpoint(block, x, cu_seqlens, max_seqlen, rope, use_reentrant=False)
            else:
                x = block(x, cu_seqlens, max_seqlen, rope)
        return self.final_layernorm(x)


def merge_patches(hidden_states: torch.Tensor, grid_hws: list[tuple[int, int]] | list[list[int]]) -> torch.Tensor:
    """The 2x2 patch merger (vLLM moonvit.py ``patch_merger``), all images concatenated.

    Per image: (h*w, D) -> view(h/2, 2, w/2, 2, D) -> permute(0, 2, 1, 3, 4) -> (h/2 * w/2, 4, D); sub-patch order
    (0,0), (0,1), (1,0), (1,1).

    Args:
        hidden_states: (P, D) packed patches, row-major per image.
        grid_hws: (h, w) per image, host ints, both even.

    Returns:
        (P // 4, 4, D).
    """
    d = hidden_states.shape[-1]
    out = []
    for seq, (h, w) in zip(hidden_states.split([h * w for h, w in grid_hws]), grid_hws):
        blocks = seq.view(h // 2, 2, w // 2, 2, d).permute(0, 2, 1, 3, 4)  # (h/2, w/2, 2, 2, D)
        out.append(blocks.reshape(h // 2 * (w // 2), 4, d))  # (h/2 * w/2, 4, D)
    return torch.cat(out)  # (P // 4, 4, D)


class MoonViT(nn.Module):
    """The Kimi-VL vision tower (``vision_tower.*`` keys): patch_embed -> encoder -> 2x2 merger.

    Set ``gradient_checkpointing = True`` (and ``checkpoint_every_k``) to checkpoint the trainable blocks.
    """

    def __init__(self, config: MoonViTConfig) -> None:
        super().__init__()
        if tuple(config.merge_kernel_size) != (2, 2):
            raise ValueError(f"MoonViT merge_kernel_size {config.merge_kernel_size} is not supported (only [2, 2])")
        self.config = config
        self.patch_embed = MoonVisionPatchEmbed(config)
        self.encoder = MoonViTEncoder(config)
        self.gradient_checkpointing = False
        self.checkpoint_every_k = 1
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Re-initialise every parameter (see :func:`init_weights`); deterministic under ``torch.manual_seed``."""
        init_weights(self, std)

    def _check_inputs(self, pixel_values: torch.Tensor, grid_hws: list[list[int]]) -> None:
        ps = self.config.patch_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, ps, ps):
            raise ValueError(f"MoonViT: pixel_values must be (P, 3, {ps}, {ps}) patches, got "
                             f"{tuple(pixel_values.shape)} (patchify images with the Kimi-VL image processor)")
        if not grid_hws:
            raise ValueError("MoonViT: image_grid_hws is empty; call the vision tower with at least one image")
        if any(len(hw) != 2 for hw in grid_hws):
            raise ValueError(f"MoonViT: image_grid_hws must be (I, 2) rows of (h, w), got {grid_hws}")
        odd = [(i, (hw[0], hw[1])) for i, hw in enumerate(grid_hws) if hw[0] <= 0 or hw[1] <= 0 or hw[0] % 2 or hw[1] % 2]
        if odd:
            raise ValueError(f"MoonViT: image grids must have positive even h and w for the 2x2 merger; "
                             f"images (index, (h, w)) {odd} are not (pad the image to a multiple of "
                             f"{2 * ps} pixels, as the image processor does with pad_input)")
        n = sum(h * w for h, w in grid_hws)
        if n != pixel_values.shape[0]:
            raise ValueError(f"MoonViT: image_grid_hws {grid_hws} describe {n} patches but pixel_values holds "
                             f"{pixel_values.shape[0]}")

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_grid_hws: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Encode the packed patches of several images in one call.

        Args:
            pixel_values: (P, 3, 14, 14) patches, row-major per image, images concatenated; cast to the module dtype.
            image_grid_hws: (I, 2) int (h, w) per image in patches, both even. Read to the host once.
            cu_seqlens: (I+1,) int32 image boundaries; derived from ``image_grid_hws`` when None.
            max_seqlen: the largest h*w as a host int; derived from ``image_grid_hws`` when None.

        Returns:
            (P // 4, 4, D) merged patches in the module dtype (see the module docstring for the order).
        """
        if image_grid_hws.dim() != 2 or image_grid_hws.shape[-1] != 2:
            raise ValueError(f"MoonViT: image_grid_hws must be (I, 2), got {tuple(image_grid_hws.shape)}")
        grid_hws = [[int(h), int(w)] for h, w in image_grid_hws.tolist()]  # the one host read of the call
        self._check_inputs(pixel_values, grid_hws)
        device = self.patch_embed.proj.weight.device
        dtype = self.patch_embed.proj.weight.dtype
        if cu_seqlens is None:
            lens = torch.tensor([0] + [h * w for h, w in grid_hws], dtype=torch.int32)  # (I+1,)
            cu_seqlens = lens.cumsum(0, dtype=torch.int32).to(device)  # (I+1,)
        elif cu_seqlens.numel() != len(grid_hws) + 1:
            raise ValueError(f"MoonViT: cu_seqlens has {cu_seqlens.numel()} entries for {len(grid_hws)} images "
                             "(expected I + 1)")
        if max_seqlen is None:
            max_seqlen = max(h * w for h, w in grid_hws)
        rope = rope_cos_sin(grid_hws, self.config.head_dim, dtype, device)  # (P, Dh/2) x 2
        x = self.patch_embed(pixel_values.to(device=device, dtype=dtype), grid_hws)  # (P, D)
        every_k = self.checkpoint_every_k if self.gradient_checkpointing else 0
        if self.gradient_checkpointing and every_k < 1:
            raise ValueError(f"MoonViT: checkpoint_every_k must be >= 1 with gradient checkpointing, got {every_k}")
        x = self.encoder(x, cu_seqlens, int(max_seqlen), rope, checkpoint_every_k=every_k)  # (P, D)
        return merge_patches(x, grid_hws)  # (P // 4, 4, D)
