"""Evaluation: held-out scores, the teacher's ceiling, and drift from the base model.

Eval set: a JSONL file with one held-out question per line,

    {"id"?: str, "prompt": str | messages, "answer": str | number, "demonstration"?: str, "reward"?: str}

Score of a model on a set: the mean over lines of reward(greedy answer, line). The greedy answer
is at most `max_new_tokens` tokens at temperature 0. The scorers are the rewards signal's
(sdcli.verification.scorers): exact_match, numeric, regex and contains, each 0 or 1, so the score
is an accuracy; or a user `package.module:function`, called as function(response, line). A
line's own `reward` key wins. Otherwise `--reward` / `eval.reward` applies, and its default is `contains`.
`contains` is the default because instruct models answer a short fact with a sentence ("The
capital of Zorblax is Quenta."), which exact_match marks wrong. If a scorer raises, that line
scores 0 and is counted in `errors`.

Teacher score: the same model and the same greedy decoding, but the final user turn is rendered
through the demonstrations template with the line's `demonstration`. That is the teacher's view
in training. It is the in-context ceiling that self-distillation distils toward: with
`teacher: base`, the teacher of episode i is the model after episode i-1 with context, which is
the teacher score in row i-1 of the continual-learning matrix. Lines without a demonstration are
left out of it; `teacher_n` counts the lines that have one.

Drift, on general text (JSONL {"text": ...}, each text cut to `max_tokens` tokens; the first
token of a text is never predicted):

    KL from base = (1/N) sum_texts sum_t KL( p_model(. | x_<t) || p_base(. | x_<t) )
    perplexity   = exp( (1/N) sum_texts sum_t -log p_model(x_t | x_<t) )

N is the total number of predicted tokens (token-weighted means). p_base is the bare base model,
with every adapter off, so the drift of a chained run is cumulative. A plain model folder (e.g.
from `sd merge`) has no base to compare with, so its KL is None.

`episode_eval` is what the training loop calls after the last step. It uses the in-memory model
and scores the episode's task set with three adapter sets: after (the whole stack), before (the
stack as the episode began) and base (no adapters). The retain sets are scored after, and in a
run's first episode also at the base. Drift is measured after. (`eval.baselines: false` keeps
only "after".) The summary goes into episode.json; the answers go into eval.json in the episode
folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdcli.core.data import (
    Messages,
    as_messages,
    example_id,
    file_sha256,
    read_jsonl,
    with_last_user_text,
)
from sdcli.core.divergence import kl as token_kl  # KL(p || q) per position: [T, V] x2 -> [T]
from sdcli.core.errors import DataError, RecipeError
from sdcli.core.numbers import fmt
from sdcli.core.prompts import demonstration_turn, joined
from sdcli.verification.scorers import BUILTIN_REWARDS, RewardFn, builtin_reward, call_reward, check_answer, check_callable

DEFAULT_REWARD = "contains"
DETAILS_FILE = "eval.json"


# ---------------------------------------------------------------------------------------------
# Eval sets


@dataclass
class EvalExample:
    id: str
    prompt: Messages
    record: dict  # the whole line: what the scorer sees as `example`
    reward: str  # scorer name: the line's own, else the set's default
    demonstration: str | None


@dataclass
class EvalSet:
    path: Path
    sha256: str
    examples: list[EvalExample]
    scorers: dict[str, RewardFn] = field(default_factory=dict)  # reward name -> function

    @property
    def name(self) -> str:
        return self.path.stem

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256}


def resolve_scorer(spec: str, key: str = "eval.reward", search_dirs: Sequence[Path] = ()) -> RewardFn:
    """A built-in reward name or `package.module:function` -> (response, example) -> float."""
    from sdcli.recipe.signal_sections import RewardsSignal

    if spec in BUILTIN_REWARDS:
        return builtin_reward(spec, RewardsSignal(reward=spec))
    return check_callable(spec, key, " (response: str, example: dict) -> float", BUILTIN_REWARDS, search_dirs)


def load_eval_set(path: Path, default_reward: str = DEFAULT_REWARD, search_dirs: Sequence[Path] = ()) -> EvalSet:
    """Read and check an eval set. Raises DataError listing every bad line, and RecipeError for a
    reward that cannot be imported."""
    from sdcli.recipe.signal_sections import RewardsSignal

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Eval set not found: {path}", hint="Check the path (relative to the recipe's folder in a recipe).")
    scorers = {default_reward: resolve_scorer(default_reward, search_dirs=search_dirs)}
    problems: list[str] = []
    examples: list[EvalExample] = []
    for line, record in read_jsonl(path):
        where = f"{path}:{line}"
        try:
            prompt = as_messages(record.get("prompt"), "prompt")
        except ValueError as e:
            problems.append(f"{where}: {e if 'prompt' in record else 'missing prompt'}")
            continue
        reward = record.get("reward", default_reward)
        if not isinstance(reward, str) or not reward:
            problems.append(f"{where}: 'reward' must be a reward name, got {reward!r}")
            continue
        if reward not in scorers:
            try:
                scorers[reward] = resolve_scorer(reward, key=f"{where} 'reward'", search_dirs=search_dirs)
            except RecipeError as e:
                problems.append(e.headline)
                continue
        if reward in BUILTIN_REWARDS:
            problem = check_answer(reward, RewardsSignal(reward=reward), record)
            if problem:
                problems.append(f"{where}: {problem}")
                continue
        demo = record.get("demonstration")
        if demo is not None and (not isinstance(demo, str) or not demo.strip()):
            problems.append(f"{where}: 'demonstration' must be a non-empty string when present")
            continue
        examples.append(EvalExample(example_id(path, line, record), prompt, record, reward, demo))
    if problems:
        raise DataError(
            f"{path}: {len(problems)} bad line(s) in the eval set:", problems,
            hint='Each line needs {"prompt": "...", "answer": "..."}; optional "demonstration" (for the teacher score) '
            f"and \"reward\" ({', '.join(BUILTIN_REWARDS)} or package.module:function).",
        )
    return EvalSet(path, file_sha256(path), examples, scorers)


def load_texts(path: Path) -> list[str]:
    """A drift set: JSONL lines {"text": "..."}; raises DataError listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Drift text file not found: {path}")
    texts, problems = [], []
    for line, record in read_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{path}:{line}: needs a non-empty string 'text'")
        else:
            texts.append(text)
    if problems:
        raise DataError(f"{path}: {len(problems)} bad line(s) in the drift text file:", problems)
    return texts


# ---------------------------------------------------------------------------------------------
# Pure scoring


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


def perplexity(nll_sum: float, tokens: int) -> float | None:
    return math.exp(nll_sum / tokens) if tokens else None


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


def greedy_answers(
    model, tokenizer, prompts: Sequence[Messages], *, encoder, max_new_tokens: int, adapters: Sequence[str] | None = None,
    merge: bool = True, batch_size: int = 16,
) -> list[str]:
    """Greedy answers, in order. Prompts are batched by length to keep padding small."""
    from sdcli.models.rollout import SamplingSettings, sample_responses
    from sdcli.models.sequences import eos_ids

    # with adapters=[] (the bare base) merged_for_sampling folds nothing: it skips switched-off adapters
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, merge=merge)
    stop = eos_ids(tokenizer, model)
    encoded = [encoder.encode(p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    with using(model, adapters):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids = sample_responses(model, tokenizer, [encoded[i] for i in chunk], settings, stop)
            for i, text in zip(chunk, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                answers[i] = text.strip()
    return answers


def evaluate_set(
    model, tokenizer, eval_set: EvalSet, *, encoder, template: str, max_new_tokens: int, teacher: bool = True,
    adapters: Sequence[str] | None = None, merge: bool = True, batch_size: int = 16,
) -> dict:
    """Score one model (one adapter set) on one eval set, with and without the teacher's context.

    Returns {name, path, sha256, n, score, errors, teacher_score, teacher_n, examples: [...]}; the
    student and teacher prompts go through `generate` together."""
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
    examples = []
    for i, ex in enumerate(eval_set.examples):
        row = {"id": ex.id, "answer": ex.record.get("answer"), "reward": ex.reward, "response": student[i], "score": scores[i]}
        if i in t_scores:
            row.update(teacher_response=teacher_answers[with_context.index(i)], teacher_score=t_scores[i])
        examples.append(row)
    return {
        **eval_set.describe(),
        "n": n,
        "score": mean(scores),
        "errors": len(errors),
        "error_messages": errors[:10],
        "teacher_score": mean(list(t_scores.values())),
        "teacher_n": len(t_scores),
        "examples": examples,
    }


@torch.no_grad()
def measure_drift(model, tokenizer, texts: Sequence[str], *, max_tokens: int = 256, adapters: Sequence[str] | None = None) -> dict:
    """Mean per-token KL(model || bare base) and perplexity of the model (and of the base) on `texts`."""
    from peft import PeftModel

    has_base = isinstance(model, PeftModel)
    device = next(model.parameters()).device
    kl_sum = nll_sum = base_nll_sum = 0.0
    tokens = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=device)
        target = x[0, 1:, None]
        with using(model, adapters):
            logp = model(input_ids=x, use_cache=False).logits[0, :-1].float().log_softmax(-1)
        nll_sum += float(-logp.gather(-1, target).sum())
        if has_base:
            with using(model, []):
                logq = model(input_ids=x, use_cache=False).logits[0, :-1].float().log_softmax(-1)
            kl_sum += float(token_kl(logp, logq).sum())
            base_nll_sum += float(-logq.gather(-1, target).sum())
            del logq
        del logp
        tokens += len(ids) - 1
    return {
        "kl_from_base": kl_sum / tokens if has_base and tokens else None,
        "perplexity": perplexity(nll_sum, tokens),
        "base_perplexity": perplexity(base_nll_sum, tokens) if has_base else None,
        "tokens": tokens,
        "texts": len(texts),
    }


# ---------------------------------------------------------------------------------------------
# After an episode (called by the training loop)


@dataclass
class EvalPlan:
    task: EvalSet | None
    retain: list[EvalSet]
    drift_path: Path | None
    drift_texts: list[str] | None
    template: str
    cfg: object  # EvalConfig


def teacher_template(recipe) -> str:
    """The teacher's template: the recipe's own when it trains on demonstrations, else the default."""
    from sdcli.recipe.signal_sections import DEFAULT_DEMONSTRATION_TEMPLATE

    signal = getattr(recipe, "signal", None)
    return signal.teacher_template if getattr(signal, "kind", None) == "demonstrations" else DEFAULT_DEMONSTRATION_TEMPLATE


def load_eval_plan(recipe) -> EvalPlan | None:
    """Read and check every file of `recipe.eval` (before training, so a bad line fails fast)."""
    cfg = recipe.eval
    if cfg is None:
        return None
    dirs = [Path(cfg.path).parent] if cfg.path is not None else []
    task = load_eval_set(cfg.path, cfg.reward, dirs) if cfg.path is not None else None
    retain = [load_eval_set(p, cfg.reward, [Path(p).parent]) for p in cfg.retain]
    texts = load_texts(cfg.drift_path) if cfg.drift_path is not None else None
    return EvalPlan(task, retain, cfg.drift_path, texts, teacher_template(recipe), cfg)


def _summary(result: dict, role: str) -> dict:
    return {"role": role, **{k: v for k, v in result.items() if k not in ("examples", "error_messages")}}


def episode_eval(
    plan: EvalPlan | None, model, tokenizer, *, earlier: Sequence[str], episode: str, folder: Path,
    max_prompt_tokens: int = 512, merge: bool = True, log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Evaluate the just-trained model in memory; write the answers to folder/eval.json and return
    {"eval": summary} for episode.json ({} when the recipe has no eval section).

    A failure here never costs the trained episode: it is logged and recorded as {"eval": {"error"}}."""
    if plan is None:
        return {}
    try:
        return _episode_eval(plan, model, tokenizer, earlier, episode, folder, max_prompt_tokens, merge, log)
    except Exception as e:  # noqa: BLE001 - the adapter is saved; keep the episode, say what failed
        log(f"warning: the evaluation after the episode failed ({type(e).__name__}: {e}); the episode is kept without it")
        return {"eval": {"error": f"{type(e).__name__}: {e}"}}


def _episode_eval(plan, model, tokenizer, earlier, episode, folder, max_prompt_tokens, merge, log) -> dict:
    from sdcli.core.atomic import write_atomic
    from sdcli.models.sequences import PromptEncoder

    started = time.perf_counter()
    cfg = plan.cfg
    encoder = PromptEncoder(tokenizer, max_prompt_tokens)
    after = [*earlier, episode]
    common = dict(encoder=encoder, template=plan.template, max_new_tokens=cfg.max_new_tokens, teacher=cfg.teacher, merge=merge)
    sets, details = [], []
    for role, eval_set in [("task", plan.task)] * (plan.task is not None) + [("retain", s) for s in plan.retain]:
        result = evaluate_set(model, tokenizer, eval_set, adapters=after, **common)
        summary = _summary(result, role)
        details.append({"role": role, "model": "after", **result})
        # baselines: the task set before the episode and at the base (forward transfer); a retain
        # set at the base only in a run's first episode, where "before" is the base anyway
        wanted = [] if not cfg.baselines else (
            [("before", list(earlier)), ("base", [])] if role == "task" else [("base", [])] if not earlier else []
        )
        for which, adapters in wanted:
            if which == "base" and not earlier and "before" in summary:
                summary[which] = summary["before"]  # the first episode began at the base
                continue
            baseline = evaluate_set(model, tokenizer, eval_set, adapters=adapters, **common)
            summary[which] = {"score": baseline["score"], "teacher_score": baseline["teacher_score"]}
            details.append({"role": role, "model": which, **baseline})
        if "base" in summary and not earlier:
            summary.setdefault("before", summary["base"])
        sets.append(summary)
        log(f"eval: {role} {eval_set.name}: {describe_scores(summary)}")
    drift = None
    if plan.drift_texts is not None:
        drift = {"path": str(plan.drift_path), **measure_drift(
            model, tokenizer, plan.drift_texts, max_tokens=cfg.drift_max_tokens, adapters=after
        )}
        log(f"eval: drift on {Path(plan.drift_path).name}: KL from base {fmt(drift['kl_from_base'], 4)}, "
            f"perplexity {fmt(drift['perplexity'], 2)} (base {fmt(drift['base_perplexity'], 2)})")
    write_atomic(folder / DETAILS_FILE, json.dumps({"sets": details, "drift": drift}, indent=2))
    return {"eval": {"sets": sets, "drift": drift, "seconds": round(time.perf_counter() - started, 2), "details": DETAILS_FILE}}


def describe_scores(summary: dict) -> str:
    text = f"score {fmt(summary['score'])} (n={summary['n']})"
    if summary.get("teacher_n"):
        text += f", teacher {fmt(summary['teacher_score'])}"
    if summary.get("role") == "task" and "before" in summary:
        text += f", before {fmt(summary['before']['score'])}, base {fmt(summary['base']['score'])}"
    elif "base" in summary:
        text += f", base {fmt(summary['base']['score'])}"
    if summary.get("errors"):
        text += f", {summary['errors']} scorer error(s)"
    return text


# ---------------------------------------------------------------------------------------------
# Whole sources and runs (sd eval)


def stored_eval_sets(episodes) -> tuple[list[Path], list[int | None]]:
    """The eval sets named in each episode's stored recipe: tasks in episode order, then retain
    sets. Returns (paths, taught_by). Raises UserError when none is named or a file is gone."""
    from sdcli.core.errors import UserError
    from sdcli.recipe.loading import load_recipe

    paths: list[Path] = []
    taught: list[int | None] = []
    retain: list[Path] = []
    missing: list[str] = []
    for ep in episodes:
        cfg = load_recipe(ep.path / "recipe.yaml", check_files=False).eval
        if cfg is None:
            continue
        for key, p in cfg.files():
            if key != "drift_path" and not Path(p).is_file():
                missing.append(f"{ep.label}: eval.{key}: {p}")
        if cfg.path is not None and Path(cfg.path) not in paths:  # a task taught again keeps its first episode
            paths.append(Path(cfg.path))
            taught.append(ep.number)
        retain += [Path(p) for p in cfg.retain]
    if missing:
        raise UserError("Eval sets named in the stored recipes are gone:", missing, hint="Pass the sets with --data instead.")
    for p in retain:
        if p not in paths:
            paths.append(p)
            taught.append(None)
    if not paths:
        raise UserError(
            "No eval sets: none given with --data, and no episode's recipe has an eval section.",
            hint="Example: sd eval RUN_DIR --matrix --data task1_eval.jsonl --data task2_eval.jsonl",
        )
    return paths, taught


def _source_template(loaded) -> str:
    from sdcli.recipe.loading import load_recipe
    from sdcli.recipe.signal_sections import DEFAULT_DEMONSTRATION_TEMPLATE

    if not loaded.episodes:
        return DEFAULT_DEMONSTRATION_TEMPLATE
    return teacher_template(load_recipe(loaded.episodes[-1].path / "recipe.yaml", check_files=False))


def evaluate_source(
    source: Path, sets: list[EvalSet], *, upto: int | None = None, no_adapters: bool = False, drift_texts=None,
    drift_max_tokens: int = 256, teacher: bool = True, max_new_tokens: int = 48, batch_size: int = 16,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """One model (a run prefix, the base, or a model folder) on every set: {"model", "sets", "drift"}."""
    from sdcli.models.sequences import PromptEncoder
    from sdcli.models.source import load_source

    loaded = load_source(source, upto=upto, no_adapters=no_adapters)
    log(loaded.description)
    common = dict(
        encoder=PromptEncoder(loaded.tokenizer, 2048), template=_source_template(loaded), max_new_tokens=max_new_tokens,
        teacher=teacher, merge=can_fold(loaded.model), batch_size=batch_size,
    )
    results = []
    for eval_set in sets:
        results.append(evaluate_set(loaded.model, loaded.tokenizer, eval_set, **common))
        log(f"{eval_set.name}: {describe_scores(results[-1])}")
    drift = measure_drift(loaded.model, loaded.tokenizer, drift_texts, max_tokens=drift_max_tokens) if drift_texts else None
    return {
        "source": str(source), "model": loaded.description, "episodes": [e.label for e in loaded.episodes],
        "sets": results, "drift": drift,
    }


def evaluate_matrix(
    run_dir: Path, sets: list[EvalSet], taught_by: list[int | None], *, drift_texts=None, drift_max_tokens: int = 256,
    teacher: bool = True, max_new_tokens: int = 48, batch_size: int = 16, log: Callable[[str], None] = lambda s: None,
):
    """Every prefix of a run's stack (base, after 1, ..., after E) on every set, from one loaded
    model whose adapters are switched per row. Returns (Matrix, details per row)."""
    from sdcli.evaluation.continual_matrix import Matrix
    from sdcli.models.sequences import PromptEncoder
    from sdcli.models.source import load_source
    from sdcli.models.stack import adapter_name

    loaded = load_source(run_dir)
    names = [adapter_name(e.number) for e in loaded.episodes]
    common = dict(
        encoder=PromptEncoder(loaded.tokenizer, 2048), template=_source_template(loaded), max_new_tokens=max_new_tokens,
        teacher=teacher, merge=can_fold(loaded.model), batch_size=batch_size,
    )
    rows = ["base"] + [e.label for e in loaded.episodes]
    scores, teacher_scores, drift, details = [], [], [], []
    for i, label in enumerate(rows):
        adapters = names[:i]
        results = [evaluate_set(loaded.model, loaded.tokenizer, s, adapters=adapters, **common) for s in sets]
        scores.append([r["score"] for r in results])
        teacher_scores.append([r["teacher_score"] for r in results])
        row_drift = None
        if drift_texts:
            row_drift = measure_drift(loaded.model, loaded.tokenizer, drift_texts, max_tokens=drift_max_tokens, adapters=adapters)
        drift.append(row_drift)
        details.append({"row": label, "sets": results, "drift": row_drift})
        log(f"{label}: " + "  ".join(f"{s.name} {fmt(r['score'])}" for s, r in zip(sets, results)))
    matrix = Matrix(
        rows=rows, columns=[s.name for s in sets], scores=scores, taught_by=list(taught_by), teacher=teacher_scores,
        keys=[s.sha256 for s in sets], drift=drift if drift_texts else None,
    )
    return matrix, details
