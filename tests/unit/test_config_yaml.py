"""Reading recipe YAML: aliases never expand into a hang, duplicate keys are refused with both lines."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdcli.core.errors import RecipeError
from sdcli.recipe.loading import load_recipe

REPO = Path(__file__).resolve().parents[2]

# ten levels of ten aliases each: 10^10 values once expanded, 10 lines of text
LAUGHS = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
)


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "demonstration": "a"}\n')
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_nested_aliases_are_refused_at_once(tmp_path):
    path = write(tmp_path, LAUGHS)
    assert len(LAUGHS.splitlines()) == 10
    start = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert time.perf_counter() - start < 0.5
    assert "expand to 12,345,679,021 values" in e.value.render() and "refusing" in e.value.render()


def test_sd_validate_on_nested_aliases_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sdcli.cli", "validate", str(write(tmp_path, LAUGHS))],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and "aliases" in done.stderr and "Traceback" not in done.stderr


def test_alias_that_contains_itself_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="refers to a node that contains it"):
        load_recipe(write(tmp_path, "name: x\nloop: &a [1, *a]\n"))


def test_ordinary_aliases_still_load_and_problems_keep_their_lines(tmp_path):
    text = ("data: {path: d.jsonl}\n"  # 1
            "train: {lr: &big 99.0, max_steps: 3}\n"  # 2
            "rollout: {temperature: *big}\n")  # 3: the aliased value, invalid here
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    assert "r.yaml:3: 'rollout.temperature'" in e.value.render()
    recipe = load_recipe(write(tmp_path, "data: {path: d.jsonl}\ntrain: {lr: &lr 0.5, max_steps: 3}\n"
                                         "rollout: {temperature: *lr}\n"))
    assert recipe.train.lr == 0.5 and recipe.rollout.temperature == 0.5


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    text = ("data:\n"  # 1
            "  path: d.jsonl\n"  # 2
            "train:\n"  # 3
            "  lr: 0.01\n"  # 4
            "  max_steps: 3\n"  # 5
            "  lr: 0.02\n"  # 6
            "train:\n"  # 7
            "  max_steps: 5\n")  # 8
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    rendered = e.value.render()
    assert "2 problem(s)" in rendered
    assert f"{path}:6: duplicate key 'train.lr' (first at line 4)" in rendered
    assert f"{path}:7: duplicate key 'train' (first at line 3)" in rendered
