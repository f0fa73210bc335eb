"""What a command reads a model from: a run folder (base + a prefix of its episode stack) or a
plain model folder (for example one written by `sd merge --into model`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdcli.core.errors import UserError
from sdcli.models.episodes import EPISODES, Episode, list_episodes


@dataclass
class LoadedSource:
    model: object
    tokenizer: object
    description: str
    episodes: list[Episode]
    base_path: Path


def is_run_dir(path: Path) -> bool:
    return (Path(path) / EPISODES).is_dir()


def select_episodes(run_dir: Path, upto: int | None) -> list[Episode]:
    episodes = list_episodes(run_dir)
    if not episodes:
        raise UserError(f"{run_dir} has no finished episodes.", hint="Train one first: sd train RECIPE run_dir=" + str(run_dir))
    if upto is None:
        return episodes
    if not 0 <= upto <= len(episodes):
        raise UserError(f"--upto {upto}: {run_dir} has episodes 1..{len(episodes)}.")
    return episodes[:upto]


def load_source(source: Path, upto: int | None = None, no_adapters: bool = False, device=None) -> LoadedSource:
    from sdcli.models.model import load_base
    from sdcli.models.stack import attach_stack
    from sdcli.recipe.sections import DType, ModelConfig, Quantization

    source = Path(source)
    if is_run_dir(source):
        chosen = [] if no_adapters else select_episodes(source, upto)
        reference = (chosen or select_episodes(source, None))[-1].meta
        base = reference["base_model"]
        cfg = ModelConfig(name_or_path=base["path"], quantization=Quantization(base.get("quantization", "none")), dtype=DType.auto)
        loaded = load_base(cfg, device)
        model, names = attach_stack(loaded.model, [e.path for e in chosen])
        what = f"{source}: base + {len(names)} episode(s)" + (f" ({', '.join(e.label for e in chosen)})" if chosen else "")
        return LoadedSource(model, loaded.tokenizer, what, chosen, loaded.path)
    if (source / "config.json").is_file():
        from sdcli.models.model import load_base
        from sdcli.recipe.sections import ModelConfig

        loaded = load_base(ModelConfig(name_or_path=str(source)), device)
        return LoadedSource(loaded.model, loaded.tokenizer, f"{source} (model folder)", [], loaded.path)
    raise UserError(
        f"{source} is neither a run folder (with episodes/) nor a model folder (with config.json).",
        hint="Pass the run_dir of a recipe, or the --out folder of sd merge.",
    )
