"""Kimi-VL: configuration, model parts, checkpoint IO, processor and tokenizer.

Importing this package registers ``kimi_vl`` with transformers' AutoConfig / AutoModel, so that
``AutoModel.from_pretrained(DIR)`` loads our implementation without ``trust_remote_code``.
"""

from .configuration import KimiVLConfig, KimiVLTextConfig, MoonViTConfig, kimi_vl_a3b, kimi_vl_tiny
from .vlm import KimiVLForConditionalGeneration, KimiVLOutput

BUILDERS = {"tiny": kimi_vl_tiny, "a3b": kimi_vl_a3b}


def _register_auto() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for auto, args in ((AutoConfig, ("kimi_vl", KimiVLConfig)),
                       (AutoModel, (KimiVLConfig, KimiVLForConditionalGeneration)),
                       (AutoModelForCausalLM, (KimiVLConfig, KimiVLForConditionalGeneration))):
        auto.register(*args, exist_ok=True)


_register_auto()

__all__ = [
    "BUILDERS",
    "KimiVLConfig",
    "KimiVLForConditionalGeneration",
    "KimiVLOutput",
    "KimiVLTextConfig",
    "MoonViTConfig",
    "kimi_vl_a3b",
    "kimi_vl_tiny",
]
