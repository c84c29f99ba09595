"""Walking the schema: dotted keys, readable types, and the `--explain` listing of every field."""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from vlmtune.config.schema import Recipe

#: Stands for "this dotted key does not exist in the schema".
MISSING: Any = object()


def _members(annotation: Any) -> list[Any]:
    """Members of a union (None left out), or ``[annotation]`` for a plain type."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def model_of(annotation: Any) -> type[BaseModel] | None:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def descend(annotation: Any, part: str) -> Any:
    """The annotation one dotted step below ``annotation`` (a field, a list index, a mapping key), or MISSING."""
    model = model_of(annotation)
    if model is not None:
        field = model.model_fields.get(part)
        return MISSING if field is None else field.annotation
    for member in _members(annotation):
        origin = get_origin(member)
        if origin in (list, tuple) and part.isdigit():
            args = [a for a in get_args(member) if a is not Ellipsis]
            return args[min(int(part), len(args) - 1)] if args else Any
        if origin is dict or member is dict:
            args = get_args(member)
            return args[1] if args else Any
        if member is Any:
            return Any
    return MISSING


def field_annotation(parts: tuple[str, ...] | list[str]) -> Any:
    """Annotation of the dotted key ``parts`` (e.g. ``("data", "train", "0", "path")``), or MISSING."""
    annotation: Any = Recipe
    for part in parts:
        annotation = descend(annotation, part)
        if annotation is MISSING:
            return MISSING
    return annotation


def field_info(parts: tuple[str, ...] | list[str]) -> FieldInfo | None:
    """The pydantic FieldInfo of a dotted key (None for list items, mapping entries or unknown keys)."""
    if not parts:
        return None
    parent = model_of(field_annotation(parts[:-1]))
    return None if parent is None else parent.model_fields.get(parts[-1])


def accepts_text(annotation: Any) -> bool:
    """Whether a field takes free text (str or a path), so that `x=123` must stay the string '123'."""
    return any(m in (str, Path) for m in _members(annotation))


def type_name(annotation: Any) -> str:
    """Readable type: ``int``, ``float | null``, ``auto | never | path``, ``list[dataset]``."""
    if annotation is Any:
        return "any"
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        names = [type_name(m) for m in _members(annotation)]
        if type(None) in get_args(annotation):
            names.append("null")
        return " | ".join(names)
    if origin is Literal:
        return " | ".join(str(v) for v in get_args(annotation))
    if origin is list:
        return f"list[{type_name(get_args(annotation)[0])}]"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in get_args(annotation)) + "]"
    if origin is dict or annotation is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "dataset" if annotation.__name__ == "DatasetSpec" else "section"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


@dataclass(frozen=True)
class FieldDoc:
    """One documented field of the schema."""

    key: str  # dotted, list items as `<i>`: data.train.<i>.path
    type: str
    default: str  # "required", or the default as YAML would read it
    description: str


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    return str(value) if not isinstance(value, str) else value


def iter_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> Iterator[FieldDoc]:
    """Every field of ``model``, depth first, sections before their fields, list items as ``<i>``."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        yield FieldDoc(key, type_name(info.annotation), _default_text(info), info.description or "")
        sub = model_of(info.annotation)
        if sub is not None:
            yield from iter_fields(sub, f"{key}.")
            continue
        for member in _members(info.annotation):
            if get_origin(member) is list:
                item = model_of(get_args(member)[0])
                if item is not None:
                    yield from iter_fields(item, f"{key}.<i>.")


def _value_at(recipe: BaseModel, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        if part == "<i>" or node is None:
            return MISSING
        node = getattr(node, part, MISSING)
        if node is MISSING:
            return MISSING
    return node


def explain(recipe: Recipe | None = None, width: int = 110) -> str:
    """Every field of the schema: dotted key, type, default, description (and the recipe's value when it differs).

    Args:
        recipe: when given, fields whose value differs from the default show ``value: ...``.
        width: wrap descriptions to this many columns.

    Returns:
        The listing, one block per field.
    """
    import textwrap

    lines: list[str] = []
    for doc in iter_fields():
        is_section = doc.type == "section"
        if is_section:
            head = f"{doc.key}  (section{', required' if doc.default == 'required' else ''})"
        else:
            head = f"{doc.key}  ({doc.type}, default: {doc.default})"
        if recipe is not None and not is_section:
            value = _value_at(recipe, doc.key)
            if value is not MISSING and not isinstance(value, BaseModel | list):
                shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
                if shown != doc.default:
                    head += f"  value: {shown}"
        lines.append(head)
        lines.extend(textwrap.wrap(doc.description, width=width, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines) + "\n"
