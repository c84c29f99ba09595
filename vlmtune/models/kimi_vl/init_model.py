"""`vlmtune init-model`: write a complete, randomly initialised Kimi-VL model directory (or a weightless A3B one).

    vlmtune init-model --preset tiny --out DIR [--seed S]    # the embedded demo / test model, CPU-sized
    vlmtune init-model --preset a3b --out DIR --meta         # A3B configs only, for planning without the checkpoint

What a directory holds (every file loads with the matching ``from_pretrained``)::

    file                       tiny                                       a3b --meta
    config.json                kimi_vl_tiny(num_base_tokens=1024)          kimi_vl_a3b()
    model.safetensors          random init (seed), fp32, published names   -- (no weights)
    generation_config.json     bos / eos / pad ids of text_config          same
    tiktoken.model             768-merge BPE, 1024 ranks (see below)       -- (163,584 published ranks: not producible)
    tokenizer_config.json      Kimi special tokens at their published      same, at 163584 + offset ([BOS] 163584,
                               offsets after the ranks + chat template      <|media_pad|> 163605, [PAD] 163839)
    chat_template.jinja        the Kimi-VL chat template                   same
    preprocessor_config.json   in_token_limit 1024, pad_input, 0.5/0.5     A3B values (in_token_limit 4096)

The tiny tokenizer's ranks are trained on :data:`TINY_CORPUS` (a few KB of plain English written for vlmtune) plus the
demo data's questions, answers and vocabulary (``data_tools.demo_data``), one per line and repeated, so that every demo
answer is one token and every demo question one token per word or punctuation mark, as they appear in the data. Its 256 special ids follow the 1024 ranks at the published offsets
(``[BOS]`` 1024, ``<|media_pad|>`` 1045, ``[PAD]`` 1279; vocab 1280), which is what ``kimi_vl_tiny(num_base_tokens=1024)``
puts in config.json. The tiny model (0.83 M parameters, 3.3 MB: text hidden 96, 3 layers, 8 experts top-2 in 2 groups;
MoonViT hidden 64, 2 blocks) keeps the demo images small with in_token_limit 1024 (~256 LM tokens per image at most,
up to ~300 after padding to 28 px; the demo train split averages 118).

Same preset and seed -> byte-identical files. The directory is written next to its destination and renamed into
place, so an interrupted run never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from vlmtune.data.chat_template import KIMI_VL_CHAT_TEMPLATE
from vlmtune.data.special_tokens import NUM_RESERVED_SPECIAL_TOKENS

from .configuration import KimiVLConfig, kimi_vl_a3b, kimi_vl_tiny
from .image_processing import KimiVLImageProcessor
from .tokenization import CONFIG_FILE, RANKS_FILE, build_tokenizer_files, tokenizer_config_dict
from .vlm import KimiVLForConditionalGeneration

PRESETS = ("tiny", "a3b")
TINY_NUM_MERGES = 768  # -> 1024 ranks; the corpus below supports ~1080 merges
TINY_NUM_BASE_TOKENS = 256 + TINY_NUM_MERGES
TINY_IN_TOKEN_LIMIT = 1024
DEMO_LINE_REPEATS = 8  # the demo lines outweigh the prose, so their words are merged first
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


class InitModelError(ValueError):
    """A request `init-model` cannot carry out (the message says why and what to do)."""


# ----------------------------------------------------------------------------------------------------- content
def tiny_tokenizer_corpus() -> str:
    """The tiny tokenizer's training text: TINY_CORPUS, then the demo lines (questions, answers, vocabulary, the chat
    template's words), one per line, DEMO_LINE_REPEATS times."""
    from data_tools.demo_data import ANSWER_SETS, QUESTION_TEMPLATES, REPEAT_WORDS, _vocabulary
    from vlmtune.data.special_tokens import DEFAULT_SYSTEM_PROMPT

    questions = [t.format(word=w) for t in QUESTION_TEMPLATES.values() for w in REPEAT_WORDS]
    answers = [a for values in ANSWER_SETS.values() for a in values]
    template_words = ["system", "user", "assistant", "image", DEFAULT_SYSTEM_PROMPT]
    lines = "\n".join(questions + answers + _vocabulary() + template_words)
    return TINY_CORPUS + ("\n" + lines) * DEMO_LINE_REPEATS + "\n"


def _generation_config(config: KimiVLConfig) -> dict[str, Any]:
    text = config.text_config
    return {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id}


def _check_special_ids(config: KimiVLConfig, named: dict[str, int], where: Path) -> None:
    """The tokenizer's special ids must be the ones config.json uses (media placeholder, bos / eos / pad)."""
    text = config.text_config
    want = {"<|media_pad|>": config.media_placeholder_token_id, "[BOS]": text.bos_token_id,
            "[EOS]": text.eos_token_id, "[PAD]": text.pad_token_id}
    wrong = {name: (named.get(name), token_id) for name, token_id in want.items() if named.get(name) != token_id}
    if wrong:
        raise InitModelError(f"{where}: tokenizer and config.json disagree on special ids (tokenizer, config): {wrong}")


def _write_tiny(folder: Path, seed: int, meta: bool) -> None:
    tokenizer = build_tokenizer_files(folder, tiny_tokenizer_corpus(), TINY_NUM_MERGES)
    config = kimi_vl_tiny(num_base_tokens=TINY_NUM_BASE_TOKENS)
    if tokenizer.vocab_size != config.text_config.vocab_size:
        raise InitModelError(f"tokenizer vocab {tokenizer.vocab_size} != config vocab {config.text_config.vocab_size}")
    _check_special_ids(config, tokenizer.special_tokens, folder)
    if meta:
        config.save_pretrained(folder)
        (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(_generation_config(config), indent=2,
                                                                sort_keys=True) + "\n")
    else:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            model = KimiVLForConditionalGeneration(config)
            model.init_weights(seed)
        model.save_pretrained(folder)  # config.json, model.safetensors, generation_config.json
    KimiVLImageProcessor.kimi_vl_a3b(in_token_limit=TINY_IN_TOKEN_LIMIT).save_pretrained(folder)
    (folder / CHAT_TEMPLATE_FILE).write_text(KIMI_VL_CHAT_TEMPLATE, encoding="utf-8")


def _write_a3b(folder: Path) -> None:
    config = kimi_vl_a3b()
    config.save_pretrained(folder)
    (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(_generation_config(config), indent=2, sort_keys=True)
                                                 + "\n")
    num_base = config.text_config.vocab_size - NUM_RESERVED_SPECIAL_TOKENS  # 163584
    tok_config = tokenizer_config_dict(num_base, chat_template=KIMI_VL_CHAT_TEMPLATE)
    named = {entry["content"]: int(i) for i, entry in tok_config["added_tokens_decoder"].items()}
    _check_special_ids(config, named, folder)
    (folder / CONFIG_FILE).write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    KimiVLImageProcessor.kimi_vl_a3b().save_pretrained(folder)
    (folder / CHAT_TEMPLATE_FILE).write_text(KIMI_VL_CHAT_TEMPLATE, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------- API
def init_model(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0, meta: bool = False,
               overwrite: bool = False) -> Path:
    """Write a Kimi-VL model directory (see the module docstring for the files).

    Args:
        out_dir: the directory to create. It must be absent or empty unless ``overwrite``.
        preset: ``tiny`` (random weights, locally built tokenizer) or ``a3b`` (needs ``meta``).
        seed: weight initialisation seed (tiny); the same seed gives byte-identical files.
        meta: write no weights (config.json, generation / tokenizer / processor configs, chat template only).
        overwrite: replace an existing non-empty ``out_dir`` entirely.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        InitModelError: unknown preset, ``a3b`` without ``meta``, a non-integer seed, or a non-empty ``out_dir``
            without ``overwrite``.
    """
    if preset not in PRESETS:
        raise InitModelError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "a3b" and not meta:
        raise InitModelError("preset a3b has 16.41 B parameters (~33 GB in bf16): random weights of that size are not "
                             "written; pass --meta for the configs alone, or point model.path at the published "
                             "Kimi-VL-A3B checkpoint")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InitModelError(f"seed must be an integer, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InitModelError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InitModelError(f"--out {out} is not empty; give a new or empty directory, or pass --overwrite to "
                             "replace its contents")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.init-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # (not mkdtemp: the directory keeps the user's umask, not mode 0700)
    try:
        if preset == "tiny":
            _write_tiny(staging, seed, meta)
        else:
            _write_a3b(staging)
        if out.is_dir():  # empty, or overwrite: move the old one aside, then swap in the new one
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            staging.rename(out)
            shutil.rmtree(trash)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


# ----------------------------------------------------------------------------------------------------------- CLI
def _summary(out: Path) -> str:
    config = KimiVLConfig.from_pretrained(out)
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    sizes = {part: sum(p.numel() for p in getattr(model, part).parameters())
             for part in ("vision_tower", "multi_modal_projector", "language_model")}
    text = config.text_config
    files = ", ".join(f"{f.name} ({f.stat().st_size:,} B)" for f in sorted(out.iterdir()))
    return (f"parameters {sum(sizes.values()):,} (vision {sizes['vision_tower']:,}, projector "
            f"{sizes['multi_modal_projector']:,}, language model {sizes['language_model']:,})\n"
            f"vocab {text.vocab_size} (bos {text.bos_token_id}, eos {text.eos_token_id}, pad {text.pad_token_id}, "
            f"media placeholder {config.media_placeholder_token_id})\nfiles: {files}")


def main(argv: list[str] | None = None) -> int:
    """`vlmtune init-model --preset {tiny,a3b} --out DIR [--seed S] [--meta] [--overwrite]`."""
    parser = argparse.ArgumentParser(
        prog="vlmtune init-model",
        description="Write a complete Kimi-VL model directory: the tiny demo model with random weights and a locally "
        "built tokenizer, or (with --meta) the A3B configs without weights.")
    parser.add_argument("--preset", choices=PRESETS, default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--out", type=Path, required=True, help="directory to create (absent or empty)")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed; same seed -> identical bytes")
    parser.add_argument("--meta", action="store_true", help="configs only, no weights (required for a3b)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = init_model(args.out, preset=args.preset, seed=args.seed, meta=args.meta, overwrite=args.overwrite)
    except InitModelError as err:
        print(f"init-model: error: {err}", file=sys.stderr)
        return 2
    weights = "no weights (--meta)" if args.meta else f"random weights, seed {args.seed}"
    print(f"wrote Kimi-VL preset {args.preset} to {out}: {weights}")
    print(_summary(out))
    if args.preset == "a3b":
        print(f"note: no {RANKS_FILE} (the published 163,584 BPE ranks cannot be produced here): "
              "KimiTokenizer.from_pretrained needs the checkpoint's tokenizer files")
    return 0


# Plain English written for vlmtune's tiny tokenizer (no third-party text). Everyday vocabulary, numbers and
# punctuation, plus a little about colours, shapes and images, in the register of the demo questions.
TINY_CORPUS = """\
The morning was cool and bright when the small boat left the harbour. A light wind came from the west, and the
water was calm enough that the children could sit at the front and watch the gulls. Their father held the rope
while their mother read the map and pointed at the island they wanted to reach before noon.

People have always told stories about the sea. Some stories are about storms and lost ships, others about long
journeys that end in a quiet village where everyone knows your name. The best stories are simple: someone wants
something, something stands in the way, and in the end they learn what really matters.

In the city, the day begins early. Shops open their doors, buses fill with workers, and the smell of fresh bread
drifts out of the bakery on the corner. A woman in a blue coat buys two loaves and a cup of coffee, then hurries
across the street to catch her train. An old man feeds the birds in the park, as he has done every morning for
many years.

Learning a new language takes time and patience. At first every word seems strange, and even short sentences are
hard to understand. After a few weeks, however, common words start to feel familiar, and you begin to guess the
meaning of new ones from the words around them. Reading a little every day helps more than studying for hours
once a week.

Computers follow instructions exactly. If a program tells the machine to add two numbers, it will add them,
whether or not the result makes sense. This is why good programs are written carefully and tested often. A test
checks that the program gives the right answer for a known question, so that a mistake is found early instead of
late.

A picture can show what many words cannot. When you look at an image, you notice its colours first: the red of a
roof, the green of a field, the blue of the sky, the yellow of a flower. Then you see the shapes: a round sun, a
square window, a triangle of mountains against the clouds. Finally you compare things, and decide which part is
brighter, which is darker, and which object is the first one your eye finds.

Children often learn colours and shapes before they learn to read. A teacher might hold up a card and ask, what
color is the shape? The child answers red, or green, or blue. Then the teacher asks, what shape is it? and the
child says circle, square, or triangle. Later the questions grow harder: which image is brighter, the first or
the second? Which image has the red shape, the first, the second, or the third?

Animals are a favourite topic for young readers. The cat sleeps in the sun, the dog runs after a ball, the fish
swims in a glass bowl, and the bird sings from the top of a tree. Each animal has its own habits, and children
enjoy repeating their names: cat, dog, fish, bird. When asked to repeat the word, they say it again with a
smile.

Good writing is clear. It uses short words when short words will do, and it puts the most important idea at the
start of the sentence. A reader should never have to guess what the writer means. If a sentence can be read in
two ways, it should be rewritten until it can be read in only one.

Weather changes from hour to hour near the mountains. A clear sky at breakfast can turn grey by lunch, and rain
may fall in the afternoon before the sun returns in the evening. Walkers who know the area always carry a warm
jacket, some water, and a little food, even on a fine summer day.

Numbers are everywhere. There are seven days in a week, twelve months in a year, and sixty minutes in an hour. A
recipe may ask for two cups of flour, one egg, and half a spoon of salt. A train may leave at ten past eight and
arrive at a quarter to eleven. We count, measure, and compare all day long, often without noticing.

Markets are busy places. Farmers bring fruit and vegetables from the country, and buyers walk slowly between the
tables, looking for the best apples and the freshest greens. There is talk and laughter, the sound of coins, and
the call of a seller who wants to finish early and go home.

Science begins with a question. Why is the sky blue? Why do leaves turn red and yellow in autumn? Why does a
stone fall faster than a feather in the air, but not on the moon? A scientist makes a guess, designs an
experiment, and looks carefully at the result. If the result does not match the guess, the guess must change.

Friendship is built from small things: a message when someone is ill, a meal shared after a long day, a walk
together in the rain. Friends do not always agree, but they listen to each other, and they are honest even when
honesty is difficult. Over the years, these small things add up to something large and lasting.

A helpful assistant listens to the question, thinks about what the person really needs, and gives an answer that
is short, correct, and kind. If the assistant does not know, it says so. If the question is unclear, it asks for
more detail. The user can then decide what to do next.

Libraries keep the memory of a town. On their shelves are books about history and travel, cooking and gardening,
music and art. Anyone may come in, sit at a table by the window, and read for as long as they like. The
librarian helps people find what they are looking for, and sometimes what they did not know they wanted.
"""

if __name__ == "__main__":
    sys.exit(main())

