"""`sd validate`: everything that can be checked without training, cheaply."""

from __future__ import annotations

import json
from pathlib import Path

from sdcli.recipe.schema import Recipe
from sdcli.recipe.sections import BUILTIN_MODEL, LoraSettings, ModelConfig
from sdcli.core.errors import UserError
from sdcli.models.model_folder import check_model_folder as check_model_folder_files
from sdcli.signals import build_signal, load_signal_data


def check_model_folder(model: ModelConfig, lora: LoraSettings | None = None) -> str:
    """The base model checked as far as it can be without loading its weights (`sdcli.models.model_folder`):
    config, model type, weight files whole, target modules present, a chat template. Returns a
    one-line description; raises UserError listing every problem."""
    name_or_path = model.name_or_path
    targets = lora.target_modules if lora is not None else None
    if name_or_path == BUILTIN_MODEL:
        from sdcli.models.builtin_model import FOLDER_NAME, cache_root, gguf_path

        gguf_path()
        cached = cache_root() / "models" / FOLDER_NAME
        if (cached / "config.json").is_file():  # made on first use; its module names are known from then on
            check_model_folder_files(cached, targets)
        return f"{BUILTIN_MODEL} (cached in {cache_root() / 'models'} on first use)"
    path = Path(name_or_path)
    check_model_folder_files(path, targets, model.trust_remote_code)
    config = json.loads((path / "config.json").read_text(encoding="utf-8-sig"))
    from sdcli.models.model import load_tokenizer

    load_tokenizer(path)  # raises when there is no chat template
    return f"{path} ({config.get('model_type', '?')})"


def _total_steps(recipe: Recipe, examples) -> object:
    n = examples if isinstance(examples, int) else None
    if recipe.train.epochs is not None and n is None:
        return f"{recipe.train.epochs} epoch(s)"
    return recipe.train.total_steps(n or 0)


def check_recipe(recipe: Recipe) -> dict[str, object]:
    """Raise UserError listing every problem; return a short summary otherwise."""
    problems: list[str] = []
    signal = build_signal(recipe.signal)
    summary: dict[str, object] = {"name": recipe.name, "method": recipe.method.value, "signal": recipe.signal.kind}
    if hasattr(signal, "describe"):
        summary["mode"] = signal.describe()  # interactions: what y is and which follow-up the teacher sees
    try:  # as sd train reads it (its own check included), so that validate passes what train accepts
        _, report, examples = load_signal_data(recipe, signal)
        summary["examples"] = len(examples)
        if report.skipped:
            summary["skipped"] = ", ".join(f"{k}: {v}" for k, v in report.skipped.items())
    except UserError as e:
        problems.append(e.render())
    try:
        summary["model"] = check_model_folder(recipe.model, recipe.lora)
    except UserError as e:
        problems.append(e.render())
    if recipe.eval is not None:
        from sdcli.evaluation.evaluate import load_eval_plan

        try:
            plan = load_eval_plan(recipe)
            summary["eval sets"] = len(plan.retain) + (plan.task is not None)
        except UserError as e:
            problems.append(e.render())
    if problems:
        raise UserError(f"{len(problems)} problem(s):", problems)
    summary.update(
        {
            "run_dir": recipe.run_dir,
            "teacher": recipe.teacher.value,
            "loss": f"{recipe.loss.divergence.value} / {recipe.loss.support.value}",
            "steps": f"{_total_steps(recipe, summary.get('examples'))} x {recipe.train.prompts_per_step} prompts "
            f"({recipe.rollout.off_policy_fraction:.0%} off-policy) x {recipe.rollout.num_samples} samples"
            + (f", {recipe.train.updates_per_rollout} updates per rollout" if recipe.train.updates_per_rollout > 1 else ""),
            "quantization": recipe.model.quantization.value,
        }
    )
    if getattr(recipe.signal, "environment", None) == "python_tests":
        from sdcli.verification.sandbox import isolation

        summary["sandbox"] = isolation().describe()  # which isolation the model's code gets on this machine
    return summary
