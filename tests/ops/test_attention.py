"""varlen_attention on CPU: sdpa_varlen == sdpa_masked == a hand-written softmax, forward and backward; backend choice.

The GPU backends (flash_attn, torch_varlen) are compared with sdpa_varlen in tests/gpu/test_gpu_varlen.py.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from vlmtune.ops import attention as attn_mod
from vlmtune.ops.attention import (
    AttentionBackendError,
    _pad_v,
    block_diagonal_mask,
    host_bounds,
    resolve_backend,
    varlen_attention,
)

TOL = {torch.float64: dict(atol=1e-8, rtol=1e-8), torch.float32: dict(atol=1e-5, rtol=1e-5)}
SEGMENTS = [5, 1, 7, 3, 1]  # includes length-1 segments (a sample of one token, a one-token padding segment)
H, DQK, DV = 4, 24, 16  # MLA-like: q/k head dim 24, v head dim 16


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _qkv(n: int, dtype: torch.dtype, dqk: int = DQK, dv: int = DV, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H, d, generator=g, dtype=dtype).requires_grad_(True) for d in (dqk, dqk, dv)]


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], causal: bool,
           scale: float) -> torch.Tensor:
    """Softmax attention written out segment by segment (no SDPA), in fp64."""
    outs, start = [], 0
    for n in lens:
        qi, ki, vi = (x[start:start + n].double() for x in (q, k, v))  # (L, H, D)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * scale  # (H, L, L)
        if causal:
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vi))  # (L, H, Dv)
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_varlen_equals_masked_and_naive_forward_backward(dtype: torch.dtype, causal: bool) -> None:
    cu, n = _cu(SEGMENTS), sum(SEGMENTS)
    scale = DQK**-0.5
    results = {}
    for backend in ("sdpa_varlen", "sdpa_masked", "naive"):
        q, k, v = _qkv(n, dtype)
        if backend == "naive":
            out = _naive(q, k, v, SEGMENTS, causal, scale)
        else:
            out = varlen_attention(q, k, v, cu, cu, max(SEGMENTS), max(SEGMENTS), causal, scale, backend=backend)
            assert out.shape == (n, H, DV) and out.dtype == dtype
        w = torch.randn(n, H, DV, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out.double() * w).sum().backward()
        results[backend] = (out.detach().double(), q.grad.double(), k.grad.double(), v.grad.double())
    for backend in ("sdpa_masked", "naive"):
        for a, b in zip(results["sdpa_varlen"], results[backend]):
            torch.testing.assert_close(a, b, **TOL[dtype])


def test_length_one_segment_attends_only_itself() -> None:
    # A one-token segment's output is exactly its own value row, causal or not.
    cu, n = _cu(SEGMENTS), sum(SEGMENTS)
    q, k, v = _qkv(n, torch.float64)
    for causal in (True, False):
        out = varlen_attention(q, k, v, cu, cu, 7, 7, causal, 0.3, backend="sdpa_varlen")
        for pos in (5, n - 1):  # the two length-1 segments
            torch.testing.assert_close(out[pos], v[pos].detach(), atol=1e-15, rtol=0)


def test_segments_are_isolated_forward_and_backward() -> None:
    # Perturbing segment 2 changes nothing in the others' outputs, and the others' loss has no gradient into it.
    cu, n = _cu(SEGMENTS), sum(SEGMENTS)
    q, k, v = _qkv(n, torch.float64)
    out = varlen_attention(q, k, v, cu, cu, 7, 7, True, DQK**-0.5)
    seg2 = slice(6, 13)
    others = torch.ones(n, dtype=torch.bool)
    others[seg2] = False
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[seg2] += 1.0
    out2 = varlen_attention(q2, k2, v2, cu, cu, 7, 7, True, DQK**-0.5)
    assert torch.equal(out[others], out2[others])
    out[others].sum().backward()
    for x in (q, k, v):
        assert torch.count_nonzero(x.grad[seg2]) == 0
        assert torch.count_nonzero(x.grad[others]) > 0


def test_empty_segment_and_causal_first_token() -> None:
    # An empty segment (an all-padding row of a padded call) is skipped; a causal segment's first token sees itself.
    lens = [3, 0, 4]
    cu, n = _cu(lens), 7
    q, k, v = _qkv(n, torch.float64)
    out = varlen_attention(q, k, v, cu, cu, 4, 4, True, 0.5, backend="sdpa_varlen")
    ref = varlen_attention(q, k, v, cu, cu, 4, 4, True, 0.5, backend="sdpa_masked")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(out[0], v[0].detach(), atol=1e-15, rtol=0)
    torch.testing.assert_close(out[3], v[3].detach(), atol=1e-15, rtol=0)


def test_block_diagonal_mask_exact() -> None:
    cu = _cu([2, 1, 3])
    causal = block_diagonal_mask(cu, cu, True, torch.device("cpu")).int().tolist()
    assert causal == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]
    full = block_diagonal_mask(cu, cu, False, torch.device("cpu")).int()
    assert full.sum() == 2 * 2 + 1 + 3 * 3 and torch.equal(full, full.t())


def test_cross_lengths_non_causal() -> None:
    # Different query and key segmentations (non-causal): per-segment SDPA == dense masked reference.
    cu_q, cu_k = _cu([2, 3]), _cu([4, 1])
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, H, DQK, generator=g, dtype=torch.float64)
    k = torch.randn(5, H, DQK, generator=g, dtype=torch.float64)
    v = torch.randn(5, H, DV, generator=g, dtype=torch.float64)
    a = varlen_attention(q, k, v, cu_q, cu_k, 3, 4, False, 0.2, backend="sdpa_varlen")
    b = varlen_attention(q, k, v, cu_q, cu_k, 3, 4, False, 0.2, backend="sdpa_masked")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_zero_padded_v_matches_unpadded() -> None:
    # The flash backends pad MLA's v (Dv < Dh) with zeros to Dh and slice the output: same numbers as unpadded v
    # (up to summation order: the kernel blocks by head dim).
    cu, n = _cu(SEGMENTS), sum(SEGMENTS)
    q, k, v = (x.detach() for x in _qkv(n, torch.float64))
    vp, dv = _pad_v(q, v)
    assert vp.shape == (n, H, DQK) and dv == DV and torch.count_nonzero(vp[..., DV:]) == 0
    padded = varlen_attention(q, k, vp, cu, cu, 7, 7, True, 0.2)[..., :dv]
    torch.testing.assert_close(padded, varlen_attention(q, k, v, cu, cu, 7, 7, True, 0.2), atol=1e-14, rtol=0)
    same, d_same = _pad_v(q, q)
    assert same is q and d_same == DQK
    with pytest.raises(AttentionBackendError, match="larger than q/k head dim"):
        _pad_v(v, q)


def test_bf16_inputs_keep_dtype_and_track_fp64() -> None:
    cu, n = _cu(SEGMENTS), sum(SEGMENTS)
    q, k, v = (x.detach() for x in _qkv(n, torch.float64))
    ref = varlen_attention(q, k, v, cu, cu, 7, 7, True, 0.2)
    out = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, cu, 7, 7, True, 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_host_bounds_read_once_per_tensor_and_refreshed_on_change() -> None:
    cu = _cu([2, 3])
    assert host_bounds(cu) == [0, 2, 5]
    assert cu._vlmtune_host_bounds[1] == [0, 2, 5]
    cu._vlmtune_host_bounds = (cu._version, [0, 1, 5])  # a cached value is used as long as the tensor is unchanged
    assert host_bounds(cu) == [0, 1, 5]
    cu[1] = 4  # in-place change bumps the version: read again
    assert host_bounds(cu) == [0, 4, 5]


def test_shape_errors_are_clear() -> None:
    cu = _cu([2, 3])
    q, k, v = (x.detach() for x in _qkv(5, torch.float64))
    with pytest.raises(ValueError, match="ends at 5 for 4 queries"):
        varlen_attention(q[:4], k[:4], v[:4], cu, cu, 3, 3, True, 0.2)
    with pytest.raises(ValueError, match=r"packed \(N, H, Dh\)"):
        varlen_attention(q[None], k[None], v[None], cu, cu, 3, 3, True, 0.2)
    with pytest.raises(ValueError, match="disagree"):
        varlen_attention(q, k[..., :8], v, cu, cu, 3, 3, True, 0.2)
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'xformers'"):
        varlen_attention(q, k, v, cu, cu, 3, 3, True, 0.2, backend="xformers")


# ---------------------------------------------------------------------------------------------- backend choice
def test_auto_is_sdpa_varlen_on_cpu_and_logged_once(caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="vlmtune.ops.attention"):
        assert resolve_backend("auto", "cpu") == "sdpa_varlen"
        assert resolve_backend("auto", torch.device("cpu")) == "sdpa_varlen"
        assert resolve_backend("sdpa_masked", "cpu") == "sdpa_masked"
    lines = [r.getMessage() for r in caplog.records if "auto ->" in r.getMessage()]
    assert lines == ["attention backend: auto -> sdpa_varlen (device cpu)"]


def test_auto_on_cuda_prefers_flash_then_torch_varlen_then_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    # Resolution only (no kernel runs): the order documented in the module docstring.
    monkeypatch.setattr(attn_mod, "_LOGGED", set())
    for flash, tv, want in ((True, True, "flash_attn"), (False, True, "torch_varlen"), (False, False, "sdpa_varlen")):
        monkeypatch.setattr(attn_mod, "flash_attn_available", lambda f=flash: f)
        monkeypatch.setattr(attn_mod, "torch_varlen_available", lambda t=tv: t)
        assert resolve_backend("auto", "cuda") == want


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_backends_requested_on_cpu_fail_with_the_fix(backend: str) -> None:
    with pytest.raises(AttentionBackendError, match=f"{backend} needs CUDA; use sdpa_varlen on CPU"):
        resolve_backend(backend, "cpu")


def test_missing_packages_on_cuda_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "flash_attn_available", lambda: False)
    monkeypatch.setattr(attn_mod, "torch_varlen_available", lambda: False)
    with pytest.raises(AttentionBackendError, match=r"pip install vlmtune\[gpu\]`, or set model.attention=torch_varlen"):
        resolve_backend("flash_attn", "cuda")
    with pytest.raises(AttentionBackendError, match="torch >= 2.10"):
        resolve_backend("torch_varlen", "cuda")
    with pytest.raises(AttentionBackendError, match="choose one of auto, flash_attn, torch_varlen, sdpa_varlen"):
        resolve_backend("flash", "cpu")


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_flash_backends_refuse_cpu_tensors_at_call_time(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Even when handed a backend name directly (bypassing resolve_backend), CPU tensors are refused with the fix.
    import sys
    import types

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = lambda *a, **k: pytest.fail("kernel must not be reached")
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    cu = _cu([2, 3])
    q, k, v = (x.detach() for x in _qkv(5, torch.float64))
    with pytest.raises(AttentionBackendError, match=f"{backend} needs CUDA tensors"):
        varlen_attention(q, k, v, cu, cu, 3, 3, True, 0.2, backend=backend)


def _fake_varlen(style: str):
    """A stand-in for torch.nn.attention.varlen.varlen_attn with the signature of one torch release (exact maths)."""

    def compute(query, key, value, cu_q, cu_k, causal, scale):
        return attn_mod._sdpa_varlen(query, key, value, cu_q, cu_k, causal, query.shape[-1] ** -0.5 if scale is None
                                     else scale)

    if style == "torch_2_10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None,
                        scale=None):
            return compute(query, key, value, cu_seq_q, cu_seq_k, is_causal, scale)
    elif style == "window_size":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            assert window_size in ((-1, -1), (-1, 0))
            return compute(query, key, value, cu_seq_q, cu_seq_k, window_size == (-1, 0), scale)
    else:  # no scale argument: the kernel's default 1/sqrt(Dh)
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False):
            return compute(query, key, value, cu_seq_q, cu_seq_k, is_causal, None)
    return varlen_attn


@pytest.mark.parametrize("style", ["torch_2_10", "window_size", "no_scale"])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_varlen_adapts_to_each_signature(style: str, causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU check of the argument mapping only (the kernel itself runs in tests/gpu): causal and the softmax scale
    # reach the kernel under every signature, and MLA's smaller v is padded and sliced back.
    import torch.nn.attention.varlen as tv

    monkeypatch.setattr(tv, "varlen_attn", _fake_varlen(style))
    monkeypatch.setattr(attn_mod, "_check_half", lambda backend, q: None)
    attn_mod._torch_varlen_params.cache_clear()
    try:
        cu, n = _cu(SEGMENTS), sum(SEGMENTS)
        q, k, v = (x.detach() for x in _qkv(n, torch.float64))
        out = varlen_attention(q, k, v, cu, cu, 7, 7, causal, 0.3, backend="torch_varlen")
        ref = varlen_attention(q, k, v, cu, cu, 7, 7, causal, 0.3, backend="sdpa_varlen")
    finally:
        attn_mod._torch_varlen_params.cache_clear()
    assert out.shape == (n, H, DV)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
