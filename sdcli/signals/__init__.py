"""Layer 5: learning signals. Each one builds the teacher's context; none touches the training loop.
Imports verification (scorers, environments, the sandbox), the recipe and core."""

from __future__ import annotations

import importlib

from sdcli.signals.base import ContextBuilder, Example, LoadReport, TeacherView


def build_signal(cfg) -> ContextBuilder:
    """The context builder of `cfg.kind` (one of sdcli.recipe.config.SIGNAL_KINDS, the one list of
    kinds): the class `<Kind>Builder` of the module `sdcli.signals.<kind>`, imported only when asked
    for (a signal's module may pull in the sandbox or a tokenizer)."""
    from sdcli.recipe.config import SIGNAL_KINDS

    if cfg.kind not in SIGNAL_KINDS:
        raise ValueError(f"unknown signal kind {cfg.kind!r}; expected one of {', '.join(SIGNAL_KINDS)}")
    module = importlib.import_module(f"{__name__}.{cfg.kind}")
    return getattr(module, f"{cfg.kind.capitalize()}Builder")(cfg)


__all__ = ["build_signal", "ContextBuilder", "Example", "LoadReport", "TeacherView"]
