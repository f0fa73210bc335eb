"""Evaluation of an episode (the training loop) and of whole sources and runs (`sd eval`).

The pieces: eval sets (sdcli.evaluation.eval_sets), greedy scores and the teacher's ceiling
(sdcli.evaluation.scoring), drift from the base model (sdcli.evaluation.drift).

`episode_eval` is what the training loop calls after the last step. It uses the in-memory model
and scores the episode's task set with three adapter sets: after (the whole stack), before (the
stack as the episode began) and base (no adapters). The retain sets are scored after, and in a
run's first episode also at the base. Drift is measured after. (`eval.baselines: false` keeps
only "after".) The summary goes into episode.json; the answers go into eval.json in the episode
folder, each set with the model that answered it (its adapters' hashes) and the settings it was
asked with.

A baseline an earlier episode of the chain already scored is read from that episode's eval.json
instead of answered again: the episode before this one scored this task set "after" when it was
one of its retain sets, with the model that is this episode's "before", and the first episode
scored every set at the base. A record is reused only when its set (content hash), its model
(the base's hash, dtype, quantization and device, and the adapters' hashes) and every setting that
shapes the answers are the same.

`evaluate_source` scores one model (a run prefix, the base, or a model folder) on every set;
`evaluate_matrix` every prefix of a run's stack on every set, the continual-learning matrix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdcli.core.numbers import fmt
from sdcli.evaluation.drift import measure_drift
from sdcli.evaluation.eval_sets import EvalSet, load_eval_set, load_texts
from sdcli.evaluation.leaks import describe_leak, leaked_answers, task_answers
from sdcli.evaluation.scoring import can_fold, describe_kinds, evaluate_set

DETAILS_FILE = "eval.json"


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
    parents: Sequence[Path] = (), stack: Sequence[str] = (), model_key: dict | None = None,
) -> dict:
    """Evaluate the just-trained model in memory; write the answers to folder/eval.json and return
    {"eval": summary} for episode.json ({} when the recipe has no eval section).

    parents: the folders of the episodes stacked under this one, oldest first; stack: the adapter
    hashes of those episodes and of this one, in the same order; model_key: what else makes the
    model (the base's hash, dtype, quantization, device). Baselines that the parents already scored
    with the same model and settings are read back instead of answered again (model_key None:
    everything is answered).

    A failure here never costs the trained episode: it is logged and recorded as {"eval": {"error"}}."""
    if plan is None:
        return {}
    try:
        return _episode_eval(plan, model, tokenizer, earlier, episode, folder, max_prompt_tokens, merge, log,
                             list(parents), list(stack), model_key)
    except Exception as e:  # noqa: BLE001 - the adapter is saved; keep the episode, say what failed
        log(f"warning: the evaluation after the episode failed ({type(e).__name__}: {e}); the episode is kept without it")
        return evaluation_failed(e)


def evaluation_failed(error: Exception) -> dict:
    """What episode.json records of an evaluation that did not finish."""
    return {"eval": {"error": f"{type(error).__name__}: {error}"}}


def _episode_eval(plan, model, tokenizer, earlier, episode, folder, max_prompt_tokens, merge, log, parents,
                  stack, model_key) -> dict:
    from sdcli.core.atomic import write_atomic
    from sdcli.models.sequences import PromptEncoder

    started = time.perf_counter()
    cfg = plan.cfg
    encoder = PromptEncoder(tokenizer, max_prompt_tokens)
    after = [*earlier, episode]
    adapters_of = {"after": stack, "before": stack[:-1], "base": []}  # each model's adapters, by hash
    records = _earlier_records(parents) if model_key is not None else []
    common = dict(encoder=encoder, template=plan.template, max_new_tokens=cfg.max_new_tokens, teacher=cfg.teacher, merge=merge)
    sets, details, reused = [], [], 0
    for role, eval_set in [("task", plan.task)] * (plan.task is not None) + [("retain", s) for s in plan.retain]:
        samples = cfg.samples if role == "task" else 0  # the episode's own questions: where learning shows
        settings = {"max_new_tokens": cfg.max_new_tokens, "teacher": cfg.teacher, "template": plan.template,
                    "max_prompt_tokens": max_prompt_tokens, "samples": samples, "reward": cfg.reward, "merge": merge,
                    **(model_key or {})}
        result = evaluate_set(model, tokenizer, eval_set, adapters=after, samples=samples, **common)
        summary = _summary(result, role)
        details.append({"role": role, "model": "after", "stack": adapters_of["after"], "settings": settings, **result})
        # baselines: the task set before the episode and at the base (forward transfer); a retain
        # set at the base only in a run's first episode, where "before" is the base anyway
        wanted = [] if not cfg.baselines else (
            [("before", list(earlier)), ("base", [])] if role == "task" else [("base", [])] if not earlier else []
        )
        for which, adapters in wanted:
            if which == "base" and not earlier and "before" in summary:
                summary[which] = summary["before"]  # the first episode began at the base
                continue
            baseline = _reusable(records, eval_set.sha256, adapters_of[which], settings)
            reused += baseline is not None
            if baseline is None:
                baseline = evaluate_set(model, tokenizer, eval_set, adapters=adapters, samples=samples, **common)
            summary[which] = {k: baseline.get(k) for k in ("score", "teacher_score", "answer_nll", "sampled_score")}
            details.append({"role": role, "model": which, "stack": adapters_of[which], "settings": settings, **baseline})
        if "base" in summary and not earlier:
            summary.setdefault("before", summary["base"])
        sets.append(summary)
        log(f"eval: {role} {eval_set.name}: {describe_scores(summary)}")
        if role == "retain" and plan.task is not None and task_answers(plan.task):
            before = _answers_before(details[-1], earlier, records, eval_set.sha256, adapters_of["before"], settings)
            summary["leaked"] = leaked_answers(plan.task, _responses(result), before)
            if summary["leaked"]["n"]:
                log(describe_leak(summary["leaked"], summary["n"], eval_set.name))
    drift = None
    if plan.drift_texts is not None:
        drift = {"path": str(plan.drift_path), **measure_drift(
            model, tokenizer, plan.drift_texts, max_tokens=cfg.drift_max_tokens, adapters=after
        )}
        log(f"eval: drift on {Path(plan.drift_path).name}: KL from base {fmt(drift['kl_from_base'], 4)}, "
            f"perplexity {fmt(drift['perplexity'], 2)} (base {fmt(drift['base_perplexity'], 2)})")
    if reused:
        log(f"eval: {reused} baseline(s) read from earlier episodes' {DETAILS_FILE} (the same model, set and settings)")
    write_atomic(folder / DETAILS_FILE, json.dumps({"sets": details, "drift": drift}, indent=2))
    return {"eval": {"sets": sets, "drift": drift, "seconds": round(time.perf_counter() - started, 2), "details": DETAILS_FILE}}


def _responses(result: dict) -> list[str]:
    return [line["response"] for line in result["examples"]]


def _answers_before(last_scored: dict, earlier, records, sha256: str, before_stack: list[str], settings: dict):
    """A retain set's answers as the episode began: the base's in a run's first episode (the
    baseline just scored, `last_scored`), else the previous episode's record of them; None without
    baselines or a record."""
    if not earlier:
        return _responses(last_scored) if last_scored["model"] == "base" else None
    record = _reusable(records, sha256, before_stack, settings, greedy_only=True)
    return _responses(record) if record else None


def _earlier_records(parents: Sequence[Path]) -> list[tuple[str, dict]]:
    """(episode folder name, one set's record) from each earlier episode's eval.json, newest first.
    An episode without one, or with one this version cannot read, gives nothing: it is scored again."""
    records = []
    for folder in reversed([Path(p) for p in parents]):
        try:
            sets = json.loads((folder / DETAILS_FILE).read_text())["sets"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        records += [(folder.name, entry) for entry in sets if isinstance(entry, dict)]
    return records


def _reusable(records: list[tuple[str, dict]], sha256: str, stack: list[str], settings: dict,
              greedy_only: bool = False) -> dict | None:
    """An earlier record of the set with this content hash, answered by the adapters with these
    hashes (in order) with the same settings; None when there is none. Records written before the
    stack and settings were stored never match. greedy_only: for its greedy answers alone, which
    do not depend on how many answers were sampled besides them."""
    ignored = {"samples"} if greedy_only else set()

    def compared(stored) -> dict | None:
        return {k: v for k, v in stored.items() if k not in ignored} if isinstance(stored, dict) else None

    for folder, entry in records:
        same_settings = compared(entry.get("settings")) == compared(settings)
        if entry.get("sha256") == sha256 and entry.get("stack") == stack and same_settings:
            found = {k: v for k, v in entry.items() if k not in ("role", "model", "stack", "settings", "reused_from")}
            return {**found, "reused_from": entry.get("reused_from") or f"{folder}/{DETAILS_FILE}"}
    return None


def describe_scores(summary: dict) -> str:
    text = f"score {fmt(summary['score'])} (n={summary['n']})"
    if summary.get("teacher_n"):
        text += f", teacher {fmt(summary['teacher_score'])}"
    if summary.get("role") == "task" and "before" in summary:
        text += f", before {fmt(summary['before']['score'])}, base {fmt(summary['base']['score'])}"
    elif "base" in summary:
        text += f", base {fmt(summary['base']['score'])}"
    before = (summary.get("before") or {}) if summary.get("role") == "task" else {}
    if summary.get("sampled_score") is not None:
        text += f"; sampled {fmt(summary['sampled_score'])} ({summary['samples']} per line"
        if before.get("sampled_score") is not None:
            text += f", before {fmt(before['sampled_score'])}"
        text += ")"
    if summary.get("answer_nll") is not None:
        text += f"; answer NLL {fmt(summary['answer_nll'])}"
        if summary.get("teacher_answer_nll") is not None:
            text += f" (teacher {fmt(summary['teacher_answer_nll'])})"
        if before.get("answer_nll") is not None:
            text += f", before {fmt(before['answer_nll'])}"
    if summary.get("by_kind"):
        text += "; by kind: " + describe_kinds(summary["by_kind"], counts=True)
    if summary.get("errors"):
        text += f", {summary['errors']} scorer error(s)"
    return text


# ---------------------------------------------------------------------------------------------
# Whole sources and runs (sd eval)


def _source_template(loaded) -> str:
    from sdcli.recipe.loading import load_recipe
    from sdcli.recipe.signal_sections import DEFAULT_DEMONSTRATION_TEMPLATE

    if not loaded.episodes:
        return DEFAULT_DEMONSTRATION_TEMPLATE
    return teacher_template(load_recipe(loaded.episodes[-1].path / "recipe.yaml", check_files=False))


def evaluate_source(
    source: Path, sets: list[EvalSet], *, upto: int | None = None, no_adapters: bool = False, drift_texts=None,
    drift_max_tokens: int = 256, teacher: bool = True, max_new_tokens: int = 48, batch_size: int | None = None, samples: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """One model (a run prefix, the base, or a model folder) on every set: {"model", "sets", "drift"}."""
    from sdcli.models.sequences import PromptEncoder
    from sdcli.models.source import load_source

    loaded = load_source(source, upto=upto, no_adapters=no_adapters)
    log(loaded.description)
    common = dict(
        encoder=PromptEncoder(loaded.tokenizer, 2048), template=_source_template(loaded), max_new_tokens=max_new_tokens,
        teacher=teacher, merge=can_fold(loaded.model), batch_size=batch_size, samples=samples,
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
    teacher: bool = True, max_new_tokens: int = 48, batch_size: int | None = None, log: Callable[[str], None] = lambda s: None,
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
