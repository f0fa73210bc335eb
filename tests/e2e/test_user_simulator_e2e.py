"""Interactions, online, through the real loop on the tiny model: the user simulator is the base model
with every adapter off, asked once per step, and the teacher sees what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_runner import sd
from sdcli.recipe.loading import load_recipe
from sdcli.models.model import lora_layers
from sdcli.signals import build_signal
from sdcli.signals.interactions import clean_followup
from sdcli.training.train import train_episode

REPO = Path(__file__).resolve().parents[2]
ONLINE = REPO / "recipes" / "interactions_online.yaml"
SIMULATOR_TOKENS = 5  # the student samples 12: the two kinds of call are told apart by their length limit


def tiny(model_dir: Path, run_dir: Path, steps: int = 2) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"run_dir={run_dir}", f"train.max_steps={steps}", "rollout.max_new_tokens=12",
            "train.lr=0.05", "anchor.prompts_per_step=0", "train.prompts_per_step=2", "rollout.num_samples=2",
            f"signal.simulator.max_new_tokens={SIMULATOR_TOKENS}"]


def adapters_off(model) -> bool:
    layers = lora_layers(model)
    return bool(layers) and all(layer.disable_adapters for layer in layers)


@pytest.fixture()
def recorded(monkeypatch):
    """Every sampling call of the loop (the student's and the simulator's) and every teacher pass."""
    import sdcli.training.setup as setup_module  # the episode's sampler calls sample_responses there
    import sdcli.training.step as step_module  # the rollout calls teacher_pass there

    calls: list[dict] = []
    teacher_views: list[list] = []
    real_sample, real_teacher = setup_module.sample_responses, step_module.teacher_pass

    def sample(model, tokenizer, prompts, settings, stop):
        out = real_sample(model, tokenizer, prompts, settings, stop)
        calls.append({"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                      "prompts": [list(p) for p in prompts], "out": out, "adapters_off": adapters_off(model),
                      "model": model, "tokenizer": tokenizer, "settings": settings, "stop": stop})
        return out

    def teacher(model, decoder, encoder, kept, *args):
        teacher_views.append([q.view for q in kept])
        return real_teacher(model, decoder, encoder, kept, *args)

    monkeypatch.setattr(setup_module, "sample_responses", sample)
    monkeypatch.setattr(step_module, "teacher_pass", teacher)
    return calls, teacher_views


def test_the_simulator_is_the_base_model_asked_once_per_step_and_the_teacher_sees_its_followups(
    tmp_path, tiny_model_dir, recorded
):
    calls, teacher_views = recorded
    result = train_episode(load_recipe(ONLINE, tiny(tiny_model_dir, tmp_path / "run")))

    # per step: one student call (adapters on), then one simulator call for all 2 x 2 samples (adapters off)
    assert [(c["max_new_tokens"], len(c["prompts"]), c["adapters_off"]) for c in calls] == [
        (12, 4, False), (SIMULATOR_TOKENS, 4, True)] * 2
    assert all(c["temperature"] == 0.0 for c in calls[1::2])  # greedy by default

    student, simulator = calls[2], calls[3]  # step 2: the episode's adapter has been trained for a step
    tokenizer = simulator["tokenizer"]
    prompts = [tokenizer.decode(p) for p in simulator["prompts"]]
    samples = tokenizer.batch_decode(student["out"], skip_special_tokens=True)
    for prompt, sample in zip(prompts, samples):
        assert "You are the user in a conversation" in prompt and sample in prompt
    recipe = load_recipe(ONLINE, tiny(tiny_model_dir, tmp_path / "run"))
    logged = {ex.fields["followup"] for ex in build_signal(recipe.signal).load(recipe.data.path).examples}
    assert all(any(followup in prompt for followup in logged) for prompt in prompts)  # the user's intent

    # the simulator's tokens are the plain base model's, greedy, on the same prompts: no adapter in them
    from transformers import AutoModelForCausalLM

    from sdcli.models.rollout import sample_responses

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sample_responses(base, tokenizer, simulator["prompts"], simulator["settings"], simulator["stop"]) == simulator["out"]

    # the teacher saw each sample's own simulated follow-up
    written = [clean_followup(t) for t in tokenizer.batch_decode(simulator["out"], skip_special_tokens=True)]
    assert any(written)  # the random tiny model does write something, so the checks below are not empty
    views = teacher_views[1]
    assert [v.simulated_followup for v in views] == [w for w in written if w]
    for view in views:
        assert view.simulated_followup in view.messages[-1]["content"]
    assert result.final["signal/simulated_followups"] == 4
    assert result.final["signal/simulated_followup_chars"] == pytest.approx(sum(map(len, written)) / 4)


def test_online_logged_followup_never_asks_a_simulator(tmp_path, tiny_model_dir, recorded):
    calls, teacher_views = recorded
    result = train_episode(load_recipe(ONLINE, [*tiny(tiny_model_dir, tmp_path / "run"), "signal.mode=online_logged_followup"]))
    assert [(c["max_new_tokens"], c["adapters_off"]) for c in calls] == [(12, False)] * 2
    assert "signal/simulated_followups" not in result.final
    recipe = load_recipe(ONLINE, tiny(tiny_model_dir, tmp_path / "run"))
    logged = {ex.fields["followup"] for ex in build_signal(recipe.signal).load(recipe.data.path).examples}
    for view in teacher_views[0]:
        assert view.simulated_followup is None and view.feedback in logged and view.feedback in view.messages[-1]["content"]


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, tiny_model_dir) -> Path:
    run = tmp_path_factory.mktemp("online") / "run"
    done = sd("train", str(ONLINE), *tiny(tiny_model_dir, run), "--quiet")
    assert done.returncode == 0, done.stderr
    return run


def test_sd_train_of_the_online_recipe_completes(online_run):
    (episode,) = (online_run / "episodes").iterdir()
    metrics = [json.loads(line) for line in (episode / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    assert all(m["signal/simulated_followups"] == 4 for m in metrics)
    assert all(m["signal/context_fraction"] + m["signal/masked_fraction"] == pytest.approx(1.0) for m in metrics)


def test_sd_inspect_shows_the_simulated_followups(online_run, tmp_path):
    page = tmp_path / "teacher.html"
    done = sd("inspect", str(online_run), "--data", str(REPO / "recipes" / "data" / "interactions.jsonl"), "--index", "0",
              "--samples", "2", "--html", str(page))
    assert done.returncode == 0, done.stderr
    assert "user simulator's follow-up to this response" in done.stdout
    assert "follow-ups written by the user simulator" in done.stdout
    assert "the user simulator&#x27;s follow-up to this response" in page.read_text()
