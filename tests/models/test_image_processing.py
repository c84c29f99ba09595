"""KimiVLImageProcessor: geometry == real processing, the documented example, limits, patch layout, normalisation,
image modes, config round trip."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtune.models.kimi_vl.image_processing import (
    DEFAULTS,
    MAX_GRID_SIDE,
    OPENAI_CLIP_MEAN,
    ImageSizeError,
    KimiVLImageProcessor,
)

P = 14


def _published_final_size(w: int, h: int, limit: int, pad: bool) -> tuple[int, int] | None:
    """Final (W, H) by the published processor's steps, written out from its description
    (image_processing_kimi_vl.py ``rescale``); None where it raises "Exceed pos emb".

    Crop mode follows the reference's crop to multiples of 14 px; the caller compares only where that gives an
    even grid (elsewhere the reference model cannot merge the patches).
    """
    if (w // P) * (h // P) > limit:
        scale = math.sqrt(limit / ((w // P) * (h // P)))
        w, h = int(w * scale), int(h * scale)
    if pad:
        w, h = w + (28 - w % 28) % 28, h + (28 - h % 28) % 28
    else:
        w, h = w - w % P, h - h % P
    if w // P >= 512 or h // P >= 512:
        return None
    return w, h


def _random_sizes(n: int, seed: int, lo: float = 14, hi: float = 30000) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        w = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if rng.random() < 0.3:  # near-square
            h = max(int(lo), int(w * rng.uniform(0.8, 1.25)))
        else:
            h = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        sizes.append((w, h))
    return sizes


# ------------------------------------------------------------------------------------------- the documented example


def test_documented_example_1024_square() -> None:
    proc = KimiVLImageProcessor.kimi_vl_a3b()
    geo = proc.geometry(1024, 1024)
    assert geo.resized == (897, 897)
    assert geo.final == (924, 924)
    assert geo.grid_hw == (66, 66)
    assert proc.num_image_tokens(1024, 1024) == 1089
    out = proc([Image.new("RGB", (1024, 1024), (10, 20, 30))])
    assert out["pixel_values"].shape == (66 * 66, 3, 14, 14)
    assert out["pixel_values"].dtype == torch.float32
    assert out["image_grid_hws"].tolist() == [[66, 66]]
    assert out["image_grid_hws"].dtype == torch.int64


@pytest.mark.parametrize(
    "size, resized, grid, tokens",
    [
        ((2000, 1000), (1274, 637), (46, 92), 1058),  # 142*71 = 10082 > 4096: scale sqrt(4096/10082)
        ((3000, 200), (3000, 200), (16, 216), 864),  # 214*14 = 2996 <= 4096: no resize, pad 3024x224
        ((5000, 5000), (896, 896), (64, 64), 1024),  # 357^2 = 127449: scale 0.17927...
        ((7140, 14), (7140, 14), (2, 510), 255),  # widest strip that fits: 510 patches
        ((448, 448), (448, 448), (32, 32), 256),  # 32*32 = 1024 <= 4096, already a multiple of 28
    ],
)
def test_hand_checked_sizes(size, resized, grid, tokens) -> None:
    proc = KimiVLImageProcessor.kimi_vl_a3b()
    geo = proc.geometry(*size)
    assert geo.resized == resized
    assert geo.grid_hw == grid
    assert proc.num_image_tokens(*size) == tokens
    out = proc([Image.new("RGB", size, (200, 100, 50))])
    assert out["image_grid_hws"].tolist() == [list(grid)]
    assert out["pixel_values"].shape[0] == grid[0] * grid[1]


# ---------------------------------------------------------------------------------- size -> tokens, many sizes


@pytest.mark.parametrize("limit, pad", [(4096, True), (16384, True), (4096, False), (64, True)])
def test_num_image_tokens_equals_published_geometry_5000_sizes(limit: int, pad: bool) -> None:
    proc = KimiVLImageProcessor(in_token_limit=limit, pad_input=pad)
    checked = refused = 0
    for w, h in _random_sizes(5000, seed=limit + pad):
        expected = _published_final_size(w, h, limit, pad)
        if expected is not None and not pad and ((expected[0] // P) % 2 or (expected[1] // P) % 2):
            # Odd grid: the reference model fails in its merger; we crop to 28 px instead.
            if min(expected) < 28:
                with pytest.raises(ImageSizeError, match="merge block"):
                    proc.geometry(w, h)
            else:
                fw, fh = proc.geometry(w, h).final
                assert (fw, fh) == (expected[0] - expected[0] % 28, expected[1] - expected[1] % 28)
            checked += 1
            continue
        if expected is None:
            with pytest.raises(ImageSizeError, match=f"{w}x{h}"):
                proc.num_image_tokens(w, h)
            refused += 1
            continue
        geo = proc.geometry(w, h)
        assert geo.final == expected, (w, h)
        assert geo.grid_hw == (expected[1] // P, expected[0] // P)
        assert proc.num_image_tokens(w, h) == (expected[0] // 28) * (expected[1] // 28)
        # Resized exactly when the coarse patch count passes the limit.
        assert (geo.resized != (w, h)) == ((w // P) * (h // P) > limit)
        checked += 1
    assert checked > 3000
    if limit >= 4096:
        assert refused > 50  # the 512-patch refusal really exercised (a small limit scales everything down)


@pytest.mark.parametrize("pad", [True, False])
def test_real_processing_matches_geometry_300_sizes(pad: bool) -> None:
    """Full pixel processing (PIL resize, pad / crop, patchify) on 300 sizes, most of them past in_token_limit."""
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    proc = KimiVLImageProcessor(in_token_limit=48, pad_input=pad, image_mean=mean, image_std=std)
    resized_count = 0
    for w, h in _random_sizes(300, seed=7 + pad, lo=28, hi=500):
        image = Image.new("RGB", (w, h), (200, 150, 100))
        try:
            geo = proc.geometry(w, h)
        except ImageSizeError:  # crop mode: a side below one 28 px merge block after resizing
            assert not pad
            with pytest.raises(ImageSizeError, match=f"{w}x{h}"):
                proc([image])
            continue
        resized_count += geo.resized != geo.size
        # The geometry's resize target is what PIL produces.
        assert image.resize(geo.resized, Image.Resampling.BICUBIC).size == geo.resized
        out = proc([image])
        gh, gw = out["image_grid_hws"][0].tolist()
        assert (gh, gw) == geo.grid_hw == proc.grid_hw(w, h)
        assert proc.num_image_tokens(w, h) == (gh // 2) * (gw // 2)
        pixels = out["pixel_values"]
        assert pixels.shape == (gh * gw, 3, P, P)
        # Rebuild the image from its patches: the coloured area is exactly the resized image (pad) or the
        # whole crop, the rest is zero padding.
        img = pixels.view(gh, gw, 3, P, P).permute(2, 0, 3, 1, 4).reshape(3, gh * P, gw * P)  # (3, H, W)
        red = img[0] * 255
        coloured = torch.isclose(red, torch.tensor(200.0), atol=1e-3)
        if pad:
            rw, rh = geo.resized
            assert int(coloured.sum()) == rw * rh
            assert bool(coloured[:rh, :rw].all())
        else:
            assert bool(coloured.all())
    assert resized_count > 150


def test_extreme_aspect_ratios() -> None:
    proc = KimiVLImageProcessor.kimi_vl_a3b()
    assert proc.grid_hw(7140, 14) == (2, 510)
    assert proc.grid_hw(14, 7140) == (510, 2)
    for size in [(7141, 14), (14, 7141), (100_000, 100), (100, 100_000)]:
        with pytest.raises(ImageSizeError, match=f"{size[0]}x{size[1]}") as err:
            proc.grid_hw(*size)
        assert str(MAX_GRID_SIDE) in str(err.value)
    # A long strip past in_token_limit is scaled down, then still refused for its aspect ratio.
    with pytest.raises(ImageSizeError, match="patches per side"):
        proc([Image.new("RGB", (40_000, 60))])


def test_too_small_images() -> None:
    proc = KimiVLImageProcessor.kimi_vl_a3b()
    assert isinstance(ImageSizeError("x"), ValueError)
    with pytest.raises(ImageSizeError, match="13x100.*min_image_side=14"):
        proc.grid_hw(13, 100)
    assert proc.grid_hw(14, 14) == (2, 2)  # padded to one 28x28 merge block
    strict = KimiVLImageProcessor.kimi_vl_a3b(min_image_side=32)
    with pytest.raises(ImageSizeError, match="min_image_side=32"):
        strict.num_image_tokens(31, 500)
    assert strict.num_image_tokens(32, 500) == 2 * 18
    with pytest.raises(ImageSizeError, match=r"images\[1\]: image 10x10"):
        proc([Image.new("RGB", (50, 50)), Image.new("RGB", (10, 10))])
    crop = KimiVLImageProcessor(pad_input=False)
    with pytest.raises(ImageSizeError, match="merge block"):
        crop.grid_hw(27, 300)


# ------------------------------------------------------------------------------------------------- pixel content


def _coordinate_image(w: int, h: int) -> np.ndarray:
    """(H, W, 3) uint8 whose pixel (y, x) is (x % 256, y % 256, (3x + 5y) % 256)."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs % 256, ys % 256, (3 * xs + 5 * ys) % 256], axis=-1).astype(np.uint8)


def test_patch_layout_row_major_with_padding() -> None:
    proc = KimiVLImageProcessor(pad_input=True, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    w, h = 70, 56  # pads to 84 x 56 -> 4 x 6 patches
    arr = _coordinate_image(w, h)
    out = proc([Image.fromarray(arr)])
    assert out["image_grid_hws"].tolist() == [[4, 6]]
    padded = np.zeros((56, 84, 3), dtype=np.uint8)
    padded[:h, :w] = arr
    pixels = out["pixel_values"]
    for r in range(4):
        for c in range(6):
            block = padded[r * P : (r + 1) * P, c * P : (c + 1) * P]  # (14, 14, 3)
            expected = torch.from_numpy(block.copy()).permute(2, 0, 1).float() / 255
            assert torch.equal(pixels[r * 6 + c], expected), (r, c)
    assert float(pixels[5].abs().sum()) == 0.0  # patch (0, 5) lies wholly in the right padding


@pytest.mark.parametrize("w, h, left, top", [(100, 60, 8, 2), (87, 58, 2, 1), (85, 56, 0, 0), (113, 56, 0, 0)])
def test_centre_crop_offsets(w: int, h: int, left: int, top: int) -> None:
    """pad_input false: crop to multiples of 28 px at torchvision's centre_crop offsets (round half to even)."""
    proc = KimiVLImageProcessor(pad_input=False, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    arr = _coordinate_image(w, h)
    geo = proc.geometry(w, h)
    fw, fh = geo.final
    assert geo.crop_box == (left, top, left + fw, top + fh)
    out = proc([Image.fromarray(arr)])
    gh, gw = out["image_grid_hws"][0].tolist()
    img = out["pixel_values"].view(gh, gw, 3, P, P).permute(0, 3, 1, 4, 2).reshape(fh, fw, 3)  # (H, W, 3)
    expected = torch.from_numpy(arr[top : top + fh, left : left + fw].copy()).float() / 255
    assert torch.equal(img, expected)


def test_normalisation_mean_std() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    proc = KimiVLImageProcessor(pad_input=True, image_mean=mean, image_std=std)
    colour = (10, 128, 250)
    out = proc([Image.new("RGB", (28, 28), colour)])
    pixels = out["pixel_values"].double()
    for ch in range(3):
        expected = (colour[ch] / 255 - mean[ch]) / std[ch]
        torch.testing.assert_close(pixels[:, ch], torch.full_like(pixels[:, ch], expected), rtol=0, atol=1e-6)
    # Padding is black *before* normalisation: (0 - mean) / std.
    out = proc([Image.new("RGB", (14, 28), colour)])
    right_half = out["pixel_values"][1].double()  # patch (0, 1) is all padding
    for ch in range(3):
        assert torch.allclose(right_half[ch], torch.tensor(-mean[ch] / std[ch], dtype=torch.float64), atol=1e-6)


def test_images_are_concatenated_in_order() -> None:
    proc = KimiVLImageProcessor.kimi_vl_a3b()
    images = [Image.fromarray(_coordinate_image(w, h)) for w, h in [(60, 30), (28, 84), (100, 100)]]
    out = proc(images)
    alone = [proc([im]) for im in images]
    assert out["image_grid_hws"].tolist() == [a["image_grid_hws"][0].tolist() for a in alone] == [[4, 6], [6, 2], [8, 8]]
    assert torch.equal(out["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    empty = proc([])
    assert empty["pixel_values"].shape == (0, 3, 14, 14) and empty["image_grid_hws"].shape == (0, 2)
    with pytest.raises(TypeError, match="list of images"):
        proc(images[0])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------- image modes


def test_modes_follow_the_reference() -> None:
    """Resize in the image's own mode, pad, then convert("RGB"), as the published processor."""
    proc = KimiVLImageProcessor(in_token_limit=16, pad_input=True, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(90, 110), dtype=np.uint8)  # 7*6 = 42 > 16 patches: resized
    out_l = proc([Image.fromarray(gray, mode="L")])
    out_rgb = proc([Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))])
    assert torch.equal(out_l["pixel_values"], out_rgb["pixel_values"])  # L == replicated RGB, bit for bit

    # Opaque RGBA == RGB; a transparent pixel keeps its stored colour (alpha dropped, not composited).
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    out = proc([Image.fromarray(rgba, mode="RGBA")])["pixel_values"]
    assert torch.equal(out[0, :, 0, 0] * 255, torch.tensor([200.0, 100.0, 50.0]))

    # Palette image: colours from the palette; padding is palette index 0 (TF.pad on a "P" image).
    pal = Image.new("P", (20, 28), 1)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # index 0 red, index 1 blue
    out = proc([pal])["pixel_values"]  # padded to 28 x 28 = 2 x 2 patches
    img = out.view(2, 2, 3, P, P).permute(2, 0, 3, 1, 4).reshape(3, 28, 28) * 255
    assert torch.equal(img[:, :, :20], torch.tensor([0.0, 0.0, 255.0]).view(3, 1, 1).expand(3, 28, 20))
    assert torch.equal(img[:, :, 20:], torch.tensor([255.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 28, 8))


# ------------------------------------------------------------------------------------------------- config file IO


def test_from_pretrained_published_config_and_round_trip(tmp_path) -> None:
    published = {
        "auto_map": {"AutoImageProcessor": "image_processing_kimi_vl.KimiVLImageProcessor"},
        "image_processor_type": "KimiVLImageProcessor",
        "in_token_limit": 4096,
        "pad_input": True,
        "patch_size": 14,
        "num_pooled_tokens": 1024,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(published))
    proc = KimiVLImageProcessor.from_pretrained(tmp_path)
    assert proc.in_token_limit == 4096 and proc.pad_input is True and proc.patch_size == 14
    assert proc.image_mean == (0.5, 0.5, 0.5) and proc.image_std == (0.5, 0.5, 0.5)
    assert proc.merge_kernel_size == (2, 2) and proc.min_image_side == 14
    assert proc.defaults_applied == ("merge_kernel_size",)
    assert proc.extra["num_pooled_tokens"] == 1024 and "auto_map" in proc.extra
    assert proc.num_image_tokens(1024, 1024) == 1089

    out_dir = tmp_path / "saved"
    proc.save_pretrained(out_dir)
    saved = json.loads((out_dir / "preprocessor_config.json").read_text())
    assert {k: saved[k] for k in published} == published  # every published field written back unchanged
    again = KimiVLImageProcessor.from_pretrained(out_dir)
    assert again.to_dict() == proc.to_dict()
    assert again.defaults_applied == ()


def test_from_pretrained_defaults_and_errors(tmp_path) -> None:
    (tmp_path / "preprocessor_config.json").write_text("{}")
    proc = KimiVLImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json")
    assert proc.image_mean == OPENAI_CLIP_MEAN and proc.pad_input is False and proc.in_token_limit == 4096
    assert set(proc.defaults_applied) == set(DEFAULTS)

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"in_token_limit": "4096"}))
    with pytest.raises(ValueError, match="preprocessor_config.json: in_token_limit must be a positive integer"):
        KimiVLImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.5, 0.0, 0.5]}))
    with pytest.raises(ValueError, match="image_std must be positive"):
        KimiVLImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        KimiVLImageProcessor.from_pretrained(tmp_path / "nowhere")
