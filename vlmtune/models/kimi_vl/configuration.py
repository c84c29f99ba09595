"""Kimi-VL configuration: MoonViT vision config + DeepSeek-V3 text config, HF config.json compatible.

Reads a published ``config.json`` and writes it back with every field preserved, including fields vlmtune does not
use (``ep_size``, ``auto_map``, ...): they are kept, never rejected. Values are read from the JSON, never hard-coded
(shared/reference/kimi_vl.md). Named builders: :func:`kimi_vl_a3b` (published sizes) and :func:`kimi_vl_tiny` (a few MB,
exercising every feature: several images, a dense first layer then MoE layers, shared experts, top-k > 1, n_group > 1).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"


class _RawPreservingConfig:
    """A config that remembers the JSON it came from and writes back all of it.

    Deliberately not a ``transformers.PreTrainedConfig``: that class rewrites fields on assignment (``rope_scaling``
    becomes ``rope_parameters``) and adds generic ones (``id2label``, ...), which would break the exact round trip.
    Unknown fields stay readable as attributes (``config.ep_size``) and are written back unchanged.
    """

    _known: tuple[str, ...] = ()
    model_type = ""

    def _init_raw(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        # Everything we were given that is not one of our own fields: kept as-is and written back.
        object.__setattr__(self, "_raw_extra", {k: v for k, v in kwargs.items() if k not in self._known})
        return {}

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: expose preserved unknown fields (e.g. num_key_value_heads).
        raw = self.__dict__.get("_raw_extra", {})
        if name in raw:
            return raw[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def to_dict(self) -> dict[str, Any]:
        return self.to_save_dict()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_save_dict() == other.to_save_dict()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_save_dict(), sort_keys=True)})"

    def to_save_dict(self) -> dict[str, Any]:
        """The dict written to config.json: unknown loaded fields first, then every field vlmtune models."""
        out = copy.deepcopy(getattr(self, "_raw_extra", {}))
        for k in self._known:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


class MoonViTConfig(_RawPreservingConfig):
    """MoonViT (the Kimi-VL vision tower). Field names follow the published ``vision_config``."""

    model_type = "moonvit"
    _known = ("model_type", "patch_size", "init_pos_emb_height", "init_pos_emb_width", "num_attention_heads",
              "num_hidden_layers", "hidden_size", "intermediate_size", "merge_kernel_size")

    def __init__(
        self,
        patch_size: int = 14,
        init_pos_emb_height: int = 64,
        init_pos_emb_width: int = 64,
        num_attention_heads: int = 16,
        num_hidden_layers: int = 27,
        hidden_size: int = 1152,
        intermediate_size: int = 4304,
        merge_kernel_size: tuple[int, int] | list[int] = (2, 2),
        **kwargs: Any,
    ) -> None:
        kwargs.pop("model_type", None)
        self._init_raw(kwargs)
        self.patch_size = patch_size
        self.init_pos_emb_height = init_pos_emb_height
        self.init_pos_emb_width = init_pos_emb_width
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.merge_kernel_size = tuple(merge_kernel_size)
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 4:
            raise ValueError(f"MoonViT head dim {hidden_size}/{num_attention_heads} must be an integer divisible by 4 "
                             "(2-D RoPE rotates pairs of dims for x and y)")
        if self.merge_kernel_size != (2, 2):
            raise ValueError(f"merge_kernel_size {self.merge_kernel_size} is not supported (Kimi-VL uses [2, 2])")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class KimiVLTextConfig(_RawPreservingConfig):
    """The DeepSeek-V3 language model config (published as ``text_config``, which has no model_type key)."""

    model_type = "deepseek_v3"
    _known = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank",
              "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "topk_method", "n_group",
              "topk_group", "num_experts_per_tok", "moe_layer_freq", "first_k_dense_replace", "norm_topk_prob",
              "scoring_func", "aux_loss_alpha", "seq_aux", "hidden_act", "max_position_embeddings",
              "initializer_range", "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias",
              "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")

    def __init__(
        self,
        vocab_size: int = 163840,
        hidden_size: int = 2048,
        intermediate_size: int = 11264,
        moe_intermediate_size: int = 1408,
        num_hidden_layers: int = 27,
        num_attention_heads: int = 16,
        n_shared_experts: int | None = 2,
        n_routed_experts: int | None = 64,
        routed_scaling_factor: float = 2.446,
        kv_lora_rank: int = 512,
        q_lora_rank: int | None = None,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        qk_nope_head_dim: int = 128,
        topk_method: str = "noaux_tc",
        n_group: int = 1,
        topk_group: int = 1,
        num_experts_per_tok: int = 6,
        moe_layer_freq: int = 1,
        first_k_dense_replace: int = 1,
        norm_topk_prob: bool = True,
        scoring_func: str = "sigmoid",
        aux_loss_alpha: float = 0.001,
        seq_aux: bool = True,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 800000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        bos_token_id: int = 163584,
        eos_token_id: int = 163585,
        pad_token_id: int = 163839,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self._init_raw(kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.routed_scaling_factor = routed_scaling_factor
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self._validate()

    def _validate(self) -> None:
        if self.rope_scaling is not None:
            raise NotImplementedError(f"text_config.rope_scaling={self.rope_scaling!r} is not supported yet "
                                      "(Kimi-VL-A3B uses null); remove it or add the scaling to vlmtune")
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            raise NotImplementedError(f"router scoring_func={self.scoring_func!r} topk_method={self.topk_method!r}: "
                                      "vlmtune implements sigmoid + noaux_tc (Kimi-VL / DeepSeek-V3)")
        if self.n_routed_experts and self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}")
        if self.n_routed_experts and self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok larger than n_routed_experts")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group {self.topk_group} > n_group {self.n_group}")
        if self.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {self.hidden_act!r}: only silu is implemented")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek-V3's rule: MoE from ``first_k_dense_replace`` on, every ``moe_layer_freq`` layers."""
        return (self.n_routed_experts is not None and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_save_dict(self) -> dict[str, Any]:
        out = super().to_save_dict()
        out.pop("model_type", None)  # the published text_config carries none
        if "model_type" in self._raw_extra:
            out["model_type"] = self._raw_extra["model_type"]
        return out


class KimiVLConfig(_RawPreservingConfig):
    """Top-level Kimi-VL config (``model_type: kimi_vl``)."""

    model_type = "kimi_vl"
    sub_configs = {"vision_config": MoonViTConfig, "text_config": KimiVLTextConfig}
    _known = ("model_type", "architectures", "ignore_index", "media_placeholder_token_id", "pad_token_id")

    def __init__(
        self,
        vision_config: MoonViTConfig | dict | None = None,
        text_config: KimiVLTextConfig | dict | None = None,
        ignore_index: int = -100,
        media_placeholder_token_id: int = 163605,
        pad_token_id: int = 0,
        architectures: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("model_type", None)
        self._init_raw(kwargs)
        self.vision_config = (vision_config if isinstance(vision_config, MoonViTConfig)
                              else MoonViTConfig(**(vision_config or {})))
        self.text_config = (text_config if isinstance(text_config, KimiVLTextConfig)
                            else KimiVLTextConfig(**(text_config or {})))
        self.ignore_index = ignore_index
        self.media_placeholder_token_id = media_placeholder_token_id
        self.pad_token_id = pad_token_id
        self.architectures = list(architectures) if architectures else ["KimiVLForConditionalGeneration"]
        if not 0 <= media_placeholder_token_id < self.text_config.vocab_size:
            raise ValueError(f"media_placeholder_token_id {media_placeholder_token_id} outside the vocabulary "
                             f"(vocab_size {self.text_config.vocab_size})")

    # --- HF config API -------------------------------------------------------------------------------------------
    def to_save_dict(self) -> dict[str, Any]:
        out = super().to_save_dict()
        out["vision_config"] = self.vision_config.to_save_dict()
        out["text_config"] = self.text_config.to_save_dict()
        return out

    def to_json_string(self, use_diff: bool = False) -> str:  # noqa: ARG002 - always the full config
        return json.dumps(self.to_save_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``config.json`` with every field (loaded unknown fields included)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(self.to_json_string())

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> KimiVLConfig:
        """Build from a config.json dict; keyword arguments naming a top-level field override it.

        Other keyword arguments are returned with ``return_unused_kwargs=True`` (transformers' AutoModel then hands
        them to the model's ``from_pretrained``, which rejects what it does not support) and are an error otherwise.
        """
        return_unused = kwargs.pop("return_unused_kwargs", False)
        for bookkeeping in ("name_or_path", "_from_auto", "_from_pipeline", "_commit_hash"):  # set by transformers
            kwargs.pop(bookkeeping, None)
        d = copy.deepcopy(config_dict)
        overrides = [k for k in kwargs if k in cls._known or k in ("vision_config", "text_config")]
        d.update({k: kwargs.pop(k) for k in overrides})
        config = cls(**d)
        if return_unused:
            return config, kwargs
        if kwargs:
            raise TypeError(f"KimiVLConfig: unknown arguments {sorted(kwargs)}; keyword overrides must name a top-level "
                            f"field ({', '.join(cls._known)}, vision_config, text_config)")
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> KimiVLConfig:
        """Read ``DIR/config.json`` (a local directory: vlmtune never downloads)."""
        path = Path(pretrained_model_name_or_path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no config.json here; give a local Kimi-VL model directory "
                                    "(or create one with `vlmtune init-model`)")
        data = json.loads(file.read_text())
        if data.get("model_type") != "kimi_vl":
            raise ValueError(f"{file}: model_type is {data.get('model_type')!r}, expected 'kimi_vl'")
        return cls.from_dict(data, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Named builders
# ------------------------------------------------------------------------------------------------------------------
def kimi_vl_a3b() -> KimiVLConfig:
    """Kimi-VL-A3B-Instruct's published sizes (16.41 B parameters; instantiate on the meta device)."""
    return KimiVLConfig(
        vision_config=dict(patch_size=14, init_pos_emb_height=64, init_pos_emb_width=64, num_attention_heads=16,
                           num_hidden_layers=27, hidden_size=1152, intermediate_size=4304, merge_kernel_size=[2, 2]),
        text_config=dict(),  # the KimiVLTextConfig defaults are the A3B values
        media_placeholder_token_id=163605,
        pad_token_id=0,
        ignore_index=-100,
        torch_dtype="bfloat16",
        vocab_size=163840,
    )


# Kimi special tokens sit at fixed offsets after the BPE ranks (163584 = number of ranks in the real tokenizer).
KIMI_SPECIAL_OFFSETS = {"bos": 0, "eos": 1, "media_pad": 21, "pad": 255}
NUM_RESERVED_SPECIAL = 256


def kimi_vl_tiny(num_base_tokens: int = 1792, **text_overrides: Any) -> KimiVLConfig:
    """A few-MB Kimi-VL that still exercises every feature.

    Dense first layer then MoE layers, shared experts, top-k 2 of 8 experts in 2 groups (n_group > 1, topk_group 1),
    MLA without q_lora_rank, MoonViT with 2 blocks and head dim 16.

    Args:
        num_base_tokens: BPE ranks of the tiny tokenizer; the 256 Kimi special tokens follow them.
        **text_overrides: any text_config field (e.g. ``hidden_size``) to change.
    """
    vocab = num_base_tokens + NUM_RESERVED_SPECIAL
    text = dict(
        vocab_size=vocab, hidden_size=96, intermediate_size=192, moe_intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.446,
        kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
        topk_method="noaux_tc", n_group=2, topk_group=1, num_experts_per_tok=2, moe_layer_freq=1,
        first_k_dense_replace=1, norm_topk_prob=True, scoring_func="sigmoid", aux_loss_alpha=0.001, seq_aux=True,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=800000.0,
        bos_token_id=num_base_tokens + KIMI_SPECIAL_OFFSETS["bos"],
        eos_token_id=num_base_tokens + KIMI_SPECIAL_OFFSETS["eos"],
        pad_token_id=num_base_tokens + KIMI_SPECIAL_OFFSETS["pad"],
    )
    text.update(text_overrides)
    return KimiVLConfig(
        vision_config=dict(patch_size=14, init_pos_emb_height=16, init_pos_emb_width=16, num_attention_heads=4,
                           num_hidden_layers=2, hidden_size=64, intermediate_size=128, merge_kernel_size=[2, 2]),
        text_config=text,
        media_placeholder_token_id=num_base_tokens + KIMI_SPECIAL_OFFSETS["media_pad"],
        pad_token_id=0,
        ignore_index=-100,
        torch_dtype="float32",
        vocab_size=vocab,
    )
