"""Packed == unpacked: one buffer of several samples (images, text-only, trailing padding) through the rmpad model
equals each sample run alone through the UNPATCHED model, in logits, loss and every parameter gradient.

Also: no leakage between samples, no supervision across a sample boundary, and a step's gradient that does not
depend on how its samples were packed, split into micro-batches or accumulated (token / sample / sqrt reductions).
Tolerances: fp64 1e-8, fp32 1e-5 (reached: ~1e-15 in fp64).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vlmtune.data.batch import PackedBatch, SampleTensors, collate_samples
from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration, kimi_vl_tiny
from vlmtune.patches.rmpad import apply_rmpad
from vlmtune.train.loss import count_supervision, segment_ids_from_cu_seqlens, shift_labels

TOL = {torch.float64: dict(atol=1e-8, rtol=1e-8), torch.float32: dict(atol=1e-5, rtol=1e-5)}
CFG = kimi_vl_tiny()
PH = CFG.media_placeholder_token_id
PAD_ID = CFG.text_config.pad_token_id


def _sample(sid: int, length: int, grids: list[tuple[int, int]], prompt: int = 2) -> SampleTensors:
    """``length`` tokens: ``prompt`` text tokens, the image tokens, then text; supervised after the images + 1."""
    g = torch.Generator().manual_seed(100 + sid)
    ids = torch.randint(0, 1700, (length,), generator=g)
    n_img = sum(h * w // 4 for h, w in grids)
    ids[prompt:prompt + n_img] = PH
    label_mask = torch.zeros(length, dtype=torch.bool)
    label_mask[prompt + n_img + 1:] = True
    if not grids:
        return SampleTensors(ids, label_mask, None, None, sid)
    pixels = torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=g, dtype=torch.float64)
    return SampleTensors(ids, label_mask, pixels, torch.tensor(grids), sid)


def _samples() -> list[SampleTensors]:
    return [
        _sample(0, 11, [(2, 4)]),  # one image, 2 image tokens
        _sample(1, 7, []),  # text only
        _sample(2, 16, [(4, 4), (2, 2)]),  # two images: 4 + 1 tokens
        _sample(3, 9, [(2, 2)], prompt=1),
        _sample(4, 5, []),
        _sample(5, 13, [(4, 2)]),
    ]


def _models(dtype: torch.dtype) -> tuple[KimiVLForConditionalGeneration, KimiVLForConditionalGeneration]:
    """(unpatched reference, patched copy with the same weights), in training mode (MoE aux loss computed)."""
    torch.manual_seed(0)
    ref = KimiVLForConditionalGeneration(CFG).to(dtype).train()
    patched = apply_rmpad(copy.deepcopy(ref))
    return ref, patched


def _cast(batch: PackedBatch, dtype: torch.dtype) -> PackedBatch:
    return batch.to("cpu", dtype=dtype)


def _alone(model: KimiVLForConditionalGeneration, s: SampleTensors, dtype: torch.dtype, **kw):
    """One sample through the model's padded forward (batch of one row, no padding)."""
    b = _cast(collate_samples([s]), dtype)
    return model(input_ids=b.input_ids, labels=b.labels, pixel_values=b.pixel_values,
                 image_grid_hws=b.image_grid_hws, **kw)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_grads_close(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None], **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if a[name] is None or b[name] is None:
            assert a[name] is None and b[name] is None, f"gradient of {name} exists on one side only"
            continue
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_buffer_equals_each_sample_alone(dtype: torch.dtype) -> None:
    ref, patched = _models(dtype)
    samples = _samples()
    batch = _cast(collate_samples(samples, pad_to=70, pad_token_id=PAD_ID), dtype)  # trailing padding segment
    assert batch.num_padding == 9 and batch.cu_seqlens.tolist() == [0, 11, 18, 34, 43, 48, 61, 70]

    out = patched(**batch.to_model_inputs())
    assert out.logits.shape == (1, 70, CFG.text_config.vocab_size)
    out.loss.backward()
    packed_grads = _grads(patched)

    # Each sample alone, unpatched; the packed loss is the token mean over the whole buffer, so its gradient is
    # the per-sample gradients weighted by each sample's share of the supervised tokens.
    total = sum(int(s.label_mask[1:].sum()) for s in samples)
    assert out.num_supervised_tokens == total == 6 + 4 + 8 + 6 + 2 + 8
    ref.zero_grad()
    loss_sum = torch.zeros((), dtype=torch.float64)
    bounds = batch.cu_seqlens.tolist()
    for i, s in enumerate(samples):
        alone = _alone(ref, s, dtype)
        torch.testing.assert_close(out.logits[0, bounds[i]:bounds[i + 1]], alone.logits[0], **TOL[dtype])
        (alone.loss * alone.num_supervised_tokens / total).backward()
        loss_sum += alone.loss.detach().double() * alone.num_supervised_tokens
    torch.testing.assert_close(out.loss.detach().double(), loss_sum / total, **TOL[dtype])
    _assert_grads_close(packed_grads, _grads(ref), **TOL[dtype])
    assert all(g is not None for g in packed_grads.values()), "every parameter takes part in the packed step"
    assert torch.isfinite(out.logits[0, 61:]).all()  # the padding segment runs like any other segment


def test_packed_aux_loss_is_the_sum_over_samples() -> None:
    # The MoE balance loss is per sequence: packed, its sum over segments equals the samples' sums run alone.
    ref, patched = _models(torch.float64)
    samples = _samples()
    out = patched(**collate_samples(samples).to_model_inputs())
    alone = [_alone(ref, s, torch.float64) for s in samples]
    torch.testing.assert_close(out.aux_loss_sum, sum(a.aux_loss_sum for a in alone), atol=1e-12, rtol=1e-12)
    assert out.num_sequences == 6
    torch.testing.assert_close(out.aux_loss, out.aux_loss_sum / 6)


def test_padding_segment_adds_no_aux_loss() -> None:
    # PackedBatch.num_padding reaches the decoder: the padding segment is neither a sequence nor a load.
    _, patched = _models(torch.float64)
    samples = _samples()
    with torch.no_grad():
        plain = patched(**collate_samples(samples).to_model_inputs())
        padded = patched(**collate_samples(samples, pad_to=70, pad_token_id=PAD_ID).to_model_inputs())
    torch.testing.assert_close(padded.aux_loss_sum, plain.aux_loss_sum)
    assert padded.num_sequences == plain.num_sequences


def test_sdpa_masked_backend_gives_the_same_pack() -> None:
    # The model-level check of the two CPU backends: per-segment SDPA and the dense block-diagonal mask.
    ref, patched = _models(torch.float64)
    masked = apply_rmpad(copy.deepcopy(ref), attention="sdpa_masked")
    batch = collate_samples(_samples(), pad_to=64, pad_token_id=PAD_ID)
    a, b = patched(**batch.to_model_inputs()), masked(**batch.to_model_inputs())
    torch.testing.assert_close(a.logits, b.logits, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-12, rtol=1e-12)


# -------------------------------------------------------------------------------------------------- leakage
def test_no_leakage_between_samples() -> None:
    _, patched = _models(torch.float64)
    samples = _samples()
    base = collate_samples(samples, pad_to=64, pad_token_id=PAD_ID)
    bounds = base.cu_seqlens.tolist()
    seg = segment_ids_from_cu_seqlens(base.cu_seqlens, base.num_tokens)

    def logits(batch: PackedBatch) -> torch.Tensor:
        with torch.no_grad():
            return patched(**batch.to_model_inputs()).logits[0]

    ref_logits = logits(base)

    # 1) other tokens in sample 1 (text only; keep the first token, change the rest)
    ids = base.input_ids.clone()
    ids[0, bounds[1] + 1:bounds[2]] = (ids[0, bounds[1] + 1:bounds[2]] + 7) % 1700
    changed_tokens = logits(PackedBatch(**{**base.__dict__, "input_ids": ids}))
    # 2) other pixels in sample 0's image (image 0 of the pack)
    pixels = base.pixel_values.clone()
    pixels[:8] = torch.randn(8, 3, 14, 14, dtype=pixels.dtype)
    changed_pixels = logits(PackedBatch(**{**base.__dict__, "pixel_values": pixels}))
    # 3) other tokens in the padding segment
    ids_pad = base.input_ids.clone()
    ids_pad[0, bounds[-2]:] = 5
    changed_padding = logits(PackedBatch(**{**base.__dict__, "input_ids": ids_pad}))

    for changed, victim in ((changed_tokens, 1), (changed_pixels, 0), (changed_padding, len(samples))):
        others = seg != victim
        torch.testing.assert_close(changed[others], ref_logits[others], atol=1e-12, rtol=0)
        assert (changed[seg == victim] - ref_logits[seg == victim]).abs().max() > 1e-3  # the victim did change


# ------------------------------------------------------------------------------------------- boundary labels
def test_no_loss_across_a_sample_boundary() -> None:
    # Labels that WOULD supervise "last token of sample i -> first token of sample i+1" (a collator that forgot the
    # -100 on first tokens): the packed loss and its gradient are exactly those of the correct labels.
    ref, patched = _models(torch.float64)
    batch = collate_samples(_samples()[:4])
    starts = batch.cu_seqlens[:-1].long()
    bad = batch.labels.clone()
    bad[0, starts] = batch.input_ids[0, starts]  # supervise every sample's first token
    assert int((bad != -100).sum()) == int((batch.labels != -100).sum()) + 4
    # A shift that ignored the boundaries would now train 3 cross-sample predictions (the first sample's first
    # token is never a target): the construction has teeth.
    naive = int((shift_labels(bad) != -100).sum())
    assert naive == int((shift_labels(batch.labels) != -100).sum()) + 3

    out_good = patched(**batch.to_model_inputs())
    out_good.loss.backward()
    good_grads = _grads(patched)
    patched.zero_grad()
    out_bad = patched(**{**batch.to_model_inputs(), "labels": bad})
    out_bad.loss.backward()
    assert out_bad.num_supervised_tokens == out_good.num_supervised_tokens
    assert torch.equal(out_bad.loss, out_good.loss)
    _assert_grads_close(_grads(patched), good_grads, atol=0, rtol=0)
    # and the padded reference on the same samples agrees (each row is a sample: no boundary to cross)
    padded = ref(**batch.to_padded())
    torch.testing.assert_close(padded.loss, out_good.loss, atol=1e-12, rtol=1e-12)


# -------------------------------------------------------------------------------------------- loss invariance
ARRANGEMENTS = {
    "one pack": [[0, 1, 2, 3, 4, 5]],
    "three micro-batches": [[2, 0], [5], [1, 4, 3]],
    # two accumulation steps x two "ranks" (each micro-batch two packs concatenated, micro_batch_size = 2)
    "2 accum x 2 ranks": [[3, 5], [0, 4], [1], [2]],
}


def _step_grads(model: KimiVLForConditionalGeneration, samples: list[SampleTensors], arrangement: list[list[int]],
                reduction: str) -> tuple[dict[str, torch.Tensor | None], float, float]:
    """Accumulated gradient of one optimizer step, with the step's denominators counted before it (as the loader)."""
    batches = [collate_samples([samples[i] for i in mb]) for mb in arrangement]
    tok = samp = 0
    sqrt_sum = 0.0
    for b in batches:
        t, s, q = count_supervision(shift_labels(b.labels[0], b.cu_seqlens), b.segment_ids())
        tok, samp, sqrt_sum = tok + t, samp + s, sqrt_sum + q
    model.zero_grad()
    loss = aux = 0.0
    for b in batches:
        out = model(**b.to_model_inputs(), return_logits=False, loss_reduction=reduction,
                    loss_denominators=(tok, samp, sqrt_sum))
        out.loss.backward()
        loss += float(out.loss.detach())
        aux += float(out.aux_loss_sum.detach())
    return _grads(model), loss, aux


@pytest.mark.parametrize("reduction", ["token", "sample", "sqrt"])
def test_step_gradient_does_not_depend_on_packing(reduction: str) -> None:
    ref, patched = _models(torch.float64)
    samples = _samples()
    results = {name: _step_grads(patched, samples, arr, reduction) for name, arr in ARRANGEMENTS.items()}
    first_grads, first_loss, first_aux = results["one pack"]
    for name, (grads, loss, aux) in results.items():
        assert math.isclose(loss, first_loss, rel_tol=1e-12), name
        assert math.isclose(aux, first_aux, rel_tol=1e-12), name  # per-sequence aux sum: packing-invariant too
        _assert_grads_close(grads, first_grads, atol=1e-12, rtol=1e-10)

    # The documented formula, from each sample alone on the unpatched model (n_s supervised tokens, loss_s its mean):
    #   token  sum_s n_s loss_s / sum_s n_s;  sample  mean_s loss_s;  sqrt  sum_s sqrt(n_s) loss_s / sum_s sqrt(n_s)
    ref.zero_grad()
    alone = [_alone(ref, s, torch.float64) for s in samples]
    n = [a.num_supervised_tokens for a in alone]
    weight = {"token": [x / sum(n) for x in n], "sample": [1 / len(n)] * len(n),
              "sqrt": [math.sqrt(x) / sum(math.sqrt(y) for y in n) for x in n]}[reduction]
    direct = sum(w * a.loss for w, a in zip(weight, alone))
    direct.backward()
    assert math.isclose(float(direct.detach()), first_loss, rel_tol=1e-12)
    _assert_grads_close(_grads(ref), first_grads, **TOL[torch.float64])


def test_per_micro_batch_means_would_depend_on_packing() -> None:
    # The trap the step denominators avoid: averaging per-micro-batch means changes with the split.
    _, patched = _models(torch.float64)
    samples = _samples()
    losses = {}
    for name, arr in ARRANGEMENTS.items():
        batches = [collate_samples([samples[i] for i in mb]) for mb in arr]
        with torch.no_grad():
            losses[name] = sum(float(patched(**b.to_model_inputs()).loss) for b in batches) / len(batches)
    assert abs(losses["three micro-batches"] - losses["one pack"]) > 1e-3
