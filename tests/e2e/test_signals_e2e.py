"""Every signal kind through the real loop on a tiny model: context building, masking, metrics."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from sd_runner import sd
from sdcli.recipe.loading import load_recipe
from sdcli.training.train import train_episode

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(model_dir: Path, run_dir: Path, steps: int = 2) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"run_dir={run_dir}", f"train.max_steps={steps}",
            "rollout.max_new_tokens=12", "train.lr=0.01",
            "anchor.prompts_per_step=0"]  # these tests count samples; anchors are tested in test_off_policy.py


def metrics_of(run_dir: Path) -> list[dict]:
    (episode,) = (run_dir / "episodes").iterdir()
    return [json.loads(line) for line in (episode / "metrics.jsonl").read_text().splitlines()]


def test_rewards_recipe_runs_with_a_user_reward(tmp_path, tiny_model_dir, monkeypatch):
    # a deterministic verifier that passes about half of the samples, so siblings exist
    (tmp_path / "my_reward.py").write_text(
        "def even_length(response, example):\n    return 1.0 if len(response) % 2 == 0 else 0.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # where PYTHONPATH would put it for `sd`
    monkeypatch.delitem(sys.modules, "my_reward", raising=False)  # and imported afresh, as by a new process
    run = tmp_path / "run"
    done = sd("train", str(REPO / "recipes" / "rewards_arithmetic.yaml"), *tiny_overrides(tiny_model_dir, run, 3),
              "signal.reward=my_reward:even_length", "--quiet")
    assert done.returncode == 0, done.stderr
    metrics = metrics_of(run)
    assert all(math.isfinite(m["loss/total"]) for m in metrics)
    for m in metrics:
        assert 0.0 <= m["signal/reward_mean"] <= 1.0
        assert m["signal/context_fraction"] + m["signal/masked_fraction"] == pytest.approx(1.0)
    assert any(m["signal/context_fraction"] > 0 for m in metrics)


def test_rewards_recipe_with_a_bad_user_function_exits_2(tmp_path, tiny_model_dir):
    done = sd("train", str(REPO / "recipes" / "rewards_arithmetic.yaml"), *tiny_overrides(tiny_model_dir, tmp_path / "r"),
              "signal.reward=no_such_module:fn")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no_such_module" in done.stderr


def test_feedback_recipe_runs_in_the_sandbox(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    done = sd("train", str(REPO / "recipes" / "feedback_python.yaml"), *tiny_overrides(tiny_model_dir, run),
              "signal.sandbox.wall_seconds=5", "--quiet")
    assert done.returncode == 0, done.stderr
    metrics = metrics_of(run)
    assert all(math.isfinite(m["loss/total"]) for m in metrics)
    # a 2-layer random model writes no passing code: every sample fails, and its feedback is the context
    assert all(m["signal/success_rate"] == 0.0 for m in metrics)
    assert all(m["signal/context_fraction"] == 1.0 for m in metrics)


def test_interactions_offline_never_generates(tmp_path, tiny_model_dir, monkeypatch):
    import sdcli.training.setup as train_module  # the episode's sampler calls sample_responses there

    def forbidden(*args, **kwargs):
        raise AssertionError("offline mode must not sample")

    monkeypatch.setattr(train_module, "sample_responses", forbidden)
    recipe = load_recipe(REPO / "recipes" / "interactions_offline.yaml", tiny_overrides(tiny_model_dir, tmp_path / "run"))
    result = train_episode(recipe)
    assert math.isfinite(result.final["loss/total"]) and result.final["loss/total"] > 0
    assert result.final["signal/context_fraction"] == 1.0


def test_interactions_online_samples_from_the_student(tmp_path, tiny_model_dir, monkeypatch):
    import sdcli.training.setup as train_module  # the episode's sampler calls sample_responses there

    calls = []
    real = train_module.sample_responses
    monkeypatch.setattr(train_module, "sample_responses", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe = load_recipe(REPO / "recipes" / "interactions_online.yaml", tiny_overrides(tiny_model_dir, tmp_path / "run"))
    result = train_episode(recipe)
    # per step one call for the student's samples and one for the user simulator's follow-ups to them
    assert len(calls) == 4 and math.isfinite(result.final["loss/total"])


def test_interactions_recipe_via_cli_reports_skipped_examples(tmp_path, tiny_model_dir):
    done = sd("train", str(REPO / "recipes" / "interactions_offline.yaml"), *tiny_overrides(tiny_model_dir, tmp_path / "run"),
              "--quiet")
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stderr and "no_followup" in done.stderr


def test_sft_method_trains_on_demonstrations(tmp_path, tiny_model_dir):
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [*tiny_overrides(tiny_model_dir, tmp_path / "run", 3), "method=sft"])
    result = train_episode(recipe)
    assert math.isfinite(result.final["loss/total"]) and result.final["loss/total"] > 0
    meta = json.loads((result.path / "episode.json").read_text())
    assert meta["method"] == "sft"
