"""Kimi-VL image processor: native-resolution resize / pad, normalisation, row-major 14x14 patches.

Reproduces ``KimiVLImageProcessor`` of the published ``image_processing_kimi_vl.py`` (Kimi-VL-A3B remote code; the
MLX and NeMo ports follow the same steps), reimplemented with PIL + torch (no torchvision):

1. If ``(W // 14) * (H // 14) > in_token_limit``: scale = sqrt(in_token_limit / ((W // 14) * (H // 14))), resize to
   ``(int(W * scale), int(H * scale))`` with PIL bicubic, in the image's own mode.
2. ``pad_input`` true: pad right / bottom with zeros (black) to multiples of merge*patch = 28 px (torchvision's
   ``TF.pad`` on the PIL image). ``pad_input`` false: centre-crop (torchvision ``center_crop`` offsets, i.e.
   ``int(round(diff / 2))``) to multiples of 28 px. The reference crops to multiples of 14 px, which leaves an odd
   grid whenever a side holds an odd number of patches; the 2x2 patch merger cannot take such a grid (the original
   model fails on it), so we crop to 28 px: identical wherever the reference works.
3. A side of >= 512 patches is refused (MoonViT's RoPE table is 512x512); here as ``ImageSizeError`` before
   any pixel is touched, together with images smaller than ``min_image_side``.
4. ``image.convert("RGB")`` (after resizing and padding, as the reference: an alpha channel is dropped, not
   composited; "P" images are resized with nearest (PIL's rule for palette images) and padded with palette
   index 0; "L" images are replicated to three channels), to [0, 1] float32, ``(x - mean) / std``, then
   patchify row-major to ``(h*w, 3, 14, 14)``.

The geometry (steps 1-3) is one function, ``KimiVLImageProcessor.geometry``, used both by ``__call__`` and by
``grid_hw`` / ``num_image_tokens``, so the token count of an image is known from its header size alone and is
exactly what processing gives: ``(h/2) * (w/2)`` LM tokens for an ``h x w`` patch grid.

Example (Kimi-VL-A3B, in_token_limit 4096, pad_input true): 1024x1024 -> 897x897 -> padded 924x924 -> 66x66
patches -> 1089 LM tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

CONFIG_FILE = "preprocessor_config.json"
# The reference code's defaults (used for fields a preprocessor_config.json leaves out).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULTS: dict[str, Any] = {
    "patch_size": 14,
    "pad_input": False,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "in_token_limit": 4096,
    "merge_kernel_size": [2, 2],
}
MAX_GRID_SIDE = 512  # patches per side refused from here on (reference: ``w // patch_size >= 512`` -> "Exceed pos emb")
DEFAULT_MIN_IMAGE_SIDE = 14


class ImageSizeError(ValueError):
    """An image the processor refuses: too small, or a patch grid side reaching MAX_GRID_SIDE."""


@dataclass(frozen=True)
class ImageGeometry:
    """Where an image of a given size goes, in pixels (width, height) and patches (h, w).

    Attributes:
        size: the original (width, height).
        resized: (width, height) after the in_token_limit resize (== size when none is needed).
        final: (width, height) after padding or cropping: multiples of merge*patch.
        crop_box: (left, top, right, bottom) on the resized image when cropping (pad_input false), else None.
        grid_hw: (h, w) patches of ``final``; both even.
    """

    size: tuple[int, int]
    resized: tuple[int, int]
    final: tuple[int, int]
    crop_box: tuple[int, int, int, int] | None
    grid_hw: tuple[int, int]

    @property
    def num_patches(self) -> int:
        """h * w vision patches."""
        return self.grid_hw[0] * self.grid_hw[1]


def grid_tokens(grid_hw: Sequence[int], merge_kernel_size: Sequence[int]) -> int:
    """LM placeholder tokens of an image of ``(h, w)`` patches: the patch merger makes (h / kh) * (w / kw) of them."""
    h, w = (int(x) for x in grid_hw)
    kh, kw = merge_kernel_size
    return (h // kh) * (w // kw)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{name} must be 3 numbers (R, G, B), got {value!r}")
    try:
        return (float(value[0]), float(value[1]), float(value[2]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be 3 numbers (R, G, B), got {value!r}") from err


class KimiVLImageProcessor:
    """Turns PIL images into MoonViT patches.

    Args:
        patch_size: patch side in pixels (14).
        pad_input: pad to multiples of merge*patch (Kimi-VL-A3B: true) instead of centre-cropping.
        image_mean: per-channel mean subtracted after scaling to [0, 1].
        image_std: per-channel std divided by.
        in_token_limit: images with more than this many (W // 14) * (H // 14) patches are scaled down first.
        merge_kernel_size: (kh, kw) of the patch merger; sides are padded / cropped to multiples of k * patch.
        min_image_side: images with a side below this many pixels raise ImageSizeError.
        extra: other fields of preprocessor_config.json, kept and written back.
    """

    def __init__(
        self,
        patch_size: int = 14,
        pad_input: bool = False,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        in_token_limit: int = 4096,
        merge_kernel_size: Sequence[int] = (2, 2),
        min_image_side: int = DEFAULT_MIN_IMAGE_SIDE,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.patch_size = _positive_int(patch_size, "patch_size")
        if not isinstance(pad_input, bool):
            raise ValueError(f"pad_input must be true or false, got {pad_input!r}")
        self.pad_input = pad_input
        self.image_mean = _triple(image_mean, "image_mean")
        self.image_std = _triple(image_std, "image_std")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        self.in_token_limit = _positive_int(in_token_limit, "in_token_limit")
        if not isinstance(merge_kernel_size, (list, tuple)) or len(merge_kernel_size) != 2:
            raise ValueError(f"merge_kernel_size must be [kh, kw], got {merge_kernel_size!r}")
        self.merge_kernel_size = (
            _positive_int(merge_kernel_size[0], "merge_kernel_size[0]"),
            _positive_int(merge_kernel_size[1], "merge_kernel_size[1]"),
        )
        self.min_image_side = _positive_int(min_image_side, "min_image_side")
        self.extra: dict[str, Any] = dict(extra or {})
        self.defaults_applied: tuple[str, ...] = ()  # fields from_pretrained took from DEFAULTS

    # ---------------------------------------------------------------------------------------- construction
    @classmethod
    def kimi_vl_a3b(cls, **overrides: Any) -> KimiVLImageProcessor:
        """Kimi-VL-A3B's published preprocessor_config.json values (in_token_limit 4096, pad_input true,
        mean = std = 0.5)."""
        kwargs: dict[str, Any] = dict(
            patch_size=14, pad_input=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
            in_token_limit=4096, merge_kernel_size=(2, 2),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: Path | str) -> KimiVLImageProcessor:
        """Reads ``preprocessor_config.json`` from a model folder (or the file itself).

        Absent fields take the reference code's defaults (``DEFAULTS``; listed in ``defaults_applied``);
        unknown fields are kept in ``extra`` and written back by ``save_pretrained``.

        Raises:
            FileNotFoundError: no preprocessor_config.json.
            ValueError: a field of the wrong type or range (the message names the file and field).
        """
        file = Path(path)
        if file.is_dir():
            file = file / CONFIG_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found; write one with KimiVLImageProcessor.kimi_vl_a3b().save_pretrained(<model dir>)"
            )
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object")
        known = {**DEFAULTS, "min_image_side": DEFAULT_MIN_IMAGE_SIDE}
        kwargs = {key: data.get(key, default) for key, default in known.items()}
        extra = {key: value for key, value in data.items() if key not in known}
        try:
            processor = cls(**kwargs, extra=extra)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from err
        processor.defaults_applied = tuple(key for key in DEFAULTS if key not in data)
        return processor

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json content (extra fields first, then ours)."""
        out = dict(self.extra)
        out.setdefault("image_processor_type", "KimiVLImageProcessor")
        out.update(
            patch_size=self.patch_size,
            pad_input=self.pad_input,
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
            in_token_limit=self.in_token_limit,
            merge_kernel_size=list(self.merge_kernel_size),
            min_image_side=self.min_image_side,
        )
        return out

    def save_pretrained(self, path: Path | str) -> Path:
        """Writes ``preprocessor_config.json`` into the folder ``path``; returns the file."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / CONFIG_FILE
        file.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return file

    # -------------------------------------------------------------------------------------------- geometry
    def geometry(self, width: int, height: int) -> ImageGeometry:
        """Resize / pad / crop plan of a ``width x height`` image, from its size alone (shared with __call__).

        Raises:
            ImageSizeError: a side below ``min_image_side``, a crop that leaves nothing, or a patch-grid side
                reaching MAX_GRID_SIDE.
        """
        width, height = int(width), int(height)
        p = self.patch_size
        kh, kw = self.merge_kernel_size
        if min(width, height) < self.min_image_side:
            raise ImageSizeError(
                f"image {width}x{height} is too small: each side must be at least min_image_side="
                f"{self.min_image_side} px"
            )
        coarse = (width // p) * (height // p)
        new_w, new_h = width, height
        if coarse > self.in_token_limit:
            # Reference arithmetic, float for float: scale = sqrt(limit / n), new side = int(side * scale).
            scale = math.sqrt(self.in_token_limit / coarse)
            new_w, new_h = int(width * scale), int(height * scale)
            if min(new_w, new_h) < 1:
                raise ImageSizeError(
                    f"image {width}x{height} is too elongated: scaling it to in_token_limit={self.in_token_limit} "
                    f"patches gives {new_w}x{new_h} px"
                )
        block_w, block_h = kw * p, kh * p
        if self.pad_input:
            final_w = math.ceil(new_w / block_w) * block_w
            final_h = math.ceil(new_h / block_h) * block_h
            crop_box = None
        else:
            final_w = new_w - new_w % block_w
            final_h = new_h - new_h % block_h
            if final_w == 0 or final_h == 0:
                raise ImageSizeError(
                    f"image {width}x{height} (resized {new_w}x{new_h}) is smaller than one {block_w}x{block_h} px "
                    f"merge block, so centre-cropping (pad_input false) leaves nothing; use pad_input true"
                )
            # torchvision center_crop offsets: int(round((size - crop) / 2)), Python's round-half-to-even.
            left = int(round((new_w - final_w) / 2.0))
            top = int(round((new_h - final_h) / 2.0))
            crop_box = (left, top, left + final_w, top + final_h)
        grid_h, grid_w = final_h // p, final_w // p
        if grid_h >= MAX_GRID_SIDE or grid_w >= MAX_GRID_SIDE:
            raise ImageSizeError(
                f"image {width}x{height} becomes {final_w}x{final_h} px = {grid_h}x{grid_w} patches; MoonViT takes "
                f"fewer than {MAX_GRID_SIDE} patches per side (at most {(MAX_GRID_SIDE - 1) // kw * kw * p} px "
                f"after padding); resize or split the image (in_token_limit bounds the patch count, not the aspect ratio)"
            )
        return ImageGeometry(
            size=(width, height), resized=(new_w, new_h), final=(final_w, final_h), crop_box=crop_box,
            grid_hw=(grid_h, grid_w),
        )

    def grid_hw(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) patch grid of a ``width x height`` image (raises ImageSizeError as ``geometry``)."""
        return self.geometry(width, height).grid_hw

    def num_image_tokens(self, width: int, height: int) -> int:
        """LM placeholder tokens of a ``width x height`` image: (h / kh) * (w / kw), e.g. 1024x1024 -> 1089."""
        return grid_tokens(self.grid_hw(width, height), self.merge_kernel_size)

    # ---------------------------------------------------------------------------------------------- pixels
    def process_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (patches (h*w, 3, p, p) float32, (h, w))."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        geo = self.geometry(*image.size)
        if geo.resized != geo.size:
            image = image.resize(geo.resized, Image.Resampling.BICUBIC)
        if geo.crop_box is not None:
            if geo.crop_box != (0, 0, *geo.resized):
                image = image.crop(geo.crop_box)
        elif geo.final != geo.resized:
            pad_w, pad_h = geo.final[0] - geo.resized[0], geo.final[1] - geo.resized[1]
            image = ImageOps.expand(image, border=(0, 0, pad_w, pad_h), fill=0)
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(torch.float32).div(255)  # (3, H, W), as TF.to_tensor
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        x = x.sub(mean).div(std)  # as TF.normalize
        p = self.patch_size
        h, w = geo.grid_hw
        patches = x.view(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, 3, p, p)  # (3, H, W) -> (P, 3, p, p)
        return patches, (h, w)

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Images -> MoonViT inputs.

        Args:
            images: PIL images (any mode; converted as the reference does).

        Returns:
            ``pixel_values`` (P, 3, p, p) float32, patches row-major per image, images concatenated in order;
            ``image_grid_hws`` (I, 2) int64, (h, w) per image.

        Raises:
            ImageSizeError: an image too small or too large (the message names its size and the limit).
        """
        if isinstance(images, Image.Image):
            raise TypeError("pass a list of images (got a single PIL image); e.g. processor([image])")
        patches: list[torch.Tensor] = []
        grids: list[tuple[int, int]] = []
        for k, image in enumerate(images):
            try:
                pixel_patches, grid = self.process_image(image)
            except ImageSizeError as err:
                raise ImageSizeError(f"images[{k}]: {err}") from err
            patches.append(pixel_patches)
            grids.append(grid)
        p = self.patch_size
        pixel_values = torch.cat(patches) if patches else torch.zeros(0, 3, p, p)  # (P, 3, p, p)
        image_grid_hws = torch.tensor(grids, dtype=torch.int64).view(-1, 2)  # (I, 2)
        return {"pixel_values": pixel_values, "image_grid_hws": image_grid_hws}

    def __repr__(self) -> str:
        return (
            f"KimiVLImageProcessor(patch_size={self.patch_size}, pad_input={self.pad_input}, "
            f"in_token_limit={self.in_token_limit}, merge_kernel_size={list(self.merge_kernel_size)}, "
            f"image_mean={list(self.image_mean)}, image_std={list(self.image_std)}, "
            f"min_image_side={self.min_image_side})"
        )
