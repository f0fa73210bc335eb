"""Greedy scores of one model on an eval set, and the teacher's in-context ceiling beside them.

Score of a model on a set (sdcli.evaluation.eval_sets): the mean over lines of reward(greedy
answer, line). The greedy answer is at most `max_new_tokens` tokens at temperature 0. If a scorer
raises, that line scores 0 and is counted in `errors`.

Teacher score: the same model and the same greedy decoding, but the final user turn is rendered
through the demonstrations template with the line's `demonstration`. That is the teacher's view
in training. It is the in-context ceiling that self-distillation distils toward: with
`teacher: base`, the teacher of episode i is the model after episode i-1 with context, which is
the teacher score in row i-1 of the continual-learning matrix. Lines without a demonstration are
left out of it; `teacher_n` counts the lines that have one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from sdcli.core.data import Messages, with_last_user_text
from sdcli.core.numbers import fmt
from sdcli.core.prompts import demonstration_turn, joined
from sdcli.evaluation.eval_sets import EvalExample, EvalSet
from sdcli.verification.scorers import call_reward


def teacher_messages(example: EvalExample, template: str) -> Messages | None:
    """The teacher's view of a line: the demonstrations signal's template, or None without a demonstration."""
    if example.demonstration is None:
        return None
    return with_last_user_text(example.prompt, joined(demonstration_turn(template, example.prompt, example.demonstration)))


def score_responses(eval_set: EvalSet, responses: Sequence[str]) -> tuple[list[float], list[str]]:
    """(score per line, error messages). A scorer that raises or returns a non-number scores 0."""
    scores, errors = [], []
    for ex, response in zip(eval_set.examples, responses, strict=True):
        value, error = call_reward(eval_set.scorers[ex.reward], response, ex.record, ex.id)
        if error is not None:
            errors.append(error)
        scores.append(0.0 if value is None else value)
    return scores, errors


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def scores_by_kind(examples: Sequence[EvalExample], scores: Sequence[float], teacher_scores: dict[int, float]) -> dict:
    """{kind: {"n", "score", "teacher_score", "teacher_n"}} over the lines that name a kind, kinds in
    the order they first appear; {} when no line does. teacher_scores: line index -> the teacher's."""
    lines: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if ex.kind is not None:
            lines.setdefault(ex.kind, []).append(i)
    out = {}
    for kind, rows in lines.items():
        taught = [teacher_scores[i] for i in rows if i in teacher_scores]
        out[kind] = {"n": len(rows), "score": mean([scores[i] for i in rows]),
                     "teacher_score": mean(taught), "teacher_n": len(taught)}
    return out


def describe_kinds(by_kind: dict, counts: bool = False) -> str:
    """"direct 0.833, situation 0.167" (with counts: "direct 0.833 (n=6), ..."), from scores_by_kind."""
    return ", ".join(f"{kind} {fmt(k['score'])}" + (f" (n={k['n']})" if counts else "") for kind, k in by_kind.items())


# ---------------------------------------------------------------------------------------------
# Running the model


def can_fold(model) -> bool:
    """Adapters can be folded into the weights for fast sampling unless the base is quantized."""
    return all(p.dtype.is_floating_point for p in model.parameters())


@contextlib.contextmanager
def using(model, adapters: Sequence[str] | None):
    """Run with exactly `adapters` active ([] = the bare base), in eval mode; None = as the model is."""
    from sdcli.models.stack import active_adapters

    was_training = model.training
    model.eval()  # no LoRA dropout while evaluating
    try:
        with active_adapters(model, adapters) if adapters is not None else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


def default_batch_size(model, length: int) -> int:
    """Prompts per batch of answers of up to `length` positions: 32 where they decode through
    `sdcli.models.direct_decode` (a Llama-family model on a CPU), 16 through `generate`.
    `direct_decode` drops rows from the batch as they stop, so a larger batch shares each read of
    the weights among more rows and costs little for its longest answer. 76 eval questions of
    SmolLM2-135M (2026-12-01, 2 cores): 24 s at 16 rows; 16.5-18.4 s and a 1.73 GB process peak at
    32; 15.3-18.7 s and 1.97 GB at 64 (the KV cache grows with the batch). `generate` keeps every
    row to the end, and on a GPU a large model's cache is larger."""
    from sdcli.models.rollout import decodes_directly

    return 32 if decodes_directly(model, length) else 16


def greedy_answers(model, tokenizer, prompts: Sequence[Messages], **options) -> list[str]:
    """Greedy answers, in order (`model_answers` at temperature 0)."""
    return model_answers(model, tokenizer, prompts, temperature=0.0, **options)


def model_answers(
    model, tokenizer, prompts: Sequence[Messages], *, encoder, max_new_tokens: int, temperature: float,
    adapters: Sequence[str] | None = None, merge: bool = True, batch_size: int | None = None,
) -> list[str]:
    """The model's answers at `temperature` (0: greedy; above: sampled, untruncated), in order.
    Prompts are batched by length to keep padding small, `batch_size` at a time (None:
    `default_batch_size`)."""
    from sdcli.models.rollout import SamplingSettings, sample_responses
    from sdcli.models.sequences import eos_ids

    # with adapters=[] (the bare base) merged_for_sampling folds nothing: it skips switched-off adapters
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0, merge=merge)
    stop = eos_ids(tokenizer, model)
    encoded = [encoder.encode(p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    with using(model, adapters):  # the batch size asks the decoder with these adapters active
        batch_size = batch_size or default_batch_size(model, max(map(len, encoded), default=0) + max_new_tokens)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids = sample_responses(model, tokenizer, [encoded[i] for i in chunk], settings, stop)
            for i, text in zip(chunk, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                answers[i] = text.strip()
    return answers


def evaluate_set(
    model, tokenizer, eval_set: EvalSet, *, encoder, template: str, max_new_tokens: int, teacher: bool = True,
    adapters: Sequence[str] | None = None, merge: bool = True, batch_size: int | None = None, samples: int = 0,
) -> dict:
    """Score one model (one adapter set) on one eval set, with and without the teacher's context.

    Returns {name, path, sha256, n, score, errors, teacher_score, teacher_n, examples: [...]}, and
    where lines carry a demonstration also answer_nll, demonstration_nll and their
    teacher_ counterparts (sdcli.evaluation.answer_likelihood), with `samples` > 0 sampled_score
    (sampled_answers), and where lines name a `kind` by_kind (scores_by_kind); the student and
    teacher prompts go through `generate` together."""
    views = [teacher_messages(ex, template) if teacher else None for ex in eval_set.examples]
    with_context = [i for i, v in enumerate(views) if v is not None]
    prompts = [ex.prompt for ex in eval_set.examples] + [views[i] for i in with_context]
    answers = greedy_answers(
        model, tokenizer, prompts, encoder=encoder, max_new_tokens=max_new_tokens, adapters=adapters, merge=merge,
        batch_size=batch_size,
    )
    n = len(eval_set.examples)
    student, teacher_answers = answers[:n], answers[n:]
    scores, errors = score_responses(eval_set, student)
    t_scores: dict[int, float] = {}
    if with_context:
        subset = EvalSet(eval_set.path, eval_set.sha256, [eval_set.examples[i] for i in with_context], eval_set.scorers)
        values, t_errors = score_responses(subset, teacher_answers)
        errors += [f"teacher: {e}" for e in t_errors]
        t_scores = dict(zip(with_context, values))
    nll: dict = {}
    if any(ex.demonstration for ex in eval_set.examples):
        from sdcli.evaluation.answer_likelihood import answer_likelihood

        nll = answer_likelihood(model, tokenizer, eval_set.examples, views, encoder=encoder, adapters=adapters,
                                merge=merge)
    per_line = nll.pop("per_line", [None] * n)
    sampled = sampled_answers(model, tokenizer, eval_set, samples, encoder=encoder, max_new_tokens=max_new_tokens,
                              adapters=adapters, merge=merge, batch_size=batch_size) if samples > 0 else None
    examples = []
    for i, ex in enumerate(eval_set.examples):
        row = {"id": ex.id, "answer": ex.record.get("answer"), "reward": ex.reward, "response": student[i], "score": scores[i]}
        if ex.kind is not None:
            row["kind"] = ex.kind
        if i in t_scores:
            row.update(teacher_response=teacher_answers[with_context.index(i)], teacher_score=t_scores[i])
        row.update(per_line[i] or {})
        if sampled is not None:
            row["sampled_score"] = sampled["per_line"][i]
        examples.append(row)
    return {
        **eval_set.describe(),
        "n": n,
        "score": mean(scores),
        "errors": len(errors),
        "error_messages": errors[:10],
        "teacher_score": mean(list(t_scores.values())),
        "teacher_n": len(t_scores),
        **nll,
        **({"sampled_score": sampled["score"], "samples": samples, "sampled_errors": sampled["errors"]} if sampled else {}),
        **({"by_kind": by_kind} if (by_kind := scores_by_kind(eval_set.examples, scores, t_scores)) else {}),
        "examples": examples,
    }


SAMPLING_SEED = 0  # eval samples are the same on every call, and leave the caller's random state alone


def sampled_answers(
    model, tokenizer, eval_set: EvalSet, samples: int, *, encoder, max_new_tokens: int,
    adapters: Sequence[str] | None = None, merge: bool = True, batch_size: int | None = None,
) -> dict:
    """`samples` answers per line at temperature 1 (the model's own distribution, no truncation).

    {"score": mean over lines of the share of a line's samples the scorer gives, "per_line": that
    share per line, "errors": scorer errors}. A fact the model has half learned answers some
    samples right before its greedy answer flips, so this moves in steps of 1/(lines x samples)
    where the greedy score moves in steps of 1/lines."""
    import torch

    prompts = [ex.prompt for ex in eval_set.examples for _ in range(samples)]
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(SAMPLING_SEED)
        answers = model_answers(model, tokenizer, prompts, encoder=encoder, max_new_tokens=max_new_tokens, temperature=1.0,
                                adapters=adapters, merge=merge, batch_size=batch_size)
    repeated = EvalSet(eval_set.path, eval_set.sha256, [ex for ex in eval_set.examples for _ in range(samples)],
                       eval_set.scorers)
    scores, errors = score_responses(repeated, answers)
    per_line = [mean(scores[i * samples : (i + 1) * samples]) for i in range(len(eval_set.examples))]
    return {"score": mean(per_line), "per_line": per_line, "errors": len(errors)}
