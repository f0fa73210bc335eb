"""Off-policy distillation, several updates per rollout and epochs, in the real loop on a tiny model.

The step-1 loss is checked against a hand computation with plain transformers: at step 1 the
episode's adapter is zero (LoRA B = 0), so the student is the base model without context and the
teacher the base model with the demonstration in context.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import FACTS, chat_ids, led_by_response, response_logprobs
from sdcli.recipe.loading import load_recipe
from sdcli.recipe.sections import AUTO_DEMONSTRATION_TEMPERATURE
from sdcli.recipe.signal_sections import DEFAULT_DEMONSTRATION_TEMPLATE



def recipe_for(tmp_path: Path, model_dir: Path, train: str, rollout: str = "", loss: str = "",
               anchor: str = "  prompts_per_step: 0"):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""name: facts
run_dir: {tmp_path / 'run'}
model:
  name_or_path: {model_dir}
lora:
  r: 8
  alpha: 16
data:
  path: facts.jsonl
  shuffle: false
  prompt_word_dropout: 0  # the hand computations below see each whole question, in order
  prompt_word_shuffle: 0
rollout:
  max_new_tokens: 10
{rollout}
loss:
  chunk_tokens: 4
{loss}
train:
  prompts_per_step: 2
  lr: 0.01
{train}
anchor:
{anchor}
"""
    )
    return load_recipe(path)


@pytest.fixture()
def sampled(monkeypatch) -> list:
    """Records every call to the student sampler: (number of prompts, responses)."""
    import sdcli.training.setup as train_module  # the episode's sampler calls sample_responses there

    calls: list = []
    real = train_module.sample_responses

    def record(model, tokenizer, prompts, settings, stop):
        responses = real(model, tokenizer, prompts, settings, stop)
        calls.append((len(prompts), [list(r) for r in responses]))
        return responses

    monkeypatch.setattr(train_module, "sample_responses", record)
    return calls


def metrics_of(result) -> list[dict]:
    return [json.loads(line) for line in (result.path / "metrics.jsonl").read_text().splitlines()]


def hand_forward_kl(model_dir: Path, pairs: list[tuple[str, list[int], str]], temperature: float = 1.0,
                    lead: bool = False) -> float:
    """Mean over sequences of the mean per-token KL(teacher || student), from plain transformers.

    pairs: (question, response token ids, teacher's user text); the target is the teacher at
    `temperature`, and with `lead` the response's token and the teacher's first choice trade
    probabilities at every position."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    per_sequence = []
    for question, response, teacher_text in pairs:
        s = response_logprobs(base, chat_ids(tokenizer, question), response)
        t = response_logprobs(base, chat_ids(tokenizer, teacher_text), response)
        t = ((led_by_response(t, response) if lead else t) / temperature).log_softmax(-1)
        per_sequence.append(float((t.exp() * (t - s)).sum(-1).mean()))
    return sum(per_sequence) / len(per_sequence)


def demonstration_ids(model_dir: Path, text: str) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def teacher_text(row: dict) -> str:
    return DEFAULT_DEMONSTRATION_TEMPLATE.format(prompt=row["prompt"], demonstration=row["demonstration"])


def test_off_policy_loss_is_the_teacher_scored_demonstration_and_samples_nothing(tmp_path, tiny_model_dir, sampled):
    from sdcli.training.train import train_episode

    recipe = recipe_for(tmp_path, tiny_model_dir, "  max_steps: 2", "  off_policy_fraction: 1.0")
    metrics = metrics_of(train_episode(recipe))
    assert sampled == []  # no sampling at all
    want = hand_forward_kl(  # by default the teacher is sharpened (auto) and led by the demonstration
        tiny_model_dir, [(r["prompt"], demonstration_ids(tiny_model_dir, r["demonstration"]), teacher_text(r)) for r in FACTS[:2]],
        AUTO_DEMONSTRATION_TEMPERATURE, lead=True,
    )
    assert metrics[0]["loss/total"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert metrics[0]["loss/off_policy"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert "loss/on_policy" not in metrics[0]
    # the learning view: demonstration NLL under both roles, and the roles' disagreement
    assert metrics[0]["learn/demo_nll_student"] > metrics[0]["learn/demo_nll_teacher"] > 0
    assert 0.0 <= metrics[0]["learn/disagreement"] <= 1.0
    assert metrics[1]["learn/demo_nll_student"] < metrics[0]["learn/demo_nll_student"]  # it learns


def test_without_lead_the_target_keeps_the_teachers_order(tmp_path, tiny_model_dir):
    from sdcli.training.train import train_episode

    recipe = recipe_for(tmp_path, tiny_model_dir, "  max_steps: 1", "  off_policy_fraction: 1.0",
                        "  lead_with_demonstration: false")
    metrics = metrics_of(train_episode(recipe))
    pairs = [(r["prompt"], demonstration_ids(tiny_model_dir, r["demonstration"]), teacher_text(r)) for r in FACTS[:2]]
    want = hand_forward_kl(tiny_model_dir, pairs, AUTO_DEMONSTRATION_TEMPERATURE)
    assert metrics[0]["loss/off_policy"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    # the tiny teacher's first choice is rarely the demonstration's token, so leading (the default) moves the target
    assert want != pytest.approx(hand_forward_kl(tiny_model_dir, pairs, AUTO_DEMONSTRATION_TEMPERATURE, lead=True), rel=1e-2)


def test_on_policy_only_samples_every_prompt_and_distils_the_sample(tmp_path, tiny_model_dir, sampled):
    """Share 0 is the on-policy loop: every prompt sampled, the teacher scoring that very sample."""
    from sdcli.training.train import train_episode

    recipe = recipe_for(tmp_path, tiny_model_dir, "  max_steps: 2", "  off_policy_fraction: 0.0")
    metrics = metrics_of(train_episode(recipe))
    assert [n for n, _ in sampled] == [2, 2]
    first_responses = sampled[0][1]
    want = hand_forward_kl(tiny_model_dir, [(r["prompt"], y, teacher_text(r)) for r, y in zip(FACTS[:2], first_responses)])
    assert metrics[0]["loss/total"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert metrics[0]["loss/on_policy"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert "loss/off_policy" not in metrics[0]
    assert {"advantage/mean", "advantage/large_fraction", "advantage/positive_fraction"} <= set(metrics[0])


def test_a_mixed_step_splits_the_prompts_and_reports_both_parts(tmp_path, tiny_model_dir, sampled):
    from sdcli.training.train import train_episode

    recipe = recipe_for(tmp_path, tiny_model_dir, "  max_steps: 2", "  off_policy_fraction: 0.5")
    metrics = metrics_of(train_episode(recipe))
    assert [n for n, _ in sampled] == [1, 1]  # one prompt of two sampled per step
    assert all("loss/on_policy" in m and "loss/off_policy" in m for m in metrics)
    # the first prompt of the batch (shuffle off: fact 0) went off-policy, the second was sampled
    # the sample keeps the teacher as it is; the demonstration's target is sharpened and led by it
    on = hand_forward_kl(tiny_model_dir, [(FACTS[1]["prompt"], sampled[0][1][0], teacher_text(FACTS[1]))])
    off = hand_forward_kl(
        tiny_model_dir, [(FACTS[0]["prompt"], demonstration_ids(tiny_model_dir, FACTS[0]["demonstration"]), teacher_text(FACTS[0]))],
        AUTO_DEMONSTRATION_TEMPERATURE, lead=True,
    )
    assert metrics[0]["loss/total"] == pytest.approx((on + off) / 2, rel=1e-4, abs=1e-5)


def test_updates_per_rollout_reuse_one_rollout(tmp_path, tiny_model_dir, sampled):
    from sdcli.training.train import train_episode

    recipe = recipe_for(
        tmp_path, tiny_model_dir, "  max_steps: 5\n  updates_per_rollout: 2", "  off_policy_fraction: 0",
        loss="  divergence: reverse_kl\n  support: sampled"
    )
    metrics = metrics_of(train_episode(recipe))
    assert len(sampled) == 3  # steps 1-2, 3-4, 5
    assert [m["rollout/update"] for m in metrics] == [0, 1, 0, 1, 0]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert "time/rollout_s" not in metrics[1] and "time/rollout_s" in metrics[0]


def test_epochs_set_the_number_of_steps_from_the_data(tmp_path, tiny_model_dir):
    from sdcli.training.train import train_episode

    recipe = recipe_for(tmp_path, tiny_model_dir, "  epochs: 1.5", "  off_policy_fraction: 1.0")
    result = train_episode(recipe)
    assert result.steps == 3  # ceil(1.5 x 4 examples / 2 per step)
    metrics = metrics_of(result)
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["steps_total"] == 3


def test_max_steps_and_epochs_together_are_refused(tmp_path, tiny_model_dir):
    from sdcli.core.errors import RecipeError

    with pytest.raises(RecipeError, match="max_steps or train.epochs"):
        recipe_for(tmp_path, tiny_model_dir, "  epochs: 2\n  max_steps: 3")


def test_off_policy_count_keeps_the_share_exact_over_rollouts():
    from sdcli.training.batch import off_policy_count

    counts = [off_policy_count(0.3, 4, r) for r in range(10)]
    assert sum(counts) == 12 and set(counts) <= {1, 2}
    assert [off_policy_count(0.0, 4, r) for r in range(3)] == [0, 0, 0]
    assert [off_policy_count(1.0, 4, r) for r in range(3)] == [4, 4, 4]


def test_anchors_hold_the_student_to_the_start_without_moving_the_sampler(tmp_path, tiny_model_dir, sampled):
    """Anchor prompts: answered once by the starting model, then scored by it with no context, so
    their loss is exactly zero at step 1 and grows only as the student drifts. Their sampling must
    not shift the random numbers of the episode's own rollouts."""
    from sdcli.training.train import train_episode

    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a colour.", "Count to three.", "Say hello."]))
    (tmp_path / "plain").mkdir()
    train_episode(recipe_for(tmp_path / "plain", tiny_model_dir, "  max_steps: 3", "  off_policy_fraction: 0"))
    without = [responses for _, responses in sampled]
    sampled.clear()

    (tmp_path / "anchored").mkdir()
    anchored = recipe_for(tmp_path / "anchored", tiny_model_dir, "  max_steps: 3", "  off_policy_fraction: 0",
                          anchor=f"  path: {anchors}\n  prompts_per_step: 2")
    metrics = metrics_of(train_episode(anchored))
    assert sampled[0][0] == 3  # the three anchors, answered once before training
    # the same random numbers: identical rollouts while the weights are still identical (steps 1
    # and 2: at step 1 the anchors' loss and gradient are zero); step 3 follows other weights
    assert [responses for _, responses in sampled[1:3]] == without[:2]
    assert len(sampled) == 4
    assert metrics[0]["loss/anchor"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[2]["loss/anchor"] > 1e-4


def test_anchor_weight_scales_the_anchors_part_of_the_loss(tmp_path, tiny_model_dir):
    """anchor.weight multiplies each anchor's term in the loss; the task's terms keep weight 1."""
    from sdcli.training.train import train_episode

    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a colour.", "Count to three."]))
    recipe = recipe_for(tmp_path, tiny_model_dir, "  max_steps: 3", "  off_policy_fraction: 1",
                        anchor=f"  path: {anchors}\n  prompts_per_step: 2\n  weight: 3")
    last = metrics_of(train_episode(recipe))[-1]
    assert last["loss/anchor"] > 1e-4  # the student has drifted, so the weight shows
    # 2 demonstrations (weight 1) and 2 anchors (weight 3), averaged over the 4 sequences
    expected = (2 * last["loss/off_policy"] + 3 * 2 * last["loss/anchor"]) / 4
    unweighted = (2 * last["loss/off_policy"] + 2 * last["loss/anchor"]) / 4
    assert abs(expected - unweighted) > 1e-3 * expected  # the check below can tell the two apart
    assert last["loss/total"] == pytest.approx(expected, rel=1e-4)


def test_the_builtin_anchor_set_loads_and_is_disjoint_from_the_benchmarks_general_questions():
    from sdcli.training.anchors import load_anchor_prompts

    prompts = [p[-1]["content"] for p in load_anchor_prompts("builtin:general")]
    assert len(prompts) == len(set(prompts)) >= 40
    general = Path(__file__).resolve().parents[2] / "benchmarks" / "continual_facts" / "data" / "general_qa.jsonl"
    questions = {json.loads(line)["prompt"] for line in general.read_text().splitlines()}
    assert not questions & set(prompts)


def test_teacher_temperature_applies_to_task_sequences_and_never_to_anchors():
    import torch

    from sdcli.training.batch import ANCHOR, KIND_INDEX, OFF_POLICY, ON_POLICY
    from sdcli.training.teacher import teacher_temperatures

    kinds = torch.tensor([KIND_INDEX[ON_POLICY], KIND_INDEX[OFF_POLICY], KIND_INDEX[ANCHOR]])
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert teacher_temperatures(kinds, 1.0, mask) is None  # the default path is untouched
    assert teacher_temperatures(kinds, 0.5, mask).tolist() == [[0.5] * 4, [0.5] * 4, [1.0] * 4]
    # auto (the default): demonstrations learned off-policy are sharpened, samples and anchors are not
    sharpened = [[1.0] * 4, [AUTO_DEMONSTRATION_TEMPERATURE] * 4, [1.0] * 4]
    assert teacher_temperatures(kinds, "auto", mask).tolist() == sharpened
    on_policy_only = torch.tensor([KIND_INDEX[ON_POLICY], KIND_INDEX[ANCHOR]])
    assert teacher_temperatures(on_policy_only, "auto", mask[:2]) is None  # the on-policy loop is unchanged


def test_lead_with_demonstration_touches_demonstrations_only():
    import torch

    from sdcli.training.batch import ANCHOR, KIND_INDEX, OFF_POLICY, ON_POLICY
    from sdcli.training.teacher import demonstration_lead

    kinds = torch.tensor([KIND_INDEX[ON_POLICY], KIND_INDEX[OFF_POLICY], KIND_INDEX[ANCHOR]])
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert demonstration_lead(kinds, True, mask).tolist() == [[False] * 4, [True] * 4, [False] * 4]
    assert demonstration_lead(kinds, False, mask) is None
    on_policy_only = torch.tensor([KIND_INDEX[ON_POLICY], KIND_INDEX[ANCHOR]])
    assert demonstration_lead(on_policy_only, True, mask[:2]) is None  # samples keep the teacher's own order


def test_teacher_temperature_accepts_auto_or_a_positive_number(tmp_path):
    from sdcli.recipe.sections import LossConfig

    assert LossConfig().teacher_temperature == "auto"
    assert LossConfig(teacher_temperature=0.25).teacher_temperature == 0.25
    for bad in (0, -1, 11, "hot"):
        with pytest.raises(ValueError):
            LossConfig(teacher_temperature=bad)
