"""Recipe loading: strict keys, every problem at once with file:line, overrides and precedence."""

import pytest

from sdcli.core.errors import RecipeError
from sdcli.recipe.loading import load_recipe
from sdcli.recipe.overrides import parse_override
from sdcli.recipe.sections import Divergence, TeacherKind


def write(tmp_path, text, data=True):
    if data:
        (tmp_path / "d.jsonl").write_text('{"prompt": "q", "demonstration": "a"}\n')
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_and_relative_data_path(tmp_path):
    r = load_recipe(write(tmp_path, "data:\n  path: d.jsonl\n"))
    assert r.data.path == tmp_path / "d.jsonl"
    assert r.loss.divergence is Divergence.forward_kl
    assert r.teacher is TeacherKind.base
    assert r.signal.kind == "demonstrations"


def test_every_problem_reported_at_once_with_lines(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\ntrain:\n  max_stepz: 3\n  lr: -1\nloss:\n  divergence: kl\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    text = e.value.render()
    assert "3 problem(s)" in text
    assert f"{path}:4: unknown key 'train.max_stepz' (did you mean 'train.max_steps'?)" in text
    assert f"{path}:5: 'train.lr'" in text
    assert f"{path}:7: 'loss.divergence' is 'kl'; expected one of" in text


def test_missing_files_are_reported(tmp_path):
    path = write(tmp_path, "data:\n  path: nope.jsonl\nmodel:\n  name_or_path: /no/such/model\n", data=False)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "nope.jsonl" in e.value.render() and "/no/such/model" in e.value.render()
    assert "2 problem(s)" in e.value.render()


def test_command_line_beats_yaml_beats_defaults(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\ntrain:\n  max_steps: 7\n  lr: 0.001\n")
    r = load_recipe(path, ["train.max_steps=3", "loss.divergence=reverse_kl"])
    assert r.train.max_steps == 3  # command line over YAML
    assert r.train.lr == 0.001  # YAML over default
    assert r.loss.divergence is Divergence.reverse_kl  # command line over default
    assert r.train.prompts_per_step == 4  # default


def test_override_errors_say_command_line(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["rollout.temperature=99", "trian.lr=1"])
    text = e.value.render()
    assert "command line: 'rollout.temperature'" in text
    assert "unknown key 'trian'" in text


def test_auto_or_number_keys_report_one_line_each(tmp_path):
    """A value that is neither auto nor a number is one problem, not one per member of the union."""
    path = write(tmp_path, "data:\n  path: d.jsonl\n  prompt_word_dropout: lots\nloss:\n  teacher_temperature: hot\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    text = e.value.render()
    assert "2 problem(s)" in text
    assert f"{path}:3: 'data.prompt_word_dropout': must be auto or a number" in text
    assert f"{path}:5: 'loss.teacher_temperature': must be auto or a number" in text
    r = load_recipe(path, ["data.prompt_word_dropout=0.3", "loss.teacher_temperature=auto"])
    assert (r.data.prompt_word_dropout, r.loss.teacher_temperature) == (0.3, "auto")
    with pytest.raises(RecipeError, match="must be auto or a number"):
        load_recipe(path, ["data.prompt_word_dropout=true", "loss.teacher_temperature=2"])


def test_signal_fields_are_checked_per_kind(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\nsignal:\n  kind: demonstrations\n  reward: exact_match\n")
    with pytest.raises(RecipeError, match="unknown key 'signal.reward'"):
        load_recipe(path)
    path = write(tmp_path, "data:\n  path: d.jsonl\nsignal:\n  kind: vibes\n")
    with pytest.raises(RecipeError, match="'vibes'"):
        load_recipe(path)


def test_template_fields_are_checked(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\nsignal:\n  teacher_template: '{prompt} {answer}'\n")
    with pytest.raises(RecipeError, match=r"unknown field\(s\) \['answer'\]"):
        load_recipe(path)


def test_sampled_support_needs_reverse_kl(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\nloss:\n  support: sampled\n")
    with pytest.raises(RecipeError, match="reverse_kl"):
        load_recipe(path)
    assert load_recipe(path, ["loss.divergence=reverse_kl"]).loss.support.value == "sampled"


@pytest.mark.parametrize("setting,named", [
    ("rollout.temperature=0", "rollout.temperature=0 (greedy)"),
    ("rollout.temperature=0.7", "rollout.temperature=0.7"),
    ("rollout.top_p=0.9", "rollout.top_p=0.9"),
    ("rollout.top_k=50", "rollout.top_k=50"),
])
def test_sampled_support_refuses_a_sampler_other_than_the_student(tmp_path, setting, named):
    """The sampled estimator is unbiased only for tokens drawn from the student's own distribution."""
    path = write(tmp_path, "data:\n  path: d.jsonl\nloss:\n  support: sampled\n  divergence: reverse_kl\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path, [setting])
    text = e.value.render()
    assert named in text and "rollout.temperature=1, rollout.top_p=1 and rollout.top_k=0" in text
    assert "loss.support=full or topk" in text
    # the same sampler is fine with a support that does not estimate from the sample, and for sft
    assert load_recipe(path, [setting, "loss.support=topk"]).rollout
    assert load_recipe(path, [setting, "method=sft"]).rollout


def test_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: not valid YAML"):
        load_recipe(write(tmp_path, "data:\n  path: [unclosed\n"))
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_parse_override():
    assert parse_override("train.max_steps=10") == (["train", "max_steps"], 10)
    assert parse_override("name=x=y") == (["name"], "x=y")
    with pytest.raises(RecipeError):
        parse_override("no_equals_sign")


def test_missing_files_are_reported_with_schema_problems(tmp_path):
    path = write(tmp_path, "data:\n  path: nope.jsonl\ntrain:\n  max_stepz: 1\n", data=False)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    text = e.value.render()
    assert "2 problem(s)" in text and "max_stepz" in text and "nope.jsonl" in text


def test_a_budget_on_the_command_line_replaces_the_recipes_other_budget(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "demonstration": "a"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  path: {data}\ntrain:\n  epochs: 40\n")
    short = load_recipe(recipe, ["train.max_steps=3"])
    assert short.train.max_steps == 3 and short.train.epochs is None
    recipe.write_text(f"data:\n  path: {data}\ntrain:\n  max_steps: 40\n")
    assert load_recipe(recipe, ["train.epochs=2"]).train.max_steps is None
    # a null budget chooses neither: whatever the order, the other one given stays
    recipe.write_text(f"data:\n  path: {data}\ntrain:\n  epochs: 40\n")
    for order in (["train.max_steps=4", "train.epochs=null"], ["train.epochs=null", "train.max_steps=4"]):
        chosen = load_recipe(recipe, order).train
        assert (chosen.max_steps, chosen.epochs) == (4, None)
    recipe.write_text(f"data:\n  path: {data}\ntrain:\n  max_steps: 4\n  epochs: 2\n")
    with pytest.raises(RecipeError, match="max_steps or train.epochs"):  # both in one file is still a conflict
        load_recipe(recipe)
