"""The layers of sdcli and the imports between them; exits 1 on an import its layer may not make.

    python tools/import_graph.py            # the layer graph, then any import out of place
    python tools/import_graph.py --modules  # every module's sdcli imports too

A layer is a folder of sdcli (for the commands at the top, a list of modules). LAYERS, bottom
first, is the architecture, the picture in the README's "Layout": a module may import its own
layer and the layers its layer reaches downward, never a layer above it, nor one beside it
(evaluation does not import signals). Imports are read with `ast`, all of them: at the top of a
module, inside functions (the lazy imports that keep `sd --help` fast) and under `if
TYPE_CHECKING`. A module that no layer holds is an error too, so that a new module has to take a
place. It imports nothing of sdcli, so it runs without torch. tests/unit/test_layers.py runs it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "sdcli"

# Bottom first: a layer's name, the module prefixes it holds, what it is, and the layers right
# beneath it (the arrows of the README's picture). A layer may import its own modules and every
# layer it reaches by those arrows. Layers may sit side by side: models and verification know
# nothing of each other, nor do evaluation and signals.
LAYERS: list[tuple[str, tuple[str, ...], str, tuple[str, ...]]] = [
    ("core", ("sdcli", "sdcli.core"), "errors, data files, output paths, atomic writes, KL, prompt pieces", ()),
    ("recipe", ("sdcli.recipe",), "schema, loading, overrides, reference", ("core",)),
    ("models", ("sdcli.models",), "base, adapters, stack, merge, episodes; encoding and sampling", ("recipe",)),
    ("verification", ("sdcli.verification",), "scorers, environments, the sandbox", ("recipe",)),
    ("signals", ("sdcli.signals",), "one context builder per learning signal", ("verification",)),
    ("evaluation", ("sdcli.evaluation",), "eval sets, scores, drift, matrix, report", ("models", "verification")),
    ("training", ("sdcli.training",), "the loop, teacher, losses, checkpoints, ranks", ("evaluation", "signals")),
    ("commands", ("sdcli.cli", "sdcli.__main__", "sdcli.validate", "sdcli.inspection"), "sd's commands",
     ("training",)),
]
NAMES = [name for name, *_ in LAYERS]
MAY_IMPORT: list[list[str]] = []  # per layer, every layer below it that it reaches, nearest first
for _i, (_name, _, _, _beneath) in enumerate(LAYERS):
    assert all(b in NAMES[:_i] for b in _beneath), f"{_name}: the layers beneath it must come before it"
    _reach = {b for b in _beneath} | {r for b in _beneath for r in MAY_IMPORT[NAMES.index(b)]}
    MAY_IMPORT.append(sorted(_reach, key=NAMES.index, reverse=True))


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported sdcli module
    file: str  # relative to the repository
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package under `root` (the repository), by dotted name."""
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the layer holding `module`: the longest matching prefix wins (the
    package's own __init__ is `sdcli`, in core, and must not hold everything below it)."""
    best, best_len = None, -1
    for i, (_, prefixes, _, _) in enumerate(LAYERS):
        for prefix in prefixes:
            exact_only = prefix == PACKAGE
            if module == prefix or (not exact_only and module.startswith(prefix + ".")):
                if len(prefix) > best_len:
                    best, best_len = i, len(prefix)
    return best


def imports(root: Path) -> list[Import]:
    """Every import of an sdcli module by an sdcli module, resolved to the module imported (for
    `from sdcli.x import y`, the module sdcli.x.y when there is one, else sdcli.x)."""
    known = modules(root)
    found = []
    for source, path in known.items():
        is_package = path.name == "__init__.py"
        rel = str(path.relative_to(root))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    package = source.split(".") if is_package else source.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join([*package, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    while target not in known and "." in target:  # `import sdcli.x.y` of a name, not a module
                        target = target.rsplit(".", 1)[0]
                    found.append(Import(source, target, rel, node.lineno))
    return found


def check(root: Path = REPO) -> tuple[list[Import], list[str]]:
    """(the imports, the problems): upward imports and modules that no layer holds."""
    found = imports(root)
    problems = [
        f"{path.relative_to(root)}: module {name} is in no layer; move it into a layer's folder "
        f"or add it to LAYERS in tools/import_graph.py"
        for name, path in modules(root).items()
        if layer_of(name) is None
    ]
    for imp in found:
        here, there = layer_of(imp.source), layer_of(imp.target)
        if here is None or there is None or here == there or NAMES[there] in MAY_IMPORT[here]:
            continue
        where = "a layer above it" if there > here else "beside it"
        allowed = ", ".join(MAY_IMPORT[here]) or "nothing of sdcli"
        problems.append(
            f"{imp.file}:{imp.line}: {imp.source} ({NAMES[here]}) imports {imp.target} ({NAMES[there]}), "
            f"{where}; {NAMES[here]} may import {allowed}"
        )
    return found, problems


def layer_graph(found: list[Import]) -> str:
    """Top layer first: each layer, what it holds, and the layers it imports (number of imports)."""
    edges: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for imp in found:
        low, high = layer_of(imp.source), layer_of(imp.target)
        if low is not None and high is not None and low != high:
            edges[low][high] += 1
    width = max(map(len, NAMES))
    lines = []
    for i in reversed(range(len(LAYERS))):
        name, _, what, _ = LAYERS[i]
        uses = ", ".join(f"{LAYERS[j][0]} ({n})" for j, n in sorted(edges[i].items(), reverse=True))
        lines.append(f"{name:<{width}}  {what}")
        lines.append(f"{'':<{width}}    imports: {uses or 'nothing of sdcli'}")
    return "\n".join(lines)


def module_graph(found: list[Import]) -> str:
    targets: dict[str, set[str]] = defaultdict(set)
    for imp in found:
        if imp.target != imp.source:
            targets[imp.source].add(imp.target)
    return "\n".join(f"{source} -> {', '.join(sorted(targets[source]))}" for source in sorted(targets))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="also print each module's sdcli imports")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    found, problems = check(args.root)
    print("Layers of sdcli, top first, and the layers each one imports (number of imports).\n")
    print(layer_graph(found))
    if args.modules:
        print("\nModules:\n" + module_graph(found))
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print("\nNo upward imports.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
