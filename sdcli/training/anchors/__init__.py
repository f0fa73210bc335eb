"""Shipped anchor prompts: everyday requests on which the student is held to the model it started
from (see `anchor:` in the recipe reference). None overlaps the benchmarks' general questions."""

from pathlib import Path

BUILTIN_ANCHORS = {"builtin:general": Path(__file__).with_name("general_prompts.jsonl")}


def load_anchor_prompts(path_or_builtin: str) -> list[list[dict[str, str]]]:
    """The anchor prompts as chat messages; raises DataError listing every bad line."""
    from sdcli.core.data import as_messages, read_jsonl
    from sdcli.core.errors import DataError

    path = BUILTIN_ANCHORS.get(path_or_builtin, Path(path_or_builtin))
    prompts, problems = [], []
    for line, record in read_jsonl(path):
        try:
            prompts.append(as_messages(record.get("prompt"), "prompt"))
        except ValueError as e:
            problems.append(f"{path}:{line}: {e}")
    if problems:
        raise DataError(f"{path}: {len(problems)} bad line(s) for anchor prompts:", problems,
                        hint='Each line needs {"prompt": "..." or [messages]}.')
    if not prompts:
        raise DataError(f"{path}: no anchor prompts.", [], hint='Each line needs {"prompt": "..."}.')
    return prompts
