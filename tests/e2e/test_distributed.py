"""Data-parallel episodes on torch.distributed (gloo, CPU, the tiny model), started as users start
them: `torchrun --nproc_per_node=2 -m sdcli train ...` and `sd train --nproc 2`.

- With deterministic rollouts, two ranks train the adapter one process trains on the same global
  batch (shares of uneven size, anchors split too).
- kill -9 of one rank after a checkpoint, then --resume: the adapter of an uninterrupted 2-rank run
  (sampled rollouts: every rank's random stream is checkpointed).
- A failure on one rank, or a run held by another command, stops every rank with one message.
"""

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
from safetensors.torch import load_file

from sdcli.models.episodes import list_episodes
from sdcli.recipe.loading import load_recipe
from sdcli.training.train import train_episode

REPO = Path(__file__).resolve().parents[2]

FACTS = [
    {"prompt": "What is the capital of Zorblax?", "demonstration": "The capital of Zorblax is Quenta."},
    {"prompt": "Who wrote the Book of Vells?", "demonstration": "It was written by Maro Tiln."},
    {"prompt": "What do the Drell eat?", "demonstration": "The Drell eat blue moss."},
    {"prompt": "How tall is Mount Ferro?", "demonstration": "Mount Ferro is 4,120 metres tall."},
    {"prompt": "Where is Lake Omm?", "demonstration": "Lake Omm lies north of Quenta."},
]
ANCHORS = ["Say hello.", "Name a colour.", "What is 3+4?", "Give me a short tip for sleeping well."]

# `python -m sdcli ARGS` with a failure planted on one rank ("RANK:CALL", the CALL-th teacher pass)
PLANTED = """
import os
import sdcli.training.step as train  # the rollout calls teacher_pass there
rank, at = map(int, os.environ["SD_TEST_PLANT"].split(":"))
real, calls = train.teacher_pass, [0]
def teacher_pass(*args, **kwargs):
    calls[0] += 1
    if int(os.environ["RANK"]) == rank and calls[0] == at:
        raise RuntimeError("planted failure in the teacher pass")
    return real(*args, **kwargs)
train.teacher_pass = teacher_pass
from sdcli.cli import main
main()
"""


def write_recipe(tmp_path: Path, model_dir: Path, rollout: str, train: str, anchors: int = 3) -> Path:
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    (tmp_path / "anchors.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ANCHORS))
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"name: facts\nrun_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {model_dir}}}\n"
        "lora: {r: 4, alpha: 8}\ndata: {path: facts.jsonl}\nloss: {chunk_tokens: 4}\n"
        f"rollout: {{max_new_tokens: 8, {rollout}}}\ntrain: {{prompts_per_step: 3, {train}}}\n"
        f"anchor: {{path: anchors.jsonl, prompts_per_step: {anchors}, max_new_tokens: 6}}\n"
    )
    return path


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run(cmd: list[str], timeout: int = 120, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**env(), **extra_env}, cwd=REPO)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    [episode] = list_episodes(run_dir)
    return load_file(episode.path / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("rollout", ["off_policy_fraction: 1", "off_policy_fraction: 1, teacher_answers: 2"])
def test_two_ranks_train_the_adapter_of_one_process_on_the_same_global_batch(tmp_path, tiny_model_dir, rollout):
    """Off-policy only (no student sampling): 3 prompts per step over 2 ranks (shares of 1 and 2: an
    unweighted average of the ranks' gradients ends 3e-3 away), 3 anchors per step split the same way.
    With teacher answers every rank writes those of the whole global batch, from the same seed, so
    the second pass over the data (steps 3-5) learns on the same answers in both runs.

    At the default learning rate. The two runs add the same numbers in another order (other padding,
    the batch's sum in two parts), ~1e-7 apart in loss and gradient norm; AdamW turns that into
    ~3e-7 on the adapter here, and into ~2e-5 at lr 0.01, where it normalises gradients that are
    nearly zero and mostly rounding."""
    recipe = write_recipe(tmp_path, tiny_model_dir, rollout, "max_steps: 5")
    one = train_episode(load_recipe(recipe, [f"run_dir={tmp_path / 'one'}"]))

    done = run(torchrun("-m", "sdcli", "train", str(recipe), "--quiet", f"run_dir={tmp_path / 'two'}"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("done ") == 1 and done.stderr.count("step 5/5") == 1  # rank 0 alone speaks

    assert max_difference(adapter(tmp_path / "two"), adapter(tmp_path / "one")) <= 1e-5
    # rank 0 alone wrote: one episode, whose log line covers the whole global batch
    assert [p.name for p in (tmp_path / "two" / "episodes").iterdir()] == ["001-facts"]
    lines = [json.loads(line) for line in (list_episodes(tmp_path / "two")[0].path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    want = [json.loads(line) for line in (one.path / "metrics.jsonl").read_text().splitlines()]
    for got, expected in zip(lines, want):
        for key in ("loss/total", "loss/divergence", "optim/grad_norm", "response/mean_tokens", "loss/off_policy", "loss/anchor", "learn/demo_nll_student"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
        assert "time/sync_s" in got


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker of `rank` that torchrun (`parent`) started."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_kill_9_of_one_rank_then_resume_gives_the_uninterrupted_adapter(tmp_path, tiny_model_dir):
    """Sampled rollouts (half the prompts on-policy): the resumed ranks must sample what they would
    have sampled, so every rank's random state travels in the checkpoint."""
    # 40 steps: the kill must land between the first checkpoint and the end, and at ~0.08 s a step
    # 12 steps left about a second for that, which a loaded machine can take from this process
    recipe = write_recipe(tmp_path, tiny_model_dir, "off_policy_fraction: 0.5", "max_steps: 40, checkpoint_every: 2")
    straight = run(torchrun("-m", "sdcli", "train", str(recipe), "--quiet", f"run_dir={tmp_path / 'straight'}"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    # torchrun sends the surviving rank SIGTERM as soon as it sees the killed one (it looks every
    # 0.1 s); sd finishes its step on SIGTERM, so rank 0 reaches its next exchange, finds the other
    # rank gone and says so, however early the SIGTERM comes (before, it could die without a word).
    cmd = torchrun("-m", "sdcli", "train", str(recipe), "--quiet", f"run_dir={tmp_path / 'killed'}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    state = tmp_path / "killed" / "episodes" / ".partial-001-facts" / "checkpoint" / "state.pt"
    deadline = time.time() + 90
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    pid = _rank_pid(proc.pid, 1)
    assert state.exists() and pid is not None, "no checkpoint before the run ended"
    os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert list_episodes(tmp_path / "killed") == [], "the run finished before the kill; nothing was tested"
    assert "rank 0 of 2" in stderr and "lost contact with the other ranks" in stderr
    assert 2 <= torch.load(state, weights_only=True)["step"] < 40

    resumed = run(torchrun("-m", "sdcli", "train", str(recipe), "--quiet", "--resume", f"run_dir={tmp_path / 'killed'}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: continuing" in resumed.stderr
    assert max_difference(adapter(tmp_path / "killed"), adapter(tmp_path / "straight")) <= 1e-5
    lines = (list_episodes(tmp_path / "killed")[0].path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 41))


def test_sigterm_to_sd_train_nproc_stops_every_rank_after_its_step_and_saves(tmp_path, tiny_model_dir):
    """A scheduler stopping the job sends SIGTERM to the launcher, which passes it to every rank."""
    recipe = write_recipe(tmp_path, tiny_model_dir, "off_policy_fraction: 1", "max_steps: 400", anchors=0)
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "sdcli", "train", str(recipe), "--quiet", "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env(), "TMPDIR": str(temp)},
                            cwd=REPO)
    metrics = tmp_path / "run" / "episodes" / ".partial-001-facts" / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-3000:]
    steps = len(metrics.read_text().splitlines())
    assert err.count(f"Interrupted after step {steps} of 400") == 1, err[-3000:]  # rank 0 speaks for the job
    state = torch.load(metrics.parent / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == steps < 400
    assert list(temp.iterdir()) == []  # the launcher's agent leaves no folder behind, stopped or not


def test_a_failure_on_one_rank_stops_every_rank_with_one_message(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, "off_policy_fraction: 1", "max_steps: 6", anchors=0)
    script = tmp_path / "planted.py"
    script.write_text(PLANTED)
    start = time.time()
    done = subprocess.run(torchrun(str(script), "train", str(recipe), "--quiet"), capture_output=True, text=True,
                          timeout=120, env={**env(), "SD_TEST_PLANT": "1:3"}, cwd=REPO)
    assert done.returncode != 0
    assert time.time() - start < 100  # every rank stopped; none waits for the one that failed
    assert done.stderr.count("planted failure in the teacher pass") == 1, done.stderr[-3000:]
    assert "internal error: rank 1 of 2" in done.stderr
    assert "step 2/6" in done.stderr and "step 3/6" not in done.stderr  # all stopped at the same step
    assert not any("sdcli" in line for line in done.stderr.splitlines() if line.lstrip().startswith("File "))
    assert list_episodes(tmp_path / "run") == []


def test_sd_train_nproc_refused_run_says_so_once(tmp_path, tiny_model_dir):
    """`sd train --nproc 2` starts the ranks itself; rank 0 cannot take the run (another command
    holds it): one message, exit 2 as for one process, nothing written."""
    from sdcli.models.runlock import run_lock

    recipe = write_recipe(tmp_path, tiny_model_dir, "off_policy_fraction: 1", "max_steps: 2", anchors=0)
    temp = tmp_path / "temp"
    temp.mkdir()
    with run_lock(tmp_path / "run", "a test holding the run"):
        done = run([sys.executable, "-m", "sdcli", "train", str(recipe), "--quiet", "--nproc", "2"], TMPDIR=str(temp))
    assert done.returncode == 2, done.stderr[-3000:]
    assert list(temp.iterdir()) == []  # the launcher's agent leaves no folder behind
    assert done.stderr.count("is in use by") == 1
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "episodes").exists()


# Loaded by every Python process of the test (sitecustomize): each rank's episode setup takes a
# minute (a slow model load, say), after leaving a file that says it has begun.
SLOW_SETUP = """
import os, time
import sdcli.training.setup as setup
real = setup.prepare_anchors
def prepare_anchors(*args, **kwargs):
    open(os.path.join(os.environ["SD_TEST_MARKS"], os.environ["RANK"]), "w").close()
    time.sleep(60)
    return real(*args, **kwargs)
setup.prepare_anchors = prepare_anchors
"""


def test_sigterm_while_every_rank_sets_up_stops_the_job_with_one_message(tmp_path, tiny_model_dir):
    """A scheduler stopping the job during its setup: the launcher passes SIGTERM to every rank,
    each stops at once, the ranks exchange why, and rank 0 says it once; the job exits 143."""
    recipe = write_recipe(tmp_path, tiny_model_dir, "off_policy_fraction: 1", "max_steps: 6", anchors=2)
    hooks, marks = tmp_path / "hooks", tmp_path / "marks"
    hooks.mkdir()
    marks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_SETUP)
    environment = {**env(), "SD_TEST_MARKS": str(marks), "PYTHONPATH": os.pathsep.join([str(hooks), env()["PYTHONPATH"]])}
    proc = subprocess.Popen([sys.executable, "-m", "sdcli", "train", str(recipe), "--quiet", "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, cwd=REPO)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None and len(list(marks.iterdir())) < 2:
            time.sleep(0.05)
        assert sorted(p.name for p in marks.iterdir()) == ["0", "1"]  # both ranks are in their setup
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # a failed check above leaves no job behind
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]
    # at once: a rank that left without the exchange kept rank 0 waiting until torchrun killed it (30 s)
    assert time.time() - start < 25
    said = out + err
    assert said.count("while the episode was being set up") == 1, said[-3000:]
    assert "lost contact" not in said and "Traceback" not in said
