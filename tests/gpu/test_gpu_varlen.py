"""GPU backends of varlen_attention == sdpa_varlen (skipped without CUDA; run by benchmarks/gpu_check.sh).

flash_attn (the flash-attn package, skipped when not installed) and torch_varlen (torch.nn.attention.varlen,
skipped on a torch without it) against the exact per-segment sdpa_varlen, forward and backward, bf16 and fp16,
causal and not, tiny-model head dims (q/k 24, v 16), MLA's (q/k 192, v 128) and equal dims (64).

Tolerance: low-precision kernels differ from an fp32 reference by rounding. Each backend's error against sdpa_varlen
run in fp32 on the same (rounded) inputs must be at most twice the error of sdpa_varlen itself in the low precision,
plus a floor of 1e-2 (bf16) / 2e-3 (fp16) of the reference's largest magnitude.
"""

from __future__ import annotations

import copy

import pytest
import torch

from vlmtune.ops.attention import (
    AttentionBackendError,
    flash_attn_available,
    resolve_backend,
    torch_varlen_available,
    varlen_attention,
)

pytestmark = pytest.mark.gpu

SEGMENTS = [1, 37, 128, 5, 300, 1, 64]  # length-1 segments, odd lengths, one longer than a kernel tile
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DIMS = {"tiny_mla": (4, 24, 16), "a3b_mla": (2, 192, 128), "equal": (4, 64, 64)}


def _skip_unless(backend: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if backend == "flash_attn" and not flash_attn_available():
        pytest.skip("flash-attn is not installed (pip install vlmtune[gpu])")
    if backend == "torch_varlen" and not torch_varlen_available():
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")


def _cu(lens: list[int], device: torch.device | str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _run(backend: str, q, k, v, cu, causal: bool, grad: torch.Tensor) -> list[torch.Tensor]:
    """Output and (dq, dk, dv) in fp32."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = varlen_attention(q, k, v, cu, cu, max(SEGMENTS), max(SEGMENTS), causal, q.shape[-1] ** -0.5,
                           backend=backend)
    assert out.dtype == v.dtype and out.shape == v.shape
    out.backward(grad.to(out.dtype))
    return [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]


def compare_backend(backend: str, dtype: torch.dtype, causal: bool, dims: tuple[int, int, int],
                    device: str = "cuda", reference: str = "sdpa_varlen") -> dict[str, float]:
    """Errors of ``backend`` and of the low-precision ``reference`` against the fp32 reference; asserts the bound."""
    heads, dqk, dv = dims
    n = sum(SEGMENTS)
    g = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(n, heads, dqk, generator=g, device=device).to(dtype) for _ in "qk")
    v = torch.randn(n, heads, dv, generator=g, device=device).to(dtype)
    grad = torch.randn(n, heads, dv, generator=g, device=device)
    cu = _cu(SEGMENTS, device)
    exact = _run(reference, q.float(), k.float(), v.float(), cu, causal, grad)  # same rounded inputs, fp32 maths
    low_ref = _run(reference, q, k, v, cu, causal, grad)
    test = _run(backend, q, k, v, cu, causal, grad)
    errors = {}
    for name, e, r, t in zip(("out", "dq", "dk", "dv"), exact, low_ref, test):
        err_test = float((t - e).abs().max())
        err_ref = float((r - e).abs().max())
        bound = 2 * err_ref + FLOOR[dtype] * float(e.abs().max())
        errors[name] = err_test
        assert torch.isfinite(t).all(), f"{backend} {name} has non-finite values"
        assert err_test <= bound, f"{backend} {name}: max error {err_test:.3g} > bound {bound:.3g} ({reference} in " \
                                  f"{dtype}: {err_ref:.3g})"
    return errors


@pytest.mark.parametrize("dims", list(DIMS.values()), ids=list(DIMS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_backend_matches_sdpa_varlen(backend: str, dtype: torch.dtype, causal: bool,
                                         dims: tuple[int, int, int]) -> None:
    _skip_unless(backend)
    compare_backend(backend, dtype, causal, dims)


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_backend_keeps_segments_apart(backend: str) -> None:
    # Changing one segment's q/k/v leaves every other segment's output bit-identical.
    _skip_unless(backend)
    heads, dqk, dv = DIMS["tiny_mla"]
    n = sum(SEGMENTS)
    cu = _cu(SEGMENTS, "cuda")
    q, k = (torch.randn(n, heads, dqk, device="cuda", dtype=torch.bfloat16) for _ in "qk")
    v = torch.randn(n, heads, dv, device="cuda", dtype=torch.bfloat16)
    out = varlen_attention(q, k, v, cu, cu, max(SEGMENTS), max(SEGMENTS), True, 0.2, backend=backend)
    victim = slice(38, 166)  # segment 2 (128 tokens)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[victim] = torch.randn_like(x[victim])
    out2 = varlen_attention(q2, k2, v2, cu, cu, max(SEGMENTS), max(SEGMENTS), True, 0.2, backend=backend)
    others = torch.ones(n, dtype=torch.bool, device="cuda")
    others[victim] = False
    assert torch.equal(out[others], out2[others])
    assert not torch.equal(out[victim], out2[victim])


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_backend_makes_no_host_sync(backend: str) -> None:
    # Issue item 3: max_seqlen comes from the host, cu_seqlens stays on the device: no sync in forward or backward.
    _skip_unless(backend)
    heads, dqk, dv = DIMS["a3b_mla"]
    n = sum(SEGMENTS)
    cu = _cu(SEGMENTS, "cuda")
    q, k = (torch.randn(n, heads, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qk")
    v = torch.randn(n, heads, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(n, heads, dv, device="cuda", dtype=torch.bfloat16)
    varlen_attention(q, k, v, cu, cu, max(SEGMENTS), max(SEGMENTS), True, 0.1, backend=backend).backward(grad)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = varlen_attention(q, k, v, cu, cu, max(SEGMENTS), max(SEGMENTS), True, 0.1, backend=backend)
        out.backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_backend_refuses_fp32_with_the_fix(backend: str) -> None:
    _skip_unless(backend)
    q = torch.randn(5, 2, 16, device="cuda")
    cu = _cu([2, 3], "cuda")
    with pytest.raises(AttentionBackendError, match="fp16/bf16 only.*sdpa_varlen"):
        varlen_attention(q, q, q, cu, cu, 3, 3, True, 0.25, backend=backend)


def test_gpu_auto_backend() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    want = "flash_attn" if flash_attn_available() else "torch_varlen" if torch_varlen_available() else "sdpa_varlen"
    assert resolve_backend("auto", "cuda") == want


def compare_model(backend: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """The tiny VLM (all layers dense: no routing flip between backends) patched with ``backend`` vs sdpa_varlen.

    Packed call (three samples, images), logits and every parameter gradient; same bound as the op test, on norms.
    """
    from vlmtune.data.batch import SampleTensors
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration, kimi_vl_tiny

    cfg = kimi_vl_tiny(first_k_dense_replace=3)
    torch.manual_seed(0)
    base = KimiVLForConditionalGeneration(cfg).to(device)
    ph = cfg.media_placeholder_token_id
    g = torch.Generator().manual_seed(1)
    samples = []
    for sid, (length, grids) in enumerate([(40, [(4, 6)]), (17, []), (90, [(8, 8), (2, 4)])]):
        ids = torch.randint(0, 1700, (length,), generator=g)
        n_img = sum(h * w // 4 for h, w in grids)
        ids[2:2 + n_img] = ph
        mask = torch.zeros(length, dtype=torch.bool)
        mask[2 + n_img + 1:] = True
        pv = torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=g) if grids else None
        samples.append(SampleTensors(ids, mask, pv, torch.tensor(grids) if grids else None, sid))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        results = _model_runs(base, samples, backend, device, dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    exact = results["exact"]
    errors = {}
    for i, what in ((0, "logits"), (2, "grads")):
        err_test = float((results["test"][i] - exact[i]).norm())
        err_ref = float((results["low_ref"][i] - exact[i]).norm())
        bound = 2 * err_ref + FLOOR[dtype] * float(exact[i].norm())
        errors[what] = err_test / float(exact[i].norm())
        assert err_test <= bound, f"model {what} with {backend}: error {err_test:.3g} > bound {bound:.3g}"
    assert abs(results["test"][1] - exact[1]) <= 2 * abs(results["low_ref"][1] - exact[1]) + FLOOR[dtype] * exact[1]
    return errors


def _model_runs(base, samples, backend: str, device: str, dtype: torch.dtype) -> dict[str, tuple]:
    """(logits, loss, flat gradient) of the fp32 sdpa_varlen model, the low-precision one, and ``backend``'s."""
    from vlmtune.data.batch import collate_samples
    from vlmtune.patches.rmpad import apply_rmpad, rmpad_backend

    results = {}
    for name, model_dtype, attn in (("exact", torch.float32, "sdpa_varlen"), ("low_ref", dtype, "sdpa_varlen"),
                                    ("test", dtype, backend)):
        model = apply_rmpad(copy.deepcopy(base).to(dtype=model_dtype), attention=attn)
        assert rmpad_backend(model) == attn
        batch = collate_samples(samples).to(device, dtype=model_dtype)
        out = model(**batch.to_model_inputs())
        out.loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        results[name] = (out.logits.float().detach(), float(out.loss.detach()), grads)
    return results


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_model_packed_call_matches_sdpa_varlen(backend: str) -> None:
    _skip_unless(backend)
    compare_model(backend)
