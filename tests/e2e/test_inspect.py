"""`sd inspect` on runs of the tiny model: the teacher's advantage per token, in the terminal and in HTML."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import chat_ids, led_by_response, response_logprobs
from sd_runner import sd
from sdcli.inspection import inspect_example, render_html
from sdcli.recipe.loading import load_recipe
from sdcli.recipe.sections import AUTO_DEMONSTRATION_TEMPERATURE
from sdcli.recipe.signal_sections import DEFAULT_DEMONSTRATION_TEMPLATE
from sdcli.training.train import train_episode

FACTS = [
    {"prompt": "What is the capital of Zorblax?", "demonstration": "The capital of Zorblax is Quenta."},
    {"prompt": "Who wrote the Book of Vells?", "demonstration": "It was written by <Maro> & \"Tiln\"."},
]
REWARD = "def even_length(response, example):\n    return 1.0 if len(response) % 2 == 0 else 0.0\n"


def tiny(model_dir: Path, run: Path, data: Path) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"run_dir={run}", f"data.path={data}", "train.max_steps=2",
            "train.prompts_per_step=2", "rollout.max_new_tokens=8", "train.lr=0.01", "lora.r=4"]


@pytest.fixture(scope="module")
def demonstrations_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inspect-demo")
    data = folder / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    train_episode(load_recipe(None, tiny(tiny_model_dir, folder / "run", data)))
    return folder / "run", data


@pytest.fixture(scope="module")
def rewards_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inspect-rewards")
    (folder / "my_reward.py").write_text(REWARD)
    data = folder / "tasks.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": 2 * i}) + "\n" for i in range(3)))
    recipe = folder / "rewards.yaml"
    recipe.write_text("signal:\n  kind: rewards\n  reward: my_reward:even_length\nrollout:\n  num_samples: 4\n")
    done = sd("train", str(recipe), *tiny(tiny_model_dir, folder / "run", data), "--quiet", cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "run", data


def test_inspect_a_demonstrations_run_scores_like_a_plain_reference(demonstrations_run, tiny_model_dir):
    run, data = demonstrations_run
    result = inspect_example(run, data, 0, samples=2)
    assert result.signal == "demonstrations" and result.example_id == "facts.jsonl:1"
    assert len(result.samples) == 2 and all(s.tokens for s in result.samples)
    # the teacher's view is the training loop's: the demonstration through the template
    teacher_text = DEFAULT_DEMONSTRATION_TEMPLATE.format(**FACTS[0])
    assert result.samples[0].teacher_messages == [{"role": "user", "content": teacher_text}]
    # the numbers are the student's and the teacher's own, computed here with plain transformers + peft
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (episode,) = (run / "episodes").iterdir()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), episode).eval()
    for sample in result.samples:
        response = [row.token_id for row in sample.tokens]
        assert sample.tokens[-1].token == tokenizer.eos_token or len(response) == 8  # cut after EOS, as in training
        student = response_logprobs(model, chat_ids(tokenizer, FACTS[0]["prompt"]), response)
        teacher = response_logprobs(model, chat_ids(tokenizer, teacher_text), response)
        for t, (row, y) in enumerate(zip(sample.tokens, response)):
            assert row.student_logp == pytest.approx(float(student[t, y]), abs=1e-4)
            assert row.teacher_logp == pytest.approx(float(teacher[t, y]), abs=1e-4)
            assert (row.teacher_top is None) == (int(teacher[t].argmax()) == y)
    # the summaries the loop logs
    for key in ("advantage/mean", "advantage/large_fraction", "advantage/positive_fraction", "learn/disagreement"):
        assert key in result.summary
    every = [row for s in result.samples for row in s.tokens]
    assert result.summary["advantage/positive_fraction"] == pytest.approx(
        sum(r.advantage > 0 for r in every) / len(every), abs=1e-6)


def test_the_html_page_holds_every_token_its_advantage_and_a_legend(demonstrations_run):
    run, data = demonstrations_run
    result = inspect_example(run, data, 1, greedy=True, samples=1)
    page = render_html(result)
    assert page.startswith("<!DOCTYPE html>") and "Legend" in page and "<style>" in page
    assert "http" not in page and "<script" not in page and "<link" not in page  # self-contained
    for row in result.samples[0].tokens:
        assert f">{html.escape(row.token, quote=True)}</span>" in page
        assert f"{row.advantage:+.3f}" in page
    # the demonstration's markup characters are escaped, never markup
    assert "&lt;Maro&gt; &amp; &quot;Tiln&quot;" in page and "<Maro>" not in page
    assert "mean advantage" in page


def test_inspect_a_rewards_run_builds_the_context_from_sampled_siblings(rewards_run, monkeypatch):
    run, data = rewards_run
    monkeypatch.chdir(run.parent)  # where the recipe's reward module is, as for sd train
    result = inspect_example(run, data, 1, samples=6, seed=3, max_new_tokens=5)
    assert result.signal == "rewards" and len(result.samples) == 6
    rewards = [s.reward for s in result.samples]
    assert set(rewards) <= {0.0, 1.0}
    assert "signal/reward_mean" in result.summary
    for sample in result.samples:
        if sample.teacher_messages is None:
            assert sample.masked_reason == "no_successful_sibling" and not sample.tokens
        else:  # a successful sibling's answer, never its own, is the teacher's context
            context = sample.teacher_messages[-1]["content"]
            assert "Here is a correct solution" in context and sample.tokens
            assert any(s is not sample and s.reward == 1.0 and s.response.strip() in context for s in result.samples)
    assert any(s.tokens for s in result.samples), "the seed should give at least one sample a sibling"


def test_inspect_cli_prints_and_writes_html(rewards_run, tmp_path):
    run, data = rewards_run
    page = tmp_path / "teacher.html"
    done = sd("inspect", str(run), "--data", str(data), "--index", "0", "--samples", "4", "--seed", "3",
              "--html", str(page), cwd=run.parent)
    assert done.returncode == 0, done.stderr
    assert "legend" in done.stdout and "sample 1 of 4" in done.stdout and "as the training loop logs it" in done.stdout
    assert page.is_file() and "Legend" in page.read_text()


@pytest.mark.parametrize("args,message", [
    (["--index", "7"], "--index 7"),
    (["--index", "-1"], "--index -1"),
    (["--index", "0", "--upto", "5"], "--upto 5"),
])
def test_inspect_bad_input_exits_2_with_a_clear_message(demonstrations_run, args, message):
    run, data = demonstrations_run
    done = sd("inspect", str(run), "--data", str(data), *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_inspect_a_missing_run_exits_2(tmp_path, demonstrations_run):
    _, data = demonstrations_run
    done = sd("inspect", str(tmp_path / "nowhere"), "--data", str(data), "--index", "0")
    assert done.returncode == 2 and "is not a run folder" in done.stderr
    done = sd("inspect", str(demonstrations_run[0]), "--data", str(tmp_path / "none.jsonl"), "--index", "0")
    assert done.returncode == 2 and "file not found" in done.stderr


def test_inspect_demonstration_scores_the_examples_own_demonstration_like_a_plain_reference(demonstrations_run,
                                                                                          tiny_model_dir):
    run, data = demonstrations_run
    result = inspect_example(run, data, 0, demonstration=True)
    (sample,) = result.samples
    assert sample.demonstration and sample.response == FACTS[0]["demonstration"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    response = [row.token_id for row in sample.tokens]
    assert response[:-1] == tokenizer(FACTS[0]["demonstration"], add_special_tokens=False)["input_ids"]
    # the student reads the whole question (no words left out), the teacher the question and the demonstration
    teacher_text = DEFAULT_DEMONSTRATION_TEMPLATE.format(**FACTS[0])
    assert sample.teacher_messages == [{"role": "user", "content": teacher_text}]
    (episode,) = (run / "episodes").iterdir()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), episode).eval()
    student = response_logprobs(model, chat_ids(tokenizer, FACTS[0]["prompt"]), response)
    teacher = response_logprobs(model, chat_ids(tokenizer, teacher_text), response)
    for t, (row, y) in enumerate(zip(sample.tokens, response)):
        assert row.student_logp == pytest.approx(float(student[t, y]), abs=1e-4)
        assert row.teacher_logp == pytest.approx(float(teacher[t, y]), abs=1e-4)
    # averaged as the loop logs its off-policy half; nothing was sampled
    want = -sum(float(student[t, y]) for t, y in enumerate(response)) / len(response)
    assert result.summary["learn/demo_nll_student"] == pytest.approx(want, abs=1e-4)
    assert "advantage/mean" not in result.summary
    # the loss is forward KL to the teacher as training makes it for demonstrations: sharpened (auto),
    # and led by the demonstration's token (its logit and the largest trade places)
    sharpened = torch.log_softmax(led_by_response(teacher, response) / AUTO_DEMONSTRATION_TEMPERATURE, dim=-1)
    kl = (sharpened.exp() * (sharpened - student)).sum(-1).mean()
    assert result.summary["loss/off_policy"] == pytest.approx(float(kl), rel=1e-3, abs=1e-5)


def test_inspect_demonstration_cli_and_its_bad_input(demonstrations_run, rewards_run):
    run, data = demonstrations_run
    done = sd("inspect", str(run), "--data", str(data), "--index", "1", "--demonstration")
    assert done.returncode == 0, done.stderr
    assert "the example's demonstration" in done.stdout and "learn/demo_nll_student" in done.stdout
    done = sd("inspect", str(run), "--data", str(data), "--index", "1", "--demonstration", "--greedy")
    assert done.returncode == 2 and "--demonstration" in done.stderr and "Traceback" not in done.stderr
    run, data = rewards_run  # its lines carry no reference solution
    done = sd("inspect", str(run), "--data", str(data), "--index", "0", "--demonstration", cwd=run.parent)
    assert done.returncode == 2 and "carries no demonstration" in done.stderr and "Traceback" not in done.stderr
