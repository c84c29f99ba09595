"""Reading a recipe: YAML file -> relative paths resolved -> dotted overrides -> validated :class:`Recipe`.

::

    load_recipe("recipes/tiny_cpu.yaml", ["train.max_steps=4", "data.train.0.weight=2"], world_size=2)

1. The file must be a YAML mapping; a key repeated in one mapping is an error (PyYAML would keep the last).
2. Relative paths in the file (model.path, data.{train,eval}.<i>.path / image_root, train.output_dir,
   train.resume, packing.pack_dir, launch.hostfile) resolve against the recipe file's folder.
3. Each override ``a.b.c=value`` parses ``value`` as YAML (ints, floats, bools, null, lists, mappings), except
   for text fields (str, path) where the raw text is kept, so ``logging.wandb.run_name=007`` stays '007'. It is
   set in place: a mapping value merges deeply into an existing mapping, an integer part indexes a list. Paths
   given in overrides resolve against the current directory.
4. pydantic validates the result; every problem (unknown key with its closest valid key, wrong type with the
   value and the expected type, invalid combination) becomes one line of a :class:`RecipeError`.
5. The batch arithmetic is checked for the world size (argument, else launch.nproc_per_node x launch.nnodes).
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vlmtune.config.errors import RecipeError
from vlmtune.config.explain import (
    MISSING,
    accepts_text,
    field_annotation,
    field_info,
    iter_fields,
    model_of,
    type_name,
)
from vlmtune.config.schema import Recipe

#: Dotted keys holding file-system paths ("*" = any list index).
PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("model", "path"),
    ("data", "train", "*", "path"),
    ("data", "train", "*", "image_root"),
    ("data", "eval", "*", "path"),
    ("data", "eval", "*", "image_root"),
    ("train", "output_dir"),
    ("train", "resume"),
    ("packing", "pack_dir"),
    ("launch", "hostfile"),
)
_NOT_PATHS = {("train", "resume"): {"auto", "never"}}

RESOLVED_NAME = "recipe.resolved.yaml"


# ------------------------------------------------------------------------------------------------ YAML in


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping instead of silently keeping the last value."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 (PyYAML) reads `1e-3` and `1e9` as strings (its floats need a dot); read them as floats, as YAML 1.2
# does, so that untyped places (deepspeed.extra) get numbers too.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file as a plain mapping (no validation).

    Raises:
        RecipeError: the file is missing, is not valid YAML, repeats a key, or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise RecipeError(
            f"{path}: a recipe must be a YAML mapping of sections (model, data, packing, train, ...), got {got}"
        )
    return data


# ------------------------------------------------------------------------------------------------- paths


def _is_path_key(parts: tuple[str, ...]) -> bool:
    for pattern in PATH_KEYS:
        if len(pattern) == len(parts) and all(p == "*" and q.isdigit() or p == q for p, q in zip(pattern, parts)):
            return True
    return False


def _absolute(value: str | os.PathLike[str], base_dir: Path) -> str:
    path = Path(os.path.expanduser(os.fspath(value)))
    return os.path.normpath(path if path.is_absolute() else base_dir / path)


def resolve_paths(node: Any, base_dir: str | Path, parts: tuple[str, ...] = ()) -> Any:
    """Return ``node`` (a recipe mapping, or the value found at dotted key ``parts``) with relative paths made
    absolute against ``base_dir``. ``~`` expands; ``..`` collapses; symlinks are kept."""
    base_dir = Path(base_dir)
    if _is_path_key(parts):
        if isinstance(node, str | os.PathLike) and os.fspath(node) not in _NOT_PATHS.get(parts, ()):
            return _absolute(node, base_dir)
        return node
    if isinstance(node, dict):
        return {k: resolve_paths(v, base_dir, parts + (str(k),)) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_paths(v, base_dir, parts + (str(i),)) for i, v in enumerate(node)]
    return node


# --------------------------------------------------------------------------------------------- overrides


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new mapping: ``update`` laid over ``base``, recursively for mappings present in both (never shallow).
    Lists and scalars in ``update`` replace those in ``base``."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass(frozen=True)
class Override:
    """One parsed ``a.b.c=value`` override."""

    text: str
    parts: tuple[str, ...]
    value: Any


def parse_override(text: str, base_dir: str | Path | None = None) -> Override:
    """Parse ``a.b.c=value``.

    The value is read as safe YAML (``4`` -> int, ``1e-3``/``0.5`` -> float, ``true`` -> bool,
    ``null`` -> None, ``[1, 2]`` -> list, ``{a: 1}`` -> mapping), except that a field typed str or path keeps the
    raw text when YAML would turn it into something else. Path fields resolve against ``base_dir`` (default: CWD).

    Raises:
        RecipeError: malformed key, empty value, or value that is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = tuple(key.split("."))
    if not sep or not key or any(not p or p != p.strip() for p in parts) or " " in key:
        raise RecipeError(f"override `{text}`: expected `dotted.key=value`, e.g. `train.max_steps=4`")
    if raw.strip() == "":
        raise RecipeError(f"override `{text}`: empty value; write `{key}=null` for null or `{key}=''` for an empty string")
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override `{text}`: value is not valid YAML: {' '.join(str(exc).split())}") from None
    annotation = field_annotation(parts)
    if value is not None and not isinstance(value, str) and annotation is not MISSING and accepts_text(annotation):
        if not isinstance(value, list | dict):
            value = raw.strip()
    value = resolve_paths(value, Path.cwd() if base_dir is None else Path(base_dir), parts)
    return Override(text, parts, value)


def _step(node: Any, part: str, done: tuple[str, ...], nxt: str | None, ov: Override) -> Any:
    """The child ``part`` of ``node`` while walking to an override's target, creating missing mappings."""
    where = ".".join(done) or "<top level>"
    if isinstance(node, list):
        if not part.isdigit():
            raise RecipeError(f"override `{ov.text}`: `{where}` is a list; index it with a number, e.g. `{where}.0`")
        if int(part) >= len(node):
            raise RecipeError(
                f"override `{ov.text}`: index {part} is out of range for `{where}` ({len(node)} items); "
                f"set the whole list with `{where}=[...]`"
            )
        return node[int(part)]
    if not isinstance(node, dict):
        raise RecipeError(f"override `{ov.text}`: `{where}` is {node!r}, not a section, so it has no key `{part}`")
    if node.get(part) is None:
        if nxt is not None and nxt.isdigit():
            target = ".".join((*done, part))
            raise RecipeError(
                f"override `{ov.text}`: `{target}` is not in the recipe, so it has no item {nxt}; set the whole list "
                f"with `{target}=[...]`"
            )
        node[part] = {}
    return node[part]


def apply_override(tree: dict[str, Any], override: Override) -> None:
    """Set one parsed override in ``tree`` in place (deep merge for mappings, indexing for lists)."""
    node: Any = tree
    parts = override.parts
    for i, part in enumerate(parts[:-1]):
        node = _step(node, part, parts[:i], parts[i + 1], override)
    last = parts[-1]
    if isinstance(node, list):
        _step(node, last, parts[:-1], None, override)  # checks the index
        slot: int | str = int(last)
        current = node[int(last)]
    elif isinstance(node, dict):
        slot, current = last, node.get(last)
    else:
        _step(node, last, parts[:-1], None, override)  # raises: not a section
        return
    if isinstance(current, dict) and isinstance(override.value, dict):
        node[slot] = deep_merge(current, override.value)
    else:
        node[slot] = copy.deepcopy(override.value)


def apply_overrides(
    tree: dict[str, Any], overrides: Sequence[str], base_dir: str | Path | None = None
) -> dict[str, Any]:
    """A copy of ``tree`` with the ``a.b.c=value`` overrides applied in order (see :func:`parse_override`)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        apply_override(tree, parse_override(text, base_dir))
    return tree


# ------------------------------------------------------------------------------------------ error report


def _clean_loc(loc: tuple[int | str, ...]) -> tuple[str, ...]:
    """pydantic's error location with union-member tags ('int', "literal['auto','never']", ...) dropped."""
    parts: list[str] = []
    annotation: Any = Recipe
    for i, item in enumerate(loc):
        child = field_annotation((*parts, str(item)))
        if child is not MISSING:
            parts.append(str(item))
            annotation = child
        elif i == len(loc) - 1 and model_of(annotation) is not None:
            parts.append(str(item))  # an unknown key: keep it, it is what the message is about
    return tuple(parts)


def _suggest(parts: tuple[str, ...]) -> str:
    """``; did you mean `x.y`?`` for an unknown key, or the list of valid keys at that level."""
    parent = model_of(field_annotation(parts[:-1]))
    if parent is None:
        return ""
    names = list(parent.model_fields)
    close = difflib.get_close_matches(parts[-1], names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{'.'.join((*parts[:-1], close[0]))}`?"
    # The key may belong to another section (train.zero_stage -> deepspeed.zero_stage).
    keys = [doc.key for doc in iter_fields()]
    leaves = {k.rsplit(".", 1)[-1] for k in keys}
    leaf = difflib.get_close_matches(parts[-1], sorted(leaves), n=1, cutoff=0.8)
    if leaf:
        elsewhere = [k for k in keys if k.rsplit(".", 1)[-1] == leaf[0]]
        return f"; did you mean `{elsewhere[0]}`?"
    return f"; valid keys here: {', '.join(names)}"


def _origin(parts: tuple[str, ...], overrides: Sequence[Override]) -> str:
    for ov in reversed(overrides):
        n = min(len(ov.parts), len(parts))
        if n and ov.parts[:n] == parts[:n]:
            return f"override `{ov.text}`: "
    return ""


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(
    exc: ValidationError, source: str, overrides: Sequence[Override] = ()
) -> list[str]:
    """One readable line per problem of a pydantic ValidationError on a :class:`Recipe`."""
    grouped: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        grouped.setdefault(_clean_loc(err["loc"]), []).append(err)
    lines: list[str] = []
    for parts, errs in grouped.items():
        key = ".".join(parts)
        prefix = f"{source}: {_origin(parts, overrides)}"
        kinds = {e["type"] for e in errs}
        if "extra_forbidden" in kinds:
            lines.append(f"{prefix}unknown key `{key}`{_suggest(parts)}")
            continue
        if "missing" in kinds:
            info = field_info(parts)
            what = type_name(info.annotation) if info else "value"
            desc = f": {info.description}" if info and info.description else ""
            lines.append(f"{prefix}missing required key `{key}` ({what}){desc}")
            continue
        annotation = field_annotation(parts)
        if model_of(annotation) is not None and kinds <= {"value_error", "assertion_error"}:
            # A combination check of a whole section: its message already names the keys and the fix.
            for e in errs:
                for line in str(e["msg"]).removeprefix("Value error, ").splitlines():
                    lines.append(f"{source}: {line}")
            continue
        msgs = list(dict.fromkeys(str(e["msg"]).removeprefix("Value error, ") for e in errs))
        expected = type_name(annotation) if annotation is not MISSING else "?"
        value = errs[0].get("input")
        lines.append(f"{prefix}`{key}` = {_describe(value)} is invalid (expected {expected}): {'; '.join(msgs)}")
    return lines


# --------------------------------------------------------------------------------------------- the loader


def recipe_from_dict(
    data: dict[str, Any],
    overrides: Sequence[str] = (),
    world_size: int | None = None,
    *,
    source: str = "<recipe>",
    base_dir: str | Path | None = None,
) -> Recipe:
    """Validate a recipe mapping (what :func:`load_recipe` does after reading the file).

    Args:
        data: the recipe as a mapping (not modified).
        overrides: ``a.b.c=value`` strings, applied in order; their paths resolve against the CWD.
        world_size: ranks used for the batch arithmetic; None = launch.nproc_per_node x launch.nnodes.
        source: name used in error messages (the file path).
        base_dir: folder that relative paths in ``data`` resolve against (None = leave them as they are).

    Raises:
        RecipeError: listing every problem, one per line.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got a {type(data).__name__}")
    tree = resolve_paths(data, base_dir) if base_dir is not None else copy.deepcopy(data)
    parsed: list[Override] = []
    for text in overrides:
        try:
            override = parse_override(text)
            apply_override(tree, override)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
        parsed.append(override)
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        problems = format_validation_error(exc, source, parsed)
        raise RecipeError("\n".join(problems), problems) from None
    try:
        recipe.grad_accum_steps(world_size)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = (), world_size: int | None = None) -> Recipe:
    """Read, resolve, override and validate a recipe file.

    Args:
        path: the YAML recipe. Relative paths inside it resolve against its folder.
        overrides: ``a.b.c=value`` strings (``data.train.0.weight=2`` indexes a list); paths resolve against the CWD.
        world_size: ranks used to check global_batch_size / (micro_batch_size x world_size);
            None = launch.nproc_per_node x launch.nnodes.

    Returns:
        The validated recipe, paths absolute, every default filled in.

    Raises:
        RecipeError: naming the file, the dotted key, and the fix, for every problem found.
    """
    data = read_yaml(path)
    return recipe_from_dict(
        data, overrides, world_size, source=str(path), base_dir=Path(os.path.abspath(path)).parent
    )


# ----------------------------------------------------------------------------------------------- YAML out


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe (every default, absolute paths) as YAML; :func:`load_recipe` reads it back equal."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_resolved(recipe: Recipe, out_dir: str | Path) -> Path:
    """Write ``<out_dir>/recipe.resolved.yaml`` (creating ``out_dir``) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / RESOLVED_NAME
    target.write_text(dump_recipe(recipe), encoding="utf-8")
    return target


# ------------------------------------------------------------------------------------------- file checks


def check_files(recipe: Recipe) -> list[str]:
    """Warnings for files and folders the run needs but that are missing (validate prints them; train fails on them).

    Things the run will generate (model.path with model.preset, data.train.0.path with data.demo) are not reported.
    """
    warnings: list[str] = []
    model = recipe.model
    if model.path.is_dir():
        if not (model.path / "config.json").is_file():
            warnings.append(
                f"model.path {model.path} has no config.json; point model.path at an HF-style model directory"
            )
    elif model.path.exists():
        warnings.append(f"model.path {model.path} is a file; it must be a model directory (config.json + safetensors)")
    elif model.preset is None:
        warnings.append(
            f"model.path {model.path} does not exist; point it at a model directory, or set model.preset: tiny to "
            "generate the tiny model there"
        )
    for split, specs in (("train", recipe.data.train), ("eval", recipe.data.eval or [])):
        for i, spec in enumerate(specs):
            # data.demo writes train.jsonl and eval.jsonl into the folder of data.train.0.path.
            generated = recipe.data.demo and spec.path.parent == recipe.data.train[0].path.parent and (
                spec.path.name == f"{split}.jsonl"
            )
            if not spec.path.exists() and not generated:
                hint = " (or set data.demo: true to generate the demo data there)" if split == "train" and i == 0 else ""
                warnings.append(f"data.{split}.{i}.path {spec.path} does not exist{hint}")
            if spec.image_root is not None and not spec.image_root.is_dir():
                warnings.append(f"data.{split}.{i}.image_root {spec.image_root} is not a directory")
    hostfile = recipe.launch.hostfile
    if hostfile is not None and not hostfile.is_file():
        warnings.append(f"launch.hostfile {hostfile} does not exist")
    resume = recipe.train.resume
    if isinstance(resume, Path) and not resume.exists():
        warnings.append(f"train.resume {resume} does not exist; use auto, never, or an existing checkpoint folder")
    if recipe.logging.wandb.enabled and importlib.util.find_spec("wandb") is None:
        warnings.append("logging.wandb.enabled is true but wandb is not installed; `pip install wandb`")
    if model.attention == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        warnings.append("model.attention is flash_attn but flash-attn is not installed; `pip install vlmtune[gpu]`")
    return warnings
