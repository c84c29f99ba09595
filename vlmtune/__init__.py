"""vlmtune: fine-tune Kimi-VL-style vision-language models with exact packing, rmpad and DeepSpeed ZeRO."""

__version__ = "0.1.0"
