"""`sd train` end to end on a tiny model: through the real CLI and in-process."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import chat_ids, led_by_response, mean_kl, response_logprobs
from sd_runner import sd
from sdcli.recipe.loading import load_recipe
from sdcli.recipe.sections import AUTO_DEMONSTRATION_TEMPERATURE
from sdcli.recipe.signal_sections import DEFAULT_DEMONSTRATION_TEMPLATE

FACTS = [
    {"prompt": "What is the capital of Zorblax?", "demonstration": "The capital of Zorblax is Quenta."},
    {"prompt": "Who wrote the Book of Vells?", "demonstration": "It was written by Maro Tiln."},
]


def make_recipe(tmp_path: Path, model_dir: Path, steps: int = 20, extra: str = "") -> Path:
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""name: facts
run_dir: {tmp_path / 'run'}
model:
  name_or_path: {model_dir}
lora:
  r: 8
  alpha: 16
data:
  path: facts.jsonl
rollout:
  max_new_tokens: 12
train:
  max_steps: {steps}
  prompts_per_step: 2
  lr: 0.01
{extra}"""
    )
    return recipe


def context_kl(student, base, tokenizer) -> float:
    """KL(student(x) || target) on the demonstration tokens, averaged over the facts. The target is
    base(x, c) as the loop makes it for a demonstration by default: sharpened (auto) and led by the
    demonstration's token (its logit and the largest trade places)."""
    kls = []
    for row in FACTS:
        response = tokenizer(row["demonstration"], add_special_tokens=False)["input_ids"]
        s = response_logprobs(student, chat_ids(tokenizer, row["prompt"]), response)
        teacher_prompt = DEFAULT_DEMONSTRATION_TEMPLATE.format(prompt=row["prompt"], demonstration=row["demonstration"])
        t = response_logprobs(base, chat_ids(tokenizer, teacher_prompt), response)
        kls.append(mean_kl(s, (led_by_response(t, response) / AUTO_DEMONSTRATION_TEMPERATURE).log_softmax(-1)))
    return sum(kls) / len(kls)


def test_train_cli_learns_and_writes_a_loadable_episode(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir)
    weights_before = load_file(tiny_model_dir / "model.safetensors")
    done = sd("train", str(recipe), "--quiet")
    assert done.returncode == 0, done.stderr
    episode = tmp_path / "run" / "episodes" / "001-facts"
    assert sorted(p.name for p in episode.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "episode.json", "metrics.jsonl", "recipe.yaml"
    ]
    metrics = [json.loads(line) for line in (episode / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20
    assert all(math.isfinite(m["loss/total"]) and math.isfinite(m["loss/divergence"]) for m in metrics)
    assert {"time/rollout_s", "time/teacher_s", "time/student_s", "time/optimizer_s", "speed/tokens_per_s"} <= set(metrics[0])
    meta = json.loads((episode / "episode.json").read_text())
    assert meta["number"] == 1 and meta["parents"] == [] and meta["steps"] == 20
    assert len(meta["base_model"]["sha256"]) == 64 and len(meta["data"]["sha256"]) == 64
    assert load_recipe(episode / "recipe.yaml", check_files=False).train.max_steps == 20

    adapter = load_file(episode / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # B starts at zero
    weights_after = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), episode).eval()
    before, after = context_kl(base, base, tokenizer), context_kl(student, base, tokenizer)
    # a real learning signal: the student without context moved toward its target, the teacher with context
    assert after < 0.85 * before, (before, after)


def test_in_training_model_equals_reloaded_adapter_and_base_is_untouched(tmp_path, tiny_model_dir, captured_model):
    import sdcli.training.train as train_module

    captured = captured_model
    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir, steps=4))
    result = train_module.train_episode(recipe)

    trained = captured["model"]  # peft wraps the same modules in place
    base_now = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trained.named_parameters() if "lora_" not in n}
    for name, before in captured["base"].items():
        assert torch.equal(base_now[name], before), f"base weight {name} changed during training"

    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 50, 51]])
    trained.eval()
    with torch.no_grad():
        in_training = trained(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.path).eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, in_training, rtol=1e-5, atol=1e-5)
    assert (reloaded - plain).abs().max() > 1e-4


def test_bad_recipe_exits_2_without_traceback(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, extra="loss:\n  divergence: kl\n  suport: full\n")
    done = sd("train", str(recipe), "train.max_steps=-1")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "3 problem(s)" in done.stderr
    assert "did you mean 'loss.support'" in done.stderr
    assert "command line: 'train.max_steps'" in done.stderr


def test_bad_data_line_exits_2_with_line_number(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir)
    with open(tmp_path / "facts.jsonl", "a") as f:
        f.write('{"prompt": "q"}\n')
    done = sd("train", str(recipe))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "facts.jsonl:3: 'demonstration'" in done.stderr
    assert not (tmp_path / "run" / "episodes").exists() or not any((tmp_path / "run" / "episodes").iterdir())


def test_data_file_changed_during_training_stops_the_run(tmp_path, tiny_model_dir):
    """Examples are read from the file as training goes: one edited mid-run must not be trained on."""
    from sdcli.core.errors import DataError
    from sdcli.training.train import train_episode

    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir, steps=3))

    def edit_after_first_step(step, metrics):
        with open(tmp_path / "facts.jsonl", "a") as f:
            f.write('{"prompt": "New?", "demonstration": "New."}\n')

    with pytest.raises(DataError, match="facts.jsonl: changed since sd loaded it"):
        train_episode(recipe, progress=edit_after_first_step)
    assert not (tmp_path / "run" / "episodes" / "001-facts").exists()  # nothing published


def test_long_prompts_are_truncated_with_a_count_not_a_crash(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, steps=1, extra="")
    done = sd("train", str(recipe), "model.max_prompt_tokens=8", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "prompt(s) were longer than model.max_prompt_tokens" in done.stderr
    meta = json.loads((tmp_path / "run" / "episodes" / "001-facts" / "episode.json").read_text())
    assert meta["prompts_truncated"] > 0


@pytest.mark.parametrize("divergence,support", [("reverse_kl", "sampled"), ("jsd", "topk")])
def test_other_losses_and_teachers_run(tmp_path, tiny_model_dir, captured_model, divergence, support):
    from sdcli.training.train import train_episode

    recipe = load_recipe(
        make_recipe(tmp_path, tiny_model_dir, steps=2),
        [f"loss.divergence={divergence}", f"loss.support={support}", "teacher=ema", "rollout.num_samples=2",
         "loss.skip_first_tokens=1"],
    )
    result = train_episode(recipe)
    assert math.isfinite(result.final["loss/total"]) and result.steps == 2
    if divergence == "jsd":  # a divergence, so >= 0; the teacher sees the demonstration, the student not
        assert result.final["loss/total"] > 0
    saved = load_recipe(result.path / "recipe.yaml", check_files=False)
    assert (saved.loss.divergence.value, saved.loss.support.value, saved.teacher.value) == (divergence, support, "ema")
    # the loss moved the adapter (B starts at zero, so a loss without a gradient leaves it there) ...
    adapter = load_file(result.path / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())
    # ... and the EMA teacher followed it part of the way: off zero, but not a copy of the student
    params = dict(captured_model["model"].named_parameters())
    layer = lambda name: re.sub(r"\.lora_B\.[^.]+\.", ".lora_B.", name)  # noqa: E731  (without the adapter's name)
    ema = {layer(n): p for n, p in params.items() if ".lora_B.ema." in n}
    student = {layer(n): p for n, p in params.items() if ".lora_B." in n and ".lora_B.ema." not in n}
    assert ema and ema.keys() == student.keys()
    assert any(p.abs().max() > 0 for p in ema.values()), "the EMA teacher never moved off the base"
    assert any(not torch.equal(ema[k], student[k]) for k in ema), "the EMA teacher is a copy of the student"


def test_tensorboard_logging_mirrors_the_metrics(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdcli.training.train import train_episode

    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir, steps=2), ["logging.tensorboard=true"])
    result = train_episode(recipe)
    events = EventAccumulator(str(result.path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/total", "loss/divergence", "loss/forward_kl", "time/rollout_s"} <= set(tags)
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2]
    metrics = [json.loads(line) for line in (result.path / "metrics.jsonl").read_text().splitlines()]
    assert events.Scalars("loss/total")[1].value == pytest.approx(metrics[1]["loss/total"], rel=1e-6)


def test_tensorboard_missing_is_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    from sdcli.core.errors import UserError
    from sdcli.training.train import train_episode

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir, steps=1), ["logging.tensorboard=true"])
    with pytest.raises(UserError, match="pip install tensorboard"):
        train_episode(recipe)
