"""Time to knowledge: training minutes until held-out questions about new facts are answered, sd
against the peer (TRL's experimental SDFTTrainer), one after the other in one invocation.

    pip install "trl==1.16.*"                              # the peer; not a dependency of sd
    python benchmarks/time_to_knowledge.py                 # both, about 12 minutes on 2 CPU cores
    python benchmarks/time_to_knowledge.py --tools sd --eval-every 5

The facts are the quickstart's (recipes/data/facts.jsonl: four fictional facts, one question each)
and the questions its held-out paraphrases (recipes/data/facts_eval.jsonl), scored as the
quickstart scores them (the answer contained in the greedy reply). Both tools train the built-in
SmolLM2-135M-Instruct in fp32 with LoRA r=16 on every linear layer, 4 prompts a step, lr 5e-4:
sd with recipes/quickstart.yaml as shipped (its defaults: demonstrations learned off-policy, anchors),
the peer with its own defaults (on-policy, the demonstration as privileged context). Every
--eval-every steps training pauses, the held-out questions are answered greedily (the pause is
not counted), and the line says the training seconds so far, counted from the start of the tool's
training call (model loading and sd's anchor answers included). Prints the curve and, per tool,
the first training minute at which 3 of 4 and 4 of 4 were right; writes OUT/time_to_knowledge.json.
Asserts nothing. One seed, one machine, one hour: compare the two tools here, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
HELD_OUT = REPO / "recipes" / "data" / "facts_eval.jsonl"
MAX_NEW_TOKENS = 40


class Curve:
    """(step, training seconds, score) points; evaluation time is kept out of the clock."""

    def __init__(self, tool: str, every: int):
        from sdcli.evaluation.eval_sets import load_eval_set

        self.tool, self.every = tool, every
        self.eval_set = load_eval_set(HELD_OUT, "contains")
        self.started = time.perf_counter()
        self.paused = 0.0
        self.points: list[dict] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def record(self, step: int, answer_all) -> None:
        from sdcli.evaluation.scoring import score_responses

        stopped = time.perf_counter()
        answers = answer_all([ex.prompt for ex in self.eval_set.examples])
        scores, _ = score_responses(self.eval_set, answers)
        point = {"tool": self.tool, "step": step, "train_s": round(stopped - self.started - self.paused, 1),
                 "right": int(sum(scores)), "of": len(scores), "answers": answers}
        self.points.append(point)
        print(json.dumps({k: v for k, v in point.items() if k != "answers"}), flush=True)
        self.paused += time.perf_counter() - stopped


def run_sd(every: int, steps: int | None, settings: list[str]) -> list[dict]:
    import sdcli.training.train as train_module
    from sdcli.evaluation.scoring import greedy_answers
    from sdcli.recipe.loading import load_recipe

    curve = Curve("sd", every)
    original, count = train_module.train_step, {"steps": 0}

    def train_step_then_maybe_evaluate(run, rollout, compute_loss, timer):
        out = original(run, rollout, compute_loss, timer)
        count["steps"] += 1
        if curve.due(count["steps"]):
            curve.record(count["steps"], lambda prompts: greedy_answers(
                run.model, run.tokenizer, prompts, encoder=run.encoder, max_new_tokens=MAX_NEW_TOKENS, merge=False))
        return out

    train_module.train_step = train_step_then_maybe_evaluate
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run_dir={tmp}", f"train.threads={os.environ.get('SD_BENCH_THREADS', '2')}"]
        overrides += [f"train.max_steps={steps}", "train.epochs=null"] if steps else []
        overrides += settings
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)  # its final eval runs after the curve
        curve.started = time.perf_counter()
        train_module.train_episode(recipe)
    return curve.points


def run_peer(every: int, steps: int) -> list[dict]:
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from sdcli.models.builtin_model import ensure_builtin_model
    from trl_reference import peer_trainer  # benchmarks/trl_reference.py: the peer's reference setting

    torch.set_num_threads(int(os.environ.get("SD_BENCH_THREADS", "2")))
    path = ensure_builtin_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    curve = Curve("peer", every)

    def answer_all(model, prompts) -> list[str]:
        was_training = model.training
        model.eval()
        answers = []
        with torch.no_grad():
            for messages in prompts:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
                out = model.generate(**ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
                answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        model.train(was_training)
        return answers

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if curve.due(state.global_step):
                curve.record(state.global_step, lambda prompts: answer_all(model, prompts))

    with tempfile.TemporaryDirectory() as out:
        curve.started = time.perf_counter()
        trainer = peer_trainer(path, out, steps=steps, prompts=4, samples=1, new_tokens=48, dtype=torch.float32,
                               cuda=False, callbacks=[Evaluate()], tokenizer=tokenizer)
        trainer.train()
    return curve.points


def first_minute(points: list[dict], right: int) -> str:
    hit = next((p for p in points if p["right"] >= right), None)
    if hit is None:
        last = points[-1] if points else {"train_s": 0.0, "step": 0}
        return f"not within {last['train_s'] / 60:.1f} min ({last['step']} steps)"
    return f"{hit['train_s'] / 60:.1f} min (step {hit['step']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools", nargs="+", choices=["sd", "peer"], default=["peer", "sd"])
    parser.add_argument("--eval-every", type=int, default=10, help="steps between held-out checks")
    parser.add_argument("--sd-steps", type=int, default=None, help="default: the quickstart's own budget (40 steps)")
    parser.add_argument("--peer-steps", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of sd's recipe (repeat), e.g. --set rollout.teacher_answers=4")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "time_to_knowledge")
    parser.add_argument("--one", choices=["sd", "peer"], help=argparse.SUPPRESS)  # a child process runs one tool
    args = parser.parse_args()

    if args.one:
        points = run_sd(args.eval_every, args.sd_steps, args.set) if args.one == "sd" else run_peer(args.eval_every, args.peer_steps)
        print("RESULT " + json.dumps(points))
        return

    from machine import cpu_name  # benchmarks/machine.py

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {started} on {cpu_name()}, {os.environ.get('SD_BENCH_THREADS', '2')} threads")
    results = {}
    for tool in args.tools:  # each in its own process: one tool's memory and threads do not touch the other's
        command = [sys.executable, __file__, "--one", tool, "--eval-every", str(args.eval_every),
                   "--peer-steps", str(args.peer_steps)] + (["--sd-steps", str(args.sd_steps)] if args.sd_steps else [])
        command += [f"--set={setting}" for setting in args.set]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{tool} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            continue
        results[tool] = json.loads(lines[-1][len("RESULT "):])
        for p in results[tool]:
            print(f"{tool:5} step {p['step']:3}  {p['train_s'] / 60:5.1f} min  {p['right']}/{p['of']}")
    print()
    for tool, points in results.items():
        print(f"{tool:5} 3 of 4 right: {first_minute(points, 3)};  4 of 4: {first_minute(points, 4)}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "time_to_knowledge.json").write_text(json.dumps({"started": started, "cpu": cpu_name(), "sd_settings": args.set, "curves": results}, indent=1))
    print(f"wrote {args.out / 'time_to_knowledge.json'}")


if __name__ == "__main__":
    main()
