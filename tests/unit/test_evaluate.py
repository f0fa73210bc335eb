"""Evaluation: eval-set reading, scoring, drift arithmetic, adapter switching, the GEM matrix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sdcli.core.errors import DataError, RecipeError
from sdcli.evaluation.continual_matrix import Matrix, gem_metrics, matrix_from_episodes, matrix_table
from sdcli.core.divergence import kl as token_kl
from sdcli.evaluation.drift import measure_drift, perplexity
from sdcli.evaluation.eval_sets import EvalExample, EvalSet, load_eval_set, load_texts, stored_eval_sets
from sdcli.evaluation.evaluate import describe_scores
from sdcli.evaluation.scoring import greedy_answers, model_answers, score_responses, scores_by_kind, teacher_messages
from sdcli.recipe.loading import load_recipe
from sdcli.recipe.sections import EvalConfig
from sdcli.recipe.signal_sections import DEFAULT_DEMONSTRATION_TEMPLATE


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# Eval sets and scoring


def test_default_reward_is_contains_and_a_line_may_choose_its_own(tmp_path):
    path = write_jsonl(tmp_path / "ev.jsonl", [
        {"id": "cap", "prompt": "Capital of Zorblax?", "answer": "Quenta", "demonstration": "It is Quenta."},
        {"prompt": "Capital of Zorblax?", "answer": "Quenta", "reward": "exact_match"},
        {"prompt": "2+2?", "answer": 4, "reward": "numeric"},
        {"prompt": "Legs?", "answer": r"\b(ten|10)\b", "reward": "regex"},
    ])
    eval_set = load_eval_set(path)
    assert [e.reward for e in eval_set.examples] == ["contains", "exact_match", "numeric", "regex"]
    assert eval_set.examples[0].id == "cap" and eval_set.examples[1].id == "ev.jsonl:2"
    assert eval_set.examples[0].demonstration == "It is Quenta." and eval_set.examples[1].demonstration is None
    responses = ["The capital of Zorblax is Quenta.", "The capital is Quenta.", "It makes 4.", "It has 10 legs."]
    scores, errors = score_responses(eval_set, responses)
    assert scores == [1.0, 0.0, 1.0, 1.0] and errors == []
    assert score_responses(eval_set, ["quenta", "  quenta. ", "five", "tenth"])[0] == [1.0, 1.0, 0.0, 0.0]


def test_cli_default_reward_applies_to_lines_without_one(tmp_path):
    path = write_jsonl(tmp_path / "ev.jsonl", [{"prompt": "Capital?", "answer": "Quenta"}])
    eval_set = load_eval_set(path, default_reward="exact_match")
    assert score_responses(eval_set, ["The capital is Quenta."])[0] == [0.0]
    assert score_responses(eval_set, ["Quenta."])[0] == [1.0]


def test_every_bad_line_is_reported_at_once(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "answer": "fine"},
        {"prompt": "no answer"},
        {"answer": "no prompt"},
        {"prompt": "x", "answer": "y", "reward": "exact_mtch"},
        {"prompt": "x", "answer": "not a number", "reward": "numeric"},
        {"prompt": "x", "answer": "y", "demonstration": ""},
        {"prompt": "x", "answer": "y", "kind": 3},
    ])
    with pytest.raises(DataError) as caught:
        load_eval_set(path)
    text = caught.value.render()
    for line in (2, 3, 4, 5, 6, 7):
        assert f"bad.jsonl:{line}" in text
    assert "bad.jsonl:1" not in text
    assert "did you mean 'exact_match'" in text.lower()


def test_scores_by_kind_against_hand_counts(tmp_path):
    path = write_jsonl(tmp_path / "kinds.jsonl", [
        {"prompt": "a", "answer": "x", "kind": "direct", "demonstration": "x"},
        {"prompt": "b", "answer": "x", "kind": "situation"},
        {"prompt": "c", "answer": "x", "kind": "direct"},
        {"prompt": "d", "answer": "x"},  # no kind: in the set's score only
        {"prompt": "e", "answer": "x", "kind": "situation", "demonstration": "x"},
    ])
    eval_set = load_eval_set(path)
    assert [ex.kind for ex in eval_set.examples] == ["direct", "situation", "direct", None, "situation"]
    scores = [1.0, 0.0, 0.0, 1.0, 1.0]
    teacher = {0: 1.0, 4: 0.0}  # the lines with a demonstration
    assert scores_by_kind(eval_set.examples, scores, teacher) == {
        "direct": {"n": 2, "score": 0.5, "teacher_score": 1.0, "teacher_n": 1},
        "situation": {"n": 2, "score": 0.5, "teacher_score": 0.0, "teacher_n": 1},
    }
    assert scores_by_kind(load_eval_set(write_jsonl(tmp_path / "none.jsonl", [{"prompt": "a", "answer": "x"}])).examples,
                          [1.0], {}) == {}
    text = describe_scores({"score": 0.6, "n": 5, "by_kind": scores_by_kind(eval_set.examples, scores, teacher)})
    assert text.endswith("; by kind: direct 0.500 (n=2), situation 0.500 (n=2)")


def test_user_scorer_and_a_crashing_one(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def half(response, example):\n    return 0.5\n\n"
        "def boom(response, example):\n    raise ValueError('bad day')\n"
    )
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "ev.jsonl", [
        {"prompt": "a", "reward": "my_scores:half"},
        {"prompt": "b", "answer": "x", "reward": "my_scores:boom"},
    ])
    eval_set = load_eval_set(path)
    scores, errors = score_responses(eval_set, ["anything", "anything"])
    assert scores == [0.5, 0.0]
    assert len(errors) == 1 and "bad day" in errors[0] and "ev.jsonl:2" in errors[0]
    with pytest.raises(RecipeError, match="no_such_module"):
        load_eval_set(path, default_reward="no_such_module:f")


def test_teacher_view_uses_the_demonstrations_template():
    ex = EvalExample("a", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}], {},
                     "contains", "It is Quenta.")
    view = teacher_messages(ex, DEFAULT_DEMONSTRATION_TEMPLATE)
    assert view[0] == {"role": "system", "content": "Be brief."}
    assert view[-1]["content"] == DEFAULT_DEMONSTRATION_TEMPLATE.format(prompt="Capital?", demonstration="It is Quenta.")
    assert teacher_messages(EvalExample("b", ex.prompt, {}, "contains", None), DEFAULT_DEMONSTRATION_TEMPLATE) is None


def test_drift_texts_file(tmp_path):
    assert load_texts(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}, {"text": "c"}])) == ["a b", "c"]
    with pytest.raises(DataError, match="t2.jsonl:2"):
        load_texts(write_jsonl(tmp_path / "t2.jsonl", [{"text": "a"}, {"txt": "b"}]))


# ---------------------------------------------------------------------------------------------
# Drift arithmetic


def test_token_kl_matches_torch_and_perplexity_of_uniform_is_vocab_size():
    torch.manual_seed(0)
    p, q = torch.randn(5, 11).log_softmax(-1), torch.randn(5, 11).log_softmax(-1)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p), torch.distributions.Categorical(logits=q)
    )
    torch.testing.assert_close(token_kl(p, q), reference)
    assert torch.allclose(token_kl(p, p), torch.zeros(5), atol=1e-6)
    assert perplexity(7 * math.log(11), 7) == pytest.approx(11.0)
    assert perplexity(0.0, 0) is None


def _with_random_adapter(model_dir: Path):
    from sdcli.models.model import add_trainable_adapter, load_base
    from sdcli.recipe.sections import LoraSettings, ModelConfig

    loaded = load_base(ModelConfig(name_or_path=str(model_dir)))
    model = add_trainable_adapter(loaded.model, "ep001", LoraSettings(r=4, alpha=8))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model, loaded.tokenizer


def test_drift_matches_a_plain_reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer = _with_random_adapter(tiny_model_dir)
    texts = ["The cat sat on the mat.", "Water boils at one hundred degrees."]
    drift = measure_drift(model, tokenizer, texts, adapters=["ep001"])
    assert drift["kl_from_base"] > 1e-4
    base_only = measure_drift(model, tokenizer, texts, adapters=[])
    assert base_only["kl_from_base"] == pytest.approx(0.0, abs=1e-6)
    assert base_only["perplexity"] == pytest.approx(drift["base_perplexity"], rel=1e-5)

    # perplexity: exp of the token-weighted mean NLL, as the HF loss computes it per text
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            nll += float(plain(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert drift["tokens"] == count
    assert drift["base_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    # a model without adapters has no base to compare with
    assert measure_drift(plain, tokenizer, texts)["kl_from_base"] is None


def test_greedy_answers_with_adapters_off_are_the_bare_base(tiny_model_dir):
    """Folding adapters for speed must not fold them back in while they are switched off."""
    from transformers import AutoModelForCausalLM

    from sdcli.models.model import load_tokenizer
    from sdcli.models.sequences import PromptEncoder

    model, tokenizer = _with_random_adapter(tiny_model_dir)
    prompts = [[{"role": "user", "content": "What is the capital of Zorblax?"}], [{"role": "user", "content": "Hi"}]]
    encoder = PromptEncoder(tokenizer, 512)
    kw = dict(encoder=encoder, max_new_tokens=6, merge=True)
    off = greedy_answers(model, tokenizer, prompts, adapters=[], **kw)
    on = greedy_answers(model, tokenizer, prompts, adapters=["ep001"], **kw)
    unfolded = greedy_answers(model, tokenizer, prompts, adapters=["ep001"], **{**kw, "merge": False})
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    bare = greedy_answers(plain, load_tokenizer(tiny_model_dir), prompts, **kw)
    assert off == bare
    assert on == unfolded and on != off
    assert greedy_answers(model, tokenizer, prompts, adapters=["ep001"], batch_size=1, **kw) == on


# ---------------------------------------------------------------------------------------------
# The continual-learning matrix


def test_gem_metrics_against_hand_computed_values():
    R = [
        [0.1, 0.0, 0.2],  # base
        [0.9, 0.1, 0.2],  # after episode 1
        [0.7, 0.8, 0.3],  # after episode 2
        [0.6, 0.5, 1.0],  # after episode 3
    ]
    m = gem_metrics(R, [1, 2, 3])
    assert m["acc"] == pytest.approx((0.6 + 0.5 + 1.0) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)  # -0.3: forgetting
    assert m["fwt"] == pytest.approx(((0.1 - 0.0) + (0.3 - 0.2)) / 2)  # R[1][2]-R[0][2], R[2][3]-R[0][3]
    assert m["tasks"] == 3


def test_gem_metrics_with_extra_sets_missing_cells_and_fewer_tasks():
    R = [
        [0.0, 0.0, 0.5],
        [1.0, None, 0.4],
        [0.5, 1.0, 0.3],
    ]
    m = gem_metrics(R, [1, 2, None])  # third set: general prompts, not a task
    assert m["acc"] == pytest.approx(0.75) and m["bwt"] == pytest.approx(-0.5)
    assert m["fwt"] is None  # R[1][2] is missing
    assert gem_metrics([[0.2], [0.9]], [1]) == {"acc": 0.9, "bwt": None, "fwt": None, "tasks": 1}
    # a set whose episode is not in the run is not a task yet
    assert gem_metrics([[0.2, 0.1], [0.9, 0.3]], [1, 2])["tasks"] == 1


def _set(name: str, role: str, score, teacher=None, **extra) -> dict:
    return {"role": role, "name": name, "path": f"/d/{name}.jsonl", "sha256": f"sha-{name}", "n": 4,
            "score": score, "teacher_score": teacher, **extra}


def test_matrix_from_episode_results():
    metas = [
        ("001-a", {"eval": {"sets": [
            _set("a", "task", 0.75, 1.0, before={"score": 0.0, "teacher_score": 0.5}, base={"score": 0.0, "teacher_score": 0.5}),
            _set("b", "retain", 0.25), _set("general", "retain", 0.5),
        ], "drift": {"kl_from_base": 0.01, "perplexity": 9.0, "base_perplexity": 8.0}}}),
        ("002-b", {"eval": {"sets": [
            _set("b", "task", 1.0, before={"score": 0.3, "teacher_score": 0.9}, base={"score": 0.1, "teacher_score": 0.8}),
            _set("a", "retain", 0.5), _set("general", "retain", 0.25),
        ], "drift": {"kl_from_base": 0.03, "perplexity": 9.5, "base_perplexity": 8.0}}}),
    ]
    m = matrix_from_episodes(metas)
    assert m.rows == ["base", "001-a", "002-b"] and m.columns == ["a", "b", "general"]
    assert m.taught_by == [1, 2, None]
    # row 1's own retain score for b (0.25) wins over episode 2's "before" baseline (0.3)
    assert m.scores == [[0.0, 0.1, None], [0.75, 0.25, 0.5], [0.5, 1.0, 0.25]]
    assert m.teacher[0] == [0.5, 0.8, None] and m.teacher[1][0] == 1.0
    assert [d["perplexity"] for d in m.drift] == [8.0, 9.0, 9.5] and m.drift[0]["kl_from_base"] == 0.0
    assert m.metrics() == pytest.approx({"acc": 0.75, "bwt": -0.25, "fwt": 0.15, "tasks": 2})
    again = Matrix.from_json(json.loads(json.dumps(m.to_json())))
    assert again.scores == m.scores and again.metrics() == m.metrics()
    header, rows = matrix_table(m)
    assert header == ["model", "a (task 1)", "b (task 2)", "general", "mean"]
    assert rows[0] == ["base", "0.00", "0.10", "-", "0.05"]
    assert matrix_from_episodes([("001-a", {"final": {}})]) is None


# ---------------------------------------------------------------------------------------------
# The recipe's eval section


def test_eval_section_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("train.jsonl", "ev.jsonl", "old.jsonl", "text.jsonl"):
        (tmp_path / "data" / name).write_text("{}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data: {path: data/train.jsonl}\n"
        "eval:\n  path: data/ev.jsonl\n  retain: [data/old.jsonl]\n  drift_path: data/text.jsonl\n"
    )
    cfg = load_recipe(recipe).eval
    assert cfg.path == tmp_path / "data" / "ev.jsonl" and cfg.retain == [tmp_path / "data" / "old.jsonl"]
    assert cfg.drift_path == tmp_path / "data" / "text.jsonl" and cfg.reward == "contains"


def test_eval_section_problems_are_located(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {path: train.jsonl}\neval:\n  path: gone.jsonl\n  retain:\n    - also_gone.jsonl\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    text = caught.value.render()
    assert "r.yaml:3: 'eval.path': file not found" in text and "r.yaml:5: 'eval.retain.0': file not found" in text
    recipe.write_text("data: {path: train.jsonl}\neval:\n  pth: x.jsonl\n")
    with pytest.raises(RecipeError, match="did you mean 'eval.path'"):
        load_recipe(recipe)
    with pytest.raises(ValueError, match="at least one"):
        EvalConfig()


def test_stored_eval_sets_follow_episode_order(tmp_path):
    from sdcli.models.episodes import Episode

    def episode(number: int, name: str, eval_yaml: str) -> Episode:
        folder = tmp_path / f"{number:03d}-{name}"
        folder.mkdir()
        (folder / "recipe.yaml").write_text(f"name: {name}\ndata: {{path: /x.jsonl}}\n{eval_yaml}")
        return Episode(number, name, folder, {})

    for name in ("a", "b", "g"):
        (tmp_path / f"{name}.jsonl").write_text("{}\n")
    eps = [
        episode(1, "a", f"eval: {{path: {tmp_path}/a.jsonl, retain: [{tmp_path}/g.jsonl]}}\n"),
        episode(2, "nothing", ""),
        episode(3, "b", f"eval: {{path: {tmp_path}/b.jsonl, retain: [{tmp_path}/a.jsonl, {tmp_path}/g.jsonl]}}\n"),
    ]
    paths, taught = stored_eval_sets(eps)
    assert [p.name for p in paths] == ["a.jsonl", "b.jsonl", "g.jsonl"] and taught == [1, 3, None]
    (tmp_path / "b.jsonl").unlink()
    with pytest.raises(Exception, match="003-b"):
        stored_eval_sets(eps)


def test_eval_set_describe_and_name(tmp_path):
    path = write_jsonl(tmp_path / "facts_eval.jsonl", [{"prompt": "a", "answer": "b"}])
    eval_set = load_eval_set(path)
    assert isinstance(eval_set, EvalSet) and eval_set.name == "facts_eval"
    assert eval_set.describe()["sha256"] == eval_set.sha256 and len(eval_set.sha256) == 64


# ---------------------------------------------------------------------------------------------
# The held-out answers' likelihood


def _example(answer, demonstration, reward="contains") -> EvalExample:
    record = {"prompt": "q", "answer": answer, "demonstration": demonstration}
    return EvalExample("x", [{"role": "user", "content": "q"}], record, reward, demonstration)


def test_answer_span_finds_text_numbers_and_regexes_in_the_demonstration():
    from sdcli.evaluation.answer_likelihood import answer_span

    assert answer_span(_example("copper", "The vorpal moth has Copper wings.")) == (20, 26)
    assert answer_span(_example(90, "A glowhorn deer lives for 90 years.", "numeric")) == (26, 28)
    assert answer_span(_example(r"\b(ten|10)\b", "A thornback beetle has ten legs.", "regex")) == (23, 26)
    assert answer_span(_example("violet", "A glimmerfish is blue.")) is None
    assert answer_span(_example("a.b", "axb")) is None  # text, not a pattern, unless reward: regex
    assert answer_span(_example("(", "x (", "regex")) is None  # a broken pattern finds nothing


def test_answer_likelihood_matches_a_plain_reference(tiny_model_dir):
    """The answer's tokens, teacher-forced after the prompt, scored as a plain model scores them."""
    from transformers import AutoModelForCausalLM

    from sdcli.evaluation.answer_likelihood import answer_likelihood
    from sdcli.models.sequences import PromptEncoder

    model, tokenizer = _with_random_adapter(tiny_model_dir)
    encoder = PromptEncoder(tokenizer, 512)
    examples = [
        _example("Quenta", "The capital of Zorblax is Quenta."),
        _example("violet", "A glimmerfish is blue."),  # answer not in the demonstration: whole NLL only
        EvalExample("none", [{"role": "user", "content": "Hi"}], {"answer": "x"}, "contains", None),
    ]
    views = [teacher_messages(ex, DEFAULT_DEMONSTRATION_TEMPLATE) for ex in examples]
    result = answer_likelihood(model, tokenizer, examples, views, encoder=encoder, adapters=[])

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def reference(prompt, demonstration, answer):
        p = encoder.encode(prompt)
        r = tokenizer(demonstration, add_special_tokens=False)["input_ids"]
        labels = torch.tensor([[-100] * len(p) + r])
        with torch.no_grad():
            logits = plain(input_ids=torch.tensor([p + r])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="none")[len(p) - 1 :]
        # the answer's tokens: those whose decoded text overlaps where the answer starts and ends
        start = demonstration.lower().find(answer.lower())
        spans, at = [], 0
        for i in range(len(r)):
            end = len(tokenizer.decode(r[: i + 1]))
            spans.append((at, end))
            at = end
        picked = [i for i, (s, e) in enumerate(spans) if start >= 0 and s < start + len(answer) and e > start]
        return float(nll.mean()), (float(nll[picked].mean()) if picked else None)

    whole0, answer0 = reference(examples[0].prompt, examples[0].demonstration, "Quenta")
    whole1, answer1 = reference(examples[1].prompt, examples[1].demonstration, "violet")
    t_whole0, t_answer0 = reference(views[0], examples[0].demonstration, "Quenta")
    assert answer1 is None and answer0 is not None
    lines = result["per_line"]
    assert lines[2] is None
    assert lines[0]["answer_nll"] == pytest.approx(answer0, rel=1e-4)
    assert lines[0]["demonstration_nll"] == pytest.approx(whole0, rel=1e-4)
    assert lines[0]["teacher_answer_nll"] == pytest.approx(t_answer0, rel=1e-4)
    assert "answer_nll" not in lines[1] and lines[1]["demonstration_nll"] == pytest.approx(whole1, rel=1e-4)
    assert result["answer_nll"] == pytest.approx(answer0, rel=1e-4) and result["answer_nll_n"] == 1
    assert result["demonstration_nll"] == pytest.approx((whole0 + whole1) / 2, rel=1e-4)
    assert result["teacher_demonstration_nll"] == pytest.approx((t_whole0 + reference(views[1], examples[1].demonstration, "x")[0]) / 2, rel=1e-4)
    # the adapter set is honoured: the random adapter moves the figures
    assert answer_likelihood(model, tokenizer, examples, views, encoder=encoder, adapters=["ep001"])["answer_nll"] != pytest.approx(answer0, rel=1e-3)


def test_response_token_nll_reads_the_head_a_chunk_at_a_time(tiny_model_dir):
    """The model's own logits at the response positions only, `chunk` positions per head call."""
    from sdcli.evaluation.answer_likelihood import response_token_nll

    model, _ = _with_random_adapter(tiny_model_dir)
    prompt, response = [1, 5, 9, 12, 7, 3], [20, 21, 22, 23, 24, 25, 26]
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[-2]))
    with torch.no_grad():
        nll = response_token_nll(model, prompt, response, chunk=3)
        handle.remove()
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    assert rows == [3, 3, 1]  # never more than a chunk of positions, and no prompt position
    expected = -logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)


def test_pairs_scored_together_equal_each_scored_alone(tiny_model_dir):
    """Batched (packed, the shared header once) and one pair at a time give the same NLLs; an
    empty response gives an empty tensor, and the pairs come back in order."""
    from sdcli.evaluation.answer_likelihood import response_token_nll, responses_token_nll

    model, tokenizer = _with_random_adapter(tiny_model_dir)
    header = [1, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    pairs = [(header + [30, 31], [40, 41, 42]), (header + [32], [43]), (header + [30, 31], [44, 45, 46, 47, 48]),
             ([5, 6, 7], []), (header + [33, 34, 35], [49, 50])]
    with torch.no_grad():
        together = responses_token_nll(model, pairs, tokenizer.pad_token_id, rows=4)
        alone = [response_token_nll(model, p, r) for p, r in pairs]
    assert [len(t) for t in together] == [3, 1, 5, 0, 2]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sampled_answers_share_right_per_line_reproducible_and_leaves_the_random_state(tiny_model_dir):
    from sdcli.evaluation.scoring import SAMPLING_SEED, sampled_answers
    from sdcli.models.sequences import PromptEncoder

    model, tokenizer = _with_random_adapter(tiny_model_dir)
    encoder = PromptEncoder(tokenizer, 512)
    examples = [EvalExample(str(i), [{"role": "user", "content": q}], {"answer": "x"}, "odd", None)
                for i, q in enumerate(["What is the capital of Zorblax?", "Hi"])]
    eval_set = EvalSet(Path("s.jsonl"), "0", examples, {"odd": lambda response, example: float(len(response) % 2)})
    kw = dict(encoder=encoder, max_new_tokens=8, adapters=["ep001"])

    torch.manual_seed(123)
    result = sampled_answers(model, tokenizer, eval_set, 6, **kw)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the caller's random stream is untouched
    assert sampled_answers(model, tokenizer, eval_set, 6, **kw) == result  # and the samples are the same every call

    # the same answers drawn by hand: 6 per line at temperature 1, scored, averaged per line then over lines
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SAMPLING_SEED)
        answers = model_answers(model, tokenizer, [ex.prompt for ex in examples for _ in range(6)], temperature=1.0, **kw)
    assert len(set(answers)) > 2  # sampled, not six copies of the greedy answer
    per_line = [sum(len(a) % 2 for a in answers[i * 6 : (i + 1) * 6]) / 6 for i in range(2)]
    assert result["per_line"] == pytest.approx(per_line) and result["score"] == pytest.approx(sum(per_line) / 2)
    assert result["errors"] == 0


def test_an_earlier_record_is_reused_only_for_the_same_set_stack_and_settings(tmp_path):
    from sdcli.evaluation.evaluate import _earlier_records, _reusable

    settings = {"max_new_tokens": 16, "teacher": True, "template": "t", "max_prompt_tokens": 512, "samples": 0,
                "reward": "contains", "merge": True, "base": "b", "dtype": "torch.float32", "quantization": "none",
                "device": "cpu"}
    record = {"role": "retain", "model": "after", "stack": ["a1"], "settings": settings, "sha256": "s", "score": 0.5,
              "examples": [{"id": "a", "response": "x"}]}
    old = {"role": "retain", "model": "after", "sha256": "s", "score": 0.25, "examples": []}  # before stacks were stored
    first, second = tmp_path / "001-a", tmp_path / "002-b"
    first.mkdir(), second.mkdir()
    (first / "eval.json").write_text(json.dumps({"sets": [record]}))
    (second / "eval.json").write_text("{not json")  # unreadable: scored again, never an error
    records = _earlier_records([first, second, tmp_path / "003-missing"])
    assert [folder for folder, _ in records] == ["001-a"]

    found = _reusable(records, "s", ["a1"], dict(settings))
    assert found["score"] == 0.5 and found["examples"] == record["examples"] and found["reused_from"] == "001-a/eval.json"
    assert "role" not in found and "model" not in found and "stack" not in found  # the caller says what they are now
    assert _reusable(records, "other", ["a1"], settings) is None  # another set
    assert _reusable(records, "s", [], settings) is None  # another model of the chain: the base
    assert _reusable(records, "s", ["a2"], settings) is None  # an adapter with other weights
    for key, value in [("max_new_tokens", 32), ("samples", 2), ("base", "another base"), ("template", "u"),
                       ("quantization", "nf4"), ("device", "cuda"), ("merge", False)]:
        assert _reusable(records, "s", ["a1"], {**settings, key: value}) is None, key
    assert _reusable([("001-a", old)], "s", ["a1"], settings) is None  # an older file never matches
    # a record that was itself read back keeps naming where it was answered
    again = _reusable([("002-b", {**record, "reused_from": "001-a/eval.json"})], "s", ["a1"], settings)
    assert again["reused_from"] == "001-a/eval.json"
