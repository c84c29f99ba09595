"""`vlmtune generate MODEL_DIR --image PATH --prompt TEXT`: answer a prompt about images with a Kimi-VL model.

    vlmtune generate runs/demo/export --image cat.png --prompt "What colour is the shape?"
    vlmtune generate DIR --image a.png --image b.png --prompt "Which is brighter?" --temperature 0.7 --top-p 0.9 --seed 1

MODEL_DIR is a model directory (config.json + safetensors + tokenizer and processor files, e.g. from `vlmtune export`)
or an adapter-only export (adapter_config.json whose ``base_model_name_or_path`` names the base model directory).
The prompt goes through the Kimi-VL chat template as one user turn (images first, then the text) with the generation
prompt; the reply is decoded greedily (default) or sampled (``--temperature > 0``, optional ``--top-p``, ``--seed``)
with the MLA KV cache, until <|im_end|>, [EOS] or ``--max-new-tokens``. The reply goes to stdout, a one-line summary
to stderr. Python: :func:`generate`, :func:`load_for_generation`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtune.models.kimi_vl.generation import (
    GenerationError,
    SamplingParams,
    build_prompt,
    generate_ids,
    stop_token_ids,
)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load_for_generation(model_dir: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> tuple[nn.Module, Any, Any]:
    """Model, tokenizer and image processor of a model directory or an adapter-only export.

    Args:
        model_dir: config.json + weights + tokenizer / processor files; or adapter_config.json + adapter weights
            (+ the tokenizer / processor files, which `vlmtune export --adapter-only` copies in), on top of the base
            model named by ``base_model_name_or_path``.
        dtype: cast the weights (None = as stored).
        device: where the model runs.

    Returns:
        (model (a peft model for an adapter dir), KimiTokenizer, KimiVLImageProcessor).
    """
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.tokenization import KimiTokenizer

    folder = Path(model_dir)
    if not folder.is_dir():
        raise GenerationError(f"{folder} is not a directory: give a model directory (e.g. from `vlmtune export`)")
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file() and not (folder / "config.json").is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise GenerationError(f"{adapter_cfg}: no base_model_name_or_path; cannot tell which base model the "
                                  "adapters go on")
        base_dir = Path(base_path) if Path(base_path).is_absolute() else folder / base_path
        if not (base_dir / "config.json").is_file():
            raise GenerationError(f"{adapter_cfg}: base model {base_dir} has no config.json; restore it or edit "
                                  "base_model_name_or_path")
        base = KimiVLForConditionalGeneration.from_pretrained(base_dir, dtype=dtype, device=device)
        model: nn.Module = PeftModel.from_pretrained(base, str(folder))
    else:
        model = KimiVLForConditionalGeneration.from_pretrained(folder, dtype=dtype, device=device)
    model.eval()
    return model, KimiTokenizer.from_pretrained(folder), KimiVLImageProcessor.from_pretrained(folder)


def generate(
    model: nn.Module,
    tokenizer: Any,
    processor: Any,
    messages_or_prompt: str | Sequence[dict[str, Any]],
    images: Sequence[Any] = (),
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The model's reply to a prompt about images.

    Args:
        model: a Kimi-VL model (or a peft wrapper of one), not rmpad-patched.
        tokenizer: its ``KimiTokenizer``. processor: its ``KimiVLImageProcessor``.
        messages_or_prompt: a user prompt string (images first in the turn, then the text) or a message list whose
            ``{"type": "image"}`` blocks match ``images`` in order.
        images: PIL images or file paths.
        max_new_tokens: reply length limit.
        do_sample: False = greedy; True = sampling with ``temperature`` and ``top_p``, seeded by ``seed``.

    Returns:
        the decoded reply, without the stop token.
    """
    prompt = build_prompt(tokenizer, processor, messages_or_prompt, images)
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                            seed=seed)
    result = generate_ids(model, prompt.input_ids, prompt.pixel_values, prompt.image_grid_hws, params,
                          stop_token_ids(tokenizer))
    return tokenizer.decode(result.token_ids)


def main(argv: list[str]) -> int:
    """`vlmtune generate MODEL_DIR --image PATH [--image PATH2] --prompt TEXT [options]`."""
    parser = argparse.ArgumentParser(prog="vlmtune generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="model directory (or adapter-only export)")
    parser.add_argument("--image", type=Path, action="append", default=[], help="an image file (repeatable, in order)")
    parser.add_argument("--prompt", required=True, help="the question / instruction (one user turn)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="reply length limit (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy decoding (default); > 0 = sampling at this temperature")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (needs --temperature > 0)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (needs --temperature > 0; default 0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weight dtype (default: as stored)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-cache", action="store_true",
                        help="decode without the KV cache (re-run the full forward each step; a slow reference)")
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error(f"--temperature {args.temperature}: give 0 (greedy) or a positive value")
    sampling = args.temperature > 0
    if not sampling and (args.top_p is not None or args.seed is not None):
        parser.error("--top-p and --seed apply to sampling only: add --temperature > 0 (e.g. --temperature 1)")
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=sampling,
                                temperature=args.temperature if sampling else 1.0,
                                top_p=1.0 if args.top_p is None else args.top_p,
                                seed=0 if args.seed is None else args.seed)
        model, tokenizer, processor = load_for_generation(args.model_dir, DTYPES[args.dtype], args.device)
        prompt = build_prompt(tokenizer, processor, args.prompt, args.image)
        t0 = time.perf_counter()
        result = generate_ids(model, prompt.input_ids, prompt.pixel_values, prompt.image_grid_hws, params,
                              stop_token_ids(tokenizer), use_cache=not args.no_cache)
        dt = time.perf_counter() - t0
    except (GenerationError, FileNotFoundError, ValueError) as err:
        print(f"vlmtune generate: error: {err}", file=sys.stderr)
        return 1
    print(tokenizer.decode(result.token_ids))
    stop = tokenizer.id_to_token(result.stop_token_id) if result.stop_token_id is not None else "max-new-tokens"
    print(f"[{len(result.token_ids)} tokens, prompt {prompt.input_ids.shape[1]} tokens, stop: {stop}, {dt:.2f} s]",
          file=sys.stderr)
    return 0
