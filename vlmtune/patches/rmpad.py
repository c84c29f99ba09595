"""rmpad: remove padding, run every attention on packed tokens through varlen attention.

``apply_rmpad(model)`` swaps ``forward`` ON THE INSTANCE (never the class, so other models in the process are
untouched) of:

* the VLM (``KimiVLForConditionalGeneration.forward_varlen``: unpads a padded call, or takes a packed call),
* the decoder (``KimiVLTextModel.forward_varlen``: (N, D) tokens + cu_seqlens),
* every decoder attention module (``KimiVLAttention.forward_varlen``), with the chosen varlen backend,
* every MoonViT block, whose attention switches from the dense block-diagonal reference to the varlen backend.

It then verifies that every swap took and raises naming any module that did not: a requested rmpad is applied, or
the run stops. It is idempotent, finds the model inside a peft wrapper, and survives
``gradient_checkpointing_enable()`` (checkpointing wraps calls, it never replaces modules).

``_unpad_input``/``pad_input`` convert between (B, T, ...) padded rows and (N, ...) packed rows::

    attention_mask  1 1 1 0      rows  -> a0 a1 a2 b0 b1      indices    [0 1 2 4 5]
                    1 1 0 0                                   cu_seqlens [0 3 5], max_seqlen 3
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from vlmtune.ops.attention import resolve_backend

logger = logging.getLogger(__name__)

_FLAG = "_vlmtune_rmpad"


class RmpadError(RuntimeError):
    """apply_rmpad could not patch a module it must patch."""


def _unpad_input(x: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Drop padded positions.

    Args:
        x: (B, T, ...) ids or hidden states.
        attention_mask: (B, T), nonzero = real token. Real tokens need not be contiguous, but each row is one sequence.

    Returns:
        rows (N, ...), indices (N,) into the flattened B*T positions, cu_seqlens (B+1,) int32, max_seqlen (host int).
        Rows with no real token give an empty segment.
    """
    if x.shape[:2] != attention_mask.shape:
        raise ValueError(f"x {tuple(x.shape)} and attention_mask {tuple(attention_mask.shape)} disagree on (B, T)")
    mask = attention_mask.reshape(-1).bool()
    indices = mask.nonzero(as_tuple=True)[0]  # (N,)
    seqlens = attention_mask.bool().sum(-1, dtype=torch.int32)  # (B,)
    cu_seqlens = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))  # (B+1,)
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    rows = x.reshape(-1, *x.shape[2:]).index_select(0, indices)  # (N, ...)
    return rows, indices, cu_seqlens, max_seqlen


def pad_input(rows: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`_unpad_input`: (N, ...) rows -> (B, T, ...) with zeros on padding."""
    out = rows.new_zeros(batch * seqlen, *rows.shape[1:])
    out = out.index_copy(0, indices, rows)  # differentiable w.r.t. rows
    return out.view(batch, seqlen, *rows.shape[1:])  # (B, T, ...)


def _find_vlm(model: nn.Module) -> nn.Module:
    from vlmtune.models.kimi_vl.vlm import KimiVLForConditionalGeneration

    for m in model.modules():
        if isinstance(m, KimiVLForConditionalGeneration):
            return m
    raise RmpadError(f"apply_rmpad: no KimiVLForConditionalGeneration inside {type(model).__name__}")


def _targets(vlm: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, method to install as forward) for every module rmpad must patch."""
    from vlmtune.models.kimi_vl.attention import KimiVLAttention

    out: list[tuple[str, nn.Module, str]] = [("", vlm, "forward_varlen"),
                                             ("language_model.model", vlm.language_model.model, "forward_varlen")]
    n_attn = 0
    for name, m in vlm.language_model.named_modules():
        if isinstance(m, KimiVLAttention):
            out.append((f"language_model.{name}", m, "forward_varlen"))
            n_attn += 1
    if n_attn != len(vlm.language_model.model.layers):
        raise RmpadError(f"apply_rmpad: found {n_attn} decoder attention modules for "
                         f"{len(vlm.language_model.model.layers)} layers")
    for i, block in enumerate(vlm.vision_tower.encoder.blocks):
        out.append((f"vision_tower.encoder.blocks.{i}", block, "forward"))
    return out


def _installed(module: nn.Module, method: str) -> bool:
    """True when ``module.forward`` is, on the instance, ``method`` of its class bound to ``module`` itself."""
    fn = module.__dict__.get("forward")
    return (getattr(fn, "__func__", None) is getattr(type(module), method, None)
            and getattr(fn, "__self__", None) is module)


def apply_rmpad(model: nn.Module, attention: str = "auto") -> nn.Module:
    """Install the unpadded varlen forwards on ``model``'s instances (see the module docstring).

    Every target is checked before anything is touched, and a swap that does not take is rolled back: the model is
    either fully patched or left as it was. Calling it again is a no-op (or switches the backend).

    Args:
        model: a KimiVLForConditionalGeneration, or any wrapper holding one (peft, DeepSpeed engine module).
        attention: ``auto`` or a backend of :mod:`vlmtune.ops.attention`; resolved for the model's device. ``auto``
            is logged once per process with the reason of the choice.

    Returns:
        ``model`` itself (patched in place).

    Raises:
        RmpadError: naming the module that could not be patched.
        AttentionBackendError: the backend cannot run on the model's device (e.g. flash_attn on CPU).
    """
    vlm = _find_vlm(model)
    backend = resolve_backend(attention, vlm.device if vlm.device.type != "meta" else "cpu")
    targets = _targets(vlm)
    for name, module, method in targets:
        if not callable(getattr(type(module), method, None)):
            raise RmpadError(f"apply_rmpad: module `{name or 'model'}` ({type(module).__name__}) has no {method}(); "
                             "rmpad cannot run this model (nothing was patched)")
    if all(_installed(m, method) and getattr(m, _FLAG, None) == backend == getattr(m, "attn_backend", None)
           for _, m, method in targets):
        logger.debug("rmpad already applied with attention backend %s", backend)
        return model
    saved = [(m, dict(m.__dict__)) for _, m, _ in targets]
    for _, module, method in targets:
        module.forward = types.MethodType(getattr(type(module), method), module)
        module.attn_backend = backend
        setattr(module, _FLAG, backend)
    bad = [name or "model" for name, module, method in targets
           if not _installed(module, method) or getattr(module, _FLAG, None) != backend
           or getattr(module, "attn_backend", None) != backend]
    if bad:
        for module, before in saved:  # roll back: never leave a half-patched model behind
            for key in ("forward", "attn_backend", _FLAG):
                module.__dict__.pop(key, None)
                if key in before:
                    module.__dict__[key] = before[key]
        raise RmpadError(f"apply_rmpad: the varlen forward did not take on {bad} (their class intercepts attribute "
                         "assignment or forward); nothing was patched")
    logger.info("rmpad applied: %d modules patched (VLM, decoder, %d decoder attentions, %d vision blocks), "
                "attention backend %s", len(targets), len(vlm.language_model.model.layers),
                len(vlm.vision_tower.encoder.blocks), backend)
    return model


def is_rmpad_applied(model: nn.Module) -> bool:
    """True when every module rmpad must patch carries the varlen forward, bound to itself."""
    try:
        vlm = _find_vlm(model)
        targets = _targets(vlm)
    except RmpadError:
        return False
    return all(getattr(m, _FLAG, None) is not None and _installed(m, method) for _, m, method in targets)


def rmpad_backend(model: nn.Module) -> str | None:
    """The attention backend rmpad installed, or None when not applied."""
    if not is_rmpad_applied(model):
        return None
    return getattr(_find_vlm(model), _FLAG)
