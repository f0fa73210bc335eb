"""Layer 5: learning signals. Each one builds the teacher's context; none touches the training loop.
Imports verification (scorers, environments, the sandbox), the recipe and core."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from sdcli.core.errors import UserError
from sdcli.signals.base import ContextBuilder, Example, LoadReport, TeacherView


def build_signal(cfg) -> ContextBuilder:
    """The context builder of `cfg.kind` (one of sdcli.recipe.signal_sections.SIGNAL_KINDS, the one
    list of kinds): the class `<Kind>Builder` of the module `sdcli.signals.<kind>`, imported only
    when asked for (a signal's module may pull in the sandbox or a tokenizer)."""
    from sdcli.recipe.signal_sections import SIGNAL_KINDS

    if cfg.kind not in SIGNAL_KINDS:
        raise ValueError(f"unknown signal kind {cfg.kind!r}; expected one of {', '.join(SIGNAL_KINDS)}")
    module = importlib.import_module(f"{__name__}.{cfg.kind}")
    return getattr(module, f"{cfg.kind.capitalize()}Builder")(cfg)


def load_signal_data(
    recipe, signal: ContextBuilder | None = None, log: Callable[[str], None] | None = None
) -> tuple[ContextBuilder, LoadReport, Sequence[Example]]:
    """The one way a recipe's data is read: by `sd train` before a model loads, and by `sd
    validate`, so that validate passes exactly what train accepts.

    Returns (signal, report, examples): the signal's context builder (`signal` if given), what its
    `load` reported, and the examples training uses (the first `data.max_examples`). The signal's
    own check (user reward and environment functions import and fit) and the data file's lines
    are both checked, and their problems raised together as one UserError; then `method: sft`
    needs a demonstration (or a logged response) in every example. `log` hears what was skipped.
    """
    from sdcli.recipe.sections import Method

    signal = signal if signal is not None else build_signal(recipe.signal)
    errors: list[UserError] = []
    checker = getattr(signal, "check", None)
    if checker is not None:
        try:
            checker()
        except UserError as e:
            errors.append(e)
    try:
        report = signal.load(recipe.data.path)
    except UserError as e:
        errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise UserError(f"{len(errors)} problem(s):", [e.render() for e in errors])
    examples = report.examples[: recipe.data.max_examples] if recipe.data.max_examples else report.examples
    if log is not None:
        for reason, count in report.skipped.items():
            log(f"data: skipped {count} example(s): {reason}")
        for warning in report.warnings:
            log(f"data: {warning}")
    if recipe.method is Method.sft and any("demonstration" not in e.fields and e.response is None for e in examples):
        raise UserError("method: sft needs a demonstration (or logged response) for every example.")
    return signal, report, examples


__all__ = ["build_signal", "load_signal_data", "ContextBuilder", "Example", "LoadReport", "TeacherView"]
