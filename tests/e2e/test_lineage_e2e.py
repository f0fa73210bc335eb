"""Lineage through real training on tiny models: recorded hashes, a base with other weights refused
(and allowed with --allow-mixed-base), a crafted checkpoint refused on --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, build_tiny_model
from sd_runner import sd
from sdcli.core.data import file_sha256
from sdcli.core.errors import UserError
from sdcli.recipe.loading import load_recipe
from sdcli.training.checkpoint import CHECKPOINT, STATE_FILE
from sdcli.training.train import train_episode


def recipe_for(tmp_path: Path, model_dir: Path, name: str, steps: int = 1) -> Path:
    (tmp_path / "d.jsonl").write_text('{"prompt": "What is 2+2?", "demonstration": "4."}\n')
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nrun_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {model_dir}}}\n"
                    f"lora: {{r: 2, alpha: 4}}\ndata: {{path: d.jsonl}}\nrollout: {{max_new_tokens: 4}}\n"
                    f"train: {{max_steps: {steps}, prompts_per_step: 1, checkpoint_every: 1}}\n")
    return path


def test_episode_on_another_base_is_refused_unless_allowed(tmp_path, tiny_model_dir):
    first = train_episode(load_recipe(recipe_for(tmp_path, tiny_model_dir, "first")))
    meta = json.loads((first.path / "episode.json").read_text())
    assert meta["adapter_config_sha256"] == file_sha256(first.path / "adapter_config.json")

    other = build_tiny_model(tmp_path / "other-base", seed=7)  # same shapes, other weights
    second = load_recipe(recipe_for(tmp_path, other, "second"))
    with pytest.raises(UserError) as e:
        train_episode(second)
    text = e.value.render()
    assert f"episode 001-first was trained on {tiny_model_dir}" in text and str(other) in text
    assert not list((tmp_path / "run" / "episodes").glob(".partial-*"))  # refused before starting a folder

    done = sd("train", str(tmp_path / "second.yaml"), "--quiet", "--allow-mixed-base", cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "warning: --allow-mixed-base" in done.stderr and "001-first" in done.stderr
    assert (tmp_path / "run" / "episodes" / "002-second" / "episode.json").is_file()


class CreatesAFile:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_from_a_crafted_checkpoint_runs_nothing(tmp_path, tiny_model_dir):
    recipe = load_recipe(recipe_for(tmp_path, tiny_model_dir, "facts", steps=3))
    with pytest.raises(RuntimeError):
        train_episode(recipe, progress=lambda step, m: (_ for _ in ()).throw(RuntimeError("crash")) if step == 2 else None)
    state_file = tmp_path / "run" / "episodes" / ".partial-001-facts" / CHECKPOINT / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "ran-on-load"
    state["extra"]["payload"] = CreatesAFile(marker)
    torch.save(state, state_file)
    with pytest.raises(UserError, match="refusing to load this checkpoint"):
        train_episode(recipe, resume=True)
    assert not marker.exists()
