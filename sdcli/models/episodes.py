"""Episode folders: layout, lineage and resumable checkpoints (written by sdcli.core.atomic).

    run_dir/episodes/
      001-facts/                      a finished episode (complete, verified, loadable)
        adapter_config.json           the adapter, standard PEFT format
        adapter_model.safetensors
        recipe.yaml                   the resolved recipe
        metrics.jsonl                 one line per step
        episode.json                  lineage: base hash, data hash, parents, adapter hash, times
      .partial-002-more/              an episode in progress (never loaded as an episode)
        checkpoint/                   the latest resumable state

An episode becomes visible only by renaming its finished `.partial-*` folder, so a crash never
leaves half an episode that later loads. `episode.json` records the sha256 of the adapter's
weights and of its config (`lora_alpha` there scales the weights' effect as much as the weights
do), both checked whenever an episode is loaded; episodes written before the config's hash was
recorded are checked on their weights alone. It also records the base model's hash, and a new
episode refuses to stack on episodes trained on another base (`check_same_base`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdcli import __version__
from sdcli.core.atomic import write_atomic
from sdcli.core.data import file_sha256, read_text
from sdcli.core.errors import UserError

EPISODES = "episodes"
PARTIAL_PREFIX = ".partial-"
META = "episode.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# file -> the key of its sha256 in episode.json
_HASHED = {"adapter_model.safetensors": "adapter_sha256", "adapter_config.json": "adapter_config_sha256"}
_FOLDER = re.compile(r"^(\d{3,})-([A-Za-z0-9][A-Za-z0-9_.-]*)$")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Episode:
    number: int
    name: str
    path: Path
    meta: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.number:03d}-{self.name}"


def folder_name(number: int, name: str) -> str:
    return f"{number:03d}-{name}"


def list_episodes(run_dir: Path, verify: bool = True) -> list[Episode]:
    """Finished episodes in order. Raises UserError if any folder is incomplete or altered."""
    root = Path(run_dir) / EPISODES
    if not root.is_dir():
        return []
    episodes, problems = [], []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        match = _FOLDER.match(child.name)
        if not child.is_dir() or not match:
            problems.append(f"{child}: not an episode folder (expected NNN-name)")
            continue
        try:
            meta = read_meta(child, verify=verify)
        except UserError as e:
            problems.append(e.headline)
            continue
        episodes.append(Episode(int(match.group(1)), match.group(2), child, meta))
    if problems:
        raise UserError(
            f"{root}: {len(problems)} damaged episode folder(s); nothing was loaded:",
            problems,
            hint="Move the damaged folder out of episodes/ (or delete it) and run again.",
        )
    numbers = [e.number for e in episodes]
    twice = sorted({n for n in numbers if numbers.count(n) > 1})
    if twice:  # two trainings ran into this run at once (before runs were locked)
        labels = [e.label for e in episodes if e.number in twice]
        raise UserError(
            f"{root}: episode number(s) {', '.join(f'{n:03d}' for n in twice)} used twice ({', '.join(labels)}); "
            "two trainings ran into this run at the same time.",
            hint="Move all but one of each out of episodes/ (into a run_dir of its own) and run again.",
        )
    if numbers != list(range(1, len(numbers) + 1)):
        raise UserError(f"{root}: episode numbers {numbers} have gaps; the lineage must be 001, 002, ... in order.")
    return episodes


def read_meta(folder: Path, verify: bool = True) -> dict[str, Any]:
    meta_path = folder / META
    if not meta_path.is_file():
        raise UserError(f"{folder}: no {META} (an interrupted or hand-made folder)")
    try:
        meta = json.loads(read_text(meta_path, UserError))
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{meta_path}: nested too deeply to read; sd writes a few levels") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    for name in ADAPTER_FILES:
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0:
            raise UserError(f"{folder}: {name} is missing or empty")
    if verify:
        for name, key in _HASHED.items():
            expected = meta.get(key)
            if expected is None and key != "adapter_sha256":
                continue  # an episode written before this hash was recorded
            if file_sha256(folder / name) != expected:
                raise UserError(f"{folder}: {name} does not match the sha256 in {META} (altered or truncated)")
    return meta


def adapter_hashes(folder: Path) -> dict[str, str]:
    """The hashes `episode.json` records for the adapter in `folder`, under their keys."""
    return {key: file_sha256(Path(folder) / name) for name, key in _HASHED.items()}


def check_same_base(parents: list[Episode], base_path: Path, base_hash: str, allow: bool = False, log=None) -> None:
    """Refuse to stack on episodes trained on another base model (a LoRA is a delta to the weights
    it was trained on; on other weights it is noise). With `allow`, only warn."""
    problems = []
    for p in parents:
        base = p.meta.get("base_model") or {}
        recorded = base.get("sha256")
        if recorded and recorded != base_hash:
            problems.append(f"episode {p.label} was trained on {base.get('path', '?')} (sha256 {recorded[:12]}...)")
    if not problems:
        return
    if allow:
        if log:
            log(f"warning: --allow-mixed-base: stacking on episodes trained on another base than {base_path} "
                f"(sha256 {base_hash[:12]}...): " + "; ".join(problems))
        return
    raise UserError(
        f"This episode's base model {base_path} (sha256 {base_hash[:12]}...) is not the one earlier episodes "
        "in this run were trained on:",
        problems,
        hint="Use the run's base model (model.name_or_path), or another run_dir. If the weights are the same "
        "(for example re-saved), pass --allow-mixed-base to stack anyway.",
    )


def next_number(run_dir: Path) -> int:
    return len(list_episodes(run_dir, verify=False)) + 1


def partial_dir(run_dir: Path, number: int, name: str) -> Path:
    return Path(run_dir) / EPISODES / f"{PARTIAL_PREFIX}{folder_name(number, name)}"


def find_partial(run_dir: Path, name: str) -> Path | None:
    root = Path(run_dir) / EPISODES
    if not root.is_dir():
        return None
    found = sorted(root.glob(f"{PARTIAL_PREFIX}*-{name}"))
    return found[-1] if found else None


def publish(partial: Path) -> Path:
    """Make a finished episode visible: one rename, after everything inside is written."""
    final = partial.parent / partial.name[len(PARTIAL_PREFIX) :]
    if final.exists():
        raise UserError(f"{final} already exists; refusing to overwrite an episode.")
    shutil.rmtree(partial / "checkpoint", ignore_errors=True)
    os.replace(partial, final)
    return final


_HASH_CACHE = ".content-hashes.json"


def model_content_hash(model_path: Path, cache_dir: Path | None = None) -> str:
    """sha256 over the model's config and weight files (cached by path, size and mtime)."""
    files = sorted(
        p for p in Path(model_path).iterdir() if p.suffix in {".safetensors", ".bin", ".json"} and "tokenizer" not in p.name
    )
    key = json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    cache: dict[str, str] = {}
    cache_file = (cache_dir / _HASH_CACHE) if cache_dir else None
    if cache_file and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except json.JSONDecodeError:
            cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    digest = h.hexdigest()
    if cache_file:
        cache[key] = digest
        write_atomic(cache_file, json.dumps(cache))
    return digest


def episode_meta(
    *, number: int, name: str, recipe, base_path: Path, base_hash: str, data_hash: str, parents: list[Episode],
    started: str, steps: int, final: dict, adapter_sha256: str, adapter_config_sha256: str | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    return {
        "number": number,
        "name": name,
        "sd_version": __version__,
        "method": recipe.method.value,
        "signal": recipe.signal.kind,
        "teacher": recipe.teacher.value,
        "base_model": {"path": str(base_path), "sha256": base_hash, "quantization": recipe.model.quantization.value},
        "data": {"path": str(recipe.data.path), "sha256": data_hash},
        "parents": [
            {"number": p.number, "name": p.name, "adapter_sha256": p.meta.get("adapter_sha256"),
             "adapter_config_sha256": p.meta.get("adapter_config_sha256")} for p in parents
        ],
        "steps": steps,
        "final": final,
        "adapter_sha256": adapter_sha256,
        "adapter_config_sha256": adapter_config_sha256,
        "lora": recipe.lora.model_dump(mode="json"),
        "started": started,
        "finished": now_iso(),
        **(extra or {}),
    }
