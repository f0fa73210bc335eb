"""One writer per run folder: a second sd command is refused with the holder named; a lock left by
kill -9 is free; a run_dir that is a file or not writable is a clear error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdcli.core.errors import UserError
from sdcli.models.runlock import LOCK_FILE, run_lock
from sdcli.recipe.loading import load_recipe
from sdcli.training.train import train_episode

REPO = Path(__file__).resolve().parents[2]

# holds the run's lock through the public API, says so, and sleeps until killed
HOLDER = (
    "import sys, time\n"
    "from sdcli.models.runlock import run_lock\n"
    "with run_lock(sys.argv[1], 'test holder'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(300)\n"
)


@pytest.fixture()
def holder(tmp_path):
    """A second process holding tmp_path/run; killed with -9 at the end if the test did not."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    yield proc, run
    proc.kill()
    proc.wait()


def recipe_file(tmp_path: Path, model_dir: Path, run: Path) -> Path:
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "demonstration": "a"}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"name: facts\nrun_dir: {run}\nmodel: {{name_or_path: {model_dir}}}\ndata: {{path: d.jsonl}}\n"
                    "train: {max_steps: 1, prompts_per_step: 1}\nrollout: {max_new_tokens: 4}\n")
    return path


def test_train_episode_refuses_a_held_run_and_names_the_holder(holder, tmp_path, tiny_model_dir):
    proc, run = holder
    recipe = load_recipe(recipe_file(tmp_path, tiny_model_dir, run))
    with pytest.raises(UserError) as e:
        train_episode(recipe)
    text = e.value.render()
    assert f"pid {proc.pid} on host {socket.gethostname()}" in text
    assert "test holder" in text and "since " in text
    assert not (run / "episodes").exists()  # refused before anything was written


def test_sd_train_refuses_a_held_run_with_exit_2(holder, tmp_path, tiny_model_dir):
    proc, run = holder
    done = subprocess.run([sys.executable, "-m", "sdcli.cli", "train", str(recipe_file(tmp_path, tiny_model_dir, run)),
                           "--quiet"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert f"pid {proc.pid}" in done.stderr and "in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (run / "episodes").exists()


def test_lock_of_a_killed_process_is_free_and_taken_over_with_a_note(holder):
    proc, run = holder
    with pytest.raises(UserError, match=f"pid {proc.pid}"):
        with run_lock(run, "second"):
            pass
    proc.kill()
    proc.wait()
    notes: list[str] = []
    with run_lock(run, "after the kill", log=notes.append):
        assert "after the kill" in (run / LOCK_FILE).read_text()
    assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "no longer running" in notes[0]


def test_clean_release_leaves_no_note_and_nesting_in_one_process_works(tmp_path):
    run = tmp_path / "run"
    notes: list[str] = []
    with run_lock(run, "outer", log=notes.append):
        with run_lock(run, "inner", log=notes.append):  # same process: no self-deadlock
            pass
        assert "outer" in (run / LOCK_FILE).read_text()  # the inner release kept the outer hold
    with run_lock(run, "again", log=notes.append):
        pass
    assert notes == []
    assert (run / LOCK_FILE).read_text() == ""


def test_run_dir_that_is_a_file_is_a_clear_error(tmp_path, tiny_model_dir):
    not_a_folder = tmp_path / "run"
    not_a_folder.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        with run_lock(not_a_folder, "x"):
            pass
    done = subprocess.run([sys.executable, "-m", "sdcli.cli", "train", str(recipe_file(tmp_path, tiny_model_dir, not_a_folder))],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr and "Traceback" not in done.stderr


def test_unwritable_run_dir_is_a_clear_error(tmp_path, monkeypatch):
    # root writes through any mode bits, so the refusal is simulated where the lock file is opened
    real_open = os.open

    def refuse_lock_file(path, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_lock_file)
    with pytest.raises(UserError, match="is not writable .Permission denied."):
        with run_lock(tmp_path / "run", "x"):
            pass


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_dir_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        with pytest.raises(UserError, match="is not writable"):
            with run_lock(run, "x"):
                pass
    finally:
        run.chmod(0o755)


def fake_run(run: Path) -> None:
    """One finished episode as far as `sd merge` reads before loading anything."""
    from sdcli.models.episodes import adapter_hashes

    folder = run / "episodes" / "001-facts"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights stand-in")
    meta = {"number": 1, "name": "facts", "base_model": {"path": "/no/base", "sha256": "0" * 64}, **adapter_hashes(folder)}
    (folder / "episode.json").write_text(json.dumps(meta))


def test_sd_merge_into_a_held_run_is_refused(holder):
    proc, run = holder
    fake_run(run)
    merge = [sys.executable, "-m", "sdcli.cli", "merge", str(run)]
    done = subprocess.run([*merge, "--out", str(run / "merged")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and f"pid {proc.pid}" in done.stderr, done.stderr
    assert not (run / "merged").exists()
    done = subprocess.run([*merge, "--out", str(run / "episodes" / "002-merged")], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 2 and "would be taken for an episode" in done.stderr, done.stderr
