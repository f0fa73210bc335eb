"""Eval sets: reading and checking held-out questions and drift texts, and finding a run's sets.

Eval set: a JSONL file with one held-out question per line,

    {"id"?: str, "prompt": str | messages, "answer": str | number, "demonstration"?: str, "reward"?: str,
     "kind"?: str}

`kind` groups lines for a score per kind (e.g. direct / paraphrase / situation) beside the set's.

The scorers are the rewards signal's (sdcli.verification.scorers): exact_match, numeric, regex and
contains, each 0 or 1, so the score is an accuracy; or a user `package.module:function`, called as
function(response, line). A line's own `reward` key wins. Otherwise `--reward` / `eval.reward`
applies, and its default is `contains`. `contains` is the default because instruct models answer a
short fact with a sentence ("The capital of Zorblax is Quenta."), which exact_match marks wrong.

Drift set: a JSONL file of {"text": ...} lines (sdcli.evaluation.drift).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdcli.core.data import Messages, as_messages, example_id, file_sha256, read_jsonl
from sdcli.core.errors import DataError, RecipeError
from sdcli.verification.scorers import BUILTIN_REWARDS, RewardFn, builtin_reward, check_answer, check_callable

DEFAULT_REWARD = "contains"


@dataclass
class EvalExample:
    id: str
    prompt: Messages
    record: dict  # the whole line: what the scorer sees as `example`
    reward: str  # scorer name: the line's own, else the set's default
    demonstration: str | None
    kind: str | None = None  # the line's group for a score per kind (e.g. "paraphrase")


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
        kind = record.get("kind")
        if kind is not None and (not isinstance(kind, str) or not kind.strip()):
            problems.append(f"{where}: 'kind' must be a non-empty string when present, got {kind!r}")
            continue
        examples.append(EvalExample(example_id(path, line, record), prompt, record, reward, demo, kind))
    if problems:
        raise DataError(
            f"{path}: {len(problems)} bad line(s) in the eval set:", problems,
            hint='Each line needs {"prompt": "...", "answer": "..."}; optional "demonstration" (for the teacher score), '
            f"\"reward\" ({', '.join(BUILTIN_REWARDS)} or package.module:function) and \"kind\" (a group name).",
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
