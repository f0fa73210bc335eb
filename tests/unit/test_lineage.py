"""Lineage checks: the adapter's config is hashed with its weights, episodes on another base are not
stacked, --resume refuses changed data, and a checkpoint is never unpickled with a full unpickler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdcli.core.data import file_sha256
from sdcli.core.errors import UserError
from sdcli.models.episodes import Episode, adapter_hashes, check_same_base, list_episodes
from sdcli.recipe.loading import load_recipe
from sdcli.training.checkpoint import CHECKPOINT, STATE_FILE, load_checkpoint, save_checkpoint
from sdcli.training.batch import ExampleSampler
from sdcli.training.checkpoint import restore_checkpoint, resume_key

CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def fake_episode(run: Path, with_config_hash: bool = True) -> Path:
    """An episode folder as `sd train` leaves it, as far as `list_episodes` looks (it reads no tensors)."""
    folder = run / "episodes" / "001-facts"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    (folder / "adapter_model.safetensors").write_bytes(b"weights stand-in, not empty")
    meta = {"number": 1, "name": "facts", **adapter_hashes(folder)}
    if not with_config_hash:
        del meta["adapter_config_sha256"]
    (folder / "episode.json").write_text(json.dumps(meta))
    return folder


def scale_alpha(folder: Path, factor: int) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] *= factor
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_altered_adapter_config_is_refused(tmp_path):
    folder = fake_episode(tmp_path / "run")
    assert [e.label for e in list_episodes(tmp_path / "run")] == ["001-facts"]
    scale_alpha(folder, 10)  # ten times the adapter's effect, weights untouched
    with pytest.raises(UserError) as e:
        list_episodes(tmp_path / "run")
    assert "001-facts: adapter_config.json does not match the sha256 in episode.json" in e.value.render()


def test_episode_without_a_config_hash_is_checked_on_its_weights(tmp_path):
    folder = fake_episode(tmp_path / "run", with_config_hash=False)
    scale_alpha(folder, 10)
    assert [e.label for e in list_episodes(tmp_path / "run")] == ["001-facts"]  # as before the hash existed
    (folder / "adapter_model.safetensors").write_bytes(b"other weights")
    with pytest.raises(UserError, match="adapter_model.safetensors does not match"):
        list_episodes(tmp_path / "run")


def test_two_episodes_with_one_number_are_named_not_called_gaps(tmp_path):
    fake_episode(tmp_path / "run")
    twin = tmp_path / "run" / "episodes" / "001-other"
    twin.mkdir()
    for f in (tmp_path / "run" / "episodes" / "001-facts").iterdir():
        (twin / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError) as e:
        list_episodes(tmp_path / "run")
    assert "001 used twice (001-facts, 001-other)" in e.value.render() and "gaps" not in e.value.render()


def _parent(number: int, base_path: str, base_hash: str) -> Episode:
    meta = {"base_model": {"path": base_path, "sha256": base_hash}}
    return Episode(number, f"ep{number}", Path(f"/runs/x/episodes/{number:03d}-ep{number}"), meta)


def test_episodes_on_another_base_are_refused_naming_episode_and_bases():
    parents = [_parent(1, "/models/a", "a" * 64), _parent(2, "/models/b", "b" * 64)]
    with pytest.raises(UserError) as e:
        check_same_base(parents, Path("/models/a"), "a" * 64)
    text = e.value.render()
    assert "episode 002-ep2 was trained on /models/b (sha256 bbbbbbbbbbbb...)" in text
    assert "/models/a (sha256 aaaaaaaaaaaa...)" in text and "001-ep1" not in text
    assert "--allow-mixed-base" in text


def test_allow_mixed_base_warns_instead():
    notes: list[str] = []
    check_same_base([_parent(1, "/models/b", "b" * 64)], Path("/models/a"), "a" * 64, allow=True, log=notes.append)
    assert len(notes) == 1 and "001-ep1" in notes[0] and "warning" in notes[0]
    check_same_base([_parent(1, "/models/a", "a" * 64)], Path("/models/a"), "a" * 64)  # same base: silent


class CreatesAFile:
    """Unpickling this calls open(path, "w"): code that runs on load."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "ran-on-load"
    partial = tmp_path / ".partial-001-facts"
    (partial / CHECKPOINT).mkdir(parents=True)
    torch.save({"step": 1, "extra": CreatesAFile(marker)}, partial / CHECKPOINT / STATE_FILE)
    with pytest.raises(UserError) as e:
        load_checkpoint(partial)
    assert not marker.exists()
    text = e.value.render()
    assert "refusing to load this checkpoint" in text and "open" in text and f"Delete {partial}" in text
    assert "weights_only" not in text  # not torch's advice on how to load it anyway


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    partial = tmp_path / ".partial-001-facts"
    (partial / CHECKPOINT).mkdir(parents=True)
    torch.save({"step": 1, "params": {"w": torch.ones(100)}}, partial / CHECKPOINT / STATE_FILE)
    state = partial / CHECKPOINT / STATE_FILE
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(partial)


@pytest.fixture()
def interrupted(tmp_path):
    """A recipe and its episode folder with a checkpoint after step 1, as `sd train` writes it."""
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "demonstration": "a"}\n')
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"name: facts\nrun_dir: {tmp_path / 'run'}\ndata: {{path: d.jsonl}}\n")
    recipe = load_recipe(recipe_path)
    w = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([w], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    partial = tmp_path / "run" / "episodes" / ".partial-001-facts"
    partial.mkdir(parents=True)

    def save(extra: dict) -> None:
        save_checkpoint(partial, step=1, params={"w": w}, optimizer=optimizer, scheduler=scheduler,
                        sampler_state={"epoch": 0, "position": 1}, extra=extra)

    def restore() -> int:
        return restore_checkpoint(partial, recipe, {"w": w}, optimizer, scheduler, ExampleSampler(1, 0, False),
                                  partial / "metrics.jsonl", lambda message: None)

    return recipe, save, restore


def test_resume_refuses_a_changed_data_file(interrupted):
    recipe, save, restore = interrupted
    save(resume_key(recipe))
    assert restore() == 1  # unchanged: continues, through weights_only loading
    before = file_sha256(recipe.data.path)
    recipe.data.path.write_text('{"prompt": "q", "demonstration": "another answer"}\n')
    with pytest.raises(UserError) as e:
        restore()
    text = e.value.render()
    assert f"the data file {recipe.data.path} changed" in text and before[:12] in text


def test_resume_of_a_checkpoint_without_a_data_hash_still_works(interrupted):
    recipe, save, restore = interrupted
    save({"recipe": resume_key(recipe)["recipe"]})  # written before the data's hash was recorded
    recipe.data.path.write_text('{"prompt": "q", "demonstration": "another answer"}\n')
    assert restore() == 1
