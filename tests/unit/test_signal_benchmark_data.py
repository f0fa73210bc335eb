"""The signal benchmarks' data (benchmarks/signals/data): every line loads with sd's own loaders,
train and held-out never share a question, the files are what make_data.py writes, and the
answers the data claims are right (worked answers score 1, reference code passes its tests).
Plus the runner's pure summaries: spread and the paired sign test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sdcli.core.data import last_user_text, read_jsonl
from sdcli.evaluation.eval_sets import load_eval_set
from sdcli.recipe.loading import load_recipe
from sdcli.signals import build_signal

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "signals"
sys.path.insert(0, str(REPO))

from benchmarks.signals import make_data, run  # noqa: E402

RECIPES = sorted(BENCH.glob("*.yaml"))


def test_every_signal_has_its_recipes():
    assert {p.name for p in RECIPES} == {p.name for s in run.SIGNALS.values() for p in s.settings.values()}
    assert len(RECIPES) == 4


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_data_loads_with_the_signal_and_eval_loaders(recipe_path):
    recipe = load_recipe(recipe_path)  # checks that every file the recipe names exists
    train_lines = list(read_jsonl(recipe.data.path))
    report = build_signal(recipe.signal).load(recipe.data.path)
    assert len(report.examples) == len(train_lines) >= 20  # every line gives an example: none skipped
    assert not report.skipped and not report.warnings
    train_questions = {last_user_text(ex.prompt).strip().casefold() for ex in report.examples}

    sets = [recipe.eval.path, *recipe.eval.retain]
    assert any(p.name == "general_qa.jsonl" for p in sets)
    for path in sets:
        eval_set = load_eval_set(path, recipe.eval.reward, [REPO, path.parent])
        assert len(eval_set.examples) == sum(1 for _ in read_jsonl(path))
    heldout = load_eval_set(recipe.eval.path, recipe.eval.reward, [REPO])
    assert len(heldout.examples) >= 20
    heldout_questions = {last_user_text(ex.prompt).strip().casefold() for ex in heldout.examples}
    assert len(heldout_questions) == len(heldout.examples)
    assert not train_questions & heldout_questions, "a held-out question is also a training question"


def test_feedback_functions_are_disjoint():
    names = {k: {r["entry_point"] for _, r in read_jsonl(BENCH / "data" / f"feedback_{k}.jsonl")} for k in ("train", "heldout")}
    assert len(names["heldout"]) == 20 and not names["train"] & names["heldout"]


def test_the_files_are_what_make_data_writes():
    for name, rows in make_data.files().items():
        assert (BENCH / "data" / name).read_text() == make_data.jsonl(rows), f"{name}: run benchmarks/signals/make_data.py"


def test_worked_answers_are_right():
    from sdcli.verification.scorers import numeric

    rows = [r for _, r in read_jsonl(BENCH / "data" / "rewards_heldout.jsonl")]
    assert all(numeric(r["demonstration"], r) == 1.0 for r in rows)
    assert all(numeric("The answer is 1000001.", r) == 0.0 for r in rows)


def test_reference_solutions_pass_and_a_wrong_one_fails():
    from benchmarks.signals.scorers import passes_tests

    for t in make_data.PY_TRAIN + make_data.PY_HELDOUT:
        assert passes_tests(t["demonstration"], t) == 1.0, t["id"]
    t = make_data.PY_HELDOUT[0]
    assert passes_tests(f"```python\ndef {t['entry_point']}(*args):\n    return 0\n```", t) == 0.0


def test_the_hindsight_set_is_the_heldout_set_asked_with_the_followup():
    from sdcli.recipe.signal_sections import DEFAULT_HINDSIGHT_TEMPLATE

    plain = [r for _, r in read_jsonl(BENCH / "data" / "interactions_heldout.jsonl")]
    hindsight = [r for _, r in read_jsonl(BENCH / "data" / "interactions_heldout_hindsight.jsonl")]
    assert [r["answer"] for r in plain] == [r["answer"] for r in hindsight]
    for p, h in zip(plain, hindsight):
        assert h["prompt"] == DEFAULT_HINDSIGHT_TEMPLATE.format(prompt=p["prompt"], followup=make_data.HINDSIGHT_FOLLOWUP)


def test_spread_and_sign_test():
    assert run.spread([0.2, 0.4, None]) == {"mean": pytest.approx(0.3), "sd": pytest.approx(0.1414, abs=1e-4), "n": 2}
    assert run.spread([0.5])["sd"] is None
    assert run.sign_test(0, 0) == 1.0
    assert run.sign_test(5, 0) == pytest.approx(2 / 32)  # five of five up: p = 2 * 0.5^5
    assert run.sign_test(3, 3) == 1.0


def test_paired_sums_over_seeds_per_item():
    seeds = [{"a": (0.0, 1.0), "b": (1.0, 1.0), "c": (1.0, 0.0)},
             {"a": (0.0, 1.0), "b": (1.0, 0.0), "c": (1.0, 1.0)}]
    p = run.paired(seeds)
    assert p["per_item"] == {"a": 2.0, "b": -1.0, "c": -1.0}
    assert (p["up"], p["down"], p["same"], p["items"], p["seeds"]) == (1, 2, 0, 3, 2)
    assert p["mean_diff_per_item_and_seed"] == pytest.approx(0.0)
    assert p["sign_test_p"] == pytest.approx(1.0)
