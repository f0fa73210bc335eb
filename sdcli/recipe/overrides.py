"""Command-line overrides, `key=value`: parsing them, refusing one of the wrong shape (a value
for a whole section, a key under a value), and applying them to the recipe's mapping."""

from __future__ import annotations

from typing import Any, get_args

import yaml
from pydantic import BaseModel

from sdcli.core.errors import RecipeError
from sdcli.recipe.schema import Recipe
from sdcli.recipe.signal_sections import SIGNAL_CLASSES, DemonstrationsSignal


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[tuple[str, ...]]:
    """Set each `key=value` of `overrides` in `data`, in order; the key paths the command line set."""
    from_cli: set[tuple[str, ...]] = set()
    budget = {"max_steps": "epochs", "epochs": "max_steps"}
    for text_override in overrides:
        keys, value = parse_override(text_override)
        _check_override_shape(text_override, keys, value, data)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        if isinstance(value, dict) and isinstance(node.get(keys[-1]), dict):
            _merge_into(node[keys[-1]], value)  # `model={dtype: float32}` sets one key, it keeps the others
            from_cli.update(tuple(keys) + (str(k),) for k in value)
        else:
            node[keys[-1]] = value
        from_cli.add(tuple(keys))
        if keys[:1] == ["train"] and len(keys) == 2 and keys[1] in budget and value is not None:
            # one budget on the command line replaces the recipe's other one: `train.max_steps=10`
            # on a recipe that counts epochs is a shorter run, not a conflict. Setting one to null
            # chooses neither, so it leaves the other alone (`train.max_steps=4 train.epochs=null`)
            node.pop(budget[keys[1]], None)
    return from_cli


def _schema_at(keys: list[str], data: dict) -> tuple[str, Any, bool]:
    """What the recipe schema has at `keys`: ("section", its class, nullable), ("value", None,
    nullable) or ("unknown", None, False). The signal section is the one of the recipe's kind."""
    cls: Any = Recipe
    kind, optional = "section", False
    for key in keys:
        if kind != "section" or key not in cls.model_fields:
            return "unknown", None, False
        ann = cls.model_fields[key].annotation
        args = get_args(ann) or (ann,)
        optional = type(None) in args
        if cls is Recipe and key == "signal":
            given = data.get("signal")
            args = (SIGNAL_CLASSES.get(given.get("kind", "demonstrations") if isinstance(given, dict) else "demonstrations",
                                        DemonstrationsSignal),)
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        kind, cls = ("section", models[0]) if models else ("value", None)
    return kind, cls, optional


def _check_override_shape(text: str, keys: list[str], value: Any, data: dict) -> None:
    """Refuse an override that would replace a whole section with a value (`model=x` wiped every
    key of the recipe's model: section), or that treats a value as a section."""
    key = ".".join(keys)
    kind, section, optional = _schema_at(keys, data)
    if kind == "section" and not isinstance(value, dict) and not (value is None and optional):
        example = next(iter(section.model_fields))
        raise RecipeError(
            f"Override {text!r}: '{key}' is a section of the recipe, not a value; this would replace the whole section.",
            hint=f"Set its keys one by one, e.g. {key}.{example}=..., or give a mapping, '{key}={{{example}: ...}}', "
            "which is merged into the recipe's section.",
        )
    for n in range(1, len(keys)):
        if _schema_at(keys[:n], data)[0] == "value":
            above = ".".join(keys[:n])
            raise RecipeError(f"Override {text!r}: '{above}' is a value, not a section, so it has no key '{keys[n]}'.",
                              hint=f"Write {above}=VALUE.")


def _merge_into(target: dict, value: dict) -> None:
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge_into(target[k], v)
        else:
            target[k] = v


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10). The value is read as YAML."""
    if "=" not in text:
        raise RecipeError(
            f"Override {text!r} is not of the form key=value.", hint="Example: sd train recipe.yaml train.max_steps=10"
        )
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"Override {text!r} has an empty key.", hint="Example: loss.divergence=reverse_kl")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value

