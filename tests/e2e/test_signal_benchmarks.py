"""benchmarks/signals/run.py --smoke end to end, on the tiny test model (the real model's numbers
are the benchmark's job, not a test's): it trains, reads the episode's own eval and writes every
field of results.json that the README and the full runs rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_rewards_smoke_writes_results(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "signals" / "run.py"), "--signal", "rewards", "--smoke",
               "--out", str(out), "--threads", "1", f"model.name_or_path={tiny_model_dir}", "rollout.max_new_tokens=8"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "paired, held-out score" in done.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["signal"] == "rewards" and results["smoke"] is True and results["seeds"] == [0]
    assert "train.max_steps=2" in results["overrides"] and results["started"] and results["finished"]
    (run,) = results["settings"]["rewards"]["runs"]
    assert run["seed"] == 0 and run["steps"] == 2 and run["seconds"] > 0 and run["train_seconds"] > 0
    assert run["heldout"]["n"] == 30 and run["general"]["n"] == 40
    for key in ("heldout", "general"):
        assert 0.0 <= run[key]["before"] <= 1.0 and 0.0 <= run[key]["after"] <= 1.0
    assert len(run["items"]) == 30 and {"before", "after", "response_after"} <= set(run["items"]["wp-eval-01"])
    assert Path(run["run_dir"], "episodes").is_dir()

    ceiling = results["ceiling"]  # the bare base with each line's worked answer in its prompt, scored once
    assert ceiling["n"] == 30 and 0.0 <= ceiling["score"] <= 1.0 and ceiling["words"] is not None
    assert (out / "ceiling.json").is_file()

    summary = results["settings"]["rewards"]["summary"]
    assert summary["heldout_after"]["n"] == 1 and summary["heldout_after"]["sd"] is None  # one seed: no spread
    assert summary["heldout_gain"]["mean"] == pytest.approx(run["heldout"]["after"] - run["heldout"]["before"])
    paired = summary["paired"]
    assert paired["items"] == 30 and paired["seeds"] == 1
    assert paired["up"] + paired["down"] + paired["same"] == 30 and 0.0 <= paired["sign_test_p"] <= 1.0
    assert paired["mean_diff_per_item_and_seed"] == pytest.approx(summary["heldout_gain"]["mean"])


def test_an_existing_run_is_not_stacked_on(tmp_path):
    (tmp_path / "out" / "rewards-s0").mkdir(parents=True)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "signals" / "run.py"), "--signal", "rewards", "--smoke",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--force" in done.stderr
