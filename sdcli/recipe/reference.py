"""The recipe reference: the table of every key, its type, default and meaning that README.md
prints, generated from the schema (tests/unit/test_readme.py keeps the two equal)."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel

from sdcli.recipe.schema import Recipe
from sdcli.recipe.signal_sections import SIGNAL_CLASSES


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is Annotated:
        return _type_name(args[0])
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if args:  # a Union, written X | Y
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    return getattr(ann, "__name__", str(ann))


def recipe_reference_markdown() -> str:
    """The recipe reference table in README.md, generated from the schema (a test keeps them equal)."""

    def describe(model: type[BaseModel], prefix: str) -> list[str]:
        rows = []
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            nested = [a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            if nested and name != "signal":
                rows += describe(nested[0], f"{key}.")
                continue
            if name == "signal":
                continue
            default = field.default
            if isinstance(default, enum.Enum):
                default = default.value
            if isinstance(ann, type) and issubclass(ann, enum.Enum):
                kind = " \\| ".join(m.value for m in ann)
            else:
                kind = _type_name(ann).replace("|", "\\|")
            if field.default_factory is not None:
                default = field.default_factory()
            shown = "required" if field.is_required() else f"`{default!s}`".replace("\n", "\\n")
            if isinstance(default, str) and len(default) > 40:
                shown = "(see `sd validate`)" if "{" in default else f"`{default[:37]}...`"
            doc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{key}` | {kind} | {shown} | {doc} |")
        return rows

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += describe(Recipe, "")
    for signal in SIGNAL_CLASSES.values():
        lines += describe(signal, "signal.")
    return "\n".join(lines)
