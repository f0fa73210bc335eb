"""Loading a recipe: the YAML file, then the command line's overrides, validated into `Recipe`.

Precedence is defaults < YAML < `key=value` on the command line. Every problem (unknown key,
wrong type, out-of-range value, missing file) is collected and reported at once, each with the
file and line it comes from, as a `RecipeError` (exit code 2).

Relative paths under `data:` / `eval:` / `anchor:` in a YAML file are resolved against the recipe's folder, so a
recipe and its data travel together; paths given on the command line, and `run_dir`, are
relative to the current directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ValidationError

from sdcli.core.data import read_text
from sdcli.core.errors import RecipeError
from sdcli.recipe.overrides import apply_overrides
from sdcli.recipe.schema import Recipe
from sdcli.recipe.sections import BUILTIN_MODEL
from sdcli.recipe.signal_sections import SIGNAL_CLASSES, SIGNAL_KINDS, DemonstrationsSignal
from sdcli.recipe.yaml_document import compose_checked, line_index

# Where a key of the recipe was given: "command line", "FILE:LINE" or the file (or "recipe").
Locator = Callable[[tuple], str]


def load_recipe(path: str | Path | None, overrides: list[str] = (), check_files: bool = True) -> Recipe:
    """Read, merge and validate a recipe. Raises RecipeError listing every problem."""
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    origin = "recipe"
    if path is not None:
        path = Path(path)
        origin = str(path)
        data, lines = _read_recipe_file(path)
    from_cli = apply_overrides(data, overrides)
    where = _locator(origin, lines, from_cli)
    recipe = _validate(data, origin, where, check_files)
    if check_files:
        problems = _file_problems(recipe, where)
        if problems:
            raise RecipeError(f"{origin}: {len(problems)} problem(s) in the recipe:", problems)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False, allow_unicode=True)


def _read_recipe_file(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """The recipe file's mapping, its relative paths resolved, and the line of each key path."""
    if not path.is_file():
        raise RecipeError(f"Recipe file not found: {path}", hint="Check the path; recipes end in .yaml.")
    base_dir = path.resolve().parent
    text = read_text(path, RecipeError)
    try:
        lines = line_index(compose_checked(text, str(path)))  # before loading: it refuses what would hang later
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys to values, got {type(loaded).__name__}.")
    _resolve_relative_paths(loaded, base_dir)
    return loaded, lines


def _resolve_relative_paths(data: dict[str, Any], base_dir: Path) -> None:
    """Relative file paths in the file are relative to the recipe's folder: make them so."""
    for key in ("data", "eval", "anchor"):
        section = data.get(key)
        if isinstance(section, dict):
            for k, v in list(section.items()):
                if (isinstance(v, str) and (k == "path" or k.endswith("_path")) and not Path(v).is_absolute()
                        and not v.startswith("builtin:")):
                    section[k] = str(base_dir / v)
                elif isinstance(v, list) and k == "retain":
                    section[k] = [str(base_dir / p) if isinstance(p, str) and not Path(p).is_absolute() else p for p in v]
    if isinstance(data.get("model"), dict):
        nop = data["model"].get("name_or_path")
        if isinstance(nop, str) and nop.startswith((".", "/")) is False and not nop.startswith("builtin:"):
            candidate = base_dir / nop
            if not Path(nop).exists() and candidate.exists():
                data["model"]["name_or_path"] = str(candidate)


def _locator(origin: str, lines: dict[tuple[str, ...], int], from_cli: set[tuple[str, ...]]) -> Locator:
    """where(loc): the command line if it set `loc` or a section above it, else the line of the
    nearest key the file has on the way to `loc`, else the file."""

    def where(loc: tuple) -> str:
        loc = tuple(str(x) for x in loc)
        for n in range(len(loc), 0, -1):
            if loc[:n] in from_cli:
                return "command line"
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                return f"{origin}:{lines[loc[:n]]}"
        return origin

    return where


def _validate(data: dict[str, Any], origin: str, where: Locator, check_files: bool) -> Recipe:
    """`Recipe` from the merged mapping, or a RecipeError with a located line per problem."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_describe_error(err, data, origin, where) for err in e.errors()]
        if check_files:  # files too, so that one run shows every problem
            problems += _raw_file_problems(data, where)
        raise RecipeError(f"{origin}: {len(problems)} problem(s) in the recipe:", problems) from None


def _describe_error(err: dict[str, Any], data: dict[str, Any], origin: str, where: Locator) -> str:
    """One of pydantic's errors as a line for people: where, which key, what is wrong with it."""
    loc = _drop_union_tag(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        known = _known_keys(Recipe, [str(p) for p in loc[:-1]], data)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
        valid = f" Valid keys here: {', '.join(known)}." if known and not close else ""
        return f"{where(loc)}: unknown key '{key}'{hint}.{valid}"
    if err["type"] == "missing":
        return f"{where(loc)}: missing required key '{key}'."
    if err["type"] == "enum" or err["type"] == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{where(loc)}: '{key}' is {err.get('input')!r}; expected one of {expected}."
    if err["type"] == "union_tag_invalid":
        return f"{where(loc)}: '{key}.kind' is {err['ctx'].get('tag')!r}; expected one of {err['ctx'].get('expected_tags')}."
    if not loc:  # a rule across several keys
        return f"{origin}: {err['msg'].removeprefix('Value error, ')}."
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where(loc)}: '{key}': {msg} (got {err.get('input')!r})."


def _drop_union_tag(loc: tuple) -> tuple:
    """pydantic reports ('signal', 'rewards', 'reward'); people wrote signal.reward."""
    if len(loc) > 1 and loc[0] == "signal" and loc[1] in SIGNAL_KINDS:
        return (loc[0],) + tuple(loc[2:])
    return tuple(loc)


def _known_keys(model: type[BaseModel], path: list[str], data: dict) -> list[str]:
    """Field names valid at `path`, used for "did you mean" suggestions."""
    cls: Any = model
    for part in path:
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        if part == "signal":
            kind = (data.get("signal") or {}).get("kind", "demonstrations") if isinstance(data.get("signal"), dict) else "demonstrations"
            ann = SIGNAL_CLASSES.get(kind, DemonstrationsSignal)
        models = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = models[0] if len(models) == 1 else ann  # `EvalConfig | None` -> EvalConfig
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return []
    return list(cls.model_fields)


def _raw_file_problems(data: dict, where: Locator) -> list[str]:
    """Missing data file / model folder, read from the raw mapping (used when validation failed)."""
    problems = []
    data_path = (data.get("data") or {}).get("path") if isinstance(data.get("data"), dict) else None
    if isinstance(data_path, str) and not Path(data_path).is_file():
        problems.append(f"{where(('data', 'path'))}: 'data.path': file not found: {data_path}")
    model_path = (data.get("model") or {}).get("name_or_path") if isinstance(data.get("model"), dict) else None
    if isinstance(model_path, str) and not model_path.startswith("builtin:") and not Path(model_path).is_dir():
        problems.append(f"{where(('model', 'name_or_path'))}: 'model.name_or_path': not a local model folder: {model_path}")
    return problems


def _file_problems(recipe: Recipe, where: Locator) -> list[str]:
    """Files and folders the valid recipe names that are missing or unusable."""
    problems: list[str] = []
    if not recipe.data.path.is_file():
        problems.append(f"{where(('data', 'path'))}: 'data.path': file not found: {recipe.data.path}")
    nop = recipe.model.name_or_path
    if not nop.startswith("builtin:") and not Path(nop).is_dir():
        problems.append(
            f"{where(('model', 'name_or_path'))}: 'model.name_or_path': not a local model folder: {nop} "
            f"(sd never downloads; use a folder with config.json, or {BUILTIN_MODEL})"
        )
    elif nop.startswith("builtin:") and nop != BUILTIN_MODEL:
        problems.append(f"{where(('model', 'name_or_path'))}: unknown built-in model {nop!r}; the one built-in is {BUILTIN_MODEL}")
    anchor = recipe.anchor
    if anchor.prompts_per_step and not anchor.path.startswith("builtin:") and not Path(anchor.path).is_file():
        problems.append(f"{where(('anchor', 'path'))}: 'anchor.path': file not found: {anchor.path}")
    for key, file in recipe.eval.files() if recipe.eval is not None else []:
        if not file.is_file():
            problems.append(f"{where(('eval', *key.split('.')))}: 'eval.{key}': file not found: {file}")
    from sdcli.core.outputs import folder_problem

    run_dir_problem = folder_problem(recipe.run_dir)
    if run_dir_problem:
        problems.append(f"{where(('run_dir',))}: 'run_dir': {run_dir_problem}; sd writes the episodes there "
                        "(choose another, e.g. run_dir=runs/mine)")
    return problems
