"""The Kimi-VL multi-modal projector: merged 2x2 vision patches -> language-model embeddings.

Keys ``multi_modal_projector.{pre_norm,linear_1,linear_2}.{weight,bias}`` (shared/reference/kimi_vl.md). Reproduces
the published ``KimiVLMultiModalProjector`` (vLLM ``kimi_vl.py``): LayerNorm over each sub-patch's D features, the four
sub-patches concatenated to 4D, then Linear(4D, 4D) -> GELU (exact erf) -> Linear(4D, D_text). Test oracle:
transformers' ``Kimi_K25MultimodalProjection`` (``pre_norm``, ``in_proj``, ``out_proj``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import KimiVLConfig
from .vit import LAYER_NORM_EPS, PromotedLayerNorm, init_weights


class KimiVLMultiModalProjector(nn.Module):
    """``multi_modal_projector``: (L, 4, Dv) merged patches -> (L, D) text embeddings (L = P // 4)."""

    def __init__(self, config: KimiVLConfig) -> None:
        super().__init__()
        vc = config.vision_config
        kh, kw = vc.merge_kernel_size
        self.vision_hidden = vc.hidden_size
        self.hidden_size = vc.hidden_size * kh * kw  # 4 * Dv
        self.pre_norm = PromotedLayerNorm(vc.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_1 = nn.Linear(self.hidden_size, self.hidden_size)
        self.linear_2 = nn.Linear(self.hidden_size, config.text_config.hidden_size)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """N(0, std) linear weights, zero biases, LayerNorm ones/zeros; deterministic under ``torch.manual_seed``."""
        init_weights(self, std)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Project merged patches.

        Args:
            image_features: (L, 4, Dv) from :class:`~vlmtune.models.kimi_vl.vit.MoonViT`; cast to this module's dtype.

        Returns:
            (L, D) in this module's dtype.
        """
        if image_features.dim() != 3 or image_features.shape[-1] * image_features.shape[-2] != self.hidden_size:
            raise ValueError(f"KimiVLMultiModalProjector: expected (L, 4, {self.vision_hidden}) merged patches, "
                             f"got {tuple(image_features.shape)}")
        x = image_features.to(self.linear_1.weight.dtype)
        x = self.pre_norm(x).reshape(x.shape[0], self.hidden_size)  # (L, 4, Dv) -> (L, 4*Dv)
        x = F.gelu(self.linear_1(x))  # (L, 4*Dv), exact erf GELU (nn.GELU() in the original)
        return self.linear_2(x)  # (L, D)
