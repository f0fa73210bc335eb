"""Layer 5: learning signals. Each one builds the teacher's context; none touches the training loop.
Imports verification (scorers, environments, the sandbox), the recipe and core."""

from __future__ import annotations

from sdcli.signals.base import ContextBuilder, Example, LoadReport, TeacherView


def build_signal(cfg) -> ContextBuilder:
    kind = cfg.kind
    if kind == "demonstrations":
        from sdcli.signals.demonstrations import DemonstrationsBuilder

        return DemonstrationsBuilder(cfg)
    if kind == "rewards":
        from sdcli.signals.rewards import RewardsBuilder

        return RewardsBuilder(cfg)
    if kind == "feedback":
        from sdcli.signals.feedback import FeedbackBuilder

        return FeedbackBuilder(cfg)
    if kind == "interactions":
        from sdcli.signals.interactions import InteractionsBuilder

        return InteractionsBuilder(cfg)
    raise ValueError(f"unknown signal kind {kind!r}")


__all__ = ["build_signal", "ContextBuilder", "Example", "LoadReport", "TeacherView"]
