"""The `vlmtune` command line: ``vlmtune COMMAND [options] [dotted.key=value ...]``.

Commands live in the plain dict :data:`COMMANDS` (name -> (one-line help, "module:function")); each is imported
only when run and is a function ``fn(argv: list[str]) -> int``. Options and ``key=value`` overrides may come in
any order (:func:`split_overrides`)::

    vlmtune validate recipes/tiny_cpu.yaml train.max_steps=4 --explain packing.packing_length=512

Recipe and usage errors print one ``error:`` line per problem, no traceback, and exit 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Callable, Collection, Sequence

from vlmtune.config import RecipeError, check_files, dump_recipe, explain, load_recipe

#: name -> (one-line help, "module.path:function"). Only commands that work are listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": (
        "check a recipe: print it fully resolved with missing-file warnings (--explain documents every field)",
        "vlmtune.cli:validate",
    ),
    "demo-data": ("generate the deterministic demo data set (images + train/eval jsonl)", "data_tools.demo_data:main"),
    "pack": ("count exact lengths and pack datasets into fixed-length buffers (manifest + shards + stats)",
             "vlmtune.data.pack_cli:main"),
    "inspect-pack": ("show one packed buffer: samples, positions, image spans, label mask",
                     "vlmtune.data.pack_cli:inspect_main"),
    "init-model": ("write a model directory: the tiny demo model (random weights) or the A3B configs (--meta)",
                   "vlmtune.models.kimi_vl.init_model:main"),
    "export": ("export a training checkpoint as an HF-format model dir (full, --merge-lora or --adapter-only)",
               "vlmtune.train.export:main"),
    "generate": ("answer a prompt about images with a model dir (greedy or sampling, MLA KV cache)",
                 "vlmtune.generate:main"),
    "launch": ("run vlmtune train on several processes/nodes (torchrun, DeepSpeed hostfile) or render a SLURM script",
               "vlmtune.launch.launcher:main"),
    "plan": ("per-GPU memory per ZeRO stage and offload, activations per packing_length, what fits; no weights needed",
             "vlmtune.launch.plan:main"),
    "reshard": ("consolidate a checkpoint's ZeRO partitions ahead of a world-size change",
                "vlmtune.train.reshard:main"),
    "train": ("train a recipe with DeepSpeed ZeRO (one process, or under torchrun / vlmtune launch)",
              "vlmtune.train.trainer:main"),
}

EXIT_USAGE = 2


class UsageError(Exception):
    """A command line that cannot run (unknown command, missing module, bad option); exits 2 without traceback."""


# ------------------------------------------------------------------------------------ overrides vs. options


def _is_override(token: str) -> bool:
    return "=" in token and not token.startswith("-")


def split_overrides(argv: Sequence[str], takes_value: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """Separate ``dotted.key=value`` overrides from everything else, in any order.

    A token containing ``=`` that does not start with ``-`` is an override, unless it is the value of an option
    listed in ``takes_value`` (``--out a=b``). Everything after ``--`` goes to the options untouched.

    Args:
        argv: the command's arguments.
        takes_value: option strings that consume the next token (e.g. ``{"--world-size"}``).

    Returns:
        (options for argparse, overrides in their original order).
    """
    options: list[str] = []
    overrides: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            options.extend(tokens[i:])
            break
        if token in takes_value and i + 1 < len(tokens):
            options.extend(tokens[i : i + 2])
            i += 2
            continue
        (overrides if _is_override(token) else options).append(token)
        i += 1
    return options, overrides


def parse_with_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, list[str]]:
    """``parser.parse_args`` on the options of ``argv``, plus the ``key=value`` overrides found anywhere in it.

    Options of ``parser`` that take a value keep that value even when it contains ``=``.
    """
    takes_value = {
        flag for action in parser._actions if action.nargs != 0 for flag in action.option_strings
    }
    options, overrides = split_overrides(argv, takes_value)
    return parser.parse_args(options), overrides


# ------------------------------------------------------------------------------------------------ commands


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def validate(argv: list[str]) -> int:
    """``vlmtune validate RECIPE [key=value ...] [--explain] [--world-size N]``.

    Prints the fully resolved recipe as YAML (every default, absolute paths) on stdout, missing files as
    ``warning:`` lines on stderr, and with ``--explain`` every field of the schema. Exit 0 when the recipe is
    valid (warnings included); a RecipeError propagates to :func:`main` (exit 2).
    """
    parser = argparse.ArgumentParser(
        prog="vlmtune validate",
        description="Check a recipe without loading any model or data. key=value overrides may come anywhere.",
    )
    parser.add_argument("recipe", nargs="?", help="the YAML recipe (omit it with --explain to list the schema)")
    parser.add_argument("--explain", action="store_true", help="list every field: key, type, default, description")
    parser.add_argument(
        "--world-size", type=_positive_int, default=None,
        help="ranks to check the batch arithmetic for (default: launch.nproc_per_node x launch.nnodes)",
    )
    args, overrides = parse_with_overrides(parser, argv)
    if args.recipe is None:
        if not args.explain:
            parser.error("a RECIPE is required (or --explain alone to list the schema)")
        if overrides:
            parser.error(f"overrides need a RECIPE: {' '.join(overrides)}")
        sys.stdout.write(explain())
        return 0

    recipe = load_recipe(args.recipe, overrides, world_size=args.world_size)
    world = recipe.world_size(args.world_size)
    train = recipe.train
    header = f"# {args.recipe}" + (f" with {' '.join(overrides)}" if overrides else "")
    print(header)
    print(
        f"# world size {world}: {train.micro_batch_size} packs/rank/micro-step x {recipe.grad_accum_steps(world)} "
        f"accumulation steps = {train.global_batch_size} packs/optimizer step; warmup {train.warmup_steps} of "
        f"{train.max_steps} steps"
    )
    sys.stdout.write(dump_recipe(recipe))
    if args.explain:
        print()
        sys.stdout.write(explain(recipe))
    for warning in check_files(recipe):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------------------- main


def _resolve(name: str) -> Callable[[list[str]], int]:
    """Import the function behind command ``name``."""
    target = COMMANDS[name][1]
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the command's own module being absent is a usage error; a missing dependency inside it is a bug.
        if exc.name is not None and module_name.startswith(exc.name):
            raise UsageError(f"command `{name}` is not available: module {module_name} is not installed") from None
        raise
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UsageError(f"command `{name}` is broken: {module_name} has no function {func_name}")
    return fn


def _help() -> str:
    width = max(len(name) for name in COMMANDS) + 2
    lines = ["usage: vlmtune COMMAND [options] [dotted.key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}{helptext}" for name, (helptext, _) in COMMANDS.items()]
    lines += [
        "",
        "Options and key=value recipe overrides may come in any order. `vlmtune COMMAND --help` for a command's options.",
    ]
    return "\n".join(lines)


def _error(message: str) -> None:
    for line in message.splitlines() or [message]:
        print(f"error: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlmtune`` console script.

    Args:
        argv: arguments without the program name (None = ``sys.argv[1:]``).

    Returns:
        The exit status: the command's, 2 for usage and recipe errors.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_help(), file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_USAGE
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else f"; commands: {', '.join(COMMANDS)}"
        _error(f"unknown command `{name}`{hint}")
        return EXIT_USAGE
    try:
        return int(_resolve(name)(rest) or 0)
    except (RecipeError, UsageError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        _error(str(exc.code))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `vlmtune validate R.yaml | head`: the reader left, nothing is wrong
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        return 0
