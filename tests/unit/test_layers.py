"""The folder tree is the architecture: no module imports a layer its own may not (tools/import_graph.py)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "import_graph.py"


def _graph():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_no_module_imports_a_layer_its_own_may_not():
    found, problems = _graph().check(REPO)
    assert not problems, "\n".join(problems)
    assert len(found) > 100  # the imports were read (lazy ones included), not skipped


def test_every_module_is_in_a_layer():
    graph = _graph()
    assert all(graph.layer_of(name) is not None for name in graph.modules(REPO))
    assert graph.layer_of("sdcli") == graph.layer_of("sdcli.core.errors") == 0
    assert graph.NAMES[graph.layer_of("sdcli.cli")] == "commands"
    assert graph.NAMES[graph.layer_of("sdcli.training.anchors")] == "training"


def _copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "sdcli", tmp_path / "sdcli", ignore=shutil.ignore_patterns("__pycache__", "*.jsonl"))
    return tmp_path


def _run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root)], capture_output=True, text=True, timeout=60)


def test_the_script_passes_this_tree_and_prints_the_layers():
    done = _run(REPO)
    assert done.returncode == 0, done.stderr
    layers = [line.split()[0] for line in done.stdout.splitlines()[2:-2] if line and not line[0].isspace()]
    assert done.stdout.rstrip().endswith("No upward imports.")
    assert layers == ["commands", "training", "evaluation", "signals", "verification", "models", "recipe", "core"]


def test_an_upward_import_fails_the_script(tmp_path):
    root = _copy_of_the_package(tmp_path)
    errors = root / "sdcli" / "core" / "errors.py"
    lines = errors.read_text().splitlines()
    lines += ["def _late():", "    from sdcli.training import train  # a lazy import counts too"]
    errors.write_text("\n".join(lines) + "\n")
    done = _run(root)
    assert done.returncode == 1
    assert (f"sdcli/core/errors.py:{len(lines)}: sdcli.core.errors (core) imports sdcli.training.train (training), "
            "a layer above it") in done.stderr


def test_an_import_beside_its_layer_fails_the_script(tmp_path):
    root = _copy_of_the_package(tmp_path)
    evaluate = root / "sdcli" / "evaluation" / "evaluate.py"
    evaluate.write_text(evaluate.read_text() + "\nfrom sdcli.signals.rewards import line_example\n")
    done = _run(root)
    assert done.returncode == 1
    assert "sdcli.evaluation.evaluate (evaluation) imports sdcli.signals.rewards (signals), beside it" in done.stderr


def test_a_module_outside_every_layer_fails_the_script(tmp_path):
    root = _copy_of_the_package(tmp_path)
    (root / "sdcli" / "helpers.py").write_text("from sdcli.core.errors import UserError\n")
    done = _run(root)
    assert done.returncode == 1
    assert "sdcli/helpers.py: module sdcli.helpers is in no layer" in done.stderr
