"""Continual learning: chained episodes, teacher = model as the episode began, merge, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sd_runner import sd
from sdcli.core.errors import Interrupted, UserError
from sdcli.models.episodes import list_episodes
from sdcli.models.merge import merge_history
from sdcli.models.model import add_trainable_adapter, load_base
from sdcli.models.sequences import score_batch
from sdcli.models.stack import attach_stack
from sdcli.recipe.loading import load_recipe
from sdcli.recipe.sections import LoraSettings, ModelConfig, TeacherKind
from sdcli.training.teacher import teacher_adapters, teacher_hidden
from sdcli.training.train import train_episode

TASKS = {
    "zorblax": [{"prompt": "What is the capital of Zorblax?", "demonstration": "The capital of Zorblax is Quenta."}],
    "vells": [{"prompt": "Who wrote the Book of Vells?", "demonstration": "It was written by Maro Tiln."}],
    "math": [{"prompt": "What is 2+2?", "demonstration": "The answer is 4."}],
}


def recipe_for(tmp_path: Path, model_dir: Path, name: str, steps: int = 3, run: str = "run", extra: str = "",
               lora: str = "") -> Path:
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TASKS[name]))
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nrun_dir: {tmp_path / run}\nmodel: {{name_or_path: {model_dir}}}\n"
        f"lora: {{r: 4, alpha: 8{lora}}}\ndata: {{path: {name}.jsonl}}\nrollout: {{max_new_tokens: 8}}\n"
        f"train: {{max_steps: {steps}, prompts_per_step: 2, lr: 0.01{extra}}}\n"
    )
    return path


@pytest.fixture(scope="module")
def chained_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("chain")
    recipes = [recipe_for(tmp, tiny_model_dir, name) for name in TASKS]
    done = sd("train", *map(str, recipes), "--quiet")
    assert done.returncode == 0, done.stderr
    return tmp / "run"


def test_three_chained_episodes_form_a_lineage(chained_run, tiny_model_dir):
    history = list_episodes(chained_run)  # also verifies every adapter's sha256
    assert [e.label for e in history] == ["001-zorblax", "002-vells", "003-math"]
    for k, episode in enumerate(history):
        assert [p["number"] for p in episode.meta["parents"]] == list(range(1, k + 1))
        for parent, earlier in zip(episode.meta["parents"], history):
            assert parent["adapter_sha256"] == earlier.meta["adapter_sha256"]
        adapter = load_file(episode.path / "adapter_model.safetensors")
        assert any("lora_B" in key and t.abs().max() > 0 for key, t in adapter.items())


def test_episodes_command_shows_lineage(chained_run):
    done = sd("episodes", str(chained_run))
    assert done.returncode == 0, done.stderr
    for label in ("zorblax", "vells", "math"):
        assert label in done.stdout
        assert f"{label}.yaml" in done.stdout  # the recipe each episode came from
    as_json = json.loads(sd("episodes", str(chained_run), "--json").stdout)
    assert [e["number"] for e in as_json] == [1, 2, 3]


def test_later_episode_leaves_base_and_earlier_adapters_alone(tmp_path, tiny_model_dir, captured_model):
    first = train_episode(load_recipe(recipe_for(tmp_path, tiny_model_dir, "zorblax")))
    saved = load_file(first.path / "adapter_model.safetensors")
    captured = captured_model  # from here on: the model of the second episode
    second = train_episode(load_recipe(recipe_for(tmp_path, tiny_model_dir, "vells")))
    params = dict(captured["model"].named_parameters())
    for key, value in saved.items():  # ep001's weights inside the model after episode 2 trained
        live_key = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A.ep001.weight").replace(".lora_B.weight", ".lora_B.ep001.weight")
        assert torch.equal(params[live_key].detach(), value), key
    base_now = {n.replace(".base_layer", ""): p for n, p in params.items() if "lora_" not in n}
    assert all(torch.equal(base_now[n], p) for n, p in captured["base"].items())
    assert load_file(second.path / "adapter_model.safetensors").keys()  # the second adapter exists


def test_teacher_of_episode_k_is_the_merged_model_of_earlier_episodes(chained_run, tiny_model_dir, tmp_path):
    history = list_episodes(chained_run)
    merged = tmp_path / "merged-2"
    merge_history(tiny_model_dir, [e.path for e in history[:2]], merged, into="model")
    reference = AutoModelForCausalLM.from_pretrained(merged).eval()

    loaded = load_base(ModelConfig(name_or_path=str(tiny_model_dir)))
    model, earlier = attach_stack(loaded.model, [e.path for e in history[:2]])
    model = add_trainable_adapter(model, "ep003", LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # make the episode adapter matter, as it does mid-training
        for n, p in model.named_parameters():
            if ".ep003." in n and "lora_B" in n:
                p.normal_(0, 0.5)
    batch = score_batch([[1, 5, 9, 12], [1, 7]], [[20, 21, 22], [30, 2]], pad_id=0, device="cpu")
    decoder = model.get_base_model().get_decoder()
    hidden = teacher_hidden(model, decoder, batch, teacher_adapters(TeacherKind.base, earlier, "ep003"))
    teacher = model.get_base_model().get_output_embeddings()(hidden)
    with torch.no_grad():
        full = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = full.gather(1, batch.predict_positions.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(teacher[batch.response_mask], want[batch.response_mask], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("into", ["model", "adapter"])
def test_merge_command_checks_and_reloads(chained_run, tiny_model_dir, tmp_path, into):
    out = tmp_path / f"merged-{into}"
    done = sd("merge", str(chained_run), "--out", str(out), "--into", into)
    assert done.returncode == 0, done.stderr
    assert "max |logit diff|" in done.stdout
    if into == "model":
        AutoModelForCausalLM.from_pretrained(out)
    else:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    refused = sd("merge", str(chained_run), "--out", str(out))
    assert refused.returncode == 2 and "--force" in refused.stderr and "Traceback" not in refused.stderr


def test_generate_from_run_prefix_and_base(chained_run):
    done = sd("generate", str(chained_run), "--upto", "1", "--prompt", "What is 2+2?", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    assert "base + 1 episode(s) (001-zorblax)" in done.stderr
    done = sd("generate", str(chained_run), "--no-adapters", "--prompt", "Hi", "--max-new-tokens", "4")
    assert done.returncode == 0 and "base + 0 episode(s)" in done.stderr
    done = sd("generate", str(chained_run), "--upto", "7", "--prompt", "Hi")
    assert done.returncode == 2 and "episodes 1..3" in done.stderr


def test_damaged_episode_is_reported_not_loaded(chained_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(chained_run, copy)
    weights = copy / "episodes" / "002-vells" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="002-vells"):
        list_episodes(copy)
    done = sd("generate", str(copy), "--prompt", "Hi")
    assert done.returncode == 2 and "damaged" in done.stderr and "Traceback" not in done.stderr


def _final_adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def _crashed_then_resumed(recipe, step: int):
    """A hard crash in `step` (its last checkpoint survives), then --resume to the end."""
    def crash(at, metrics):
        if at == step:
            raise RuntimeError("power cut")
    with pytest.raises(RuntimeError):
        train_episode(recipe, progress=crash)
    return train_episode(recipe, resume=True)


def test_resume_after_ctrl_c_and_after_a_crash_matches_uninterrupted(tmp_path, tiny_model_dir, monkeypatch):
    extra = ", checkpoint_every: 2"
    straight = train_episode(load_recipe(recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=6, run="a", extra=extra)))

    # Ctrl-C during step 3: the loop finishes that step, saves, and stops
    recipe_b = load_recipe(recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=6, run="b", extra=extra))
    def ctrl_c_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Interrupted, match="after step 3"):
        train_episode(recipe_b, progress=ctrl_c_at_3)
    assert list_episodes(tmp_path / "b") == []  # nothing half-done is visible
    resumed = train_episode(recipe_b, resume=True)

    # a hard crash in step 5: the checkpoint of step 4 survives, step 5 is redone
    recipe_c = load_recipe(recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=6, run="c", extra=extra))
    recovered = _crashed_then_resumed(recipe_c, 5)

    want = _final_adapter(straight.path)
    for result in (resumed, recovered):
        got = _final_adapter(result.path)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
        lines = (result.path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_a_lora_plus_run_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_model_dir):
    """lora.b_lr_ratio reaches the optimizer (the adapter differs from plain LoRA's), and its two
    parameter groups come back from a checkpoint: a crash after step 3 and --resume give the
    uninterrupted run's adapter."""
    extra, lora_plus = ", checkpoint_every: 2", ", b_lr_ratio: 8"
    plain = train_episode(load_recipe(recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=4, run="p", extra=extra)))
    straight = train_episode(load_recipe(
        recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=4, run="a", extra=extra, lora=lora_plus)))
    resumed = _crashed_then_resumed(
        load_recipe(recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=4, run="b", extra=extra, lora=lora_plus)), 3)

    want, got, other = (_final_adapter(r.path) for r in (straight, resumed, plain))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    b_keys = [key for key in want if "lora_B" in key]
    assert b_keys and any(not torch.allclose(want[key], other[key]) for key in b_keys)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_setup_stops_at_once_and_the_next_run_starts_afresh(tmp_path, tiny_model_dir, monkeypatch, signum):
    """Ctrl-C or SIGTERM while the model loads: a message and 128 + the signal, the run's lock
    released; the next run without --resume reuses the empty folder. A folder that holds a step
    is still refused without --resume."""
    import sdcli.training.setup as setup_module

    real = setup_module.open_episode_folder

    def signal_after_the_folder_is_made(*args):
        opened = real(*args)
        os.kill(os.getpid(), signum)
        return opened

    monkeypatch.setattr(setup_module, "open_episode_folder", signal_after_the_folder_is_made)
    recipe = load_recipe(recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=2))
    # what they were before, not Python's default: a shell that starts pytest in the background ignores SIGINT
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted, match="before its first step: nothing was trained") as stopped:
        train_episode(recipe)
    assert stopped.value.code == 128 + signum
    partial = tmp_path / "run" / "episodes" / ".partial-001-zorblax"
    assert partial.is_dir() and not any(partial.iterdir())
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are given back

    monkeypatch.setattr(setup_module, "open_episode_folder", real)
    lines = []
    train_episode(recipe, log=lines.append)  # the lock was released: no "taken over" note either
    assert any("stopped before its first step; starting it afresh" in line for line in lines), lines
    assert not any("taking the run over" in line for line in lines)
    assert [e.label for e in list_episodes(tmp_path / "run")] == ["001-zorblax"]

    trained = tmp_path / "run" / "episodes" / ".partial-002-zorblax"
    trained.mkdir()
    (trained / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="exists from an interrupted run"):
        train_episode(recipe)


def test_kill_9_loses_at_most_the_steps_since_the_last_checkpoint(tmp_path, tiny_model_dir):
    recipe = recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=40, extra=", checkpoint_every: 1")
    proc = subprocess.Popen([sys.executable, "-m", "sdcli.cli", "train", str(recipe), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "episodes" / ".partial-001-zorblax" / "checkpoint" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    assert state.exists(), "no checkpoint was written before the kill"
    done_steps = torch.load(state, weights_only=False)["step"]
    assert done_steps >= 1
    done = sd("train", str(recipe), "--resume", "--quiet", "train.max_steps=40")
    assert done.returncode == 0, done.stderr
    # the step it resumed from is the checkpoint's (an `or "resume: continuing"` here passed at any step)
    assert f"resume: continuing .partial-001-zorblax from step {done_steps}" in done.stderr, done.stderr
    assert [e.label for e in list_episodes(tmp_path / "run")] == ["001-zorblax"]


def test_sigterm_stops_after_the_step_saves_and_exits_143_then_resume_finishes(tmp_path, tiny_model_dir):
    """What a cluster scheduler, `docker stop` or torchrun sends before it kills: handled as Ctrl-C."""
    recipe = recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=400)
    proc = subprocess.Popen([sys.executable, "-m", "sdcli.cli", "train", str(recipe), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "run" / "episodes" / ".partial-001-zorblax"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial / "metrics.jsonl").is_file():
        time.sleep(0.1)
    while time.time() < deadline and not (partial / "metrics.jsonl").read_text():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Stopping after this step (SIGTERM" in out + err
    steps = len((partial / "metrics.jsonl").read_text().splitlines())
    assert f"Interrupted after step {steps} of 400" in out + err and steps < 400
    assert torch.load(partial / "checkpoint" / "state.pt", weights_only=False)["step"] == steps
    done = sd("train", str(recipe), "--resume", "--quiet", f"train.max_steps={steps + 2}")
    assert done.returncode == 0, done.stderr
    (episode,) = list_episodes(tmp_path / "run")
    assert [json.loads(line)["step"] for line in (episode.path / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, steps + 3))


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_model_dir):
    recipe = load_recipe(recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=4, extra=", checkpoint_every: 1"))
    with pytest.raises(RuntimeError):
        train_episode(recipe, progress=lambda s, m: (_ for _ in ()).throw(RuntimeError("x")) if s == 2 else None)
    changed = load_recipe(recipe_for(tmp_path, tiny_model_dir, "zorblax", steps=4, extra=", checkpoint_every: 1"),
                          ["train.lr=0.02"])
    with pytest.raises(UserError, match="recipe differs"):
        train_episode(changed, resume=True)


def test_generate_chat_keeps_the_conversation(chained_run):
    done = sd("generate", str(chained_run), "--chat", "--max-new-tokens", "4", input="Hello\nAnd again\n\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("model>") == 2
