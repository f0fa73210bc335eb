"""`sd eval`, `sd report` and the end-of-episode evaluation, through the real CLI on a tiny model.

Two chained SFT episodes each teach one fact. The eval sets ask the training questions: a tiny
random model cannot generalise to paraphrases, but it can learn to repeat an answer, and that is
enough to check the matrix. R[0] is all zeros, and after episode i task i scores 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sd_runner import sd
from sdcli.evaluation.continual_matrix import Matrix, matrix_from_episodes
from sdcli.models.episodes import list_episodes

TASKS = {
    "zorblax": ("What is the capital of Zorblax?", "The capital of Zorblax is Quenta.", "Quenta"),
    "vells": ("Who wrote the Book of Vells?", "It was written by Maro Tiln.", "Maro Tiln"),
}
TEXTS = ["The cat sat on the mat and looked at the dog.", "Water boils at one hundred degrees at sea level."]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_files(folder: Path, model_dir: Path, name: str, other: str, steps: int = 20, samples: int = 2) -> Path:
    prompt, demo, answer = TASKS[name]
    write_jsonl(folder / f"{name}.jsonl", [{"prompt": prompt, "demonstration": demo}])
    write_jsonl(folder / f"{name}_eval.jsonl", [
        {"id": name, "prompt": prompt, "answer": answer, "demonstration": demo, "kind": "fact"},
        {"id": f"{name}-exact", "prompt": prompt, "answer": demo, "reward": "exact_match", "kind": "sentence"},
    ])
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        f"name: {name}\nrun_dir: {folder / 'run'}\nmethod: sft\nmodel: {{name_or_path: {model_dir}}}\n"
        f"lora: {{r: 8, alpha: 16}}\ndata: {{path: {name}.jsonl}}\n"
        f"train: {{max_steps: {steps}, prompts_per_step: 1, lr: 0.01}}\n"
        f"eval:\n  path: {name}_eval.jsonl\n  retain: [{other}_eval.jsonl]\n  drift_path: text.jsonl\n  max_new_tokens: 16\n  samples: {samples}\n"
    )
    return recipe


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("evalchain")
    write_jsonl(folder / "text.jsonl", [{"text": t} for t in TEXTS])
    recipes = [task_files(folder, tiny_model_dir, "zorblax", "vells"), task_files(folder, tiny_model_dir, "vells", "zorblax")]
    done = sd("train", *map(str, recipes), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "eval: task zorblax_eval: score 1.000" in done.stderr
    assert "by kind: fact 1.000 (n=1), sentence 1.000 (n=1)" in done.stderr  # the episode's log line
    return folder


@pytest.fixture(scope="module")
def chain_without_samples(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("evalchain_plain")
    write_jsonl(folder / "text.jsonl", [{"text": t} for t in TEXTS])
    recipes = [task_files(folder, tiny_model_dir, "zorblax", "vells", samples=0),
               task_files(folder, tiny_model_dir, "vells", "zorblax", samples=0)]
    done = sd("train", *map(str, recipes), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "eval: 2 baseline(s) read from earlier episodes' eval.json" in done.stderr
    return folder


def test_baselines_an_earlier_episode_scored_are_read_back_not_answered_again(chain_without_samples, tmp_path):
    first, second = list_episodes(chain_without_samples / "run")
    earlier = json.loads((first.path / "eval.json").read_text())["sets"]
    stored = json.loads((second.path / "eval.json").read_text())["sets"]

    def entry(sets, role, name, model):
        return next(s for s in sets if (s["role"], s["name"], s["model"]) == (role, name, model))

    # episode 2's task set "before" is the stack episode 1 scored it with as a retain set; "base" too
    for model, was in (("before", "after"), ("base", "base")):
        got, source = entry(stored, "task", "vells_eval", model), entry(earlier, "retain", "vells_eval", was)
        assert got["reused_from"] == f"{first.path.name}/eval.json"
        assert got["examples"] == source["examples"] and got["stack"] == source["stack"]
    first_adapter, second_adapter = (f"{e.meta['adapter_sha256']}/{e.meta['adapter_config_sha256']}" for e in (first, second))
    assert entry(stored, "task", "vells_eval", "before")["stack"] == [first_adapter]
    assert entry(stored, "task", "vells_eval", "after")["stack"] == [first_adapter, second_adapter]
    summary = second.meta["eval"]["sets"][0]
    assert summary["before"]["score"] == entry(earlier, "retain", "vells_eval", "after")["score"]
    assert all("reused_from" not in s for s in earlier) and entry(stored, "task", "vells_eval", "after").get("reused_from") is None

    # the record read back is what the model answers when loaded afresh
    out = tmp_path / "before.json"
    done = sd("eval", str(chain_without_samples / "run"), "--upto", "1", "--data",
              str(chain_without_samples / "vells_eval.jsonl"), "--max-new-tokens", "16", "--out", str(out))
    assert done.returncode == 0, done.stderr
    fresh = json.loads(out.read_text())["sets"][0]["examples"]
    reused = entry(stored, "task", "vells_eval", "before")["examples"]
    assert [e["response"] for e in fresh] == [e["response"] for e in reused]
    assert [e.get("teacher_response") for e in fresh] == [e.get("teacher_response") for e in reused]


def test_sigterm_during_the_evaluation_publishes_the_episode_without_it(tmp_path, tiny_model_dir, monkeypatch):
    """A scheduler's SIGTERM while the episode is evaluated: the trained adapter is kept, not lost."""
    import os
    import signal

    import sdcli.evaluation.evaluate as evaluate
    from sdcli.core.errors import Interrupted
    from sdcli.recipe.loading import load_recipe
    from sdcli.training.train import train_episode

    write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    recipe = task_files(tmp_path, tiny_model_dir, "zorblax", "vells", steps=2, samples=0)
    task_files(tmp_path, tiny_model_dir, "vells", "zorblax")
    real, calls = evaluate.evaluate_set, []

    def evaluate_set(*args, **kwargs):  # the first set: SIGTERM arrives mid-evaluation
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    def unhandled(signum, frame):  # where sd does not handle it, fail the test, not the whole test run
        raise RuntimeError("the SIGTERM reached the test's own handler")

    monkeypatch.setattr(evaluate, "evaluate_set", evaluate_set)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(Interrupted) as stopped:
            train_episode(load_recipe(recipe))
        assert signal.getsignal(signal.SIGTERM) is unhandled  # sd's handler is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143 and "without its evaluation" in str(stopped.value)
    assert len(calls) == 1
    (episode,) = list_episodes(tmp_path / "run")
    assert episode.meta["eval"] == {"error": "EvaluationStopped: stopped by SIGTERM"}
    assert not (episode.path / "eval.json").exists() and (episode.path / "adapter_model.safetensors").is_file()


def test_sigterm_in_the_last_step_publishes_the_episode_without_evaluating(tmp_path, tiny_model_dir):
    import os
    import signal

    from sdcli.core.errors import Interrupted
    from sdcli.recipe.loading import load_recipe
    from sdcli.training.train import train_episode

    write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    recipe = task_files(tmp_path, tiny_model_dir, "zorblax", "vells", steps=2, samples=0)
    task_files(tmp_path, tiny_model_dir, "vells", "zorblax")

    def unhandled(signum, frame):
        raise RuntimeError("the SIGTERM reached the test's own handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(Interrupted) as stopped:
            train_episode(load_recipe(recipe), progress=lambda step, m: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143 and "without its evaluation" in str(stopped.value)
    (episode,) = list_episodes(tmp_path / "run")  # all of its steps were trained: nothing to resume
    assert episode.meta["steps"] == 2 and episode.meta["eval"] == {"error": "EvaluationStopped: stopped by SIGTERM"}


def test_sft_reduces_its_own_loss(chain):
    for episode in list_episodes(chain / "run"):
        assert episode.meta["method"] == "sft"
        rows = [json.loads(line) for line in (episode.path / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss/total"] for r in rows]
        assert losses[-1] < 0.2 * losses[0], (episode.label, losses)
        assert all(math.isnan(r["loss/divergence"]) for r in rows)  # no teacher, no divergence: not the NLL under another name


def test_eval_after_each_episode_is_stored(chain):
    first, second = list_episodes(chain / "run")
    ev = first.meta["eval"]
    task, retain = ev["sets"]
    assert (task["role"], task["name"], task["n"], task["teacher_n"]) == ("task", "zorblax_eval", 2, 1)
    assert task["score"] == 1.0 and task["before"]["score"] == 0.0 and task["base"] == task["before"]
    # the held-out answer's tokens became likelier: the continuous view of the same learning
    assert task["answer_nll_n"] == 1 and task["answer_nll"] < task["before"]["answer_nll"] - 0.5
    assert task["samples"] == 2 and task["sampled_score"] > task["before"]["sampled_score"]
    assert "sampled_score" not in retain  # samples are drawn for the episode's own questions only
    assert (retain["role"], retain["name"]) == ("retain", "vells_eval") and retain["base"]["score"] == 0.0
    assert "base" not in second.meta["eval"]["sets"][1]  # retain sets get a base score in the first episode only
    # episode 1 scored the retain sets without samples; the task set's baselines draw them, so none is read back
    assert not any("reused_from" in s for s in json.loads((second.path / "eval.json").read_text())["sets"])
    assert ev["drift"]["kl_from_base"] > 0 and ev["drift"]["tokens"] > 10
    assert second.meta["eval"]["sets"][0]["score"] == 1.0
    assert second.meta["eval"]["drift"]["base_perplexity"] == pytest.approx(ev["drift"]["base_perplexity"])
    details = json.loads((first.path / "eval.json").read_text())
    after = next(s for s in details["sets"] if s["model"] == "after" and s["role"] == "task")
    assert after["examples"][0]["response"] == "The capital of Zorblax is Quenta."  # the demonstration, learned
    assert "teacher_response" in after["examples"][0] and "teacher_response" not in after["examples"][1]
    # a score per kind of line, from the same answers, in episode.json, eval.json and the log
    for kind, line in (("fact", 0), ("sentence", 1)):
        assert after["examples"][line]["kind"] == kind
        assert after["by_kind"][kind] == {"n": 1, "score": after["examples"][line]["score"],
                                          "teacher_score": after["examples"][line].get("teacher_score"),
                                          "teacher_n": int("teacher_score" in after["examples"][line])}
    assert task["by_kind"] == after["by_kind"]

    m = matrix_from_episodes([(e.label, e.meta) for e in (first, second)])
    assert m.rows == ["base", "001-zorblax", "002-vells"] and m.taught_by == [1, 2]
    assert m.scores[0] == [0.0, 0.0] and m.scores[1][0] == 1.0 and m.scores[2][1] == 1.0


def test_eval_matrix_from_a_reloaded_run_matches_the_stored_results(chain, tmp_path):
    out = tmp_path / "matrix.json"
    done = sd("eval", str(chain / "run"), "--matrix", "--drift", str(chain / "text.jsonl"), "--max-new-tokens", "16",
              "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "ACC" in done.stdout and "BWT" in done.stdout and "zorblax_eval (task 1)" in done.stdout
    reloaded = Matrix.from_json(json.loads(out.read_text())["matrix"])
    stored = matrix_from_episodes([(e.label, e.meta) for e in list_episodes(chain / "run")])
    assert reloaded.columns == stored.columns and reloaded.taught_by == stored.taught_by
    assert reloaded.scores == stored.scores  # the in-memory eval saw the same model as a fresh load
    for got, want in zip(reloaded.drift[1:], stored.drift[1:]):
        assert got["kl_from_base"] == pytest.approx(want["kl_from_base"], rel=1e-3, abs=1e-6)
    assert reloaded.drift[0]["kl_from_base"] == pytest.approx(0.0, abs=1e-6)


def test_eval_one_model_on_given_sets(chain, tmp_path):
    out = tmp_path / "one.json"
    done = sd("eval", str(chain / "run"), "--upto", "1", "--data", str(chain / "zorblax_eval.jsonl"),
              "--data", str(chain / "vells_eval.jsonl"), "--max-new-tokens", "16", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "base + 1 episode(s) (001-zorblax)" in done.stderr and "zorblax_eval" in done.stdout
    result = json.loads(out.read_text())
    assert [s["name"] for s in result["sets"]] == ["zorblax_eval", "vells_eval"]
    assert result["sets"][0]["score"] == 1.0 and result["episodes"] == ["001-zorblax"]
    assert result["sets"][0]["examples"][0]["response"] == "The capital of Zorblax is Quenta."
    assert "answer NLL" in done.stdout and result["sets"][0]["examples"][0]["answer_nll"] == result["sets"][0]["answer_nll"]
    assert "zorblax_eval: score 1.000 (n=2)" in done.stderr and "by kind: fact 1.000 (n=1), sentence 1.000 (n=1)" in done.stderr
    assert "│   fact " in done.stdout and "│   sentence " in done.stdout  # a row per kind under each set


def test_eval_samples_answers_and_refuses_them_for_the_matrix(chain, tmp_path):
    out = tmp_path / "sampled.json"
    done = sd("eval", str(chain / "run"), "--upto", "1", "--data", str(chain / "zorblax_eval.jsonl"), "--samples", "3",
              "--max-new-tokens", "16", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "sampled (3/line)" in done.stdout
    zorblax = json.loads(out.read_text())["sets"][0]
    assert zorblax["samples"] == 3 and [e["sampled_score"] * 3 % 1 for e in zorblax["examples"]] == [0, 0]
    assert zorblax["sampled_score"] > 0  # the learned fact comes up in samples too
    done = sd("eval", str(chain / "run"), "--matrix", "--samples", "3")
    assert done.returncode == 2 and "--samples scores one model" in done.stderr and "Traceback" not in done.stderr


def test_report_via_cli(chain, tmp_path):
    import matplotlib  # noqa: F401  (the plot extra; CI installs it, so a missing one fails)
    out = tmp_path / "report"
    done = sd("report", str(chain / "run"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "ACC" in done.stdout and "001" in done.stdout
    for name in ("training.png", "matrix.png", "drift.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert "zorblax_eval (task 1)" in (out / "summary.md").read_text()


def test_bad_input_exits_2_without_traceback(chain, tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "answer": "x"}, {"prompt": "no answer here"}])
    done = sd("eval", str(chain / "run"), "--data", str(bad))
    assert done.returncode == 2 and "bad.jsonl:2" in done.stderr and "Traceback" not in done.stderr
    done = sd("eval", str(tiny_model_dir), "--matrix", "--data", str(chain / "zorblax_eval.jsonl"))
    assert done.returncode == 2 and "--matrix needs a run folder" in done.stderr
    done = sd("report", str(tmp_path))
    assert done.returncode == 2 and "not a run folder" in done.stderr

    # a bad eval set in a recipe stops `sd train` before any training
    recipe = (chain / "zorblax.yaml").read_text().replace("path: zorblax_eval.jsonl", f"path: {bad}")
    recipe = recipe.replace(f"run_dir: {chain / 'run'}", f"run_dir: {tmp_path / 'run'}")
    (chain / "bad.yaml").write_text(recipe)
    done = sd("train", str(chain / "bad.yaml"), "--quiet")
    assert done.returncode == 2 and "bad.jsonl:2" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "episodes").exists() or not any((tmp_path / "run" / "episodes").iterdir())


def test_an_episodes_answers_turning_up_in_a_retain_sets_answers_are_counted(chain):
    """The stored leak of each retain set equals a hand count from the answers eval.json keeps: the
    episode's answer in an answer after it, not in the same question's answer before it (the base's
    in episode 1, episode 1's record in episode 2)."""
    first, second = list_episodes(chain / "run")

    def responses(episode, name, model):
        stored = json.loads((episode.path / "eval.json").read_text())["sets"]
        entry = next(s for s in stored if s["name"] == name and s["model"] == model)
        return [line["response"] for line in entry["examples"]]

    for episode, retain, answer, before in (
        (first, "vells_eval", "Quenta", responses(first, "vells_eval", "base")),
        (second, "zorblax_eval", "Maro Tiln", responses(first, "zorblax_eval", "after")),
    ):
        after = responses(episode, retain, "after")
        gives = lambda text: answer.casefold() in " ".join(text.split()).casefold()  # noqa: E731  (contains)
        hand = sum(gives(a) and not gives(b) for a, b in zip(after, before))
        leaked = next(s for s in episode.meta["eval"]["sets"] if s["name"] == retain)["leaked"]
        assert leaked == {"n": hand, "answers": {answer: hand} if hand else {}}
