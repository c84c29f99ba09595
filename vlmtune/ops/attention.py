"""One attention entry point for packed (variable-length) sequences.

Every attention call in vlmtune, the decoder's causal MLA and MoonViT's non-causal per-image attention, goes through
:func:`varlen_attention`. The packed layout is the flash-attn one::

    tokens      a0 a1 a2 | b0 b1 | c0 c1 c2 c3        q, k, v: (N, H, Dh), N = 9
    cu_seqlens  0        3       5             9      (S+1,) int32, S = 3 segments
    attention   block-diagonal (and causal inside a block when causal=True): b0 never sees a2.

Backends (chosen explicitly; ``auto`` resolves once and the choice is logged):

* ``flash_attn``   the flash-attn package's ``flash_attn_varlen_func`` (CUDA only, optional ``[gpu]`` extra).
* ``torch_varlen`` PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (flash kernels on CUDA, no extra package;
                   torch >= 2.10, whose ``is_causal=`` later became ``window_size=``: both are handled).
* ``sdpa_varlen``  exact per-segment ``scaled_dot_product_attention``: memory O(sum L_i^2); CPU and GPU, fwd and bwd.
* ``sdpa_masked``  one dense SDPA with an (N, N) block-diagonal mask. O(N^2) memory: a reference for tests only.

``auto`` = flash_attn on CUDA when installed, else torch_varlen on CUDA (when this torch has it), else sdpa_varlen.
The flash backends run fp16/bf16 only, and pad MLA's v (Dv < Dh) with zeros to Dh, slicing the output back.

No device-to-host sync per layer: max_seqlen is a host int from the collator, the flash backends read cu_seqlens on
the device, and ``sdpa_varlen`` reads it to the host once per cu_seqlens tensor (:func:`host_bounds`).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "torch_varlen", "sdpa_varlen", "sdpa_masked")
_LOGGED: set[str] = set()


class AttentionBackendError(RuntimeError):
    """A requested attention backend cannot run here (missing package, wrong device)."""


def flash_attn_available() -> bool:
    """True when the flash-attn package is importable (it is never imported at module load)."""
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    """True when this torch has ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Turn a recipe's attention choice into a concrete backend for ``device``; errors, never silently falls back.

    Args:
        name: one of ``auto`` or :data:`BACKENDS`.
        device: where the attention will run.

    Returns:
        The backend name. ``auto`` is logged once with the reason of the choice.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and flash_attn_available():
            chosen, why = "flash_attn", "CUDA, flash-attn installed"
        elif device.type == "cuda" and torch_varlen_available():
            chosen, why = "torch_varlen", "CUDA, flash-attn not installed, torch has varlen_attn"
        elif device.type == "cuda":
            chosen, why = "sdpa_varlen", (f"CUDA, but neither flash-attn nor torch.nn.attention.varlen (torch "
                                          f"{torch.__version__}): exact per-segment SDPA, slower on long packs")
        else:
            chosen, why = "sdpa_varlen", f"device {device.type}"
        if chosen not in _LOGGED:  # once per process and backend, however many models or calls resolve it
            logger.info("attention backend: auto -> %s (%s)", chosen, why)
            _LOGGED.add(chosen)
        return chosen
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name == "flash_attn":
        if device.type != "cuda":
            raise AttentionBackendError("attention backend flash_attn needs CUDA; use sdpa_varlen on CPU (or auto)")
        if not flash_attn_available():
            raise AttentionBackendError(
                "attention backend flash_attn requested but the flash-attn package is not installed: "
                "`pip install vlmtune[gpu]`, or set model.attention=torch_varlen (PyTorch's own varlen flash kernels)")
    if name == "torch_varlen":
        if device.type != "cuda":
            raise AttentionBackendError("attention backend torch_varlen needs CUDA; use sdpa_varlen on CPU (or auto)")
        if not torch_varlen_available():
            raise AttentionBackendError(
                f"attention backend torch_varlen needs torch.nn.attention.varlen (torch >= 2.10), this is torch "
                f"{torch.__version__}: upgrade torch, install flash-attn (model.attention=flash_attn), or use sdpa_varlen")
    return name


def _sdpa_dtype(x: torch.Tensor) -> torch.dtype:
    # Low-precision softmax on CPU is slow and inexact: compute in at least fp32 there (casts only go up).
    if x.device.type == "cpu":
        return torch.promote_types(x.dtype, torch.float32)
    return x.dtype


def host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens`` as a host list, read once per tensor (cached on it, keyed on its version counter).

    The decoder hands the SAME cu_seqlens tensor to every layer, so on CUDA the per-segment backend pays one
    device-to-host copy per batch, not one per layer (the fused backends never read it on the host).
    """
    cached = getattr(cu_seqlens, "_vlmtune_host_bounds", None)
    if cached is not None and cached[0] == cu_seqlens._version:
        return cached[1]
    bounds = [int(b) for b in cu_seqlens.tolist()]
    try:
        cu_seqlens._vlmtune_host_bounds = (cu_seqlens._version, bounds)
    except (AttributeError, RuntimeError):  # tensors that take no attributes (e.g. under tracing): just no cache
        pass
    return bounds


def _sdpa_varlen(q, k, v, cu_q, cu_k, causal: bool, scale: float) -> torch.Tensor:
    out_dtype = v.dtype
    dt = _sdpa_dtype(q)
    bounds_q = host_bounds(cu_q)
    bounds_k = bounds_q if cu_k is cu_q else host_bounds(cu_k)
    if bounds_q[-1] != q.shape[0] or bounds_k[-1] != k.shape[0] or len(bounds_q) != len(bounds_k):
        raise ValueError(f"varlen_attention: cu_seqlens_q ends at {bounds_q[-1]} for {q.shape[0]} queries, "
                         f"cu_seqlens_k at {bounds_k[-1]} for {k.shape[0]} keys ({len(bounds_q) - 1} vs "
                         f"{len(bounds_k) - 1} segments); they must end at N and describe the same segments")
    outs = []
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if q1 == q0:
            continue
        # 4-D inputs: PyTorch's fused CPU/GPU kernels only accept (B, H, L, Dh); 3-D falls back to the slow math path.
        qi = q[q0:q1].transpose(0, 1).to(dt)[None]  # (1, H, L, Dh)
        ki = k[k0:k1].transpose(0, 1).to(dt)[None]  # (1, H, L, Dh)
        vi = v[k0:k1].transpose(0, 1).to(dt)[None]  # (1, H, L, Dv)
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale)  # (1, H, L, Dv)
        outs.append(oi[0].transpose(0, 1))  # (L, H, Dv)
    if not outs:
        return v.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    return torch.cat(outs, dim=0).to(out_dtype)  # (N, H, Dv)


def block_diagonal_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool, device: torch.device) -> torch.Tensor:
    """(Nq, Nk) boolean mask, True where a query may attend a key (same segment, and causal when asked)."""
    nq, nk = int(cu_q[-1]), int(cu_k[-1])
    seg_q = torch.bucketize(torch.arange(nq, device=device), cu_q[1:].to(device), right=True)  # (Nq,)
    seg_k = torch.bucketize(torch.arange(nk, device=device), cu_k[1:].to(device), right=True)  # (Nk,)
    mask = seg_q[:, None] == seg_k[None, :]
    if causal:
        pos_q = torch.arange(nq, device=device) - cu_q.to(device)[seg_q]
        pos_k = torch.arange(nk, device=device) - cu_k.to(device)[seg_k]
        mask = mask & (pos_k[None, :] <= pos_q[:, None])
    return mask


def _sdpa_masked(q, k, v, cu_q, cu_k, causal: bool, scale: float) -> torch.Tensor:
    dt = _sdpa_dtype(q)
    mask = block_diagonal_mask(cu_q, cu_k, causal, q.device)  # (N, N)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).to(dt)[None], k.transpose(0, 1).to(dt)[None], v.transpose(0, 1).to(dt)[None],
        attn_mask=mask[None, None], scale=scale)  # (1, H, N, Dv)
    return out[0].transpose(0, 1).to(v.dtype)  # (N, H, Dv)


def _pad_v(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, int]:
    # MLA: q/k head dim 192, v head dim 128. Flash kernels want one head dim: pad v with zeros, slice the output.
    dv = v.shape[-1]
    if dv == q.shape[-1]:
        return v, dv
    if dv > q.shape[-1]:
        raise AttentionBackendError(f"v head dim {dv} larger than q/k head dim {q.shape[-1]} is not supported")
    return F.pad(v, (0, q.shape[-1] - dv)), dv


def _check_half(backend: str, q: torch.Tensor) -> None:
    # Flash kernels run fp16/bf16 on CUDA only; say so instead of surfacing a kernel assertion.
    if q.device.type != "cuda":
        raise AttentionBackendError(f"attention backend {backend} needs CUDA tensors, got {q.device}; use sdpa_varlen")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise AttentionBackendError(f"attention backend {backend} runs fp16/bf16 only, got {q.dtype}: train in bf16 "
                                    "(model.dtype) or use attention=sdpa_varlen for fp32/fp64")


def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func  # lazy: optional [gpu] extra

    _check_half("flash_attn", q)
    vp, dv = _pad_v(q, v)
    out = flash_attn_varlen_func(q, k, vp, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                                 softmax_scale=scale, causal=causal)
    return out[..., :dv]


@functools.lru_cache(maxsize=1)
def _torch_varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    _check_half("torch_varlen", q)
    vp, dv = _pad_v(q, v)
    params = _torch_varlen_params()
    kwargs: dict = {}
    # torch 2.10 takes is_causal=; later versions take window_size=(-1, 0) for causal instead.
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif causal:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # no scale argument: the kernel uses 1/sqrt(Dh); fold our scale into q
        q = q * (scale * q.shape[-1] ** 0.5)
    out = varlen_attn(q, k, vp, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, **kwargs)
    return out[..., :dv]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    backend: str = "sdpa_varlen",
) -> torch.Tensor:
    """Attention over packed segments; no token ever attends outside its segment.

    Args:
        q: (N, H, Dh) queries. k: (N, H, Dh) keys. v: (N, H, Dv) values (Dv may be smaller than Dh, as in MLA).
        cu_seqlens_q, cu_seqlens_k: (S+1,) int32 segment boundaries (equal for self-attention).
        max_seqlen_q, max_seqlen_k: host ints, the longest segment (no device sync needed to read them).
        causal: causal inside each segment (decoder) or full (vision tower).
        softmax_scale: the logit scale.
        backend: a concrete backend name (see :func:`resolve_backend`).

    Returns:
        (N, H, Dv) attention output in v's dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention takes packed (N, H, Dh) q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.shape[1] == k.shape[1] == v.shape[1] and q.shape[2] == k.shape[2] and k.shape[0] == v.shape[0]):
        raise ValueError(f"varlen_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree "
                         "(same heads H everywhere, same Dh for q and k, same N for k and v)")
    if backend == "auto":
        backend = resolve_backend("auto", q.device)
    fn: Callable | None = {
        "sdpa_varlen": lambda: _sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale),
        "sdpa_masked": lambda: _sdpa_masked(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale),
        "flash_attn": lambda: _flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          causal, softmax_scale),
        "torch_varlen": lambda: _torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              causal, softmax_scale),
    }.get(backend)
    if fn is None:
        raise AttentionBackendError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return fn()
