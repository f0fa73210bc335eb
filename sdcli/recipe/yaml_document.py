"""A recipe's YAML text composed safely before it is loaded: aliases (*name) that expand too far
or into themselves are refused, keys given twice in one mapping are refused, and every key path
is mapped to its line, for error messages."""

from __future__ import annotations

import math

import yaml

from sdcli.core.errors import RecipeError

# A recipe has a few hundred values; aliases (*name) that expand past this are a "billion laughs"
# document, which would hang anything that walks the loaded data (validation, error messages).
MAX_EXPANDED_NODES = 100_000


def line_index(root: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Map each key path in a composed YAML document to its 1-based line number.

    An aliased node is walked once, at its first path; other paths through it resolve to the line of
    their alias (see `_locator` in loading.py). Walking every path would take as long as the
    aliases' full expansion.
    """
    index: dict[tuple[str, ...], int] = {}

    def visit(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, _ in node.value:
                index[path + (str(k.value),)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                index[path + (str(i),)] = v.start_mark.line + 1

    if root is not None:
        _walk_once(root, visit)
    return index


def _walk_once(root: yaml.Node, visit) -> None:
    """visit(node, path) for every node of a composed document, each distinct node once, at the
    first path that reaches it: aliases are not walked again, so this takes time in the size of
    the text, not of the aliases' expansion."""
    seen: set[int] = set()

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        visit(node, path)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(v, path + (str(k.value),))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (str(i),))

    walk(root, ())


def _expanded_size(root: yaml.Node) -> float:
    """How many nodes the document has once every alias is expanded (inf if an alias contains itself).
    Counted per distinct node, so this takes time in the size of the text, not of the expansion."""
    sizes: dict[int, float] = {}

    def size(node: yaml.Node) -> float:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = math.inf  # still being counted: reaching it again means a cycle
        children: list = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        sizes[id(node)] = 1 + sum(size(c) for c in children)
        return sizes[id(node)]

    return size(root)


def _duplicate_keys(root: yaml.Node, origin: str) -> list[str]:
    """Keys given twice in one mapping: YAML keeps the last silently, so a second `train:` block
    would drop the first without a word."""
    problems: list[str] = []

    def visit(node: yaml.Node, path: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        first: dict[str, int] = {}
        for k, _ in node.value:
            name = str(k.value)
            line = k.start_mark.line + 1
            if isinstance(k, yaml.ScalarNode) and name in first and k.tag != "tag:yaml.org,2002:merge":
                key = ".".join(path + (name,))
                problems.append(f"{origin}:{line}: duplicate key '{key}' (first at line {first[name]}); "
                                "YAML would keep only the last one. Merge them into one.")
            first.setdefault(name, line)

    _walk_once(root, visit)
    return problems


def compose_checked(text: str, origin: str) -> yaml.Node | None:
    """The document's node graph; RecipeError for duplicate keys or aliases that expand too far."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        expanded = _expanded_size(root) if root is not None else 0
    except RecursionError:
        raise RecipeError(f"{origin}: nested too deeply to read (thousands of levels); a recipe needs a few.") from None
    if math.isinf(expanded):
        raise RecipeError(f"{origin}: an alias (*name) refers to a node that contains it, which never ends; refusing "
                          "to load it.", hint="Write the values out instead of the alias.")
    if expanded > MAX_EXPANDED_NODES:
        raise RecipeError(
            f"{origin}: its aliases (*name) expand to {int(expanded):,} values, more than the "
            f"{MAX_EXPANDED_NODES:,} a recipe may hold; refusing to load it.",
            hint="Write the values out, or nest fewer aliases inside one another.",
        )
    if root is None:
        return None
    problems = _duplicate_keys(root, origin)
    if problems:
        raise RecipeError(f"{origin}: {len(problems)} problem(s) in the recipe:", problems)
    return root

