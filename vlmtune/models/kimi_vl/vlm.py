"""KimiVLForConditionalGeneration: MoonViT -> projector -> DeepSeek-V3 decoder, under the published key names.

Two forwards share every module:

* ``forward``: the ordinary padded reference path, ``input_ids (B, T)`` + ``attention_mask (B, T)``.
* ``forward_varlen``: the unpadded path that :func:`vlmtune.patches.rmpad.apply_rmpad` installs on the instance. It takes
  either the same padded call (unpads internally, re-pads the logits) or a packed call::

      input_ids     (1, N)  a0 a1 a2 a3 | b0 b1 b2        two samples packed, N = 7
      position_ids  (1, N)   0  1  2  3 |  0  1  2        restart per sample
      labels        (1, N)  -100 .. x  y | -100 .. z      HF-aligned; -100 on each sample's first token
      cu_seqlens    (S+1,)  0 4 7                         int32; max_seqlen = 4 (host int)
      pixel_values  (P, 3, 14, 14), image_grid_hws (I, 2) the images of all samples, in token order

Image features replace the ``media_placeholder_token_id`` embeddings in order. ``.loss`` is the mean cross-entropy over
the call's supervised tokens (or, with ``loss_denominators``, this micro-batch's share of the optimizer-step loss);
``.aux_loss`` (MoE balance loss) is returned apart and never folded into ``.loss``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtune.train.loss import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    segment_ids_from_cu_seqlens,
    shift_labels,
    token_weights,
)

from .checkpoint import checkpoint_files, load_model_weights, save_model_weights
from .configuration import KimiVLConfig
from .decoder import KimiVLLanguageModel
from .projector import KimiVLMultiModalProjector
from .vit import MoonViT


class KimiVLOutput(dict):
    """What a forward returns: a dict with attribute access (``out.loss`` or ``out["loss"]``), like transformers'
    ModelOutput. It is a dict so that DeepSpeed ZeRO-3's module hooks, which look for tensors in tuples, lists and
    dicts only, see the tensors it holds. Tensors are None when not computed.

    Fields:
        loss: the reduced LM loss. logits: (B, T, V) or (1, N, V).
        aux_loss: mean over sequences of the per-sequence balance loss, summed over layers.
        aux_loss_sum: the same summed over sequences (for step-level normalisation).
        num_sequences, num_supervised_tokens: counts of the call.
    """

    FIELDS = ("loss", "logits", "aux_loss", "aux_loss_sum", "num_sequences", "num_supervised_tokens")

    def __init__(self, loss: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                 aux_loss: torch.Tensor | None = None, aux_loss_sum: torch.Tensor | None = None,
                 num_sequences: int = 0, num_supervised_tokens: int = 0) -> None:
        super().__init__(loss=loss, logits=logits, aux_loss=aux_loss, aux_loss_sum=aux_loss_sum,
                         num_sequences=num_sequences, num_supervised_tokens=num_supervised_tokens)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"KimiVLOutput has no field {key!r} (fields: {', '.join(self.FIELDS)})") from None

    def __setattr__(self, key: str, value: Any) -> None:
        if key not in self.FIELDS:
            raise AttributeError(f"KimiVLOutput has no field {key!r} (fields: {', '.join(self.FIELDS)})")
        self[key] = value


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


class KimiVLForConditionalGeneration(nn.Module):
    """The Kimi-VL vision-language model (vision_tower, multi_modal_projector, language_model)."""

    config_class = KimiVLConfig
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(self, config: KimiVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = MoonViT(config.vision_config)
        self.multi_modal_projector = KimiVLMultiModalProjector(config)
        self.language_model = KimiVLLanguageModel(config.text_config)
        # Under ZeRO-3 every rank must run the vision tower in every micro-step (its parameters are gathered
        # collectively); the trainer sets this so a text-only pack still runs a tiny dummy image, contributing 0.
        self.run_vision_on_text_only = False
        self.ce_chunk_size = 4096

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return _dtype_of(self.language_model)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.lm_head

    def gradient_checkpointing_enable(self, decoder: bool = True, vision: bool = True, every_k: int = 1,
                                      **_: Any) -> None:
        """Non-reentrant activation checkpointing, separately for the decoder layers and the vision blocks.

        Only blocks with a trainable parameter are checkpointed; a fully frozen vision tower runs under no_grad.
        """
        self.language_model.model.gradient_checkpointing = decoder
        self.language_model.model.checkpoint_every_k = every_k
        self.vision_tower.gradient_checkpointing = vision
        self.vision_tower.checkpoint_every_k = every_k

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_enable(decoder=False, vision=False)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector: (P, 3, 14, 14) patches -> (P // 4, D_text) LM embeddings, images in order."""
        vt = self.vision_tower
        pixel_values = pixel_values.to(_dtype_of(vt))
        if any(p.requires_grad for p in vt.parameters()):
            feats = vt(pixel_values, image_grid_hws)  # (P/4, 4, Dv)
        else:
            with torch.no_grad():  # frozen tower: keep no activations alive for backward
                feats = vt(pixel_values, image_grid_hws)
        return self.multi_modal_projector(feats)  # (P/4, D)

    def _dummy_image(self) -> tuple[torch.Tensor, torch.Tensor]:
        ps = self.config.vision_config.patch_size
        pv = torch.zeros(4, 3, ps, ps, device=self.device, dtype=_dtype_of(self.vision_tower))
        return pv, torch.tensor([[2, 2]], device=self.device, dtype=torch.long)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_grid_hws: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features in place of the placeholder tokens. Any leading shape."""
        embeds = self.language_model.model.embed_tokens(input_ids)  # (..., D)
        placeholder = input_ids == self.config.media_placeholder_token_id
        n_placeholders = int(placeholder.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if n_placeholders:
                raise ValueError(f"input_ids hold {n_placeholders} image placeholder tokens "
                                 f"(id {self.config.media_placeholder_token_id}) but no pixel_values were given")
            if self.run_vision_on_text_only:
                feats = self.encode_images(*self._dummy_image())
                embeds = embeds + feats.sum() * 0  # exact zero, keeps every rank's graph identical
            return embeds
        if image_grid_hws is None:
            raise ValueError("pixel_values given without image_grid_hws (I, 2)")
        feats = self.encode_images(pixel_values, image_grid_hws)  # (L, D)
        if feats.shape[0] != n_placeholders:
            raise ValueError(f"image features do not match the text: {n_placeholders} placeholder tokens in input_ids "
                             f"but {feats.shape[0]} image tokens from image_grid_hws {image_grid_hws.tolist()} "
                             "(each image gives (h/2)*(w/2) tokens)")
        return embeds.masked_scatter(placeholder.unsqueeze(-1), feats.to(embeds.dtype))

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor, segment_ids: torch.Tensor,
              loss_reduction: str, loss_denominators: tuple[int, int, float] | None) -> tuple[torch.Tensor, int]:
        """hidden (N, D), targets (N,), segment_ids (N,) -> (loss, supervised tokens)."""
        if loss_denominators is None and loss_reduction == "token":
            weights = None
            n_sup = int((targets != IGNORE_INDEX).sum())
            loss_sum = chunked_cross_entropy(hidden, self.language_model.lm_head.weight, targets, None,
                                             self.ce_chunk_size)
            return loss_sum / max(n_sup, 1), n_sup
        weights = token_weights(targets, segment_ids, loss_reduction, loss_denominators)
        n_sup = int((targets != IGNORE_INDEX).sum())
        loss = chunked_cross_entropy(hidden, self.language_model.lm_head.weight, targets, weights,
                                     self.ce_chunk_size)
        return loss, n_sup

    @staticmethod
    def _aux(aux_sum: torch.Tensor, num_sequences: int) -> torch.Tensor:
        return aux_sum / max(num_sequences, 1)

    # ------------------------------------------------------------------------------------------------------------
    # the padded reference forward
    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hws: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
        return_logits: bool = True,
        loss_reduction: str = "token",
        loss_denominators: tuple[int, int, float] | None = None,
        **kwargs: Any,
    ) -> KimiVLOutput:
        """Padded reference forward.

        Args:
            input_ids: (B, T). attention_mask: (B, T) 1 = real token (None = all real).
            position_ids: (B, T); default counts real tokens from 0 in each row.
            pixel_values: (P, 3, 14, 14) patches of all images of the batch, in token order.
            image_grid_hws: (I, 2) patch grid (h, w) of each image.
            labels: (B, T) HF-aligned (the model shifts by one); -100 = not supervised.
            use_cache: must be False in training (a KV cache could mix packed samples).
            return_logits: False skips the (B, T, V) logits (the loss never needs them all at once).
            loss_reduction, loss_denominators: see :func:`vlmtune.train.loss.token_weights`.
        """
        _reject_unknown(kwargs, allowed=())
        if use_cache:
            raise ValueError("use_cache=True is not supported by the training forward; use vlmtune.generate")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, pixel_values, image_grid_hws)  # (B, T, D)
        hidden, aux_sum = self.language_model.model(inputs_embeds=embeds, attention_mask=attention_mask,
                                                    position_ids=position_ids)  # (B, T, D)
        num_seq = int((attention_mask.sum(-1) > 0).sum())
        out = KimiVLOutput(aux_loss=self._aux(aux_sum, num_seq), aux_loss_sum=aux_sum, num_sequences=num_seq)
        if labels is not None:
            # A padding position predicts nothing: with left padding its shifted target would be the row's first
            # real token, which the unpadded path (rightly) never supervises.
            targets = shift_labels(labels.masked_fill(attention_mask == 0, IGNORE_INDEX))  # (B, T)
            targets = targets.masked_fill(attention_mask == 0, IGNORE_INDEX)
            rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)  # (B, T) sample = row
            out.loss, out.num_supervised_tokens = self._loss(hidden.reshape(B * T, -1), targets.reshape(-1),
                                                             rows.reshape(-1), loss_reduction, loss_denominators)
        if return_logits:
            out.logits = self.language_model.lm_head(hidden)  # (B, T, V)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # the unpadded forward (installed on the instance by apply_rmpad)
    # ------------------------------------------------------------------------------------------------------------
    def forward_varlen(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hws: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        num_padding: int = 0,
        use_cache: bool = False,
        return_logits: bool = True,
        loss_reduction: str = "token",
        loss_denominators: tuple[int, int, float] | None = None,
        **kwargs: Any,
    ) -> KimiVLOutput:
        """Varlen forward: a packed call (cu_seqlens given) or a padded call that is unpadded inside.

        Packed: input_ids (1, N), position_ids (1, N), cu_seqlens (S+1,), max_seqlen host int -> logits (1, N, V).
        ``num_padding`` trailing tokens form the buffer's padding segment: they run (stable shapes) but stay out of
        the MoE aux loss, the expert load and the sequence count.
        Padded: input_ids (B, T), attention_mask (B, T) -> logits (B, T, V), zeros on padding.
        """
        from vlmtune.patches.rmpad import _unpad_input, pad_input

        _reject_unknown(kwargs, allowed=())
        if use_cache:
            raise ValueError("use_cache=True is not supported with packed sequences (a KV cache mixes samples)")
        padded_call = cu_seqlens is None
        if padded_call:
            if num_padding:
                raise ValueError("num_padding is for packed calls; a padded call marks padding with attention_mask")
            B, T = input_ids.shape
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            ids, indices, cu_seqlens, max_seqlen = _unpad_input(input_ids.unsqueeze(-1), attention_mask)
            ids = ids.squeeze(-1)  # (N,)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            pos = position_ids.reshape(-1)[indices]  # (N,)
            targets = None
            if labels is not None:
                targets = shift_labels(labels.masked_fill(attention_mask == 0, IGNORE_INDEX)).reshape(-1)[indices]
        else:
            if input_ids.dim() == 2 and input_ids.shape[0] != 1:
                raise ValueError(f"a packed call takes input_ids (1, N), got {tuple(input_ids.shape)}")
            if attention_mask is not None:
                raise ValueError("a packed call (cu_seqlens given) takes no attention_mask: padding is a segment")
            if max_seqlen is None:
                raise ValueError("a packed call needs max_seqlen as a host int (the collator computes it once)")
            ids = input_ids.reshape(-1)  # (N,)
            if int(cu_seqlens[-1]) != ids.shape[0]:
                raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the pack holds {ids.shape[0]} tokens")
            if position_ids is None:
                seg = segment_ids_from_cu_seqlens(cu_seqlens, ids.shape[0])
                position_ids = torch.arange(ids.shape[0], device=ids.device) - cu_seqlens.long()[seg]
            pos = position_ids.reshape(-1)  # (N,)
            targets = shift_labels(labels.reshape(-1), cu_seqlens) if labels is not None else None
        cu_seqlens = cu_seqlens.to(torch.int32)
        n = ids.shape[0]
        embeds = self.embed(ids, pixel_values, image_grid_hws)  # (N, D)
        hidden, aux_sum = self.language_model.model(inputs_embeds=embeds, position_ids=pos,
                                                    cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen),
                                                    num_padding=int(num_padding))  # (N, D)
        # non-empty segments (an all-padding row is none), minus the buffer's padding segment
        num_seq = int((cu_seqlens[1:] > cu_seqlens[:-1]).sum()) - (1 if num_padding else 0)
        out = KimiVLOutput(aux_loss=self._aux(aux_sum, num_seq), aux_loss_sum=aux_sum, num_sequences=num_seq)
        if targets is not None:
            seg = segment_ids_from_cu_seqlens(cu_seqlens, n)  # (N,)
            out.loss, out.num_supervised_tokens = self._loss(hidden, targets, seg, loss_reduction, loss_denominators)
        if return_logits:
            logits = self.language_model.lm_head(hidden)  # (N, V)
            out.logits = pad_input(logits, indices, B, T) if padded_call else logits.unsqueeze(0)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # checkpoint IO (HF layout: config.json + sharded safetensors with the published key names)
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        config: KimiVLConfig | None = None, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", **kwargs: Any) -> KimiVLForConditionalGeneration:
        """Load a local model directory: config.json + (sharded, indexed) safetensors. Never unpickles.

        Weights keep their stored dtype (bf16 for the published checkpoints) unless ``dtype`` is given; router
        parameters stay fp32 either way. ``rotary_emb.inv_freq`` keys are ignored; any other unexpected or missing
        tensor is an error naming it.
        """
        path = Path(pretrained_model_name_or_path)
        subfolder = kwargs.pop("subfolder", None) or ""  # transformers >= 5.25's AutoModel always passes it
        path = path / subfolder if subfolder else path
        dtype = kwargs.pop("torch_dtype", dtype)
        unsupported = sorted(k for k in kwargs if k not in _HUB_ONLY_KWARGS)
        if args or unsupported:
            raise TypeError(f"KimiVLForConditionalGeneration.from_pretrained({path}): unsupported arguments "
                            f"{unsupported or list(args)}; it takes dtype= and device= (the attention backend is "
                            "chosen by apply_rmpad(model, attention=...), placement by the trainer)")
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if dtype == "auto":
            dtype = None
        config = config if isinstance(config, KimiVLConfig) else KimiVLConfig.from_pretrained(path)
        checkpoint_files(path)  # fail now, before building the model, when no weights are there
        with torch.device("meta"):
            model = cls(config)
        load_model_weights(model, path, device=device)
        if dtype is not None:
            model.to(dtype)
        model.name_or_path = str(path)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int = 5 * 1024**3,
                        state_dict: dict[str, torch.Tensor] | None = None, **_: Any) -> None:
        """Write config.json and sharded safetensors (+ index) under the published key names."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(path)
        save_model_weights(state_dict if state_dict is not None else self.state_dict(), path, max_shard_size)
        gen = {"bos_token_id": self.config.text_config.bos_token_id,
               "eos_token_id": self.config.text_config.eos_token_id,
               "pad_token_id": self.config.text_config.pad_token_id}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")

    def init_weights(self, seed: int | None = None) -> None:
        """Deterministic random initialisation of every part (used by `vlmtune init-model`)."""
        if seed is not None:
            torch.manual_seed(seed)
        for part in (self.vision_tower, self.multi_modal_projector, self.language_model):
            part.init_weights()


# Download-only arguments that transformers' AutoModel.from_pretrained forwards; a local directory needs none of them.
_HUB_ONLY_KWARGS = frozenset({"revision", "trust_remote_code", "adapter_kwargs", "cache_dir", "local_files_only",
                              "force_download", "token", "proxies", "_commit_hash", "code_revision", "_from_auto",
                              "_from_pipeline"})


def _reject_unknown(kwargs: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise TypeError(f"KimiVLForConditionalGeneration.forward got unexpected arguments {unknown}")
