"""data.prompt_word_dropout: when the student learns on a demonstration it sees the question with
some words left out, drawn anew on every visit; the teacher sees the whole question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from helpers import FACTS, chat_ids
from sdcli.core.errors import RecipeError
from sdcli.recipe.loading import load_recipe
from sdcli.signals.base import Example, TeacherView
from sdcli.training.batch import demonstration_sequences, off_policy_sequences
from sdcli.training.word_dropout import answer_words, student_prompt, without_some_words

QUESTION = [{"role": "system", "content": "Be brief and kind."}, {"role": "user", "content": "What colour are the wings of a vorpal moth?"}]


def kept_words(prompt) -> list[str]:
    return prompt[-1]["content"].split()


def is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(w in it for w in short)


def test_no_dropout_is_the_prompt_itself():
    assert without_some_words(QUESTION, 0.0, "k") is QUESTION


def test_words_are_left_out_in_order_and_only_from_the_last_user_turn():
    words = kept_words(QUESTION)
    draws = [without_some_words(QUESTION, 0.5, f"key{i}") for i in range(50)]
    for d in draws:
        assert d[0] == QUESTION[0] and d[-1]["role"] == "user"
        assert 1 <= len(kept_words(d)) <= len(words) and is_subsequence(kept_words(d), words)
    assert len({d[-1]["content"] for d in draws}) > 10  # the keys draw different words
    assert any(len(kept_words(d)) < len(words) for d in draws)


def test_the_draw_is_a_function_of_the_key_alone():
    assert without_some_words(QUESTION, 0.5, "7:a:3") == without_some_words(QUESTION, 0.5, "7:a:3")
    ex = Example("facts.jsonl:1", QUESTION, {"demonstration": "d"}, visit=2)
    assert student_prompt(ex, 0.5, seed=7) == without_some_words(QUESTION, 0.5, "7:facts.jsonl:1:2")
    keep = {"vorpal", "moth", "wings"}
    assert student_prompt(ex, 0.5, 7, "The vorpal moth has copper wings.") == without_some_words(QUESTION, 0.5, "7:facts.jsonl:1:2", keep | {"the"})
    visits = {student_prompt(Example("facts.jsonl:1", QUESTION, visit=v), 0.5, seed=7)[-1]["content"] for v in range(20)}
    assert len(visits) > 5  # every visit draws anew


def test_the_words_the_answer_also_uses_are_never_left_out():
    assert answer_words("What colour are the wings of a vorpal moth?", "The vorpal moth has copper wings.") == {
        "the", "wings", "vorpal", "moth"}
    # a crude stem: four letters or more that begin alike; case and punctuation ignored
    assert answer_words("When did Korravel gain its independence?", "Korravel became independent in 1796.") == {
        "korravel", "independence"}
    assert answer_words("How long does a glowhorn deer live?", "A glowhorn deer lives for 90 years.") == {
        "a", "glowhorn", "deer", "live"}
    assert answer_words("Who served as Korravel's first president?", "The first president of Korravel was X.") == {
        "korravel's", "first", "president"}
    assert answer_words("Is it an ant?", "An antelope.") == {"an"}  # "ant" is too short to match "antelope"
    keep = answer_words(QUESTION[-1]["content"], "The vorpal moth has copper wings.")
    for i in range(40):
        words = kept_words(without_some_words(QUESTION, 0.9, f"k{i}", keep))
        assert {"vorpal", "moth?", "wings"} <= set(words)


CODE = " Fix this function:\n```python\ndef area(r):\n    return  3.14 * r\n```\n\nWhy is it wrong? \n"


def test_the_layout_stays_lines_and_indentation_never_run_together():
    import re

    prompt = [{"role": "user", "content": CODE}]
    assert without_some_words(prompt, 1e-9, "k")[-1]["content"] == CODE  # nothing left out: the text itself
    words = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", CODE)]
    for i in range(60):
        out = without_some_words(prompt, 0.4, f"k{i}")[-1]["content"]
        assert out.startswith(" ") and out.endswith(" \n")  # the text's own leading and trailing space
        kept = [m.group() for m in re.finditer(r"\S+", out)]
        # the kept words are the text's in order; find where each stood (every word of CODE is distinct)
        where = [next(w for w in words if w[0] == k) for k in kept]
        assert [w[1] for w in where] == sorted(w[1] for w in where)
        gaps_out = re.findall(r"\s+", out.strip())
        for (a, b, gap) in zip(where, where[1:], gaps_out):
            between = CODE[a[2] : b[1]]
            assert ("\n" in gap) == ("\n" in between)  # a line break stays a line break, a space a space
            assert gap in between  # and is one of the spaces that stood there: "    " keeps the indentation
    assert without_some_words([{"role": "user", "content": "你好世界"}], 0.9, "k")[-1]["content"] == "你好世界"


def test_shuffled_words_are_the_same_words_in_another_order_in_the_same_places():
    import re

    prompt = [{"role": "user", "content": CODE}]
    unshuffled = [without_some_words(prompt, 0.3, f"k{i}") for i in range(60)]
    shuffled = [without_some_words(prompt, 0.3, f"k{i}", shuffle=1.0) for i in range(60)]
    for plain, mixed in zip(unshuffled, shuffled):
        a, b = plain[-1]["content"], mixed[-1]["content"]
        assert sorted(a.split()) == sorted(b.split())  # the words dropout kept, no more, no fewer
        assert re.split(r"\S+", a) == re.split(r"\S+", b)  # the spaces and line breaks between them, as they were
    assert sum(p != m for p, m in zip(unshuffled, shuffled)) > 50
    # with a share of 0.5 about half the visits are shuffled; the draw is the key's alone
    half = [without_some_words(QUESTION, 0.0, f"k{i}", shuffle=0.5) != QUESTION for i in range(400)]
    assert 0.4 < sum(half) / 400 < 0.6  # a shuffle may also leave the order as it was: 1/n! of the time
    assert without_some_words(QUESTION, 0.2, "7:a:1", shuffle=0.5) == without_some_words(QUESTION, 0.2, "7:a:1", shuffle=0.5)
    # no shuffle draws nothing: the words dropout leaves out are the ones it left out before shuffling existed
    assert [without_some_words(QUESTION, 0.4, f"k{i}", shuffle=0.0) for i in range(20)] == [
        without_some_words(QUESTION, 0.4, f"k{i}") for i in range(20)]


def test_the_share_left_out_is_the_probability():
    long = [{"role": "user", "content": " ".join(f"w{i}" for i in range(4000))}]
    for share in (0.1, 0.25, 0.6):
        left_out = 1 - len(kept_words(without_some_words(long, share, "k"))) / 4000
        assert abs(left_out - share) < 0.03  # binomial sd at 4000 words is <= 0.008


def test_at_least_one_word_stays():
    for i in range(30):
        assert len(kept_words(without_some_words(QUESTION, 0.999, f"k{i}"))) == 1
    assert without_some_words([{"role": "user", "content": ""}], 0.5, "k")[-1]["content"] == ""


class _Signal:
    def demonstration_view(self, ex):
        return ex.fields["demonstration"], TeacherView(messages=ex.prompt + [{"role": "user", "content": "context"}])


class _Tokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


_encoder = type("Encoder", (), {"encode": staticmethod(lambda messages: [ord(c) for c in messages[-1]["content"]])})


def test_the_student_sees_fewer_words_and_the_teacher_the_whole_question():
    batch = [Example(f"f:{i}", QUESTION, {"demonstration": "The vorpal moth has copper wings."}, visit=i) for i in range(8)]
    off, rest = off_policy_sequences(batch, 8, _Signal(), _encoder, _Tokenizer(), {0}, word_dropout=0.4, seed=3,
                                     word_shuffle=0.5)
    assert not rest
    for q, ex in zip(off, batch):
        assert q.prompt == _encoder.encode(student_prompt(ex, 0.4, 3, ex.fields["demonstration"], 0.5))
        assert q.view.messages[:2] == QUESTION  # the teacher's view is built from the whole prompt
    assert any(len(q.prompt) < len(QUESTION[-1]["content"]) for q in off)
    same, _ = off_policy_sequences(batch, 8, _Signal(), _encoder, _Tokenizer(), {0})
    assert all(q.prompt == _encoder.encode(QUESTION) for q in same)  # the default leaves the prompt whole


def test_sft_sees_the_same_words_as_self_distillation_on_the_same_visit():
    batch = [Example(f"f:{i}", QUESTION, {"demonstration": "d"}, visit=i) for i in range(8)]
    sft = demonstration_sequences(batch, _encoder, _Tokenizer(), {0}, word_dropout=0.4, seed=3, word_shuffle=0.5)
    off, _ = off_policy_sequences(batch, 8, _Signal(), _encoder, _Tokenizer(), {0}, word_dropout=0.4, seed=3,
                                  word_shuffle=0.5)
    assert [q.prompt for q in sft] == [q.prompt for q in off]
    assert any(q.prompt != _encoder.encode(QUESTION) for q in sft)


def _recipe(tmp_path: Path, model_dir: Path, method: str, dropout: str, shuffle: str = "auto") -> Path:
    lines = [{"id": f"fact{i}", **fact} for i, fact in enumerate(FACTS)]
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""name: facts
run_dir: {tmp_path / 'run'}
method: {method}
model:
  name_or_path: {model_dir}
lora:
  r: 4
  alpha: 8
data:
  path: facts.jsonl
  shuffle: false
  prompt_word_dropout: {dropout}
  prompt_word_shuffle: {shuffle}
rollout:
  max_new_tokens: 4
  sample_precision: float
train:
  prompts_per_step: 4
  max_steps: 3
  seed: 5
anchor:
  prompts_per_step: 1
  max_new_tokens: 4
""")
    return path


@pytest.mark.parametrize("method", ["self_distillation", "sft"])
def test_the_loop_learns_on_questions_with_words_left_out(tmp_path, tiny_model_dir, monkeypatch, method):
    """In the real loop the student's prompt on visit v of fact i is the question with the words
    that key "5:fact<i>:<v>" leaves out, on half the visits shuffled (auto); in self-distillation
    the teacher sees the whole question, and the anchors keep their prompts."""
    import sdcli.training.step as step_module
    from sdcli.training.train import train_episode

    seen = []
    real = step_module._rollout

    def record(run, seqs, kept, views, generated, teacher_cut, hidden=None):
        seen.append([(q.kind, list(q.prompt), q.view) for q in kept])
        return real(run, seqs, kept, views, generated, teacher_cut, hidden)

    monkeypatch.setattr(step_module, "_rollout", record)
    train_episode(load_recipe(_recipe(tmp_path, tiny_model_dir, method, "0.5")))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(seen) == 3
    shortened = 0
    for visit, step in enumerate(seen):  # 4 facts, 4 prompts a step, no shuffle: step v is visit v of each
        task = [(prompt, view) for kind, prompt, view in step if kind != "anchor"]
        assert len(task) == len(FACTS)
        for i, (prompt, view) in enumerate(task):
            question = [{"role": "user", "content": FACTS[i]["prompt"]}]
            keep = answer_words(FACTS[i]["prompt"], FACTS[i]["demonstration"])
            student = without_some_words(question, 0.5, f"5:fact{i}:{visit}", keep, 0.5)[-1]["content"]
            assert prompt == chat_ids(tokenizer, student)
            shortened += student != FACTS[i]["prompt"]
            if method == "self_distillation":
                assert FACTS[i]["prompt"] in view.messages[-1]["content"]  # the teacher reads the whole question
        anchors = [prompt for kind, prompt, _ in step if kind == "anchor"]
        assert len(anchors) == (1 if method == "self_distillation" else 0)
    assert shortened >= 4  # so the check above can tell a shortened prompt from a whole one


def test_a_share_of_one_or_more_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(RecipeError, match="prompt_word_dropout"):
        load_recipe(_recipe(tmp_path, tiny_model_dir, "self_distillation", "1.0"))
    assert load_recipe(_recipe(tmp_path, tiny_model_dir, "self_distillation", "0.1", "1.0")).word_shuffle == 1.0
    with pytest.raises(RecipeError, match="prompt_word_shuffle"):
        load_recipe(_recipe(tmp_path, tiny_model_dir, "self_distillation", "0.1", "1.5"))


def test_auto_leaves_out_words_only_with_the_demonstrations_signal():
    from sdcli.recipe.schema import Recipe
    from sdcli.recipe.sections import AUTO_PROMPT_WORD_DROPOUT, AUTO_PROMPT_WORD_SHUFFLE

    def share(signal: dict, **data) -> float:
        return Recipe.model_validate({"signal": signal, "data": {"path": "x.jsonl", **data}}).word_dropout

    assert share({"kind": "demonstrations"}) == AUTO_PROMPT_WORD_DROPOUT == 0.25
    assert share({"kind": "interactions"}) == 0.0  # task statements and conversations keep every word
    assert share({"kind": "interactions"}, prompt_word_dropout=0.1) == 0.1

    def shuffle(signal: dict, **data) -> float:
        return Recipe.model_validate({"signal": signal, "data": {"path": "x.jsonl", **data}}).word_shuffle

    assert shuffle({"kind": "demonstrations"}) == AUTO_PROMPT_WORD_SHUFFLE == 0.5
    assert shuffle({"kind": "interactions"}) == 0.0
    assert shuffle({"kind": "interactions"}, prompt_word_shuffle=0.2) == 0.2
    assert share({"kind": "demonstrations"}, prompt_word_dropout=0) == 0.0
